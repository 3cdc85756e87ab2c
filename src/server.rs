//! The accept loop: one hyper connection per TCP socket serving the warp
//! routes, upgrades handed to sessions, and shutdown that closes every socket.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::context::Ctx;
use crate::error::Error;
use crate::routes;
use crate::ws::{self, PeerAddr, UpgradeSlot};

/// Binds with a listen backlog of 4096: tokio's default of 128 drops SYNs when
/// a crowd connects at once, and each drop costs a client a 1 s retry.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting, closes
/// every WebSocket with 1001, lets pending writes finish and returns (within
/// `config.shutdown_timeout`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (stop, stopped) = watch::channel(false);
    let ctx = Ctx::new(config, stopped).await?;
    let service = warp::service(routes::routes(ctx.clone()));
    if let Ok(addr) = listener.local_addr() {
        log::info!("listening on http://{addr}");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_connection(ctx.clone(), stream, peer, service.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    log::info!("shutting down: closing {} connections", ctx.live_sessions());
    let _ = stop.send(true);
    let deadline = ctx.config.shutdown_timeout;
    if tokio::time::timeout(deadline, ctx.sessions_closed())
        .await
        .is_err()
    {
        log::warn!(
            "shutdown timeout: {} connections still open",
            ctx.live_sessions()
        );
    }
    // Everything accepted before the stop is committed before we return.
    ctx.writer.barrier().await;
    if let Some(cluster) = &ctx.cluster {
        cluster.goodbye().await;
    }
    log::info!("stopped");
    Ok(())
}

/// Lets a request's handler drop its TCP connection. An SSE session whose
/// peer stopped reading needs it: hyper, stuck writing to that peer, would
/// hold the connection for as long as the peer keeps it open.
#[derive(Clone, Default)]
pub struct ConnectionAbort(Arc<Notify>);

impl ConnectionAbort {
    pub fn abort(&self) {
        // A stored permit: the connection sees it even if not yet waiting.
        self.0.notify_one();
    }
}

async fn serve_connection<S>(ctx: Ctx, stream: TcpStream, peer: SocketAddr, service: S)
where
    S: tower_service::Service<
            http::Request<Incoming>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let _live = ctx.session_guard();
    let _ = stream.set_nodelay(true);
    let abort = ConnectionAbort::default();
    let handle = abort.clone();
    let hyper_service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        if ws::wants_upgrade(req.headers()) {
            let on_upgrade = hyper::upgrade::on(&mut req);
            req.extensions_mut().insert(UpgradeSlot::new(on_upgrade));
        }
        req.extensions_mut().insert(PeerAddr(peer));
        req.extensions_mut().insert(handle.clone());
        service.clone().call(req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), hyper_service)
        .with_upgrades();
    tokio::pin!(conn);
    let aborted = abort.0.notified();
    tokio::pin!(aborted);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = &mut aborted => return log::debug!("connection from {peer}: dropped"),
        _ = ctx.shutting_down() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn => result,
                _ = aborted => return log::debug!("connection from {peer}: dropped"),
            }
        }
    };
    if let Err(e) = result {
        log::debug!("connection from {peer}: {e}");
    }
}

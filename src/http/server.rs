//! The accept loop: one hyper connection per TCP socket serving the warp
//! routes, upgrades handed to sessions, and shutdown that closes every socket.
//! Also what every connection gets before the routes see it: the bound on
//! connections waiting for a request (`pending`), the write timeout
//! (`write_timeout`), and the checks of a request head no route should see.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use warp::http::{header, HeaderValue, StatusCode};

use tokio::sync::watch;

use crate::config::Config;
use crate::domain::error::Error;
use crate::http::context::Ctx;
use crate::http::error::error_response;
use crate::http::fdlimit;
use crate::http::filters::PeerAddr;
use crate::http::forwarded;
use crate::http::pending::{self, Pending, Ticket};
use crate::http::router;
use crate::http::sse::ConnectionAbort;
use crate::http::write_timeout::{Switch, WriteTimeout};
use crate::http::ws::{self, UpgradeSlot};

/// How long hyper waits for a request head, on a new connection and between
/// keep-alive requests alike (hyper arms it whenever it reads a head).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept doubles from this…
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
/// …up to this, and a successful accept resets it.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Accept failures are logged at most this often, with a count.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

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
    let open_files = fdlimit::raise();
    let (stop, stopped) = watch::channel(false);
    let ctx = Ctx::new(crate::engines::start(config, stopped).await?);
    forwarded::serve(&ctx);
    let service = warp::service(router::routes(ctx.clone()));
    let bound = ctx
        .config
        .max_pending_conns
        .unwrap_or_else(|| pending::default_bound(open_files));
    let pending = Pending::new(bound, ctx.metrics.pending_dropped.clone());
    log::debug!("at most {bound} connections may wait for a request head");
    if let Ok(addr) = listener.local_addr() {
        crate::core::startup::log_started(&ctx.config, addr);
    }
    tokio::pin!(shutdown);
    let mut accept_errors = AcceptErrors::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    accept_errors.succeeded();
                    let ticket = pending.admit();
                    tokio::spawn(serve_connection(ctx.clone(), stream, peer, service.clone(), ticket));
                }
                Err(e) => {
                    if out_of_descriptors(&e) {
                        // A silent socket's descriptor is better spent on
                        // whoever is next in the backlog.
                        pending.evict_oldest();
                    }
                    let pause = accept_errors.failed(&e);
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
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
    ctx.broker.goodbye().await;
    log::info!("stopped");
    Ok(())
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Failed accepts (out of descriptors, ENOBUFS…): each pauses accepting, for
/// longer each time in a row, so a full descriptor table is not polled in a
/// loop; and they are logged at most once per [`ACCEPT_LOG_EVERY`], with a
/// count, not a line each.
#[derive(Debug, Default)]
struct AcceptErrors {
    pause: Duration,
    unreported: u64,
    reported: Option<Instant>,
}

impl AcceptErrors {
    /// Counts a failure; returns how long to pause.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.pause = (self.pause * 2).clamp(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
        self.unreported += 1;
        let now = Instant::now();
        let last = self.reported.map(|at| now.duration_since(at));
        if last.is_some_and(|since| since < ACCEPT_LOG_EVERY) {
            return self.pause;
        }
        match last {
            Some(since) if self.unreported > 1 => log::warn!(
                "accept failed {} times in the last {} s, last: {e}; pausing accepts up to {} s",
                self.unreported,
                since.as_secs(),
                ACCEPT_PAUSE_MAX.as_secs()
            ),
            _ => log::warn!(
                "accept failed: {e}; pausing accepts ({} ms, doubling up to {} s while it fails)",
                ACCEPT_PAUSE_MIN.as_millis(),
                ACCEPT_PAUSE_MAX.as_secs()
            ),
        }
        self.reported = Some(now);
        self.unreported = 0;
        self.pause
    }

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}

async fn serve_connection<S>(
    ctx: Ctx,
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    ticket: Arc<Ticket>,
) where
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
    let io = WriteTimeout::new(
        stream,
        ctx.config.http_write_timeout,
        ctx.metrics.http_write_timeouts.clone(),
    );
    let switch = io.switch();
    let abort = ConnectionAbort::default();
    let handle = abort.clone();
    let waiting = ticket.clone();
    let hyper_service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        waiting.busy();
        switch.arm();
        let request = check_head(req).map(|mut req| {
            if ws::wants_upgrade(req.headers()) {
                let on_upgrade = hyper::upgrade::on(&mut req);
                req.extensions_mut().insert(UpgradeSlot::new(on_upgrade));
            }
            req.extensions_mut().insert(handle.clone());
            req.extensions_mut().insert(PeerAddr(peer));
            req
        });
        let mut service = service.clone();
        let (switch, ticket) = (switch.clone(), waiting.clone());
        async move {
            let response = match request {
                Ok(req) => service.call(req).await?,
                Err(e) => {
                    // A head this malformed says nothing good about the
                    // bytes after it: answer, then close.
                    let mut response = error_response(&e);
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    response
                }
            };
            Ok::<_, Infallible>(responded(response, &switch, ticket))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), hyper_service)
        .with_upgrades();
    tokio::pin!(conn);
    let aborted = abort.aborted();
    tokio::pin!(aborted);
    let evicted = ticket.evicted();
    tokio::pin!(evicted);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = &mut aborted => return log::debug!("connection from {peer}: dropped"),
        _ = &mut evicted => return log::debug!("connection from {peer}: dropped while waiting for a request"),
        _ = ctx.shutting_down() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn => result,
                _ = aborted => return log::debug!("connection from {peer}: dropped"),
                _ = evicted => return log::debug!("connection from {peer}: dropped while waiting for a request"),
            }
        }
    };
    if let Err(e) = result {
        log::debug!("connection from {peer}: {e}");
    }
}

/// What RFC 9112 §3.2 asks of a request head before any route runs: more
/// than one `Host` is a 400; with an absolute-form target, the target's
/// authority is the host.
fn check_head(mut req: http::Request<Incoming>) -> Result<http::Request<Incoming>, Error> {
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Error::BadRequest("more than one Host header".into()));
    }
    if req.uri().scheme().is_some() {
        let authority = req
            .uri()
            .authority()
            .map(|a| HeaderValue::from_str(a.as_str()));
        if let Some(Ok(host)) = authority {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    Ok(req)
}

/// Once a response is ready: WebSocket upgrades and SSE streams keep their own
/// write deadlines (`core/session/liveness.rs`), so the HTTP write timeout is
/// off for them; and once a response has been written, its connection waits
/// for the next request head (an upgraded one never does).
fn responded<B>(
    response: http::Response<B>,
    switch: &Switch,
    ticket: Arc<Ticket>,
) -> http::Response<Answer<B>> {
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if upgraded || streaming {
        switch.disarm();
    }
    let idle_after = (!upgraded).then_some(ticket);
    response.map(|body| Answer { body, idle_after })
}

/// A response body that puts its connection back among those waiting for a
/// request once hyper is done with it (hyper drops a body after its last
/// frame).
struct Answer<B> {
    body: B,
    idle_after: Option<Arc<Ticket>>,
}

impl<B> Drop for Answer<B> {
    fn drop(&mut self) {
        if let Some(ticket) = self.idle_after.take() {
            ticket.idle();
        }
    }
}

impl<B: Body + Unpin> Body for Answer<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_pauses_double_up_to_a_second_and_reset_on_success() {
        let mut errors = AcceptErrors::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<u128> = (0..9).map(|_| errors.failed(&e).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        // One report so far: the rest wait for the next one, with their count.
        assert_eq!(errors.unreported, 8);
        errors.succeeded();
        assert_eq!(errors.failed(&e).as_millis(), 10);
        assert!(out_of_descriptors(&e));
    }
}

//! The WebSocket upgrade, owned rather than left to `warp::ws()`, so the server
//! chooses the socket's buffers and limits (STACK.md: warp's fixed 128 KiB read
//! buffer is most of a connection's memory).
//!
//! The accept loop (`server.rs`) moves hyper's `OnUpgrade` into an
//! [`UpgradeSlot`] request extension; the routes here stay ordinary warp
//! filters that answer 101 and hand the upgraded socket to a session.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::core::connlog::{self, Peer, Transport};
use crate::core::hub::Outgoing;
use crate::core::session::{self, Incoming, Link, Params};
use crate::domain::error::Error;
use crate::http::context::Ctx;
use crate::http::error::error_response;
use crate::http::filters::{session_params, with_ctx, with_handshake_origin_check, with_peer};
use crate::http::frames::Frames;

/// How long a close handshake may take before the TCP connection is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What the peer may still send after our close frame before we stop reading
/// (and drop the connection, unread bytes or not): more than a client's socket
/// buffers hold when it learns of the close, little CPU to read and discard.
const CLOSE_LINGER_BYTES: usize = 16 << 20;

/// hyper's upgrade future for this request, if it asked for one. `OnUpgrade` is
/// not `Clone`, which warp's extension filters need, hence the shared slot.
#[derive(Clone)]
pub struct UpgradeSlot(Arc<Mutex<Option<OnUpgrade>>>);

impl UpgradeSlot {
    pub fn new(on_upgrade: OnUpgrade) -> UpgradeSlot {
        UpgradeSlot(Arc::new(Mutex::new(Some(on_upgrade))))
    }

    fn take(&self) -> Option<OnUpgrade> {
        self.0.lock().ok()?.take()
    }
}

/// True for a request that asks to become a WebSocket.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// What a session needs from the upgrade request, or where it is going instead.
enum Target {
    Portal(Params),
    /// A Socket.IO / Engine.IO client: accepted, then closed 1003.
    SocketIo,
}

/// GET /ws/portal-view/{portalViewId}?token=<JWT>
pub fn portal_view(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("ws" / "portal-view" / String)
        .and(warp::get())
        .and(with_handshake_origin_check(ctx.clone(), Transport::Ws))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<UpgradeSlot>())
        .and(with_peer(Transport::Ws))
        .and(with_ctx(ctx))
        .map(
            |view_id: String,
             query: Vec<(String, String)>,
             headers: HeaderMap,
             slot: Option<UpgradeSlot>,
             peer: Peer,
             ctx: Ctx| {
                let target = if query.iter().any(|(k, _)| k == "EIO") {
                    Target::SocketIo
                } else {
                    Target::Portal(session_params(view_id, query, &headers, peer))
                };
                upgrade(ctx, &headers, slot, peer, target)
            },
        )
        .boxed()
}

/// GET /socket.io/… : not our protocol (SPEC §3).
pub fn socket_io(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path("socket.io")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<UpgradeSlot>())
        .and(with_peer(Transport::Ws))
        .and(with_ctx(ctx))
        .map(|headers: HeaderMap, slot, peer, ctx| {
            upgrade(ctx, &headers, slot, peer, Target::SocketIo)
        })
        .boxed()
}

/// Answers 101 and spawns the session that takes over the upgraded socket.
fn upgrade(
    ctx: Ctx,
    headers: &HeaderMap,
    slot: Option<UpgradeSlot>,
    peer: Peer,
    target: Target,
) -> Response {
    if !wants_upgrade(headers) {
        let mut response = error_response(&Error::BadRequest(
            "this route only speaks WebSocket (send Upgrade: websocket)".into(),
        ));
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        response.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        return response;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = error_response(&Error::BadRequest(
            "unsupported WebSocket version (want 13)".into(),
        ));
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return error_response(&Error::BadRequest("missing Sec-WebSocket-Key".into()));
    };
    let Some(on_upgrade) = slot.and_then(|s| s.take()) else {
        return error_response(&Error::Internal("upgrade not available".into()));
    };
    if ctx.is_shutting_down() {
        let view = match &target {
            Target::Portal(params) => params.view_id.as_str(),
            Target::SocketIo => "",
        };
        connlog::refused(&ctx.metrics, &peer, view, None, &Error::ShuttingDown);
        return error_response(&Error::ShuttingDown);
    }
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                log::debug!("upgrade failed: {e}");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            Frames::new(TokioIo::new(upgraded)),
            WsRole::Server,
            Some(ctx.ws_config),
        )
        .await;
        let _live = ctx.session_guard();
        let mut link = WsLink {
            ws,
            peer_close: None,
        };
        match target {
            Target::Portal(params) => serve(&ctx, &mut link, params).await,
            Target::SocketIo => {
                connlog::refused_protocol(&ctx.metrics, &peer);
                Box::pin(link.close(1003, "unsupported protocol")).await
            }
        }
    });
    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Runs a portal session on an upgraded socket until it closes.
async fn serve<S>(ctx: &Ctx, link: &mut WsLink<S>, params: Params)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (peer, view_id) = (params.peer, params.view_id.clone());
    let opened = tokio::select! {
        opened = Box::pin(session::open(ctx, params)) => opened,
        _ = ctx.shutting_down() => {
            let e = Error::ShuttingDown;
            connlog::refused(&ctx.metrics, &peer, &view_id, None, &e);
            return Box::pin(link.close(e.close_code(), &e.client_message())).await;
        }
    };
    match opened {
        Ok(session) => {
            link.ws.get_mut().attach(session.rate.clone());
            // Boxed, as the opening is: the task then holds only what is
            // live across every phase, not the largest phase of each (a
            // session's memory, BENCHMARKS.md issue 18).
            Box::pin(session.run(ctx, link, ctx.config.ping_interval)).await;
        }
        Err(e) => Box::pin(link.close(e.close_code(), &e.client_message())).await,
    }
}

/// A session's WebSocket, over the frame checks of `frames.rs`.
struct WsLink<S> {
    ws: WebSocketStream<Frames<S>>,
    /// The peer's close frame (code, reason), once it came.
    peer_close: Option<(u16, String)>,
}

impl<S> Link for WsLink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    const ANSWERS_HEARTBEATS: bool = true;

    /// All frames with one flush.
    async fn send(&mut self, frames: VecDeque<Outgoing>) -> Result<(), ()> {
        for frame in frames {
            self.ws.feed(frame.msg).await.map_err(|_| ())?;
        }
        self.ws.flush().await.map_err(|_| ())
    }

    async fn heartbeat(&mut self) -> Result<(), ()> {
        self.ws
            .send(Message::Ping(Default::default()))
            .await
            .map_err(|_| ())
    }

    /// Sends a close frame, ends our half of the TCP connection, then reads
    /// and discards what the peer still sends until its close frame, its end
    /// of the connection, [`CLOSE_LINGER_BYTES`] or [`CLOSE_LINGER`]. Dropping
    /// the socket with the peer's bytes unread would send a reset, and the
    /// peer would lose our close frame (seeing 1006 instead of our code).
    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            if ws.close(Some(frame)).await.is_ok() {
                let frames = ws.get_mut();
                let _ = frames.shutdown().await;
                frames.drain(CLOSE_LINGER_BYTES).await;
            }
        })
        .await;
    }

    async fn next(&mut self) -> Incoming {
        match self.ws.next().await {
            Some(Ok(Message::Text(text))) => Incoming::Text(text),
            Some(Ok(Message::Binary(_))) => Incoming::Violation(1003, "unsupported data"),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Alive,
            Some(Ok(Message::Close(frame))) => {
                self.peer_close = Some(frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.as_str().to_string())
                }));
                Incoming::Gone
            }
            None => Incoming::Gone,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                Incoming::Violation(1009, "message too big")
            }
            Some(Err(WsError::Utf8(_))) => Incoming::Violation(1007, "invalid utf-8"),
            Some(Err(WsError::Protocol(e))) => {
                log::debug!("WebSocket protocol error: {e}");
                Incoming::Violation(1002, "protocol error")
            }
            // `Frames` fails the read once a frame breaks its limits.
            Some(Err(WsError::Io(_))) => match self.ws.get_ref().violation() {
                Some((code, reason)) => Incoming::Violation(code, reason),
                None => Incoming::Gone,
            },
            Some(Err(_)) => Incoming::Gone,
        }
    }

    fn peer_close(&self) -> Option<(u16, &str)> {
        self.peer_close
            .as_ref()
            .map(|(code, r)| (*code, r.as_str()))
    }

    /// The peer started the close: tungstenite queued our reply; polling writes it.
    async fn finish(&mut self) {
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let _ = ws.flush().await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

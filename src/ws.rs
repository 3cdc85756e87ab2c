//! The WebSocket upgrade, owned rather than left to `warp::ws()`, so the server
//! chooses the socket's buffers and limits (STACK.md: warp's fixed 128 KiB read
//! buffer is most of a connection's memory).
//!
//! The accept loop (`server.rs`) moves hyper's `OnUpgrade` into an
//! [`UpgradeSlot`] request extension; the routes here stay ordinary warp
//! filters that answer 101 and hand the upgraded socket to a session.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::context::Ctx;
use crate::error::Error;
use crate::routes::{error_response, with_ctx, with_origin_check};
use crate::session::{self, Params};

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

/// The peer's address, set by the accept loop (warp's own `addr::remote()` only
/// works under warp's server).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

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
        .and(with_origin_check(ctx.clone()))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<UpgradeSlot>())
        .and(with_ctx(ctx))
        .map(
            |view_id: String,
             query: Vec<(String, String)>,
             headers: HeaderMap,
             slot: Option<UpgradeSlot>,
             ctx: Ctx| {
                let target = if query.iter().any(|(k, _)| k == "EIO") {
                    Target::SocketIo
                } else {
                    // The query wins over the header; browsers can only use the query.
                    let token = query
                        .into_iter()
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| v)
                        .or_else(|| {
                            let auth = headers.get(header::AUTHORIZATION)?.to_str().ok();
                            crate::auth::bearer(auth).map(str::to_string)
                        });
                    Target::Portal(Params { view_id, token })
                };
                upgrade(ctx, &headers, slot, target)
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
        .and(with_ctx(ctx))
        .map(|headers: HeaderMap, slot, ctx| upgrade(ctx, &headers, slot, Target::SocketIo))
        .boxed()
}

/// Answers 101 and spawns the session that takes over the upgraded socket.
fn upgrade(ctx: Ctx, headers: &HeaderMap, slot: Option<UpgradeSlot>, target: Target) -> Response {
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
        let mut response = error_response(&Error::Internal("shutting down".into()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return response;
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
            TokioIo::new(upgraded),
            WsRole::Server,
            Some(ctx.ws_config),
        )
        .await;
        match target {
            Target::Portal(params) => session::run(ctx, ws, params).await,
            Target::SocketIo => session::refuse(ctx, ws, 1003, "unsupported protocol").await,
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

//! The warp filters every route builds on: the context, the caller's token,
//! a session's opening parameters, the origin check. Below the routes (REST, WebSocket, SSE) and the router
//! that assembles them, so that none of them imports another.

use std::convert::Infallible;
use std::net::SocketAddr;

use warp::http::{header, HeaderMap, HeaderValue};
use warp::{Filter, Rejection};

use crate::core::connlog::{self, Peer, Transport};
use crate::core::session::Params;
use crate::domain::error::Error;
use crate::http::context::Ctx;
use crate::http::origin;
use crate::protocol::auth::Verified;

pub(crate) fn with_ctx(ctx: Ctx) -> impl Filter<Extract = (Ctx,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// The user of `Authorization: Bearer <JWT>`. Whether that user exists is
/// checked with the rest of the access lookup.
pub(crate) fn with_token(ctx: Ctx) -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    with_verified(ctx).map(|verified: Verified| verified.user_id)
}

/// The checked token of `Authorization: Bearer <JWT>`, for routes whose
/// change must still find it valid when it is applied.
pub(crate) fn with_verified(
    ctx: Ctx,
) -> impl Filter<Extract = (Verified,), Error = Rejection> + Clone {
    warp::header::headers_cloned().and(with_ctx(ctx)).and_then(
        |headers: HeaderMap, ctx: Ctx| async move {
            let value = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let token = crate::protocol::auth::bearer(value).ok_or(Error::InvalidToken)?;
            ctx.tokens.verify(token).map_err(warp::reject::custom)
        },
    )
}

/// The TCP peer of a request, as the accept loop (`server.rs`) saw the
/// socket: `warp::addr::remote()` knows nothing under our own loop, and
/// `X-Forwarded-For` is whatever the client wrote.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub SocketAddr);

/// Where a session's request comes from, over `transport`.
pub(crate) fn with_peer(
    transport: Transport,
) -> impl Filter<Extract = (Peer,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerAddr>().map(move |addr: Option<PeerAddr>| Peer {
        transport,
        addr: addr.map(|a| a.0),
    })
}

/// A session's opening request as core takes it: the token from `?token=`,
/// else from `Authorization: Bearer`. The query wins: browsers can only use
/// the query (WebSocket, EventSource).
pub(crate) fn session_params(
    view_id: String,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
    peer: Peer,
) -> Params {
    let token = query
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .or_else(|| {
            let auth = headers.get(header::AUTHORIZATION)?.to_str().ok();
            crate::protocol::auth::bearer(auth).map(str::to_string)
        });
    Params {
        view_id,
        token,
        peer,
    }
}

/// When a request's token expires (its `exp` plus `--jwt-leeway`, seconds
/// since the epoch): the writer refuses its change from then on (SPEC §4).
pub(crate) fn token_expires(ctx: &Ctx, verified: &Verified) -> u64 {
    verified.exp.saturating_add(ctx.config.jwt_leeway)
}

/// Refuses (403) a browser page whose origin is neither ours nor on
/// `--allowed-origins`; requests without an `Origin` (non-browser clients) pass.
pub(crate) fn with_origin_check(ctx: Ctx) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    origin_check(ctx, None)
}

/// [`with_origin_check`] for a session's opening request over `transport`,
/// whose refusal is counted and logged as the other handshake refusals are.
pub(crate) fn with_handshake_origin_check(
    ctx: Ctx,
    transport: Transport,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    origin_check(ctx, Some(transport))
}

fn origin_check(
    ctx: Ctx,
    handshake: Option<Transport>,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(with_ctx(ctx))
        .and(warp::path::full())
        .and(warp::ext::optional::<PeerAddr>())
        .and_then(
            move |headers: HeaderMap,
                  ctx: Ctx,
                  path: warp::path::FullPath,
                  addr: Option<PeerAddr>| async move {
                let text = |name| {
                    headers
                        .get(name)
                        .and_then(|v: &HeaderValue| v.to_str().ok())
                };
                if origin::allowed(
                    text(header::ORIGIN),
                    text(header::HOST),
                    &ctx.config.allowed_origins,
                ) {
                    Ok(())
                } else {
                    let e = Error::ForbiddenOrigin;
                    match handshake {
                        Some(transport) => {
                            let peer = Peer {
                                transport,
                                addr: addr.map(|a| a.0),
                            };
                            let view = path.as_str().rsplit('/').next().unwrap_or("");
                            connlog::refused(&ctx.metrics, &peer, view, None, &e);
                        }
                        None => {
                            if let Some(origin) = text(header::ORIGIN) {
                                log::info!("refused a request from origin {origin:?}");
                            }
                        }
                    }
                    Err(warp::reject::custom(e))
                }
            },
        )
        .untuple_one()
}

//! SPEC §7's HTTP fallback for networks that break WebSockets: a session whose
//! frames go out as Server-Sent Events, and the POST route that carries its
//! client messages. Both run the session code a WebSocket runs
//! (`core/session/`): the checks, presence, limits, ordering, expiry,
//! revocation, shutdown and the permission table are not repeated here, only
//! the framing is.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::futures::Notified;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Message;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::sse::Event;
use warp::{Filter, Reply};

use crate::core::connlog::{self, Peer, Transport};
use crate::core::forward::{self, ForwardReply, ForwardedPost};
use crate::core::hub::{CloseRequest, Outgoing};
use crate::core::session::{self, lock, Ended, Flow, Incoming, Link, Params, Sender};
use crate::core::writer::{Answer, ReplyTo};
use crate::domain::error::Error;
use crate::domain::model::Role;
use crate::http::context::Ctx;
use crate::http::error::{self, error_response};
use crate::http::filters::{
    session_params, token_expires, with_ctx, with_handshake_origin_check, with_origin_check,
    with_peer, with_verified,
};
use crate::http::rest::{check_content_type, read_limited};
use crate::http::streams::StreamEntry;
use crate::protocol::auth::Verified;

/// SPEC §7: a comment at least this often, whatever `--ping-interval` says.
const KEEPALIVE_MAX: Duration = Duration::from_secs(15);
/// Events on their way from the session to hyper. Small, so that a peer that
/// stops reading backs up into the session's outbox, whose byte limit decides
/// when it is a slow consumer, as for a WebSocket.
const CHANNEL: usize = 64;
/// How long the last `closed` event may wait to be taken by hyper.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The header that names a POST's own SSE stream.
const CONNECTION_ID: &str = "x-connection-id";

/// Lets a request's handler drop its TCP connection. An SSE session whose
/// peer stopped reading needs it: hyper, stuck writing to that peer, would
/// hold the connection for as long as the peer keeps it open.
#[derive(Clone, Default)]
pub(crate) struct ConnectionAbort(Arc<Notify>);

impl ConnectionAbort {
    pub(crate) fn abort(&self) {
        // A stored permit: the connection sees it even if not yet waiting.
        self.0.notify_one();
    }

    /// Resolves once a handler has asked for the connection to be dropped.
    pub(crate) fn aborted(&self) -> Notified<'_> {
        self.0.notified()
    }
}

/// GET /sse/portal-view/{portalViewId}?token=<JWT>
pub fn stream(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("sse" / "portal-view" / String)
        .and(warp::get())
        .and(with_handshake_origin_check(ctx.clone(), Transport::Sse))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ConnectionAbort>())
        .and(with_peer(Transport::Sse))
        .and(with_ctx(ctx))
        .then(
            |view_id: String,
             query: Vec<(String, String)>,
             headers: HeaderMap,
             abort: Option<ConnectionAbort>,
             peer: Peer,
             ctx: Ctx| async move {
                let params = session_params(view_id, query, &headers, peer);
                match open(ctx, params, abort).await {
                    Ok(response) => response,
                    Err(e) => error_response(&e),
                }
            },
        )
        .boxed()
}

/// Runs SPEC §3's checks and the join before answering, so that a refusal is
/// an HTTP status; then streams the session from its own task.
async fn open(ctx: Ctx, params: Params, abort: Option<ConnectionAbort>) -> Result<Response, Error> {
    if ctx.is_shutting_down() {
        let e = Error::ShuttingDown;
        connlog::refused(&ctx.metrics, &params.peer, &params.view_id, None, &e);
        return Err(e);
    }
    let session = session::open(&ctx, params).await?;
    let (tx, rx) = mpsc::channel(CHANNEL);
    let (taken_tx, taken) = oneshot::channel();
    let mut link = SseLink {
        tx: Some(tx),
        taken,
        stuck: false,
    };
    let heartbeat = ctx.config.ping_interval.min(KEEPALIVE_MAX);
    let registration = ctx.streams.register(&session);
    let live = ctx.session_guard();
    tokio::spawn(async move {
        let _live = live;
        let _registration = registration;
        ctx.metrics.sse_streams.inc();
        let ended = session.run(&ctx, &mut link, heartbeat).await;
        ctx.metrics.sse_streams.dec();
        if matches!(ended, Ended::Dropped) || link.stuck {
            // A WebSocket session owns its TCP connection and drops it by
            // ending; this one's belongs to hyper.
            if let Some(abort) = abort {
                abort.abort();
            }
        }
    });
    let events = Events {
        rx,
        _taken: taken_tx,
    };
    let mut response = warp::sse::reply(events).into_response();
    // Proxies that buffer responses (nginx) would hold events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A session's event stream: what it sends goes to hyper through a channel,
/// and hyper dropping the response (the client went away) closes it.
struct SseLink {
    /// `None` once the stream has ended.
    tx: Option<mpsc::Sender<Event>>,
    /// Resolves (with an error) when hyper has taken the whole stream or
    /// dropped it.
    taken: oneshot::Receiver<()>,
    /// Hyper did not take our last event in time: the peer stopped reading,
    /// and its connection must be dropped, as a WebSocket's would be.
    stuck: bool,
}

impl Link for SseLink {
    const ANSWERS_HEARTBEATS: bool = false;

    async fn send(&mut self, frames: VecDeque<Outgoing>) -> Result<(), ()> {
        let tx = self.tx.as_ref().ok_or(())?;
        for frame in frames {
            tx.send(event(&frame.msg, frame.version))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), ()> {
        let tx = self.tx.as_ref().ok_or(())?;
        let comment = Event::default().comment(" keep-alive");
        tx.send(comment).await.map_err(|_| ())
    }

    /// Sends `closed` and ends the stream, then waits (briefly) for hyper to
    /// take it all.
    async fn close(&mut self, code: u16, reason: &str) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let closed = event(&crate::protocol::closed(code, reason), 0);
        let taken = &mut self.taken;
        let delivered = tokio::time::timeout(CLOSE_LINGER, async move {
            tx.send(closed).await.map_err(|_| ())?;
            drop(tx);
            let _ = taken.await;
            Ok::<(), ()>(())
        })
        .await;
        self.stuck = delivered.is_err();
    }

    async fn next(&mut self) -> Incoming {
        match &self.tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
        Incoming::Gone
    }

    async fn finish(&mut self) {}
}

/// The channel's receiving end as the body stream warp's SSE reply takes.
struct Events {
    rx: mpsc::Receiver<Event>,
    /// Dropped with the stream, which tells [`SseLink::close`] it was taken.
    _taken: oneshot::Sender<()>,
}

impl Stream for Events {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|event| event.map(Ok))
    }
}

/// One server message as an event: its JSON on one `data:` line, and the
/// version it carries as the event's `id`.
fn event(msg: &Message, version: i64) -> Event {
    let text = msg.to_text().unwrap_or_default();
    // A payload is forwarded as the client formatted it, and a bare CR or LF
    // would end the `data:` line early. In JSON they can only be whitespace
    // between tokens (a string cannot hold them unescaped), so spaces will do.
    let data = if text.contains(['\n', '\r']) {
        text.replace(['\n', '\r'], " ")
    } else {
        text.to_string()
    };
    let event = Event::default().data(data);
    let version = if version > 0 {
        Some(version)
    } else {
        version_of(text)
    };
    match version {
        Some(version) => event.id(version.to_string()),
        None => event,
    }
}

/// The top-level `version` of a message that is not a broadcast (`connected`,
/// `ack`, the server's `sync-response`); broadcasts carry theirs alongside.
fn version_of(text: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        version: Option<i64>,
    }
    if !text.contains("\"version\"") {
        return None;
    }
    serde_json::from_str::<Head>(text).ok()?.version
}

/// POST /api/portal-views/{portalViewId}/messages
pub fn post_message(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "portal-views" / String / "messages")
        .and(warp::post())
        .and(with_origin_check(ctx.clone()))
        .and(with_verified(ctx.clone()))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_ctx(ctx))
        .then(
            |view_id: String, verified: Verified, headers: HeaderMap, body, ctx: Ctx| async move {
                match post(&ctx, view_id, verified, &headers, body).await {
                    Ok(response) => response,
                    Err(e) => error_response(&e),
                }
            },
        )
        .boxed()
}

/// Which stream a POST names as its sender.
enum Named {
    None,
    Local(StreamEntry),
    /// Held by another node (see `core::forward`).
    Remote {
        node: String,
        connection_id: String,
    },
}

/// Checks in the order of PATCH: who (401/404/403), then the stream it
/// names (400), then the body (415/413/400); then the message itself, exactly
/// as a WebSocket's text frame (its rate, which needs the body to echo the
/// `id`, comes first there). A change is checked again when it is applied.
/// A stream on another node: the same, the stream's part of it there.
async fn post<S, B>(
    ctx: &Ctx,
    view_id: String,
    verified: Verified,
    headers: &HeaderMap,
    body: S,
) -> Result<Response, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let user_id = verified.user_id.as_str();
    // Not the state: a POST's answer never carries it (the server's own
    // sync-response reads it in the writer).
    let grant = ctx.store.grant(user_id, &view_id).await?;
    let named = match headers.get(CONNECTION_ID) {
        None => Named::None,
        Some(value) => named(ctx, value.to_str().ok(), user_id, &view_id)?,
    };
    let text = read_message(headers, body, ctx.config.max_message_bytes).await;
    let token_expires = token_expires(ctx, &verified);
    let stream = match named {
        Named::Remote {
            node,
            connection_id,
        } => {
            let post = ForwardedPost {
                view_id,
                user_id: user_id.to_string(),
                role: grant.role,
                connection_id,
                token_expires,
                body: text.as_ref().ok().cloned(),
            };
            return match (ctx.broker.forward_post(&node, post).await?, text) {
                (ForwardReply::NotHeld, _) => Err(not_yours()),
                (ForwardReply::Held, Err(e)) => Err(e),
                (ForwardReply::Held, Ok(_)) => {
                    Err(Error::Internal("a forwarded message was not run".into()))
                }
                (reply @ ForwardReply::Answer { .. }, _) => Ok(forwarded_response(reply)),
            };
        }
        Named::Local(stream) => Some(stream),
        Named::None => None,
    };
    let answer = run(
        ctx,
        stream,
        user_id,
        &view_id,
        grant.role,
        token_expires,
        &text?,
    )
    .await?;
    Ok(answer_response(answer))
}

fn not_yours() -> Error {
    Error::BadRequest(
        "X-Connection-Id does not name an open SSE stream of yours on this view".into(),
    )
}

/// The stream an `X-Connection-Id` names: this node's, if it is the user's
/// on this view; another node's, if the id names one.
fn named(ctx: &Ctx, id: Option<&str>, user_id: &str, view_id: &str) -> Result<Named, Error> {
    let id = id.ok_or_else(not_yours)?;
    if let Some(found) = ctx.streams.find(id, user_id, view_id) {
        return Ok(Named::Local(found));
    }
    match (forward::holder(id), ctx.broker.node_id()) {
        (Some(node), Some(me)) if node != &*me => Ok(Named::Remote {
            node: node.to_string(),
            connection_id: id.to_string(),
        }),
        _ => Err(not_yours()),
    }
}

/// The body as one client message's text: its type, size and encoding.
async fn read_message<S, B>(headers: &HeaderMap, body: S, max: usize) -> Result<String, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    check_content_type(headers)?;
    let body = read_limited(body, headers, max).await?;
    String::from_utf8(body.to_vec())
        .map_err(|_| Error::BadRequest("the body is not valid UTF-8".into()))
}

/// Runs one message as sent by `stream` (this node's; `None`: no stream)
/// or by the user alone, and waits for its answer. Whether the POST arrived
/// here or was forwarded from another node, this is its one path.
pub(crate) async fn run(
    ctx: &Ctx,
    stream: Option<StreamEntry>,
    user_id: &str,
    view_id: &str,
    role: Role,
    token_expires: u64,
    text: &str,
) -> Result<Answer, Error> {
    let now = tokio::time::Instant::now();
    let (verdict, connection, outbox, expiry) = match stream {
        Some(stream) => {
            stream.traffic.received();
            (
                lock(&stream.rate).check(now),
                stream.sender.connection,
                Some(stream.outbox),
                stream.sender.expiry,
            )
        }
        // The user's REST bucket, shared with PATCH.
        None => (ctx.user_rates.check(user_id, now), None, None, None),
    };
    // The role is read afresh: a stream's may be a revocation behind. The
    // token is this request's, whatever the stream's was.
    let sender = Sender {
        user_id: user_id.into(),
        view_id: view_id.into(),
        role,
        connection,
        token_expires,
        // A `refresh-token` moves the stream's expiry, not this request's.
        expiry,
    };
    let (tx, rx) = oneshot::channel();
    let reply = ReplyTo::Post {
        tx,
        stream: outbox.clone(),
    };
    let flow = session::handle(ctx, &sender, verdict, text, reply).await;
    if let (Flow::Close(code, reason), Some(outbox)) = (flow, &outbox) {
        // A body that is not our protocol is the request's fault alone (400);
        // what else would close a WebSocket (a flood) closes the stream.
        if code != 1003 {
            outbox.close(CloseRequest { code, reason });
        }
    }
    rx.await
        .map_err(|_| Error::Internal("a message went unanswered".into()))
}

/// SPEC §7: 200 with the reply a WebSocket would get (`{}` for none), or the
/// `error` message with its status.
pub(crate) fn answer_response(answer: Answer) -> Response {
    let (status, msg) = match answer {
        Answer::Reply(Some(msg)) => (StatusCode::OK, msg),
        Answer::Reply(None) => (StatusCode::OK, Message::text("{}")),
        Answer::Refused { error, id } => (
            error::status(&error),
            crate::protocol::error(&error, id.as_deref()),
        ),
        Answer::Failed(e) => return error_response(&e),
    };
    let mut response = Response::new(msg.into_data().into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A forward's answer (from `http::forwarded` on the holder) as this node's response.
fn forwarded_response(reply: ForwardReply) -> Response {
    let ForwardReply::Answer {
        status,
        headers,
        body,
    } = reply
    else {
        return Response::new(Default::default());
    };
    let mut response = Response::new(bytes::Bytes::from(body).into());
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_data_line_with_the_version_as_id() {
        let broadcast =
            Message::text(r#"{"type":"portal-view-update","payload":{"a":1},"version":7}"#);
        assert_eq!(
            event(&broadcast, 7).to_string(),
            "data:{\"type\":\"portal-view-update\",\"payload\":{\"a\":1},\"version\":7}\nid:7\n\n"
        );
        let ack = Message::text(r#"{"type":"ack","id":"x","version":12}"#);
        assert!(event(&ack, 0).to_string().ends_with("\nid:12\n\n"));
        // A nested "version" is not the message's.
        let forward = Message::text(r#"{"type":"request-sync","payload":{"version":3}}"#);
        assert!(!event(&forward, 0).to_string().contains("id:"));
        let pretty = Message::text("{\"type\":\"x\",\r\n\"payload\":{\n\"a\":\r1}}");
        assert_eq!(
            event(&pretty, 0).to_string(),
            "data:{\"type\":\"x\",  \"payload\":{ \"a\": 1}}\n\n"
        );
    }
}

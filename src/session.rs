//! One WebSocket connection from upgrade to close: the SPEC §3 checks, the
//! `connected` snapshot, then a loop that parses inbound frames into commands
//! and writes whatever its [`Outbox`] holds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::context::Ctx;
use crate::db::{self, Access};
use crate::error::Error;
use crate::hub::{CloseRequest, Outbox, Outgoing};
use crate::model::Role;
use crate::protocol::{self, Command, Inbound, Refusal};
use crate::writer::{Author, Job, Reply};

/// How long a close handshake may take before the TCP connection is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

const SHUTTING_DOWN: CloseRequest = CloseRequest {
    code: 1001,
    reason: "server shutting down",
};

/// What the upgrade request carried.
pub struct Params {
    pub view_id: String,
    pub token: Option<String>,
}

/// Runs a session on an upgraded connection until it closes.
pub async fn run<S>(ctx: Ctx, mut ws: WebSocketStream<S>, params: Params)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _live = ctx.session_guard();
    let admitted = tokio::select! {
        admitted = admit(&ctx, &params) => admitted,
        _ = ctx.shutting_down() => {
            return close(&mut ws, SHUTTING_DOWN.code, SHUTTING_DOWN.reason).await;
        }
    };
    let access = match admitted {
        Ok(access) => access,
        Err(e) => {
            e.log("WebSocket handshake");
            let reason = e.client_message();
            return close(&mut ws, e.close_code(), &reason).await;
        }
    };
    let Some(session) = Session::join(&ctx, params.view_id, access).await else {
        return close(&mut ws, 1011, "internal error").await;
    };
    session.serve(&ctx, &mut ws).await;
}

/// SPEC §3's checks in order: token, expiry, user, view, access.
async fn admit(ctx: &Ctx, params: &Params) -> Result<(String, Access), Error> {
    let token = params.token.as_deref().ok_or(Error::InvalidToken)?;
    let verified = ctx.tokens.verify(token)?;
    let user_id = verified.user_id;
    let view_id = params.view_id.clone();
    let user = user_id.clone();
    let access = ctx
        .db
        .call(move |conn| db::access(conn, &user, &view_id))
        .await?;
    Ok((user_id, access))
}

/// Unsubscribes from the hub however the session ends.
struct Membership {
    ctx: Ctx,
    view_id: Arc<str>,
    key: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.ctx.hub.leave(&self.view_id, self.key);
    }
}

struct Session {
    membership: Membership,
    user_id: Arc<str>,
    connection_id: Arc<str>,
    role: Role,
    outbox: Arc<Outbox>,
    /// The last state version written to this socket; older broadcasts (already
    /// in the `connected` snapshot) are dropped.
    last_version: i64,
}

/// What to do after an inbound frame.
enum Flow {
    Continue,
    Close(u16, &'static str),
    /// The peer closed or the transport failed: finish the close handshake.
    Done,
}

impl Session {
    /// Joins the view's room *before* taking the snapshot for `connected`, so
    /// that no broadcast can fall between the two.
    async fn join(ctx: &Ctx, view_id: String, access: (String, Access)) -> Option<Session> {
        let (user_id, Access { role, mut view }) = access;
        let user_id: Arc<str> = user_id.into();
        let view_id: Arc<str> = view_id.into();
        let outbox = Arc::new(Outbox::new(ctx.config.send_queue_bytes));
        let joined = ctx
            .hub
            .join(&view_id, user_id.clone(), role, outbox.clone());
        let membership = Membership {
            ctx: ctx.clone(),
            view_id: view_id.clone(),
            key: joined.key,
        };
        if joined.last_version > view.version {
            // A change was broadcast between our read and our join: re-read.
            let id = view_id.to_string();
            match ctx.db.call(move |conn| db::view(conn, &id)).await {
                Ok(Some(fresh)) => view = fresh,
                Ok(None) => return None,
                Err(e) => {
                    e.log("re-reading a view after join");
                    return None;
                }
            }
        }
        let connection_id: Arc<str> = new_connection_id().into();
        outbox.push_front(protocol::connected(&protocol::Connected {
            portal_view_id: &view_id,
            connection_id: &connection_id,
            user_id: &user_id,
            role,
            state: &view.state,
            version: view.version,
            presence: joined.presence,
        }));
        log::debug!("connection {connection_id}: user {user_id} joined {view_id} as {role:?}");
        Some(Session {
            membership,
            user_id,
            connection_id,
            role,
            outbox,
            last_version: view.version,
        })
    }

    async fn serve<S>(mut self, ctx: &Ctx, ws: &mut WebSocketStream<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut reading = true;
        // Made once, not per loop turn: a fresh one clones the watch receiver
        // and registers on the watch's one shared waiter list, which every
        // session contended for at every delivery (see BENCHMARKS.md).
        let shutdown = ctx.shutting_down();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown, if reading => {
                    reading = false;
                    // Let the writer answer what this connection already sent,
                    // then close after those answers.
                    ctx.writer.barrier().await;
                    self.outbox.close(SHUTTING_DOWN);
                }
                _ = self.outbox.ready() => {
                    let batch = self.outbox.take();
                    if self.write(ws, batch.frames).await.is_err() {
                        return; // the peer is gone or stuck: drop the TCP connection
                    }
                    if let Some(CloseRequest { code, reason }) = batch.close {
                        return close(ws, code, reason).await;
                    }
                }
                frame = ws.next(), if reading => match self.on_frame(ctx, frame).await {
                    Flow::Continue => {}
                    Flow::Close(code, reason) => {
                        // Replies already queued go first (SPEC §5: "replies
                        // already queued are sent first").
                        self.outbox.close(CloseRequest { code, reason });
                        reading = false;
                    }
                    Flow::Done => return drain(ws).await,
                },
            }
        }
    }

    /// Writes queued frames with one flush. Gives up when the outbox overflows
    /// meanwhile: the peer is not reading, so not even a close frame would get
    /// through.
    async fn write<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        frames: std::collections::VecDeque<Outgoing>,
    ) -> Result<(), ()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let last_version = &mut self.last_version;
        let outbox = &self.outbox;
        let work = async {
            for frame in frames {
                if frame.version > 0 {
                    if frame.version <= *last_version {
                        continue;
                    }
                    *last_version = frame.version;
                }
                ws.feed(frame.msg).await?;
            }
            ws.flush().await
        };
        tokio::select! {
            result = work => result.map_err(|_| ()),
            _ = outbox.overflowed() => Err(()),
        }
    }

    async fn on_frame(&mut self, ctx: &Ctx, frame: Option<Result<Message, WsError>>) -> Flow {
        match frame {
            Some(Ok(Message::Text(text))) => self.on_text(ctx, text.as_str()).await,
            Some(Ok(Message::Binary(_))) => Flow::Close(1003, "unsupported data"),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Flow::Continue,
            Some(Ok(Message::Close(_))) | None => Flow::Done,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                Flow::Close(1009, "message too big")
            }
            Some(Err(WsError::Utf8(_))) => Flow::Close(1007, "invalid utf-8"),
            Some(Err(WsError::Protocol(e))) => {
                log::debug!("connection {}: protocol error: {e}", self.connection_id);
                Flow::Close(1002, "protocol error")
            }
            Some(Err(_)) => Flow::Done,
        }
    }

    /// Parse → check against the role → apply (SPEC §3.1).
    async fn on_text(&mut self, ctx: &Ctx, text: &str) -> Flow {
        // Rate limiting (SPEC §5) slots in here, before parsing.
        let Inbound { id, command } = match protocol::parse(text, self.role) {
            Ok(inbound) => inbound,
            Err(Refusal::Unsupported) => return Flow::Close(1003, "unsupported data"),
            Err(Refusal::Reply { error, id }) => {
                self.outbox.push(protocol::error(&error, id.as_deref()), 0);
                return Flow::Continue;
            }
        };
        let view_id = &self.membership.view_id;
        match command {
            Command::Ping => {
                self.outbox.push(protocol::pong(id.as_deref(), now_ms()), 0);
            }
            Command::Change { change, payload } => {
                let job = Job::Change {
                    view_id: view_id.clone(),
                    change,
                    payload,
                    author: Author {
                        user_id: self.user_id.clone(),
                        connection: Some((self.membership.key, self.connection_id.clone())),
                    },
                    if_match: None,
                    reply: Reply::Socket {
                        outbox: self.outbox.clone(),
                        id,
                    },
                };
                if ctx.writer.submit(job).await.is_err() {
                    return Flow::Close(1011, "internal error");
                }
            }
            Command::RequestSync { payload } => {
                let from = protocol::From {
                    user_id: &self.user_id,
                    connection_id: Some(&self.connection_id),
                };
                let msg = protocol::request_sync_forward(payload.as_deref(), &from);
                if ctx.hub.send_to_controllers(view_id, &msg) == 0 {
                    let job = Job::Snapshot {
                        view_id: view_id.clone(),
                        outbox: self.outbox.clone(),
                        id,
                    };
                    if ctx.writer.submit(job).await.is_err() {
                        return Flow::Close(1011, "internal error");
                    }
                }
            }
        }
        Flow::Continue
    }
}

/// Sends a close frame and waits (briefly) for the peer's, so the closing
/// handshake really reaches the wire.
async fn close<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// The peer started the close: tungstenite queues our reply; polling writes it.
async fn drain<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        let _ = ws.flush().await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 96 random bits as hex: unguessable, so an id can later name a connection
/// (SPEC §7's `X-Connection-Id`) without being a handle others can forge.
fn new_connection_id() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to something unique, if guessable.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&n.to_be_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Closes a freshly upgraded socket that is not ours to serve.
pub async fn refuse<S>(ctx: Ctx, mut ws: WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _live = ctx.session_guard();
    close(&mut ws, code, reason).await;
}

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
use crate::hub::{CloseRequest, Joiner, Outbox, Outgoing};
use crate::model::Role;
use crate::protocol::{self, Command, Inbound, Refusal};
use crate::writer::{Author, Job, Reply, Snapshot};

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
    let joined = match admitted {
        Ok(admitted) => Session::join(&ctx, params.view_id, admitted).await,
        Err(e) => Err(e),
    };
    let session = match joined {
        Ok(session) => session,
        Err(e) => {
            e.log("WebSocket handshake");
            let code = e.close_code();
            ctx.metrics
                .refused
                .with_label_values(&[&code.to_string()])
                .inc();
            return close(&mut ws, code, &e.client_message()).await;
        }
    };
    let role = session.role;
    ctx.metrics.opened(role);
    let ended = session.serve(&ctx, &mut ws).await;
    ctx.metrics.closed(role);
    let label = match ended {
        Ended::Closed(code) => code.to_string(),
        Ended::Peer => "peer".into(),
        Ended::Dropped => "dropped".into(),
    };
    ctx.metrics.closes.with_label_values(&[&label]).inc();
}

/// How a session ended, for the metrics.
enum Ended {
    /// We sent this close code.
    Closed(u16),
    /// The peer closed, or the transport failed under it.
    Peer,
    /// We dropped the TCP connection: a dead peer, or one too slow for even a
    /// close frame.
    Dropped,
}

/// Who was admitted, and the revocation count when their access was read.
struct Admitted {
    user_id: String,
    access: Access,
    expires: Option<tokio::time::Instant>,
    revocations: u64,
}

/// SPEC §3's checks in order: token, expiry, user, view, access.
async fn admit(ctx: &Ctx, params: &Params) -> Result<Admitted, Error> {
    let token = params.token.as_deref().ok_or(Error::InvalidToken)?;
    let verified = ctx.tokens.verify(token)?;
    let revocations = ctx.hub.revocations();
    let user_id = verified.user_id;
    let view_id = params.view_id.clone();
    let user = user_id.clone();
    let access = ctx
        .db
        .call(move |conn| db::access(conn, &user, &view_id))
        .await?;
    Ok(Admitted {
        user_id,
        access,
        expires: expiry_instant(verified.exp + ctx.config.jwt_leeway),
        revocations,
    })
}

/// When a token whose `exp` (plus leeway) is `secs` expires, on tokio's clock;
/// `None` when it is too far away to matter.
fn expiry_instant(secs: u64) -> Option<tokio::time::Instant> {
    let at = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now().checked_add(left)
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
    expires: Option<tokio::time::Instant>,
    rate: RateLimit,
}

/// What to do after an inbound frame.
enum Flow {
    Continue,
    Close(u16, &'static str),
    /// The peer closed or the transport failed: finish the close handshake.
    Done,
}

const TOKEN_EXPIRED: CloseRequest = CloseRequest {
    code: 1008,
    reason: "token expired",
};

const RATE_LIMIT_EXCEEDED: (u16, &str) = (1008, "rate limit exceeded");

impl Session {
    /// Joins the view's room *before* taking the snapshot for `connected`, so
    /// that no broadcast can fall between the two.
    async fn join(ctx: &Ctx, view_id: String, admitted: Admitted) -> Result<Session, Error> {
        let Admitted {
            user_id,
            access: Access { role, mut view },
            expires,
            revocations,
        } = admitted;
        let user_id: Arc<str> = user_id.into();
        let view_id: Arc<str> = view_id.into();
        let outbox = Arc::new(Outbox::new(ctx.config.send_queue_bytes));
        let joined = ctx
            .hub
            .join(Joiner {
                view_id: view_id.clone(),
                library_id: view.library_id.as_str().into(),
                user_id: user_id.clone(),
                role,
                outbox: outbox.clone(),
                base_version: view.version,
            })
            .map_err(|_| Error::TooManyConnections)?;
        let membership = Membership {
            ctx: ctx.clone(),
            view_id: view_id.clone(),
            key: joined.key,
        };
        if ctx.hub.revocations() != revocations {
            // A membership changed between our access lookup and our join, too
            // early for the revocation to have found this connection: look again.
            let (user, id) = (user_id.to_string(), view_id.to_string());
            let fresh = ctx
                .db
                .call(move |conn| db::access(conn, &user, &id))
                .await?;
            if fresh.role != role {
                return Err(Error::AccessRevoked);
            }
            view = fresh.view;
        } else if joined.last_version > view.version || joined.new_room {
            // A change was broadcast between our read and our join, or may have
            // been before the room existed (reaching no one): re-read.
            let id = view_id.to_string();
            view = ctx
                .db
                .call(move |conn| db::view(conn, &id))
                .await?
                .ok_or(Error::ViewNotFound)?;
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
        Ok(Session {
            membership,
            user_id,
            connection_id,
            role,
            outbox,
            last_version: view.version,
            expires,
            rate: RateLimit::new(ctx.config.rate_per_sec, ctx.config.rate_burst),
        })
    }

    async fn serve<S>(mut self, ctx: &Ctx, ws: &mut WebSocketStream<S>) -> Ended
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut reading = true;
        let ping_interval = ctx.config.ping_interval;
        let ping_timeout = ctx.config.ping_timeout;
        let mut liveness = Liveness::new(ping_interval, ping_timeout);
        let expiry = tokio::time::sleep_until(
            self.expires
                .unwrap_or_else(|| tokio::time::Instant::now() + FAR_FUTURE),
        );
        tokio::pin!(expiry);
        // The shutdown future and the ping timer are made once, not per loop
        // turn: a fresh shutdown future registers on the watch's one shared
        // waiter list, which every session contended for at every delivery
        // (see BENCHMARKS.md), and a fresh timer is a timer-wheel entry per turn.
        let shutdown = ctx.shutting_down();
        tokio::pin!(shutdown);
        let ping_timer = tokio::time::sleep_until(liveness.next_deadline());
        tokio::pin!(ping_timer);
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
                    let batch = self.take(ctx);
                    if self.write(ws, batch.frames, liveness.write_deadline()).await.is_err() {
                        // The peer is gone or stuck: drop the TCP connection.
                        self.take(ctx);
                        return Ended::Dropped;
                    }
                    if let Some(CloseRequest { code, reason }) = batch.close {
                        close(ws, code, reason).await;
                        return Ended::Closed(code);
                    }
                }
                _ = &mut expiry, if reading && self.expires.is_some() => {
                    reading = false;
                    self.outbox.close(TOKEN_EXPIRED);
                }
                _ = &mut ping_timer, if reading => {
                    if liveness.is_overdue() {
                        ctx.metrics.pings_timed_out.inc();
                        log::debug!("connection {}: no answer to ping", self.connection_id);
                        return Ended::Dropped;
                    }
                    let ping = std::collections::VecDeque::from([Outgoing {
                        msg: Message::Ping(Default::default()),
                        version: 0,
                    }]);
                    liveness.pinged();
                    ping_timer.as_mut().reset(liveness.next_deadline());
                    if self.write(ws, ping, liveness.write_deadline()).await.is_err() {
                        return Ended::Dropped;
                    }
                }
                frame = ws.next(), if reading => {
                    if liveness.heard() {
                        ping_timer.as_mut().reset(liveness.next_deadline());
                    }
                    match self.on_frame(ctx, frame).await {
                        Flow::Continue => {}
                        Flow::Close(code, reason) => {
                            // Replies already queued go first (SPEC §5: "replies
                            // already queued are sent first").
                            self.outbox.close(CloseRequest { code, reason });
                            reading = false;
                        }
                        Flow::Done => {
                            drain(ws).await;
                            return Ended::Peer;
                        }
                    }
                }
            }
        }
    }

    /// Takes what is queued, counting what an overflow threw away.
    fn take(&self, ctx: &Ctx) -> crate::hub::Batch {
        let batch = self.outbox.take();
        if batch.dropped > 0 {
            ctx.metrics.dropped_frames.inc_by(batch.dropped as u64);
            ctx.metrics.slow_consumer_closes.inc();
        }
        batch
    }

    /// Writes queued frames with one flush. Gives up when the outbox overflows
    /// meanwhile (the peer is not reading, so not even a close frame would get
    /// through) or when the write outlasts the liveness deadline (a dead peer
    /// whose TCP window is full never answers a ping either).
    async fn write<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        frames: std::collections::VecDeque<Outgoing>,
        deadline: tokio::time::Instant,
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
            _ = tokio::time::sleep_until(deadline) => Err(()),
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

    /// Rate → parse → check against the role → apply (SPEC §3.1).
    async fn on_text(&mut self, ctx: &Ctx, text: &str) -> Flow {
        let count = |kind: &str, outcome: &str| {
            ctx.metrics
                .inbound
                .with_label_values(&[kind, outcome])
                .inc();
        };
        let verdict = self.rate.check(tokio::time::Instant::now());
        if verdict != Verdict::Allowed {
            match protocol::rate_limited(text) {
                Ok(Refusal::Reply { error, id }) => {
                    count(protocol::type_label(text), "rate_limited");
                    self.outbox.push(protocol::error(&error, id.as_deref()), 0);
                }
                _ => {
                    count("invalid", "unsupported");
                    return Flow::Close(1003, "unsupported data");
                }
            }
            if verdict == Verdict::Exceeded {
                return Flow::Close(RATE_LIMIT_EXCEEDED.0, RATE_LIMIT_EXCEEDED.1);
            }
            return Flow::Continue;
        }
        let Inbound { id, command } = match protocol::parse(text, self.role) {
            Ok(inbound) => inbound,
            Err(Refusal::Unsupported) => {
                count("invalid", "unsupported");
                return Flow::Close(1003, "unsupported data");
            }
            Err(Refusal::Reply { error, id }) => {
                let outcome = match error {
                    Error::Forbidden(_) => "forbidden",
                    Error::UnknownType => "unknown_type",
                    _ => "bad_request",
                };
                count(protocol::type_label(text), outcome);
                self.outbox.push(protocol::error(&error, id.as_deref()), 0);
                return Flow::Continue;
            }
        };
        count(command.name(), "accepted");
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
                if let (Some(cluster), Ok(text)) = (&ctx.cluster, msg.to_text()) {
                    cluster.request_sync(view_id, text);
                }
                if ctx.hub.send_to_controllers(view_id, &msg) == 0
                    && !ctx.hub.has_remote_controller(view_id)
                {
                    let job = Job::Snapshot(Snapshot {
                        view_id: view_id.clone(),
                        outbox: self.outbox.clone(),
                        id,
                    });
                    if ctx.writer.submit(job).await.is_err() {
                        return Flow::Close(1011, "internal error");
                    }
                }
            }
        }
        Flow::Continue
    }
}

/// Longer than any session: stands in for "never" on tokio's clock.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// SPEC §3.4's pings: one every interval; a peer that lets one go unanswered
/// (no frame of any kind) for the timeout is dead.
struct Liveness {
    interval: Duration,
    timeout: Duration,
    next_ping: tokio::time::Instant,
    /// When the outstanding ping must have been answered by.
    answer_by: Option<tokio::time::Instant>,
}

impl Liveness {
    fn new(interval: Duration, timeout: Duration) -> Liveness {
        Liveness {
            interval,
            timeout,
            next_ping: tokio::time::Instant::now() + interval,
            answer_by: None,
        }
    }

    fn next_deadline(&self) -> tokio::time::Instant {
        self.answer_by.unwrap_or(self.next_ping)
    }

    fn is_overdue(&self) -> bool {
        self.answer_by
            .is_some_and(|by| tokio::time::Instant::now() >= by)
    }

    fn pinged(&mut self) {
        let now = tokio::time::Instant::now();
        self.answer_by = Some(now + self.timeout);
        self.next_ping = now + self.interval;
    }

    /// Returns whether this answered an outstanding ping (the deadline moved).
    fn heard(&mut self) -> bool {
        self.answer_by.take().is_some()
    }

    /// How long a write may block: a peer that reads nothing for a whole ping
    /// interval plus the timeout is as dead as one that does not answer pings.
    fn write_deadline(&self) -> tokio::time::Instant {
        self.answer_by.unwrap_or(self.next_ping + self.timeout)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    /// Answer `RATE_LIMITED`.
    Refused,
    /// Refused more than 10× the burst within a minute: close 1008.
    Exceeded,
}

/// SPEC §5's per-connection token bucket, plus the count of recent refusals
/// that decides when a flooding connection is closed.
struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
    /// Refusals within the last minute (kept only while a connection floods).
    refusals: std::collections::VecDeque<tokio::time::Instant>,
    max_refusals: usize,
}

const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

impl RateLimit {
    fn new(per_sec: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: tokio::time::Instant::now(),
            refusals: std::collections::VecDeque::new(),
            max_refusals: (burst as usize).saturating_mul(10),
        }
    }

    fn check(&mut self, now: tokio::time::Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        while self
            .refusals
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > REFUSAL_WINDOW)
        {
            self.refusals.pop_front();
        }
        self.refusals.push_back(now);
        if self.refusals.len() > self.max_refusals {
            Verdict::Exceeded
        } else {
            Verdict::Refused
        }
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
pub(crate) fn new_connection_id() -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_refills_then_closes_a_flood() {
        let start = tokio::time::Instant::now();
        let mut rate = RateLimit::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(rate.check(start), Verdict::Allowed);
        }
        assert_eq!(rate.check(start), Verdict::Refused);
        // 100 ms at 10/s refills one token.
        let later = start + Duration::from_millis(100);
        assert_eq!(rate.check(later), Verdict::Allowed);
        assert_eq!(rate.check(later), Verdict::Refused);
        // 30 refusals (10 × burst) are tolerated; the 31st closes.
        for _ in 0..28 {
            assert_eq!(rate.check(later), Verdict::Refused);
        }
        assert_eq!(rate.check(later), Verdict::Exceeded);
    }

    #[test]
    fn refusals_older_than_a_minute_are_forgotten() {
        let start = tokio::time::Instant::now();
        let mut rate = RateLimit::new(0.0, 1);
        assert_eq!(rate.check(start), Verdict::Allowed);
        for _ in 0..10 {
            assert_eq!(rate.check(start), Verdict::Refused);
        }
        let much_later = start + Duration::from_secs(61);
        for _ in 0..10 {
            assert_eq!(rate.check(much_later), Verdict::Refused);
        }
        assert_eq!(rate.check(much_later), Verdict::Exceeded);
    }
}

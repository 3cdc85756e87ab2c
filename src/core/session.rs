//! A connection's life apart from its transport: SPEC §3's checks, the
//! `connected` snapshot, the loop that drains its [`Outbox`] and enforces
//! expiry, liveness and shutdown, and the handling of inbound client messages.
//!
//! The WebSocket (`ws.rs`) and the SSE stream (`sse.rs`) are two [`Link`]s to
//! the same loop, and SSE's `POST …/messages` goes through the same
//! [`handle`] as a WebSocket's text frame: one copy of the rules.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use warp::http::{header, HeaderMap};

use crate::core::context::Core;
use crate::core::hub::{CloseRequest, Joiner, Outbox, Outgoing, SyncAsked};
/// The transports lock rate buckets and stream maps the same way.
pub(crate) use crate::core::lock::lock;
use crate::core::writer::{Job, Reply, ReplyTo, Snapshot};
use crate::domain::error::Error;
use crate::domain::model::Role;
use crate::protocol::{self, Command, Inbound, Refusal};
use crate::protocol::{Author, Via};
use crate::store::{Access, Needs, Requester};

const SHUTTING_DOWN: CloseRequest = CloseRequest {
    code: 1001,
    reason: "server shutting down",
};

const TOKEN_EXPIRED: CloseRequest = CloseRequest {
    code: 1008,
    reason: "token expired",
};

const RATE_LIMIT_EXCEEDED: (u16, &str) = (1008, "rate limit exceeded");

/// What the opening request carried.
pub struct Params {
    pub view_id: String,
    pub token: Option<String>,
}

impl Params {
    /// The token from `?token=`, else from `Authorization: Bearer`. The query
    /// wins: browsers can only use the query (WebSocket, EventSource).
    pub fn new(view_id: String, query: Vec<(String, String)>, headers: &HeaderMap) -> Params {
        let token = query
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
            .or_else(|| {
                let auth = headers.get(header::AUTHORIZATION)?.to_str().ok();
                crate::protocol::auth::bearer(auth).map(str::to_string)
            });
        Params { view_id, token }
    }
}

/// What a session needs from its transport.
pub(crate) trait Link: Send {
    /// Whether the peer must answer heartbeats (WebSocket pings). An SSE
    /// comment cannot be answered: it only keeps proxies from timing out.
    const ANSWERS_HEARTBEATS: bool;

    /// Writes frames in order, then flushes.
    fn send(&mut self, frames: VecDeque<Outgoing>) -> impl Future<Output = Result<(), ()>> + Send;

    fn heartbeat(&mut self) -> impl Future<Output = Result<(), ()>> + Send;

    /// Ends the session from our side: the close handshake, or SSE's last
    /// `closed` event.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;

    /// The next thing the peer did.
    fn next(&mut self) -> impl Future<Output = Incoming> + Send;

    /// The peer ended the session: finish what that takes (a WebSocket
    /// writes its reply to the peer's close frame).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// What the peer did, as the session loop cares.
pub(crate) enum Incoming {
    /// A client message (SPEC §3.1).
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// Any other frame: proof of life.
    Alive,
    /// A frame that breaks the protocol: close with this code.
    Violation(u16, &'static str),
    /// The peer closed, or the transport failed under it.
    Gone,
}

/// How a session ended, for the metrics.
pub(crate) enum Ended {
    /// We close with this code and reason.
    Closed(CloseRequest),
    /// The peer closed, or the transport failed under it.
    Peer,
    /// We dropped the connection: a dead peer, or one too slow for even a
    /// close frame.
    Dropped,
}

/// Who was admitted, and the revocation count when their access was read.
struct Admitted {
    user_id: String,
    access: Access,
    expires: Option<tokio::time::Instant>,
    /// The same expiry in seconds since the epoch, for the writer's check.
    token_expires: u64,
    revocations: u64,
}

/// SPEC §3's checks, then the join: a session ready to run, or the refusal
/// (counted in the metrics; the transport shows it as a close code or an
/// HTTP status).
pub(crate) async fn open(ctx: &Core, params: Params) -> Result<Session, Error> {
    let opened = match admit(ctx, &params).await {
        Ok(admitted) => Session::join(ctx, params.view_id, admitted).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &opened {
        e.log("handshake");
        ctx.metrics
            .refused
            .with_label_values(&[&e.close_code().to_string()])
            .inc();
    }
    opened
}

/// SPEC §3's checks in order: token, expiry, user, view, access.
async fn admit(ctx: &Core, params: &Params) -> Result<Admitted, Error> {
    let token = params.token.as_deref().ok_or(Error::InvalidToken)?;
    let verified = ctx.tokens.verify(token)?;
    let revocations = ctx.hub.revocations();
    let access = ctx.store.access(&verified.user_id, &params.view_id).await?;
    let token_expires = verified.exp.saturating_add(ctx.config.jwt_leeway);
    Ok(Admitted {
        user_id: verified.user_id,
        access,
        expires: expiry_instant(token_expires),
        token_expires,
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
    ctx: Core,
    view_id: Arc<str>,
    key: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.ctx.hub.leave(&self.view_id, self.key);
    }
}

/// Who sent a client message, as SPEC §3.1's rules need to know.
#[derive(Clone)]
pub(crate) struct Sender {
    pub user_id: Arc<str>,
    pub view_id: Arc<str>,
    pub role: Role,
    /// The sending connection (hub key, connection id), which its broadcasts
    /// skip; `None` for a POST that names no stream of its own.
    pub connection: Option<(u64, Arc<str>)>,
    /// When the token that authorised the message expires (its `exp` plus
    /// `--jwt-leeway`, seconds since the epoch): its change is refused from
    /// then on, however long it waited for the writer.
    pub token_expires: u64,
}

pub(crate) struct Session {
    /// Leaves the hub when the session is dropped, however it ends.
    _membership: Membership,
    pub sender: Sender,
    pub outbox: Arc<Outbox>,
    /// The last state version written to this connection; older broadcasts
    /// (already in the `connected` snapshot) are dropped.
    last_version: i64,
    expires: Option<tokio::time::Instant>,
    /// Shared with SSE's POST route, which counts its messages here.
    pub rate: Arc<Mutex<RateLimit>>,
}

/// What to do after an inbound message.
pub(crate) enum Flow {
    Continue,
    Close(u16, &'static str),
}

impl Session {
    /// Joins the view's room *before* taking the snapshot for `connected`, so
    /// that no broadcast can fall between the two.
    async fn join(ctx: &Core, view_id: String, admitted: Admitted) -> Result<Session, Error> {
        let Admitted {
            user_id,
            access: Access { role, mut view },
            expires,
            token_expires,
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
            let fresh = ctx.store.access(&user_id, &view_id).await?;
            if fresh.role != role {
                return Err(Error::AccessRevoked);
            }
            view = fresh.view;
        } else if joined.last_version > view.version || joined.new_room {
            // A change was broadcast between our read and our join, or may have
            // been before the room existed (reaching no one): re-read.
            view = ctx.store.view(&view_id).await?.ok_or(Error::ViewNotFound)?;
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
            sender: Sender {
                user_id,
                view_id,
                role,
                connection: Some((joined.key, connection_id)),
                token_expires,
            },
            _membership: membership,
            outbox,
            last_version: view.version,
            expires,
            rate: Arc::new(Mutex::new(RateLimit::new(
                ctx.config.rate_per_sec,
                ctx.config.rate_burst,
            ))),
        })
    }

    pub fn connection_id(&self) -> &Arc<str> {
        let (_, id) = self
            .sender
            .connection
            .as_ref()
            .expect("a session's sender is its connection");
        id
    }

    /// Serves the session over `link` until it ends, with a heartbeat every
    /// `heartbeat`.
    pub(crate) async fn run<L: Link>(
        mut self,
        ctx: &Core,
        link: &mut L,
        heartbeat: Duration,
    ) -> Ended {
        let role = self.sender.role;
        ctx.metrics.opened(role);
        let ended = self.serve(ctx, link, heartbeat).await;
        ctx.metrics.closed(role);
        let label = match &ended {
            Ended::Closed(request) => request.code.to_string(),
            Ended::Peer => "peer".into(),
            Ended::Dropped => "dropped".into(),
        };
        ctx.metrics.closes.with_label_values(&[&label]).inc();
        // The session, and with it its place in the hub (presence, the
        // connection limits), ends here, after the metrics and before the
        // close handshake, which may linger up to 2 s for a peer that does not
        // answer (ws.rs).
        drop(self);
        match &ended {
            Ended::Closed(CloseRequest { code, reason }) => link.close(*code, reason).await,
            Ended::Peer => link.finish().await,
            Ended::Dropped => {}
        }
        ended
    }

    async fn serve<L: Link>(&mut self, ctx: &Core, link: &mut L, heartbeat: Duration) -> Ended {
        let mut reading = true;
        let mut liveness = Liveness::new(heartbeat, ctx.config.ping_timeout, L::ANSWERS_HEARTBEATS);
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
                    let frames = self.unseen(batch.frames);
                    if self.guarded(link.send(frames), liveness.write_deadline()).await.is_err() {
                        // The peer is gone or stuck: drop the connection.
                        self.take(ctx);
                        return Ended::Dropped;
                    }
                    if let Some(request) = batch.close {
                        return Ended::Closed(request);
                    }
                }
                _ = &mut expiry, if reading && self.expires.is_some() => {
                    reading = false;
                    self.outbox.close(TOKEN_EXPIRED);
                }
                _ = &mut ping_timer, if reading => {
                    if liveness.is_overdue() {
                        ctx.metrics.pings_timed_out.inc();
                        log::debug!("connection {}: no answer to ping", self.connection_id());
                        return Ended::Dropped;
                    }
                    liveness.pinged();
                    ping_timer.as_mut().reset(liveness.next_deadline());
                    if self.guarded(link.heartbeat(), liveness.write_deadline()).await.is_err() {
                        return Ended::Dropped;
                    }
                }
                incoming = link.next(), if reading => {
                    if liveness.heard() {
                        ping_timer.as_mut().reset(liveness.next_deadline());
                    }
                    let flow = match incoming {
                        Incoming::Text(text) => {
                            let verdict = lock(&self.rate).check(tokio::time::Instant::now());
                            let reply = ReplyTo::Outbox(self.outbox.clone());
                            handle(ctx, &self.sender, verdict, text.as_str(), reply).await
                        }
                        Incoming::Alive => Flow::Continue,
                        Incoming::Violation(code, reason) => Flow::Close(code, reason),
                        Incoming::Gone => return Ended::Peer,
                    };
                    if let Flow::Close(code, reason) = flow {
                        // Replies already queued go first (SPEC §5: "replies
                        // already queued are sent first").
                        self.outbox.close(CloseRequest { code, reason });
                        reading = false;
                    }
                }
            }
        }
    }

    /// Takes what is queued, counting what an overflow threw away.
    fn take(&self, ctx: &Core) -> crate::core::hub::Batch {
        let batch = self.outbox.take();
        if batch.dropped > 0 {
            ctx.metrics.dropped_frames.inc_by(batch.dropped as u64);
            ctx.metrics.slow_consumer_closes.inc();
        }
        batch
    }

    /// Leaves out broadcasts the `connected` snapshot already included.
    fn unseen(&mut self, mut frames: VecDeque<Outgoing>) -> VecDeque<Outgoing> {
        let last_version = &mut self.last_version;
        frames.retain(|frame| {
            if frame.version == 0 {
                return true;
            }
            let new = frame.version > *last_version;
            if new {
                *last_version = frame.version;
            }
            new
        });
        frames
    }

    /// Runs a write, giving up when the outbox overflows meanwhile (the peer is
    /// not reading, so not even a close would get through) or when it outlasts
    /// the liveness deadline (a dead peer whose TCP window is full never answers
    /// a ping either).
    async fn guarded(
        &self,
        write: impl Future<Output = Result<(), ()>>,
        deadline: tokio::time::Instant,
    ) -> Result<(), ()> {
        tokio::select! {
            result = write => result,
            _ = self.outbox.overflowed() => Err(()),
            _ = tokio::time::sleep_until(deadline) => Err(()),
        }
    }
}

/// SPEC §3.1 for one inbound message, whatever carried it: the rate verdict
/// (the caller owns the bucket) → parse → check against the role → apply.
/// Replies go to `reply`; a POST is answered exactly once on every path.
pub(crate) async fn handle(
    ctx: &Core,
    sender: &Sender,
    verdict: Verdict,
    text: &str,
    reply: ReplyTo,
) -> Flow {
    let count = |kind: &str, outcome: &str| {
        ctx.metrics
            .inbound
            .with_label_values(&[kind, outcome])
            .inc();
    };
    if verdict != Verdict::Allowed {
        match protocol::rate_limited(text) {
            Ok(Refusal::Reply { error, id }) => {
                count(protocol::type_label(text), "rate_limited");
                reply.refuse(error, id);
            }
            _ => {
                count("invalid", "unsupported");
                reply.unsupported();
                return Flow::Close(1003, "unsupported data");
            }
        }
        if verdict == Verdict::Exceeded {
            return Flow::Close(RATE_LIMIT_EXCEEDED.0, RATE_LIMIT_EXCEEDED.1);
        }
        return Flow::Continue;
    }
    let Inbound { id, command } = match protocol::parse(text, sender.role) {
        Ok(inbound) => inbound,
        Err(Refusal::Unsupported) => {
            count("invalid", "unsupported");
            reply.unsupported();
            return Flow::Close(1003, "unsupported data");
        }
        Err(Refusal::Reply { error, id }) => {
            let outcome = match error {
                Error::Forbidden(_) => "forbidden",
                Error::UnknownType => "unknown_type",
                _ => "bad_request",
            };
            count(protocol::type_label(text), outcome);
            reply.refuse(error, id);
            return Flow::Continue;
        }
    };
    count(command.name(), "accepted");
    let view_id = &sender.view_id;
    match command {
        Command::Ping => {
            reply.reply(Some(protocol::pong(id.as_deref(), now_ms())));
        }
        Command::Change { change, payload } => {
            let job = Job::Change {
                view_id: view_id.clone(),
                change,
                payload,
                author: Author {
                    user_id: sender.user_id.clone(),
                    via: Via::Message(sender.connection.clone()),
                },
                // Whatever the role was when the message arrived, it must
                // still hold when the change is applied (SPEC §4).
                requester: Requester {
                    user_id: sender.user_id.clone(),
                    expires_at: sender.token_expires,
                    needs: Needs::Controller,
                },
                if_match: None,
                reply: Reply::Message { to: reply, id },
            };
            if ctx.writer.submit(job).await.is_err() {
                return Flow::Close(1011, "internal error");
            }
        }
        Command::RequestSync => {
            let asked = match &sender.connection {
                Some((key, connection_id)) => {
                    ctx.hub
                        .request_sync(view_id, *key, &sender.user_id, connection_id, id)
                }
                // A POST naming no stream of its own could never receive a
                // later answer: it gets the stored state now, and nobody is asked.
                None => SyncAsked::AnswerNow(id),
            };
            match asked {
                SyncAsked::Forwarded(forward) => {
                    ctx.broker.request_sync(view_id, &forward);
                    reply.reply(None);
                }
                SyncAsked::Waiting => reply.reply(None),
                SyncAsked::AnswerNow(id) => {
                    let job = Job::Snapshot(Snapshot {
                        view_id: view_id.clone(),
                        to: reply,
                        id,
                    });
                    if ctx.writer.submit(job).await.is_err() {
                        return Flow::Close(1011, "internal error");
                    }
                }
            }
        }
    }
    Flow::Continue
}

/// Longer than any session: stands in for "never" on tokio's clock.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// SPEC §3.4's pings: one every interval; a peer that lets one go unanswered
/// (no frame of any kind) for the timeout is dead. Over SSE the heartbeat is
/// a comment no one can answer, and only a write that blocks tells of a dead peer.
struct Liveness {
    interval: Duration,
    timeout: Duration,
    answers: bool,
    next_ping: tokio::time::Instant,
    /// When the outstanding ping must have been answered by.
    answer_by: Option<tokio::time::Instant>,
}

impl Liveness {
    fn new(interval: Duration, timeout: Duration, answers: bool) -> Liveness {
        Liveness {
            interval,
            timeout,
            answers,
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
        if self.answers {
            self.answer_by = Some(now + self.timeout);
        }
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
pub(crate) enum Verdict {
    Allowed,
    /// Answer `RATE_LIMITED`.
    Refused,
    /// Refused more than 10× the burst within a minute: close 1008.
    Exceeded,
}

/// SPEC §5's per-connection token bucket, plus the count of recent refusals
/// that decides when a flooding connection is closed.
pub(crate) struct RateLimit {
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
    pub fn new(per_sec: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: tokio::time::Instant::now(),
            refusals: std::collections::VecDeque::new(),
            max_refusals: (burst as usize).saturating_mul(10),
        }
    }

    /// Whether the bucket is as good as new (full, no refusals in the window),
    /// so that forgetting it changes nothing.
    pub fn is_idle(&self, now: tokio::time::Instant) -> bool {
        let refill = Duration::from_secs_f64(self.burst / self.per_sec.max(1e-9)).min(FAR_FUTURE);
        now.saturating_duration_since(self.last) > REFUSAL_WINDOW.max(refill)
    }

    pub fn check(&mut self, now: tokio::time::Instant) -> Verdict {
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

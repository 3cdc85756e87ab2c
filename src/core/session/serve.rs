//! The loop that serves a session over its transport's [`Link`]: the outbox
//! written in order, expiry, heartbeats, shutdown, and the peer's frames.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use super::expiry::Due;
use super::handle::{handle, Flow};
use super::liveness::Liveness;
use super::Session;
use crate::core::connlog::{Close, Who};
use crate::core::context::Core;
use crate::core::hub::{CloseRequest, Outgoing};
use crate::core::lock::lock;
use crate::core::writer::ReplyTo;
use crate::protocol;

const SHUTTING_DOWN: CloseRequest = CloseRequest {
    code: 1001,
    reason: "server shutting down",
};

/// How long a session at shutdown waits for every other one to stop reading
/// before its last barrier (see the shutdown branch of the loop).
const QUIESCE: Duration = Duration::from_secs(1);

const TOKEN_EXPIRED: CloseRequest = CloseRequest {
    code: 1008,
    reason: "token expired",
};

/// Runs a write (`.await`ed), giving up with `Err(())` when the outbox
/// overflows meanwhile (the peer is not reading, so not even a close would
/// get through) or when it outlasts the liveness deadline (a dead peer whose
/// TCP window is full never answers a ping either).
///
/// The write is polled first: one that completes at once (nearly all do)
/// never registers the deadline's timer nor the overflow's waiter, which in
/// random order it did at most deliveries. A macro rather than an `async fn`,
/// so the write's future is stored once in the session's (an async fn keeps
/// a by-value argument twice). Both: BENCHMARKS.md, issue 18.
macro_rules! guarded {
    ($outbox:expr, $write:expr, $deadline:expr) => {
        tokio::select! {
            biased;
            result = $write => result,
            _ = $outbox.overflowed() => Err(()),
            _ = tokio::time::sleep_until($deadline) => Err(()),
        }
    };
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

    /// The code and reason of the peer's close frame, once it sent one
    /// (for the close's log line).
    fn peer_close(&self) -> Option<(u16, &str)> {
        None
    }
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

impl Session {
    /// Serves the session over `link` until it ends, with a heartbeat every
    /// `heartbeat`.
    ///
    /// An `async` block rather than an `async fn`: an async fn's future keeps
    /// its by-value arguments twice (as arguments, and as the locals they are
    /// moved into), and this one lives as long as the connection.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn run<'a, L: Link>(
        mut self,
        ctx: &'a Core,
        link: &'a mut L,
        heartbeat: Duration,
    ) -> impl Future<Output = Ended> + Send + 'a {
        async move {
            let role = self.sender.role;
            ctx.metrics.opened(role);
            self.log.opened(&self.who());
            let ended = self.serve(ctx, link, heartbeat).await;
            ctx.metrics.closed(role);
            let label = match &ended {
                Ended::Closed(request) => request.code.to_string(),
                Ended::Peer => "peer".into(),
                Ended::Dropped => "dropped".into(),
            };
            ctx.metrics.closes.with_label_values(&[&label]).inc();
            let close = match &ended {
                Ended::Closed(CloseRequest { code, reason }) => Close {
                    by: "server",
                    code: Some(*code),
                    reason,
                },
                Ended::Peer => {
                    let (code, reason) = link.peer_close().unzip();
                    Close {
                        by: "peer",
                        code,
                        reason: reason.unwrap_or(""),
                    }
                }
                Ended::Dropped => Close {
                    by: "dropped",
                    code: None,
                    reason: "",
                },
            };
            self.log.closed(&self.who(), &close);
            // The session, and with it its place in the hub (presence, the
            // connection limits), ends here, after the metrics and before the
            // close handshake, which may linger up to 2 s for a peer that does not
            // answer (ws.rs).
            drop(self);
            match &ended {
                Ended::Closed(CloseRequest { code, reason }) => {
                    Box::pin(link.close(*code, reason)).await
                }
                Ended::Peer => Box::pin(link.finish()).await,
                Ended::Dropped => {}
            }
            ended
        }
    }

    async fn serve<L: Link>(&mut self, ctx: &Core, link: &mut L, heartbeat: Duration) -> Ended {
        let mut reading = true;
        let mut liveness = Liveness::new(heartbeat, ctx.config.ping_timeout, L::ANSWERS_HEARTBEATS);
        // The token's expiry: one timer for its warning, then its close,
        // re-armed whenever a `refresh-token` moves it (the `moved` wake-up is
        // taken before each plan, so no move falls between).
        let expiry = self.expiry.clone();
        let warning = ctx.config.token_warning;
        let moved = expiry.moved();
        tokio::pin!(moved);
        let mut armed = expiry.plan(warning);
        let expiry_timer = tokio::time::sleep_until(armed.at);
        tokio::pin!(expiry_timer);
        // The shutdown future and the ping timer are made once, not per loop
        // turn: a fresh shutdown future registers on the watch's one shared
        // waiter list, which every session contended for at every delivery
        // (see BENCHMARKS.md), and a fresh timer is a timer-wheel entry per turn.
        let shutdown = ctx.shutting_down();
        tokio::pin!(shutdown);
        let mut reader = Some(ctx.reading_guard());
        let ping_timer = tokio::time::sleep_until(liveness.next_deadline());
        tokio::pin!(ping_timer);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown, if reading => {
                    reading = false;
                    drop(reader.take());
                    // Let the writer answer what every connection already
                    // sent, then close after those answers and broadcasts:
                    // wait until no session reads any more (a moment at most:
                    // one stuck in a write must not hold the others), so a
                    // viewer's close follows the last change a controller on
                    // another session sent before the stop.
                    let _ = tokio::time::timeout(QUIESCE, Box::pin(ctx.readers_stopped())).await;
                    Box::pin(ctx.writer.barrier()).await;
                    self.outbox.close(SHUTTING_DOWN);
                }
                _ = self.outbox.ready() => {
                    let batch = self.take(ctx);
                    let frames = self.unseen(batch.frames);
                    self.log.traffic().sent(frames.len());
                    if guarded!(self.outbox, link.send(frames), liveness.write_deadline()).is_err() {
                        // The peer is gone or stuck: drop the connection.
                        self.take(ctx);
                        return Ended::Dropped;
                    }
                    if let Some(request) = batch.close {
                        return Ended::Closed(request);
                    }
                }
                _ = &mut expiry_timer, if reading => {
                    match expiry.fire(&armed) {
                        Some(Due::Close) => {
                            reading = false;
                            drop(reader.take());
                            self.outbox.close(TOKEN_EXPIRED);
                        }
                        Some(Due::Warn(exp)) => {
                            self.outbox.push(protocol::token_expiring(exp), 0);
                        }
                        // Moved meanwhile: `moved` re-arms, or this does.
                        None => {}
                    }
                    armed = expiry.plan(warning);
                    expiry_timer.as_mut().reset(armed.at);
                }
                _ = &mut moved, if reading => {
                    moved.set(expiry.moved());
                    armed = expiry.plan(warning);
                    expiry_timer.as_mut().reset(armed.at);
                }
                _ = &mut ping_timer, if reading => {
                    if liveness.is_overdue() {
                        ctx.metrics.pings_timed_out.inc();
                        log::debug!("connection {}: no answer to ping", self.connection_id());
                        return Ended::Dropped;
                    }
                    liveness.pinged();
                    ping_timer.as_mut().reset(liveness.next_deadline());
                    if guarded!(self.outbox, link.heartbeat(), liveness.write_deadline()).is_err() {
                        return Ended::Dropped;
                    }
                }
                incoming = link.next(), if reading => {
                    if liveness.heard() {
                        ping_timer.as_mut().reset(liveness.next_deadline());
                    }
                    let flow = match incoming {
                        Incoming::Text(text) => {
                            self.log.traffic().received();
                            let verdict = lock(&self.rate).check(tokio::time::Instant::now());
                            // Its change must find the token valid when applied,
                            // and the token is whichever was refreshed last.
                            self.sender.token_expires = expiry.closes_at();
                            let reply = ReplyTo::Outbox(self.outbox.clone());
                            // Boxed, as the rare paths below are: a session's
                            // future lives as long as it does, and is as large
                            // as everything it may be awaiting at once.
                            Box::pin(handle(ctx, &self.sender, verdict, text.as_str(), reply)).await
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
                        drop(reader.take());
                    }
                }
            }
        }
    }

    fn who(&self) -> Who<'_> {
        Who {
            connection_id: self.connection_id(),
            user_id: &self.sender.user_id,
            view_id: &self.sender.view_id,
            role: self.sender.role,
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
}

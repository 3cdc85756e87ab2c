//! SPEC §3.4's heartbeats: when to ping, when a peer is dead, how long a
//! write may block.

use std::time::Duration;

/// SPEC §3.4's pings: one every interval; a peer that lets one go unanswered
/// (no frame of any kind) for the timeout is dead. Over SSE the heartbeat is
/// a comment no one can answer, and only a write that blocks tells of a dead peer.
pub(super) struct Liveness {
    interval: Duration,
    timeout: Duration,
    answers: bool,
    next_ping: tokio::time::Instant,
    /// When the outstanding ping must have been answered by.
    answer_by: Option<tokio::time::Instant>,
}

impl Liveness {
    pub(super) fn new(interval: Duration, timeout: Duration, answers: bool) -> Liveness {
        Liveness {
            interval,
            timeout,
            answers,
            next_ping: tokio::time::Instant::now() + interval,
            answer_by: None,
        }
    }

    pub(super) fn next_deadline(&self) -> tokio::time::Instant {
        self.answer_by.unwrap_or(self.next_ping)
    }

    pub(super) fn is_overdue(&self) -> bool {
        self.answer_by
            .is_some_and(|by| tokio::time::Instant::now() >= by)
    }

    pub(super) fn pinged(&mut self) {
        let now = tokio::time::Instant::now();
        if self.answers {
            self.answer_by = Some(now + self.timeout);
        }
        self.next_ping = now + self.interval;
    }

    /// Returns whether this answered an outstanding ping (the deadline moved).
    pub(super) fn heard(&mut self) -> bool {
        self.answer_by.take().is_some()
    }

    /// How long a write may block: a peer that reads nothing for a whole ping
    /// interval plus the timeout is as dead as one that does not answer pings.
    pub(super) fn write_deadline(&self) -> tokio::time::Instant {
        self.answer_by.unwrap_or(self.next_ping + self.timeout)
    }
}

//! A connection's outbound queue, and the closes a session is asked for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::Poll;

use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::core::lock::lock;

/// A close the session should send after the frames queued before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

pub const SLOW_CONSUMER: CloseRequest = CloseRequest {
    code: 1013,
    reason: "slow consumer",
};

pub const ACCESS_REVOKED: CloseRequest = CloseRequest {
    code: 1008,
    reason: "access revoked",
};

/// One queued outbound frame. `version` is the view version of a state-change
/// broadcast (0 for everything else), so that the session can drop a broadcast
/// its `connected` snapshot already includes.
pub struct Outgoing {
    pub msg: Message,
    pub version: i64,
}

/// What the session takes from its outbox in one go.
pub struct Batch {
    pub frames: VecDeque<Outgoing>,
    pub close: Option<CloseRequest>,
    /// Frames discarded because the queue overflowed (a slow consumer).
    pub dropped: usize,
}

/// A connection's outbound queue, bounded in bytes (`--send-queue-bytes`).
///
/// Producers (the writer, other sessions' request-syncs, REST) push without
/// waiting; the connection's own task drains it and writes many frames per flush.
/// A consumer that falls more than the limit behind is closed with 1013
/// `slow consumer` rather than skipped.
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    /// Set when frames or a close are queued; [`Outbox::ready`] takes it.
    signalled: AtomicBool,
    /// The session's task, woken when `signalled` is set. It is the one
    /// waiter, so an atomic waker rather than a `Notify` and its locked list
    /// of waiters, which was a few percent of a fan-out's CPU (BENCHMARKS.md,
    /// issue 18).
    waker: AtomicWaker,
    /// Set when the queue overflowed while the session may be stuck writing to a
    /// peer that does not read: it then drops the TCP connection.
    overflowed: AtomicBool,
    overflow: Notify,
    limit: usize,
}

#[derive(Default)]
struct OutboxInner {
    frames: VecDeque<Outgoing>,
    bytes: usize,
    close: Option<CloseRequest>,
    dropped: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(OutboxInner::default()),
            signalled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            overflow: Notify::new(),
            limit,
        }
    }

    /// Queues a frame; returns false if the connection is closing.
    pub fn push(&self, msg: Message, version: i64) -> bool {
        self.push_many(std::iter::once((msg, version))) == 1
    }

    /// Queues several frames under one lock with one wake-up (a writer batch's
    /// broadcasts); returns how many were queued before the connection closed.
    pub fn push_many(&self, frames: impl Iterator<Item = (Message, i64)>) -> usize {
        let mut inner = lock(&self.inner);
        let mut queued = 0;
        let mut overflowed = false;
        for (msg, version) in frames {
            if inner.close.is_some() {
                break;
            }
            let len = msg.len();
            if inner.bytes + len > self.limit && !inner.frames.is_empty() {
                // Frames already queued are dropped with the connection: the
                // client is closed and resynchronises from `connected` when it
                // comes back.
                inner.dropped += inner.frames.len() + 1;
                inner.frames = VecDeque::new();
                inner.bytes = 0;
                inner.close = Some(SLOW_CONSUMER);
                self.overflowed.store(true, Ordering::Release);
                self.overflow.notify_one();
                overflowed = true;
                break;
            }
            inner.bytes += len;
            inner.frames.push_back(Outgoing { msg, version });
            queued += 1;
        }
        drop(inner);
        // A closing connection was woken by its close already.
        if queued > 0 || overflowed {
            self.signal();
        }
        queued
    }

    /// Puts the `connected` message before anything queued while it was built.
    pub fn push_front(&self, msg: Message) {
        let mut inner = lock(&self.inner);
        inner.bytes += msg.len();
        inner.frames.push_front(Outgoing { msg, version: 0 });
        drop(inner);
        self.signal();
    }

    /// Asks the session to close after the frames already queued (the first
    /// close requested wins).
    pub fn close(&self, request: CloseRequest) {
        let mut inner = lock(&self.inner);
        if inner.close.is_none() {
            inner.close = Some(request);
        }
        drop(inner);
        self.signal();
    }

    /// Takes everything queued. The session writes it without holding the lock.
    pub fn take(&self) -> Batch {
        let mut inner = lock(&self.inner);
        inner.bytes = 0;
        let close = inner.close.clone();
        if close.is_some() {
            // The close is in hand now; only a new overflow while writing it
            // should cut the connection.
            self.overflowed.store(false, Ordering::Release);
        }
        Batch {
            frames: std::mem::take(&mut inner.frames),
            close,
            dropped: std::mem::take(&mut inner.dropped),
        }
    }

    /// Wakes the session, unless a wake-up is already pending.
    fn signal(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Resolves when frames or a close were queued since it last resolved.
    /// Only the session waits on it.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            if self.signalled.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A signal between the first look and the registration found no
            // waker to wake.
            if self.signalled.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves when the queue overflows (see `overflowed`).
    pub async fn overflowed(&self) {
        loop {
            let notified = self.overflow.notified();
            if self.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflow_drops_the_queue_and_closes_once() {
        let outbox = Outbox::new(10);
        assert!(outbox.push(Message::text("12345678"), 1));
        assert!(!outbox.push(Message::text("12345678"), 2));
        assert!(!outbox.push(Message::text("1"), 3), "closing: nothing more");
        let batch = outbox.take();
        assert!(batch.frames.is_empty());
        assert_eq!(batch.close, Some(SLOW_CONSUMER));
        assert_eq!(batch.dropped, 2);
    }

    #[test]
    fn a_frame_larger_than_the_limit_goes_alone() {
        let outbox = Outbox::new(4);
        let many = [(Message::text("123456"), 1), (Message::text("7"), 2)];
        assert_eq!(outbox.push_many(many.into_iter()), 1);
        let batch = outbox.take();
        assert_eq!(batch.close, Some(SLOW_CONSUMER));
        assert_eq!(batch.dropped, 2);
    }
}

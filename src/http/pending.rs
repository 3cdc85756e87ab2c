//! The bound on connections that are waiting for a request head: a socket
//! that connected and said nothing (or went quiet between keep-alive
//! requests) holds a file descriptor, so a crowd of them could use up the
//! open-file limit and starve real clients, who send their request at once.
//! Past the bound the *oldest* waiting connection is dropped: the newest is
//! the one most likely to be a real client whose request is on its way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;
use tokio::sync::Notify;

/// The fewest waiting connections allowed by default, however low the
/// open-file limit: a bound smaller than a page's parallel requests would
/// drop real clients.
pub const MIN_DEFAULT: usize = 64;

/// The default bound for an open-file limit: half of it, so the other half is
/// left for sessions, storage and the listener.
pub fn default_bound(open_files: u64) -> usize {
    usize::try_from(open_files / 2)
        .unwrap_or(usize::MAX)
        .max(MIN_DEFAULT)
}

/// The connections waiting for a request head, oldest first.
pub struct Pending {
    max: usize,
    /// `std::sync::Mutex`: each critical section is a map operation, never
    /// held across an await.
    waiting: Mutex<Waiting>,
    dropped: IntCounter,
}

#[derive(Default)]
struct Waiting {
    /// Admission order → how to tell that connection to go. Keys only grow,
    /// so the first entry is the oldest.
    by_age: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

/// One connection's place in [`Pending`]. Dropping it (the connection ended)
/// takes it out.
pub struct Ticket {
    pending: Arc<Pending>,
    /// Its key in `by_age` while waiting, 0 while busy. Changed only under
    /// the `waiting` lock.
    key: AtomicU64,
    evict: Arc<Notify>,
}

impl Pending {
    /// `dropped` counts the connections dropped to keep the bound.
    pub fn new(max: usize, dropped: IntCounter) -> Arc<Pending> {
        Arc::new(Pending {
            max: max.max(1),
            waiting: Mutex::new(Waiting::default()),
            dropped,
        })
    }

    /// A new connection: waiting for its first request head.
    pub fn admit(self: &Arc<Self>) -> Arc<Ticket> {
        let ticket = Arc::new(Ticket {
            pending: self.clone(),
            key: AtomicU64::new(0),
            evict: Arc::new(Notify::new()),
        });
        ticket.idle();
        ticket
    }

    /// Tells the oldest waiting connection to go (it frees its descriptor
    /// as soon as its task runs). False when none is waiting.
    pub fn evict_oldest(&self) -> bool {
        let mut waiting = self.lock();
        self.evict_locked(&mut waiting)
    }

    fn evict_locked(&self, waiting: &mut Waiting) -> bool {
        match waiting.by_age.pop_first() {
            Some((_, evict)) => {
                // A stored permit: seen even if its task is not waiting yet.
                evict.notify_one();
                self.dropped.inc();
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().by_age.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Ticket {
    /// A request head arrived: the connection is busy, not waiting.
    pub fn busy(&self) {
        let mut waiting = self.pending.lock();
        let key = self.key.swap(0, Ordering::Relaxed);
        if key != 0 {
            waiting.by_age.remove(&key);
        }
    }

    /// The connection waits for a (next) request head, as the youngest;
    /// makes room by evicting the oldest when the bound is reached.
    pub fn idle(&self) {
        let pending = &self.pending;
        let mut waiting = pending.lock();
        if self.key.load(Ordering::Relaxed) != 0 {
            return;
        }
        while waiting.by_age.len() >= pending.max {
            pending.evict_locked(&mut waiting);
        }
        waiting.next += 1;
        let key = waiting.next;
        waiting.by_age.insert(key, self.evict.clone());
        self.key.store(key, Ordering::Relaxed);
    }

    /// Resolves when this connection was chosen to be dropped.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.busy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn pending(max: usize) -> (Arc<Pending>, IntCounter) {
        let dropped = IntCounter::new("t", "t").expect("counter");
        (Pending::new(max, dropped.clone()), dropped)
    }

    #[test]
    fn the_oldest_waiting_connection_goes_first() {
        let (pending, dropped) = pending(2);
        let a = pending.admit();
        let b = pending.admit();
        assert_eq!(pending.waiting(), 2);
        let c = pending.admit();
        assert_eq!(dropped.get(), 1);
        assert!(a.evicted().now_or_never().is_some(), "a, the oldest, goes");
        assert!(b.evicted().now_or_never().is_none());
        // b is busy (its request arrived): c is now the oldest waiting one.
        b.busy();
        let _d = pending.admit();
        assert_eq!(pending.waiting(), 2);
        b.idle();
        assert!(c.evicted().now_or_never().is_some(), "c goes, not busy b");
        assert_eq!(dropped.get(), 2);
        drop(b);
        assert_eq!(pending.waiting(), 1);
    }

    #[test]
    fn the_default_bound_is_half_the_open_files_with_a_floor() {
        assert_eq!(default_bound(1024), 512);
        assert_eq!(default_bound(256), 128);
        assert_eq!(default_bound(20), MIN_DEFAULT);
    }
}

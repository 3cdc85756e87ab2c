//! The shared state of live connections: which connections watch which portal
//! view, presence counts, and each connection's outbound queue ([`Outbox`]).
//!
//! Everything here is behind `std::sync::Mutex`, never `tokio::sync::Mutex`:
//! every critical section is a few map operations or queue pushes and nothing
//! is awaited while a lock is held, so a blocking lock is both correct and
//! cheaper (the reasoning of mini-redis's `db.rs`). Lock order is always
//! `Hub::rooms` before a `Room`, and a `Room` before an `Outbox`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::model::{Presence, Role};

/// Locks a mutex even if a thread panicked while holding it: the data under
/// these locks stays consistent between statements, so a poisoned lock is
/// still safe to use, and one panicking connection must not take down the hub.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A close the session should send after the frames queued before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

/// One queued outbound frame. `version` is the view version of a state-change
/// broadcast (0 for everything else), so that the session can drop a broadcast
/// its `connected` snapshot already includes.
pub struct Outgoing {
    pub msg: Message,
    pub version: i64,
}

/// One state-change broadcast for [`Hub::broadcast_many`].
pub struct Broadcast {
    pub msg: Message,
    pub version: i64,
    /// The sending connection's hub key: it does not get its own change back.
    pub except: Option<u64>,
}

/// What the session takes from its outbox in one go.
pub struct Batch {
    pub frames: VecDeque<Outgoing>,
    pub close: Option<CloseRequest>,
}

/// A connection's outbound queue, bounded in bytes (`--send-queue-bytes`).
///
/// Producers (the writer, other sessions' request-syncs, REST) push without
/// waiting; the connection's own task drains it and writes many frames per flush.
/// A consumer that falls more than the limit behind is closed with 1013
/// `slow consumer` rather than skipped.
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    /// Wakes the session when frames or a close are queued.
    ready: Notify,
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
}

pub const SLOW_CONSUMER: CloseRequest = CloseRequest {
    code: 1013,
    reason: "slow consumer",
};

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(OutboxInner::default()),
            ready: Notify::new(),
            overflowed: AtomicBool::new(false),
            overflow: Notify::new(),
            limit,
        }
    }

    /// Queues a frame; returns false if the connection is closing.
    pub fn push(&self, msg: Message, version: i64) -> bool {
        let len = msg.len();
        let mut inner = lock(&self.inner);
        if inner.close.is_some() {
            return false;
        }
        if inner.bytes + len > self.limit && !inner.frames.is_empty() {
            // Frames already queued are dropped with the connection: the client
            // is closed and resynchronises from `connected` when it comes back.
            inner.frames = VecDeque::new();
            inner.bytes = 0;
            inner.close = Some(SLOW_CONSUMER);
            drop(inner);
            self.overflowed.store(true, Ordering::Release);
            self.overflow.notify_one();
            self.ready.notify_one();
            return false;
        }
        inner.bytes += len;
        inner.frames.push_back(Outgoing { msg, version });
        drop(inner);
        self.ready.notify_one();
        true
    }

    /// Queues several frames under one lock with one wake-up (a writer batch's
    /// broadcasts); returns how many were queued before the connection closed.
    pub fn push_many(&self, frames: impl Iterator<Item = (Message, i64)>) -> usize {
        let mut inner = lock(&self.inner);
        let mut queued = 0;
        for (msg, version) in frames {
            if inner.close.is_some() {
                break;
            }
            let len = msg.len();
            if inner.bytes + len > self.limit && !inner.frames.is_empty() {
                // As in `push`: the connection is closed as a slow consumer.
                inner.frames = VecDeque::new();
                inner.bytes = 0;
                inner.close = Some(SLOW_CONSUMER);
                self.overflowed.store(true, Ordering::Release);
                self.overflow.notify_one();
                break;
            }
            inner.bytes += len;
            inner.frames.push_back(Outgoing { msg, version });
            queued += 1;
        }
        drop(inner);
        self.ready.notify_one();
        queued
    }

    /// Puts the `connected` message before anything queued while it was built.
    pub fn push_front(&self, msg: Message) {
        let mut inner = lock(&self.inner);
        inner.bytes += msg.len();
        inner.frames.push_front(Outgoing { msg, version: 0 });
        drop(inner);
        self.ready.notify_one();
    }

    /// Asks the session to close after the frames already queued (the first
    /// close requested wins).
    pub fn close(&self, request: CloseRequest) {
        let mut inner = lock(&self.inner);
        if inner.close.is_none() {
            inner.close = Some(request);
        }
        drop(inner);
        self.ready.notify_one();
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
        }
    }

    /// Resolves when frames or a close are queued.
    pub async fn ready(&self) {
        self.ready.notified().await
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

/// A live connection as the hub knows it.
struct Member {
    user_id: Arc<str>,
    role: Role,
    outbox: Arc<Outbox>,
}

#[derive(Default)]
struct RoomInner {
    members: HashMap<u64, Member>,
    /// Connections per (user, role): presence counts people, not tabs.
    people: HashMap<(Arc<str>, Role), usize>,
    /// Distinct people per role, kept as `people` changes: counting them at
    /// each join made a crowd of N joins cost O(N²) (7% of the server's CPU
    /// while 10,000 viewers connected to one view).
    controllers: usize,
    viewers: usize,
    /// The highest version this process has broadcast for the view.
    last_version: i64,
}

impl RoomInner {
    fn presence(&self) -> Presence {
        Presence {
            controllers: self.controllers,
            viewers: self.viewers,
            connections: self.members.len(),
        }
    }

    /// Counts a person in or out of their role when their first connection
    /// opens or their last one closes.
    fn count(&mut self, role: Role, delta: isize) {
        let n = match role {
            Role::Controller => &mut self.controllers,
            Role::Viewer => &mut self.viewers,
        };
        *n = n.saturating_add_signed(delta);
    }
}

/// The connections of one portal view. Each room has its own lock, so a
/// broadcast to a crowd in one view does not hold up handshakes to others.
#[derive(Default)]
pub struct Room {
    inner: Mutex<RoomInner>,
}

#[derive(Default)]
pub struct Hub {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    next_key: AtomicU64,
    connections: AtomicU64,
}

/// What a connection learns when it joins.
pub struct Joined {
    pub key: u64,
    pub presence: Presence,
    /// The last version broadcast to the room before this connection was in it.
    pub last_version: i64,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    fn room(&self, view_id: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(view_id).cloned()
    }

    /// Adds a connection to a view's room. From here on it receives every
    /// broadcast of the view, in order, through `outbox`.
    pub fn join(
        &self,
        view_id: &str,
        user_id: Arc<str>,
        role: Role,
        outbox: Arc<Outbox>,
    ) -> Joined {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(view_id.to_string()).or_default().clone();
        let mut inner = lock(&room.inner);
        drop(rooms);
        let tabs = inner.people.entry((user_id.clone(), role)).or_insert(0);
        *tabs += 1;
        if *tabs == 1 {
            inner.count(role, 1);
        }
        inner.members.insert(
            key,
            Member {
                user_id,
                role,
                outbox,
            },
        );
        Joined {
            key,
            presence: inner.presence(),
            last_version: inner.last_version,
        }
    }

    /// Removes a connection; drops the room when it was the last one.
    pub fn leave(&self, view_id: &str, key: u64) {
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.get(view_id).cloned() else {
            return;
        };
        let mut inner = lock(&room.inner);
        if let Some(member) = inner.members.remove(&key) {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            let person = (member.user_id, member.role);
            if let Some(n) = inner.people.get_mut(&person) {
                *n -= 1;
                if *n == 0 {
                    inner.people.remove(&person);
                    inner.count(person.1, -1);
                }
            }
        }
        if inner.members.is_empty() {
            rooms.remove(view_id);
        }
    }

    /// Joined connections over all views.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn presence(&self, view_id: &str) -> Presence {
        self.room(view_id)
            .map(|room| lock(&room.inner).presence())
            .unwrap_or_default()
    }

    /// Sends a state-change broadcast of `version` to every connection of the
    /// view except `except`. The frame is shared, not copied, per recipient.
    /// Callers broadcast a view's versions in increasing order (the writer does).
    pub fn broadcast(
        &self,
        view_id: &str,
        msg: &Message,
        version: i64,
        except: Option<u64>,
    ) -> usize {
        let Some(room) = self.room(view_id) else {
            return 0;
        };
        let mut inner = lock(&room.inner);
        inner.last_version = inner.last_version.max(version);
        let mut delivered = 0;
        for (key, member) in &inner.members {
            if Some(*key) != except && member.outbox.push(msg.clone(), version) {
                delivered += 1;
            }
        }
        delivered
    }

    /// [`Hub::broadcast`] for several state changes of one view, in version
    /// order: each connection's queue is locked and its session woken once for
    /// all of them, not once per change. Returns how many frames were queued.
    pub fn broadcast_many(&self, view_id: &str, frames: &[Broadcast]) -> usize {
        let Some(room) = self.room(view_id) else {
            return 0;
        };
        let mut inner = lock(&room.inner);
        if let Some(last) = frames.iter().map(|f| f.version).max() {
            inner.last_version = inner.last_version.max(last);
        }
        let mut delivered = 0;
        for (key, member) in &inner.members {
            delivered += member.outbox.push_many(
                frames
                    .iter()
                    .filter(|f| f.except != Some(*key))
                    .map(|f| (f.msg.clone(), f.version)),
            );
        }
        delivered
    }

    /// Sends a frame to the view's controllers; returns how many got it.
    pub fn send_to_controllers(&self, view_id: &str, msg: &Message) -> usize {
        let Some(room) = self.room(view_id) else {
            return 0;
        };
        let inner = lock(&room.inner);
        inner
            .members
            .values()
            .filter(|m| m.role == Role::Controller)
            .filter(|m| m.outbox.push(msg.clone(), 0))
            .count()
    }

    pub fn has_controller(&self, view_id: &str) -> bool {
        self.room(view_id).is_some_and(|room| {
            lock(&room.inner)
                .people
                .keys()
                .any(|(_, role)| *role == Role::Controller)
        })
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, request: CloseRequest) {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        for room in rooms {
            for member in lock(&room.inner).members.values() {
                member.outbox.close(request.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_counts_people_and_rooms_vanish() {
        let hub = Hub::new();
        let out = || Arc::new(Outbox::new(1 << 20));
        let a1 = hub.join("v", "a".into(), Role::Controller, out());
        let a2 = hub.join("v", "a".into(), Role::Controller, out());
        let b = hub.join("v", "b".into(), Role::Viewer, out());
        assert_eq!(
            b.presence,
            Presence {
                controllers: 1,
                viewers: 1,
                connections: 3
            }
        );
        hub.leave("v", a1.key);
        assert_eq!(hub.presence("v").controllers, 1);
        hub.leave("v", a2.key);
        assert!(!hub.has_controller("v"));
        hub.leave("v", b.key);
        assert!(lock(&hub.rooms).is_empty());
    }

    #[test]
    fn broadcast_skips_sender_and_overflow_closes() {
        let hub = Hub::new();
        let small = Arc::new(Outbox::new(10));
        let sender = hub.join(
            "v",
            "a".into(),
            Role::Controller,
            Arc::new(Outbox::new(1 << 20)),
        );
        hub.join("v", "b".into(), Role::Viewer, small.clone());
        assert_eq!(
            hub.broadcast("v", &Message::text("12345678"), 1, Some(sender.key)),
            1
        );
        assert_eq!(
            hub.broadcast("v", &Message::text("12345678"), 2, Some(sender.key)),
            0
        );
        let batch = small.take();
        assert!(batch.frames.is_empty());
        assert_eq!(batch.close, Some(SLOW_CONSUMER));
    }
}

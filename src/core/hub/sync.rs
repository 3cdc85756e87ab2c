//! The hub's side of SPEC §3.1's `request-sync`: the room-locked steps and the
//! deadlines of every room, earliest first. Each room's own bookkeeping is
//! `core::sync_requests`.

use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::core::hub::outbox::Outbox;
use crate::core::hub::room::{Room, RoomInner};
use crate::core::lock::lock;
use crate::core::sync_requests::{Asked, SyncTiming};

/// A room's next request-sync deadline, ordered so that the heap's top is the
/// earliest.
struct SyncDeadline {
    at: Instant,
    room: Arc<Room>,
}

impl PartialEq for SyncDeadline {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for SyncDeadline {}

impl PartialOrd for SyncDeadline {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SyncDeadline {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

/// What became of a viewer's `request-sync`.
pub enum SyncAsked {
    /// Forwarded to this node's controllers now: the other nodes get this.
    Forwarded(Message),
    /// Waiting for a controller's answer (or the timeout); nothing to send now.
    Waiting,
    /// No controller on any node: the server answers at once, with this id.
    AnswerNow(Option<Box<RawValue>>),
}

/// A room's request-sync work that is due (see `Hub::take_due_syncs`).
pub struct DueSync {
    pub view_id: Arc<str>,
    /// The window's forward for the other nodes.
    pub to_nodes: Option<Message>,
    /// Requesters no controller answered in time: where the server's own
    /// answer goes, with its id.
    pub answers: Vec<(Arc<Outbox>, Option<Box<RawValue>>)>,
}

/// Rooms with a request-sync deadline, earliest first (a room may be in it
/// more than once; a stale entry finds nothing to do).
#[derive(Default)]
pub(super) struct Deadlines {
    due: Mutex<BinaryHeap<SyncDeadline>>,
    scheduled: Notify,
}

impl Deadlines {
    /// A viewer connection's `request-sync` in its room (SPEC §3.1). Its
    /// controllers are asked at most once per window; the requester waits for
    /// the next controller `sync-response` or the timeout, and is answered at
    /// once when no controller is connected on any node.
    pub fn ask(
        &self,
        room: &Arc<Room>,
        key: u64,
        user_id: &Arc<str>,
        connection_id: &Arc<str>,
        id: Option<Box<RawValue>>,
        timing: SyncTiming,
    ) -> SyncAsked {
        let mut inner = lock(&room.inner);
        // A requester that is not in the room (a POST naming a stream that
        // just closed) could not be answered later.
        if !(inner.has_controller() || inner.has_remote_controller())
            || !inner.members.contains_key(&key)
        {
            return SyncAsked::AnswerNow(id);
        }
        let now = Instant::now();
        let asked = inner.sync.ask(key, user_id, connection_id, id, now, timing);
        let outcome = match asked {
            Asked::AlreadyWaiting => return SyncAsked::Waiting,
            Asked::Folded => SyncAsked::Waiting,
            Asked::ForwardNow(msg) => {
                inner.send_to_controllers(&msg);
                SyncAsked::Forwarded(msg)
            }
        };
        self.schedule(room, &mut inner);
        outcome
    }

    /// Another node's forwarded `request-sync`: the room's controllers get it
    /// within the same window as its own requesters' forwards.
    pub fn remote(&self, room: &Arc<Room>, msg: Message, timing: SyncTiming) {
        let mut inner = lock(&room.inner);
        if !inner.has_controller() {
            return;
        }
        match inner.sync.remote(msg, Instant::now(), timing) {
            Some(msg) => inner.send_to_controllers(&msg),
            None => self.schedule(room, &mut inner),
        }
    }

    /// Puts the room in the heap if its next deadline is earlier than the one
    /// it is already there for.
    fn schedule(&self, room: &Arc<Room>, inner: &mut RoomInner) {
        let Some(next) = inner.sync.next_deadline() else {
            return;
        };
        if inner.sync_scheduled.is_some_and(|at| at <= next) {
            return;
        }
        inner.sync_scheduled = Some(next);
        lock(&self.due).push(SyncDeadline {
            at: next,
            room: room.clone(),
        });
        self.scheduled.notify_one();
    }

    /// The earliest deadline of any room.
    pub fn next(&self) -> Option<Instant> {
        lock(&self.due).peek().map(|d| d.at)
    }

    /// Resolves when a deadline was scheduled.
    pub async fn scheduled(&self) {
        self.scheduled.notified().await
    }

    /// Handles every room whose deadline has come: sends the window's forward
    /// to the room's controllers, and returns what must be done outside the
    /// hub.
    pub fn take_due(&self, now: Instant, timing: SyncTiming) -> Vec<DueSync> {
        let mut rooms = Vec::new();
        {
            let mut heap = lock(&self.due);
            while heap.peek().is_some_and(|d| d.at <= now) {
                if let Some(due) = heap.pop() {
                    rooms.push(due.room);
                }
            }
        }
        let mut work = Vec::new();
        for room in rooms {
            let mut inner = lock(&room.inner);
            if inner.sync_scheduled.is_some_and(|at| at <= now) {
                inner.sync_scheduled = None;
            }
            let due = inner.sync.due(now, timing);
            if let Some(msg) = &due.to_controllers {
                inner.send_to_controllers(msg);
            }
            let answers: Vec<(Arc<Outbox>, Option<Box<RawValue>>)> = due
                .timed_out
                .into_iter()
                .filter_map(|(key, id)| Some((inner.members.get(&key)?.outbox.clone(), id)))
                .collect();
            self.schedule(&room, &mut inner);
            drop(inner);
            if due.to_nodes.is_some() || !answers.is_empty() {
                work.push(DueSync {
                    view_id: room.view_id.clone(),
                    to_nodes: due.to_nodes,
                    answers,
                });
            }
        }
        work
    }
}

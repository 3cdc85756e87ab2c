//! The hub's side of SPEC §3.1's `request-sync`: the room-locked entry points
//! and the deadlines of every room, earliest first. Each room's own
//! bookkeeping is `core::sync_requests`.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::core::hub::outbox::Outbox;
use crate::core::hub::room::{Room, RoomInner};
use crate::core::hub::Hub;
use crate::core::lock::lock;
use crate::core::sync_requests::Asked;

/// A room's next request-sync deadline, ordered so that the heap's top is the
/// earliest.
pub(super) struct SyncDeadline {
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

/// A room's request-sync work that is due (see [`Hub::take_due_syncs`]).
pub struct DueSync {
    pub view_id: Arc<str>,
    /// The window's forward for the other nodes.
    pub to_nodes: Option<Message>,
    /// Requesters no controller answered in time: where the server's own
    /// answer goes, with its id.
    pub answers: Vec<(Arc<Outbox>, Option<Box<RawValue>>)>,
}

impl Hub {
    /// A viewer connection's `request-sync` (SPEC §3.1). Its controllers
    /// are asked at most once per window; the requester waits for the next
    /// controller `sync-response` or the timeout, and is answered at once
    /// when no controller is connected on any node.
    pub fn request_sync(
        &self,
        view_id: &str,
        key: u64,
        user_id: &Arc<str>,
        connection_id: &Arc<str>,
        id: Option<Box<RawValue>>,
    ) -> SyncAsked {
        let Some(room) = self.room(view_id) else {
            return SyncAsked::AnswerNow(id);
        };
        let mut inner = lock(&room.inner);
        // A requester that is not in the room (a POST naming a stream that
        // just closed) could not be answered later.
        if !(inner.has_controller() || inner.has_remote_controller())
            || !inner.members.contains_key(&key)
        {
            return SyncAsked::AnswerNow(id);
        }
        let now = Instant::now();
        let asked = inner
            .sync
            .ask(key, user_id, connection_id, id, now, self.sync_timing);
        let outcome = match asked {
            Asked::AlreadyWaiting => return SyncAsked::Waiting,
            Asked::Folded => SyncAsked::Waiting,
            Asked::ForwardNow(msg) => {
                inner.send_to_controllers(&msg);
                SyncAsked::Forwarded(msg)
            }
        };
        self.schedule_sync(&room, &mut inner);
        outcome
    }

    /// Another node's forwarded `request-sync`: this node's controllers get
    /// it within the same window as its own requesters' forwards.
    pub fn remote_request_sync(&self, view_id: &str, msg: Message) {
        let Some(room) = self.room(view_id) else {
            return;
        };
        let mut inner = lock(&room.inner);
        if !inner.has_controller() {
            return;
        }
        match inner.sync.remote(msg, Instant::now(), self.sync_timing) {
            Some(msg) => inner.send_to_controllers(&msg),
            None => self.schedule_sync(&room, &mut inner),
        }
    }

    /// Puts the room in `sync_due` if its next deadline is earlier than the
    /// one it is already there for.
    fn schedule_sync(&self, room: &Arc<Room>, inner: &mut RoomInner) {
        let Some(next) = inner.sync.next_deadline() else {
            return;
        };
        if inner.sync_scheduled.is_some_and(|at| at <= next) {
            return;
        }
        inner.sync_scheduled = Some(next);
        lock(&self.sync_due).push(SyncDeadline {
            at: next,
            room: room.clone(),
        });
        self.sync_scheduled.notify_one();
    }

    /// The earliest request-sync deadline of any room.
    pub fn next_sync_deadline(&self) -> Option<Instant> {
        lock(&self.sync_due).peek().map(|d| d.at)
    }

    /// Resolves when a deadline was scheduled (possibly earlier than the
    /// one being waited for).
    pub async fn sync_scheduled(&self) {
        self.sync_scheduled.notified().await
    }

    /// Handles every room whose request-sync deadline has come: sends the
    /// window's forward to this node's controllers, and returns what the
    /// caller must do outside the hub (tell the other nodes, answer through
    /// the writer).
    pub fn take_due_syncs(&self, now: Instant) -> Vec<DueSync> {
        let mut rooms = Vec::new();
        {
            let mut heap = lock(&self.sync_due);
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
            let due = inner.sync.due(now, self.sync_timing);
            if let Some(msg) = &due.to_controllers {
                inner.send_to_controllers(msg);
            }
            let answers: Vec<(Arc<Outbox>, Option<Box<RawValue>>)> = due
                .timed_out
                .into_iter()
                .filter_map(|(key, id)| Some((inner.members.get(&key)?.outbox.clone(), id)))
                .collect();
            self.schedule_sync(&room, &mut inner);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::hub::testing::{join, texts};
    use crate::core::hub::Broadcast;
    use crate::domain::model::Role;
    use crate::protocol;

    #[test]
    fn request_syncs_are_forwarded_per_window_and_answered_once() {
        let hub = Hub::default();
        let (boss, controller) = join(&hub, "v", "boss", Role::Controller);
        let (a, a_out) = join(&hub, "v", "a", Role::Viewer);
        let (b, _) = join(&hub, "v", "b", Role::Viewer);
        let ask = |key: u64, conn: &str, id: Option<&str>| {
            let id = id.and_then(|id| RawValue::from_string(id.into()).ok());
            hub.request_sync("v", key, &"x".into(), &conn.into(), id)
        };
        assert!(matches!(ask(a.key, "ca", None), SyncAsked::Forwarded(_)));
        assert!(matches!(ask(b.key, "cb", None), SyncAsked::Waiting));
        assert_eq!(texts(&controller).len(), 1, "one forward at once");
        let after_window = Instant::now() + Duration::from_millis(150);
        let due = hub.take_due_syncs(after_window);
        assert_eq!(due.len(), 1);
        assert!(due[0].to_nodes.is_some() && due[0].answers.is_empty());
        let forwards = texts(&controller);
        assert_eq!(forwards.len(), 1, "one forward for the rest of the window");
        assert_eq!(forwards[0]["from"]["connectionId"], "cb");
        // A controller's sync-response answers both: nothing times out.
        let state = RawValue::from_string("{}".into()).expect("raw");
        let from = protocol::From {
            user_id: "boss",
            connection_id: None,
        };
        let answer = Broadcast {
            msg: protocol::change_broadcast("sync-response", &state, 1, &from, None),
            version: 1,
            except: None,
        };
        hub.deliver("v", &[answer], false);
        let much_later = Instant::now() + Duration::from_secs(5);
        assert!(hub.take_due_syncs(much_later).is_empty());
        // Unanswered, a requester is answered once, with its latest id; one
        // that left is not.
        ask(a.key, "ca", Some("1"));
        ask(a.key, "ca", Some("2"));
        ask(b.key, "cb", None);
        hub.leave("v", b.key);
        let due = hub.take_due_syncs(much_later);
        let answers: Vec<_> = due.iter().flat_map(|d| d.answers.iter()).collect();
        assert_eq!(answers.len(), 1);
        assert!(Arc::ptr_eq(&answers[0].0, &a_out));
        assert_eq!(answers[0].1.as_ref().map(|id| id.get()), Some("2"));
        assert!(hub.take_due_syncs(much_later).is_empty());
        assert_eq!(hub.next_sync_deadline(), None);
        // No controller left: answered at once.
        hub.leave("v", boss.key);
        assert!(matches!(ask(a.key, "ca", None), SyncAsked::AnswerNow(None)));
    }
}

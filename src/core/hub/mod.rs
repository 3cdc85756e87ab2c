//! The shared state of live connections: which connections watch which portal
//! view (rooms), the connection limits, revocation, and each connection's
//! outbound queue ([`Outbox`]). Presence news, other nodes' connections and
//! request-sync deadlines each have a file of their own below.
//!
//! Everything here is behind `std::sync::Mutex`, never `tokio::sync::Mutex`:
//! every critical section is a few map operations or queue pushes and nothing
//! is awaited while a lock is held, so a blocking lock is both correct and
//! cheaper (the reasoning of mini-redis's `db.rs`). Lock order is always
//! `Hub::rooms`, then `Hub::remote`, then a `Room`, then any one of an
//! `Outbox`, `Hub::dirty`, `Hub::shared` or `Hub::sync_due`, under which
//! nothing else is locked.

mod outbox;
mod presence;
mod remote;
mod room;
mod sync;

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

pub use outbox::{Batch, CloseRequest, Outbox, Outgoing, ACCESS_REVOKED, SLOW_CONSUMER};
pub use presence::flush_every;
pub use remote::Summary;
pub use sync::{DueSync, SyncAsked};

use crate::core::lock::lock;
use crate::core::sequencer::{self, Offered};
use crate::core::sync_requests::SyncTiming;
use crate::domain::model::{Presence, Role};
use crate::protocol;
use room::{Member, Room, RoomInner};

/// One state-change broadcast, as the sequencer delivers it.
pub struct Broadcast {
    pub msg: Message,
    pub version: i64,
    /// The sending connection's hub key: it does not get its own change back.
    pub except: Option<u64>,
}

/// Connection limits (SPEC §5).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_user: usize,
    pub per_view: usize,
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_user: usize::MAX,
            per_view: usize::MAX,
            total: usize::MAX,
        }
    }
}

#[derive(Default)]
struct Rooms {
    by_view: HashMap<Arc<str>, Arc<Room>>,
    /// Open connections per user, over all views (the per-user limit).
    per_user: HashMap<Arc<str>, usize>,
    total: usize,
}

pub struct Hub {
    rooms: Mutex<Rooms>,
    limits: Limits,
    next_key: AtomicU64,
    connections: AtomicU64,
    /// Rooms whose presence changed since the last flush.
    dirty: Mutex<Vec<Arc<Room>>>,
    presence_changed: Notify,
    /// Bumped by every revocation, so a handshake that looked up its access
    /// before one and joined after it knows to look again.
    revocations: AtomicU64,
    /// Other nodes' connections.
    remote: Mutex<remote::Remote>,
    /// Views whose local connections changed since this node last told the
    /// others (see [`Hub::take_summaries`]); `None` unless presence is shared.
    shared: Mutex<Option<HashSet<Arc<str>>>>,
    sync_timing: SyncTiming,
    /// Rooms with a request-sync deadline, earliest first (a room may be in
    /// it more than once; a stale entry finds nothing to do).
    sync_due: Mutex<BinaryHeap<sync::SyncDeadline>>,
    sync_scheduled: Notify,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(Limits::default())
    }
}

/// What a connection learns when it joins.
#[derive(Debug)]
pub struct Joined {
    pub key: u64,
    pub presence: Presence,
    /// The last version delivered to the room before this connection was in it.
    pub last_version: i64,
    /// This connection created the room: broadcasts committed before the join
    /// reached no one here, so the snapshot must be read after the join.
    pub new_room: bool,
}

/// A join refused by a connection limit.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyConnections;

/// A connection joining a room.
pub struct Joiner {
    pub view_id: Arc<str>,
    pub library_id: Arc<str>,
    pub user_id: Arc<str>,
    pub role: Role,
    pub outbox: Arc<Outbox>,
    /// The view's version as read before joining: where a new room's ordered
    /// delivery starts (with other nodes, the sequencer fills from there).
    pub base_version: i64,
}

impl Hub {
    pub fn new(limits: Limits) -> Hub {
        Hub {
            rooms: Mutex::new(Rooms::default()),
            limits,
            next_key: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dirty: Mutex::new(Vec::new()),
            presence_changed: Notify::new(),
            revocations: AtomicU64::new(0),
            remote: Mutex::new(remote::Remote::default()),
            shared: Mutex::new(None),
            sync_timing: SyncTiming::default(),
            sync_due: Mutex::new(BinaryHeap::new()),
            sync_scheduled: Notify::new(),
        }
    }

    /// The request-sync window and timeout (SPEC §3.1), from the config.
    pub fn with_sync_timing(mut self, timing: SyncTiming) -> Hub {
        self.sync_timing = timing;
        self
    }

    fn room(&self, view_id: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).by_view.get(view_id).cloned()
    }

    /// Adds a connection to a view's room, unless a connection limit would be
    /// exceeded. From here on it receives every broadcast of the view, in
    /// order, through its outbox.
    pub fn join(&self, joiner: Joiner) -> Result<Joined, TooManyConnections> {
        let Joiner {
            view_id,
            library_id,
            user_id,
            role,
            outbox,
            base_version,
        } = joiner;
        let mut rooms = lock(&self.rooms);
        let new_room = !rooms.by_view.contains_key(&view_id);
        let remote = lock(&self.remote);
        let per_user = rooms.per_user.get(&user_id).copied().unwrap_or(0)
            + remote.per_user.get(&user_id).copied().unwrap_or(0);
        let remote_share = if new_room {
            remote.aggregate(&view_id)
        } else {
            Default::default()
        };
        drop(remote);
        if rooms.total >= self.limits.total || per_user >= self.limits.per_user {
            return Err(TooManyConnections);
        }
        let room = rooms
            .by_view
            .entry(view_id.clone())
            .or_insert_with(|| {
                Arc::new(Room {
                    view_id,
                    library_id,
                    inner: Mutex::new(RoomInner::new(base_version, remote_share)),
                })
            })
            .clone();
        let mut inner = lock(&room.inner);
        if inner.members.len() >= self.limits.per_view {
            if inner.members.is_empty() {
                rooms.by_view.remove(&room.view_id);
            }
            return Err(TooManyConnections);
        }
        rooms.total += 1;
        *rooms.per_user.entry(user_id.clone()).or_insert(0) += 1;
        drop(rooms);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.shared_changed(&room.view_id);
        let person = (user_id.clone(), role);
        let first_tab = !inner.is_present(&person);
        // Only other controllers care; with none online there is nothing to tell.
        let others_watching = inner.has_controller();
        inner.add_tab(person);
        if others_watching {
            if first_tab {
                inner.record(&user_id, role, true);
            }
            self.mark_dirty(&room, &mut inner);
        }
        let joined_seq = inner.seq;
        if role == Role::Controller {
            inner.last_controller_join = joined_seq;
        }
        inner.members.insert(
            key,
            Member {
                user_id,
                role,
                outbox,
                joined_seq,
                seen: Presence::default(),
            },
        );
        // SPEC §3 `connected`: the counts include the new connection.
        let presence = inner.presence();
        if let Some(member) = inner.members.get_mut(&key) {
            member.seen = presence;
        }
        Ok(Joined {
            key,
            presence,
            last_version: inner.last_version,
            new_room,
        })
    }

    /// Removes a connection; drops the room when it was the last one.
    pub fn leave(&self, view_id: &str, key: u64) {
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.by_view.get(view_id).cloned() else {
            return;
        };
        let mut inner = lock(&room.inner);
        let Some(member) = inner.members.remove(&key) else {
            return;
        };
        inner.sync.left(key);
        self.connections.fetch_sub(1, Ordering::Relaxed);
        rooms.total -= 1;
        if let Some(n) = rooms.per_user.get_mut(&member.user_id) {
            *n -= 1;
            if *n == 0 {
                rooms.per_user.remove(&member.user_id);
            }
        }
        self.shared_changed(&room.view_id);
        if inner.members.is_empty() {
            rooms.by_view.remove(view_id);
            return;
        }
        drop(rooms);
        let person = (member.user_id, member.role);
        let last_tab = inner.remove_tab(&person) && !inner.is_present(&person);
        if inner.has_controller() {
            if last_tab {
                inner.record(&person.0, person.1, false);
            }
            self.mark_dirty(&room, &mut inner);
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

    /// The one way a broadcast reaches connections (the sequencer's): queues
    /// the frames of a view that [`sequencer::in_order`] admits after the
    /// room's last delivered version, each connection's in one push with one
    /// wake-up, none to its own sender. A frame is shared, not copied, per
    /// recipient. `None` when this node has no room for the view.
    pub fn deliver(&self, view_id: &str, frames: &[Broadcast], fill_gaps: bool) -> Option<Offered> {
        let room = self.room(view_id)?;
        let mut inner = lock(&room.inner);
        let (run, gap) = sequencer::in_order(inner.last_version, frames, fill_gaps);
        let frames = &frames[run];
        let mut queued = 0;
        if let Some(last) = frames.last() {
            inner.last_version = last.version;
            if frames
                .iter()
                .any(|f| protocol::answers_sync_requests(&f.msg))
            {
                inner.sync.answered();
            }
            for (key, member) in &inner.members {
                queued += member.outbox.push_many(
                    frames
                        .iter()
                        .filter(|f| f.except != Some(*key))
                        .map(|f| (f.msg.clone(), f.version)),
                );
            }
        }
        Some(Offered {
            queued,
            last: inner.last_version,
            gap,
        })
    }

    /// The last version delivered to a view's room, if this node has one.
    pub fn last_version(&self, view_id: &str) -> Option<i64> {
        self.room(view_id)
            .map(|room| lock(&room.inner).last_version)
    }

    /// Every room with its last delivered version (the sequencer's catch-up).
    pub fn room_versions(&self) -> Vec<(Arc<str>, i64)> {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).by_view.values().cloned().collect();
        rooms
            .into_iter()
            .map(|room| {
                let v = lock(&room.inner).last_version;
                (room.view_id.clone(), v)
            })
            .collect()
    }

    /// Closes every connection of a view whose broadcasts cannot be delivered
    /// in order any more; they reconnect and resynchronise from `connected`.
    /// The room then continues from `version`.
    pub fn resync_room(&self, view_id: &str, version: i64, request: CloseRequest) -> usize {
        let Some(room) = self.room(view_id) else {
            return 0;
        };
        let mut inner = lock(&room.inner);
        inner.last_version = inner.last_version.max(version);
        for member in inner.members.values() {
            member.outbox.close(request.clone());
        }
        inner.members.len()
    }

    /// How many revocations have happened; see [`Hub::revoke`].
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    /// Closes a user's connections to a library's views with 1008 `access
    /// revoked` (SPEC §3.4). Returns how many were asked to close.
    pub fn revoke(&self, library_id: &str, user_id: &str) -> usize {
        self.revocations.fetch_add(1, Ordering::AcqRel);
        let rooms: Vec<Arc<Room>> = lock(&self.rooms)
            .by_view
            .values()
            .filter(|room| &*room.library_id == library_id)
            .cloned()
            .collect();
        let mut closed = 0;
        for room in rooms {
            for member in lock(&room.inner).members.values() {
                if &*member.user_id == user_id {
                    member.outbox.close(ACCESS_REVOKED);
                    closed += 1;
                }
            }
        }
        closed
    }
}

/// What the hub's tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn out() -> Arc<Outbox> {
        Arc::new(Outbox::new(1 << 20))
    }

    pub fn joiner(view: &str, user: &str, role: Role, outbox: Arc<Outbox>) -> Joiner {
        Joiner {
            view_id: view.into(),
            library_id: "lib".into(),
            user_id: user.into(),
            role,
            outbox,
            base_version: 0,
        }
    }

    pub fn join(hub: &Hub, view: &str, user: &str, role: Role) -> (Joined, Arc<Outbox>) {
        let outbox = out();
        let joined = hub
            .join(joiner(view, user, role, outbox.clone()))
            .expect("join");
        (joined, outbox)
    }

    pub fn texts(outbox: &Outbox) -> Vec<serde_json::Value> {
        outbox
            .take()
            .frames
            .into_iter()
            .map(|f| serde_json::from_str(f.msg.to_text().expect("text")).expect("json"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{join, joiner, out};
    use super::*;

    #[test]
    fn presence_counts_people_and_rooms_vanish() {
        let hub = Hub::default();
        let (a1, _) = join(&hub, "v", "a", Role::Controller);
        let (a2, _) = join(&hub, "v", "a", Role::Controller);
        let (b, _) = join(&hub, "v", "b", Role::Viewer);
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
        assert_eq!(hub.presence("v").controllers, 0);
        hub.leave("v", b.key);
        let rooms = lock(&hub.rooms);
        assert!(rooms.by_view.is_empty() && rooms.per_user.is_empty() && rooms.total == 0);
    }

    #[test]
    fn delivery_skips_sender_and_overflow_closes() {
        let hub = Hub::default();
        let small = Arc::new(Outbox::new(10));
        let (sender, _) = join(&hub, "v", "a", Role::Controller);
        hub.join(joiner("v", "b", Role::Viewer, small.clone()))
            .expect("join");
        let frame = |version| Broadcast {
            msg: Message::text("12345678"),
            version,
            except: Some(sender.key),
        };
        let queued = |offered: Option<Offered>| offered.map(|o| o.queued);
        assert_eq!(queued(hub.deliver("v", &[frame(1)], false)), Some(1));
        assert_eq!(queued(hub.deliver("v", &[frame(2)], false)), Some(0));
        let batch = small.take();
        assert!(batch.frames.is_empty());
        assert_eq!(batch.close, Some(SLOW_CONSUMER));
        assert_eq!(batch.dropped, 2);
        assert_eq!(hub.last_version("v"), Some(2));
        assert_eq!(hub.deliver("w", &[frame(1)], false), None, "no room");
    }

    #[test]
    fn limits_per_user_per_view_and_total() {
        let hub = Hub::new(Limits {
            per_user: 2,
            per_view: 3,
            total: 4,
        });
        let ok = |view: &str, user: &str| hub.join(joiner(view, user, Role::Viewer, out()));
        let first = ok("v", "a").expect("a1");
        ok("v", "a").expect("a2");
        assert_eq!(ok("w", "a").expect_err("per user"), TooManyConnections);
        ok("v", "b").expect("b1");
        assert_eq!(ok("v", "c").expect_err("per view"), TooManyConnections);
        ok("w", "c").expect("c1");
        assert_eq!(ok("x", "d").expect_err("total"), TooManyConnections);
        assert!(
            !lock(&hub.rooms).by_view.contains_key("x"),
            "no empty room left"
        );
        hub.leave("v", first.key);
        ok("x", "d").expect("a slot freed");
    }

    #[test]
    fn revoke_closes_only_that_user_in_that_library() {
        let hub = Hub::default();
        let (_, a) = join(&hub, "v", "a", Role::Viewer);
        let (_, b) = join(&hub, "v", "b", Role::Viewer);
        let other = out();
        hub.join(Joiner {
            library_id: "other".into(),
            ..joiner("w", "a", Role::Viewer, other.clone())
        })
        .expect("join");
        let before = hub.revocations();
        assert_eq!(hub.revoke("lib", "a"), 1);
        assert_eq!(hub.revocations(), before + 1);
        assert_eq!(a.take().close, Some(ACCESS_REVOKED));
        assert_eq!(b.take().close, None);
        assert_eq!(other.take().close, None);
    }
}

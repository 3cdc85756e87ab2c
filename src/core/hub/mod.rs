//! The shared state of live connections: which connections watch which portal
//! view (rooms), the connection limits, revocation, and each connection's
//! outbound queue ([`Outbox`]). Presence news, other nodes' connections and
//! request-sync deadlines each have a file of their own below, which owns
//! their data; the `impl Hub` is all here, so that files only import
//! downwards (this one → its children → `room` → `outbox`).
//!
//! Everything here is behind `std::sync::Mutex`, never `tokio::sync::Mutex`:
//! every critical section is a few map operations or queue pushes and nothing
//! is awaited while a lock is held, so a blocking lock is both correct and
//! cheaper (the reasoning of mini-redis's `db.rs`). Lock order is always
//! `Hub::rooms`, then `Hub::remote`, then a `Room`, then any one of an
//! `Outbox`, `Hub::dirty`, `Hub::shared`, `Hub::sync_due` or
//! `Hub::room_changes`, under which nothing else is locked.

mod outbox;
mod presence;
mod remote;
mod room;
mod sync;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

pub use outbox::{Batch, CloseRequest, Outbox, Outgoing, ACCESS_REVOKED};
pub use remote::Summary;
pub use sync::{DueSync, SyncAsked};

use crate::core::delivery::{self, Broadcast, Offered};
use crate::core::lock::lock;
use crate::core::metrics::Metrics;
use crate::core::sync_requests::SyncTiming;
use crate::domain::model::{Presence, Role};
use crate::protocol;
use room::{Member, Room, RoomInner};

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
    dirty: presence::Dirty,
    /// Bumped by every revocation, so a handshake that looked up its access
    /// before one and joined after it knows to look again.
    revocations: AtomicU64,
    /// Rooms created so far, bumped under `rooms`: a handshake compares it
    /// with its room's `created` to know whether its read predates the room.
    rooms_created: AtomicU64,
    /// Other nodes' connections.
    remote: Mutex<remote::Remote>,
    /// Views whose local connections changed since this node last told the
    /// others (see [`Hub::take_summaries`]).
    shared: remote::Shared,
    sync_timing: SyncTiming,
    /// Rooms with a request-sync deadline.
    sync_due: sync::Deadlines,
    /// Rooms created or dropped since the broker last looked.
    room_changes: watch::RoomChanges,
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
    /// The room is younger than the joiner's read of the view (this connection
    /// created it, or another did after that read began): broadcasts committed
    /// before the room existed reached no one here, so the snapshot must be
    /// read again, after the join.
    pub reread: bool,
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
    /// [`Hub::rooms_created`] taken before that read.
    pub rooms_seen: u64,
}

impl Hub {
    pub fn new(limits: Limits) -> Hub {
        Hub {
            rooms: Mutex::new(Rooms::default()),
            limits,
            next_key: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dirty: presence::Dirty::default(),
            revocations: AtomicU64::new(0),
            rooms_created: AtomicU64::new(0),
            remote: Mutex::new(remote::Remote::default()),
            shared: remote::Shared::default(),
            sync_timing: SyncTiming::default(),
            sync_due: sync::Deadlines::default(),
            room_changes: watch::RoomChanges::default(),
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
            rooms_seen,
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
        if new_room {
            self.room_changes.mark(&view_id);
        }
        let room = rooms
            .by_view
            .entry(view_id.clone())
            .or_insert_with(|| {
                Arc::new(Room {
                    view_id,
                    library_id,
                    created: self.rooms_created.fetch_add(1, Ordering::AcqRel) + 1,
                    inner: Mutex::new(RoomInner::new(base_version, remote_share)),
                })
            })
            .clone();
        let mut inner = lock(&room.inner);
        if inner.members.len() >= self.limits.per_view {
            if inner.members.is_empty() {
                rooms.by_view.remove(&room.view_id);
                self.room_changes.mark(&room.view_id);
            }
            return Err(TooManyConnections);
        }
        rooms.total += 1;
        *rooms.per_user.entry(user_id.clone()).or_insert(0) += 1;
        drop(rooms);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.shared.changed(&room.view_id);
        let person = (user_id.clone(), role);
        let first_tab = !inner.is_present(&person);
        // Only other controllers care; with none online there is nothing to tell.
        let others_watching = inner.has_controller();
        inner.add_tab(person);
        if others_watching {
            if first_tab {
                inner.record(&user_id, role, true);
            }
            self.dirty.mark(&room, &mut inner);
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
            reread: room.created > rooms_seen,
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
        self.shared.changed(&room.view_id);
        if inner.members.is_empty() {
            rooms.by_view.remove(view_id);
            self.room_changes.mark(&room.view_id);
            return;
        }
        drop(rooms);
        let person = (member.user_id, member.role);
        let last_tab = inner.remove_tab(&person) && !inner.is_present(&person);
        if inner.has_controller() {
            if last_tab {
                inner.record(&person.0, person.1, false);
            }
            self.dirty.mark(&room, &mut inner);
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
    /// the frames of a view that [`delivery::in_order`] admits after the
    /// room's last delivered version, each connection's in one push with one
    /// wake-up, none to its own sender. A frame is shared, not copied, per
    /// recipient. `None` when this node has no room for the view.
    pub fn deliver(&self, view_id: &str, frames: &[Broadcast], fill_gaps: bool) -> Option<Offered> {
        let room = self.room(view_id)?;
        let mut inner = lock(&room.inner);
        let (run, gap) = delivery::in_order(inner.last_version, frames, fill_gaps);
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

    /// From now on, rooms created and dropped are collected for
    /// [`Hub::take_room_changes`].
    pub fn watch_rooms(&self) {
        self.room_changes.enable();
    }

    /// The views whose room was created or dropped since the last call;
    /// whether each has one now is [`Hub::has_room`]'s answer.
    pub fn take_room_changes(&self) -> std::collections::HashSet<Arc<str>> {
        self.room_changes.take()
    }

    /// Resolves when a room was created or dropped since the last
    /// [`Hub::take_room_changes`].
    pub async fn rooms_changed(&self) {
        self.room_changes.changed().await
    }

    pub fn has_room(&self, view_id: &str) -> bool {
        lock(&self.rooms).by_view.contains_key(view_id)
    }

    /// Every view this node has a room for.
    pub fn room_ids(&self) -> Vec<Arc<str>> {
        lock(&self.rooms).by_view.keys().cloned().collect()
    }

    /// How many rooms have been created; a handshake takes this before it
    /// reads the view (see [`Joined::reread`]).
    pub fn rooms_created(&self) -> u64 {
        self.rooms_created.load(Ordering::Acquire)
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

    /// Sends every controller of every changed room one `presence` event with
    /// what changed since the last flush (SPEC §3.3); returns how many were
    /// queued. See [`flush_every`].
    pub fn flush_presence(&self) -> usize {
        self.dirty.flush()
    }

    /// From now on, local presence changes are collected for
    /// [`Hub::take_summaries`].
    pub fn share_presence(&self) {
        self.shared.enable();
    }

    /// Marks every local view as changed, so all are told again (after the
    /// broker came back, it may have lost them).
    pub fn share_all_again(&self) {
        let views: Vec<Arc<str>> = lock(&self.rooms).by_view.keys().cloned().collect();
        self.shared.extend(views);
    }

    /// This node's summary of every view whose connections changed since the
    /// last call (an empty summary for a view it no longer has).
    pub fn take_summaries(&self) -> Vec<(Arc<str>, Summary)> {
        self.shared
            .take()
            .into_iter()
            .map(|view| {
                let summary = self
                    .room(&view)
                    .map(|room| Summary::of(&lock(&room.inner)))
                    .unwrap_or_default();
                (view, summary)
            })
            .collect()
    }

    /// Another node's connections to a view changed (`None`: it has none, or
    /// it died). Updates counts, per-user totals and the `joined`/`left` news
    /// for this node's controllers.
    pub fn apply_remote(&self, view_id: &str, node: &str, summary: Option<Summary>) {
        let rooms = lock(&self.rooms);
        let mut remote = lock(&self.remote);
        remote.apply(view_id, node, summary);
        let Some(room) = rooms.by_view.get(view_id).cloned() else {
            return;
        };
        let share = remote.aggregate(view_id);
        drop(remote);
        drop(rooms);
        let mut inner = lock(&room.inner);
        if inner.set_remote(share) {
            self.dirty.mark(&room, &mut inner);
        }
    }

    /// Forgets everything about a node (it died, or the broker lost track of
    /// it); returns the views it had.
    pub fn forget_node(&self, node: &str) -> Vec<Arc<str>> {
        let views = lock(&self.remote).views_of(node);
        for view in &views {
            self.apply_remote(view, node, None);
        }
        views
    }

    /// Replaces everything known of other nodes with what the broker holds
    /// (after (re)subscribing, messages may have been missed).
    pub fn replace_remote(&self, entries: Vec<(String, String, Summary)>) {
        let stale = lock(&self.remote).stale(&entries);
        for (view, node) in stale {
            self.apply_remote(&view, &node, None);
        }
        for (view, node, summary) in entries {
            self.apply_remote(&view, &node, Some(summary));
        }
    }

    /// The other nodes this node knows to have connections.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        lock(&self.remote).nodes()
    }

    /// A viewer connection's `request-sync` (SPEC §3.1): forwarded to the
    /// controllers at most once per window, answered by the next controller
    /// `sync-response` or the timeout, or at once with no controller on any
    /// node.
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
        self.sync_due
            .ask(&room, key, user_id, connection_id, id, self.sync_timing)
    }

    /// Another node's forwarded `request-sync`: this node's controllers get
    /// it within the same window as its own requesters' forwards.
    pub fn remote_request_sync(&self, view_id: &str, msg: Message) {
        if let Some(room) = self.room(view_id) {
            self.sync_due.remote(&room, msg, self.sync_timing);
        }
    }

    /// The earliest request-sync deadline of any room.
    pub fn next_sync_deadline(&self) -> Option<Instant> {
        self.sync_due.next()
    }

    /// Resolves when a deadline was scheduled (possibly earlier than the
    /// one being waited for).
    pub async fn sync_scheduled(&self) {
        self.sync_due.scheduled().await
    }

    /// Handles every room whose request-sync deadline has come: sends the
    /// window's forward to this node's controllers, and returns what the
    /// caller must do outside the hub (tell the other nodes, answer through
    /// the writer).
    pub fn take_due_syncs(&self, now: Instant) -> Vec<DueSync> {
        self.sync_due.take_due(now, self.sync_timing)
    }
}

/// SPEC §3.3's batching: after the first change, wait one window and send
/// everything that piled up as one event per controller. A crowd of any size
/// costs each controller at most one presence event per window.
pub async fn flush_every(hub: Arc<Hub>, metrics: Arc<Metrics>, window: Duration) {
    loop {
        hub.dirty.changed().await;
        tokio::time::sleep(window).await;
        let sent = hub.flush_presence();
        metrics.presence_events.inc_by(sent as u64);
    }
}

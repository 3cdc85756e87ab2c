//! The shared state of live connections: which connections watch which portal
//! view, presence counts, and each connection's outbound queue ([`Outbox`]).
//!
//! Everything here is behind `std::sync::Mutex`, never `tokio::sync::Mutex`:
//! every critical section is a few map operations or queue pushes and nothing
//! is awaited while a lock is held, so a blocking lock is both correct and
//! cheaper (the reasoning of mini-redis's `db.rs`). Lock order is always
//! `Hub::rooms` before a `Room`, and a `Room` before an `Outbox` or
//! `Hub::sync_due`.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::core::sync_requests::{Asked, SyncRequests, SyncTiming};
use crate::domain::model::{Presence, Role};
use crate::protocol;

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

/// One state-change broadcast for [`Hub::broadcast_many`].
pub struct Broadcast {
    pub msg: Message,
    pub version: i64,
    /// The sending connection's hub key: it does not get its own change back.
    pub except: Option<u64>,
}

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
    dropped: usize,
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
            inner.dropped += inner.frames.len() + 1;
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
                inner.dropped += inner.frames.len() + 1;
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
            dropped: std::mem::take(&mut inner.dropped),
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
    /// The room's presence sequence when this connection joined: a controller
    /// is told only of changes after it (its own join is not news to it).
    joined_seq: u64,
    /// The counts this controller last saw, so an event goes out only when
    /// something changed for it.
    seen: Presence,
}

/// A person's first connection opening or last one closing, not yet told.
struct PresenceChange {
    seq: u64,
    user_id: Arc<str>,
    role: Role,
    joined: bool,
}

#[derive(Default)]
struct RoomInner {
    members: HashMap<u64, Member>,
    /// Connections per (user, role): presence counts people, not tabs.
    people: HashMap<(Arc<str>, Role), usize>,
    /// The highest version this process has broadcast for the view.
    last_version: i64,
    /// Presence changes waiting for the next batch (SPEC §3.3).
    pending: Vec<PresenceChange>,
    seq: u64,
    /// Sequence of the newest controller join: a change older than it cannot be
    /// cancelled out by its opposite (that controller counted it).
    last_controller_join: u64,
    /// Already on the hub's list of rooms to flush.
    dirty: bool,
    /// People and connections of this view on other nodes (cluster mode),
    /// summed over nodes; kept up to date by [`Hub::apply_remote`].
    remote_people: HashMap<(Arc<str>, Role), usize>,
    remote_connections: usize,
    /// Distinct local people per role, kept as `people` changes: counting them
    /// at each join made a crowd of N joins cost O(N²) (7% of the server's CPU
    /// while 10,000 viewers connected to one view; see BENCHMARKS.md).
    local_controllers: usize,
    local_viewers: usize,
    /// Viewers' request-syncs waiting for an answer, and the forward window.
    sync: SyncRequests,
    /// The earliest time this room is in `Hub::sync_due`.
    sync_scheduled: Option<tokio::time::Instant>,
}

impl RoomInner {
    fn presence(&self) -> Presence {
        if self.remote_people.is_empty() {
            return Presence {
                controllers: self.local_controllers,
                viewers: self.local_viewers,
                connections: self.members.len() + self.remote_connections,
            };
        }
        let mut p = Presence {
            connections: self.members.len() + self.remote_connections,
            ..Presence::default()
        };
        let remote_only = self
            .remote_people
            .keys()
            .filter(|person| !self.people.contains_key(*person));
        for (_, role) in self.people.keys().chain(remote_only) {
            match role {
                Role::Controller => p.controllers += 1,
                Role::Viewer => p.viewers += 1,
            }
        }
        p
    }

    /// Whether a person has a connection to the view on any node.
    fn is_present(&self, person: &(Arc<str>, Role)) -> bool {
        self.people.contains_key(person) || self.remote_people.contains_key(person)
    }

    /// This node's share of the view, as other nodes receive it.
    fn summary(&self) -> Summary {
        Summary {
            people: self
                .people
                .iter()
                .map(|((user, role), n)| (user.to_string(), *role, *n))
                .collect(),
            connections: self.members.len(),
        }
    }

    fn has_controller(&self) -> bool {
        self.local_controllers > 0
    }

    /// Queues a frame for this node's controllers of the view.
    fn send_to_controllers(&self, msg: &Message) {
        for member in self.members.values() {
            if member.role == Role::Controller {
                member.outbox.push(msg.clone(), 0);
            }
        }
    }

    /// Counts a local person in or out of their role when their first
    /// connection opens or their last one closes.
    fn count(&mut self, role: Role, delta: isize) {
        let n = match role {
            Role::Controller => &mut self.local_controllers,
            Role::Viewer => &mut self.local_viewers,
        };
        *n = n.saturating_add_signed(delta);
    }

    /// Records a person arriving or leaving. A change that undoes one still
    /// pending (a tab reloaded within the batch window) cancels it instead:
    /// no controller hears of a person who left and came straight back.
    fn record(&mut self, user_id: &Arc<str>, role: Role, joined: bool) {
        self.seq += 1;
        let opposite = self.pending.iter().position(|c| {
            c.joined != joined
                && c.role == role
                && c.user_id == *user_id
                && c.seq > self.last_controller_join
        });
        match opposite {
            Some(i) => {
                self.pending.remove(i);
            }
            None => self.pending.push(PresenceChange {
                seq: self.seq,
                user_id: user_id.clone(),
                role,
                joined,
            }),
        }
    }
}

/// The connections of one portal view. Each room has its own lock, so a
/// broadcast to a crowd in one view does not hold up handshakes to others.
pub struct Room {
    view_id: Arc<str>,
    library_id: Arc<str>,
    inner: Mutex<RoomInner>,
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

/// One node's connections to one view (cluster mode): what presence and the
/// per-user limit need from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// (user, role, connections)
    pub people: Vec<(String, Role, usize)>,
    pub connections: usize,
}

/// What this node knows of the other nodes' connections (cluster mode).
#[derive(Default)]
struct Remote {
    by_view: HashMap<Arc<str>, HashMap<Arc<str>, Summary>>,
    /// Connections per user on other nodes, over all views.
    per_user: HashMap<Arc<str>, usize>,
}

impl Remote {
    /// The view's remote people and connections, summed over nodes.
    fn aggregate(&self, view_id: &str) -> (HashMap<(Arc<str>, Role), usize>, usize) {
        let mut people = HashMap::new();
        let mut connections = 0;
        for summary in self
            .by_view
            .get(view_id)
            .into_iter()
            .flat_map(|n| n.values())
        {
            connections += summary.connections;
            for (user, role, n) in &summary.people {
                *people.entry((Arc::from(user.as_str()), *role)).or_insert(0) += n;
            }
        }
        (people, connections)
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
    /// Other nodes' connections. Lock order: `rooms`, then `remote`, then a room.
    remote: Mutex<Remote>,
    /// Cluster mode: views whose local connections changed since this node
    /// last told the others (see [`Hub::take_summaries`]).
    shared: Mutex<Option<std::collections::HashSet<Arc<str>>>>,
    sync_timing: SyncTiming,
    /// Rooms with a request-sync deadline, earliest first (a room may be in
    /// it more than once; a stale entry finds nothing to do).
    sync_due: Mutex<BinaryHeap<SyncDeadline>>,
    sync_scheduled: Notify,
}

/// A room's next request-sync deadline, ordered so that the heap's top is the
/// earliest.
struct SyncDeadline {
    at: tokio::time::Instant,
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
    /// Forwarded to this node's controllers now: publish this to the others.
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
    /// The last version broadcast to the room before this connection was in it.
    pub last_version: i64,
    /// This connection created the room: broadcasts committed before the join
    /// reached no one here, so the snapshot must be read after the join.
    pub new_room: bool,
}

/// A join refused by a connection limit.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyConnections;

pub const ACCESS_REVOKED: CloseRequest = CloseRequest {
    code: 1008,
    reason: "access revoked",
};

/// A connection joining a room.
pub struct Joiner {
    pub view_id: Arc<str>,
    pub library_id: Arc<str>,
    pub user_id: Arc<str>,
    pub role: Role,
    pub outbox: Arc<Outbox>,
    /// The view's version as read before joining: where a new room's ordered
    /// delivery starts (with Redis, the sequencer fills from there).
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
            remote: Mutex::new(Remote::default()),
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

    /// Cluster mode: from now on, local presence changes are collected for
    /// [`Hub::take_summaries`].
    pub fn share_presence(&self) {
        let mut shared = lock(&self.shared);
        if shared.is_none() {
            *shared = Some(Default::default());
        }
    }

    fn shared_changed(&self, view_id: &Arc<str>) {
        if let Some(set) = lock(&self.shared).as_mut() {
            set.insert(view_id.clone());
        }
    }

    /// Marks every local view as changed, so all are told again (after Redis
    /// came back, it may have lost them).
    pub fn share_all_again(&self) {
        let views: Vec<Arc<str>> = lock(&self.rooms).by_view.keys().cloned().collect();
        if let Some(set) = lock(&self.shared).as_mut() {
            set.extend(views);
        }
    }

    /// This node's summary of every view whose connections changed since the
    /// last call (an empty summary for a view it no longer has).
    pub fn take_summaries(&self) -> Vec<(Arc<str>, Summary)> {
        let views = match lock(&self.shared).as_mut() {
            Some(set) => std::mem::take(set),
            None => return Vec::new(),
        };
        views
            .into_iter()
            .map(|view| {
                let summary = self
                    .room(&view)
                    .map(|room| lock(&room.inner).summary())
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
        let view: Arc<str> = view_id.into();
        let nodes = remote.by_view.entry(view.clone()).or_default();
        let old = match summary.filter(|s| s.connections > 0) {
            Some(new) => nodes.insert(node.into(), new.clone()),
            None => nodes.remove(node),
        };
        let new_people: Vec<(String, usize)> = nodes
            .get(node)
            .map(|s| s.people.iter().map(|(u, _, n)| (u.clone(), *n)).collect())
            .unwrap_or_default();
        if nodes.is_empty() {
            remote.by_view.remove(&view);
        }
        for (user, _, n) in old.iter().flat_map(|s| s.people.iter()) {
            if let Some(count) = remote.per_user.get_mut(user.as_str()) {
                *count = count.saturating_sub(*n);
                if *count == 0 {
                    remote.per_user.remove(user.as_str());
                }
            }
        }
        for (user, n) in new_people {
            *remote.per_user.entry(user.as_str().into()).or_insert(0) += n;
        }
        let Some(room) = rooms.by_view.get(view_id).cloned() else {
            return;
        };
        let (people, connections) = remote.aggregate(view_id);
        drop(remote);
        drop(rooms);
        let mut inner = lock(&room.inner);
        let before: Vec<(Arc<str>, Role)> = inner
            .remote_people
            .keys()
            .chain(people.keys())
            .cloned()
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        let was: Vec<bool> = before.iter().map(|p| inner.is_present(p)).collect();
        let changed = inner.remote_people != people || inner.remote_connections != connections;
        inner.remote_people = people;
        inner.remote_connections = connections;
        if !changed || !inner.has_controller() {
            return;
        }
        for (person, was) in before.iter().zip(was) {
            let is = inner.is_present(person);
            if is != was {
                inner.record(&person.0, person.1, is);
            }
        }
        self.mark_dirty(&room, &mut inner);
    }

    /// Forgets everything about a node (it died, or Redis lost track of it);
    /// returns the views it had.
    pub fn forget_node(&self, node: &str) -> Vec<Arc<str>> {
        let views: Vec<Arc<str>> = lock(&self.remote)
            .by_view
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(view, _)| view.clone())
            .collect();
        for view in &views {
            self.apply_remote(view, node, None);
        }
        views
    }

    /// Replaces everything known of other nodes with what Redis holds (after
    /// (re)subscribing, messages may have been missed).
    pub fn replace_remote(&self, entries: Vec<(String, String, Summary)>) {
        let fresh: std::collections::HashSet<(String, String)> = entries
            .iter()
            .map(|(view, node, _)| (view.clone(), node.clone()))
            .collect();
        let stale: Vec<(Arc<str>, Arc<str>)> = lock(&self.remote)
            .by_view
            .iter()
            .flat_map(|(view, nodes)| nodes.keys().map(move |node| (view.clone(), node.clone())))
            .filter(|(view, node)| !fresh.contains(&(view.to_string(), node.to_string())))
            .collect();
        for (view, node) in stale {
            self.apply_remote(&view, &node, None);
        }
        for (view, node, summary) in entries {
            self.apply_remote(&view, &node, Some(summary));
        }
    }

    /// The other nodes this node knows to have connections.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        let mut nodes: Vec<Arc<str>> = lock(&self.remote)
            .by_view
            .values()
            .flat_map(|n| n.keys().cloned())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Whether a controller of the view is connected to another node.
    pub fn has_remote_controller(&self, view_id: &str) -> bool {
        self.room(view_id).is_some_and(|room| {
            lock(&room.inner)
                .remote_people
                .keys()
                .any(|(_, role)| *role == Role::Controller)
        })
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
        let (remote_people, remote_connections) = if new_room {
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
                    inner: Mutex::new(RoomInner {
                        last_version: base_version,
                        remote_people,
                        remote_connections,
                        ..RoomInner::default()
                    }),
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
        let tabs = inner.people.entry(person).or_insert(0);
        *tabs += 1;
        if *tabs == 1 {
            inner.count(role, 1);
        }
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
        let mut last_tab = false;
        if let Some(n) = inner.people.get_mut(&person) {
            *n -= 1;
            if *n == 0 {
                inner.people.remove(&person);
                inner.count(person.1, -1);
                last_tab = !inner.is_present(&person);
            }
        }
        if inner.has_controller() {
            if last_tab {
                inner.record(&person.0, person.1, false);
            }
            self.mark_dirty(&room, &mut inner);
        }
    }

    fn mark_dirty(&self, room: &Arc<Room>, inner: &mut RoomInner) {
        if !inner.dirty {
            inner.dirty = true;
            lock(&self.dirty).push(room.clone());
            self.presence_changed.notify_one();
        }
    }

    /// Resolves when some room has presence news (see [`Hub::flush_presence`]).
    pub async fn presence_changed(&self) {
        self.presence_changed.notified().await
    }

    /// Sends every controller of every changed room one `presence` event with
    /// what changed since the last flush. Called at most once per batch window,
    /// this bounds presence traffic per controller whatever the crowd does.
    /// Returns how many events were queued.
    pub fn flush_presence(&self) -> usize {
        let rooms = std::mem::take(&mut *lock(&self.dirty));
        let mut sent = 0;
        for room in rooms {
            let mut inner = lock(&room.inner);
            inner.dirty = false;
            let pending = std::mem::take(&mut inner.pending);
            let presence = inner.presence();
            for member in inner.members.values_mut() {
                if member.role != Role::Controller {
                    continue;
                }
                let since = member.joined_seq;
                let news = || pending.iter().filter(move |c| c.seq > since);
                if news().next().is_none() && member.seen == presence {
                    continue;
                }
                let people = |joined: bool| -> Vec<protocol::Person> {
                    news()
                        .filter(|c| c.joined == joined)
                        .map(|c| protocol::Person {
                            user_id: &c.user_id,
                            role: c.role,
                        })
                        .collect()
                };
                let msg = protocol::presence_event(&people(true), &people(false), presence);
                member.seen = presence;
                if member.outbox.push(msg, 0) {
                    sent += 1;
                }
            }
        }
        sent
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
        if protocol::answers_sync_requests(msg) {
            inner.sync.answered();
        }
        let mut delivered = 0;
        for (key, member) in &inner.members {
            if Some(*key) != except && member.outbox.push(msg.clone(), version) {
                delivered += 1;
            }
        }
        delivered
    }

    /// The last version delivered to a view's room, if this node has one.
    pub fn last_version(&self, view_id: &str) -> Option<i64> {
        self.room(view_id)
            .map(|room| lock(&room.inner).last_version)
    }

    /// Every room with its last delivered version (the cluster's catch-up).
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
        if frames
            .iter()
            .any(|f| protocol::answers_sync_requests(&f.msg))
        {
            inner.sync.answered();
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
        let remote_controller = inner
            .remote_people
            .keys()
            .any(|(_, role)| *role == Role::Controller);
        // A requester that is not in the room (a POST naming a stream that
        // just closed) could not be answered later.
        if !(inner.has_controller() || remote_controller) || !inner.members.contains_key(&key) {
            return SyncAsked::AnswerNow(id);
        }
        let now = tokio::time::Instant::now();
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
        let now = tokio::time::Instant::now();
        match inner.sync.remote(msg, now, self.sync_timing) {
            Some(msg) => {
                inner.send_to_controllers(&msg);
            }
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
    pub fn next_sync_deadline(&self) -> Option<tokio::time::Instant> {
        lock(&self.sync_due).peek().map(|d| d.at)
    }

    /// Resolves when a deadline was scheduled (possibly earlier than the
    /// one being waited for).
    pub async fn sync_scheduled(&self) {
        self.sync_scheduled.notified().await
    }

    /// Handles every room whose request-sync deadline has come: sends the
    /// window's forward to this node's controllers, and returns what the
    /// caller must do outside the hub (publish, answer through the writer).
    pub fn take_due_syncs(&self, now: tokio::time::Instant) -> Vec<DueSync> {
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

    pub fn has_controller(&self, view_id: &str) -> bool {
        self.room(view_id)
            .is_some_and(|room| lock(&room.inner).has_controller())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn out() -> Arc<Outbox> {
        Arc::new(Outbox::new(1 << 20))
    }

    fn joiner(view: &str, user: &str, role: Role, outbox: Arc<Outbox>) -> Joiner {
        Joiner {
            view_id: view.into(),
            library_id: "lib".into(),
            user_id: user.into(),
            role,
            outbox,
            base_version: 0,
        }
    }

    fn join(hub: &Hub, view: &str, user: &str, role: Role) -> (Joined, Arc<Outbox>) {
        let outbox = out();
        let joined = hub
            .join(joiner(view, user, role, outbox.clone()))
            .expect("join");
        (joined, outbox)
    }

    fn texts(outbox: &Outbox) -> Vec<serde_json::Value> {
        outbox
            .take()
            .frames
            .into_iter()
            .map(|f| serde_json::from_str(f.msg.to_text().expect("text")).expect("json"))
            .collect()
    }

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
        assert!(!hub.has_controller("v"));
        hub.leave("v", b.key);
        let rooms = lock(&hub.rooms);
        assert!(rooms.by_view.is_empty() && rooms.per_user.is_empty() && rooms.total == 0);
    }

    #[test]
    fn broadcast_skips_sender_and_overflow_closes() {
        let hub = Hub::default();
        let small = Arc::new(Outbox::new(10));
        let (sender, _) = join(&hub, "v", "a", Role::Controller);
        hub.join(joiner("v", "b", Role::Viewer, small.clone()))
            .expect("join");
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
        assert_eq!(batch.dropped, 2);
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
    fn presence_events_are_batched_for_controllers_only() {
        let hub = Hub::default();
        let (_, controller) = join(&hub, "v", "boss", Role::Controller);
        assert!(texts(&controller).is_empty(), "no event for one's own join");
        let (_, viewer) = join(&hub, "v", "v0", Role::Viewer);
        for i in 1..500 {
            join(&hub, "v", &format!("v{i}"), Role::Viewer);
        }
        join(&hub, "v", "v0", Role::Viewer); // a second tab: no news
        assert_eq!(hub.flush_presence(), 1, "one event for 501 arrivals");
        let events = texts(&controller);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "presence");
        assert_eq!(events[0]["joined"].as_array().map(Vec::len), Some(500));
        assert_eq!(events[0]["left"], serde_json::json!([]));
        assert_eq!(
            events[0]["presence"],
            serde_json::json!({"controllers": 1, "viewers": 500, "connections": 502})
        );
        assert!(texts(&viewer).is_empty(), "viewers get no presence events");
        assert_eq!(hub.flush_presence(), 0, "nothing new");
    }

    #[test]
    fn a_tab_reloaded_within_the_window_is_no_news_but_a_real_leave_is() {
        let hub = Hub::default();
        let (_, controller) = join(&hub, "v", "boss", Role::Controller);
        let (v, _) = join(&hub, "v", "carol", Role::Viewer);
        let (w, _) = join(&hub, "v", "dave", Role::Viewer);
        hub.flush_presence();
        texts(&controller);
        hub.leave("v", v.key);
        join(&hub, "v", "carol", Role::Viewer);
        hub.leave("v", w.key);
        hub.flush_presence();
        let events = texts(&controller);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["joined"], serde_json::json!([]));
        assert_eq!(
            events[0]["left"],
            serde_json::json!([{"userId": "dave", "role": "viewer"}])
        );
    }

    #[test]
    fn a_later_controller_hears_only_of_later_changes() {
        let hub = Hub::default();
        let (_, first) = join(&hub, "v", "boss", Role::Controller);
        join(&hub, "v", "early", Role::Viewer);
        let (second_joined, second) = join(&hub, "v", "ed", Role::Controller);
        assert_eq!(second_joined.presence.viewers, 1);
        join(&hub, "v", "late", Role::Viewer);
        hub.flush_presence();
        let to_first = texts(&first);
        let names = |e: &serde_json::Value| -> Vec<String> {
            e["joined"]
                .as_array()
                .expect("joined")
                .iter()
                .map(|p| p["userId"].as_str().expect("id").to_string())
                .collect()
        };
        assert_eq!(names(&to_first[0]), ["early", "ed", "late"]);
        assert_eq!(names(&texts(&second)[0]), ["late"]);
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

    #[test]
    fn request_syncs_are_forwarded_per_window_and_answered_once() {
        use std::time::Duration;
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
        let after_window = tokio::time::Instant::now() + Duration::from_millis(150);
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
        let answer = protocol::change_broadcast("sync-response", &state, 1, &from, None);
        hub.broadcast("v", &answer, 1, None);
        let much_later = tokio::time::Instant::now() + Duration::from_secs(5);
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

    #[test]
    fn other_nodes_count_in_presence_limits_and_news() {
        let hub = Hub::new(Limits {
            per_user: 2,
            ..Limits::default()
        });
        let (_, controller) = join(&hub, "v", "boss", Role::Controller);
        let summary = |people: &[(&str, Role, usize)]| Summary {
            people: people
                .iter()
                .map(|(u, r, n)| (u.to_string(), *r, *n))
                .collect(),
            connections: people.iter().map(|p| p.2).sum(),
        };
        hub.apply_remote("v", "n2", Some(summary(&[("carol", Role::Viewer, 2)])));
        hub.flush_presence();
        let events = texts(&controller);
        assert_eq!(
            events[0]["joined"],
            serde_json::json!([{"userId": "carol", "role": "viewer"}])
        );
        assert_eq!(
            events[0]["presence"],
            serde_json::json!({"controllers": 1, "viewers": 1, "connections": 3})
        );
        // carol's tab here is her third: no news, and over the per-user limit.
        assert_eq!(
            hub.join(joiner("v", "carol", Role::Viewer, out()))
                .expect_err("limit counts every node"),
            TooManyConnections
        );
        // The node dies: carol leaves.
        assert_eq!(hub.forget_node("n2").len(), 1);
        hub.flush_presence();
        let events = texts(&controller);
        assert_eq!(
            events[0]["left"],
            serde_json::json!([{"userId": "carol", "role": "viewer"}])
        );
        assert_eq!(hub.presence("v").connections, 1);
    }
}

//! One portal view's connections on this node: its members, the people they
//! are (presence counts people, not tabs), the presence news not yet told,
//! the other nodes' share of the view, and its last delivered version.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio_tungstenite::tungstenite::Message;

use crate::core::hub::outbox::Outbox;
use crate::core::sync_requests::SyncRequests;
use crate::domain::model::{Presence, Role};

/// A person: presence counts each (user, role) once, however many tabs.
pub(super) type Person = (Arc<str>, Role);

/// A person's first connection opening or last one closing, not yet told
/// (see `hub::presence`).
pub(super) struct PresenceChange {
    pub seq: u64,
    pub user_id: Arc<str>,
    pub role: Role,
    pub joined: bool,
}

/// A live connection as the hub knows it.
pub(super) struct Member {
    pub user_id: Arc<str>,
    pub role: Role,
    pub outbox: Arc<Outbox>,
    /// The room's presence sequence when this connection joined: a controller
    /// is told only of changes after it (its own join is not news to it).
    pub joined_seq: u64,
    /// The counts this controller last saw, so an event goes out only when
    /// something changed for it.
    pub seen: Presence,
}

/// The connections of one portal view. Each room has its own lock, so a
/// broadcast to a crowd in one view does not hold up handshakes to others.
pub(super) struct Room {
    pub view_id: Arc<str>,
    pub library_id: Arc<str>,
    /// Its number in [`Hub::rooms_created`](super::Hub::rooms_created)'s count.
    pub created: u64,
    pub inner: Mutex<RoomInner>,
}

#[derive(Default)]
pub(super) struct RoomInner {
    pub members: HashMap<u64, Member>,
    /// Connections per person on this node.
    pub people: HashMap<Person, usize>,
    /// The highest version delivered to the room (see `sequencer`).
    pub last_version: i64,
    /// Presence changes waiting for the next batch (SPEC §3.3).
    pub pending: Vec<PresenceChange>,
    pub seq: u64,
    /// Sequence of the newest controller join: a change older than it cannot be
    /// cancelled out by its opposite (that controller counted it).
    pub last_controller_join: u64,
    /// Already on the hub's list of rooms to flush.
    pub dirty: bool,
    /// People and connections of this view on other nodes, summed over
    /// nodes; kept up to date by [`RoomInner::set_remote`].
    pub remote_people: HashMap<Person, usize>,
    pub remote_connections: usize,
    /// Distinct local people per role, kept as `people` changes so that a
    /// join costs the same in a crowd as alone (see BENCHMARKS.md).
    local_controllers: usize,
    local_viewers: usize,
    /// Viewers' request-syncs waiting for an answer, and the forward window.
    pub sync: SyncRequests,
    /// The earliest time this room is in `Hub::sync_due`.
    pub sync_scheduled: Option<tokio::time::Instant>,
}

impl RoomInner {
    pub fn new(last_version: i64, remote: (HashMap<Person, usize>, usize)) -> RoomInner {
        RoomInner {
            last_version,
            remote_people: remote.0,
            remote_connections: remote.1,
            ..RoomInner::default()
        }
    }

    pub fn presence(&self) -> Presence {
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
    pub fn is_present(&self, person: &Person) -> bool {
        self.people.contains_key(person) || self.remote_people.contains_key(person)
    }

    pub fn has_controller(&self) -> bool {
        self.local_controllers > 0
    }

    pub fn has_remote_controller(&self) -> bool {
        self.remote_people
            .keys()
            .any(|(_, role)| *role == Role::Controller)
    }

    /// Queues a frame for this node's controllers of the view.
    pub fn send_to_controllers(&self, msg: &Message) {
        for member in self.members.values() {
            if member.role == Role::Controller {
                member.outbox.push(msg.clone(), 0);
            }
        }
    }

    /// Counts one more tab of `person`; returns whether it is their first
    /// on this node.
    pub fn add_tab(&mut self, person: Person) -> bool {
        let role = person.1;
        let tabs = self.people.entry(person).or_insert(0);
        *tabs += 1;
        let first = *tabs == 1;
        if first {
            self.count(role, 1);
        }
        first
    }

    /// Counts one tab of `person` less; returns whether it was their last on
    /// this node.
    pub fn remove_tab(&mut self, person: &Person) -> bool {
        let Some(n) = self.people.get_mut(person) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.people.remove(person);
        self.count(person.1, -1);
        true
    }

    /// Records a person arriving or leaving. A change that undoes one still
    /// pending (a tab reloaded within the batch window) cancels it instead:
    /// no controller hears of a person who left and came straight back.
    pub fn record(&mut self, user_id: &Arc<str>, role: Role, joined: bool) {
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

    /// Takes the other nodes' people and connections of the view, summed over
    /// nodes, and records who came or went with them. Returns whether this
    /// node's controllers have news (the room must be flushed).
    pub fn set_remote(&mut self, (people, connections): (HashMap<Person, usize>, usize)) -> bool {
        let before: Vec<Person> = self
            .remote_people
            .keys()
            .chain(people.keys())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let was: Vec<bool> = before.iter().map(|p| self.is_present(p)).collect();
        let changed = self.remote_people != people || self.remote_connections != connections;
        self.remote_people = people;
        self.remote_connections = connections;
        if !changed || !self.has_controller() {
            return false;
        }
        for (person, was) in before.iter().zip(was) {
            let is = self.is_present(person);
            if is != was {
                self.record(&person.0, person.1, is);
            }
        }
        true
    }

    fn count(&mut self, role: Role, delta: isize) {
        let n = match role {
            Role::Controller => &mut self.local_controllers,
            Role::Viewer => &mut self.local_viewers,
        };
        *n = n.saturating_add_signed(delta);
    }
}

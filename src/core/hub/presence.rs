//! SPEC §3.3's presence news: the rooms whose people changed since the last
//! batch window, and the flush that then sends one event per controller that
//! has something new. Each room records its own news (`RoomInner::record`).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::core::hub::room::{Room, RoomInner};
use crate::core::lock::lock;
use crate::domain::model::Role;
use crate::protocol;

/// Rooms whose presence changed since the last flush.
#[derive(Default)]
pub(super) struct Dirty {
    rooms: Mutex<Vec<Arc<Room>>>,
    changed: Notify,
}

impl Dirty {
    /// Puts the room on the list of the next flush.
    pub fn mark(&self, room: &Arc<Room>, inner: &mut RoomInner) {
        if !inner.dirty {
            inner.dirty = true;
            lock(&self.rooms).push(room.clone());
            self.changed.notify_one();
        }
    }

    /// Sends every controller of every changed room one `presence` event with
    /// what changed since the last flush. Called at most once per batch window,
    /// this bounds presence traffic per controller whatever the crowd does.
    /// Returns how many events were queued.
    pub fn flush(&self) -> usize {
        let rooms = std::mem::take(&mut *lock(&self.rooms));
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

    /// Resolves when some room has presence news.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

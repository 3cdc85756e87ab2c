//! SPEC §3.3's presence news: who came and went, held per room until the next
//! batch window, then one event per controller that has something new.

use std::sync::Arc;
use std::time::Duration;

use crate::core::hub::room::{Room, RoomInner};
use crate::core::hub::Hub;
use crate::core::lock::lock;
use crate::core::metrics::Metrics;
use crate::domain::model::Role;
use crate::protocol;

/// A person's first connection opening or last one closing, not yet told.
pub(super) struct PresenceChange {
    seq: u64,
    user_id: Arc<str>,
    role: Role,
    joined: bool,
}

impl RoomInner {
    /// Records a person arriving or leaving. A change that undoes one still
    /// pending (a tab reloaded within the batch window) cancels it instead:
    /// no controller hears of a person who left and came straight back.
    pub(super) fn record(&mut self, user_id: &Arc<str>, role: Role, joined: bool) {
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

impl Hub {
    /// Puts the room on the list of the next flush.
    pub(super) fn mark_dirty(&self, room: &Arc<Room>, inner: &mut RoomInner) {
        if !inner.dirty {
            inner.dirty = true;
            lock(&self.dirty).push(room.clone());
            self.presence_changed.notify_one();
        }
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
}

/// SPEC §3.3's batching: after the first change, wait one window and send
/// everything that piled up as one event per controller. A crowd of any size
/// costs each controller at most one presence event per window.
pub async fn flush_every(hub: Arc<Hub>, metrics: Arc<Metrics>, window: Duration) {
    loop {
        hub.presence_changed.notified().await;
        tokio::time::sleep(window).await;
        let sent = hub.flush_presence();
        metrics.presence_events.inc_by(sent as u64);
    }
}

#[cfg(test)]
mod tests {
    use crate::core::hub::testing::{join, texts};
    use crate::core::hub::Hub;
    use crate::domain::model::Role;

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
}

//! The hub's tests, through its own face: rooms and limits, delivery,
//! presence news, other nodes' connections, request-syncs.

use std::sync::Arc;

use super::{Hub, Joined, Joiner, Outbox};
use crate::domain::model::Role;

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
        rooms_seen: 0,
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

mod rooms {
    use std::sync::Arc;

    use tokio_tungstenite::tungstenite::Message;

    use super::{join, joiner, out};
    use crate::core::delivery::{Broadcast, Offered};
    use crate::core::hub::outbox::SLOW_CONSUMER;
    use crate::core::hub::*;
    use crate::core::lock::lock;
    use crate::domain::model::{Presence, Role};

    /// Two handshakes read version 5 while a commit of version 6 reaches no
    /// room (none exists yet). The first creates the room and re-reads; the
    /// second joins that room, which has delivered nothing, so only the room
    /// being younger than its read tells it to re-read too. A handshake that
    /// began after the room existed read every commit made before it.
    #[test]
    fn a_room_younger_than_a_joiners_read_makes_it_read_again() {
        let hub = Hub::default();
        let at = |user: &str, rooms_seen: u64| {
            hub.join(Joiner {
                base_version: 5,
                rooms_seen,
                ..joiner("v", user, Role::Viewer, out())
            })
            .expect("join")
        };
        let before = hub.rooms_created();
        assert!(at("first", before).reread, "the room's creator");
        assert!(
            at("second", before).reread,
            "read before the room existed: a commit may have reached no one"
        );
        let after = hub.rooms_created();
        let third = at("third", after);
        assert!(!third.reread, "read after the room existed");
        assert_eq!(third.last_version, 5);
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

    /// With several nodes the broker subscribes to exactly the views with a
    /// room: it hears of a room's first join and its last leave, nothing
    /// else, and is woken (a stored permit) even if not yet waiting.
    #[test]
    fn the_broker_hears_of_rooms_created_and_dropped() {
        use futures::FutureExt;
        let hub = Hub::default();
        let (early, _) = join(&hub, "v", "a", Role::Viewer);
        assert!(
            hub.take_room_changes().is_empty(),
            "nothing kept until asked"
        );
        hub.watch_rooms();
        let (second, _) = join(&hub, "v", "b", Role::Viewer);
        assert!(
            hub.take_room_changes().is_empty(),
            "v's room already existed"
        );
        assert_eq!(hub.rooms_changed().now_or_never(), None);
        let (w, _) = join(&hub, "w", "a", Role::Viewer);
        assert_eq!(hub.rooms_changed().now_or_never(), Some(()));
        let names = |set: std::collections::HashSet<Arc<str>>| {
            let mut v: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(hub.take_room_changes()), ["w"]);
        hub.leave("w", w.key);
        hub.leave("v", second.key);
        assert_eq!(names(hub.take_room_changes()), ["w"], "v still has a's");
        assert!(!hub.has_room("w") && hub.has_room("v"));
        hub.leave("v", early.key);
        assert_eq!(names(hub.take_room_changes()), ["v"]);
        assert!(hub.room_ids().is_empty());
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

mod presence {
    use super::{join, texts};
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

mod remote {
    use super::{join, joiner, out, texts};
    use crate::core::hub::{Hub, Limits, Summary, TooManyConnections};
    use crate::domain::model::Role;

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

mod sync {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::value::RawValue;
    use tokio::time::Instant;

    use super::{join, texts};
    use crate::core::delivery::Broadcast;
    use crate::core::hub::{Hub, SyncAsked};
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

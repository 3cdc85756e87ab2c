//! Viewers' `request-sync` per view (SPEC §3.1): who still waits for an
//! answer and the coalescing of forwards to the controllers, as a state
//! machine the hub's room holds. The task that acts on its deadlines is
//! `core::sync_deadlines`.
//!
//! A view's forwards go out at most once per window (the presence window,
//! 100 ms) whatever the crowd does, without payload, and each request costs a
//! map insert, so that no crowd of viewers can make a presenter a slow
//! consumer (see BENCHMARKS.md, "Why the code is shaped so"). Every requester is
//! answered exactly once: the next committed controller `sync-response`
//! reaches it as a broadcast anyway (it only has to be forgotten here), and
//! one that none answered within `--sync-timeout` gets the server's own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::protocol;

/// The two durations of SPEC §3.1's request-sync.
#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    /// A controller connection gets at most one forward per window.
    pub window: Duration,
    /// How long a requester waits for a controller's `sync-response` before
    /// the server answers it.
    pub timeout: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        SyncTiming {
            window: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        }
    }
}

/// A connection of this node waiting for its answer.
struct Requester {
    user_id: Arc<str>,
    connection_id: Arc<str>,
    /// The `id` of its latest request: the one its client is most likely
    /// still waiting for.
    id: Option<Box<RawValue>>,
}

/// The forward owed to this node's controllers at the end of the window.
enum Owed {
    /// Naming a local requester (by hub key).
    Local(u64),
    /// As another node forwarded it.
    Remote(Message),
}

/// What became of a local request.
pub(crate) enum Asked {
    /// The connection was already waiting: still one answer, with this
    /// request's id.
    AlreadyWaiting,
    /// The window was closed: forward this now, here and to the other nodes.
    ForwardNow(Message),
    /// Folded into the forward at the end of the window.
    Folded,
}

/// What is due at a room's deadline.
#[derive(Default)]
pub(crate) struct Due {
    /// The window's forward for this node's controllers.
    pub to_controllers: Option<Message>,
    /// The window's forward for the other nodes (cluster mode).
    pub to_nodes: Option<Message>,
    /// Requesters (hub key, id) no controller answered in time.
    pub timed_out: Vec<(u64, Option<Box<RawValue>>)>,
}

/// One view's request-syncs on this node. Lives in the hub's room, under its
/// lock, so that a broadcast and a request are never interleaved.
#[derive(Default)]
pub(crate) struct SyncRequests {
    /// One entry per waiting connection, so bounded by the view's connections.
    waiting: HashMap<u64, Requester>,
    /// Deadlines in request order (one timeout for all, so also in time
    /// order). An entry whose connection left is skipped when it comes up;
    /// keys are never reused, so it cannot be mistaken for a newer request.
    deadlines: VecDeque<(Instant, u64)>,
    /// The end of the window opened by the last forward to this node's
    /// controllers (or the other nodes).
    window_until: Option<Instant>,
    to_controllers: Option<Owed>,
    /// A local requester whose forward the other nodes are owed.
    to_nodes: Option<u64>,
}

impl SyncRequests {
    fn window_open(&self, now: Instant) -> bool {
        self.window_until.is_some_and(|until| until > now)
    }

    /// A viewer connection of this node asks for a sync.
    pub fn ask(
        &mut self,
        key: u64,
        user_id: &Arc<str>,
        connection_id: &Arc<str>,
        id: Option<Box<RawValue>>,
        now: Instant,
        timing: SyncTiming,
    ) -> Asked {
        if let Some(waiting) = self.waiting.get_mut(&key) {
            // Asking again neither postpones the answer nor asks the
            // controllers again: they were asked for this connection already.
            waiting.id = id;
            return Asked::AlreadyWaiting;
        }
        self.waiting.insert(
            key,
            Requester {
                user_id: user_id.clone(),
                connection_id: connection_id.clone(),
                id,
            },
        );
        self.deadlines.push_back((now + timing.timeout, key));
        if self.window_open(now) {
            self.to_controllers.get_or_insert(Owed::Local(key));
            self.to_nodes.get_or_insert(key);
            return Asked::Folded;
        }
        // A quiet view: this forward goes out at once and stands for anything
        // still owed from a window whose deadline has not been handled yet.
        self.to_controllers = None;
        self.to_nodes = None;
        self.window_until = Some(now + timing.window);
        Asked::ForwardNow(forward(user_id, connection_id))
    }

    /// Another node forwarded one of its requests: this node's controllers
    /// get it now if the window is closed (the returned frame), else with the
    /// window's forward.
    pub fn remote(&mut self, msg: Message, now: Instant, timing: SyncTiming) -> Option<Message> {
        if self.window_open(now) {
            self.to_controllers.get_or_insert(Owed::Remote(msg));
            return None;
        }
        self.to_controllers = None;
        self.window_until = Some(now + timing.window);
        Some(msg)
    }

    /// A controller's `sync-response` was delivered to the view: it answered
    /// every requester, and the forward owed for them is moot.
    pub fn answered(&mut self) {
        if self.waiting.is_empty() && self.to_controllers.is_none() {
            return;
        }
        self.waiting.clear();
        self.deadlines.clear();
        self.to_controllers = None;
        self.to_nodes = None;
    }

    /// The connection left: nobody to answer.
    pub fn left(&mut self, key: u64) {
        self.waiting.remove(&key);
    }

    /// Everything due at `now`: the window's forwards, and the requesters
    /// whose wait is over.
    pub fn due(&mut self, now: Instant, timing: SyncTiming) -> Due {
        let mut due = Due::default();
        if !self.window_open(now) {
            due.to_controllers = match self.to_controllers.take() {
                Some(Owed::Remote(msg)) => Some(msg),
                Some(Owed::Local(key)) => self.forward_for(key),
                None => None,
            };
            due.to_nodes = self.to_nodes.take().and_then(|key| self.forward_for(key));
            if due.to_controllers.is_some() || due.to_nodes.is_some() {
                self.window_until = Some(now + timing.window);
            }
        }
        while let Some(&(at, key)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(requester) = self.waiting.remove(&key) {
                due.timed_out.push((key, requester.id));
            }
        }
        due
    }

    /// When [`SyncRequests::due`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let owed = self.to_controllers.is_some() || self.to_nodes.is_some();
        let window = self.window_until.filter(|_| owed);
        let timeout = self.deadlines.front().map(|&(at, _)| at);
        match (window, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A forward naming `key`, or another waiting requester if that one is
    /// no longer waiting; `None` when nobody here waits any more.
    fn forward_for(&self, key: u64) -> Option<Message> {
        let requester = self
            .waiting
            .get(&key)
            .or_else(|| self.waiting.values().next())?;
        Some(forward(&requester.user_id, &requester.connection_id))
    }
}

fn forward(user_id: &str, connection_id: &str) -> Message {
    protocol::request_sync_forward(&protocol::From {
        user_id,
        connection_id: Some(connection_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: SyncTiming = SyncTiming {
        window: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
    };

    fn ms(start: Instant, n: u64) -> Instant {
        start + Duration::from_millis(n)
    }

    fn id(text: &str) -> Option<Box<RawValue>> {
        RawValue::from_string(text.to_string()).ok()
    }

    fn json(msg: &Message) -> serde_json::Value {
        serde_json::from_str(msg.to_text().expect("text")).expect("json")
    }

    fn ask(s: &mut SyncRequests, key: u64, at: Instant, request_id: Option<&str>) -> Asked {
        let user: Arc<str> = format!("u{key}").into();
        let conn: Arc<str> = format!("c{key}").into();
        s.ask(key, &user, &conn, request_id.and_then(id), at, TIMING)
    }

    #[test]
    fn the_first_request_goes_out_at_once_and_the_rest_of_the_window_once() {
        let t = Instant::now();
        let mut s = SyncRequests::default();
        let Asked::ForwardNow(first) = ask(&mut s, 1, t, None) else {
            panic!("a quiet view forwards at once");
        };
        assert_eq!(
            json(&first),
            serde_json::json!({"type": "request-sync", "from": {"userId": "u1", "connectionId": "c1"}})
        );
        for key in 2..100 {
            assert!(matches!(ask(&mut s, key, ms(t, 10), None), Asked::Folded));
        }
        assert_eq!(s.next_deadline(), Some(ms(t, 100)));
        assert!(s.due(ms(t, 99), TIMING).to_controllers.is_none());
        let due = s.due(ms(t, 100), TIMING);
        let forward = due.to_controllers.expect("one forward for the window");
        assert_eq!(json(&forward)["from"]["userId"], "u2");
        assert_eq!(
            json(&due.to_nodes.expect("and one to the other nodes"))["from"]["userId"],
            "u2"
        );
        assert!(due.timed_out.is_empty());
        // Nothing more is owed: the next deadline is the first timeout.
        assert_eq!(s.next_deadline(), Some(ms(t, 2000)));
        let due = s.due(ms(t, 2000), TIMING);
        assert!(due.to_controllers.is_none());
        assert_eq!(due.timed_out.len(), 1);
        assert_eq!(s.due(ms(t, 2010), TIMING).timed_out.len(), 98);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_repeat_is_answered_once_with_its_latest_id_at_the_first_deadline() {
        let t = Instant::now();
        let mut s = SyncRequests::default();
        assert!(matches!(ask(&mut s, 1, t, Some("1")), Asked::ForwardNow(_)));
        for n in 0..1000 {
            let at = ms(t, 200 + n);
            assert!(matches!(
                ask(&mut s, 1, at, Some("2")),
                Asked::AlreadyWaiting
            ));
        }
        assert!(matches!(
            ask(&mut s, 1, ms(t, 1500), Some("\"last\"")),
            Asked::AlreadyWaiting
        ));
        let due = s.due(ms(t, 2000), TIMING);
        assert!(
            due.to_controllers.is_none(),
            "no second forward for a repeat"
        );
        let ids: Vec<String> = due
            .timed_out
            .iter()
            .map(|(_, id)| {
                id.as_ref()
                    .map(|id| id.get().to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(ids, ["\"last\""]);
        assert_eq!(s.deadlines.len(), 0);
    }

    #[test]
    fn a_controllers_answer_clears_everything_owed() {
        let t = Instant::now();
        let mut s = SyncRequests::default();
        ask(&mut s, 1, t, None);
        ask(&mut s, 2, ms(t, 5), None);
        s.remote(forward("far", "away"), ms(t, 6), TIMING);
        s.answered();
        assert_eq!(s.next_deadline(), None);
        let due = s.due(ms(t, 5000), TIMING);
        assert!(due.to_controllers.is_none() && due.to_nodes.is_none() && due.timed_out.is_empty());
        // The window still holds: the next request is folded, not sent at once.
        assert!(matches!(ask(&mut s, 3, ms(t, 50), None), Asked::Folded));
    }

    #[test]
    fn a_requester_that_left_is_forgotten_and_not_named() {
        let t = Instant::now();
        let mut s = SyncRequests::default();
        ask(&mut s, 1, t, None);
        ask(&mut s, 2, ms(t, 5), None);
        ask(&mut s, 3, ms(t, 6), None);
        s.left(2);
        s.left(1);
        let due = s.due(ms(t, 100), TIMING);
        assert_eq!(
            json(&due.to_controllers.expect("forward"))["from"]["userId"],
            "u3"
        );
        s.left(3);
        ask(&mut s, 4, ms(t, 150), None);
        s.left(4);
        let due = s.due(ms(t, 200), TIMING);
        assert!(due.to_controllers.is_none(), "nobody left to name");
        let due = s.due(ms(t, 3000), TIMING);
        assert!(due.timed_out.is_empty(), "nobody left to answer");
        assert!(s.deadlines.is_empty() && s.waiting.is_empty());
    }

    #[test]
    fn other_nodes_forwards_share_the_window() {
        let t = Instant::now();
        let mut s = SyncRequests::default();
        assert!(s.remote(forward("r", "1"), t, TIMING).is_some());
        assert!(s.remote(forward("r", "2"), ms(t, 1), TIMING).is_none());
        assert!(matches!(ask(&mut s, 1, ms(t, 2), None), Asked::Folded));
        let due = s.due(ms(t, 100), TIMING);
        assert_eq!(
            json(&due.to_controllers.expect("one"))["from"]["connectionId"],
            "2"
        );
        // Only a local requester is told to the other nodes.
        assert_eq!(json(&due.to_nodes.expect("one"))["from"]["userId"], "u1");
    }
}

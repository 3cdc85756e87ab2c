//! A session's token expiry (SPEC §3.4, §9): when it is closed 1008 `token
//! expired`, when it is sent `token-expiring`, and `refresh-token` moving
//! both. The session's loop times it; whoever handles the session's messages
//! moves it (the loop itself for a WebSocket, SSE's POST route for a stream,
//! from another task), so the two meet under one lock.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use super::rate::FAR_FUTURE;
use crate::core::lock::lock;
use crate::domain::error::Error;

pub(crate) struct Expiry {
    state: Mutex<State>,
    /// Wakes the session's loop to re-arm its timer after a move.
    moved: Notify,
}

struct State {
    /// The current token's `exp` claim, as clients are told it.
    exp: u64,
    /// `exp` plus `--jwt-leeway` (seconds since the epoch): the session is
    /// closed then.
    closes_at: u64,
    /// Counts moves, so that a timer armed before one knows it is stale.
    generation: u64,
    /// `token-expiring` was sent for this generation's expiry.
    warned: bool,
    /// The timer closed the session: from here on nothing moves it, so no
    /// refresh can revive a session whose close is already under way.
    closed: bool,
}

/// What the session's timer waits for, and for which expiry.
pub(super) struct Armed {
    pub(super) at: tokio::time::Instant,
    step: Step,
    generation: u64,
}

#[derive(Clone, Copy)]
enum Step {
    Warn,
    Close,
}

/// What a timer that fired for a still-current expiry means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Send `token-expiring` for this `exp`.
    Warn(u64),
    /// Close 1008 `token expired`.
    Close,
}

impl Expiry {
    pub(crate) fn new(exp: u64, leeway: u64) -> Expiry {
        Expiry {
            state: Mutex::new(State {
                exp,
                closes_at: exp.saturating_add(leeway),
                generation: 0,
                warned: false,
                closed: false,
            }),
            moved: Notify::new(),
        }
    }

    /// When the session's current token stops authorising it (seconds since
    /// the epoch), for the writer's check of each change.
    pub(crate) fn closes_at(&self) -> u64 {
        lock(&self.state).closes_at
    }

    /// Resolves after the next move. Made before reading the state (in
    /// [`Expiry::plan`]), it cannot miss a move that lands in between.
    pub(super) fn moved(&self) -> Notified<'_> {
        self.moved.notified()
    }

    /// The next thing to time: the warning `warning` before the close, if it
    /// is still to be sent (at once when less than that is left), else the
    /// close.
    pub(super) fn plan(&self, warning: Duration) -> Armed {
        let s = lock(&self.state);
        let close_at = UNIX_EPOCH.checked_add(Duration::from_secs(s.closes_at));
        let (step, at) = if !s.warned && !warning.is_zero() {
            let warn_at = close_at.map(|at| at.checked_sub(warning).unwrap_or(UNIX_EPOCH));
            (Step::Warn, warn_at)
        } else {
            (Step::Close, close_at)
        };
        Armed {
            at: instant(at),
            step,
            generation: s.generation,
        }
    }

    /// The timer armed as `armed` fired: what is due, or `None` when the
    /// expiry moved since (plan again).
    pub(super) fn fire(&self, armed: &Armed) -> Option<Due> {
        let mut s = lock(&self.state);
        if s.generation != armed.generation || s.closed {
            return None;
        }
        match armed.step {
            Step::Warn => {
                s.warned = true;
                Some(Due::Warn(s.exp))
            }
            Step::Close => {
                s.closed = true;
                Some(Due::Close)
            }
        }
    }

    /// SPEC §9: a checked token's `exp` becomes the session's, earlier or
    /// later than the one it replaces (the client asked for it). Refused once
    /// the old expiry has passed (`now`, seconds since the epoch), even if the
    /// loop has not closed the session yet: that close is coming, and the
    /// refresh must not undo it. A new expiry re-arms the warning; the same
    /// one again does not (one warning per expiry).
    pub(crate) fn refresh(&self, exp: u64, leeway: u64, now: u64) -> Result<(), Error> {
        let closes_at = exp.saturating_add(leeway);
        let mut s = lock(&self.state);
        if s.closed || s.closes_at <= now {
            return Err(Error::BadRequest(
                "too late: the session's token has already expired".into(),
            ));
        }
        s.exp = exp;
        if s.closes_at != closes_at {
            s.closes_at = closes_at;
            s.generation += 1;
            s.warned = false;
            drop(s);
            self.moved.notify_waiters();
        }
        Ok(())
    }
}

/// `at` on tokio's clock (at once if past; "never" if out of range).
fn instant(at: Option<SystemTime>) -> tokio::time::Instant {
    let left = match at {
        Some(at) => at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(FAR_FUTURE),
        None => FAR_FUTURE,
    };
    tokio::time::Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::now_secs;

    const WARNING: Duration = Duration::from_secs(60);

    #[test]
    fn warns_once_then_closes() {
        let expiry = Expiry::new(now_secs() + 3600, 0);
        let warn = expiry.plan(WARNING);
        assert_eq!(expiry.fire(&warn), Some(Due::Warn(now_secs() + 3600)));
        let close = expiry.plan(WARNING);
        assert!(close.at > warn.at);
        assert_eq!(expiry.fire(&close), Some(Due::Close));
        // Closed: the same timer, or a refresh, changes nothing.
        assert_eq!(expiry.fire(&close), None);
        assert!(expiry.refresh(now_secs() + 7200, 0, now_secs()).is_err());
    }

    #[test]
    fn a_move_makes_armed_timers_stale_and_rearms_the_warning() {
        let now = now_secs();
        let expiry = Expiry::new(now + 100, 0);
        let warn = expiry.plan(WARNING);
        assert_eq!(expiry.fire(&warn), Some(Due::Warn(now + 100)));
        let close = expiry.plan(WARNING);
        expiry.refresh(now + 200, 0, now).expect("in time");
        assert_eq!(expiry.closes_at(), now + 200);
        assert_eq!(expiry.fire(&close), None, "armed for the old expiry");
        let warn = expiry.plan(WARNING);
        assert_eq!(expiry.fire(&warn), Some(Due::Warn(now + 200)));
        // The same expiry again: no second warning.
        expiry.refresh(now + 200, 0, now).expect("in time");
        let close = expiry.plan(WARNING);
        assert_eq!(expiry.fire(&close), Some(Due::Close));
    }

    #[test]
    fn a_refresh_after_the_old_expiry_is_too_late() {
        let now = now_secs();
        let expiry = Expiry::new(now, 0);
        assert!(expiry.refresh(now + 100, 0, now).is_err());
        assert_eq!(expiry.closes_at(), now);
        // Leeway counts: exp + leeway is when the session closes.
        let expiry = Expiry::new(now, 5);
        expiry
            .refresh(now + 100, 5, now)
            .expect("within the leeway");
        assert_eq!(expiry.closes_at(), now + 105);
    }

    #[test]
    fn no_warning_when_disabled() {
        let expiry = Expiry::new(now_secs() + 10, 0);
        let armed = expiry.plan(Duration::ZERO);
        assert_eq!(expiry.fire(&armed), Some(Due::Close));
    }
}

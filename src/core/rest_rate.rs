//! The per-user rate of REST messages (SPEC §4): `PATCH` and SPEC §7's
//! `POST …/messages` without a stream of its own have no connection whose
//! bucket they could take from, so each user has one bucket for both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::core::session::{lock, RateLimit, Verdict};

/// Buckets kept before idle ones are forgotten.
const BUCKETS: usize = 4096;

/// One token bucket per user, with SPEC §5's `--rate-per-sec` and
/// `--rate-burst`, as a connection has.
///
/// `std::sync::Mutex`: each critical section is one map operation and nothing
/// is awaited while it is held (see `hub.rs`).
pub struct UserRates {
    per_sec: f64,
    burst: u32,
    buckets: Mutex<HashMap<Arc<str>, RateLimit>>,
}

impl UserRates {
    pub fn new(per_sec: f64, burst: u32) -> UserRates {
        UserRates {
            per_sec,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one REST message of `user_id`. A full map first forgets the
    /// buckets that are as good as new, so a crowd of users costs at most
    /// [`BUCKETS`] entries beyond the ones that are busy right now.
    pub(crate) fn check(&self, user_id: &str, now: tokio::time::Instant) -> Verdict {
        let mut buckets = lock(&self.buckets);
        if let Some(bucket) = buckets.get_mut(user_id) {
            return bucket.check(now);
        }
        if buckets.len() >= BUCKETS {
            buckets.retain(|_, bucket| !bucket.is_idle(now));
        }
        let mut bucket = RateLimit::new(self.per_sec, self.burst);
        let verdict = bucket.check(now);
        buckets.insert(user_id.into(), bucket);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_one_bucket() {
        let rates = UserRates::new(0.0, 2);
        let now = tokio::time::Instant::now();
        assert_eq!(rates.check("a", now), Verdict::Allowed);
        assert_eq!(rates.check("a", now), Verdict::Allowed);
        assert_eq!(rates.check("a", now), Verdict::Refused);
        assert_eq!(rates.check("b", now), Verdict::Allowed);
    }

    #[test]
    fn idle_buckets_are_forgotten_when_the_map_is_full() {
        let rates = UserRates::new(1000.0, 1);
        let start = tokio::time::Instant::now();
        for i in 0..BUCKETS {
            assert_eq!(rates.check(&format!("u{i}"), start), Verdict::Allowed);
        }
        let later = start + std::time::Duration::from_secs(61);
        assert_eq!(rates.check("new", later), Verdict::Allowed);
        assert_eq!(lock(&rates.buckets).len(), 1);
    }
}

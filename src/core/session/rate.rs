//! SPEC §5's per-connection rate: a token bucket and the refusals that close
//! a flood. Shared by the WebSocket, SSE's POST route (`http::frames`,
//! `http::streams`) and the per-user REST rate (`core::rest_rate`).

use std::time::Duration;

/// Longer than any session: stands in for "never" on tokio's clock.
pub(super) const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// Answer `RATE_LIMITED`.
    Refused,
    /// Refused more than 10× the burst within a minute: close 1008.
    Exceeded,
}

/// SPEC §5's per-connection token bucket, plus the count of recent refusals
/// that decides when a flooding connection is closed.
pub(crate) struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
    /// Refusals within the last minute (kept only while a connection floods).
    refusals: std::collections::VecDeque<tokio::time::Instant>,
    max_refusals: usize,
}

const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

impl RateLimit {
    pub fn new(per_sec: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: tokio::time::Instant::now(),
            refusals: std::collections::VecDeque::new(),
            max_refusals: (burst as usize).saturating_mul(10),
        }
    }

    /// Whether the bucket is as good as new (full, no refusals in the window),
    /// so that forgetting it changes nothing.
    pub fn is_idle(&self, now: tokio::time::Instant) -> bool {
        let refill = Duration::from_secs_f64(self.burst / self.per_sec.max(1e-9)).min(FAR_FUTURE);
        now.saturating_duration_since(self.last) > REFUSAL_WINDOW.max(refill)
    }

    pub fn check(&mut self, now: tokio::time::Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        while self
            .refusals
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > REFUSAL_WINDOW)
        {
            self.refusals.pop_front();
        }
        self.refusals.push_back(now);
        if self.refusals.len() > self.max_refusals {
            Verdict::Exceeded
        } else {
            Verdict::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_refills_then_closes_a_flood() {
        let start = tokio::time::Instant::now();
        let mut rate = RateLimit::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(rate.check(start), Verdict::Allowed);
        }
        assert_eq!(rate.check(start), Verdict::Refused);
        // 100 ms at 10/s refills one token.
        let later = start + Duration::from_millis(100);
        assert_eq!(rate.check(later), Verdict::Allowed);
        assert_eq!(rate.check(later), Verdict::Refused);
        // 30 refusals (10 × burst) are tolerated; the 31st closes.
        for _ in 0..28 {
            assert_eq!(rate.check(later), Verdict::Refused);
        }
        assert_eq!(rate.check(later), Verdict::Exceeded);
    }

    #[test]
    fn refusals_older_than_a_minute_are_forgotten() {
        let start = tokio::time::Instant::now();
        let mut rate = RateLimit::new(0.0, 1);
        assert_eq!(rate.check(start), Verdict::Allowed);
        for _ in 0..10 {
            assert_eq!(rate.check(start), Verdict::Refused);
        }
        let much_later = start + Duration::from_secs(61);
        for _ in 0..10 {
            assert_eq!(rate.check(much_later), Verdict::Refused);
        }
        assert_eq!(rate.check(much_later), Verdict::Exceeded);
    }
}

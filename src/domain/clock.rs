//! The wall clock in the unit tokens and stored rows use: seconds since the
//! epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch (0 on a clock set before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

//! The one info line a server logs when it starts serving: its version and
//! address, the storage engine and database, the SQLite sync mode, Redis,
//! and the limits, with every password in a URL replaced by `***`.

use std::net::SocketAddr;

use crate::config::{redact_url, Config};

/// The startup line's log target.
pub const TARGET: &str = "portal_sync::startup";

/// Logs the startup line. Its message starts `listening on http://<addr>`,
/// which scripts and tests wait for.
pub fn log_started(config: &Config, addr: SocketAddr) {
    let db = config.db.to_string();
    let redis = config
        .redis_url
        .as_deref()
        .map_or_else(|| "off".to_string(), redact_url);
    log::info!(
        target: TARGET,
        version = env!("CARGO_PKG_VERSION"),
        addr:% = addr,
        storage = config.db.engine(),
        db = db.as_str(),
        sqlite_synchronous = synchronous(config),
        redis = redis.as_str(),
        max_message_bytes = config.max_message_bytes,
        max_state_bytes = config.max_state_bytes,
        rate_per_sec = config.rate_per_sec,
        rate_burst = config.rate_burst,
        max_conns_per_user = config.max_conns_per_user,
        max_conns_per_view = config.max_conns_per_view,
        max_conns = config.max_conns,
        send_queue_bytes = config.send_queue_bytes,
        ping_interval_s = config.ping_interval.as_secs(),
        ping_timeout_s = config.ping_timeout.as_secs(),
        sync_timeout_s = config.sync_timeout.as_secs(),
        shutdown_timeout_s = config.shutdown_timeout.as_secs(),
        jwt_leeway_s = config.jwt_leeway;
        "portal-sync {} listening on http://{addr}",
        env!("CARGO_PKG_VERSION")
    );
}

fn synchronous(config: &Config) -> &'static str {
    match config.sqlite_synchronous {
        crate::config::Synchronous::Full => "full",
        crate::config::Synchronous::Normal => "normal",
    }
}

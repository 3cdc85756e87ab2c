//! Server settings, built by the CLI from flags and environment (SPEC §5, §6)
//! or directly by tests and embedders.

use std::path::PathBuf;
use std::time::Duration;

use crate::db::Synchronous;

#[derive(Debug, Clone)]
pub struct Config {
    pub db_path: PathBuf,
    pub jwt_secret: String,
    /// Seconds of clock leeway on `exp` (SPEC §2: 0 by default).
    pub jwt_leeway: u64,
    /// Largest WebSocket message or REST body (SPEC §5).
    pub max_message_bytes: usize,
    /// Outbound bytes queued per connection before it is closed 1013.
    pub send_queue_bytes: usize,
    /// How long shutdown waits for connections to close (SPEC §3.4).
    pub shutdown_timeout: Duration,
    pub sqlite_synchronous: Synchronous,
}

impl Config {
    /// The defaults of SPEC §5 for a database file and secret.
    pub fn new(db_path: impl Into<PathBuf>, jwt_secret: impl Into<String>) -> Config {
        Config {
            db_path: db_path.into(),
            jwt_secret: jwt_secret.into(),
            jwt_leeway: 0,
            max_message_bytes: 65536,
            send_queue_bytes: 1 << 20,
            shutdown_timeout: Duration::from_secs(10),
            sqlite_synchronous: Synchronous::Full,
        }
    }
}

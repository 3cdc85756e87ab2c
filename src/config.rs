//! Server settings, built by the CLI from flags and environment (SPEC §5, §6)
//! or directly by tests and embedders.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `--db` names (SPEC §6, §8): a `postgres://` or `postgresql://` URL is
/// PostgreSQL, anything else a SQLite file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Database {
    pub fn parse(db: impl Into<PathBuf>) -> Database {
        let path: PathBuf = db.into();
        match path.to_str() {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres(url.to_string())
            }
            _ => Database::Sqlite(path),
        }
    }

    /// The engine's name, for logs and `/health`.
    pub fn engine(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// The SQLite file, if that is what this is.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        }
    }
}

/// For logs and banners: a URL's password is shown as `***`.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; a
/// `password=` query parameter is hidden too. Anything that is not a URL with
/// a password comes back as it was. For logs, banners and `config print`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `--db`: the SQLite file or the PostgreSQL URL.
    pub db: Database,
    pub jwt_secret: String,
    /// Seconds of clock leeway on `exp` (SPEC §2: 0 by default).
    pub jwt_leeway: u64,
    /// How long before a session's token expires it is sent `token-expiring`
    /// (SPEC §9); zero sends none.
    pub token_warning: Duration,
    /// Largest WebSocket message or REST body (SPEC §5).
    pub max_message_bytes: usize,
    /// Largest serialized state a view may reach (SPEC §5); a change past it
    /// is refused and changes nothing.
    pub max_state_bytes: usize,
    /// How long a viewer's `request-sync` waits for a controller's
    /// `sync-response` before the server answers it itself (SPEC §3.1).
    pub sync_timeout: Duration,
    /// Outbound bytes queued per connection before it is closed 1013.
    pub send_queue_bytes: usize,
    /// How long shutdown waits for connections to close (SPEC §3.4).
    pub shutdown_timeout: Duration,
    pub sqlite_synchronous: Synchronous,
    /// How often every connection is pinged (SPEC §3.4).
    pub ping_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub ping_timeout: Duration,
    /// Inbound messages per second per connection (token bucket refill).
    pub rate_per_sec: f64,
    /// Token bucket size: messages a connection may send at once.
    pub rate_burst: u32,
    pub max_conns_per_user: usize,
    pub max_conns_per_view: usize,
    pub max_conns: usize,
    /// Browser origins allowed besides the server's own (`*` allows any).
    pub allowed_origins: Vec<String>,
    /// How late a presence event may be, so a crowd joining at once produces
    /// one event per window rather than one per person (SPEC §3.3).
    pub presence_batch: Duration,
    /// How often membership changes made by other processes (the admin CLI,
    /// another node) are looked for.
    pub revocation_poll: Duration,
    /// Several nodes on one database fan out through this Redis; `None` is a
    /// single node that needs no Redis.
    pub redis_url: Option<String>,
    /// Prefix of the Redis channel, so clusters (and tests) sharing a Redis
    /// stay apart.
    pub redis_prefix: String,
    /// With Redis, how often every local room is compared with the stored
    /// version, so that a broadcast lost on Redis still arrives (tests set it
    /// long, to show what the other catch-ups deliver on their own).
    pub redis_catch_up: Duration,
    /// How long a write of an HTTP response may stall (the peer not reading)
    /// before its connection is dropped.
    pub http_write_timeout: Duration,
    /// Connections that have not yet sent a complete request head; past this
    /// the oldest is dropped. `None`: half the open-file limit.
    pub max_pending_conns: Option<usize>,
}

impl Config {
    /// The defaults of SPEC §5 for a database (a file path, or a
    /// `postgres://` URL: [`Database::parse`]) and secret.
    pub fn new(db: impl Into<PathBuf>, jwt_secret: impl Into<String>) -> Config {
        Config::with_database(Database::parse(db), jwt_secret)
    }

    /// [`Config::new`] for an already parsed [`Database`].
    pub fn with_database(db: Database, jwt_secret: impl Into<String>) -> Config {
        Config {
            db,
            jwt_secret: jwt_secret.into(),
            jwt_leeway: 0,
            token_warning: Duration::from_secs(60),
            max_message_bytes: 65536,
            max_state_bytes: 512 * 1024,
            sync_timeout: Duration::from_secs(2),
            send_queue_bytes: 1 << 20,
            shutdown_timeout: Duration::from_secs(10),
            sqlite_synchronous: Synchronous::Full,
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(10),
            rate_per_sec: 100.0,
            rate_burst: 200,
            max_conns_per_user: 32,
            max_conns_per_view: 100_000,
            max_conns: 200_000,
            allowed_origins: Vec::new(),
            presence_batch: Duration::from_millis(100),
            revocation_poll: Duration::from_millis(250),
            redis_url: None,
            redis_prefix: "portal-sync".into(),
            redis_catch_up: Duration::from_secs(1),
            http_write_timeout: Duration::from_secs(30),
            max_pending_conns: None,
        }
    }
}

/// `PRAGMA synchronous` for the WAL: what an ack promises (see README "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// fsync the WAL at every commit: an acked update survives power loss.
    Full,
    /// fsync only at checkpoints: an acked update survives a process crash
    /// (kill -9), not a power loss.
    Normal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_values_pick_the_engine_and_urls_hide_their_password() {
        assert_eq!(
            Database::parse("portal.db"),
            Database::Sqlite("portal.db".into())
        );
        let url = "postgresql://app:s3cret@db.example:5432/portal?sslmode=disable&password=x";
        assert_eq!(Database::parse(url), Database::Postgres(url.into()));
        assert_eq!(
            Database::parse(url).to_string(),
            "postgresql://app:***@db.example:5432/portal?sslmode=disable&password=***"
        );
        assert_eq!(
            Database::parse("postgres://postgres@127.0.0.1/postgres").to_string(),
            "postgres://postgres@127.0.0.1/postgres"
        );
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        for (url, shown) in [
            (
                "postgres://app:s3cr%40t@db.example:5432/portal",
                "postgres://app:***@db.example:5432/portal",
            ),
            (
                "postgres://app:p@ss@db/portal",
                "postgres://app:***@db/portal",
            ),
            (
                "postgresql://app@db/portal?sslmode=require&password=hunter2",
                "postgresql://app@db/portal?sslmode=require&password=***",
            ),
            (
                "redis://:hunter2@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://host/a@b", "redis://host/a@b"),
            ("portal-sync.db", "portal-sync.db"),
            ("/var/lib/a:b@c.db", "/var/lib/a:b@c.db"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}

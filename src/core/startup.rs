//! The one info line a server logs when it starts serving: its version and
//! address, the storage engine and database, the SQLite sync mode, Redis,
//! and the limits, with every password in a URL replaced by `***`.

use std::borrow::Cow;
use std::net::SocketAddr;

use crate::config::Config;

/// The startup line's log target.
pub const TARGET: &str = "portal_sync::startup";

/// Logs the startup line. Its message starts `listening on http://<addr>`,
/// which scripts and tests wait for.
pub fn log_started(config: &Config, addr: SocketAddr) {
    let db = config.db_path.to_string_lossy();
    let redis = config
        .redis_url
        .as_deref()
        .map_or(Cow::Borrowed("off"), redact_url);
    log::info!(
        target: TARGET,
        version = env!("CARGO_PKG_VERSION"),
        addr:% = addr,
        storage = engine(&db),
        db = redact_url(&db).as_ref(),
        sqlite_synchronous = synchronous(config),
        redis = redis.as_ref(),
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

/// The engine `--db` names: a `postgres://` URL, or a SQLite file.
fn engine(db: &str) -> &'static str {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        "postgres"
    } else {
        "sqlite"
    }
}

fn synchronous(config: &Config) -> &'static str {
    match config.sqlite_synchronous {
        crate::config::Synchronous::Full => "full",
        crate::config::Synchronous::Normal => "normal",
    }
}

/// `scheme://user:secret@host/…?password=secret` →
/// `scheme://user:***@host/…?password=***`; anything that is not a URL with a
/// password comes back as it was.
pub fn redact_url(value: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = value.split_once("://") else {
        return Cow::Borrowed(value);
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match before_query.rfind('@') {
        Some(at) if before_query[..at].contains(':') => {
            let user = before_query[..at].split(':').next().unwrap_or("");
            out.push_str(user);
            out.push_str(":***");
            out.push_str(&before_query[at..]);
        }
        _ => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if out == value {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db.example:5432/portal"),
            "postgres://app:***@db.example:5432/portal"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss@db/portal"),
            "postgres://app:***@db/portal"
        );
        assert_eq!(
            redact_url("postgresql://app@db/portal?sslmode=require&password=hunter2"),
            "postgresql://app@db/portal?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("portal-sync.db"), "portal-sync.db");
        assert_eq!(redact_url("/var/lib/a:b@c.db"), "/var/lib/a:b@c.db");
    }

    #[test]
    fn the_engine_follows_the_db_value() {
        assert_eq!(engine("postgres://u@h/d"), "postgres");
        assert_eq!(engine("postgresql://u@h/d"), "postgres");
        assert_eq!(engine("portal-sync.db"), "sqlite");
    }
}

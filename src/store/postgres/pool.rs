//! Connections: the pool, which failures mean "this connection is gone, try
//! another", the retry of idempotent work on a fresh connection, and keeping
//! the blocking client off tokio's threads.

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use r2d2::Pool;
use r2d2_postgres::PostgresConnectionManager;

use crate::domain::error::Error;

/// Pooled connections: the two storage threads', the writer's, and a few for
/// the CLI and fixtures. Small on purpose: every node (and every test's
/// server) shares PostgreSQL's `max_connections`.
pub(super) const POOL_SIZE: u32 = 6;

/// How long a call waits for a connection before failing with
/// `Error::Storage`: while the database is unreachable, calls fail in about
/// this long (SPEC §8: 1011, 500, `/health` 503) rather than hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long idempotent work (and a batch, `batch.rs`) is retried after its
/// connection was lost.
pub(super) const RETRY_FOR: Duration = Duration::from_secs(5);

pub(super) type Manager = PostgresConnectionManager<NoTls>;

/// Why a unit of work failed.
#[derive(Debug)]
pub(super) enum Fail {
    /// The connection is gone (killed, the server restarting, the network)
    /// or the transaction was rolled back by a conflict: nothing of this
    /// attempt was committed, and the same work may be tried again on
    /// another connection. The text is for the log.
    Retry(String),
    /// An answer: a domain refusal, or a storage error that trying again
    /// will not change.
    Err(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Err(e)
    }
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        if is_retryable(&e) {
            Fail::Retry(describe(&e))
        } else {
            Fail::Err(Error::from(e))
        }
    }
}

/// Whether `e` says the connection is lost, or the transaction was rolled
/// back by the server for a reason a second try does not meet.
pub(super) fn is_retryable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return matches!(db.severity(), "FATAL" | "PANIC")
            // connection_exception, operator_intervention (admin_shutdown,
            // crash_shutdown, cannot_connect_now)
            || code.starts_with("08")
            || code.starts_with("57P")
            // serialization_failure, deadlock_detected, lock_not_available
            || matches!(code, "40001" | "40P01" | "55P03");
    }
    // No answer from the server: I/O on a dead socket.
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// The server's message (and detail), or the client's description.
pub(super) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => e.to_string(),
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Storage(describe(&e))
    }
}

/// The connection settings: the URL as given, plus short timeouts so that a
/// dead server or network is noticed in seconds, not at TCP's leisure.
pub(super) fn client_config(url: &str) -> Result<postgres::Config, Error> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| Error::Storage(format!("bad PostgreSQL URL: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("portal-sync");
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(10));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    Ok(config)
}

pub(super) fn build_pool(config: postgres::Config) -> Result<Pool<Manager>, Error> {
    Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(1))
        .connection_timeout(CONNECT_TIMEOUT)
        // No test query per checkout on the hot path: a dead connection
        // fails its first statement, and the work is retried instead.
        .test_on_check_out(false)
        .build(PostgresConnectionManager::new(config, NoTls))
        .map_err(|e| Error::Storage(format!("connecting to PostgreSQL: {e}")))
}

/// Runs idempotent work (a read, a single-statement change) on a pooled
/// connection, again on a fresh one while connections turn out to be dead
/// (after a mass `pg_terminate_backend` every idle one is), for up to
/// [`RETRY_FOR`].
pub(super) fn with_conn<T: Send>(
    pool: &Pool<Manager>,
    mut work: impl FnMut(&mut Client) -> Result<T, Fail> + Send,
) -> Result<T, Error> {
    off_runtime(|| {
        let start = Instant::now();
        let mut tries: u32 = 0;
        loop {
            let mut conn = pool.get()?;
            match work(&mut conn) {
                Ok(value) => return Ok(value),
                Err(Fail::Err(e)) => return Err(e),
                Err(Fail::Retry(cause)) => {
                    discard_if_dead(&mut conn);
                    tries += 1;
                    if start.elapsed() > RETRY_FOR {
                        return Err(Error::Storage(format!("after {tries} tries: {cause}")));
                    }
                    log::warn!("PostgreSQL connection lost ({cause}); trying another");
                    pause(tries);
                }
            }
        }
    })
}

/// After a failure: makes sure a dead connection reads as closed, so the
/// pool drops it instead of handing it out again (the client only notices
/// the socket's end while it is driven).
pub(super) fn discard_if_dead(conn: &mut Client) {
    if !conn.is_closed() {
        let _ = conn.is_valid(Duration::from_millis(500));
    }
}

/// No wait while the pool may still hold dead connections to skip past,
/// then a short one, so a restarting server is not hammered.
pub(super) fn pause(tries: u32) {
    if tries > POOL_SIZE {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs blocking client work where it may block: the sync client drives its
/// connection with its own runtime's `block_on`, which panics on a thread
/// that is inside a tokio runtime (an async test's fixture, say). The
/// storage threads and the writer's are plain threads and pay nothing; such
/// a caller's work runs on a scoped thread of its own.
pub(super) fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    std::thread::scope(|s| match s.spawn(work).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

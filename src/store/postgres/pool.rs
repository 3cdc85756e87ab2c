//! Connections: the pool, the statements each connection keeps prepared,
//! which failures mean "this connection is gone, try another", the retry of
//! idempotent work on a fresh connection, and keeping the blocking client off
//! tokio's threads.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::{Client, GenericClient, NoTls, Statement};
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

/// r2d2_postgres's manager, handing out [`Conn`]s.
#[derive(Debug)]
pub(super) struct Manager(PostgresConnectionManager<NoTls>);

/// A pooled connection and the statements prepared on it. A handshake's
/// lookup and a batch's statements sent unprepared spent most of
/// PostgreSQL's CPU parsing and planning the same few statements again
/// (BENCHMARKS.md, issue 18); prepared once per connection, each is only
/// bound and executed.
pub(super) struct Conn {
    client: Client,
    prepared: Prepared,
}

/// Statements prepared on one connection, by SQL text: the hot path's few
/// constant statements.
#[derive(Default)]
pub(super) struct Prepared(HashMap<&'static str, Statement>);

impl Prepared {
    /// `sql`, prepared on `client`'s connection (which may be inside a
    /// transaction: a prepared statement outlives it, committed or not) the
    /// first time it is asked for.
    pub(super) fn get(
        &mut self,
        client: &mut impl GenericClient,
        sql: &'static str,
        types: &[Type],
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare_typed(sql, types)?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }

    /// After a failure that may be a stale statement ([`is_stale_statement`]):
    /// everything is prepared afresh.
    pub(super) fn forget(&mut self) {
        self.0.clear();
    }
}

impl Conn {
    /// The client and its prepared statements, to use both inside a
    /// transaction (which borrows the client).
    pub(super) fn split(&mut self) -> (&mut Client, &mut Prepared) {
        (&mut self.client, &mut self.prepared)
    }

    /// Runs `work` with `sql` prepared. A statement the server no longer
    /// accepts (a column's type changed under it) is forgotten, and the work
    /// retried ([`is_stale_statement`]).
    pub(super) fn with_prepared<T>(
        &mut self,
        sql: &'static str,
        types: &[Type],
        work: impl FnOnce(&mut Client, &Statement) -> Result<T, postgres::Error>,
    ) -> Result<T, Fail> {
        let statement = self.prepared.get(&mut self.client, sql, types)?;
        work(&mut self.client, &statement).map_err(|e| {
            if is_stale_statement(&e) {
                self.prepared.forget();
            }
            Fail::from(e)
        })
    }
}

/// Whether PostgreSQL refused a prepared statement that was valid when
/// prepared: "cached plan must not change result type" after another tool
/// changed a column's type, or the statement gone. Preparing it again is
/// the answer, so the work is retried.
pub(super) fn is_stale_statement(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code == "26000" || (code == "0A000" && db.message().contains("cached plan"))
    })
}

impl Deref for Conn {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Conn, postgres::Error> {
        Ok(Conn {
            client: self.0.connect()?,
            prepared: Prepared::default(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}

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

/// Whether `e` says the connection is lost, the transaction was rolled back
/// by the server for a reason a second try does not meet, or a prepared
/// statement went stale (prepared again on the next try).
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
            || matches!(code, "40001" | "40P01" | "55P03")
            || is_stale_statement(e);
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
        .build(Manager(PostgresConnectionManager::new(config, NoTls)))
        .map_err(|e| Error::Storage(format!("connecting to PostgreSQL: {e}")))
}

/// Runs idempotent work (a read, a single-statement change) on a pooled
/// connection, again on a fresh one while connections turn out to be dead
/// (after a mass `pg_terminate_backend` every idle one is), for up to
/// [`RETRY_FOR`].
pub(super) fn with_conn<T: Send>(
    pool: &Pool<Manager>,
    mut work: impl FnMut(&mut Conn) -> Result<T, Fail> + Send,
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

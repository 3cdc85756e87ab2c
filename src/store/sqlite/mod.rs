//! The SQLite engine (SPEC §1): the pool, the schema, the handshake lookup,
//! the batched state writes, and the administration the CLI offers. The only
//! file that names `rusqlite`.
//!
//! It also owns the database *file*: created private (0600), and watched so
//! that a file deleted or replaced under the running server stops it from
//! acknowledging writes into a file nobody will read again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::OptionalExtension;
use serde_json::{Map, Value};

use crate::config::Synchronous;
use crate::domain::access::LibraryRole;
use crate::domain::error::Error;
use crate::store::{
    Access, Admin, Grant, LibraryRow, MemberChange, MemberRow, MembershipChange, Removed, Store,
    StoreOp, Stored, StoredEvent, UserRow, ViewRow, ViewSummary,
};

const SCHEMA: &str = include_str!("../../../schema.sql");

/// Pooled connections (the storage threads', the writer's, the CLI's).
const POOL_SIZE: u32 = 8;

/// The SQLite engine: a pool of connections to one file.
pub struct SqliteStore {
    pool: Pool<SqliteConnectionManager>,
    /// The file as opened; `None` for an in-memory or URI database.
    file: Option<Arc<FileWatch>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, switches it to WAL and
    /// applies the schema. Another process may have the file open too.
    ///
    /// A new file is created 0600 before SQLite sees it: states and member
    /// lists are nobody else's business, and SQLite gives the `-wal` and
    /// `-shm` files the database file's mode. An existing file keeps its mode.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, Error> {
        let on_disk = is_file_path(path);
        if on_disk {
            create_private(path)?;
        }
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        let init = format!(
            "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; PRAGMA synchronous = {sync};"
        );
        probe(path, &init)?;
        let manager =
            SqliteConnectionManager::file(path).with_init(move |c| c.execute_batch(&init));
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(5))
            .build(manager)?;
        let conn = pool.get()?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("SQLite refused WAL mode (journal_mode is {mode})");
        }
        conn.execute_batch(SCHEMA)?;
        drop(conn);
        let file = if on_disk {
            FileWatch::start(path)?
        } else {
            None
        };
        Ok(SqliteStore { pool, file })
    }

    /// Whether the database file is still the one opened: one `stat`. When it
    /// is gone or another file, every storage call is refused until it is back
    /// (it can only come back by being renamed back: an unlinked file cannot);
    /// a background thread also looks every [`FILE_CHECK_EVERY`].
    fn check_file(&self) -> Result<(), Error> {
        self.file.as_ref().map_or(Ok(()), |file| file.check())
    }

    /// Before and after a batch's commit: `Some` (every op refused) when the
    /// file is gone, so that nothing is written into it or acknowledged, and
    /// each job fails the usual way (1011, 500) without logging the cause again.
    fn refuse_batch(&self, ops: usize) -> Option<Vec<Result<Stored, Error>>> {
        self.check_file().err()?;
        Some((0..ops).map(|_| Err(Error::DatabaseMissing)).collect())
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, Error> {
        Ok(self.pool.get()?)
    }
}

/// One connection opened and asked one question before the pool exists: a
/// path that cannot be opened (a directory, a file that is not SQLite) fails
/// at once with one line, instead of after the pool's 5 s of retries, each
/// logged by r2d2.
fn probe(path: &Path, init: &str) -> Result<(), Error> {
    let fail = |why: String| {
        Error::Storage(format!(
            "cannot open the database {}: {why}",
            path.display()
        ))
    };
    if path.is_dir() {
        return Err(fail("it is a directory".into()));
    }
    let fail = |e: rusqlite::Error| {
        fail(match &e {
            rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
            other => other.to_string(),
        })
    };
    let conn = rusqlite::Connection::open(path).map_err(fail)?;
    conn.execute_batch(init).map_err(fail)?;
    conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
        .map_err(fail)?;
    Ok(())
}

impl Store for SqliteStore {
    fn access(&self, user_id: &str, view_id: &str) -> Result<Access, Error> {
        access(&*self.conn()?, user_id, view_id)
    }

    fn grant(&self, user_id: &str, view_id: &str) -> Result<Grant, Error> {
        grant(&*self.conn()?, user_id, view_id)
    }

    fn view(&self, view_id: &str) -> Result<Option<ViewRow>, Error> {
        view(&*self.conn()?, view_id)
    }

    fn apply_batch(
        &self,
        ops: &[StoreOp],
        max_state_bytes: usize,
    ) -> Result<Vec<Result<Stored, Error>>, Error> {
        if let Some(refused) = self.refuse_batch(ops.len()) {
            return Ok(refused); // the database file is gone: write nothing
        }
        let stored = apply_batch(&mut *self.conn()?, ops, max_state_bytes)?;
        // Nor ack if it went meanwhile.
        Ok(self.refuse_batch(stored.len()).unwrap_or(stored))
    }

    fn events_between(&self, view_id: &str, from: i64, to: i64) -> Result<Vec<StoredEvent>, Error> {
        events_between(&*self.conn()?, view_id, from, to)
    }

    fn versions(&self, view_ids: &[String]) -> Result<Vec<(String, i64)>, Error> {
        versions(&*self.conn()?, view_ids)
    }

    fn membership_changes_start(&self) -> Result<i64, Error> {
        membership_changes_start(&*self.conn()?)
    }

    fn membership_changes_since(&self, seq: i64) -> Result<Vec<MembershipChange>, Error> {
        membership_changes_since(&*self.conn()?, seq)
    }

    fn change_member(
        &self,
        caller: &str,
        library_id: &str,
        user_id: &str,
        change: &MemberChange,
        apply: bool,
    ) -> Result<Option<String>, Error> {
        change_member(
            &mut *self.conn()?,
            caller,
            library_id,
            user_id,
            change,
            apply,
        )
    }

    fn ping(&self) -> Result<(), Error> {
        // A fresh look at the file (one `stat`): a deleted database still
        // answers queries through SQLite's open descriptors.
        self.check_file()?;
        self.conn()?
            .query_row("SELECT count(*) FROM portal_views", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok(())
    }

    /// WAL readers do not wait for the writer; the lookup is a few indexed
    /// reads of pages SQLite and the OS keep cached.
    fn reads_inline(&self) -> bool {
        true
    }

    fn unavailable(&self) -> Option<Error> {
        match &self.file {
            Some(file) if file.is_missing() => Some(Error::DatabaseMissing),
            _ => None,
        }
    }

    fn admin(&self) -> &dyn Admin {
        self
    }
}

impl Admin for SqliteStore {
    fn add_user(&self, id: &str, email: &str, name: &str) -> Result<(), Error> {
        add_user(&*self.conn()?, id, email, name)
    }

    fn add_library(&self, id: &str, name: &str, owner_id: &str) -> Result<(), Error> {
        add_library(&*self.conn()?, id, name, owner_id)
    }

    fn set_member(
        &self,
        library_id: &str,
        user_id: &str,
        role: LibraryRole,
    ) -> Result<Option<String>, Error> {
        set_member(&*self.conn()?, library_id, user_id, role.as_str())
    }

    fn member_role(&self, library_id: &str, user_id: &str) -> Result<Option<String>, Error> {
        member_role(&*self.conn()?, library_id, user_id)
    }

    fn remove_member(&self, library_id: &str, user_id: &str) -> Result<bool, Error> {
        remove_member(&*self.conn()?, library_id, user_id)
    }

    fn add_view(
        &self,
        id: &str,
        library_id: &str,
        name: &str,
        state: &Map<String, Value>,
    ) -> Result<(), Error> {
        add_view(&*self.conn()?, id, library_id, name, state)
    }

    fn user_exists(&self, user_id: &str) -> Result<bool, Error> {
        user_exists(&*self.conn()?, user_id)
    }

    fn user(&self, user_id: &str) -> Result<Option<UserRow>, Error> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT id, email, name FROM users WHERE id = ?1",
                [user_id],
                |r| {
                    Ok(UserRow {
                        id: r.get(0)?,
                        email: r.get(1)?,
                        name: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn library(&self, library_id: &str) -> Result<Option<LibraryRow>, Error> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT id, name, owner_id FROM libraries WHERE id = ?1",
                [library_id],
                |r| {
                    Ok(LibraryRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        owner_id: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn remove_user(&self, user_id: &str, cascade: bool) -> Result<Removed, Error> {
        remove::remove_user(&*self.conn()?, user_id, cascade)
    }

    fn remove_library(&self, library_id: &str, cascade: bool) -> Result<Removed, Error> {
        remove::remove_library(&*self.conn()?, library_id, cascade)
    }

    fn remove_view(&self, view_id: &str) -> Result<Removed, Error> {
        remove::remove_view(&*self.conn()?, view_id)
    }

    fn users(&self) -> Result<Vec<UserRow>, Error> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT id, email, name FROM users ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(UserRow {
                id: r.get(0)?,
                email: r.get(1)?,
                name: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn libraries(&self) -> Result<Vec<LibraryRow>, Error> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT id, name, owner_id FROM libraries ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(LibraryRow {
                id: r.get(0)?,
                name: r.get(1)?,
                owner_id: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn members(&self, library_id: &str) -> Result<Vec<MemberRow>, Error> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT user_id, role FROM library_members WHERE library_id = ?1 ORDER BY user_id",
        )?;
        let rows = stmt.query_map([library_id], |r| {
            Ok(MemberRow {
                user_id: r.get(0)?,
                role: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn views(&self) -> Result<Vec<ViewSummary>, Error> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, library_id, name, version, updated_at FROM portal_views ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ViewSummary {
                id: r.get(0)?,
                library_id: r.get(1)?,
                name: r.get(2)?,
                version: r.get(3)?,
                updated_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Self {
        Error::Storage(format!("pool: {e}"))
    }
}

/// How often a background thread looks at the database file (besides the
mod admin;
mod batch;
mod file;
mod reads;
mod remove;

use admin::{
    add_library, add_user, add_view, change_member, member_role, remove_member, set_member,
};
use batch::apply_batch;
use file::{create_private, is_file_path, FileWatch};
use reads::{
    access, events_between, grant, membership_changes_since, membership_changes_start, user_exists,
    versions, view,
};
#[cfg(test)]
mod tests;

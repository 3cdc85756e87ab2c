//! The SQLite engine (SPEC §1): the pool, the schema, the handshake lookup,
//! the batched state writes, and the administration the CLI offers. The only
//! file that names `rusqlite`.
//!
//! It also owns the database *file*: created private (0600), and watched so
//! that a file deleted or replaced under the running server stops it from
//! acknowledging writes into a file nobody will read again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::Synchronous;
use crate::domain::access::{self, LibraryRole, Standing};
use crate::domain::error::Error;
use crate::domain::merge::json_len;
use crate::domain::model::is_valid_id;
use crate::store::{
    Access, Admin, Grant, LibraryRow, MemberChange, MemberRow, MembershipChange, Store, StoreOp,
    Stored, StoredEvent, UserRow, ViewRow, ViewSummary, EVENTS_KEPT,
};

const SCHEMA: &str = include_str!("../../schema.sql");

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

    fn unavailable(&self) -> Option<Error> {
        match &self.file {
            Some(file) if file.missing.load(Ordering::Acquire) => Some(Error::DatabaseMissing),
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
/// look before and after every write batch): /health turns 503 within this.
const FILE_CHECK_EVERY: Duration = Duration::from_millis(500);

/// A path SQLite will open as a file of that name: not `:memory:`, not the
/// empty path (a private temp database), not a `file:` URI.
fn is_file_path(path: &Path) -> bool {
    let text = path.to_string_lossy();
    !(text.is_empty() || text == ":memory:" || text.starts_with("file:"))
}

/// Creates the file 0600 unless it exists, so that SQLite never creates it
/// with the process's umask (0644 for most).
fn create_private(path: &Path) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Storage(format!(
            "cannot create the database file {}: {e}",
            path.display()
        ))),
    }
}

/// The database file's identity at open (device, inode), and whether the path
/// still names it. SQLite keeps writing through its open descriptors into a
/// file that was unlinked, and happily acknowledges it; after a restart that
/// data is gone. So the path is looked at, and a change is a storage failure.
struct FileWatch {
    path: PathBuf,
    identity: (u64, u64),
    missing: AtomicBool,
}

impl FileWatch {
    /// Records the identity and starts the background look, which ends once
    /// every [`SqliteStore`] (and so this watch) is gone.
    fn start(path: &Path) -> Result<Option<Arc<FileWatch>>, Error> {
        let Some(identity) = identity(path)? else {
            return Ok(None);
        };
        let watch = Arc::new(FileWatch {
            path: path.to_path_buf(),
            identity,
            missing: AtomicBool::new(false),
        });
        let weak: Weak<FileWatch> = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("db-file-watch".into())
            // It only stats and, rarely, logs.
            .stack_size(256 * 1024)
            .spawn(move || loop {
                std::thread::sleep(FILE_CHECK_EVERY);
                let Some(watch) = weak.upgrade() else { return };
                let _ = watch.check();
            })
            .map_err(|e| Error::Internal(format!("starting the database file watch: {e}")))?;
        Ok(Some(watch))
    }

    /// Logs each change of state once, not per refused request.
    fn check(&self) -> Result<(), Error> {
        let now_missing = match identity(&self.path) {
            Ok(found) => found != Some(self.identity),
            Err(Error::DatabaseMissing) => true,
            // A `stat` that fails otherwise (a directory's permissions, say)
            // says nothing about the file; SQLite's own errors will.
            Err(_) => self.missing.load(Ordering::Acquire),
        };
        let was_missing = self.missing.swap(now_missing, Ordering::AcqRel);
        if now_missing && !was_missing {
            log::error!(
                "the database file {} was deleted or replaced while the server runs: \
                 every change is refused and /health answers 503; restart the server \
                 (with the file restored) to serve again",
                self.path.display()
            );
        } else if was_missing && !now_missing {
            log::warn!(
                "the database file {} is back: serving again",
                self.path.display()
            );
        }
        if now_missing {
            Err(Error::DatabaseMissing)
        } else {
            Ok(())
        }
    }
}

/// (device, inode) of the file at `path`; `DatabaseMissing` when nothing is
/// there; `None` where the platform has no such identity.
fn identity(path: &Path) -> Result<Option<(u64, u64)>, Error> {
    match std::fs::metadata(path) {
        #[cfg(unix)]
        Ok(meta) => {
            use std::os::unix::fs::MetadataExt;
            Ok(Some((meta.dev(), meta.ino())))
        }
        #[cfg(not(unix))]
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(Error::DatabaseMissing)
        }
        Err(e) => Err(Error::Storage(format!(
            "cannot stat the database file {}: {e}",
            path.display()
        ))),
    }
}

fn user_exists(conn: &Connection, user_id: &str) -> Result<bool, Error> {
    if !is_valid_id(user_id) {
        return Ok(false);
    }
    let mut stmt = conn.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?;
    Ok(stmt.exists([user_id])?)
}

/// The checks of SPEC §3 that need storage, in its order: unknown user, view not
/// found, access denied. Reads the current rows, so access changes made by other
/// tools are seen at the next handshake.
fn access(conn: &Connection, user_id: &str, view_id: &str) -> Result<Access, Error> {
    known_user_and_view_id(conn, user_id, view_id)?;
    let mut stmt = conn.prepare_cached(
        "SELECT v.library_id, v.name, v.state, v.version, v.updated_at, l.owner_id, m.role
           FROM portal_views v
           LEFT JOIN libraries l ON l.id = v.library_id
           LEFT JOIN library_members m ON m.library_id = v.library_id AND m.user_id = ?1
          WHERE v.id = ?2",
    )?;
    let row = stmt
        .query_row(params![user_id, view_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })
        .optional()?;
    let Some((library_id, name, state, version, updated_at, owner_id, member_role)) = row else {
        return Err(Error::ViewNotFound);
    };
    let role = access::required_role(
        user_id,
        owner_id.as_deref(),
        member_role.as_deref().and_then(LibraryRole::parse),
    )?;
    Ok(Access {
        role,
        view: ViewRow::from_columns(view_id, (library_id, name, state, version, updated_at))?,
    })
}

/// The first two checks of SPEC §3 that need storage: the user exists, and the
/// view id could name a view.
fn known_user_and_view_id(conn: &Connection, user_id: &str, view_id: &str) -> Result<(), Error> {
    if !user_exists(conn, user_id)? {
        return Err(Error::UnknownUser);
    }
    if !is_valid_id(view_id) {
        return Err(Error::ViewNotFound);
    }
    Ok(())
}

/// [`access`] without reading the `state` column: same checks, same order.
fn grant(conn: &Connection, user_id: &str, view_id: &str) -> Result<Grant, Error> {
    known_user_and_view_id(conn, user_id, view_id)?;
    let mut stmt = conn.prepare_cached(
        "SELECT v.library_id, v.version, l.owner_id, m.role
           FROM portal_views v
           LEFT JOIN libraries l ON l.id = v.library_id
           LEFT JOIN library_members m ON m.library_id = v.library_id AND m.user_id = ?1
          WHERE v.id = ?2",
    )?;
    let row = stmt
        .query_row(params![user_id, view_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .optional()?;
    let Some((library_id, version, owner_id, member_role)) = row else {
        return Err(Error::ViewNotFound);
    };
    let role = access::required_role(
        user_id,
        owner_id.as_deref(),
        member_role.as_deref().and_then(LibraryRole::parse),
    )?;
    Ok(Grant {
        role,
        library_id,
        version,
    })
}

/// The user's standing in a library, read inside the caller's transaction.
fn standing_in(conn: &Connection, user_id: &str, library_id: &str) -> Result<Standing, Error> {
    if !user_exists(conn, user_id)? {
        return Ok(Standing::NoSuchUser);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT l.owner_id, m.role
           FROM libraries l
           LEFT JOIN library_members m ON m.library_id = l.id AND m.user_id = ?1
          WHERE l.id = ?2",
    )?;
    let row = stmt
        .query_row(params![user_id, library_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?;
    Ok(Standing::Role(row.and_then(|(owner_id, member_role)| {
        access::role_in_library(
            user_id,
            Some(&owner_id),
            member_role.as_deref().and_then(LibraryRole::parse),
        )
    })))
}

/// Validates stored state text: another tool may have written anything.
fn state_json(view_id: &str, text: String) -> Result<Box<RawValue>, Error> {
    let corrupt = || {
        Error::Storage(format!(
            "stored state of view {view_id} is not a JSON object"
        ))
    };
    if !text.trim_start().starts_with('{') {
        return Err(corrupt());
    }
    RawValue::from_string(text).map_err(|_| corrupt())
}

fn view(conn: &Connection, view_id: &str) -> Result<Option<ViewRow>, Error> {
    select_view(conn, view_id)?
        .map(|columns| ViewRow::from_columns(view_id, columns))
        .transpose()
}

impl ViewRow {
    /// Builds a row from its columns, validating the stored state text.
    fn from_columns(view_id: &str, columns: ViewColumns) -> Result<ViewRow, Error> {
        let (library_id, name, state, version, updated_at) = columns;
        Ok(ViewRow {
            id: view_id.to_string(),
            library_id,
            name,
            state: state_json(view_id, state)?,
            version,
            updated_at,
        })
    }
}

/// A view's columns: library id, name, state text, version, updated at.
type ViewColumns = (String, String, String, i64, Option<String>);

fn select_view(conn: &Connection, view_id: &str) -> Result<Option<ViewColumns>, Error> {
    if !is_valid_id(view_id) {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT library_id, name, state, version, updated_at FROM portal_views WHERE id = ?1",
    )?;
    Ok(stmt
        .query_row([view_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?)
}

/// The stored broadcasts of a view with versions in `from..=to`, in order.
fn events_between(
    conn: &Connection,
    view_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, node, conn, message FROM portal_view_events \
         WHERE view_id = ?1 AND version BETWEEN ?2 AND ?3 ORDER BY version",
    )?;
    let rows = stmt.query_map(params![view_id, from, to], |r| {
        Ok(StoredEvent {
            version: r.get(0)?,
            node: r.get(1)?,
            conn: r.get::<_, Option<i64>>(2)?.map(|k| k as u64),
            message: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Current versions of the given views (missing views are left out).
fn versions(conn: &Connection, view_ids: &[String]) -> Result<Vec<(String, i64)>, Error> {
    let mut stmt = conn.prepare_cached("SELECT version FROM portal_views WHERE id = ?1")?;
    let mut out = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        if let Some(v) = stmt
            .query_row(params![id], |r| r.get::<_, i64>(0))
            .optional()?
        {
            out.push((id.clone(), v));
        }
    }
    Ok(out)
}

struct Loaded {
    library_id: Arc<str>,
    name: String,
    state: Map<String, Value>,
    /// The state's serialized length, counted when the batch first changes it.
    len: Option<usize>,
    version: i64,
    updated_at: Option<String>,
    dirty: bool,
}

enum LoadFailure {
    NotFound,
    Corrupt,
}

/// Applies many ops in one IMMEDIATE transaction (group commit): each view is
/// read and parsed once, every change bumps its version by exactly one, and each
/// changed view is written once at the end. Returns one result per op; the outer
/// error means nothing was committed.
///
/// Each op is checked in order: the view exists, its requester may still do
/// it (token, user, role: one lookup per user and library per batch), its
/// `If-Match`, and that the state it leaves is at most `max_state_bytes`
/// serialized. A refused op changes nothing and leaves the rest of the batch
/// alone.
fn apply_batch(
    conn: &mut Connection,
    ops: &[StoreOp],
    max_state_bytes: usize,
) -> Result<Vec<Result<Stored, Error>>, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now: String = tx.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [], |r| {
        r.get(0)
    })?;
    let now_secs = crate::protocol::auth::now_secs();
    let mut views: HashMap<&str, Result<Loaded, LoadFailure>> = HashMap::new();
    let mut standings: HashMap<(&str, Arc<str>), Standing> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        if !views.contains_key(op.view_id.as_str()) {
            let loaded = load(&tx, &op.view_id)?;
            views.insert(&op.view_id, loaded);
        }
        let entry = match views.get_mut(op.view_id.as_str()) {
            Some(Ok(entry)) => entry,
            Some(Err(LoadFailure::Corrupt)) => {
                results.push(Err(Error::Storage(format!(
                    "stored state of view {} is not a JSON object",
                    op.view_id
                ))));
                continue;
            }
            Some(Err(LoadFailure::NotFound)) | None => {
                results.push(Err(Error::ViewNotFound));
                continue;
            }
        };
        if let Some(requester) = &op.requester {
            let key = (&*requester.user_id, entry.library_id.clone());
            let standing = match standings.get(&key) {
                Some(standing) => *standing,
                None => {
                    let found = standing_in(&tx, &requester.user_id, &entry.library_id)?;
                    standings.insert(key, found);
                    found
                }
            };
            if let Some(refusal) = requester.refusal(now_secs, standing) {
                results.push(Err(refusal));
                continue;
            }
        }
        if let Some(versions) = &op.if_match {
            if !versions.contains(&entry.version) {
                results.push(Err(Error::PreconditionFailed {
                    current: entry.version,
                }));
                continue;
            }
        }
        let mut event = None;
        if let Some(change) = &op.change {
            let len = *entry.len.get_or_insert_with(|| json_len(&entry.state));
            let len_after = change.len_after(&entry.state, len);
            if len_after > max_state_bytes {
                results.push(Err(Error::StateTooLarge {
                    len: len_after,
                    max: max_state_bytes,
                }));
                continue;
            }
            change.apply(&mut entry.state);
            entry.len = Some(len_after);
            entry.version += 1;
            entry.updated_at = Some(now.clone());
            entry.dirty = true;
            if let Some(template) = &op.event {
                let text = (template.render)(entry.version);
                let conn_key = template.conn.map(|k| k as i64);
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO portal_view_events (view_id, version, node, conn, message) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![op.view_id, entry.version, &*template.node, conn_key, text])?;
                tx.prepare_cached(
                    "DELETE FROM portal_view_events WHERE view_id = ?1 AND version <= ?2",
                )?
                .execute(params![op.view_id, entry.version - EVENTS_KEPT])?;
                event = Some(text);
            }
        }
        let row = op
            .want_row
            .then(|| row_of(&op.view_id, entry))
            .transpose()?;
        results.push(Ok(Stored {
            version: entry.version,
            row,
            event,
        }));
    }
    {
        let mut update = tx.prepare_cached(
            "UPDATE portal_views SET state = ?1, version = ?2, updated_at = ?3 WHERE id = ?4",
        )?;
        for (id, entry) in &views {
            if let Ok(entry) = entry {
                if entry.dirty {
                    let state = serde_json::to_string(&entry.state)
                        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
                    update.execute(params![state, entry.version, entry.updated_at, id])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

fn load(conn: &Connection, view_id: &str) -> Result<Result<Loaded, LoadFailure>, Error> {
    let Some((library_id, name, state, version, updated_at)) = select_view(conn, view_id)? else {
        return Ok(Err(LoadFailure::NotFound));
    };
    let Ok(Value::Object(state)) = serde_json::from_str::<Value>(&state) else {
        return Ok(Err(LoadFailure::Corrupt));
    };
    Ok(Ok(Loaded {
        library_id: library_id.into(),
        name,
        state,
        len: None,
        version,
        updated_at,
        dirty: false,
    }))
}

fn row_of(view_id: &str, entry: &Loaded) -> Result<ViewRow, Error> {
    let state = serde_json::value::to_raw_value(&entry.state)
        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
    Ok(ViewRow {
        id: view_id.to_string(),
        library_id: entry.library_id.to_string(),
        name: entry.name.clone(),
        state,
        version: entry.version,
        updated_at: entry.updated_at.clone(),
    })
}

// ---------------------------------------------------------------------------
// Administration (CLI `user`, `library`, `member`, `view`; tests' fixtures).

fn require_id(what: &str, id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} id must be 1-64 characters of [A-Za-z0-9_-]"
        )))
    }
}

fn add_user(conn: &Connection, id: &str, email: &str, name: &str) -> Result<(), Error> {
    require_id("user", id)?;
    conn.execute(
        "INSERT INTO users (id, email, name) VALUES (?1, ?2, ?3)",
        params![id, email, name],
    )?;
    Ok(())
}

fn add_library(conn: &Connection, id: &str, name: &str, owner_id: &str) -> Result<(), Error> {
    require_id("library", id)?;
    conn.execute(
        "INSERT INTO libraries (id, name, owner_id) VALUES (?1, ?2, ?3)",
        params![id, name, owner_id],
    )?;
    Ok(())
}

/// Adds a member or changes their role; returns the previous role, if any.
fn set_member(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
    role: &str,
) -> Result<Option<String>, Error> {
    let previous = member_role(conn, library_id, user_id)?;
    conn.execute(
        "INSERT INTO library_members (library_id, user_id, role) VALUES (?1, ?2, ?3)
         ON CONFLICT (library_id, user_id) DO UPDATE SET role = excluded.role",
        params![library_id, user_id, role],
    )?;
    Ok(previous)
}

fn member_role(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
) -> Result<Option<String>, Error> {
    Ok(conn
        .query_row(
            "SELECT role FROM library_members WHERE library_id = ?1 AND user_id = ?2",
            params![library_id, user_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Returns whether a membership was removed.
fn remove_member(conn: &Connection, library_id: &str, user_id: &str) -> Result<bool, Error> {
    Ok(conn.execute(
        "DELETE FROM library_members WHERE library_id = ?1 AND user_id = ?2",
        params![library_id, user_id],
    )? > 0)
}

fn add_view(
    conn: &Connection,
    id: &str,
    library_id: &str,
    name: &str,
    state: &Map<String, Value>,
) -> Result<(), Error> {
    require_id("portal view", id)?;
    let state = serde_json::to_string(state)
        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
    conn.execute(
        "INSERT INTO portal_views (id, library_id, name, state, version, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        params![id, library_id, name, state],
    )?;
    Ok(())
}

/// SPEC §4's membership routes, all checks and the change in one transaction:
/// unknown caller (401), no such library (404), caller not an owner (403),
/// no such user or not a member (404), the library's `owner_id` (409).
/// Applies nothing when `apply` is false (the check before reading a body).
/// Returns the member's role afterwards (`None` once removed).
fn change_member(
    conn: &mut Connection,
    caller: &str,
    library_id: &str,
    user_id: &str,
    change: &MemberChange,
    apply: bool,
) -> Result<Option<String>, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !user_exists(&tx, caller)? {
        return Err(Error::UnknownUser);
    }
    let owner: Option<String> = if is_valid_id(library_id) {
        tx.query_row(
            "SELECT owner_id FROM libraries WHERE id = ?1",
            [library_id],
            |r| r.get(0),
        )
        .optional()?
    } else {
        None
    };
    let owner = owner.ok_or(Error::NotFound("library not found"))?;
    let caller_member = member_role(&tx, library_id, caller)?;
    access::may_manage_members(caller, &owner, caller_member.as_deref())?;
    if !apply {
        return Ok(None);
    }
    access::may_change_member(user_id, &owner)?;
    let role = match change {
        MemberChange::Set(role) => {
            if !user_exists(&tx, user_id)? {
                return Err(Error::NotFound("user not found"));
            }
            set_member(&tx, library_id, user_id, role.as_str())?;
            Some(role.as_str().to_string())
        }
        MemberChange::Remove => {
            if !remove_member(&tx, library_id, user_id)? {
                return Err(Error::NotFound("not a member of this library"));
            }
            None
        }
    };
    tx.commit()?;
    Ok(role)
}

/// The newest recorded membership change (where a starting server begins
/// watching), after pruning entries older than a day.
fn membership_changes_start(conn: &Connection) -> Result<i64, Error> {
    conn.execute(
        "DELETE FROM membership_changes WHERE at < CAST(strftime('%s', 'now') AS INTEGER) - 86400",
        [],
    )?;
    Ok(conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM membership_changes",
        [],
        |r| r.get(0),
    )?)
}

fn membership_changes_since(conn: &Connection, seq: i64) -> Result<Vec<MembershipChange>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, library_id, user_id FROM membership_changes WHERE seq > ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([seq], |r| {
        Ok(MembershipChange {
            seq: r.get(0)?,
            library_id: r.get(1)?,
            user_id: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::access::{Needs, Requester};
    use crate::domain::merge::Change;
    use crate::domain::model::Role;
    use serde_json::json;

    fn fixture() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteStore::open(&dir.path().join("t.db"), Synchronous::Normal).expect("open");
        let c = db.conn().expect("conn");
        add_user(&c, "o", "o@x", "O").expect("user");
        add_user(&c, "v", "v@x", "V").expect("user");
        add_user(&c, "n", "n@x", "N").expect("user");
        add_library(&c, "lib", "L", "o").expect("lib");
        set_member(&c, "lib", "v", "VIEWER").expect("member");
        add_view(&c, "pv", "lib", "P", &Map::new()).expect("view");
        drop(c);
        (dir, db)
    }

    #[test]
    fn schema_is_idempotent_and_access_follows_spec_order() {
        let (dir, db) = fixture();
        drop(db);
        let db = SqliteStore::open(&dir.path().join("t.db"), Synchronous::Full).expect("reopen");
        let c = db.conn().expect("conn");
        assert_eq!(access(&c, "o", "pv").expect("owner").role, Role::Controller);
        assert_eq!(access(&c, "v", "pv").expect("viewer").role, Role::Viewer);
        assert!(matches!(access(&c, "zz", "nope"), Err(Error::UnknownUser)));
        assert!(matches!(access(&c, "n", "nope"), Err(Error::ViewNotFound)));
        assert!(matches!(access(&c, "n", "pv"), Err(Error::AccessDenied)));
        assert!(matches!(access(&c, "n", "../x"), Err(Error::ViewNotFound)));
    }

    #[test]
    fn batch_versions_are_gapless_and_per_op() {
        let (_dir, db) = fixture();
        let mut c = db.conn().expect("conn");
        let merge = |v: Value| match v {
            Value::Object(m) => Some(Change::Merge(m)),
            _ => None,
        };
        let ops = vec![
            StoreOp {
                view_id: "pv".into(),
                change: merge(json!({"a":1})),
                if_match: None,
                want_row: false,
                event: None,
                requester: None,
            },
            StoreOp {
                view_id: "nope".into(),
                change: merge(json!({"a":1})),
                if_match: None,
                want_row: false,
                event: None,
                requester: None,
            },
            StoreOp {
                view_id: "pv".into(),
                change: merge(json!({"b":2})),
                if_match: Some(vec![0]),
                want_row: false,
                event: None,
                requester: None,
            },
            StoreOp {
                view_id: "pv".into(),
                change: merge(json!({"a":null})),
                if_match: Some(vec![1]),
                want_row: true,
                event: None,
                requester: None,
            },
        ];
        let results = apply_batch(&mut c, &ops, usize::MAX).expect("commit");
        assert_eq!(results[0].as_ref().expect("ok").version, 1);
        assert!(matches!(results[1], Err(Error::ViewNotFound)));
        assert!(matches!(
            results[2],
            Err(Error::PreconditionFailed { current: 1 })
        ));
        let last = results[3].as_ref().expect("ok");
        assert_eq!(last.version, 2);
        assert_eq!(last.row.as_ref().expect("row").state.get(), "{}");
        let stored = view(&c, "pv").expect("read").expect("row");
        assert_eq!(stored.version, 2);
        assert_eq!(stored.state.get(), "{}");
    }

    /// The file renamed away is missing (and storage calls are refused); a
    /// new file at the path is not the one opened; the original renamed back
    /// is found again. A write batch is refused while it is away.
    #[tokio::test]
    async fn a_moved_or_replaced_file_is_noticed_and_its_return_too() {
        let (dir, db) = fixture();
        let path = dir.path().join("t.db");
        let away = dir.path().join("away.db");
        assert!(db.check_file().is_ok());
        std::fs::rename(&path, &away).expect("move away");
        assert!(matches!(db.check_file(), Err(Error::DatabaseMissing)));
        let refused = db.refuse_batch(2).expect("refused while away");
        assert_eq!(refused.len(), 2);
        assert!(matches!(refused[0], Err(Error::DatabaseMissing)));
        assert!(matches!(db.unavailable(), Some(Error::DatabaseMissing)));
        std::fs::write(&path, "").expect("another file");
        assert!(matches!(db.check_file(), Err(Error::DatabaseMissing)));
        std::fs::rename(&away, &path).expect("move back");
        assert!(db.check_file().is_ok());
        assert!(db.refuse_batch(1).is_none());
        assert!(db.unavailable().is_none());
    }

    /// Each op's result as its new version or its error code.
    fn outcomes(results: &[Result<Stored, Error>]) -> Vec<String> {
        results
            .iter()
            .map(|r| match r {
                Ok(stored) => stored.version.to_string(),
                Err(e) => e.code().to_string(),
            })
            .collect()
    }

    fn merge_op(view: &str, patch: Value, requester: Option<Requester>) -> StoreOp {
        let Value::Object(patch) = patch else {
            panic!("not an object: {patch}")
        };
        StoreOp {
            view_id: view.into(),
            change: Some(Change::Merge(patch)),
            if_match: None,
            want_row: false,
            event: None,
            requester,
        }
    }

    fn by(user: &str, expires_at: u64, needs: Needs) -> Option<Requester> {
        Some(Requester {
            user_id: user.into(),
            expires_at,
            needs,
        })
    }

    /// SPEC §4: access and the token hold when the change is applied, read
    /// inside the write transaction; a refused op changes nothing.
    #[test]
    fn requesters_are_checked_when_applied() {
        let (_dir, db) = fixture();
        let mut c = db.conn().expect("conn");
        add_user(&c, "e", "e@x", "E").expect("user");
        set_member(&c, "lib", "e", "EDITOR").expect("member");
        let later = crate::protocol::auth::now_secs() + 3600;
        let results = apply_batch(
            &mut c,
            &[
                merge_op("pv", json!({"a": 1}), by("e", later, Needs::Controller)),
                merge_op("pv", json!({"o": 1}), by("o", later, Needs::Controller)),
                merge_op("pv", json!({"v": 1}), by("v", later, Needs::Controller)),
                merge_op("pv", json!({"n": 1}), by("n", later, Needs::Controller)),
                merge_op("pv", json!({"z": 1}), by("zz", later, Needs::Controller)),
                merge_op("pv", json!({"x": 1}), by("e", 1, Needs::Controller)),
                merge_op("pv", json!({"b": 2}), by("e", later, Needs::Controller)),
            ],
            usize::MAX,
        )
        .expect("commit");
        let outcome = outcomes(&results);
        assert_eq!(
            outcome,
            [
                "1",
                "2",
                "FORBIDDEN",
                "ACCESS_DENIED",
                "UNKNOWN_USER",
                "TOKEN_EXPIRED",
                "3"
            ]
        );
        set_member(&c, "lib", "e", "VIEWER").expect("downgrade");
        let results = apply_batch(
            &mut c,
            &[
                merge_op("pv", json!({"c": 3}), by("e", later, Needs::Controller)),
                StoreOp {
                    view_id: "pv".into(),
                    change: None,
                    if_match: None,
                    want_row: true,
                    event: None,
                    requester: by("e", later, Needs::Member),
                },
            ],
            usize::MAX,
        )
        .expect("commit");
        assert!(matches!(results[0], Err(Error::Forbidden(_))));
        assert_eq!(results[1].as_ref().expect("a member may read").version, 3);
        remove_member(&c, "lib", "e").expect("remove");
        let results = apply_batch(
            &mut c,
            &[merge_op(
                "pv",
                json!({"d": 4}),
                by("e", later, Needs::Member),
            )],
            usize::MAX,
        )
        .expect("commit");
        assert!(matches!(results[0], Err(Error::AccessDenied)));
        let stored = view(&c, "pv").expect("read").expect("row");
        assert_eq!(stored.version, 3);
        assert_eq!(stored.state.get(), r#"{"a":1,"b":2,"o":1}"#);
    }

    /// SPEC §5: a change that would make the stored state longer than the
    /// cap is refused and changes nothing; the rest of the batch goes on.
    #[test]
    fn the_state_cap_refuses_only_the_change_past_it() {
        let (_dir, db) = fixture();
        let mut c = db.conn().expect("conn");
        let replace = |v: Value| StoreOp {
            change: match v {
                Value::Object(m) => Some(Change::Replace(m)),
                _ => None,
            },
            ..merge_op("pv", json!({}), None)
        };
        let item = |id: &str, v: Value| StoreOp {
            change: match v {
                Value::Object(patch) => Some(Change::Item {
                    item_id: id.into(),
                    patch,
                }),
                _ => None,
            },
            ..merge_op("pv", json!({}), None)
        };
        // {"a":"xxxxxxxxxxxx"} is 20 bytes: exactly the cap.
        let results = apply_batch(
            &mut c,
            &[
                merge_op("pv", json!({"a": "x".repeat(12)}), None),
                merge_op("pv", json!({"b": 1}), None),
                replace(json!({"r": "y".repeat(14)})),
                item("1", json!({})),
                merge_op("pv", json!({"a": "x".repeat(11)}), None),
                merge_op("pv", json!({}), None),
                replace(json!({"r": "y".repeat(12)})),
            ],
            20,
        )
        .expect("commit");
        let outcome = outcomes(&results);
        assert_eq!(
            outcome,
            [
                "1",
                "STATE_TOO_LARGE",
                "STATE_TOO_LARGE",
                "STATE_TOO_LARGE",
                "2",
                "3",
                "4"
            ]
        );
        let stored = view(&c, "pv").expect("read").expect("row");
        assert_eq!(stored.version, 4);
        assert_eq!(
            stored.state.get(),
            format!(r#"{{"r":"{}"}}"#, "y".repeat(12))
        );
        assert_eq!(stored.state.get().len(), 20);
        match &results[1] {
            Err(e) => assert_eq!(
                e.client_message(),
                "state too large: the change would make the state 26 bytes, over the limit of 20"
            ),
            Ok(_) => panic!("refused"),
        }
    }

    /// Writers that share nothing but the file (separate pools, as separate
    /// processes would) still produce gapless versions.
    #[test]
    fn independent_writers_get_gapless_versions() {
        let (dir, db) = fixture();
        drop(db);
        let path = dir.path().join("t.db");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let db = SqliteStore::open(&path, Synchronous::Normal).expect("open");
                    let mut c = db.conn().expect("conn");
                    (0..50)
                        .map(|i| {
                            let mut patch = Map::new();
                            patch.insert(format!("t{t}"), json!(i));
                            let op = StoreOp {
                                view_id: "pv".into(),
                                change: Some(Change::Merge(patch)),
                                if_match: None,
                                want_row: false,
                                event: None,
                                requester: None,
                            };
                            let mut results =
                                apply_batch(&mut c, &[op], usize::MAX).expect("commit");
                            results.remove(0).expect("applied").version
                        })
                        .collect::<Vec<i64>>()
                })
            })
            .collect();
        let mut versions: Vec<i64> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=200).collect::<Vec<i64>>());
        let db = SqliteStore::open(&path, Synchronous::Normal).expect("open");
        let stored = view(&db.conn().expect("conn"), "pv")
            .expect("read")
            .expect("row");
        assert_eq!(stored.version, 200);
        let state: Value = serde_json::from_str(stored.state.get()).expect("json");
        assert_eq!(state, json!({"t0": 49, "t1": 49, "t2": 49, "t3": 49}));
    }
}

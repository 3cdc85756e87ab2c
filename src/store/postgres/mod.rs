//! The PostgreSQL engine (SPEC §1, §8): the pool, the schema, the lookups,
//! the batched state writes across nodes, the administration, and the
//! membership LISTEN. The only folder that names `postgres`/`r2d2_postgres`.
//!
//! It uses the blocking `postgres` client (which drives tokio-postgres on a
//! small runtime of its own per connection) behind an r2d2 pool: the
//! `Store` is blocking and its callers are plain threads (the storage
//! threads, the writer's), so no async bridge is needed.

mod admin;
mod batch;
mod canonical;
mod listen;
mod pool;
mod reads;
mod remove;
mod schema;
#[cfg(test)]
mod test_proxy;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use r2d2::Pool;
use serde_json::{Map, Value};

use crate::domain::access::LibraryRole;
use crate::domain::error::Error;
use crate::store::{
    Access, Admin, Grant, LibraryRow, MemberChange, MemberRow, MembershipChange, Removed, Store,
    StoreOp, Stored, StoredEvent, UserRow, ViewRow, ViewSummary,
};
use batch::{Applied, Results};
use pool::{discard_if_dead, off_runtime, with_conn, Fail, Manager, RETRY_FOR};

/// Tries of one batch (within [`RETRY_FOR`]): three, plus one for each
/// connection the pool may hold that died while idle (after a mass
/// `pg_terminate_backend` each fails its first statement in turn).
const BATCH_ATTEMPTS: u32 = 3 + pool::POOL_SIZE;

/// Batch ids older than this are pruned: an unknown outcome is settled
/// within [`RETRY_FOR`], so minutes are plenty.
const BATCH_IDS_KEPT: &str = "10 minutes";

/// Batches between two prunings of old batch ids.
const PRUNE_EVERY: u64 = 1024;

/// The PostgreSQL engine: a pool of connections to one database.
pub struct PgStore {
    /// `Option` only so that [`Drop`] can move it off an async thread.
    pool: Option<Pool<Manager>>,
    config: postgres::Config,
    batches: AtomicU64,
    /// The LISTEN thread holds a `Weak` of this and ends once it is gone.
    alive: Arc<()>,
    #[cfg(test)]
    fault: std::sync::Mutex<Option<batch::Fault>>,
}

impl PgStore {
    /// Connects (failing within seconds when the database is unreachable)
    /// and applies the schema. `url` is a `postgres://` URL; it is never
    /// logged with its password.
    pub fn open(url: &str) -> Result<PgStore, Error> {
        let config = pool::client_config(url)?;
        off_runtime(|| {
            let pool = pool::build_pool(config.clone())?;
            let mut conn = pool.get()?;
            schema::migrate(&mut conn)?;
            prune_batch_ids(&mut conn)?;
            drop(conn);
            Ok(PgStore {
                pool: Some(pool),
                config,
                batches: AtomicU64::new(0),
                alive: Arc::new(()),
                #[cfg(test)]
                fault: std::sync::Mutex::new(None),
            })
        })
    }

    fn pool(&self) -> &Pool<Manager> {
        self.pool.as_ref().expect("the pool lives until drop")
    }

    fn with<T: Send>(
        &self,
        mut work: impl FnMut(&mut postgres::Client) -> Result<T, Fail> + Send,
    ) -> Result<T, Error> {
        with_conn(self.pool(), |conn| work(conn))
    }

    /// The batch's attempts: a lost connection (before or at COMMIT) is
    /// followed by another attempt on a fresh connection, which first
    /// settles whether the lost one committed (batch.rs). Gives up with
    /// `Error::Storage` (nothing acknowledged) after [`BATCH_ATTEMPTS`] or
    /// [`RETRY_FOR`].
    fn apply_with_retries(
        &self,
        ops: &[StoreOp],
        max_state_bytes: usize,
    ) -> Result<Results, Error> {
        let batch_id = new_batch_id()?;
        let start = Instant::now();
        let mut uncertain: Option<Results> = None;
        let mut cause = String::new();
        for tries in 0..BATCH_ATTEMPTS {
            if tries > 0 {
                if start.elapsed() > RETRY_FOR {
                    break;
                }
                log::warn!("batch {batch_id}: connection lost ({cause}); trying again");
                pool::pause(tries);
            }
            let mut conn = match self.pool().get() {
                Ok(conn) => conn,
                Err(e) => {
                    cause = format!("pool: {e}");
                    continue;
                }
            };
            #[cfg(test)]
            let fault = self.fault.lock().map(|mut f| f.take()).unwrap_or(None);
            let outcome = batch::attempt(
                &mut conn,
                &batch_id,
                ops,
                max_state_bytes,
                &mut uncertain,
                #[cfg(test)]
                fault,
            );
            match outcome {
                Ok(Applied::Now(results)) | Ok(Applied::Earlier(results)) => {
                    self.after_batch(&mut conn);
                    return Ok(results);
                }
                Err(Fail::Err(e)) => return Err(e),
                Err(Fail::Retry(why)) => {
                    discard_if_dead(&mut conn);
                    cause = why;
                }
            }
        }
        if uncertain.is_some() {
            log::error!(
                "batch {batch_id}: outcome unknown after {BATCH_ATTEMPTS} attempts ({cause}); \
                 answered as not committed"
            );
        }
        Err(Error::Storage(format!("batch not committed: {cause}")))
    }

    /// Every [`PRUNE_EVERY`] batches, old batch ids go (one indexed delete).
    fn after_batch(&self, conn: &mut postgres::Client) {
        if self.batches.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            if let Err(e) = prune_batch_ids(conn) {
                e.log("pruning old batch ids");
            }
        }
    }

    /// The next batch fails as a test asks.
    #[cfg(test)]
    fn inject(&self, fault: batch::Fault) {
        if let Ok(mut slot) = self.fault.lock() {
            *slot = Some(fault);
        }
    }
}

/// Dropping pooled clients runs their runtime's `block_on`: off an async
/// thread (a test dropping its server), the pool goes on a thread of its own.
impl Drop for PgStore {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(pool));
        }
    }
}

fn prune_batch_ids(conn: &mut postgres::Client) -> Result<(), Error> {
    conn.execute(
        &format!("DELETE FROM portal_batches WHERE at < now() - interval '{BATCH_IDS_KEPT}'"),
        &[],
    )?;
    Ok(())
}

/// 128 random bits, hex.
fn new_batch_id() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("random batch id: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Store for PgStore {
    fn access(&self, user_id: &str, view_id: &str) -> Result<Access, Error> {
        with_conn(self.pool(), |c| reads::access(c, user_id, view_id))
    }

    fn grant(&self, user_id: &str, view_id: &str) -> Result<Grant, Error> {
        with_conn(self.pool(), |c| reads::grant(c, user_id, view_id))
    }

    fn view(&self, view_id: &str) -> Result<Option<ViewRow>, Error> {
        self.with(|c| reads::view(c, view_id))
    }

    fn apply_batch(
        &self,
        ops: &[StoreOp],
        max_state_bytes: usize,
    ) -> Result<Vec<Result<Stored, Error>>, Error> {
        off_runtime(|| self.apply_with_retries(ops, max_state_bytes))
    }

    fn events_between(&self, view_id: &str, from: i64, to: i64) -> Result<Vec<StoredEvent>, Error> {
        self.with(|c| reads::events_between(c, view_id, from, to))
    }

    fn versions(&self, view_ids: &[String]) -> Result<Vec<(String, i64)>, Error> {
        self.with(|c| reads::versions(c, view_ids))
    }

    fn membership_changes_start(&self) -> Result<i64, Error> {
        self.with(reads::membership_changes_start)
    }

    fn membership_changes_since(&self, seq: i64) -> Result<Vec<MembershipChange>, Error> {
        self.with(|c| reads::membership_changes_since(c, seq))
    }

    fn change_member(
        &self,
        caller: &str,
        library_id: &str,
        user_id: &str,
        change: &MemberChange,
        apply: bool,
    ) -> Result<Option<String>, Error> {
        self.with(|c| admin::change_member(c, caller, library_id, user_id, change, apply))
    }

    /// A real query on a pooled connection: fails (→ `/health` 503) within
    /// the pool's connect timeout while the database is unreachable.
    fn ping(&self) -> Result<(), Error> {
        self.with(|c| {
            c.query_typed("SELECT 1 FROM portal_views LIMIT 1", &[])?;
            Ok(())
        })
    }

    fn watch_membership(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        if let Err(e) = listen::spawn(self.config.clone(), wake, Arc::downgrade(&self.alive)) {
            log::error!("cannot start the membership LISTEN thread ({e}); polling only");
        }
    }

    fn admin(&self) -> &dyn Admin {
        self
    }
}

impl Admin for PgStore {
    fn add_user(&self, id: &str, email: &str, name: &str) -> Result<(), Error> {
        self.with(|c| admin::add_user(c, id, email, name))
    }

    fn add_library(&self, id: &str, name: &str, owner_id: &str) -> Result<(), Error> {
        self.with(|c| admin::add_library(c, id, name, owner_id))
    }

    fn set_member(
        &self,
        library_id: &str,
        user_id: &str,
        role: LibraryRole,
    ) -> Result<Option<String>, Error> {
        self.with(|c| admin::set_member(c, library_id, user_id, role.as_str()))
    }

    fn member_role(&self, library_id: &str, user_id: &str) -> Result<Option<String>, Error> {
        self.with(|c| admin::member_role(c, library_id, user_id))
    }

    fn remove_member(&self, library_id: &str, user_id: &str) -> Result<bool, Error> {
        self.with(|c| admin::remove_member(c, library_id, user_id))
    }

    fn add_view(
        &self,
        id: &str,
        library_id: &str,
        name: &str,
        state: &Map<String, Value>,
    ) -> Result<(), Error> {
        self.with(|c| admin::add_view(c, id, library_id, name, state))
    }

    fn user_exists(&self, user_id: &str) -> Result<bool, Error> {
        self.with(|c| reads::user_exists(c, user_id))
    }

    fn user(&self, user_id: &str) -> Result<Option<UserRow>, Error> {
        self.with(|c| admin::user(c, user_id))
    }

    fn library(&self, library_id: &str) -> Result<Option<LibraryRow>, Error> {
        self.with(|c| admin::library(c, library_id))
    }

    fn remove_user(&self, user_id: &str, cascade: bool) -> Result<Removed, Error> {
        self.with(|c| remove::remove_user(c, user_id, cascade))
    }

    fn remove_library(&self, library_id: &str, cascade: bool) -> Result<Removed, Error> {
        self.with(|c| remove::remove_library(c, library_id, cascade))
    }

    fn remove_view(&self, view_id: &str) -> Result<Removed, Error> {
        self.with(|c| remove::remove_view(c, view_id))
    }

    fn users(&self) -> Result<Vec<UserRow>, Error> {
        self.with(admin::users)
    }

    fn libraries(&self) -> Result<Vec<LibraryRow>, Error> {
        self.with(admin::libraries)
    }

    fn members(&self, library_id: &str) -> Result<Vec<MemberRow>, Error> {
        self.with(|c| admin::members(c, library_id))
    }

    fn views(&self) -> Result<Vec<ViewSummary>, Error> {
        self.with(admin::views)
    }
}

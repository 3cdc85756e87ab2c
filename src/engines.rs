//! The one place that picks the engines: the store from `--db` (a
//! `postgres://` URL is PostgreSQL, anything else a SQLite file), the broker
//! from `--redis-url`.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::broker::local::Local;
use crate::broker::redis::Redis;
use crate::config::{Config, Database, Synchronous};
use crate::core::broker::Broker;
use crate::core::context::Core;
use crate::domain::error::Error;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Storage, Store};

/// Opens the store `--db` names, for blocking callers (the CLI, tests): a
/// `postgres://` URL or a SQLite path ([`Database::parse`]).
pub fn open(db: &Path, synchronous: Synchronous) -> Result<Arc<dyn Store>, Error> {
    open_db(&Database::parse(db), synchronous)
}

/// Opens the given store. `synchronous` is SQLite's; PostgreSQL commits are
/// as durable as the server's own `synchronous_commit` makes them.
pub fn open_db(db: &Database, synchronous: Synchronous) -> Result<Arc<dyn Store>, Error> {
    Ok(match db {
        Database::Sqlite(path) => Arc::new(SqliteStore::open(path, synchronous)?),
        Database::Postgres(url) => Arc::new(PgStore::open(url)?),
    })
}

/// Opens the configured store (blocking, so off the async threads) and its
/// storage threads.
pub async fn open_store(config: &Config) -> Result<Storage, Error> {
    let db = config.db.clone();
    // Display hides a URL's password.
    log::info!("database: {db}");
    let sync = config.sqlite_synchronous;
    let store = tokio::task::spawn_blocking(move || open_db(&db, sync))
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))??;
    Storage::start(store)
}

/// Opens the engines and starts the live server on them.
pub(crate) async fn start(config: Config, shutdown: watch::Receiver<bool>) -> Result<Core, Error> {
    let store = open_store(&config).await?;
    let parts = Core::prepare(config, store, shutdown)?;
    let broker: Arc<dyn Broker> = match &parts.config.redis_url {
        Some(url) => Redis::start(url, &parts)?,
        None => Arc::new(Local::new(&parts)),
    };
    Core::start(parts, broker)
}

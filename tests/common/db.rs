//! The database a test runs on: a temp SQLite file, or, when
//! `PORTAL_TEST_PG_URL` names a PostgreSQL server (its admin URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`), a database of its own,
//! copied from a seeded template and dropped when the test ends.
//!
//! One template per test process (`pt_<pid>_tpl`), made on first use: the
//! schema applied by the server's own engine and the fixture seeded, so a
//! test's database costs one `CREATE DATABASE … TEMPLATE` (~75 ms). Databases
//! left by a process that died (a killed `cargo test`) are dropped by the next
//! process that starts, found by the pid in their name.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use portal_sync::config::{Database, Synchronous};
use portal_sync::store::Store;

/// Which engine this test run uses.
pub fn pg_admin_url() -> Option<String> {
    std::env::var("PORTAL_TEST_PG_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

pub fn on_postgres() -> bool {
    pg_admin_url().is_some()
}

/// Skips the rest of a test that only means something on SQLite (the file
/// itself: its mode, its deletion), saying so.
#[macro_export]
macro_rules! sqlite_only {
    () => {
        if $crate::common::db::on_postgres() {
            eprintln!("skipped on PostgreSQL: this test is about the SQLite file");
            return;
        }
    };
}

/// A test's database; dropping the last handle drops a PostgreSQL database.
pub enum TestDb {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        /// The URL the server and the CLI are given (`--db`).
        url: String,
        name: String,
    },
}

impl TestDb {
    /// A fresh database holding the fixture of `super::seed`. `dir` is the
    /// test's temp directory (the SQLite file goes there).
    pub fn seeded(dir: &Path) -> Arc<TestDb> {
        match pg_admin_url() {
            None => {
                let path = dir.join("portal.db");
                let store = open(&Database::Sqlite(path.clone()));
                super::seed(&*store);
                Arc::new(TestDb::Sqlite { path })
            }
            Some(admin) => {
                let template = template(&admin);
                Arc::new(create_database(&admin, Some(template)))
            }
        }
    }

    /// A fresh database with nothing in it (not even the schema): for tests
    /// that start the binary on a database of their own.
    pub fn empty(dir: &Path, file: &str) -> Arc<TestDb> {
        match pg_admin_url() {
            None => Arc::new(TestDb::Sqlite {
                path: dir.join(file),
            }),
            Some(admin) => Arc::new(create_database(&admin, None)),
        }
    }

    /// What `--db` / `PORTAL_DB` is given.
    pub fn arg(&self) -> String {
        match self {
            TestDb::Sqlite { path } => path.to_str().expect("utf-8 path").to_string(),
            TestDb::Postgres { url, .. } => url.clone(),
        }
    }

    pub fn database(&self) -> Database {
        match self {
            TestDb::Sqlite { path } => Database::Sqlite(path.clone()),
            TestDb::Postgres { url, .. } => Database::Postgres(url.clone()),
        }
    }

    /// The server's own engine on this database, as the CLI opens it.
    pub fn open(&self) -> Arc<dyn Store> {
        open(&self.database())
    }

    /// The SQLite file; panics on PostgreSQL (guard with `sqlite_only!`).
    pub fn sqlite_path(&self) -> &Path {
        match self {
            TestDb::Sqlite { path } => path,
            TestDb::Postgres { .. } => panic!("a SQLite-only test ran on PostgreSQL"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (TestDb::Postgres { name, .. }, Some(admin)) = (&*self, pg_admin_url()) {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            // The sync client runs a runtime of its own, which cannot start
            // on a thread that is inside the test's runtime.
            let _ = std::thread::spawn(move || {
                if let Err(e) = admin_client(&admin).batch_execute(&sql) {
                    eprintln!("dropping a test database: {e}");
                }
            })
            .join();
        }
    }
}

fn open(database: &Database) -> Arc<dyn Store> {
    let database = database.clone();
    std::thread::spawn(move || {
        portal_sync::engines::open_db(&database, Synchronous::Normal).expect("open db")
    })
    .join()
    .expect("opening thread")
}

/// Runs `f` on a thread of its own (see [`TestDb`]'s `Drop`).
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("database admin thread")
}

fn admin_client(admin: &str) -> postgres::Client {
    postgres::Client::connect(admin, postgres::NoTls).expect("connect to PORTAL_TEST_PG_URL")
}

/// `admin` with its database name replaced.
fn url_for(admin: &str, db: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);
static TEMPLATE: OnceLock<String> = OnceLock::new();
/// `CREATE DATABASE … TEMPLATE` fails if another copy of the same template
/// is being made at that moment; one at a time per process.
static COPYING: Mutex<()> = Mutex::new(());

fn prefix() -> String {
    format!("pt_{}_", std::process::id())
}

fn create_database(admin: &str, template: Option<&str>) -> TestDb {
    let name = format!("{}{}", prefix(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let sql = match template {
        Some(t) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\""),
        None => format!("CREATE DATABASE \"{name}\""),
    };
    let admin_url = admin.to_string();
    off_runtime(move || {
        let _one = COPYING.lock().unwrap_or_else(|e| e.into_inner());
        admin_client(&admin_url)
            .batch_execute(&sql)
            .expect("create a test database");
    });
    TestDb::Postgres {
        url: url_for(admin, &name),
        name,
    }
}

/// The seeded template of this process, made on first use.
fn template(admin: &str) -> &'static str {
    TEMPLATE.get_or_init(|| {
        let admin = admin.to_string();
        off_runtime(move || {
            let mut client = admin_client(&admin);
            drop_leftovers(&mut client);
            let name = format!("{}tpl", prefix());
            client
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .expect("create the template database");
            {
                let store = portal_sync::engines::open_db(
                    &Database::Postgres(url_for(&admin, &name)),
                    Synchronous::Normal,
                )
                .expect("open the template");
                super::seed(&*store);
                // Dropped here: no session may be connected to a template
                // while it is copied.
            }
            // The engine's background connections (its LISTEN thread) may
            // take a moment to go; copying waits for none of them.
            client
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ))
                .expect("disconnect the template");
            name
        })
    })
}

/// Drops the test databases of processes that are no longer running.
fn drop_leftovers(client: &mut postgres::Client) {
    let rows = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'pt\\_%'",
            &[],
        )
        .expect("list databases");
    for row in rows {
        let name: String = row.get(0);
        let pid = name
            .strip_prefix("pt_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
            }
        }
    }
}

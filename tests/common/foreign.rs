//! Another tool writing the database (SPEC §1 and §8: other tools read and
//! write these tables): the one test helper that speaks SQL, through a
//! connection of its own, for what the server's own store must not offer:
//! corrupting a state, renaming a table away, deleting a row behind the
//! server's back, and reading rows exactly as stored. Each helper works on
//! both engines: a `sqlite3` shell on the file, or `psql` on the database.

use std::time::Duration;

use rusqlite::{params, Connection};

use super::db::TestDb;

/// A connection of its own, as a separate process would open the file; it
/// waits for the server's writes as they wait for each other.
fn sqlite(db: &TestDb) -> Connection {
    let c = Connection::open(db.sqlite_path()).expect("another tool opens the database");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    c
}

/// Runs `f` on a `psql`-like connection of its own, off the test's runtime
/// (the sync client runs a runtime of its own).
pub fn psql<T: Send + 'static>(
    db: &TestDb,
    f: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
) -> T {
    let TestDb::Postgres { url, .. } = db else {
        panic!("psql on a SQLite test database")
    };
    let url = url.clone();
    std::thread::spawn(move || {
        let mut client =
            postgres::Client::connect(&url, postgres::NoTls).expect("another tool connects");
        f(&mut client)
    })
    .join()
    .expect("psql thread")
}

/// Overwrites a view's stored state with anything, valid JSON or not. A
/// `JSONB` column cannot hold text that is not JSON, so on PostgreSQL such
/// text is stored as a JSON string: still not the object a state must be.
pub fn write_state(db: &TestDb, view: &str, state: &str) {
    write(db, view, state, None);
}

/// Overwrites a view's stored state and its version.
pub fn write_state_and_version(db: &TestDb, view: &str, state: &str, version: i64) {
    write(db, view, state, Some(version));
}

fn write(db: &TestDb, view: &str, state: &str, version: Option<i64>) {
    let changed = match db {
        TestDb::Sqlite { .. } => sqlite(db)
            .execute(
                "UPDATE portal_views SET state = ?1, version = coalesce(?2, version) WHERE id = ?3",
                params![state, version, view],
            )
            .expect("write state"),
        TestDb::Postgres { .. } => {
            let (state, view) = (state.to_string(), view.to_string());
            psql(db, move |c| {
                let json = match serde_json::from_str::<serde_json::Value>(&state) {
                    Ok(v) => v,
                    Err(_) => serde_json::Value::String(state),
                };
                c.execute(
                    "UPDATE portal_views SET state = $1, version = coalesce($2, version) WHERE id = $3",
                    &[&json, &version, &view],
                )
                .expect("write state") as usize
            })
        }
    };
    assert_eq!(changed, 1, "view {view} exists");
}

/// What [`raw_state`] reads back after [`write_state`] wrote `text` that is
/// not JSON.
pub fn as_stored(db: &TestDb, text: &str) -> String {
    match db {
        TestDb::Sqlite { .. } => text.to_string(),
        TestDb::Postgres { .. } => serde_json::Value::String(text.into()).to_string(),
    }
}

/// A view's state text and version exactly as stored (the server's own read
/// refuses a state that is not a JSON object).
pub fn raw_state(db: &TestDb, view: &str) -> (String, i64) {
    match db {
        TestDb::Sqlite { .. } => sqlite(db)
            .query_row(
                "SELECT state, version FROM portal_views WHERE id = ?1",
                [view],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("view row"),
        TestDb::Postgres { .. } => {
            let view = view.to_string();
            psql(db, move |c| {
                let row = c
                    .query_one(
                        "SELECT state::text, version FROM portal_views WHERE id = $1",
                        &[&view],
                    )
                    .expect("view row");
                (row.get(0), row.get(1))
            })
        }
    }
}

/// Runs one statement that takes no parameters, on either engine.
fn execute(db: &TestDb, sql: String) {
    match db {
        TestDb::Sqlite { .. } => sqlite(db).execute_batch(&sql).expect(&sql),
        TestDb::Postgres { .. } => psql(db, move |c| c.batch_execute(&sql).expect(&sql)),
    }
}

/// Deletes a view's row.
pub fn delete_view(db: &TestDb, view: &str) {
    assert!(view.chars().all(|c| c.is_ascii_alphanumeric()));
    execute(db, format!("DELETE FROM portal_views WHERE id = '{view}'"));
}

/// Renames a table: with `portal_views` away, every storage call that needs
/// it fails, as storage that stopped working would.
pub fn rename_table(db: &TestDb, from: &str, to: &str) {
    execute(db, format!("ALTER TABLE \"{from}\" RENAME TO \"{to}\";"));
}

/// Every table (the engine's own catalog left out) with its row count, by name.
pub fn table_counts(db: &TestDb) -> Vec<(String, i64)> {
    match db {
        TestDb::Sqlite { .. } => {
            let c = sqlite(db);
            let mut names: Vec<String> = c
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .expect("prepare")
                .query_map([], |r| r.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("names");
            names.retain(|t| !t.starts_with("sqlite_"));
            names
                .into_iter()
                .map(|table| {
                    let count = c
                        .query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| {
                            r.get(0)
                        })
                        .expect("count");
                    (table, count)
                })
                .collect()
        }
        TestDb::Postgres { .. } => psql(db, |c| {
            let names: Vec<String> = c
                .query(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = 'public' AND table_type = 'BASE TABLE' \
                     ORDER BY table_name",
                    &[],
                )
                .expect("tables")
                .iter()
                .map(|r| r.get(0))
                .collect();
            names
                .into_iter()
                .map(|table| {
                    let count: i64 = c
                        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
                        .expect("count")
                        .get(0);
                    (table, count)
                })
                .collect()
        }),
    }
}

//! Another tool writing the SQLite file (SPEC §1: other tools read and write
//! these tables): the one test helper that speaks SQL, through a connection
//! of its own, for what the server's own store must not offer: corrupting a
//! state, renaming a table away, deleting a row behind the server's back,
//! and reading rows exactly as stored.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

/// A connection of its own, as a separate process would open the file; it
/// waits for the server's writes as they wait for each other.
fn open(path: &Path) -> Connection {
    let c = Connection::open(path).expect("another tool opens the database");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    c
}

/// Overwrites a view's stored state text with anything, valid JSON or not.
pub fn write_state(path: &Path, view: &str, state: &str) {
    let changed = open(path)
        .execute(
            "UPDATE portal_views SET state = ?1 WHERE id = ?2",
            params![state, view],
        )
        .expect("write state");
    assert_eq!(changed, 1, "view {view} exists");
}

/// Overwrites a view's stored state text and its version.
pub fn write_state_and_version(path: &Path, view: &str, state: &str, version: i64) {
    let changed = open(path)
        .execute(
            "UPDATE portal_views SET state = ?1, version = ?2 WHERE id = ?3",
            params![state, version, view],
        )
        .expect("write state and version");
    assert_eq!(changed, 1, "view {view} exists");
}

/// A view's state text and version exactly as stored (the server's own read
/// refuses a state that is not a JSON object).
pub fn raw_state(path: &Path, view: &str) -> (String, i64) {
    open(path)
        .query_row(
            "SELECT state, version FROM portal_views WHERE id = ?1",
            [view],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("view row")
}

/// Deletes a view's row.
pub fn delete_view(path: &Path, view: &str) {
    open(path)
        .execute("DELETE FROM portal_views WHERE id = ?1", [view])
        .expect("delete view");
}

/// Renames a table: with `portal_views` away, every storage call that needs
/// it fails, as storage that stopped working would.
pub fn rename_table(path: &Path, from: &str, to: &str) {
    open(path)
        .execute_batch(&format!("ALTER TABLE \"{from}\" RENAME TO \"{to}\";"))
        .expect("rename table");
}

/// Every table (SQLite's own left out) with its row count, by name.
pub fn table_counts(path: &Path) -> Vec<(String, i64)> {
    let c = open(path);
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

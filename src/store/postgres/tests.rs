//! The engine's own tests, against a real PostgreSQL: each test gets a fresh
//! database (created from `PORTAL_TEST_PG_URL`, the admin URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`, and dropped after). Without
//! that variable every test here prints a notice and passes vacuously.

use std::time::Duration;

use postgres::NoTls;
use serde_json::json;

use super::*;
use crate::domain::access::{Needs, Requester};
use crate::domain::merge::Change;
use crate::domain::model::Role;

/// A database of its own, dropped (`WITH (FORCE)`) with this.
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    fn new() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("PORTAL_TEST_PG_URL") else {
            eprintln!("PORTAL_TEST_PG_URL is unset: skipping this PostgreSQL test");
            return None;
        };
        let name = format!("pgt_{}", new_batch_id().expect("random")[..16].to_owned());
        let mut admin = postgres::Client::connect(&admin_url, NoTls).expect("admin connection");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url.as_str(), String::new()),
        };
        let (server, _) = base.rsplit_once('/').expect("a URL with a database");
        let url = format!("{server}/{name}{query}");
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, NoTls).expect("connect")
    }

    fn open(&self) -> PgStore {
        PgStore::open(&self.url).expect("open")
    }

    /// Opens the engine on the SQLite fixture's rows: users o, v, n; library
    /// lib owned by o with v a VIEWER; views pv (and pw) in lib.
    fn seeded(&self) -> PgStore {
        let db = self.open();
        let a = db.admin();
        for id in ["o", "v", "n"] {
            a.add_user(id, &format!("{id}@x"), id).expect("user");
        }
        a.add_library("lib", "L", "o").expect("lib");
        a.set_member("lib", "v", LibraryRole::Viewer)
            .expect("member");
        a.add_view("pv", "lib", "P", &Map::new()).expect("view");
        a.add_view("pw", "lib", "W", &Map::new()).expect("view");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn merge(v: Value) -> Option<Change> {
    match v {
        Value::Object(m) => Some(Change::Merge(m)),
        _ => None,
    }
}

fn op(view: &str, change: Value) -> StoreOp {
    StoreOp {
        view_id: view.into(),
        change: merge(change),
        if_match: None,
        want_row: false,
        event: None,
        requester: None,
    }
}

fn versions_of(results: &[Result<Stored, Error>]) -> Vec<Option<i64>> {
    results
        .iter()
        .map(|r| r.as_ref().ok().map(|s| s.version))
        .collect()
}

#[test]
fn schema_twice_and_access_follows_spec_order() {
    let Some(t) = TestDb::new() else { return };
    drop(t.seeded());
    let db = t.open(); // the schema again, on a database that has it
    assert_eq!(db.access("o", "pv").expect("owner").role, Role::Controller);
    assert_eq!(db.access("v", "pv").expect("viewer").role, Role::Viewer);
    assert!(matches!(db.access("zz", "nope"), Err(Error::UnknownUser)));
    assert!(matches!(db.access("n", "nope"), Err(Error::ViewNotFound)));
    assert!(matches!(db.access("n", "pv"), Err(Error::AccessDenied)));
    assert!(matches!(db.access("n", "../x"), Err(Error::ViewNotFound)));
    let grant = db.grant("v", "pv").expect("grant");
    assert_eq!(
        (grant.role, grant.library_id.as_str(), grant.version),
        (Role::Viewer, "lib", 0)
    );
    db.ping().expect("ping");
}

#[test]
fn batch_versions_are_gapless_per_op_and_rows_read_back_alike() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    let mut ops = vec![
        op("pv", json!({"b": 1, "a": {"z": 1, "y": [1, 2.5]}})),
        op("nope", json!({"a": 1})),
        op("pv", json!({"b": 2})),
        op("pv", json!({"a": null, "ccc": "x", "d": 1})),
    ];
    ops[2].if_match = Some(vec![0]);
    ops[3].if_match = Some(vec![1]);
    ops[3].want_row = true;
    let results = db.apply_batch(&ops, 1 << 20).expect("batch");
    assert_eq!(versions_of(&results), [Some(1), None, None, Some(2)]);
    assert!(matches!(results[1], Err(Error::ViewNotFound)));
    assert!(matches!(
        results[2],
        Err(Error::PreconditionFailed { current: 1 })
    ));
    let row = results[3].as_ref().expect("ok").row.clone().expect("row");
    assert_eq!(row.state.get(), r#"{"b":1,"ccc":"x","d":1}"#);
    // The stored row reads back with the same text and time as the batch's.
    let stored = db.view("pv").expect("read").expect("row");
    assert_eq!(stored.state.get(), row.state.get());
    assert_eq!(stored.version, 2);
    assert_eq!(stored.updated_at, row.updated_at);
    let at = stored.updated_at.expect("updated_at");
    assert_eq!(at.len(), "2026-01-01T00:00:00.000Z".len(), "{at}");
    assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
    assert_eq!(
        db.versions(&["pw".into(), "nope".into(), "pv".into()])
            .expect("versions"),
        [("pw".to_string(), 0), ("pv".to_string(), 2)]
    );
}

#[test]
fn a_revoked_requester_and_a_too_large_state_are_refused_in_the_batch() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    let requester = |user: &str| Requester {
        user_id: user.into(),
        needs: Needs::Controller,
        expires_at: u64::MAX,
    };
    let mut ops = vec![
        op("pv", json!({"a": 1})),
        op("pv", json!({"a": 2})),
        op("pv", json!({"big": "x".repeat(100)})),
    ];
    ops[0].requester = Some(requester("o"));
    ops[1].requester = Some(requester("v"));
    let results = db.apply_batch(&ops, 64).expect("batch");
    assert_eq!(versions_of(&results), [Some(1), None, None]);
    assert!(
        matches!(results[1], Err(Error::Forbidden(_))),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Err(Error::StateTooLarge { .. })));
}

/// SPEC §1: the server runs on tables another tool made with exactly SPEC's
/// columns (PostgreSQL types), and adds what it needs itself.
#[test]
fn schema_on_tables_another_tool_made() {
    let Some(t) = TestDb::new() else { return };
    t.client()
        .batch_execute(
            "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE NOT NULL, name TEXT NOT NULL);
             CREATE TABLE libraries (id TEXT PRIMARY KEY, name TEXT NOT NULL,
                 owner_id TEXT NOT NULL REFERENCES users(id));
             CREATE TABLE library_members (library_id TEXT REFERENCES libraries(id),
                 user_id TEXT REFERENCES users(id),
                 role TEXT NOT NULL CHECK (role IN ('OWNER','EDITOR','VIEWER')),
                 PRIMARY KEY (library_id, user_id));
             CREATE TABLE portal_views (id TEXT PRIMARY KEY,
                 library_id TEXT NOT NULL REFERENCES libraries(id), name TEXT NOT NULL,
                 state JSONB NOT NULL DEFAULT '{}', version BIGINT, updated_at TIMESTAMPTZ);
             INSERT INTO users VALUES ('o', 'o@x', 'O');
             INSERT INTO libraries VALUES ('lib', 'L', 'o');
             INSERT INTO portal_views (id, library_id, name, version)
                 VALUES ('pv', 'lib', 'P', 0);",
        )
        .expect("another tool's tables");
    let db = t.open();
    let results = db
        .apply_batch(&[op("pv", json!({"a": 1}))], 1 << 20)
        .expect("batch");
    assert_eq!(versions_of(&results), [Some(1)]);
    let row = db.view("pv").expect("read").expect("row");
    assert_eq!((row.state.get(), row.version), (r#"{"a":1}"#, 1));
    db.admin()
        .set_member("lib", "o", LibraryRole::Editor)
        .expect("member");
    db.admin().remove_member("lib", "o").expect("remove");
    assert_eq!(db.membership_changes_since(0).expect("log").len(), 1);
}

/// Not a test of the engine: keeps the helper's waits in one place.
#[allow(dead_code)]
const WAIT: Duration = Duration::from_secs(1);

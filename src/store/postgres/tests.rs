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

    /// This database's URL through `proxy`.
    fn url_via(&self, proxy: &super::test_proxy::Proxy) -> String {
        format!("postgres://postgres@{}/{}", proxy.addr, self.name)
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

fn event_op(view: &str, change: Value) -> StoreOp {
    let mut op = op(view, change);
    op.event = Some(crate::store::EventTemplate {
        render: Box::new(|v| format!("event {v}")),
        node: "n1".into(),
        conn: Some(7),
    });
    op
}

/// Two store instances (two nodes) and two threads on each commit 1,000
/// changes to one view at once: every version from 1 to 1,000 is stored
/// exactly once, and the stored state is the replay of the changes.
#[test]
fn concurrent_nodes_commit_gapless_versions() {
    let Some(t) = TestDb::new() else { return };
    let first = Arc::new(t.seeded());
    let second = Arc::new(t.open());
    const EACH: usize = 250;
    let mut threads = Vec::new();
    for (n, db) in [&first, &first, &second, &second].into_iter().enumerate() {
        let db = Arc::clone(db);
        threads.push(std::thread::spawn(move || {
            let mut mine = Vec::new();
            for i in 0..EACH {
                let key = format!("w{n}");
                let results = db
                    .apply_batch(&[event_op("pv", json!({ key: i }))], 1 << 20)
                    .expect("batch");
                mine.push(results[0].as_ref().expect("applied").version);
            }
            mine
        }));
    }
    let mut all: Vec<i64> = threads
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=4 * EACH as i64).collect::<Vec<_>>());
    let row = first.view("pv").expect("read").expect("row");
    assert_eq!(row.version, 4 * EACH as i64);
    let last = (EACH - 1) as i64;
    assert_eq!(
        serde_json::from_str::<Value>(row.state.get()).expect("json"),
        json!({"w0": last, "w1": last, "w2": last, "w3": last})
    );
    let events = second
        .events_between("pv", 1, 4 * EACH as i64)
        .expect("events");
    let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=4 * EACH as i64).collect::<Vec<_>>());
    assert_eq!(
        (
            events[9].message.as_str(),
            events[9].node.as_str(),
            events[9].conn
        ),
        ("event 10", "n1", Some(7))
    );
    assert_eq!(
        second.events_between("pv", 5, 7).expect("range").len(),
        3,
        "a per-view version range"
    );
}

/// Batches over {pv, pw} and {pw, pv} on two nodes at once: views are locked
/// in id order, so neither deadlocks (PostgreSQL would abort one with
/// `deadlock detected`, which would surface here as an error or a retry).
#[test]
fn views_are_locked_in_sorted_order_so_crossed_batches_never_deadlock() {
    let Some(t) = TestDb::new() else { return };
    let first = Arc::new(t.seeded());
    let second = Arc::new(t.open());
    let crossed = |db: Arc<PgStore>, order: [&'static str; 2]| {
        std::thread::spawn(move || {
            for i in 0..100 {
                let ops = [
                    op(order[0], json!({ "i": i })),
                    op(order[1], json!({ "i": i })),
                ];
                let results = db.apply_batch(&ops, 1 << 20).expect("no deadlock");
                assert!(results.iter().all(Result::is_ok), "{results:?}");
            }
        })
    };
    let a = crossed(first.clone(), ["pv", "pw"]);
    let b = crossed(second.clone(), ["pw", "pv"]);
    a.join().expect("a");
    b.join().expect("b");
    let v = first
        .versions(&["pv".into(), "pw".into()])
        .expect("versions");
    assert_eq!(v, [("pv".to_string(), 200), ("pw".to_string(), 200)]);
    let deadlocks: i64 = t
        .client()
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .expect("stats")
        .get(0);
    assert_eq!(deadlocks, 0);
}

/// The backend dies just before COMMIT: the batch is retried on a fresh
/// connection and applied exactly once.
#[test]
fn a_connection_killed_before_commit_applies_the_batch_once() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    db.inject(batch::Fault::KillBeforeCommit);
    let results = db
        .apply_batch(&[event_op("pv", json!({"a": 1}))], 1 << 20)
        .expect("retried");
    assert_eq!(versions_of(&results), [Some(1)]);
    let row = db.view("pv").expect("read").expect("row");
    assert_eq!((row.version, row.state.get()), (1, r#"{"a":1}"#));
    assert_eq!(db.events_between("pv", 0, 10).expect("events").len(), 1);
}

/// COMMIT succeeds and its answer is lost: the retry finds the batch id,
/// returns the first attempt's results, and applies nothing again.
#[test]
fn a_commit_whose_answer_is_lost_is_not_applied_twice() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    db.inject(batch::Fault::LoseCommitReply);
    let mut ops = vec![event_op("pv", json!({"a": 1}))];
    ops[0].want_row = true;
    let results = db.apply_batch(&ops, 1 << 20).expect("settled");
    assert_eq!(versions_of(&results), [Some(1)]);
    let row = db.view("pv").expect("read").expect("row");
    assert_eq!((row.version, row.state.get()), (1, r#"{"a":1}"#));
    let ids: i64 = t
        .client()
        .query_one("SELECT count(*) FROM portal_batches", &[])
        .expect("count")
        .get(0);
    assert_eq!(ids, 1);
    // And the next batch goes on from there.
    let results = db
        .apply_batch(&[op("pv", json!({"b": 2}))], 1 << 20)
        .expect("next");
    assert_eq!(versions_of(&results), [Some(2)]);
}

/// Every connection of the pool killed between batches: the next calls
/// notice, take fresh connections, and succeed.
#[test]
fn connections_killed_between_batches_are_replaced() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    // Several connections in the pool, then all of them killed.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| db.view("pv").expect("read"));
        }
    });
    let killed: i64 = t
        .client()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .expect("kill")
        .get(0);
    assert!(killed >= 1, "{killed}");
    std::thread::sleep(Duration::from_millis(100));
    let results = db
        .apply_batch(&[op("pv", json!({"a": 1}))], 1 << 20)
        .expect("batch");
    assert_eq!(versions_of(&results), [Some(1)]);
    assert_eq!(db.view("pv").expect("read").expect("row").version, 1);
    db.ping().expect("ping");
}

/// A membership change made with plain SQL (psql, another tool) is in the
/// change log and wakes the LISTEN within a second.
#[test]
fn a_membership_change_by_sql_is_logged_and_wakes_the_listener() {
    let Some(t) = TestDb::new() else { return };
    let db = t.seeded();
    let start = db.membership_changes_start().expect("start");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    db.watch_membership(Arc::new(move || {
        let _ = tx.lock().map(|tx| tx.send(()));
    }));
    // The first wake comes once the LISTEN is in place.
    rx.recv_timeout(Duration::from_secs(5)).expect("first wake");
    let mut c = t.client();
    c.batch_execute("UPDATE library_members SET role = 'EDITOR' WHERE user_id = 'v'")
        .expect("update");
    rx.recv_timeout(Duration::from_secs(1))
        .expect("woken by the role change");
    c.batch_execute("UPDATE libraries SET owner_id = 'n' WHERE id = 'lib'")
        .expect("owner");
    rx.recv_timeout(Duration::from_secs(1))
        .expect("woken by the owner change");
    let changes = db.membership_changes_since(start).expect("since");
    let who: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| (c.library_id.as_str(), c.user_id.as_str()))
        .collect();
    assert_eq!(who, [("lib", "v"), ("lib", "o")]);
    assert!(changes[0].seq < changes[1].seq);
    assert_eq!(
        db.membership_changes_since(changes[1].seq).expect("after"),
        []
    );
}

/// While the database is unreachable every call fails within seconds with
/// `Error::Storage` (`ping` too: `/health` 503) and nothing is applied;
/// once it is back the same store serves again, without a restart.
#[test]
fn an_unreachable_database_fails_fast_and_the_store_recovers() {
    let Some(t) = TestDb::new() else { return };
    drop(t.seeded());
    let upstream: std::net::SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    let proxy = super::test_proxy::Proxy::start(upstream);
    let db = PgStore::open(&t.url_via(&proxy)).expect("open through the proxy");
    db.ping().expect("ping");
    proxy.cut();
    let start = std::time::Instant::now();
    assert!(matches!(db.ping(), Err(Error::Storage(_))));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let start = std::time::Instant::now();
    let refused = db.apply_batch(&[op("pv", json!({"a": 1}))], 1 << 20);
    assert!(matches!(refused, Err(Error::Storage(_))), "{refused:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(db.view("pv"), Err(Error::Storage(_))));
    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while db.ping().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not recover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let results = db
        .apply_batch(&[op("pv", json!({"b": 2}))], 1 << 20)
        .expect("batch");
    assert_eq!(
        versions_of(&results),
        [Some(1)],
        "the refused batch left nothing"
    );
    let row = db.view("pv").expect("read").expect("row");
    assert_eq!(row.state.get(), r#"{"b":2}"#);
}

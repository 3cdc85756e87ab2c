//! A real server on the PostgreSQL engine (SPEC §8): revocation by plain
//! SQL through LISTEN, and the server's database connections killed
//! mid-stream. Each test gets its own database, made from
//! `PORTAL_TEST_PG_URL` (the admin URL) and dropped after; without that
//! variable each test prints a notice and passes vacuously.

mod common;

use std::time::{Duration, Instant};

use common::{seed, spawn_app_with, TestApp, WAIT};
use portal_sync::config::{Database, Synchronous};
use serde_json::json;

/// A database of its own, dropped `WITH (FORCE)` with this.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDb {
    fn new() -> Option<PgDb> {
        let Ok(admin_url) = std::env::var("PORTAL_TEST_PG_URL") else {
            eprintln!("PORTAL_TEST_PG_URL is unset: skipping this PostgreSQL test");
            return None;
        };
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("random");
        let name: String = std::iter::once("pgs_".to_string())
            .chain(bytes.iter().map(|b| format!("{b:02x}")))
            .collect();
        sql(&admin_url, &format!("CREATE DATABASE {name}"));
        let base = admin_url.split('?').next().expect("url");
        let (server, _) = base.rsplit_once('/').expect("a URL with a database");
        let url = format!("{server}/{name}");
        Some(PgDb {
            admin_url,
            name,
            url,
        })
    }

    /// A seeded server (the fixture of tests/common) on this database.
    async fn app(&self, tweak: impl FnOnce(&mut portal_sync::Config)) -> TestApp {
        let db = Database::Postgres(self.url.clone());
        let store = portal_sync::engines::open_db(&db, Synchronous::Normal).expect("open");
        seed(&*store);
        spawn_app_with(|c| {
            c.db = db;
            tweak(c);
        })
        .await
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        sql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs SQL as another tool would (psql), off the async threads.
fn sql(url: &str, statements: &str) {
    let (url, statements) = (url.to_string(), statements.to_string());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client.batch_execute(&statements).expect("sql");
    })
    .join()
    .expect("sql thread");
}

async fn update(c: &mut common::Client, payload: serde_json::Value, id: &str) -> i64 {
    c.send(json!({"type": "portal-view-update", "payload": payload, "id": id}))
        .await;
    let ack = c.recv_type("ack").await;
    assert_eq!(ack["id"], id, "{ack}");
    ack["version"].as_i64().expect("ack version")
}

/// A role changed with plain SQL closes the member's socket through the
/// LISTEN wake-up: the poll is set to a minute here, so only the
/// notification can close it this soon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_changed_by_sql_closes_the_socket_through_listen() {
    let Some(db) = PgDb::new() else { return };
    let app = db
        .app(|c| c.revocation_poll = Duration::from_secs(60))
        .await;
    let mut v1 = app.connect("pv1", "v1").await;
    let mut ed = app.connect("pv1", "ed").await;
    // Let the LISTEN connection come up (its first wake is a rescan).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    sql(
        &db.url,
        "UPDATE library_members SET role = 'VIEWER' WHERE library_id = 'lib1' AND user_id = 'ed'",
    );
    ed.assert_closed(1008, "access revoked").await;
    assert!(
        start.elapsed() < WAIT / 2,
        "closed after {:?}: not by the poll",
        start.elapsed()
    );
    v1.assert_alive().await;
}

/// Every database connection of the server killed (`pg_terminate_backend`)
/// between a controller's updates: the socket stays open, every update is
/// acked, the versions run on without a gap, and the stored state has them
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_stream_lose_nothing() {
    let Some(db) = PgDb::new() else { return };
    let app = db.app(|_| {}).await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut versions = Vec::new();
    for i in 0..30 {
        if i % 10 == 5 {
            sql(
                &db.url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            );
        }
        versions.push(update(&mut owner, json!({ format!("k{i}"): i }), &format!("u{i}")).await);
    }
    assert_eq!(versions, (1..=30).collect::<Vec<i64>>());
    owner.assert_alive().await;
    let (status, body) = common::health(&app).await;
    assert_eq!(status, 200, "{body}");
    let row = app
        .http()
        .get(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(app.token("owner"))
        .send()
        .await
        .expect("GET");
    let row: serde_json::Value = row.json().await.expect("json");
    assert_eq!(row["version"], 30, "{row}");
    assert_eq!(row["state"]["k29"], 29, "{row}");
    assert_eq!(row["state"].as_object().map(|m| m.len()), Some(30));
}

/// A handshake's lookup and a batch's statements are prepared once per
/// pooled connection. A column whose type another tool changes makes
/// PostgreSQL refuse those prepared statements ("cached plan must not change
/// result type"); the server prepares them again, and every handshake and
/// change after the alteration is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_changes_go_on_after_a_column_type_changes_under_prepared_statements() {
    let Some(db) = PgDb::new() else { return };
    let app = db.app(|_| {}).await;
    let mut ed = app.connect("pv1", "ed").await;
    // Prepared on every connection the storage threads and the writer use.
    for i in 0..12 {
        app.connect("pv1", "v1").await;
        assert_eq!(
            update(&mut ed, json!({"n": i}), &format!("a{i}")).await,
            i + 1
        );
    }
    sql(
        &db.url,
        "ALTER TABLE portal_views ALTER COLUMN name TYPE varchar(200)",
    );
    for i in 12..24 {
        let v1 = app.connect("pv1", "v1").await;
        assert_eq!(v1.connected["version"], i, "{}", v1.connected);
        assert_eq!(
            update(&mut ed, json!({"n": i}), &format!("a{i}")).await,
            i + 1
        );
    }
}

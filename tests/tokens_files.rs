//! SPEC §2's token rules end to end (`nbf`, `crit`, `--jwt-leeway`), where the
//! secret comes from (`--jwt-secret-file`, the short-secret warning), and the
//! database file: created private, and deleted under a running server.

mod common;
use common::binary::*;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portal_sync::config::Synchronous;
use portal_sync::protocol::auth::{now_secs, Tokens};
use serde_json::{json, Value};

/// A token for `sub` signed with the test secret, with `header` and the
/// extra `claims` (an hour's `exp` unless given).
fn signed(header: &Header, sub: &str, claims: Value) -> String {
    let mut all = json!({"sub": sub, "exp": now_secs() + 3600});
    if let (Some(all), Value::Object(extra)) = (all.as_object_mut(), claims) {
        all.extend(extra);
    }
    jsonwebtoken::encode(header, &all, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

fn with_nbf(nbf: Value) -> String {
    signed(&Header::new(Algorithm::HS256), "owner", json!({"nbf": nbf}))
}

fn with_crit(crit: Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.extras.insert("crit", crit);
    signed(&header, "owner", json!({}))
}

/// `token` is refused as `invalid token` by every transport: the WebSocket
/// handshake (1008), REST (401 INVALID_TOKEN) and the SSE stream (401).
async fn refused_everywhere(app: &TestApp, token: &str, what: &str) {
    let mut ws = app.open(&app.ws_url("pv1", Some(token))).await;
    assert_eq!(
        ws.expect_close().await,
        (1008, "invalid token".to_string()),
        "WebSocket, {what}"
    );
    let response = app
        .http()
        .get(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 401, "REST, {what}");
    let body: Value = response.json().await.expect("JSON error");
    assert_eq!(
        body,
        json!({"error": {"code": "INVALID_TOKEN", "message": "invalid token"}}),
        "REST, {what}"
    );
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(token)))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 401, "SSE, {what}");
    let body: Value = response.json().await.expect("JSON error");
    assert_eq!(
        body["error"]["code"], "INVALID_TOKEN",
        "SSE, {what}: {body}"
    );
}

/// `token` (for `owner`) is accepted by every transport.
async fn accepted_everywhere(app: &TestApp, token: &str, what: &str) {
    let mut ws = app.open(&app.ws_url("pv1", Some(token))).await;
    let connected = ws.recv().await;
    assert_eq!(
        connected["type"], "connected",
        "WebSocket, {what}: {connected}"
    );
    assert_eq!(connected["userId"], "owner");
    let response = app
        .http()
        .get(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200, "REST, {what}");
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(token)))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 200, "SSE, {what}");
    let mut sse = SseClient::new(response);
    let event = sse.next_event().await.expect("connected event");
    assert_eq!(event.data["type"], "connected", "SSE, {what}");
}

// ---------------------------------------------------------------------------
// nbf and crit (SPEC §2)

/// A token whose `nbf` is still in the future is invalid on every transport,
/// and so is one whose `nbf` is not a number.
#[tokio::test]
async fn a_future_or_non_numeric_nbf_is_an_invalid_token() {
    let app = spawn_app().await;
    refused_everywhere(&app, &with_nbf(json!(now_secs() + 120)), "nbf in 2 min").await;
    refused_everywhere(&app, &with_nbf(json!("now")), "nbf a string").await;
    refused_everywhere(&app, &with_nbf(Value::Null), "nbf null").await;
}

/// `nbf` in the past, or equal to now, is valid.
#[tokio::test]
async fn a_past_or_current_nbf_is_accepted() {
    let app = spawn_app().await;
    accepted_everywhere(&app, &with_nbf(json!(now_secs() - 60)), "nbf a minute ago").await;
    accepted_everywhere(&app, &with_nbf(json!(now_secs())), "nbf now").await;
}

/// `--jwt-leeway` applies to `nbf` too: 30 s early passes a 60 s leeway,
/// 5 min early does not.
#[tokio::test]
async fn a_future_nbf_within_the_leeway_is_accepted() {
    let app = spawn_app_with(|c| c.jwt_leeway = 60).await;
    accepted_everywhere(&app, &with_nbf(json!(now_secs() + 30)), "nbf in 30 s").await;
    refused_everywhere(&app, &with_nbf(json!(now_secs() + 300)), "nbf in 5 min").await;
}

/// A `crit` header parameter, whatever its value, makes the token invalid
/// (RFC 7515 §4.1.11: we understand no extension), though it is correctly
/// signed; another unknown header parameter does not.
#[tokio::test]
async fn a_crit_header_is_an_invalid_token() {
    let app = spawn_app().await;
    for crit in [json!(["exp"]), json!([]), Value::Null] {
        refused_everywhere(&app, &with_crit(crit.clone()), &format!("crit {crit}")).await;
    }
    let mut header = Header::new(Algorithm::HS256);
    header.extras.insert("x-note", "not critical");
    accepted_everywhere(
        &app,
        &signed(&header, "owner", json!({})),
        "an unknown header",
    )
    .await;
}

// ---------------------------------------------------------------------------
// The secret: --jwt-secret-file, the short-secret warning

const LONG_SECRET: &str = "0123456789abcdef0123456789abcdef-from-a-file";

/// A seeded database at `dir/name`, for the binary to serve.
fn seeded_db(dir: &Path, name: &str) -> Arc<TestDb> {
    if common::db::on_postgres() {
        return TestDb::seeded(dir);
    }
    let path = dir.join(name);
    seed(&*open_store(&path));
    Arc::new(TestDb::Sqlite { path })
}

async fn get_view(base: &str, token: &str) -> u16 {
    let (status, _) = http_json(
        reqwest::Client::new()
            .get(format!("{base}/api/portal-views/pv1"))
            .bearer_auth(token),
    )
    .await;
    status
}

/// `serve --jwt-secret-file F` checks tokens with F's content (its trailing
/// newline is not part of the secret); `token --jwt-secret-file F` prints a
/// token that this server accepts; a token signed otherwise is refused. A
/// 32-byte secret brings no warning, and the secret is never logged.
#[tokio::test]
async fn serve_and_token_take_the_secret_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = seeded_db(dir.path(), "file-secret.db");
    let db = database.arg();
    let file = dir.path().join("secret");
    std::fs::write(&file, format!("{LONG_SECRET}\n")).expect("write secret");
    let file = file.to_str().expect("utf-8");

    let printed = run(
        dir.path(),
        &["token", "--user", "owner", "--jwt-secret-file", file],
        &[],
    )
    .await;
    printed.assert_ok();
    let printed = printed.stdout.trim().to_string();
    Tokens::new(LONG_SECRET.as_bytes(), 0)
        .verify(&printed)
        .expect("signed with the file's content, without its newline");

    let served = start_serve(
        dir.path(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            &db,
            "--jwt-secret-file",
            file,
        ],
        &[],
    )
    .await;
    assert_eq!(
        get_view(&served.base, &printed).await,
        200,
        "the printed token"
    );
    let own = Tokens::new(LONG_SECRET.as_bytes(), 0)
        .issue("owner", 60)
        .expect("token");
    assert_eq!(get_view(&served.base, &own).await, 200);
    for other in [format!("{LONG_SECRET}\n"), "another secret".into()] {
        let token = Tokens::new(other.as_bytes(), 0)
            .issue("owner", 60)
            .expect("token");
        assert_eq!(
            get_view(&served.base, &token).await,
            401,
            "signed with {other:?}"
        );
    }
    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(!logs.contains("JWT secret is only"), "no warning: {logs}");
    assert!(
        !logs.contains(LONG_SECRET),
        "the secret is not logged: {logs}"
    );
}

/// Both `--jwt-secret` and `--jwt-secret-file` is a usage error (exit 2), and
/// so is the file flag with `PORTAL_JWT_SECRET` set, with a note saying the
/// variable is what conflicts.
#[tokio::test]
async fn two_sources_of_the_secret_are_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret");
    std::fs::write(&file, LONG_SECRET).expect("write secret");
    let file = file.to_str().expect("utf-8");
    let both = run(
        dir.path(),
        &[
            "token",
            "--user",
            "a",
            "--jwt-secret",
            "x",
            "--jwt-secret-file",
            file,
        ],
        &[],
    )
    .await;
    assert_eq!(both.code, Some(2), "{}", both.stderr);
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
    assert!(both.stdout.is_empty(), "no token: {}", both.stdout);
    let env = run(
        dir.path(),
        &["token", "--user", "a", "--jwt-secret-file", file],
        &[("PORTAL_JWT_SECRET", "x")],
    )
    .await;
    assert_eq!(env.code, Some(2), "{}", env.stderr);
    assert!(
        env.stderr
            .contains("note: PORTAL_JWT_SECRET in the environment counts as its flag"),
        "{}",
        env.stderr
    );
}

/// A secret file that does not exist, is empty, or cannot be read stops
/// `serve` and `token` with one clear line naming it; commands that need no
/// secret do not read it.
#[tokio::test]
async fn a_bad_secret_file_stops_serve_with_a_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = seeded_db(dir.path(), "bad-secret.db");
    let db = database.arg();
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let locked = dir.path().join("locked");
    std::fs::write(&locked, LONG_SECRET).expect("write");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let mut cases = vec![
        (missing.clone(), "does not exist"),
        (empty, "is empty"),
        (dir.path().to_path_buf(), "cannot read the JWT secret file"),
    ];
    // Root reads a 0000 file anyway.
    if std::fs::read(&locked).is_err() {
        cases.push((locked, "Permission denied"));
    }
    for (path, says) in cases {
        let path = path.to_str().expect("utf-8");
        for args in [
            &["serve", "--addr", "127.0.0.1:0", "--db", &db][..],
            &["token", "--user", "owner"][..],
        ] {
            let mut all = args.to_vec();
            all.extend_from_slice(&["--jwt-secret-file", path]);
            let out = run(dir.path(), &all, &[]).await;
            out.assert_failed(Some(says));
            let line = format!("error: {}", out.stderr.trim());
            assert!(line.contains(path), "names the file: {line}");
            assert_eq!(
                out.stderr.trim().lines().count(),
                1,
                "one line: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{}", out.stdout);
        }
    }
    let missing = missing.to_str().expect("utf-8");
    run(
        dir.path(),
        &["--db", &db, "user", "list"],
        &[("PORTAL_JWT_SECRET_FILE", missing)],
    )
    .await
    .assert_ok();
}

/// A secret shorter than 32 bytes is accepted with one warning at the start
/// of `serve` and `demo`, which never shows the secret; a 32-byte one (and
/// the demo's own random one) brings none.
#[tokio::test]
async fn a_short_secret_is_warned_about_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = seeded_db(dir.path(), "short.db");
    let db = database.arg();
    let short = "change-me-now";
    let exact = "k".repeat(32);
    for (command, secret, warned) in [
        ("serve", Some(short), true),
        ("serve", Some(exact.as_str()), false),
        ("demo", Some(short), true),
        ("demo", None, false),
    ] {
        let demo_db = dir.path().join(format!("demo-{warned}.db"));
        let path = match command {
            "demo" => demo_db.to_str().expect("utf-8"),
            _ => db.as_str(),
        };
        let envs: Vec<(&str, &str)> = secret
            .map(|s| ("PORTAL_JWT_SECRET", s))
            .into_iter()
            .collect();
        let served = start_serve(
            dir.path(),
            &[command, "--addr", "127.0.0.1:0", "--db", path],
            &envs,
        )
        .await;
        if let Some(secret) = secret {
            let token = Tokens::new(secret.as_bytes(), 0)
                .issue("owner", 60)
                .expect("token");
            if command == "serve" {
                assert_eq!(get_view(&served.base, &token).await, 200, "accepted");
            }
        }
        let logs = served.logs();
        let (code, _) = served.stop().await;
        assert_eq!(code, Some(0));
        let warnings: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("JWT secret is only"))
            .collect();
        match (warned, secret) {
            (true, Some(secret)) => {
                assert_eq!(warnings.len(), 1, "{command} with {secret:?}: {logs}");
                assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
                assert!(
                    warnings[0].contains(&format!("{} bytes", secret.len())),
                    "{}",
                    warnings[0]
                );
                assert!(!logs.contains(secret), "the secret is not logged: {logs}");
            }
            _ => assert!(warnings.is_empty(), "{command} with {secret:?}: {logs}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The database file

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn sidecar(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// A new database file and its `-wal` and `-shm` are created 0600, though the
/// process's umask would make a file readable by others; an existing file
/// keeps its mode, and SQLite gives its `-wal` and `-shm` the same.
#[tokio::test]
async fn database_files_are_created_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control");
    std::fs::write(&control, "x").expect("write");
    assert_ne!(
        mode(&control) & 0o044,
        0,
        "the test needs a umask that lets others read new files (022)"
    );

    let path = dir.path().join("new.db");
    let db = portal_sync::engines::open(&path, Synchronous::Full).expect("open");
    db.admin().add_user("u", "u@x", "U").expect("one write");
    for file in [path.clone(), sidecar(&path, "-wal"), sidecar(&path, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    drop(db);

    let existing = dir.path().join("existing.db");
    std::fs::write(&existing, "").expect("create");
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let db = portal_sync::engines::open(&existing, Synchronous::Full).expect("open");
    db.admin().add_user("u", "u@x", "U").expect("one write");
    for file in [
        existing.clone(),
        sidecar(&existing, "-wal"),
        sidecar(&existing, "-shm"),
    ] {
        assert_eq!(mode(&file), 0o640, "{}", file.display());
    }
}

/// The same through the binary: an admin command creates the file 0600, and
/// `serve`'s `-wal`/`-shm` follow it after a write.
#[tokio::test]
async fn the_binary_creates_private_database_files() {
    sqlite_only!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.db");
    let db = path.to_str().expect("utf-8");
    run(
        dir.path(),
        &[
            "--db", db, "user", "add", "--id", "owner", "--email", "o@x", "--name", "O",
        ],
        &[],
    )
    .await
    .assert_ok();
    assert_eq!(mode(&path), 0o600);
    let served = start_serve(
        dir.path(),
        &["serve", "--addr", "127.0.0.1:0", "--db", db],
        &[("PORTAL_JWT_SECRET", LONG_SECRET)],
    )
    .await;
    run(
        dir.path(),
        &[
            "--db", db, "library", "add", "--id", "l", "--name", "L", "--owner", "owner",
        ],
        &[],
    )
    .await
    .assert_ok();
    for file in [path.clone(), sidecar(&path, "-wal"), sidecar(&path, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "{logs}");
}

/// The first message of a socket, or its close code and reason.
async fn first_frame(client: &mut Client) -> Result<Value, (u16, String)> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let frame = tokio::time::timeout(WAIT, client.ws.next())
            .await
            .expect("a frame in time")
            .expect("a frame")
            .expect("a frame, not an error");
        match frame {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str()).expect("JSON")),
            Message::Close(Some(close)) => {
                return Err((u16::from(close.code), close.reason.to_string()))
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn delete_database(path: &Path) {
    std::fs::remove_file(path).expect("delete the database file");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(sidecar(path, suffix));
    }
}

/// A database file deleted under the running server: the next change over a
/// WebSocket closes it 1011 with no ack, a PATCH is 500, `/health` is 503
/// `database file missing`, and handshakes, GETs and SSE streams are refused
/// as storage failures, since what they would read is gone with the file.
#[tokio::test]
async fn a_deleted_database_file_refuses_writes_and_fails_health() {
    sqlite_only!();
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    owner
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    assert_eq!(owner.recv_type("ack").await["version"], 1);
    assert_eq!(health(&app).await.0, 200);

    delete_database(app.database.sqlite_path());
    owner
        .send(json!({"type": "portal-view-update", "payload": {"a": 2}, "id": 2}))
        .await;
    // A data message (the ack) before the close would fail this.
    owner.assert_closed(1011, "internal error").await;

    let (status, body) = http_json(
        app.http()
            .patch(app.http_url("/api/portal-views/pv1"))
            .bearer_auth(app.token("ed"))
            .header("content-type", "application/json")
            .body(r#"{"b":1}"#),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "INTERNAL");
    let (status, body) = app
        .post_message(
            "pv1",
            "om",
            None,
            &json!({"type": "portal-view-update", "payload": {"c": 1}, "id": 3}),
        )
        .await;
    assert_eq!(status, 500, "{body}");

    assert_eq!(
        health(&app).await,
        (
            503,
            json!({"status": "unavailable", "error": "database file missing"})
        )
    );
    let mut late = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    late.assert_closed(1011, "internal error").await;
    let (status, _) = http_json(
        app.http()
            .get(app.http_url("/api/portal-views/pv1"))
            .bearer_auth(app.token("v1")),
    )
    .await;
    assert_eq!(status, 500);
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(&app.token("v2"))))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 500);
}

/// With no write and no `/health` to look at the file, the background look
/// finds within about a second (it looks every 500 ms) that the file is
/// gone, and handshakes are refused from then on; a new database put in its
/// place is not taken for the one the server has open. `/health` says so too.
#[tokio::test]
async fn handshakes_notice_a_replaced_database_file_within_a_second() {
    sqlite_only!();
    let app = spawn_app().await;
    // The server has opened its database (it does so once it runs).
    app.connect("pv1", "v1").await;
    delete_database(app.database.sqlite_path());
    // SQLite would open this one fresh; the server's connections still
    // read and write the deleted one.
    let other = portal_sync::engines::open(app.database.sqlite_path(), Synchronous::Normal)
        .expect("a new file");
    seed(&*other);
    let deadline = std::time::Instant::now() + WAIT;
    let mut accepted = 0;
    loop {
        let mut client = app
            .open(&app.ws_url("pv1", Some(&app.token("owner"))))
            .await;
        match first_frame(&mut client).await {
            Err((code, reason)) => {
                assert_eq!((code, reason.as_str()), (1011, "internal error"));
                break;
            }
            Ok(message) => assert_eq!(message["type"], "connected", "{message}"),
        }
        accepted += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "{accepted} handshakes accepted since the deletion"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        health(&app).await,
        (
            503,
            json!({"status": "unavailable", "error": "database file missing"})
        )
    );
}

/// Through the binary: after the file is deleted, several refused requests
/// log the cause once, as one ERROR line, and `/health` stays 503.
#[tokio::test]
async fn a_deleted_database_file_is_logged_once() {
    sqlite_only!();
    let dir = tempfile::tempdir().expect("tempdir");
    let database = seeded_db(dir.path(), "deleted.db");
    let db = database.arg();
    let served = start_serve(
        dir.path(),
        &["serve", "--addr", "127.0.0.1:0", "--db", &db],
        &[("PORTAL_JWT_SECRET", LONG_SECRET)],
    )
    .await;
    let token = Tokens::new(LONG_SECRET.as_bytes(), 0)
        .issue("owner", 600)
        .expect("token");
    let http = reqwest::Client::new();
    let patch = || {
        http.patch(format!("{}/api/portal-views/pv1", served.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(r#"{"a":1}"#)
    };
    assert_eq!(http_json(patch()).await.0, 200);
    delete_database(Path::new(&db));
    for _ in 0..3 {
        assert_eq!(http_json(patch()).await.0, 500);
        let (status, body) = http_json(http.get(format!("{}/health", served.base))).await;
        assert_eq!(status, 503, "{body}");
    }
    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line: {logs}");
    assert!(
        errors[0].contains("was deleted or replaced while the server runs"),
        "{}",
        errors[0]
    );
}

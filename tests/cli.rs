//! The `portal-sync` binary (SPEC §6): `token`, `serve`, `demo` and the
//! administration commands, run as a child process against temp databases
//! (on either engine: `PORTAL_TEST_PG_URL`, tests/common/db.rs; those about
//! the SQLite file stay on SQLite).

mod common;
use common::binary::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use portal_sync::protocol::auth::{now_secs, Tokens};
use portal_sync::store::Store;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Runs an admin command against `db` with `--db`.
async fn admin(dir: &Path, db: &TestDb, args: &[&str]) -> Output {
    let db = db.arg();
    let mut all = vec!["--db", db.as_str()];
    all.extend_from_slice(args);
    run(dir, &all, &[]).await
}

/// Users whose id is `id` (0 or 1).
fn users_with_id(db: &dyn Store, id: &str) -> usize {
    let users = db.admin().users().expect("users");
    users.iter().filter(|u| u.id == id).count()
}

fn user_count(db: &dyn Store) -> usize {
    db.admin().users().expect("users").len()
}

fn library_count(db: &dyn Store) -> usize {
    db.admin().libraries().expect("libraries").len()
}

/// Member rows of every library.
fn member_count(db: &dyn Store) -> usize {
    let admin = db.admin();
    let libraries = admin.libraries().expect("libraries");
    libraries
        .iter()
        .map(|l| admin.members(&l.id).expect("members").len())
        .sum()
}

fn view_count(db: &dyn Store) -> usize {
    db.admin().views().expect("views").len()
}

/// A running `portal-sync demo` and what its banner said.
struct Demo {
    child: Child,
    /// `http://127.0.0.1:<port>`
    base: String,
    secret: String,
    /// WebSocket URLs (with `?token=`) of alice, bob and carol, in that order.
    ws_urls: Vec<String>,
    /// Their tokens, in the same order.
    tokens: Vec<String>,
    stdout: String,
    stderr: Arc<Mutex<String>>,
    stderr_task: JoinHandle<()>,
    _stdout_task: JoinHandle<()>,
}

/// Starts `demo --addr 127.0.0.1:0 --db <db>` and reads its banner.
async fn start_demo(dir: &Path, db: &TestDb, envs: &[(&str, &str)]) -> Demo {
    let mut cmd = portal_sync(dir);
    cmd.args(["demo", "--addr", "127.0.0.1:0", "--db"])
        .arg(db.arg())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn demo");
    let (stderr, stderr_task) = collect(child.stderr.take().expect("stderr"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = String::new();
    let read_banner = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("As carol") {
                return;
            }
        }
        panic!("stdout ended before the banner was complete: {banner}");
    };
    if tokio::time::timeout(RUN_WAIT, read_banner).await.is_err() {
        panic!(
            "no complete banner in time; stdout: {banner}\nstderr: {}",
            stderr.lock().expect("lock")
        );
    }
    let stdout_task = tokio::spawn(drain(lines));

    let base_start = banner
        .find("http://127.0.0.1:")
        .expect("banner names http://127.0.0.1:<port>");
    let base: String = banner[base_start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    let port: u16 = base["http://127.0.0.1:".len()..]
        .parse()
        .expect("a port number");
    assert_ne!(port, 0, "the banner shows the bound port, not 0");
    let secret = banner
        .lines()
        .find_map(|l| l.strip_prefix("JWT secret for this run: "))
        .expect("banner shows the secret")
        .trim()
        .to_string();
    let ws_urls: Vec<String> = banner
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ws://"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        ws_urls.len(),
        3,
        "one WebSocket URL per demo user: {banner}"
    );
    let tokens: Vec<String> = ws_urls
        .iter()
        .map(|u| {
            assert!(
                u.starts_with(&format!("ws://127.0.0.1:{port}/ws/portal-view/demo?token=")),
                "{u}"
            );
            u.split("?token=").nth(1).expect("token").to_string()
        })
        .collect();
    Demo {
        child,
        base,
        secret,
        ws_urls,
        tokens,
        stdout: banner,
        stderr,
        stderr_task,
        _stdout_task: stdout_task,
    }
}

async fn drain(mut lines: tokio::io::Lines<BufReader<ChildStdout>>) {
    while let Ok(Some(_)) = lines.next_line().await {}
}

impl Demo {
    /// SIGTERM, then the exit code (bounded) and everything the server logged.
    async fn stop(mut self) -> (Option<i32>, String) {
        sigterm(&self.child);
        let code = exit_code(&mut self.child).await;
        let _ = tokio::time::timeout(RUN_WAIT, &mut self.stderr_task).await;
        let logs = self.stderr.lock().expect("lock").clone();
        (code, logs)
    }
}

/// Reads the rest of a socket after its close frame until the TCP stream ends.
async fn finish_close(client: &mut Client) {
    use futures::StreamExt;
    let _ = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = client.ws.next().await {}
    })
    .await;
}

// ---------------------------------------------------------------------------
// token

/// `token --user alice --ttl 1h` prints one JWT, signed with the configured
/// secret, for `sub` alice, expiring in one hour; the secret may come from
/// `--jwt-secret` or `PORTAL_JWT_SECRET`.
#[tokio::test]
async fn token_prints_a_jwt_for_the_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "cli-secret";
    let by_flag = run(
        dir.path(),
        &[
            "token",
            "--jwt-secret",
            secret,
            "--user",
            "alice",
            "--ttl",
            "1h",
        ],
        &[],
    )
    .await;
    let by_env = run(
        dir.path(),
        &["token", "--user", "alice", "--ttl", "1h"],
        &[("PORTAL_JWT_SECRET", secret)],
    )
    .await;
    for out in [by_flag, by_env] {
        out.assert_ok();
        let token = out.stdout.trim();
        assert_eq!(
            out.stdout.lines().count(),
            1,
            "exactly one line: {:?}",
            out.stdout
        );
        assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
        let verified = Tokens::new(secret.as_bytes(), 0)
            .verify(token)
            .expect("verifies with the secret");
        assert_eq!(verified.user_id, "alice");
        let now = now_secs();
        assert!(
            verified.exp >= now + 3600 - 10 && verified.exp <= now + 3600 + 1,
            "exp {} is about now + 1 h ({now})",
            verified.exp
        );
        assert!(
            Tokens::new(b"another secret", 0).verify(token).is_err(),
            "signed with the configured secret only"
        );
    }
}

/// `--ttl` takes plain seconds and s/m/d units, defaults to 1 h, and refuses
/// unknown units; a numeric user id is kept as its string.
#[tokio::test]
async fn token_ttl_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("PORTAL_JWT_SECRET", "k")];
    let tokens = Tokens::new(b"k", 0);
    for (ttl, secs) in [
        (Some("90"), 90),
        (Some("15m"), 900),
        (Some("2d"), 172_800),
        (None, 3600),
    ] {
        let mut args = vec!["token", "--user", "42"];
        if let Some(ttl) = ttl {
            args.extend(["--ttl", ttl]);
        }
        let out = run(dir.path(), &args, &env).await;
        out.assert_ok();
        let verified = tokens.verify(out.stdout.trim()).expect("valid");
        assert_eq!(verified.user_id, "42");
        let now = now_secs();
        assert!(
            verified.exp + 10 >= now + secs && verified.exp <= now + secs + 1,
            "ttl {ttl:?}: exp {} vs now {now}",
            verified.exp
        );
    }
    run(dir.path(), &["token", "--user", "a", "--ttl", "1w"], &env)
        .await
        .assert_failed(None);
}

/// `token` with no secret (or an empty one) exits non-zero, prints no token and
/// says to set PORTAL_JWT_SECRET.
#[tokio::test]
async fn token_without_a_secret_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    for env in [vec![], vec![("PORTAL_JWT_SECRET", "")]] {
        let out = run(dir.path(), &["token", "--user", "alice"], &env).await;
        out.assert_failed(Some("PORTAL_JWT_SECRET"));
        assert!(
            out.stdout.trim().is_empty(),
            "no token printed: {}",
            out.stdout
        );
    }
}

// ---------------------------------------------------------------------------
// serve

/// `serve` without a secret (none, or empty) refuses to start: non-zero exit, a
/// message naming PORTAL_JWT_SECRET, and nothing listening.
#[tokio::test]
async fn serve_without_a_secret_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join("serve.db");
    let db = db_path.to_str().expect("utf-8");
    for env in [vec![], vec![("PORTAL_JWT_SECRET", "")]] {
        let out = run(
            dir.path(),
            &["serve", "--addr", "127.0.0.1:0", "--db", db],
            &env,
        )
        .await;
        out.assert_failed(Some("PORTAL_JWT_SECRET"));
        assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
    }
}

/// `serve` configured only from the environment (`PORTAL_DB`, `PORTAL_ADDR`,
/// `PORTAL_JWT_SECRET`, `PORTAL_MAX_MESSAGE_BYTES`) serves what the admin
/// commands created, accepts a token from `token`, applies the size limit, and
/// exits 0 on SIGTERM.
#[tokio::test]
async fn serve_takes_its_configuration_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "env-serve.db");
    let db = db_path.arg();
    let db = db.as_str();
    let env_db = [("PORTAL_DB", db)];
    for args in [
        &[
            "user", "add", "--id", "alice", "--email", "alice@x", "--name", "Alice",
        ][..],
        &[
            "library", "add", "--id", "lib", "--name", "Lib", "--owner", "alice",
        ][..],
        &[
            "view",
            "add",
            "--id",
            "pv",
            "--library",
            "lib",
            "--name",
            "PV",
            "--state",
            r#"{"a":1}"#,
        ][..],
    ] {
        run(dir.path(), args, &env_db).await.assert_ok();
    }
    let secret = "env-secret";
    let token = run(
        dir.path(),
        &["token", "--user", "alice"],
        &[("PORTAL_JWT_SECRET", secret)],
    )
    .await;
    token.assert_ok();
    let token = token.stdout.trim().to_string();

    let served = start_serve(
        dir.path(),
        &["serve"],
        &[
            ("PORTAL_DB", db),
            ("PORTAL_ADDR", "127.0.0.1:0"),
            ("PORTAL_JWT_SECRET", secret),
            ("PORTAL_MAX_MESSAGE_BYTES", "200"),
        ],
    )
    .await;
    let base = served.base.clone();

    let http = reqwest::Client::new();
    let (status, body) = http_json(http.get(format!("{base}/health"))).await;
    assert_eq!(
        (status, body),
        (200, json!({"status": "ok", "connections": 0}))
    );
    let (status, body) = http_json(
        http.get(format!("{base}/api/portal-views/pv"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], json!({"a": 1}));
    assert_eq!(body["libraryId"], "lib");
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(300));
    let patch = |body: String| {
        http.patch(format!("{base}/api/portal-views/pv"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
    };
    let (status, body) = http_json(patch(big)).await;
    assert_eq!(status, 413, "PORTAL_MAX_MESSAGE_BYTES=200 applies: {body}");
    let (status, body) = http_json(patch(r#"{"b":2}"#.into())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    drop(http);

    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "exit 0 after SIGTERM");
    assert!(!logs.contains(&token), "the token is not logged");
    let stored = db_path.open().view("pv").expect("read").expect("row");
    assert_eq!(stored.version, 1);
    assert_eq!(
        serde_json::from_str::<Value>(stored.state.get()).expect("json"),
        json!({"a":1,"b":2})
    );
}

// ---------------------------------------------------------------------------
// administration

/// `user add`, `library add`, `member set` (add, change role), `member list`,
/// `member remove`, `view add --state`, `view list`, `view show`: each exits 0,
/// says what it did, and the rows in SQLite match.
#[tokio::test]
async fn admin_commands_manage_users_libraries_members_and_views() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "admin.db");
    let d = dir.path();

    let out = admin(
        d,
        &db_path,
        &[
            "user",
            "add",
            "--id",
            "alice",
            "--email",
            "alice@example.com",
            "--name",
            "Alice A",
        ],
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("alice"), "{}", out.stdout);
    admin(
        d,
        &db_path,
        &[
            "user",
            "add",
            "--id",
            "bob",
            "--email",
            "bob@example.com",
            "--name",
            "Bob",
        ],
    )
    .await
    .assert_ok();
    let out = admin(d, &db_path, &["user", "list"]).await;
    out.assert_ok();
    assert!(
        out.stdout.contains("alice\talice@example.com\tAlice A"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("bob\tbob@example.com\tBob"),
        "{}",
        out.stdout
    );

    let out = admin(
        d,
        &db_path,
        &[
            "library",
            "add",
            "--id",
            "lib-1",
            "--name",
            "Library One",
            "--owner",
            "alice",
        ],
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("lib-1"), "{}", out.stdout);
    let out = admin(d, &db_path, &["library", "list"]).await;
    out.assert_ok();
    assert!(
        out.stdout.contains("lib-1\tLibrary One\talice"),
        "{}",
        out.stdout
    );

    let out = admin(
        d,
        &db_path,
        &[
            "member",
            "set",
            "--library",
            "lib-1",
            "--user",
            "bob",
            "--role",
            "EDITOR",
        ],
    )
    .await;
    out.assert_ok();
    assert!(
        out.stdout.contains("bob") && out.stdout.contains("EDITOR"),
        "{}",
        out.stdout
    );
    {
        let db = db_path.open();
        let admin = db.admin();
        assert!(admin.user_exists("alice").expect("read"));
        let users = admin.users().expect("users");
        let alice = users.iter().find(|u| u.id == "alice").expect("alice row");
        let (email, name) = (&alice.email, &alice.name);
        assert_eq!(
            (email.as_str(), name.as_str()),
            ("alice@example.com", "Alice A")
        );
        let libraries = admin.libraries().expect("libraries");
        let library = libraries
            .iter()
            .find(|l| l.id == "lib-1")
            .expect("library row");
        let owner = &library.owner_id;
        assert_eq!(owner, "alice");
        assert_eq!(
            admin.member_role("lib-1", "bob").expect("read").as_deref(),
            Some("EDITOR")
        );
    }
    let out = admin(
        d,
        &db_path,
        &[
            "member",
            "set",
            "--library",
            "lib-1",
            "--user",
            "bob",
            "--role",
            "VIEWER",
        ],
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("VIEWER"), "{}", out.stdout);
    let out = admin(d, &db_path, &["member", "list", "--library", "lib-1"]).await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "bob\tVIEWER");
    {
        let db = db_path.open();
        assert_eq!(
            db.admin()
                .member_role("lib-1", "bob")
                .expect("read")
                .as_deref(),
            Some("VIEWER")
        );
    }
    let out = admin(
        d,
        &db_path,
        &["member", "remove", "--library", "lib-1", "--user", "bob"],
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("bob"), "{}", out.stdout);
    let out = admin(d, &db_path, &["member", "list", "--library", "lib-1"]).await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "", "no members left");
    assert_eq!(member_count(&*db_path.open()), 0);
    admin(
        d,
        &db_path,
        &["member", "remove", "--library", "lib-1", "--user", "bob"],
    )
    .await
    .assert_failed(Some("not a member"));

    let out = admin(
        d,
        &db_path,
        &[
            "view",
            "add",
            "--id",
            "pv_1",
            "--library",
            "lib-1",
            "--name",
            "First view",
            "--state",
            r#"{"a":1}"#,
        ],
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("pv_1"), "{}", out.stdout);
    admin(
        d,
        &db_path,
        &[
            "view",
            "add",
            "--id",
            "pv_2",
            "--library",
            "lib-1",
            "--name",
            "Second",
        ],
    )
    .await
    .assert_ok();
    {
        let db = db_path.open();
        let row = db.view("pv_1").expect("read").expect("pv_1 row");
        assert_eq!(row.library_id, "lib-1");
        assert_eq!(row.name, "First view");
        assert_eq!(row.version, 0);
        assert_eq!(
            serde_json::from_str::<Value>(row.state.get()).expect("json"),
            json!({"a": 1})
        );
        let row = db.view("pv_2").expect("read").expect("pv_2 row");
        assert_eq!(
            serde_json::from_str::<Value>(row.state.get()).expect("json"),
            json!({}),
            "default state"
        );
    }
    let out = admin(d, &db_path, &["view", "list"]).await;
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(
        lines[0].starts_with("pv_1\tlib-1\tFirst view\t0"),
        "{}",
        out.stdout
    );
    assert!(
        lines[1].starts_with("pv_2\tlib-1\tSecond\t0"),
        "{}",
        out.stdout
    );

    let out = admin(d, &db_path, &["view", "show", "--id", "pv_1"]).await;
    out.assert_ok();
    let shown: Value = serde_json::from_str(&out.stdout).expect("view show prints JSON");
    assert_eq!(shown["id"], "pv_1");
    assert_eq!(shown["libraryId"], "lib-1");
    assert_eq!(shown["name"], "First view");
    assert_eq!(shown["state"], json!({"a": 1}));
    assert_eq!(shown["version"], 0);
    admin(d, &db_path, &["view", "show", "--id", "nope"])
        .await
        .assert_failed(Some("not found"));
}

/// Admin errors exit non-zero with a message and write nothing: duplicate user
/// id or email, a library whose owner does not exist, a view in an unknown
/// library, a member of an unknown library or user, an invalid role, ids that
/// are not `[A-Za-z0-9_-]{1,64}`, and a `--state` that is not a JSON object.
#[tokio::test]
async fn admin_errors_exit_non_zero_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "errors.db");
    let d = dir.path();
    admin(
        d,
        &db_path,
        &[
            "user", "add", "--id", "alice", "--email", "a@x", "--name", "A",
        ],
    )
    .await
    .assert_ok();
    admin(
        d,
        &db_path,
        &[
            "library", "add", "--id", "lib", "--name", "L", "--owner", "alice",
        ],
    )
    .await
    .assert_ok();

    // Each refused: duplicate user id, duplicate email, unknown owner, unknown
    // library (for a view and for a member), unknown member, bad role.
    let refused = [
        "user add --id alice --email other@x --name A2",
        "user add --id alice2 --email a@x --name A2",
        "library add --id lib2 --name L2 --owner ghost",
        "view add --id pv --library nolib --name V",
        "member set --library nolib --user alice --role EDITOR",
        "member set --library lib --user ghost --role EDITOR",
        "member set --library lib --user alice --role ADMIN",
    ];
    for command in refused {
        let args: Vec<&str> = command.split_whitespace().collect();
        admin(d, &db_path, &args).await.assert_failed(None);
    }
    // Invalid ids.
    let long = "x".repeat(65);
    for id in ["a b", "a/b", "ü", long.as_str()] {
        admin(
            d,
            &db_path,
            &[
                "user",
                "add",
                "--id",
                id,
                "--email",
                &format!("{}@x", id.len()),
                "--name",
                "N",
            ],
        )
        .await
        .assert_failed(Some("id"));
        admin(
            d,
            &db_path,
            &[
                "library", "add", "--id", id, "--name", "N", "--owner", "alice",
            ],
        )
        .await
        .assert_failed(Some("id"));
        admin(
            d,
            &db_path,
            &["view", "add", "--id", id, "--library", "lib", "--name", "N"],
        )
        .await
        .assert_failed(Some("id"));
    }
    // --state must be a JSON object.
    for state in ["[1]", "1", "nope", "\"s\""] {
        admin(
            d,
            &db_path,
            &[
                "view",
                "add",
                "--id",
                "pv",
                "--library",
                "lib",
                "--name",
                "V",
                "--state",
                state,
            ],
        )
        .await
        .assert_failed(Some("JSON object"));
    }

    let db = db_path.open();
    assert_eq!(user_count(&*db), 1);
    assert_eq!(library_count(&*db), 1);
    assert_eq!(member_count(&*db), 0);
    assert_eq!(view_count(&*db), 0);
}

/// `PORTAL_DB` stands in for `--db`; `--db` wins over it; without either the
/// default file `portal-sync.db` in the working directory is used.
#[tokio::test]
async fn db_flag_falls_back_to_portal_db_env() {
    sqlite_only!();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let env_path: PathBuf = d.join("from-env.db");
    let flag_path: PathBuf = d.join("from-flag.db");
    let env_db = env_path.to_str().expect("utf-8");
    let flag_db = flag_path.to_str().expect("utf-8");

    run(
        d,
        &[
            "user", "add", "--id", "envuser", "--email", "e@x", "--name", "E",
        ],
        &[("PORTAL_DB", env_db)],
    )
    .await
    .assert_ok();
    run(
        d,
        &[
            "--db", flag_db, "user", "add", "--id", "flaguser", "--email", "f@x", "--name", "F",
        ],
        &[("PORTAL_DB", env_db)],
    )
    .await
    .assert_ok();
    let out = run(d, &["user", "list"], &[("PORTAL_DB", env_db)]).await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "envuser\te@x\tE");
    assert!(
        !d.join("portal-sync.db").exists(),
        "PORTAL_DB was used, not the default file"
    );

    let env_rows = open_store(&env_path);
    assert_eq!(users_with_id(&*env_rows, "envuser"), 1);
    assert_eq!(users_with_id(&*env_rows, "flaguser"), 0);
    let flag_rows = open_store(&flag_path);
    assert_eq!(user_count(&*flag_rows), 1);
    assert_eq!(users_with_id(&*flag_rows, "flaguser"), 1);

    run(
        d,
        &[
            "user", "add", "--id", "dflt", "--email", "d@x", "--name", "D",
        ],
        &[],
    )
    .await
    .assert_ok();
    assert!(
        d.join("portal-sync.db").exists(),
        "the default database file"
    );
}

// ---------------------------------------------------------------------------
// demo

/// `demo` without a secret prints the bound address and a token per user; carol's
/// printed URL connects as a viewer of `demo` with the seeded items; bob's token
/// works in an Authorization header and alice's over REST. On SIGTERM the open
/// socket is closed 1001 "server shutting down" and the process exits 0 within
/// 15 s. With RUST_LOG=debug no token (valid or not) appears in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_printed_tokens_and_shuts_down_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "demo.db");
    let demo = start_demo(dir.path(), &db_path, &[("RUST_LOG", "debug")]).await;

    // The tokens are for alice, bob and carol, signed with the printed secret.
    let tokens = Tokens::new(demo.secret.as_bytes(), 0);
    for (token, user) in demo.tokens.iter().zip(["alice", "bob", "carol"]) {
        assert_eq!(
            tokens
                .verify(token)
                .expect("printed token verifies")
                .user_id,
            user
        );
        assert!(
            demo.stdout.contains(&format!("Bearer {token}")),
            "a curl line for {user}"
        );
    }

    let mut carol = open_ws(demo.ws_urls[2].as_str().into_client_request().expect("url")).await;
    let connected = carol.recv().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["portalViewId"], "demo");
    assert_eq!(connected["userId"], "carol");
    assert_eq!(connected["role"], "viewer");
    let items = connected["state"]["items"]
        .as_object()
        .expect("state.items is an object");
    assert!(!items.is_empty(), "the demo state has items: {connected}");

    // bob with the token in a header (not the query string).
    let mut request = format!(
        "{}/ws/portal-view/demo",
        demo.base.replacen("http://", "ws://", 1)
    )
    .into_client_request()
    .expect("url");
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", demo.tokens[1])).expect("header"),
    );
    let mut bob = open_ws(request).await;
    let connected = bob.recv().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["userId"], "bob");
    assert_eq!(connected["role"], "controller");
    bob.send(json!({"type": "portal-view-update", "payload": {"currentItem": "2"}, "id": 1}))
        .await;
    assert_eq!(
        bob.recv_type("ack").await,
        json!({"type": "ack", "id": 1, "version": 1})
    );
    let update = carol.recv().await;
    assert_eq!(update["type"], "portal-view-update");
    assert_eq!(update["payload"], json!({"currentItem": "2"}));

    // alice over REST; and a bogus token that must not be logged either.
    let bogus = "bogus-token-4f7c2a9e1d";
    let http = reqwest::Client::new();
    let (status, body) = http_json(
        http.get(format!("{}/api/portal-views/demo", demo.base))
            .bearer_auth(&demo.tokens[0]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"]["currentItem"], "2");
    let (status, _) = http_json(
        http.get(format!("{}/api/portal-views/demo", demo.base))
            .bearer_auth(bogus),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) =
        http_json(http.get(format!("{}/api/portal-views/demo?token={bogus}", demo.base))).await;
    assert_eq!(status, 401);
    drop(http);

    let all_tokens = demo.tokens.clone();
    let stop = tokio::spawn(demo.stop());
    carol.assert_closed(1001, "server shutting down").await;
    bob.assert_closed(1001, "server shutting down").await;
    finish_close(&mut carol).await;
    finish_close(&mut bob).await;
    let (code, logs) = tokio::time::timeout(EXIT_WAIT + RUN_WAIT, stop)
        .await
        .expect("stopped in time")
        .expect("stop task");
    assert_eq!(code, Some(0), "exit 0 after SIGTERM; logs:\n{logs}");

    assert!(
        logs.contains("listening"),
        "debug logs were written: {logs}"
    );
    for token in &all_tokens {
        assert!(
            !logs.contains(token.as_str()),
            "a token appears in the logs:\n{logs}"
        );
        let signature = token.rsplit('.').next().expect("signature");
        assert!(
            !logs.contains(signature),
            "a token's signature appears in the logs:\n{logs}"
        );
    }
    assert!(
        !logs.contains(bogus),
        "an invalid token appears in the logs:\n{logs}"
    );
    let stored = db_path.open().view("demo").expect("read").expect("row");
    assert_eq!(stored.version, 1, "the acked update was stored before exit");
}

/// Running `demo` twice on the same database works: the seed is idempotent
/// (one library, three users, one view) and keeps the state changed in the first
/// run; the second run takes its secret from PORTAL_JWT_SECRET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_twice_on_the_same_database_keeps_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "demo.db");

    let first = start_demo(dir.path(), &db_path, &[]).await;
    let http = reqwest::Client::new();
    let (status, body) = http_json(
        http.patch(format!("{}/api/portal-views/demo", first.base))
            .bearer_auth(&first.tokens[0])
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"currentItem":"3"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    drop(http);
    let (code, logs) = first.stop().await;
    assert_eq!(code, Some(0), "{logs}");

    let second = start_demo(
        dir.path(),
        &db_path,
        &[("PORTAL_JWT_SECRET", "given-secret")],
    )
    .await;
    assert_eq!(second.secret, "given-secret");
    let tokens = Tokens::new(b"given-secret", 0);
    for (token, user) in second.tokens.iter().zip(["alice", "bob", "carol"]) {
        assert_eq!(
            tokens
                .verify(token)
                .expect("signed with PORTAL_JWT_SECRET")
                .user_id,
            user
        );
    }
    let http = reqwest::Client::new();
    let (status, body) = http_json(
        http.get(format!("{}/api/portal-views/demo", second.base))
            .bearer_auth(&second.tokens[2]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1, "not reseeded");
    assert_eq!(body["state"]["currentItem"], "3");
    assert!(body["state"]["items"].is_object());
    drop(http);
    let (code, logs) = second.stop().await;
    assert_eq!(code, Some(0), "{logs}");

    let db = db_path.open();
    assert_eq!(user_count(&*db), 3);
    assert_eq!(library_count(&*db), 1);
    assert_eq!(member_count(&*db), 3);
    assert_eq!(view_count(&*db), 1);

    // With its view removed (the library and users left), the seed adds
    // the view again rather than failing on the library it finds.
    admin(dir.path(), &db_path, &["view", "remove", "--id", "demo"])
        .await
        .assert_ok();
    let third = start_demo(dir.path(), &db_path, &[]).await;
    let (code, logs) = third.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    let view = db.view("demo").expect("read").expect("seeded again");
    assert_eq!(view.version, 0);
    assert_eq!(library_count(&*db), 1);
    assert_eq!(user_count(&*db), 3);
}

/// `demo` without a configured secret keeps the one it makes in
/// `<db>.secret` (mode 0600) and says so: a token printed by the first run
/// opens a WebSocket on the second. With PORTAL_JWT_SECRET set, that secret
/// is used and the kept file is neither read nor changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_keeps_its_secret_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "kept.db");
    // Beside the SQLite file; on PostgreSQL in the working directory.
    let kept = if common::db::on_postgres() {
        PathBuf::from("portal-sync-demo.secret")
    } else {
        dir.path().join("kept.db.secret")
    };

    let first = start_demo(dir.path(), &db_path, &[]).await;
    let says = format!(
        "(secret kept in {} so these links stay valid across restarts)",
        kept.display()
    );
    assert!(first.stdout.contains(&says), "{}", first.stdout);
    let kept = dir.path().join(&kept);
    let stored = std::fs::read_to_string(&kept).expect("secret file");
    assert_eq!(stored.trim(), first.secret);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kept).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let carol_url = first.ws_urls[2].clone();
    let (code, logs) = first.stop().await;
    assert_eq!(code, Some(0), "{logs}");

    let second = start_demo(dir.path(), &db_path, &[]).await;
    assert_eq!(second.secret, stored.trim(), "the same secret");
    assert!(second.stdout.contains(&says), "{}", second.stdout);
    // The first run's URL, pointed at the second run's port.
    let port = |base: &str| base.rsplit(':').next().unwrap_or_default().to_string();
    let old_port = carol_url
        .trim_start_matches("ws://127.0.0.1:")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let url = carol_url.replacen(
        &format!("127.0.0.1:{old_port}"),
        &format!("127.0.0.1:{}", port(&second.base)),
        1,
    );
    let mut carol = open_ws(url.as_str().into_client_request().expect("url")).await;
    let connected = carol.recv().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["userId"], "carol");
    drop(carol);
    let (code, logs) = second.stop().await;
    assert_eq!(code, Some(0), "{logs}");

    let given = "given-demo-secret-0123456789abcdef";
    let third = start_demo(dir.path(), &db_path, &[("PORTAL_JWT_SECRET", given)]).await;
    assert_eq!(third.secret, given);
    assert!(
        third
            .stdout
            .contains("(secret from --jwt-secret, --jwt-secret-file or their PORTAL_ variables"),
        "{}",
        third.stdout
    );
    let (code, logs) = third.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    assert_eq!(std::fs::read_to_string(&kept).expect("still there"), stored);
}

// ---------------------------------------------------------------------------
// Process faults and shutdown (SPEC §3.2, §3.4)

/// Sends `n` acked updates `{"n": i}` back to back from bob and returns the
/// socket; the demo view starts at version 0, so update i becomes version i.
async fn stream_updates(demo: &Demo, n: usize) -> Client {
    let mut bob = open_ws(demo.ws_urls[1].as_str().into_client_request().expect("url")).await;
    assert_eq!(bob.recv().await["type"], "connected");
    for i in 1..=n {
        bob.send(json!({"type": "portal-view-update", "payload": {"n": i}, "id": i}))
            .await;
    }
    bob
}

/// Reads acks until the socket ends; returns the highest acked version.
async fn read_acks(bob: &mut Client, stop_after: Option<i64>) -> i64 {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut highest = 0;
    loop {
        let frame = tokio::time::timeout(WAIT, bob.ws.next())
            .await
            .expect("the stream moves");
        match frame {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).expect("json");
                assert_eq!(m["type"], "ack", "{m}");
                let v = m["version"].as_i64().expect("version");
                assert_eq!(m["id"], v, "update i is version i");
                assert!(v > highest, "acks in order");
                highest = v;
                if Some(highest) == stop_after {
                    return highest;
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "server shutting down");
                return highest;
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return highest,
        }
    }
}

const UNLIMITED_RATE: [(&str, &str); 2] = [
    ("PORTAL_RATE_PER_SEC", "1000000"),
    ("PORTAL_RATE_BURST", "1000000"),
];

/// SIGKILL in the middle of a stream of acknowledged updates: after a restart,
/// every acknowledged version is stored (`--sqlite-synchronous full`, the
/// default), and the state is the one of the stored version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_update_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "demo.db");
    let mut demo = start_demo(dir.path(), &db_path, &UNLIMITED_RATE).await;
    let mut bob = stream_updates(&demo, 2000).await;
    let acked = read_acks(&mut bob, Some(300)).await;
    demo.child.start_kill().expect("SIGKILL");
    let status = tokio::time::timeout(EXIT_WAIT, demo.child.wait())
        .await
        .expect("killed in time")
        .expect("wait");
    assert_eq!(status.code(), None, "killed by a signal");
    // Acks that were in flight when the process died count too.
    let acked = acked.max(read_acks(&mut bob, None).await);

    let restarted = start_demo(dir.path(), &db_path, &[]).await;
    let stored = db_path.open().view("demo").expect("read").expect("row");
    assert!(
        stored.version >= acked,
        "acked version {acked} lost: stored {}",
        stored.version
    );
    let state: Value = serde_json::from_str(stored.state.get()).expect("state");
    assert_eq!(state["n"], stored.version, "state matches its version");
    let (code, logs) = restarted.stop().await;
    assert_eq!(code, Some(0), "{logs}");
}

/// SIGTERM while a controller is streaming: what was already received is
/// committed and acked before the 1001 close, the acked versions are stored,
/// and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_pending_writes_then_closes_1001() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = TestDb::empty(dir.path(), "demo.db");
    let demo = start_demo(dir.path(), &db_path, &UNLIMITED_RATE).await;
    let mut carol = open_ws(demo.ws_urls[2].as_str().into_client_request().expect("url")).await;
    assert_eq!(carol.recv().await["type"], "connected");
    let mut bob = stream_updates(&demo, 500).await;
    let stop = tokio::spawn(demo.stop());
    let acked = read_acks(&mut bob, None).await;
    // The viewer gets every committed version, in order, then the 1001.
    let mut seen = 0;
    loop {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        match tokio::time::timeout(WAIT, carol.ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).expect("json");
                assert_eq!(m["version"], seen + 1, "gapless: {m}");
                seen += 1;
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("the viewer's socket ended without a close: {other:?}"),
        }
    }
    let (code, logs) = tokio::time::timeout(EXIT_WAIT + RUN_WAIT, stop)
        .await
        .expect("stopped in time")
        .expect("stop task");
    assert_eq!(code, Some(0), "{logs}");
    let stored = db_path.open().view("demo").expect("read").expect("row");
    assert!(acked > 0, "some updates were acked before the close");
    assert!(
        stored.version >= acked,
        "acked {acked}, stored {}",
        stored.version
    );
    assert_eq!(seen, stored.version, "the viewer saw every stored version");
}

/// A database file that is not SQLite: `serve` refuses to start with a message
/// instead of serving errors.
#[tokio::test]
async fn serve_refuses_a_corrupt_database_file() {
    sqlite_only!();
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join("corrupt.db");
    std::fs::write(&db_path, vec![0x5a; 64 * 1024]).expect("write garbage");
    let db = db_path.to_str().expect("utf-8");
    let out = run(
        dir.path(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db,
            "--jwt-secret",
            "s",
        ],
        &[],
    )
    .await;
    out.assert_failed(Some("not a database"));
    assert_eq!(
        std::fs::read(&db_path).expect("read back"),
        vec![0x5a; 64 * 1024],
        "the file was left as it was"
    );
}

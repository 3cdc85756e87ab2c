//! The admin CLI as an operator meets it (issue 16, item 3), run as the
//! real binary: errors that name what is missing, exit codes, the owner
//! rule, `remove`, `--json`, help on every flag, the secret flag only where
//! it matters, `token`'s checks, and a database that cannot be opened.
//! On either engine (`PORTAL_TEST_PG_URL`: tests/common/db.rs).

mod common;
use common::binary::*;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::Tokens;
use portal_sync::store::Store;
use serde_json::{json, Value};

/// Runs `--db <db> <args…>` (args split on spaces).
async fn cli(dir: &Path, db: &TestDb, args: &str) -> Output {
    let db = db.arg();
    let mut all = vec!["--db", db.as_str()];
    all.extend(args.split_whitespace());
    run(dir, &all, &[]).await
}

/// A database with users alice, bob and carol; library `lib` owned by alice
/// with bob a VIEWER; view `pv` in it.
fn fixture(db: &TestDb) -> std::sync::Arc<dyn Store> {
    let store = db.open();
    let admin = store.admin();
    for id in ["alice", "bob", "carol"] {
        admin
            .add_user(id, &format!("{id}@x"), id)
            .expect("add user");
    }
    admin.add_library("lib", "L", "alice").expect("library");
    admin
        .set_member("lib", "bob", LibraryRole::Viewer)
        .expect("member");
    admin
        .add_view("pv", "lib", "V", &serde_json::Map::new())
        .expect("view");
    store
}

fn assert_refused(out: &Output, code: i32, line: &str) {
    assert_eq!(out.code, Some(code), "exit code; stderr: {}", out.stderr);
    assert_eq!(out.stderr.trim(), line, "the one line on stderr");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
}

/// Each failure names what is missing or in the way, on one line, with the
/// documented exit code (3 not found, 4 conflict, 2 usage), and writes nothing.
#[tokio::test]
async fn admin_errors_name_what_is_missing_with_their_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = TestDb::empty(d, "errors.db");
    let store = fixture(&db);
    let cases = [
        (
            "member set --library lib --user ghost --role EDITOR",
            3,
            "error: user ghost not found",
        ),
        (
            "member set --library nolib --user bob --role EDITOR",
            3,
            "error: library nolib not found",
        ),
        (
            "member remove --library nolib --user bob",
            3,
            "error: library nolib not found",
        ),
        (
            "member remove --library lib --user ghost",
            3,
            "error: user ghost not found",
        ),
        (
            "member remove --library lib --user carol",
            3,
            "error: carol is not a member of lib",
        ),
        (
            "member list --library nolib",
            3,
            "error: library nolib not found",
        ),
        (
            "member list --library nolib --json",
            3,
            "error: library nolib not found",
        ),
        (
            "library add --id lib2 --name L --owner ghost",
            3,
            "error: user ghost not found",
        ),
        (
            "view add --id pv2 --library nolib --name V",
            3,
            "error: library nolib not found",
        ),
        (
            "view show --id nope",
            3,
            "error: portal view nope not found",
        ),
        ("user show --id ghost", 3, "error: user ghost not found"),
        (
            "library show --id nolib --json",
            3,
            "error: library nolib not found",
        ),
        ("user remove --id ghost", 3, "error: user ghost not found"),
        (
            "library remove --id nolib --force",
            3,
            "error: library nolib not found",
        ),
        (
            "view remove --id nope",
            3,
            "error: portal view nope not found",
        ),
        (
            "user add --id alice --email new@x --name A",
            4,
            "error: user alice already exists",
        ),
        (
            "user add --id alice2 --email alice@x --name A",
            4,
            "error: email alice@x is already used by user alice",
        ),
        (
            "library add --id lib --name L --owner bob",
            4,
            "error: library lib already exists",
        ),
        (
            "view add --id pv --library lib --name V",
            4,
            "error: portal view pv already exists",
        ),
    ];
    for (args, code, line) in cases {
        let out = cli(d, &db, args).await;
        assert_refused(&out, code, line);
    }
    // A role clap does not know is a usage error (2).
    let out = cli(d, &db, "member set --library lib --user bob --role ADMIN").await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);

    let admin = store.admin();
    assert_eq!(admin.users().expect("users").len(), 3);
    assert_eq!(admin.libraries().expect("libraries").len(), 1);
    assert_eq!(admin.views().expect("views").len(), 1);
    assert_eq!(
        admin.members("lib").expect("members"),
        vec![portal_sync::store::MemberRow {
            user_id: "bob".into(),
            role: "VIEWER".into()
        }]
    );
}

/// SPEC §4's owner rule, as REST answers 409: the library's `owner_id` user
/// can be neither given a role nor removed as a member, even when they have
/// a member row; exit 4 and the row is left as it was.
#[tokio::test]
async fn the_owner_cannot_be_changed_or_removed_as_a_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = TestDb::empty(d, "owner.db");
    let store = fixture(&db);
    let refused = "error: alice owns library lib: the library's owner cannot be changed this way";
    for role in ["VIEWER", "EDITOR", "OWNER"] {
        let out = cli(
            d,
            &db,
            &format!("member set --library lib --user alice --role {role}"),
        )
        .await;
        assert_refused(&out, 4, refused);
    }
    assert_eq!(
        store.admin().member_role("lib", "alice").expect("read"),
        None
    );
    // With a member row (the demo seed gives the owner one): still refused.
    store
        .admin()
        .set_member("lib", "alice", LibraryRole::Owner)
        .expect("owner row");
    let out = cli(d, &db, "member remove --library lib --user alice").await;
    assert_refused(&out, 4, refused);
    let out = cli(
        d,
        &db,
        "member set --library lib --user alice --role VIEWER",
    )
    .await;
    assert_refused(&out, 4, refused);
    assert_eq!(
        store.admin().member_role("lib", "alice").expect("read"),
        Some("OWNER".into())
    );
    // Others are changed as before.
    let out = cli(d, &db, "member set --library lib --user bob --role EDITOR").await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "bob: VIEWER -> EDITOR in lib");
}

/// `remove` refuses what would leave rows pointing at nothing, naming them,
/// and with `--force` removes them in the same transaction.
#[tokio::test]
async fn remove_refuses_dependents_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = TestDb::empty(d, "remove.db");
    let store = fixture(&db);
    let admin = store.admin();
    admin.add_library("lib2", "L2", "bob").expect("lib2");
    admin
        .set_member("lib2", "carol", LibraryRole::Editor)
        .expect("member");
    admin
        .add_view("pv2", "lib2", "V2", &serde_json::Map::new())
        .expect("view");

    let refusals = [
        ("user remove --id bob", "error: user bob owns 1 library (lib2) and is a member of 1 library (lib): `user remove --force` removes them too"),
        ("user remove --id carol", "error: user carol is a member of 1 library (lib2): `user remove --force` removes them too"),
        ("user remove --id alice", "error: user alice owns 1 library (lib): `user remove --force` removes them too"),
        ("library remove --id lib", "error: library lib has 1 portal view and 1 member: `library remove --force` removes them too"),
    ];
    for (args, line) in refusals {
        assert_refused(&cli(d, &db, args).await, 4, line);
    }
    assert_eq!(admin.users().expect("users").len(), 3);
    assert_eq!(admin.libraries().expect("libraries").len(), 2);
    assert_eq!(admin.views().expect("views").len(), 2);

    // A view has nothing depending on it.
    let out = cli(d, &db, "view remove --id pv").await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "removed portal view pv");
    assert!(store.view("pv").expect("read").is_none());
    assert_eq!(admin.libraries().expect("libraries").len(), 2);

    let out = cli(d, &db, "library remove --id lib2 --force").await;
    out.assert_ok();
    assert_eq!(
        out.stdout.trim(),
        "removed library lib2 (and 1 portal view, 1 member row)"
    );
    assert!(admin.library("lib2").expect("read").is_none());
    assert!(store.view("pv2").expect("read").is_none());
    assert!(admin.members("lib2").expect("members").is_empty());
    // carol has no dependents left: removed without --force.
    let out = cli(d, &db, "user remove --id carol").await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "removed user carol");

    // --cascade is the same flag.
    let out = cli(d, &db, "user remove --id alice --cascade").await;
    out.assert_ok();
    assert_eq!(
        out.stdout.trim(),
        "removed user alice (and 1 library, 1 member row)"
    );
    let users: Vec<String> = admin
        .users()
        .expect("users")
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(users, ["bob"]);
    assert!(admin.libraries().expect("libraries").is_empty());
    assert!(admin.views().expect("views").is_empty());
}

/// A removal on the database of a running server closes the connections it
/// ends (1008 `access revoked`), as membership changes do; the removed
/// view then answers a new handshake 1008 `portal view not found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_close_the_connections_they_end() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut viewer = app.connect("pv1", "v1").await;
    let mut other = app.connect("pv3", "outsider").await;
    let out = cli(dir.path(), &app.database, "view remove --id pv1").await;
    out.assert_ok();
    viewer.assert_closed(1008, "access revoked").await;
    let mut again = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    again.assert_closed(1008, "portal view not found").await;

    // lib2 (outsider's, view pv3) with --force: outsider's socket on pv3 closes.
    let out = cli(
        dir.path(),
        &app.database,
        "library remove --id lib2 --force",
    )
    .await;
    out.assert_ok();
    other.assert_closed(1008, "access revoked").await;
}

/// `list --json` is one JSON array and `show --json` one object, with REST's
/// camelCase names; text output stays tab-separated.
#[tokio::test]
async fn list_and_show_print_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = TestDb::empty(d, "json.db");
    let store = fixture(&db);
    let updated = store
        .view("pv")
        .expect("read")
        .expect("pv")
        .updated_at
        .expect("updatedAt");
    let json_of = |out: &Output| -> Value {
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        serde_json::from_str(&out.stdout).expect("JSON on stdout")
    };
    assert_eq!(
        json_of(&cli(d, &db, "user list --json").await),
        json!([
            {"id": "alice", "email": "alice@x", "name": "alice"},
            {"id": "bob", "email": "bob@x", "name": "bob"},
            {"id": "carol", "email": "carol@x", "name": "carol"},
        ])
    );
    assert_eq!(
        json_of(&cli(d, &db, "library list --json").await),
        json!([{"id": "lib", "name": "L", "ownerId": "alice"}])
    );
    assert_eq!(
        json_of(&cli(d, &db, "member list --library lib --json").await),
        json!([{"userId": "bob", "role": "VIEWER"}])
    );
    assert_eq!(
        json_of(&cli(d, &db, "view list --json").await),
        json!([{"id": "pv", "libraryId": "lib", "name": "V", "version": 0, "updatedAt": updated}])
    );
    assert_eq!(
        json_of(&cli(d, &db, "user show --id bob --json").await),
        json!({"id": "bob", "email": "bob@x", "name": "bob", "ownerOf": [],
               "memberOf": [{"libraryId": "lib", "role": "VIEWER"}]})
    );
    assert_eq!(
        json_of(&cli(d, &db, "library show --id lib --json").await),
        json!({"id": "lib", "name": "L", "ownerId": "alice",
               "members": [{"userId": "bob", "role": "VIEWER"}], "portalViews": ["pv"]})
    );
    assert_eq!(
        json_of(&cli(d, &db, "view show --id pv --json").await),
        json!({"id": "pv", "libraryId": "lib", "name": "V", "state": {}, "version": 0, "updatedAt": updated})
    );
    // Empty lists are `[]`, not nothing.
    assert_eq!(
        json_of(&cli(d, &db, "member list --library lib --json").await)
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    store.admin().remove_member("lib", "bob").expect("remove");
    assert_eq!(
        json_of(&cli(d, &db, "member list --library lib --json").await),
        json!([])
    );
    let out = cli(d, &db, "library show --id lib").await;
    out.assert_ok();
    assert!(out.stdout.contains("ownerId: alice\n"), "{}", out.stdout);
    let out = cli(d, &db, "library list").await;
    out.assert_ok();
    assert_eq!(out.stdout, "lib\tL\talice\n");
}

/// The (name, description) entries of a `--help` section.
fn entries(help: &str, section: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            inside = line == section;
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        let starts_entry = indent <= 6
            && (trimmed.starts_with('-') || trimmed.starts_with('<') || section == "Commands:");
        if starts_entry {
            let (name, rest) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            out.push((name.to_string(), rest.trim().to_string()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(' ');
            last.1.push_str(trimmed);
        }
    }
    out
}

/// What is left of a description without clap's `[env: …]`/`[default: …]`.
fn described(text: &str) -> bool {
    let mut rest = text.to_string();
    while let Some(start) = rest.find('[') {
        let Some(end) = rest[start..].find(']') else {
            break;
        };
        rest.replace_range(start..start + end + 1, "");
    }
    !rest.trim().is_empty()
}

/// Every option and argument of every subcommand, walked through `--help`,
/// has a description.
#[tokio::test]
async fn every_flag_of_every_command_has_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut queue: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = queue.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = run(dir.path(), &args, &[]).await;
        out.assert_ok();
        seen += 1;
        for section in ["Options:", "Arguments:"] {
            for (name, text) in entries(&out.stdout, section) {
                assert!(
                    described(&text),
                    "`portal-sync {} --help`: {name} has no description",
                    path.join(" ")
                );
            }
        }
        for (name, _) in entries(&out.stdout, "Commands:") {
            if name != "help" {
                let mut sub = path.clone();
                sub.push(name);
                queue.push(sub);
            }
        }
    }
    // The root, 8 commands, and their subcommands.
    assert!(seen >= 25, "walked {seen} commands");
}

/// The secret's flags belong to `serve`, `demo`, `token` and `config print`;
/// an admin command refuses them as a usage error (and ignores the
/// environment variables, which it never reads).
#[tokio::test]
async fn the_secret_flags_only_where_they_matter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = TestDb::empty(d, "secret.db");
    fixture(&db);
    let db = db.arg();
    let db = db.as_str();
    for args in [
        vec!["--db", db, "user", "list", "--jwt-secret", "x"],
        vec!["--jwt-secret", "x", "--db", db, "user", "list"],
        vec![
            "--db",
            db,
            "member",
            "list",
            "--library",
            "lib",
            "--jwt-secret-file",
            "f",
        ],
    ] {
        let out = run(d, &args, &[]).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("unexpected argument '--jwt-secret"),
            "{}",
            out.stderr
        );
    }
    for command in ["serve", "demo", "token", "config print"] {
        let mut args: Vec<&str> = command.split(' ').collect();
        args.push("--help");
        let out = run(d, &args, &[]).await;
        out.assert_ok();
        assert!(
            out.stdout.contains("--jwt-secret <"),
            "{command}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("--jwt-secret-file <"), "{command}");
    }
    for command in [
        "user add",
        "library list",
        "member set",
        "view show",
        "config check",
    ] {
        let mut args: Vec<&str> = command.split(' ').collect();
        args.push("--help");
        let out = run(d, &args, &[]).await;
        out.assert_ok();
        assert!(
            !out.stdout.contains("--jwt-secret"),
            "{command}: {}",
            out.stdout
        );
    }
    let out = run(
        d,
        &["--db", db, "user", "list"],
        &[
            ("PORTAL_JWT_SECRET_FILE", "/nonexistent"),
            ("PORTAL_JWT_SECRET", "x"),
        ],
    )
    .await;
    out.assert_ok();
}

/// `token` refuses a user the database does not know (exit 3) and a
/// lifetime that is zero, negative, garbage or over ten years (exit 2),
/// printing no token; with no database file it signs without checking and
/// does not create one.
#[tokio::test]
async fn token_refuses_unknown_users_and_bad_lifetimes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let database = TestDb::empty(d, "token.db");
    fixture(&database);
    let db = database.arg();
    let db = db.as_str();
    let secret = "token-test-secret-0123456789abcdef";
    let out = run(
        d,
        &[
            "--db",
            db,
            "token",
            "--user",
            "ghost",
            "--jwt-secret",
            secret,
        ],
        &[],
    )
    .await;
    assert_refused(&out, 3, &format!("error: user ghost not found in {db}"));
    for (ttl, says) in [
        ("0", "must be more than 0"),
        ("0h", "must be more than 0"),
        ("-5", "is not a duration"),
        ("-1h", "is not a duration"),
        ("soon", "is not a duration"),
        ("3651d", "at most 3650d"),
        ("99999999999999999999", "is not a duration"),
        ("999999999999999999d", "too long"),
    ] {
        let out = run(
            d,
            &[
                "--db",
                db,
                "token",
                "--user",
                "alice",
                "--jwt-secret",
                secret,
                "--ttl",
                ttl,
            ],
            &[],
        )
        .await;
        assert_eq!(out.code, Some(2), "--ttl {ttl}: {}", out.stderr);
        assert!(out.stderr.contains(says), "--ttl {ttl}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "no token for --ttl {ttl}");
    }
    let out = run(
        d,
        &[
            "--db",
            db,
            "token",
            "--user",
            "alice",
            "--jwt-secret",
            secret,
        ],
        &[],
    )
    .await;
    out.assert_ok();
    let verified = Tokens::new(secret.as_bytes(), 0)
        .verify(out.stdout.trim())
        .expect("a valid token");
    assert_eq!(verified.user_id, "alice");

    // What follows is about the SQLite file. On PostgreSQL: a URL's
    // password is not repeated in the refusal.
    if common::db::on_postgres() {
        let with_password = db.replacen('@', ":hunter2@", 1);
        let out = run(
            d,
            &[
                "--db",
                &with_password,
                "token",
                "--user",
                "ghost",
                "--jwt-secret",
                secret,
            ],
            &[],
        )
        .await;
        let shown = db.replacen('@', ":***@", 1);
        assert_refused(&out, 3, &format!("error: user ghost not found in {shown}"));
        return;
    }
    let absent = d.join("absent.db");
    let absent_text = absent.to_str().expect("utf-8");
    let out = run(
        d,
        &[
            "--db",
            absent_text,
            "token",
            "--user",
            "anyone",
            "--jwt-secret",
            secret,
        ],
        &[],
    )
    .await;
    out.assert_ok();
    assert!(!absent.exists(), "token created no database");
}

const LONG: &str = "unopenable-test-secret-0123456789abcdef";

/// A database path that cannot be opened (a directory, a file that is not
/// SQLite) fails at once with one line naming it, not after 5 s of pool
/// retries, for the admin commands and for `serve`.
#[tokio::test]
async fn an_unopenable_database_fails_at_once_with_one_line() {
    sqlite_only!();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let folder = d.join("a-directory");
    std::fs::create_dir(&folder).expect("mkdir");
    let garbage = d.join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).expect("write");
    let cases = [
        (folder.to_str().expect("utf-8"), "it is a directory"),
        (garbage.to_str().expect("utf-8"), "file is not a database"),
    ];
    for (path, says) in cases {
        for args in [
            vec!["--db", path, "user", "list"],
            vec![
                "--db",
                path,
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--jwt-secret",
                LONG,
            ],
        ] {
            let started = Instant::now();
            let out = run(d, &args, &[]).await;
            let took = started.elapsed();
            assert!(took < Duration::from_secs(1), "{args:?} took {took:?}");
            assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
            // `serve` logs its start at info (the open-file limit) before
            // it opens the database; the failure is one line of its own.
            let lines: Vec<&str> = out
                .stderr
                .trim()
                .lines()
                .filter(|l| !l.contains(" INFO "))
                .collect();
            assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
            assert!(
                lines[0].contains(&format!("cannot open the database {path}: {says}")),
                "{}",
                lines[0]
            );
        }
    }
}

/// Adds racing for one id: exactly one wins, every other is told the id is
/// taken (on PostgreSQL a duplicate committed between the check and the
/// insert is named the same way, not a unique-constraint error).
#[test]
fn racing_adds_of_one_id_get_one_winner_and_named_conflicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = TestDb::empty(dir.path(), "race.db");
    let store = fixture(&db);
    let outcomes = |add: &(dyn Fn(usize) -> Result<(), portal_sync::domain::error::Error>
                          + Sync)| {
        let barrier = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        add(i).map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect::<Vec<_>>()
        })
    };
    let users = outcomes(&|i| store.admin().add_user("dup", &format!("dup{i}@x"), "D"));
    let emails = outcomes(&|i| store.admin().add_user(&format!("mail{i}"), "same@x", "M"));
    let views = outcomes(&|_| {
        store
            .admin()
            .add_view("pvdup", "lib", "V", &serde_json::Map::new())
    });
    for (results, taken) in [
        (users, "user dup already exists".to_string()),
        (views, "portal view pvdup already exists".to_string()),
    ] {
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(refused, &taken);
        }
    }
    assert_eq!(emails.iter().filter(|r| r.is_ok()).count(), 1, "{emails:?}");
    for refused in emails.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            refused.contains("email same@x is already used by user mail"),
            "{refused}"
        );
    }
}

//! The config file (issue 16, item 5) and `--addr` host names, run as the
//! real binary: precedence flag > environment > file > default, `config
//! check`'s errors naming the key, `config print`'s redaction, `config init`,
//! and a server started from a file.

mod common;
use common::binary::*;
use common::*;

use std::path::{Path, PathBuf};

use portal_sync::protocol::auth::Tokens;
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `config print`'s TOML, parsed, and its `# source` comment per key.
fn printed(out: &Output) -> (toml::Table, Vec<(String, String)>) {
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let table: toml::Table = out.stdout.parse().expect("config print is TOML");
    let sources = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, rest) = l.split_once(" = ")?;
            let (_, source) = rest.rsplit_once("  # ")?;
            Some((key.to_string(), source.to_string()))
        })
        .collect();
    (table, sources)
}

fn source_of<'a>(sources: &'a [(String, String)], key: &str) -> &'a str {
    sources
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, s)| s.as_str())
        .unwrap_or_else(|| panic!("no {key} in {sources:?}"))
}

/// Each level wins over the ones below it: a flag over the environment over
/// the file over the default; `PORTAL_CONFIG` names the file like `--config`.
#[tokio::test]
async fn settings_take_flag_then_environment_then_file_then_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let file = write(
        d,
        "portal-sync.toml",
        "rate-burst = 5\nmax-message-bytes = 1000\nmax-conns = 77\n\
         allowed-origins = [\"https://a.example\", \"https://b.example\"]\n\
         sqlite-synchronous = \"normal\"\ndb = \"from-file.db\"\n",
    );
    let envs = [
        ("PORTAL_RATE_BURST", "6"),
        ("PORTAL_MAX_MESSAGE_BYTES", "2000"),
    ];
    let out = run(
        d,
        &[
            "config",
            "print",
            "--config",
            text(&file),
            "--rate-burst",
            "9",
        ],
        &envs,
    )
    .await;
    let (table, sources) = printed(&out);
    let expect = [
        ("rate-burst", json!(9), "flag"),
        (
            "max-message-bytes",
            json!(2000),
            "environment PORTAL_MAX_MESSAGE_BYTES",
        ),
        ("max-conns", json!(77), "file"),
        ("sqlite-synchronous", json!("normal"), "file"),
        ("db", json!("from-file.db"), "file"),
        (
            "allowed-origins",
            json!(["https://a.example", "https://b.example"]),
            "file",
        ),
        ("max-conns-per-user", json!(32), "default"),
        ("ping-interval", json!(25), "default"),
        ("addr", json!("127.0.0.1:3000"), "default"),
    ];
    for (key, value, source) in expect {
        let got = serde_json::to_value(&table[key]).expect("as json");
        assert_eq!(got, value, "{key}: {}", out.stdout);
        assert_eq!(source_of(&sources, key), source, "{key}");
    }
    // The same file through PORTAL_CONFIG; the environment's level only.
    let out = run(
        d,
        &["config", "print"],
        &[("PORTAL_CONFIG", text(&file)), ("PORTAL_RATE_BURST", "6")],
    )
    .await;
    let (table, sources) = printed(&out);
    assert_eq!(table["rate-burst"].as_integer(), Some(6));
    assert_eq!(
        source_of(&sources, "rate-burst"),
        "environment PORTAL_RATE_BURST"
    );
    assert_eq!(table["max-message-bytes"].as_integer(), Some(1000));
    assert_eq!(source_of(&sources, "max-message-bytes"), "file");
    // No file: defaults.
    let out = run(d, &["config", "print"], &[]).await;
    let (table, sources) = printed(&out);
    assert_eq!(table["rate-burst"].as_integer(), Some(200));
    assert_eq!(source_of(&sources, "rate-burst"), "default");
}

/// `serve --config FILE` runs with the file's address, database, secret and
/// limits: a token signed with its secret is accepted, and a body over its
/// `max-message-bytes` is refused 413.
#[tokio::test]
async fn serve_runs_from_a_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = d.join("served.db");
    seed(&*open_store(&db));
    let secret = "config-file-secret-0123456789abcdef";
    let file = write(
        d,
        "serve.toml",
        &format!(
            "addr = \"127.0.0.1:0\"\ndb = \"{}\"\njwt-secret = \"{secret}\"\nmax-message-bytes = 200\n",
            text(&db)
        ),
    );
    let served = start_serve(d, &["serve", "--config", text(&file)], &[]).await;
    let token = Tokens::new(secret.as_bytes(), 0)
        .issue("owner", 60)
        .expect("token");
    let http = reqwest::Client::new();
    let url = format!("{}/api/portal-views/pv1", served.base);
    let (status, body) = http_json(http.get(&url).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "pv1");
    let big = json!({"text": "x".repeat(300)});
    let (status, body) = http_json(
        http.patch(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(big.to_string()),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let small = json!({"text": "ok"});
    let (status, body) = http_json(
        http.patch(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(small.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(!logs.contains(secret), "the secret is not logged");
    assert_eq!(
        open_store(&db)
            .view("pv1")
            .expect("read")
            .expect("pv1")
            .version,
        1
    );
}

/// `config check` exits 0 for a good file and 1 with one line naming the
/// key for an unknown key, a wrong type, a value the flag refuses, or TOML
/// that does not parse; `serve` refuses such a file the same way.
#[tokio::test]
async fn config_check_names_the_key_and_what_was_expected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let good = write(d, "good.toml", "max-conns = 10\nredis-prefix = \"x\"\n");
    let out = run(d, &["config", "check", text(&good)], &[]).await;
    out.assert_ok();
    assert_eq!(
        out.stdout.trim(),
        format!("{}: ok (2 settings)", text(&good))
    );

    let cases = [
        ("unknown.toml", "max-conn = 10\n", "unknown key `max-conn`"),
        ("type.toml", "max-conns = \"ten\"\n", "`max-conns` must be an integer, not a string"),
        ("bool.toml", "addr = true\n", "`addr` must be a string, not a boolean"),
        ("float.toml", "ping-interval = 2.5\n", "`ping-interval` must be an integer, not a float"),
        ("table.toml", "[serve]\nmax-conns = 1\n", "unknown key `serve`"),
        ("array.toml", "allowed-origins = [1]\n", "`allowed-origins` must be a string or an array of them, not an array holding an integer"),
        ("range.toml", "sync-timeout = 0\n", "`sync-timeout`: invalid value '0' for '--sync-timeout"),
        ("negative.toml", "max-conns = -1\n", "`max-conns`: invalid value '-1'"),
        ("enum.toml", "sqlite-synchronous = \"fast\"\n", "`sqlite-synchronous`: invalid value 'fast' for '--sqlite-synchronous <SQLITE_SYNCHRONOUS>': expected one of \"full\", \"normal\""),
        ("both.toml", "jwt-secret = \"a\"\njwt-secret-file = \"b\"\n", "cannot be used with"),
        ("syntax.toml", "max-conns = \n", "TOML parse error at line 1"),
    ];
    for (name, body, says) in cases {
        let file = write(d, name, body);
        let out = run(d, &["config", "check", text(&file)], &[]).await;
        assert_eq!(out.code, Some(1), "{name}: {}", out.stderr);
        assert!(
            out.stderr.starts_with(&format!("error: {}: ", text(&file))),
            "{name}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(says), "{name}: {}", out.stderr);
        if name != "syntax.toml" {
            assert_eq!(
                out.stderr.trim().lines().count(),
                1,
                "{name}: {}",
                out.stderr
            );
        }
    }
    let bad = write(d, "bad.toml", "max-conns = \"ten\"\n");
    let out = run(
        d,
        &["serve", "--config", text(&bad), "--jwt-secret", "s"],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("`max-conns` must be an integer"),
        "{}",
        out.stderr
    );
    let missing = d.join("missing.toml");
    let out = run(d, &["config", "check", text(&missing)], &[]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
}

/// `config print` never shows the secret or a password in a URL, from the
/// file or the environment.
#[tokio::test]
async fn config_print_redacts_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let file = write(
        d,
        "secrets.toml",
        "jwt-secret = \"file-secret-value\"\n\
         redis-url = \"redis://:redis-password@127.0.0.1:6379\"\n\
         db = \"postgres://app:pg-password@db.example:5432/portal\"\n",
    );
    let out = run(d, &["config", "print", "--config", text(&file)], &[]).await;
    let (table, _) = printed(&out);
    for secret in ["file-secret-value", "redis-password", "pg-password"] {
        assert!(
            !out.stdout.contains(secret),
            "{secret} shown: {}",
            out.stdout
        );
    }
    assert_eq!(table["jwt-secret"].as_str(), Some("***"));
    // A secret in a file others may read is warned about (not shown).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let warning = "holds jwt-secret and is readable by others (mode 644)";
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = run(d, &["config", "print", "--config", text(&file)], &[]).await;
        assert!(out.stderr.contains(warning), "{}", out.stderr);
        assert!(!out.stderr.contains("file-secret-value"), "{}", out.stderr);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let out = run(d, &["config", "print", "--config", text(&file)], &[]).await;
        assert!(!out.stderr.contains("readable by others"), "{}", out.stderr);
    }
    assert_eq!(
        table["redis-url"].as_str(),
        Some("redis://:***@127.0.0.1:6379")
    );
    assert_eq!(
        table["db"].as_str(),
        Some("postgres://app:***@db.example:5432/portal")
    );
    let out = run(
        d,
        &["config", "print"],
        &[("PORTAL_JWT_SECRET", "env-secret-value")],
    )
    .await;
    let (table, sources) = printed(&out);
    assert!(!out.stdout.contains("env-secret-value"), "{}", out.stdout);
    assert_eq!(table["jwt-secret"].as_str(), Some("***"));
    assert_eq!(
        source_of(&sources, "jwt-secret"),
        "environment PORTAL_JWT_SECRET"
    );
}

/// `config init` writes every setting of `serve`, commented out at its
/// default; the file checks, and so does it with every default uncommented;
/// it does not overwrite a file unless told to.
#[tokio::test]
async fn config_init_writes_every_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = run(d, &["config", "init"], &[]).await;
    out.assert_ok();
    let file = d.join("portal-sync.toml");
    let written = std::fs::read_to_string(&file).expect("written");
    let help = run(d, &["serve", "--help"], &[]).await;
    help.assert_ok();
    let flags: Vec<&str> = help
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '=']).next())
        .filter(|f| !["help", "config"].contains(f))
        .collect();
    assert!(flags.len() >= 20, "{flags:?}");
    for flag in &flags {
        assert!(
            written.contains(&format!("\n# {flag} = ")),
            "{flag} missing from:\n{written}"
        );
    }
    let out = run(d, &["config", "check", "portal-sync.toml"], &[]).await;
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "portal-sync.toml: ok (0 settings)");
    let uncommented: String = written
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting) if setting.contains(" = ") && !setting.contains('<') => setting,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let all = write(d, "all.toml", &uncommented);
    let out = run(d, &["config", "check", text(&all)], &[]).await;
    out.assert_ok();

    let out = run(d, &["config", "init"], &[]).await;
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    assert!(
        out.stderr.contains("exists (--force overwrites it)"),
        "{}",
        out.stderr
    );
    std::fs::write(&file, "changed").expect("write");
    run(d, &["config", "init", "--force"], &[])
        .await
        .assert_ok();
    assert_eq!(std::fs::read_to_string(&file).expect("read"), written);
}

/// `--addr localhost:0` resolves the name and serves on its first address;
/// an address that is neither IP:port nor host:port is one clear line.
#[tokio::test]
async fn addr_takes_a_host_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = d.join("addr.db");
    seed(&*open_store(&db));
    let served = start_serve(
        d,
        &[
            "serve",
            "--addr",
            "localhost:0",
            "--db",
            text(&db),
            "--jwt-secret",
            "addr-test-secret-0123456789abcdef",
        ],
        &[],
    )
    .await;
    let (status, body) =
        http_json(reqwest::Client::new().get(format!("{}/health", served.base))).await;
    assert_eq!(status, 200, "{body}");
    let (code, _) = served.stop().await;
    assert_eq!(code, Some(0));

    let out = run(
        d,
        &[
            "serve",
            "--addr",
            "localhost",
            "--db",
            text(&db),
            "--jwt-secret",
            "s",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let last = out
        .stderr
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        last,
        "error: --addr localhost: invalid socket address (use HOST:PORT, e.g. 127.0.0.1:3000)"
    );
}

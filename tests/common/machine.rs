//! A node that is the `portal-sync` binary in a process of its own, started
//! from an empty working directory of its own: a stand-in for another machine
//! (SPEC §8). It shares nothing with the others but the database it is given
//! (a PostgreSQL URL) and Redis. It is a [`TestApp`], so every typed client
//! works on it.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use portal_sync::protocol::auth::Tokens;

use super::db::TestDb;
use super::{TestApp, SECRET, WAIT};

/// Starts a node on `database`, fanning out through the Redis at `redis`
/// under `prefix`, and waits until it serves and reaches Redis.
pub async fn spawn_machine(database: &Arc<TestDb>, redis: &str, prefix: &str) -> TestApp {
    let dir = tempfile::tempdir().expect("a working directory of its own");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal-sync"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTAL_") {
            cmd.env_remove(&key);
        }
    }
    let child = cmd
        .arg("serve")
        .arg("--addr")
        .arg(addr.to_string())
        .current_dir(dir.path())
        .env("PORTAL_DB", database.arg())
        .env("PORTAL_JWT_SECRET", SECRET)
        .env("PORTAL_REDIS_URL", redis)
        .env("PORTAL_REDIS_PREFIX", prefix)
        .env(
            "RUST_LOG",
            std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the binary");
    let mut config = super::config_for(database);
    config.redis_url = Some(redis.to_string());
    config.redis_prefix = prefix.to_string();
    let app = TestApp {
        addr,
        database: database.clone(),
        config,
        db: database.open(),
        tokens: Tokens::new(SECRET.as_bytes(), 0),
        stop: None,
        handle: None,
        child: Some(child),
        _dir: Some(dir),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = reqwest::get(app.http_url("/health")).await {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if body["redis"] == "up" {
                return app;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node did not start: {}",
            app.node_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// SIGKILL: the node ends with no goodbye to anyone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("a node process");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// What the node process logged (stderr), for failure messages.
    pub fn node_log(&self) -> String {
        self._dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("node.log")).ok())
            .unwrap_or_default()
    }
}

//! Running the `portal-sync` binary as a child process: a clean environment,
//! its output, signals, and waiting for what it logs.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::WAIT;

/// How long a short command (admin, token, a refused serve) may take.
pub const RUN_WAIT: Duration = Duration::from_secs(30);
/// SPEC §3.4 gives 10 s to shut down; this leaves room for a loaded machine.
pub const EXIT_WAIT: Duration = Duration::from_secs(15);

/// The binary with a clean environment: no `PORTAL_*` or `RUST_LOG` from the
/// caller, run in `dir` so default database files land there, killed if the
/// test drops it.
pub fn portal_sync(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal-sync"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTAL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("RUST_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "exit code; stderr: {}", self.stderr);
        self
    }

    /// Non-zero exit with a message on stderr containing `needle` (if given).
    pub fn assert_failed(&self, needle: Option<&str>) -> &Self {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit, got {:?}; stdout: {}",
            self.code,
            self.stdout
        );
        assert!(!self.stderr.trim().is_empty(), "a message on stderr");
        if let Some(needle) = needle {
            assert!(
                self.stderr.contains(needle),
                "stderr should mention {needle:?}: {}",
                self.stderr
            );
        }
        self
    }
}

/// Runs the binary to completion (bounded by RUN_WAIT).
pub async fn run(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = portal_sync(dir);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn portal-sync");
    let out = tokio::time::timeout(RUN_WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("portal-sync {args:?} did not finish in time"))
        .expect("wait");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends SIGTERM to `child` with the `kill` utility.
pub fn sigterm(child: &Child) {
    let pid = child.id().expect("child still running");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// Waits (bounded) for the child to exit; returns its exit code.
pub async fn exit_code(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(EXIT_WAIT, child.wait())
        .await
        .expect("the server exits within 15 s of SIGTERM")
        .expect("wait")
        .code()
}

/// Collects a child's stderr in the background so the pipe never fills.
pub fn collect(
    mut stream: impl AsyncReadExt + Unpin + Send + 'static,
) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    (text, task)
}

/// Waits until the collected text contains `needle`; returns the whole text.
pub async fn wait_for_text(text: &Arc<Mutex<String>>, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + RUN_WAIT;
    loop {
        let now = text.lock().expect("lock").clone();
        if now.contains(needle) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in time; got: {now}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn http_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    tokio::time::timeout(WAIT, async move {
        let answer = super::contract::send_checked(request).await;
        let body = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        (answer.status.as_u16(), body)
    })
    .await
    .expect("answer in time")
}

/// A running `portal-sync serve` (or `demo`) and what it has logged so far.
pub struct Served {
    pub child: Child,
    /// `http://127.0.0.1:<port>`, from its `listening on` line.
    pub base: String,
    pub stderr: Arc<Mutex<String>>,
    stderr_task: JoinHandle<()>,
}

/// Starts the binary with `args` (which should include `--addr 127.0.0.1:0`)
/// and `RUST_LOG=info`, and waits for its `listening on` line.
pub async fn start_serve(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Served {
    let mut cmd = portal_sync(dir);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn portal-sync");
    let (stderr, stderr_task) = collect(child.stderr.take().expect("stderr"));
    let logs = wait_for_text(&stderr, "listening on http://").await;
    let start = logs.find("listening on http://").expect("found") + "listening on ".len();
    let base: String = logs[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || ":/.".contains(*c))
        .collect();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    Served {
        child,
        base,
        stderr,
        stderr_task,
    }
}

impl Served {
    /// What it has logged until now.
    pub fn logs(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// SIGTERM, then the exit code (bounded) and everything it logged.
    pub async fn stop(mut self) -> (Option<i32>, String) {
        sigterm(&self.child);
        let code = exit_code(&mut self.child).await;
        let _ = tokio::time::timeout(RUN_WAIT, &mut self.stderr_task).await;
        let logs = self.logs();
        (code, logs)
    }
}

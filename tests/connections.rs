//! Connections before, between and around requests: the open-file limit, a
//! crowd of silent sockets, accept errors (issue 7), the write timeout of
//! HTTP responses (issue 2) and HTTP hygiene (issue 10). The file-descriptor
//! tests run the real binary under `ulimit`, since the limit is a process's.

mod common;
use common::*;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long a `/health` may take to answer while the server is under a crowd
/// of silent sockets (generous for a loaded 2-core machine; without the
/// pending bound it does not answer for 10 s, the header timeout).
const HEALTH_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The binary under a ulimit

/// `portal-sync serve` on a fresh database and a free port, started by bash
/// after `ulimit_args` (e.g. `-n 256`), logging at info.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(ulimit_args: &str) -> Server {
        Server::start_with(ulimit_args, &[]).await
    }

    async fn start_with(ulimit_args: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("conns.db");
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("ulimit {ulimit_args} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_portal-sync"))
            .args(["serve", "--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(["--jwt-secret", "connections-test-secret-0123456789"])
            .args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTAL_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RUST_LOG", "info")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn bash → portal-sync serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().expect("stderr");
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                sink.lock().expect("lock").push_str(&text);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let logs = stderr.lock().expect("lock").clone();
            if let Some(at) = logs.find("listening on http://") {
                let rest = &logs[at + "listening on http://".len()..];
                let addr: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || ".:".contains(*c))
                    .collect();
                break addr.parse().expect("listening address");
            }
            assert!(
                Instant::now() < deadline,
                "the server did not start: {logs}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        Server {
            child,
            addr,
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("server running")
    }

    fn logs(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// The `Max open files` (soft, hard) of the server process.
    fn open_file_limits(&self) -> (u64, u64) {
        open_file_limits(&format!("/proc/{}/limits", self.pid()))
    }

    /// SIGTERM, then the exit code (SPEC §3.4: 0, within the shutdown timeout).
    async fn stop(mut self) -> Option<i32> {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the server exits after SIGTERM")
            .expect("wait")
            .code()
    }
}

/// `Max open files` (soft, hard) from a `/proc/<pid>/limits` file.
fn open_file_limits(path: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(path).expect("read limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    let soft = numbers.next().expect("soft limit");
    let hard = numbers.next().expect("hard limit");
    (soft, hard)
}

/// One `GET` on a fresh TCP connection (so it goes through accept), read to
/// the end: the status and body, or why there is none within `wait`.
async fn get_once(addr: SocketAddr, path: &str, wait: Duration) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let answer = String::from_utf8_lossy(&answer).to_string();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {answer:?}"))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| format!("no answer within {wait:?}"))?
}

/// `/health` answers 200 on a fresh connection within [`HEALTH_WAIT`];
/// returns how long it took.
async fn assert_health(addr: SocketAddr, when: &str) -> Duration {
    let started = Instant::now();
    match get_once(addr, "/health", HEALTH_WAIT).await {
        Ok((200, _)) => started.elapsed(),
        Ok((status, body)) => panic!("/health {when}: {status} {body}"),
        Err(e) => panic!("/health {when}: {e}"),
    }
}

/// One response head and its `Content-Length` body: the status and the body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("status");
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    return (status, body.to_string());
                }
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection ended before a whole response");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a response in time")
}

/// A counter's value in Prometheus text, `None` when it is not there.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Connects and sends nothing; `None` if the connect itself failed.
async fn silent(addr: SocketAddr) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

/// True when the server has closed (or reset) this connection: a read
/// returns EOF or an error within `wait`.
async fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

// ---------------------------------------------------------------------------
// File descriptors, silent sockets, accept errors

/// Issue 7: under `ulimit -n 256` (soft = hard: raising cannot help), 400
/// silent TCP connections, more than the server has descriptors. The default
/// pending bound (half the limit) drops the oldest silent socket for each new
/// one past it, so the server never runs out: `/health` answers on a fresh
/// connection within a few seconds all along, the log has not one `accept
/// failed` line, the process lives, the oldest silent sockets are the ones
/// dropped (the newest still open) and the drops are counted.
///
/// On the base commit the server holds every silent socket until hyper's
/// 10 s header timeout, runs out of descriptors after ~240, logs `accept
/// failed` every 50 ms, and `/health` gets no answer.
#[tokio::test]
async fn a_crowd_of_silent_sockets_under_a_low_fd_limit_does_not_starve_health() {
    let server = Server::start("-n 256").await;
    let addr = server.addr;
    assert_eq!(server.open_file_limits(), (256, 256), "ulimit applied");
    assert_health(addr, "before the crowd").await;

    const CROWD: usize = 400;
    let mut crowd = Vec::with_capacity(CROWD);
    let mut slowest = Duration::ZERO;
    for i in 0..CROWD {
        if let Some(stream) = silent(addr).await {
            crowd.push(stream);
        }
        if i % 25 == 24 {
            let took = assert_health(addr, &format!("after {} silent sockets", i + 1)).await;
            slowest = slowest.max(took);
        }
    }
    assert_eq!(crowd.len(), CROWD, "every connect succeeded");
    for round in 0..10 {
        let took = assert_health(addr, &format!("with the crowd connected ({round})")).await;
        slowest = slowest.max(took);
    }
    eprintln!("slowest /health under the crowd: {slowest:?}");

    // The oldest went first; the newest is still held.
    assert!(
        closed_by_server(&mut crowd[0], Duration::from_secs(5)).await,
        "the oldest silent socket was dropped"
    );
    let last = crowd.last_mut().expect("crowd");
    assert!(
        !closed_by_server(last, Duration::from_millis(200)).await,
        "the newest silent socket is still open"
    );
    let (status, metrics) = get_once(addr, "/metrics", HEALTH_WAIT)
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    let dropped = metric(&metrics, "portal_pending_dropped_total").unwrap_or(0.0);
    assert!(
        dropped >= 100.0,
        "the drops are counted: portal_pending_dropped_total {dropped}"
    );

    // The bound keeps the server from running out at all.
    let logs = server.logs();
    let failures = logs.matches("accept failed").count();
    assert_eq!(failures, 0, "`accept failed` lines:\n{logs}");
    assert!(
        logs.contains("open-file limit 256"),
        "the limit is logged: {logs}"
    );
    drop(crowd);
    assert_eq!(
        server.stop().await,
        Some(0),
        "alive until SIGTERM, then exit 0"
    );
}

/// Issue 7, accept errors: with a pending bound above the descriptors
/// (`--max-pending-conns 1000` under `ulimit -n 256`), the crowd does run the
/// server out of descriptors. Each failed accept drops the oldest silent
/// socket and pauses accepting briefly, so `/health` still answers within a
/// few seconds, and the failures are logged once per 5 s with a count, not a
/// line each (the base commit logs one every 50 ms and never answers).
#[tokio::test]
async fn accept_errors_out_of_descriptors_are_paused_and_logged_sparingly() {
    let server = Server::start_with("-n 256", &["--max-pending-conns", "1000"]).await;
    let addr = server.addr;
    let started = Instant::now();
    let mut crowd = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..400 {
        if let Some(stream) = silent(addr).await {
            crowd.push(stream);
        }
        if i % 50 == 49 {
            let took = assert_health(addr, &format!("after {} silent sockets", i + 1)).await;
            slowest = slowest.max(took);
        }
    }
    for round in 0..5 {
        let took = assert_health(addr, &format!("with the crowd connected ({round})")).await;
        slowest = slowest.max(took);
    }
    let logs = server.logs();
    let failures = logs.matches("accept failed").count();
    eprintln!(
        "slowest /health out of descriptors: {slowest:?}; {failures} `accept failed` lines in {:?}",
        started.elapsed()
    );
    let allowed = 1 + started.elapsed().as_secs() as usize / 5;
    assert!(
        (1..=allowed).contains(&failures),
        "{failures} `accept failed` lines in {:?} (expected 1 to {allowed}):\n{logs}",
        started.elapsed()
    );
    assert!(
        crowd.len() == 400,
        "every connect succeeded ({} of 400)",
        crowd.len()
    );
    assert!(
        closed_by_server(&mut crowd[0], Duration::from_secs(5)).await,
        "the oldest silent socket was dropped for a descriptor"
    );
    drop(crowd);
    assert_eq!(
        server.stop().await,
        Some(0),
        "alive until SIGTERM, then exit 0"
    );
}

/// Issue 7, keep-alive: a connection that has had its answer and waits for
/// its next request counts as waiting, like a new one (hyper's header timeout
/// covers it too, but only after 10 s); connections busy with a request, an
/// SSE stream or a WebSocket do not. With `max_pending_conns` 4, four silent
/// sockets push out the idle keep-alive connection, which is the oldest
/// waiting one, and nothing else.
#[tokio::test]
async fn idle_keep_alive_connections_count_as_waiting_and_sessions_do_not() {
    let app = spawn_app_with(|c| c.max_pending_conns = Some(4)).await;
    let mut keep_alive = TcpStream::connect(app.addr).await.expect("connect");
    keep_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut keep_alive).await.0, 200);
    let mut sse = app.sse("pv1", "v1").await;
    let mut ws = app.connect("pv1", "v2").await;

    let mut crowd = Vec::new();
    for _ in 0..4 {
        crowd.push(TcpStream::connect(app.addr).await.expect("connect"));
    }
    // Dropped at once, not by hyper's header timeout 10 s after its answer.
    assert!(
        closed_by_server(&mut keep_alive, Duration::from_secs(5)).await,
        "the idle keep-alive connection, the oldest waiting, was dropped"
    );
    for (i, stream) in crowd.iter_mut().enumerate() {
        assert!(
            !closed_by_server(stream, Duration::from_millis(200)).await,
            "silent socket {i} is still open"
        );
    }
    ws.assert_alive().await;
    let (status, _) = app
        .post_message(
            "pv1",
            "owner",
            None,
            &json!({"type": "portal-view-update", "payload": {"a": 1}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(sse.recv_type("portal-view-update").await["version"], 1);
    assert_eq!(ws.recv_type("portal-view-update").await["version"], 1);
    // The POST's and this GET's own new connections waited too, each
    // pushing out the oldest silent socket.
    assert_eq!(
        metrics_value(&app, "portal_pending_dropped_total").await,
        Some(3.0)
    );
}

/// Issue 7: started with a soft limit of 256 below a higher hard limit, the
/// server raises its soft limit to the hard one (read from
/// `/proc/<pid>/limits`) and says so once at info.
#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let (_, hard) = open_file_limits("/proc/self/limits");
    assert!(
        hard > 256,
        "this test needs a hard open-file limit above 256 (it is {hard})"
    );
    let server = Server::start("-S -n 256").await;
    assert_eq!(
        server.open_file_limits(),
        (hard, hard),
        "soft limit raised to the hard one"
    );
    let logs = server.logs();
    assert_eq!(
        logs.matches("open-file limit").count(),
        1,
        "logged once: {logs}"
    );
    assert!(
        logs.contains(&format!("open-file limit raised from 256 to {hard}")),
        "{logs}"
    );
    assert_health(server.addr, "after the raise").await;
    assert_eq!(server.stop().await, Some(0));
}

// ---------------------------------------------------------------------------
// The HTTP write timeout

/// A TCP connection with a small receive buffer, so that a peer that does not
/// read stalls the server's writes after a few kilobytes.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// The most a socket's send buffer may grow to (tcp_wmem's maximum).
fn tcp_wmem_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// Reads until the server ends the connection; the bytes read, or `None` if it
/// was still open after `wait`.
async fn drain(stream: &mut TcpStream, wait: Duration) -> Option<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .ok()
}

async fn metrics_value(app: &TestApp, name: &str) -> Option<f64> {
    metric(&metrics(app).await, name)
}

/// Issue 2: 20 GETs of an 8 MB view whose clients never read. With
/// `http_write_timeout` 1 s, the server drops each connection once its writes
/// have made no progress for a second: the counter reaches 20, and each
/// client, draining at last, reads a cut response and then the end of the
/// connection. A reader that reads still gets the whole view.
///
/// On the base commit the responses stay parked in the server (and the
/// sockets open) for as long as the clients keep them.
#[tokio::test]
async fn a_response_its_reader_never_reads_is_dropped_after_the_write_timeout() {
    let app = spawn_app_with(|c| c.http_write_timeout = Duration::from_secs(1)).await;
    // More than the kernel may buffer (the server's send buffer grows up to
    // tcp_wmem's maximum), so that the server's writes do stall.
    let state = tcp_wmem_max() + (4 << 20);
    let mut big = Map::new();
    big.insert("pad".into(), json!("x".repeat(state)));
    app.db
        .admin()
        .add_view("big", "lib1", "Big", &big)
        .expect("big view");

    const READERS: usize = 20;
    let request = format!(
        "GET /api/portal-views/big HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        app.token("v1")
    );
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut stream = small_window(app.addr).await;
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send GET");
        readers.push(stream);
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let timeouts = metrics_value(&app, "portal_http_write_timeouts_total").await;
        if timeouts == Some(READERS as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "portal_http_write_timeouts_total is {timeouts:?}, not {READERS}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut most = 0;
    for (i, stream) in readers.iter_mut().enumerate() {
        let read = drain(stream, Duration::from_secs(10)).await;
        let read = read.unwrap_or_else(|| panic!("reader {i}: the connection is still open"));
        assert!(
            read < state,
            "reader {i}: the response was cut ({read} bytes of more than {state})"
        );
        most = most.max(read);
    }
    eprintln!("the most a cut reader got: {most} bytes of {state}");

    let response = app
        .http()
        .get(app.http_url("/api/portal-views/big"))
        .bearer_auth(app.token("v1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["state"]["pad"].as_str().map(str::len), Some(state));
}

/// Issue 2, the other side: WebSocket and SSE sessions keep their own write
/// deadlines (ping interval + ping timeout), so the HTTP write timeout must
/// not cut them. A WebSocket viewer and an SSE viewer (HTTP/1.0, so the
/// stream is plain bytes) stop reading while updates of 900 KB pile up (more
/// than the kernel buffers: the server's writes stall), for three times the
/// 1 s write timeout; then they read, and each gets every one in order.
/// (Their receive windows are left as they are: read through a small window,
/// megabytes take longer than the sessions' own 35 s write deadline.)
#[tokio::test]
async fn websocket_and_sse_readers_that_pause_are_not_cut_by_the_http_write_timeout() {
    // More than the kernel may buffer, so that the server's writes stall.
    const PAD: usize = 900_000;
    let updates = (tcp_wmem_max() + (4 << 20)).div_ceil(PAD);
    let app = spawn_app_with(|c| {
        c.http_write_timeout = Duration::from_secs(1);
        c.max_message_bytes = 1 << 20;
        c.max_state_bytes = 4 << 20;
        c.send_queue_bytes = 32 << 20;
    })
    .await;
    let mut controller = app.connect("pv1", "owner").await;

    let request = app
        .ws_url("pv1", Some(&app.token("v1")))
        .into_client_request()
        .expect("request");
    let stream = TcpStream::connect(app.addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket handshake");
    let connected = recv_json(&mut ws).await;
    assert_eq!(connected["type"], "connected", "{connected}");

    let mut sse = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "GET /sse/portal-view/pv1 HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        app.token("v2")
    );
    sse.write_all(head.as_bytes()).await.expect("SSE request");
    let mut events = SseBytes::default();
    let connected = events.next(&mut sse).await;
    assert_eq!(connected["type"], "connected", "{connected}");

    for i in 0..updates {
        let pad = char::from(b'a' + (i % 26) as u8).to_string().repeat(PAD);
        controller
            .send(json!({"type": "portal-view-update", "payload": {"pad": pad}, "id": i}))
            .await;
    }
    for _ in 0..updates {
        assert_eq!(controller.recv_type("ack").await["type"], "ack");
    }
    // What is asserted is that nothing cuts the sessions meanwhile, so this
    // waits for time itself: three write timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let reading = Instant::now();
    for version in 1..=updates as i64 {
        let update = recv_json(&mut ws).await;
        assert_eq!(update["type"], "portal-view-update", "WebSocket");
        assert_eq!(update["version"], version, "WebSocket");
        let update = events.next(&mut sse).await;
        assert_eq!(update["type"], "portal-view-update", "SSE");
        assert_eq!(update["version"], version, "SSE");
        assert_eq!(update["payload"]["pad"].as_str().map(str::len), Some(PAD));
    }
    eprintln!("read {updates} updates on each in {:?}", reading.elapsed());
    assert_eq!(
        metrics_value(&app, "portal_http_write_timeouts_total").await,
        Some(0.0)
    );
}

/// An SSE stream read from a raw HTTP/1.0 response: the head, then events.
#[derive(Default)]
struct SseBytes {
    buf: Vec<u8>,
    past_head: bool,
}

impl SseBytes {
    /// The next event's `data`, skipping comments.
    async fn next(&mut self, stream: &mut TcpStream) -> Value {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if !self.past_head {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                    assert!(
                        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
                        "{head}"
                    );
                    self.buf.drain(..end + 4);
                    self.past_head = true;
                }
            }
            if self.past_head {
                while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                    let block = String::from_utf8(block).expect("UTF-8 event");
                    if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                        return serde_json::from_str(data).expect("event data is JSON");
                    }
                }
            }
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("SSE bytes in time")
                .expect("SSE read");
            assert!(n > 0, "the SSE stream ended");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP hygiene

/// Issue 10: every 405 carries `Allow` with exactly the methods its route
/// answers, and every method it names is answered with something else than
/// 405 (so the table of methods and the routes agree). With an allow-list of
/// origins, the routes that answer CORS preflights add `OPTIONS`.
#[tokio::test]
async fn every_405_names_the_methods_its_route_answers() {
    const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    let routes: &[(&str, &str, bool)] = &[
        ("/health", "GET", false),
        ("/metrics", "GET", false),
        ("/api/portal-views/pv1", "GET, PATCH", true),
        ("/api/portal-views/pv1/messages", "POST", true),
        ("/api/libraries/lib1/members/v1", "PUT, DELETE", true),
        ("/ws/portal-view/pv1", "GET", false),
        ("/socket.io/", "GET", false),
        ("/sse/portal-view/pv1", "GET", true),
        ("/", "GET, HEAD", false),
        ("/presenter", "GET, HEAD", false),
        ("/viewer", "GET, HEAD", false),
        ("/assets/client.js", "GET, HEAD", false),
    ];
    const ORIGIN: &str = "https://app.example.com";
    for cors in [false, true] {
        let app = spawn_app_with(|c| {
            if cors {
                c.allowed_origins = vec![ORIGIN.into()];
            }
        })
        .await;
        for (path, methods, preflight) in routes {
            let allow = if cors && *preflight {
                format!("{methods}, OPTIONS")
            } else {
                methods.to_string()
            };
            for method in METHODS {
                let mut request = app
                    .http()
                    .request(method.parse().expect("method"), app.http_url(path));
                if method == "OPTIONS" {
                    request = request
                        .header("origin", ORIGIN)
                        .header("access-control-request-method", "GET");
                }
                let response = request.send().await.expect("request");
                let status = response.status().as_u16();
                let listed = allow.split(", ").any(|m| m == method);
                let context = format!("{method} {path} (CORS {cors})");
                if listed {
                    assert_ne!(status, 405, "{context}: listed in Allow: {allow}");
                } else {
                    assert_eq!(status, 405, "{context}");
                    assert_eq!(
                        response
                            .headers()
                            .get("allow")
                            .and_then(|v| v.to_str().ok()),
                        Some(allow.as_str()),
                        "{context}"
                    );
                }
            }
        }
    }
}

/// Issue 10: two `Host` headers are a 400 with the JSON error body (RFC 9112
/// §3.2), before any route runs: not even the upgrade of a valid WebSocket
/// handshake happens; and the connection is closed after the answer.
#[tokio::test]
async fn two_host_headers_are_a_400_before_any_route() {
    let app = spawn_app().await;
    let token = app.token("owner");
    let requests = [
        "GET /health HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n".to_string(),
        format!(
            "GET /ws/portal-view/pv1?token={token} HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
    ];
    for request in requests {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let (status, body) = read_response(&mut stream).await;
        assert_eq!(status, 400, "{body}");
        let body: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{body}");
        assert_eq!(
            body["error"]["message"], "more than one Host header",
            "{body}"
        );
        assert!(
            closed_by_server(&mut stream, WAIT).await,
            "the connection is closed after the 400"
        );
    }
    wait_connections(&app, 0).await;
}

//! Test harness: a real server on a random port with a temp SQLite file, and
//! typed clients for it (after zero-to-production's `tests/api/helpers.rs`).
//!
//! Logs are off unless `TEST_LOG=1` (then `RUST_LOG` filters them).

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod binary;
pub mod contract;
pub mod db;
pub mod foreign;
pub mod frames;
pub mod machine;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use portal_sync::config::Synchronous;
use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::Tokens;
use portal_sync::store::{Store, ViewRow};
use portal_sync::{Config, Error};

pub use db::TestDb;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";
/// Long enough for a loaded CI machine, short enough to fail fast.
pub const WAIT: Duration = Duration::from_secs(10);

static LOGS: Once = Once::new();

fn init_logs() {
    LOGS.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = pretty_env_logger::formatted_builder()
                .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
                .is_test(true)
                .try_init();
        }
    });
}

/// The fixture every test starts from (SPEC §1 roles):
/// - `lib1` owned by `owner`; members `ed` EDITOR, `om` OWNER, `v1`/`v2` VIEWER,
///   `42` VIEWER (a numeric `sub`);
/// - `lib2` owned by `outsider`, who has no role in `lib1`;
/// - views `pv1`, `pv2` in `lib1` (state `{}`), `pv3` in `lib2`.
pub fn seed(store: &dyn Store) {
    let admin = store.admin();
    for id in ["owner", "ed", "om", "v1", "v2", "42", "outsider"] {
        admin.add_user(id, &format!("{id}@test"), id).expect("user");
    }
    admin
        .add_library("lib1", "Library 1", "owner")
        .expect("lib1");
    admin
        .add_library("lib2", "Library 2", "outsider")
        .expect("lib2");
    for (user, role) in [
        ("ed", LibraryRole::Editor),
        ("om", LibraryRole::Owner),
        ("v1", LibraryRole::Viewer),
        ("v2", LibraryRole::Viewer),
        ("42", LibraryRole::Viewer),
    ] {
        admin.set_member("lib1", user, role).expect("member");
    }
    admin
        .add_view("pv1", "lib1", "View 1", &Map::new())
        .expect("pv1");
    admin
        .add_view("pv2", "lib1", "View 2", &Map::new())
        .expect("pv2");
    admin
        .add_view("pv3", "lib2", "View 3", &Map::new())
        .expect("pv3");
}

/// Opens the store on a SQLite file, as the server and the CLI do.
pub fn open_store(path: &Path) -> Arc<dyn Store> {
    portal_sync::engines::open(path, Synchronous::Normal).expect("open db")
}

/// A server config on a test's database.
pub fn config_for(database: &TestDb) -> Config {
    let mut config = Config::with_database(database.database(), SECRET);
    config.sqlite_synchronous = Synchronous::Normal;
    config
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The test's database (SQLite file or PostgreSQL database), shared with
    /// the peers of a cluster test.
    pub database: Arc<TestDb>,
    pub config: Config,
    pub db: Arc<dyn Store>,
    tokens: Tokens,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), Error>>>,
    /// A server that is the binary in a process of its own (`machine`).
    child: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

/// A seeded server with SPEC's default limits.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A seeded server whose config `tweak` may change.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDb::seeded(dir.path());
    let db = database.open();
    let mut config = config_for(&database);
    tweak(&mut config);
    let tokens = Tokens::new(SECRET.as_bytes(), 0);
    let mut app = TestApp {
        addr: "127.0.0.1:0".parse().expect("addr"),
        database,
        config,
        db,
        tokens,
        stop: None,
        handle: None,
        child: None,
        _dir: Some(dir),
    };
    app.start().await;
    app
}

/// Another server on `first`'s database: a second node of a cluster.
pub async fn spawn_peer(first: &TestApp, config: Config) -> TestApp {
    let mut app = TestApp {
        addr: "127.0.0.1:0".parse().expect("addr"),
        database: first.database.clone(),
        config,
        db: first.db.clone(),
        tokens: Tokens::new(SECRET.as_bytes(), 0),
        stop: None,
        handle: None,
        child: None,
        _dir: None,
    };
    app.start().await;
    app
}

impl TestApp {
    async fn start(&mut self) {
        let listener =
            portal_sync::http::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        self.addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = portal_sync::http::server::run(listener, self.config.clone(), async move {
            let _ = stopped.await;
        });
        self.handle = Some(tokio::spawn(server));
        self.stop = Some(stop);
    }

    /// Graceful shutdown; returns what `server::run` returned.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("server running");
        tokio::time::timeout(WAIT * 2, handle)
            .await
            .expect("server stops in time")
            .expect("server task")
    }

    /// Stops the server and starts a new one on the same database file.
    pub async fn restart(&mut self) {
        self.shutdown().await.expect("clean shutdown");
        self.start().await;
    }

    pub fn token(&self, user: &str) -> String {
        self.tokens.issue(user, 3600).expect("token")
    }

    /// A token with arbitrary claims, signed with `secret`.
    pub fn token_with(&self, secret: &str, claims: Value) -> String {
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    pub fn ws_url(&self, view: &str, token: Option<&str>) -> String {
        match token {
            Some(t) => format!("ws://{}/ws/portal-view/{view}?token={t}", self.addr),
            None => format!("ws://{}/ws/portal-view/{view}", self.addr),
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Opens a socket for `user` on `view` and returns it with its `connected`
    /// message already read and checked.
    pub async fn connect(&self, view: &str, user: &str) -> Client {
        let mut client = self.open(&self.ws_url(view, Some(&self.token(user)))).await;
        let connected = client.recv().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        assert_eq!(connected["portalViewId"], view);
        assert_eq!(connected["userId"], user);
        client.connected = connected;
        client
    }

    /// Opens a socket without reading anything.
    pub async fn open(&self, url: &str) -> Client {
        self.open_request(url.into_client_request().expect("request"))
            .await
    }

    pub async fn open_request(
        &self,
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Client {
        open_ws(request).await
    }

    /// The row as stored right now.
    pub fn stored(&self, view: &str) -> ViewRow {
        self.db.view(view).expect("read").expect("view exists")
    }

    pub fn stored_state(&self, view: &str) -> Value {
        serde_json::from_str(self.stored(view).state.get()).expect("state json")
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens a WebSocket (to any server: a spawned app or a running binary) and
/// checks the 101, without reading anything.
pub async fn open_ws(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Client {
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    Client {
        ws,
        connected: Value::Null,
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `connected` message, when opened with `TestApp::connect`.
    pub connected: Value,
}

impl Client {
    pub async fn send(&mut self, message: Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next JSON message; panics on close, timeout or a non-text frame.
    pub async fn recv(&mut self) -> Value {
        recv_json(&mut self.ws).await
    }

    /// Skips messages until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let message = self.recv().await;
            if message["type"] == ty {
                return message;
            }
        }
    }

    /// Waits for the server's close frame; returns its code and reason.
    /// Panics if a data message arrives first.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close in time");
            match frame {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("expected a close, got {other:?}"),
                Some(Err(e)) => panic!("expected a close frame, got error {e}"),
                None => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// Asserts the close code and that the reason starts with `reason`.
    pub async fn assert_closed(&mut self, code: u16, reason: &str) {
        let (got_code, got_reason) = self.expect_close().await;
        assert_eq!(got_code, code, "close code (reason {got_reason:?})");
        assert!(
            got_reason.starts_with(reason),
            "close reason {got_reason:?} should start with {reason:?}"
        );
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn assert_silent(&mut self, wait: Duration) {
        if let Ok(frame) = tokio::time::timeout(wait, self.ws.next()).await {
            panic!("expected silence, got {frame:?}");
        }
    }

    /// Sends a `ping` and checks the `pong`: proves the socket is still served.
    pub async fn assert_alive(&mut self) {
        self.send(json!({"type": "ping", "id": "alive?"})).await;
        let pong = self.recv().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["id"], "alive?");
    }
}

/// The close code type, for tests that build frames.
/// The next text message of any WebSocket, as JSON (pings and pongs skipped);
/// panics on close, timeout or a non-text frame.
pub async fn recv_json<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .expect("frame");
        match frame {
            Message::Text(text) => {
                let message = serde_json::from_str(text.as_str()).expect("JSON");
                contract::check_server_message(&message);
                return message;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// One Server-Sent Event (SPEC §7).
#[derive(Debug)]
pub struct SseEvent {
    pub data: Value,
    pub id: Option<String>,
}

/// An SSE stream read event by event, as a browser's EventSource reads it.
pub struct SseClient {
    response: reqwest::Response,
    buf: Vec<u8>,
    /// The `connected` message, when opened with `TestApp::sse`.
    pub connected: Value,
    /// Comment lines seen so far (keep-alives).
    pub comments: usize,
}

impl SseClient {
    pub fn new(response: reqwest::Response) -> SseClient {
        SseClient {
            response,
            buf: Vec::new(),
            connected: Value::Null,
            comments: 0,
        }
    }

    pub fn connection_id(&self) -> String {
        self.connected["connectionId"]
            .as_str()
            .expect("connectionId")
            .to_string()
    }

    /// The next event, or `None` when the stream ends; panics after WAIT.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(WAIT, self.next_event_untimed())
            .await
            .expect("an SSE event in time")
    }

    async fn next_event_untimed(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 events");
                let (mut data, mut id) = (None::<String>, None);
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(d) = line.strip_prefix("data:") {
                        assert!(data.is_none(), "one data line per event: {block:?}");
                        data = Some(d.strip_prefix(' ').unwrap_or(d).to_string());
                    } else if let Some(i) = line.strip_prefix("id:") {
                        id = Some(i.trim_start().to_string());
                    } else if !line.is_empty() {
                        panic!("unexpected SSE line {line:?}");
                    }
                }
                if let Some(data) = data {
                    let data = serde_json::from_str(&data).expect("event data is JSON");
                    contract::check_server_message(&data);
                    return Some(SseEvent { data, id });
                }
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "stream ended mid-event: {:?}",
                        self.buf
                    );
                    return None;
                }
            }
        }
    }

    /// The next event's data; panics if the stream ends.
    pub async fn recv(&mut self) -> Value {
        self.next_event().await.expect("stream open").data
    }

    /// Skips events until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let message = self.recv().await;
            if message["type"] == ty {
                return message;
            }
        }
    }

    /// The next event is `closed` with this code and a reason starting with
    /// `reason`, and then the stream ends.
    pub async fn assert_closed(&mut self, code: u16, reason: &str) {
        let closed = self.recv().await;
        assert_eq!(closed["type"], "closed", "{closed}");
        assert_eq!(closed["code"], code, "{closed}");
        let got = closed["reason"].as_str().expect("reason");
        assert!(
            got.starts_with(reason),
            "reason {got:?} should start with {reason:?}"
        );
        assert!(
            self.next_event().await.is_none(),
            "the stream ends after `closed`"
        );
    }
}

impl TestApp {
    pub fn sse_url(&self, view: &str, token: Option<&str>) -> String {
        match token {
            Some(t) => format!("http://{}/sse/portal-view/{view}?token={t}", self.addr),
            None => format!("http://{}/sse/portal-view/{view}", self.addr),
        }
    }

    /// Opens an SSE stream for `user` on `view` and reads its `connected` event.
    pub async fn sse(&self, view: &str, user: &str) -> SseClient {
        let response = self
            .http()
            .get(self.sse_url(view, Some(&self.token(user))))
            .send()
            .await
            .expect("SSE request");
        let path = format!("/sse/portal-view/{view}");
        contract::check_response(
            "GET",
            &path,
            response.status().as_u16(),
            response.headers(),
            None,
        );
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "content type"
        );
        let mut client = SseClient::new(response);
        let event = client.next_event().await.expect("connected event");
        assert_eq!(event.data["type"], "connected", "{:?}", event.data);
        assert_eq!(event.data["userId"], user);
        assert_eq!(
            event.id.as_deref(),
            Some(&*event.data["version"].to_string())
        );
        client.connected = event.data;
        client
    }

    /// `POST /api/portal-views/{view}/messages` as `user`, naming `stream` as
    /// the sender; returns the status and the JSON answer.
    pub async fn post_message(
        &self,
        view: &str,
        user: &str,
        stream: Option<&str>,
        message: &Value,
    ) -> (u16, Value) {
        let mut request = self
            .http()
            .post(self.http_url(&format!("/api/portal-views/{view}/messages")))
            .bearer_auth(self.token(user))
            .header("content-type", "application/json")
            .body(message.to_string());
        if let Some(id) = stream {
            request = request.header("x-connection-id", id);
        }
        let answer = contract::send_checked(request).await;
        let body = serde_json::from_slice(&answer.body).expect("JSON answer");
        (answer.status.as_u16(), body)
    }
}

/// `GET /health`: the status and the JSON body.
pub async fn health(app: &TestApp) -> (u16, Value) {
    let answer = contract::send_checked(app.http().get(app.http_url("/health"))).await;
    let body = serde_json::from_slice(&answer.body).expect("json");
    (answer.status.as_u16(), body)
}

/// Polls `/health` until it reports `n` connections (bounded by WAIT).
pub async fn wait_connections(app: &TestApp, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = health(app).await;
        if body["connections"] == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections stayed at {} instead of {n}",
            body["connections"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` as text.
pub async fn metrics(app: &TestApp) -> String {
    let answer = contract::send_checked(app.http().get(app.http_url("/metrics"))).await;
    String::from_utf8(answer.body.to_vec()).expect("text")
}

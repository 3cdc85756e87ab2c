mod common;
use common::*;

// WebSocket integration tests against SPEC §3–§3.2: the handshake's close
// table, the permission table, error replies, frames that close, broadcast
// and ordering, merge-patch semantics, request-sync, the state a connection
// joins with, and persistence across a restart.
//
// Every test runs a real server on a random port (see `common`). Controllers
// may receive SPEC §3.3 presence events at any moment (batched, up to a few
// hundred milliseconds late); the local helpers `next`, `quiet` and `alive`
// skip those for controllers only, so these tests stay about their subject.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------
// Local helpers

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn is_controller(c: &Client) -> bool {
    c.connected["role"] == "controller"
}

fn is_presence(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|m| m["type"] == "presence")
}

/// The next message; for a controller, presence events (SPEC §3.3) are skipped.
async fn next(c: &mut Client) -> Value {
    let controller = is_controller(c);
    loop {
        let message = c.recv().await;
        if controller && message["type"] == "presence" {
            continue;
        }
        return message;
    }
}

/// Asserts nothing arrives within [`QUIET`] (a controller's presence events
/// excepted; a viewer must get nothing at all).
async fn quiet(c: &mut Client) {
    let controller = is_controller(c);
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(frame) = tokio::time::timeout_at(deadline, c.ws.next()).await {
        match frame {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Text(text))) if controller && is_presence(text.as_str()) => {}
            other => panic!(
                "expected silence on {}'s connection, got {other:?}",
                c.connected["userId"]
            ),
        }
    }
}

/// [`quiet`] on several connections at once (one window, not one each).
async fn quiet_all<'a>(clients: impl IntoIterator<Item = &'a mut Client>) {
    futures::future::join_all(clients.into_iter().map(quiet)).await;
}

/// Sends a `ping` and checks the `pong`: the socket is still served.
async fn alive(c: &mut Client) {
    c.send(json!({"type": "ping", "id": "alive?"})).await;
    let pong = next(c).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "alive?", "{pong}");
}

/// The `from` object broadcasts carry for messages sent by `c`.
fn from(c: &Client) -> Value {
    json!({"userId": c.connected["userId"], "connectionId": c.connected["connectionId"]})
}

/// Asserts `msg` is exactly `{"type":"error","code":code,"message":<text>,"id"?:id}`.
fn assert_error(msg: &Value, code: &str, id: Option<Value>) {
    let object = msg.as_object().expect("an object");
    assert_eq!(msg["type"], "error", "{msg}");
    assert_eq!(msg["code"], code, "{msg}");
    assert!(
        msg["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message text: {msg}"
    );
    match id {
        Some(id) => {
            assert_eq!(object.get("id"), Some(&id), "echoed id: {msg}");
            assert_eq!(object.len(), 4, "no other keys: {msg}");
        }
        None => {
            assert!(!object.contains_key("id"), "no id may be echoed: {msg}");
            assert_eq!(object.len(), 3, "no other keys: {msg}");
        }
    }
}

/// Sends `message` and asserts the error reply.
async fn expect_error(c: &mut Client, message: Value, code: &str, id: Option<Value>) {
    c.send(message).await;
    let reply = next(c).await;
    assert_error(&reply, code, id);
}

/// Asserts the next frame is a close with exactly this code and reason.
async fn assert_close_exact(c: &mut Client, code: u16, reason: &str) {
    let (got_code, got_reason) = c.expect_close().await;
    assert_eq!(
        (got_code, got_reason.as_str()),
        (code, reason),
        "close code and reason"
    );
}

/// Opens `url` and asserts the handshake is refused with exactly this close.
async fn refused(app: &TestApp, url: &str, code: u16, reason: &str) {
    let mut c = app.open(url).await;
    assert_close_exact(&mut c, code, reason).await;
}

/// A token for `sub` valid for an hour, signed with the server's secret.
fn token_for(app: &TestApp, sub: Value) -> String {
    app.token_with(SECRET, json!({"sub": sub, "exp": now_secs() + 3600}))
}

/// Opens `view` with `token` and reads the `connected` message into `c.connected`.
async fn connect_with_token(app: &TestApp, view: &str, token: &str) -> Client {
    let mut c = app.open(&app.ws_url(view, Some(token))).await;
    let connected = c.recv().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    c.connected = connected;
    c
}

/// Asserts the whole `connected` message; `connectionId` only by shape.
fn assert_connected(
    c: &Client,
    view: &str,
    user: &str,
    role: &str,
    state: Value,
    version: i64,
    presence: [u64; 3],
) {
    let mut message = c.connected.clone();
    let connection_id = message
        .as_object_mut()
        .expect("an object")
        .remove("connectionId")
        .expect("connectionId");
    assert!(
        connection_id.as_str().is_some_and(|s| !s.is_empty()),
        "connectionId is a non-empty string: {}",
        c.connected
    );
    let [controllers, viewers, connections] = presence;
    assert_eq!(
        message,
        json!({
            "type": "connected",
            "portalViewId": view,
            "userId": user,
            "role": role,
            "state": state,
            "version": version,
            "presence": {"controllers": controllers, "viewers": viewers, "connections": connections},
        })
    );
}

/// Sends a `portal-view-update` with an `id` and returns the acked version.
async fn update(c: &mut Client, payload: Value, id: &str) -> i64 {
    c.send(json!({"type": "portal-view-update", "payload": payload, "id": id}))
        .await;
    let ack = next(c).await;
    let version = ack["version"].as_i64().expect("ack version");
    assert_eq!(ack, json!({"type": "ack", "id": id, "version": version}));
    version
}

/// Sends any message with `"id": id` and asserts `{"type":"ack","id":id,"version":version}`.
async fn expect_ack(c: &mut Client, mut message: Value, id: Value, version: i64) {
    message["id"] = id.clone();
    c.send(message).await;
    assert_eq!(
        next(c).await,
        json!({"type": "ack", "id": id, "version": version})
    );
}

/// Asserts the stored row's state and version.
fn assert_stored(app: &TestApp, view: &str, state: Value, version: i64) {
    assert_eq!(app.stored_state(view), state, "stored state of {view}");
    assert_eq!(
        app.stored(view).version,
        version,
        "stored version of {view}"
    );
}

/// Sends a raw frame (for invalid UTF-8 and fragmented messages).
async fn send_frame(c: &mut Client, frame: Frame) {
    c.ws.send(Message::Frame(frame)).await.expect("send frame");
}

/// A `ping` message padded with a string field to exactly `len` bytes.
fn ping_of_len(len: usize) -> String {
    let head = r#"{"type":"ping","id":"big","pad":""#;
    let tail = r#""}"#;
    let pad = len - head.len() - tail.len();
    let text = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(text.len(), len);
    text
}

/// The pv1 room most permission tests use: two controllers (the library owner
/// and an EDITOR) and two viewers.
struct Room {
    owner: Client,
    ed: Client,
    v1: Client,
    v2: Client,
}

async fn room(app: &TestApp) -> Room {
    Room {
        owner: app.connect("pv1", "owner").await,
        ed: app.connect("pv1", "ed").await,
        v1: app.connect("pv1", "v1").await,
        v2: app.connect("pv1", "v2").await,
    }
}

/// Reconnects a probe viewer until the view has no controller left (a closed
/// controller leaves the hub asynchronously). No sleeps: each probe is a real
/// handshake, and the loop is bounded.
async fn wait_until_no_controller(app: &TestApp, view: &str) {
    for _ in 0..500 {
        let probe = app.connect(view, "v2").await;
        if probe.connected["presence"]["controllers"] == 0 {
            return;
        }
        drop(probe);
        tokio::task::yield_now().await;
    }
    panic!("the controllers of {view} never left");
}

// ---------------------------------------------------------------------------
// §3 handshake: the close table, token transport, Socket.IO, storage failure

/// Row 1: no token in the query and no Authorization header → 1008 `invalid token`.
#[tokio::test]
async fn handshake_without_token_closes_invalid_token() {
    let app = spawn_app().await;
    refused(&app, &app.ws_url("pv1", None), 1008, "invalid token").await;
}

/// Row 1: malformed tokens (garbage, empty, wrong segment count, bad base64, a
/// token missing `exp` or `sub`, a non-numeric `exp`) → 1008 `invalid token`.
#[tokio::test]
async fn handshake_with_malformed_token_closes_invalid_token() {
    let app = spawn_app().await;
    let exp = now_secs() + 3600;
    let tokens = [
        "not-a-jwt".to_string(),
        String::new(),
        "a.b".to_string(),
        "a.b.c".to_string(),
        "!!!.@@@.###".to_string(),
        app.token_with(SECRET, json!({"sub": "owner"})),
        app.token_with(SECRET, json!({"exp": exp})),
        app.token_with(SECRET, json!({"sub": "owner", "exp": "later"})),
    ];
    for token in &tokens {
        refused(&app, &app.ws_url("pv1", Some(token)), 1008, "invalid token").await;
    }
}

/// Row 1: a well-formed token signed with another secret → 1008 `invalid token`
/// (checked before expiry: an expired token with a bad signature is invalid too).
#[tokio::test]
async fn handshake_with_wrong_signature_closes_invalid_token() {
    let app = spawn_app().await;
    let forged = app.token_with(
        "other-secret",
        json!({"sub": "owner", "exp": now_secs() + 3600}),
    );
    refused(
        &app,
        &app.ws_url("pv1", Some(&forged)),
        1008,
        "invalid token",
    )
    .await;
    let forged_expired = app.token_with(
        "other-secret",
        json!({"sub": "owner", "exp": now_secs() - 10}),
    );
    refused(
        &app,
        &app.ws_url("pv1", Some(&forged_expired)),
        1008,
        "invalid token",
    )
    .await;
}

/// Row 2: `exp` in the past, and `exp` equal to now (SPEC §2: leeway 0, "now or
/// past is expired") → 1008 `token expired`, even for a user that does not exist
/// (expiry is checked before the user).
#[tokio::test]
async fn handshake_with_expired_token_closes_token_expired() {
    let app = spawn_app().await;
    let past = app.token_with(SECRET, json!({"sub": "owner", "exp": now_secs() - 10}));
    refused(&app, &app.ws_url("pv1", Some(&past)), 1008, "token expired").await;
    let now = app.token_with(SECRET, json!({"sub": "owner", "exp": now_secs()}));
    refused(&app, &app.ws_url("pv1", Some(&now)), 1008, "token expired").await;
    let ghost = app.token_with(SECRET, json!({"sub": "ghost", "exp": now_secs() - 10}));
    refused(
        &app,
        &app.ws_url("nope", Some(&ghost)),
        1008,
        "token expired",
    )
    .await;
}

/// Row 3: a valid token whose `sub` is not a user (including a sub that is not
/// even a valid id) → 1008 `unknown user`, checked before the view exists.
#[tokio::test]
async fn handshake_with_unknown_user_closes_unknown_user() {
    let app = spawn_app().await;
    for sub in [json!("ghost"), json!("../owner"), json!(7), json!("")] {
        let token = token_for(&app, sub);
        refused(&app, &app.ws_url("pv1", Some(&token)), 1008, "unknown user").await;
    }
    let token = token_for(&app, json!("ghost"));
    refused(
        &app,
        &app.ws_url("nope", Some(&token)),
        1008,
        "unknown user",
    )
    .await;
}

/// Row 4: a view id that does not exist, one with path characters, one of 65
/// characters (ids are at most 64), and a valid 64-character id that is not
/// stored → 1008 `portal view not found`; checked before access (an outsider
/// gets not-found, not access-denied, for a missing view).
#[tokio::test]
async fn handshake_with_missing_view_closes_portal_view_not_found() {
    let app = spawn_app().await;
    let long = "x".repeat(65);
    let max = "y".repeat(64);
    let token = app.token("owner");
    for view in [
        "nope",
        "..%2F",
        "..%2Fpv1",
        "pv1%20",
        long.as_str(),
        max.as_str(),
    ] {
        refused(
            &app,
            &app.ws_url(view, Some(&token)),
            1008,
            "portal view not found",
        )
        .await;
    }
    let outsider = app.token("outsider");
    refused(
        &app,
        &app.ws_url("nope", Some(&outsider)),
        1008,
        "portal view not found",
    )
    .await;
}

/// Row 5: a user with no role in the view's library → 1008 `access denied`,
/// both for the outsider on lib1 and for lib1's members on lib2's view.
#[tokio::test]
async fn handshake_without_access_closes_access_denied() {
    let app = spawn_app().await;
    refused(
        &app,
        &app.ws_url("pv1", Some(&app.token("outsider"))),
        1008,
        "access denied",
    )
    .await;
    for user in ["owner", "ed", "v1"] {
        refused(
            &app,
            &app.ws_url("pv3", Some(&app.token(user))),
            1008,
            "access denied",
        )
        .await;
    }
    // Positive control: the outsider owns lib2 and controls pv3.
    let c = app.connect("pv3", "outsider").await;
    assert_connected(&c, "pv3", "outsider", "controller", json!({}), 0, [1, 0, 1]);
}

/// SPEC §2: a numeric `sub` (42) is read as the user id "42".
#[tokio::test]
async fn handshake_accepts_numeric_sub() {
    let app = spawn_app().await;
    let token = token_for(&app, json!(42));
    let c = connect_with_token(&app, "pv1", &token).await;
    assert_connected(&c, "pv1", "42", "viewer", json!({}), 0, [0, 1, 1]);
}

/// SPEC §1 roles: the library owner, an OWNER member and an EDITOR member are
/// controllers; a VIEWER member is a viewer.
#[tokio::test]
async fn handshake_assigns_roles() {
    let app = spawn_app().await;
    let owner = app.connect("pv2", "owner").await;
    assert_connected(
        &owner,
        "pv2",
        "owner",
        "controller",
        json!({}),
        0,
        [1, 0, 1],
    );
    let om = app.connect("pv2", "om").await;
    assert_connected(&om, "pv2", "om", "controller", json!({}), 0, [2, 0, 2]);
    let ed = app.connect("pv2", "ed").await;
    assert_connected(&ed, "pv2", "ed", "controller", json!({}), 0, [3, 0, 3]);
    let v1 = app.connect("pv2", "v1").await;
    assert_connected(&v1, "pv2", "v1", "viewer", json!({}), 0, [3, 1, 4]);
}

/// SPEC §3: the token may come as `Authorization: Bearer <JWT>` instead of the query.
#[tokio::test]
async fn handshake_accepts_bearer_header() {
    let app = spawn_app().await;
    let mut request = app
        .ws_url("pv1", None)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token("ed"))
            .parse()
            .expect("header"),
    );
    let mut c = app.open_request(request).await;
    c.connected = c.recv().await;
    assert_connected(&c, "pv1", "ed", "controller", json!({}), 0, [1, 0, 1]);

    // A bad header token is refused like a bad query token.
    let mut request = app
        .ws_url("pv1", None)
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("authorization", "Bearer not-a-jwt".parse().expect("header"));
    let mut c = app.open_request(request).await;
    assert_close_exact(&mut c, 1008, "invalid token").await;
}

/// When both are given, the query token wins over the header (both directions:
/// a valid query beats a header of another user, an invalid query is not
/// rescued by a valid header).
#[tokio::test]
async fn handshake_query_token_wins_over_header() {
    let app = spawn_app().await;
    let mut request = app
        .ws_url("pv1", Some(&app.token("v1")))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token("owner"))
            .parse()
            .expect("header"),
    );
    let mut c = app.open_request(request).await;
    c.connected = c.recv().await;
    assert_connected(&c, "pv1", "v1", "viewer", json!({}), 0, [0, 1, 1]);

    let mut request = app
        .ws_url("pv1", Some("not-a-jwt"))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token("owner"))
            .parse()
            .expect("header"),
    );
    let mut c = app.open_request(request).await;
    assert_close_exact(&mut c, 1008, "invalid token").await;
}

/// SPEC §3: a Socket.IO client (path `/socket.io/…`) is accepted and closed
/// 1003 `unsupported protocol`.
#[tokio::test]
async fn socket_io_path_closes_unsupported_protocol() {
    let app = spawn_app().await;
    for path in ["/socket.io/?EIO=4&transport=websocket", "/socket.io/"] {
        let url = format!("ws://{}{path}", app.addr);
        refused(&app, &url, 1003, "unsupported protocol").await;
    }
}

/// SPEC §3: an Engine.IO query parameter `EIO` on our own path gets 1003
/// `unsupported protocol`, even with a valid token.
#[tokio::test]
async fn eio_query_closes_unsupported_protocol() {
    let app = spawn_app().await;
    let url = format!(
        "{}&EIO=4&transport=websocket",
        app.ws_url("pv1", Some(&app.token("owner")))
    );
    refused(&app, &url, 1003, "unsupported protocol").await;
    let url = format!("ws://{}/ws/portal-view/pv1?EIO=3", app.addr);
    refused(&app, &url, 1003, "unsupported protocol").await;
}

/// Last row: a stored state that is not JSON (another tool wrote it) is a
/// storage failure → 1011 `internal error`; other views keep working.
#[tokio::test]
async fn corrupt_stored_state_closes_internal_error() {
    let app = spawn_app().await;
    foreign::write_state(&app.database, "pv2", "nope");
    refused(
        &app,
        &app.ws_url("pv2", Some(&app.token("owner"))),
        1011,
        "internal error",
    )
    .await;
    refused(
        &app,
        &app.ws_url("pv2", Some(&app.token("v1"))),
        1011,
        "internal error",
    )
    .await;
    let c = app.connect("pv1", "owner").await;
    assert_connected(&c, "pv1", "owner", "controller", json!({}), 0, [1, 0, 1]);
}

// ---------------------------------------------------------------------------
// §3.1 permission table: 5 types × 2 roles

/// ping × controller: `{"type":"pong","timestamp":<ms>,"id":…}` to the sender
/// only; without an id the pong has no `id` key.
#[tokio::test]
async fn permission_ping_controller_gets_pong() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    for (c, id) in [(&mut owner, json!("p1")), (&mut ed, json!(9))] {
        let before = now_ms();
        c.send(json!({"type": "ping", "id": id})).await;
        let pong = next(c).await;
        let after = now_ms();
        let timestamp = pong["timestamp"].as_u64().expect("timestamp in ms");
        assert!(
            (before..=after).contains(&timestamp),
            "{timestamp} in {before}..={after}"
        );
        assert_eq!(
            pong,
            json!({"type": "pong", "timestamp": timestamp, "id": id})
        );
    }
    owner.send(json!({"type": "ping"})).await;
    let pong = next(&mut owner).await;
    let timestamp = pong["timestamp"].as_u64().expect("timestamp");
    assert_eq!(pong, json!({"type": "pong", "timestamp": timestamp}));
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
}

/// ping × viewer: a pong to the sender only, nothing changes.
#[tokio::test]
async fn permission_ping_viewer_gets_pong() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let before = now_ms();
    v1.send(json!({"type": "ping", "id": "vp", "payload": {"ignored": true}}))
        .await;
    let pong = next(&mut v1).await;
    let after = now_ms();
    let timestamp = pong["timestamp"].as_u64().expect("timestamp in ms");
    assert!(
        (before..=after).contains(&timestamp),
        "{timestamp} in {before}..={after}"
    );
    assert_eq!(
        pong,
        json!({"type": "pong", "timestamp": timestamp, "id": "vp"})
    );
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
}

/// portal-view-update × controller: ack with the new version to the sender,
/// the exact broadcast to every other connection, the row stored.
#[tokio::test]
async fn permission_portal_view_update_controller_is_applied() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let payload = json!({"currentItem": 2, "mode": "slides"});
    expect_ack(
        &mut owner,
        json!({"type": "portal-view-update", "payload": payload}),
        json!("u1"),
        1,
    )
    .await;
    let expected = json!({"type": "portal-view-update", "payload": payload, "version": 1, "from": from(&owner)});
    for c in [&mut ed, &mut v1, &mut v2] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", payload, 1);
}

/// portal-view-update × viewer: FORBIDDEN with the id, nothing stored or
/// broadcast, the socket still served.
#[tokio::test]
async fn permission_portal_view_update_viewer_is_forbidden() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    expect_error(
        &mut v1,
        json!({"type": "portal-view-update", "payload": {"currentItem": 2}, "id": "f1"}),
        "FORBIDDEN",
        Some(json!("f1")),
    )
    .await;
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut v1).await;
}

/// item-update × controller: ack, broadcast of the payload as sent, the item
/// merged into `state.items`.
#[tokio::test]
async fn permission_item_update_controller_is_applied() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let payload = json!({"itemId": "slide-1", "title": "Intro"});
    expect_ack(
        &mut ed,
        json!({"type": "item-update", "payload": payload}),
        json!(5),
        1,
    )
    .await;
    let expected =
        json!({"type": "item-update", "payload": payload, "version": 1, "from": from(&ed)});
    for c in [&mut owner, &mut v1, &mut v2] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(
        &app,
        "pv1",
        json!({"items": {"slide-1": {"title": "Intro"}}}),
        1,
    );
}

/// item-update × viewer: FORBIDDEN with the id, nothing changes.
#[tokio::test]
async fn permission_item_update_viewer_is_forbidden() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    expect_error(
        &mut v2,
        json!({"type": "item-update", "payload": {"itemId": "a", "x": 1}, "id": 77}),
        "FORBIDDEN",
        Some(json!(77)),
    )
    .await;
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut v2).await;
}

/// request-sync × viewer: forwarded to every controller connection with `from`;
/// the other viewer gets nothing, the sender gets nothing back, nothing stored.
#[tokio::test]
async fn permission_request_sync_viewer_is_forwarded() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    v1.send(json!({"type": "request-sync", "id": "r1"})).await;
    let expected = json!({"type": "request-sync", "from": from(&v1)});
    for c in [&mut owner, &mut ed] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
}

/// request-sync × controller: FORBIDDEN with the id; nobody is told.
#[tokio::test]
async fn permission_request_sync_controller_is_forbidden() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    expect_error(
        &mut owner,
        json!({"type": "request-sync", "id": "rs"}),
        "FORBIDDEN",
        Some(json!("rs")),
    )
    .await;
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut owner).await;
}

/// sync-response × controller: the payload replaces the state, ack, broadcast.
#[tokio::test]
async fn permission_sync_response_controller_is_applied() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let payload = json!({"currentItem": 4, "items": {"a": {"on": true}}});
    expect_ack(
        &mut owner,
        json!({"type": "sync-response", "payload": payload}),
        json!("s1"),
        1,
    )
    .await;
    let expected =
        json!({"type": "sync-response", "payload": payload, "version": 1, "from": from(&owner)});
    for c in [&mut ed, &mut v1, &mut v2] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", payload, 1);
}

/// sync-response × viewer: FORBIDDEN with the id, nothing changes.
#[tokio::test]
async fn permission_sync_response_viewer_is_forbidden() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    expect_error(
        &mut v1,
        json!({"type": "sync-response", "payload": {"hijack": true}, "id": "s"}),
        "FORBIDDEN",
        Some(json!("s")),
    )
    .await;
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut v1).await;
}

/// Every kind of controller (library owner, OWNER member, EDITOR member) may
/// change state; the versions follow one another.
#[tokio::test]
async fn every_controller_kind_may_update() {
    let app = spawn_app().await;
    let mut viewer = app.connect("pv1", "42").await;
    for (n, user) in ["owner", "om", "ed"].into_iter().enumerate() {
        let mut c = app.connect("pv1", user).await;
        let version = n as i64 + 1;
        assert_eq!(update(&mut c, json!({"by": user}), user).await, version);
        assert_eq!(
            next(&mut viewer).await,
            json!({"type": "portal-view-update", "payload": {"by": user}, "version": version, "from": from(&c)})
        );
    }
    assert_stored(&app, "pv1", json!({"by": "ed"}), 3);
}

// ---------------------------------------------------------------------------
// §3.1 error replies: codes, id echo, check order

/// UNKNOWN_TYPE for types not in the table (names are case-sensitive, the empty
/// string is a string type too), for either role; the id is echoed as sent
/// (string, integer, float), omitted when absent; the socket stays open.
#[tokio::test]
async fn unknown_type_is_refused_and_socket_stays_open() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    for c in [&mut owner, &mut v1] {
        for (ty, id) in [
            ("dance", Some(json!("u1"))),
            ("PING", Some(json!(7))),
            ("", Some(json!(-1.5))),
            ("portal_view_update", None),
            ("ack", Some(json!("x"))),
        ] {
            let mut message = json!({"type": ty, "payload": {"a": 1}});
            if let Some(id) = &id {
                message["id"] = id.clone();
            }
            expect_error(c, message, "UNKNOWN_TYPE", id).await;
        }
        alive(c).await;
    }
    quiet_all([&mut owner, &mut v1]).await;
    assert_stored(&app, "pv1", json!({}), 0);
}

/// BAD_REQUEST for payloads of the wrong shape: portal-view-update and
/// sync-response need an object payload (not a number, string, array, null,
/// or missing); the id is echoed; nothing is stored or broadcast.
#[tokio::test]
async fn bad_payload_shapes_are_bad_request() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    for ty in ["portal-view-update", "sync-response", "item-update"] {
        for payload in [
            json!(3),
            json!("x"),
            json!([{"a": 1}]),
            json!(null),
            json!(true),
        ] {
            expect_error(
                &mut owner,
                json!({"type": ty, "payload": payload, "id": "b"}),
                "BAD_REQUEST",
                Some(json!("b")),
            )
            .await;
        }
        expect_error(
            &mut owner,
            json!({"type": ty, "id": 1}),
            "BAD_REQUEST",
            Some(json!(1)),
        )
        .await;
        expect_error(&mut owner, json!({"type": ty}), "BAD_REQUEST", None).await;
    }
    quiet(&mut v1).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut owner).await;
}

/// BAD_REQUEST for item-update payloads without a valid `itemId`: missing,
/// null, boolean, object, float (`7.0`), negative, above 2^53, empty, with
/// invalid characters, 65 characters long.
#[tokio::test]
async fn bad_item_ids_are_bad_request() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    let too_long = "i".repeat(65);
    let bad_ids: Vec<Value> = vec![
        json!(null),
        json!(true),
        json!({"id": "a"}),
        json!(["a"]),
        json!(7.0),
        json!(7.5),
        json!(-1),
        json!(9_007_199_254_740_993_u64),
        json!(""),
        json!("a b"),
        json!("../x"),
        json!("é"),
        json!(too_long),
    ];
    for item_id in bad_ids {
        expect_error(
            &mut owner,
            json!({"type": "item-update", "payload": {"itemId": item_id, "x": 1}, "id": "i"}),
            "BAD_REQUEST",
            Some(json!("i")),
        )
        .await;
    }
    expect_error(
        &mut owner,
        json!({"type": "item-update", "payload": {"x": 1}, "id": "i"}),
        "BAD_REQUEST",
        Some(json!("i")),
    )
    .await;
    // `7.0` must be refused even written literally (not normalized by json!).
    owner
        .send_text(r#"{"type":"item-update","payload":{"itemId":7.0,"x":1},"id":"f"}"#)
        .await;
    assert_error(&next(&mut owner).await, "BAD_REQUEST", Some(json!("f")));
    owner
        .send_text(r#"{"type":"item-update","payload":{"itemId":7e0,"x":1},"id":"e"}"#)
        .await;
    assert_error(&next(&mut owner).await, "BAD_REQUEST", Some(json!("e")));
    quiet(&mut v1).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut owner).await;
}

/// An `id` that is not a string or number (`null`, object, array, boolean) is
/// BAD_REQUEST without an `id` in the reply; this check comes before the type
/// and role checks; the socket stays open and nothing is applied.
#[tokio::test]
async fn invalid_id_is_bad_request_without_id() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    for id in [
        json!(null),
        json!({}),
        json!({"a": 1}),
        json!([1]),
        json!(true),
    ] {
        // Would otherwise be accepted.
        expect_error(
            &mut owner,
            json!({"type": "portal-view-update", "payload": {"a": 1}, "id": id}),
            "BAD_REQUEST",
            None,
        )
        .await;
        expect_error(
            &mut owner,
            json!({"type": "ping", "id": id}),
            "BAD_REQUEST",
            None,
        )
        .await;
        // Would otherwise be UNKNOWN_TYPE.
        expect_error(
            &mut owner,
            json!({"type": "zzz", "id": id}),
            "BAD_REQUEST",
            None,
        )
        .await;
        // Would otherwise be FORBIDDEN.
        expect_error(
            &mut v1,
            json!({"type": "portal-view-update", "payload": {"a": 1}, "id": id}),
            "BAD_REQUEST",
            None,
        )
        .await;
    }
    quiet_all([&mut owner, &mut v1]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut owner).await;
    alive(&mut v1).await;
}

/// Check order type → role → payload: a viewer's portal-view-update with a bad
/// payload is FORBIDDEN (not BAD_REQUEST), a controller's request-sync is
/// FORBIDDEN whatever its payload, and an unknown type with a bad payload is
/// UNKNOWN_TYPE.
#[tokio::test]
async fn refusal_check_order() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    expect_error(
        &mut v1,
        json!({"type": "portal-view-update", "payload": 3, "id": "o1"}),
        "FORBIDDEN",
        Some(json!("o1")),
    )
    .await;
    expect_error(
        &mut v1,
        json!({"type": "item-update", "id": "o2"}),
        "FORBIDDEN",
        Some(json!("o2")),
    )
    .await;
    expect_error(
        &mut v1,
        json!({"type": "sync-response", "payload": [1], "id": "o3"}),
        "FORBIDDEN",
        Some(json!("o3")),
    )
    .await;
    expect_error(
        &mut owner,
        json!({"type": "request-sync", "payload": 3, "id": "o4"}),
        "FORBIDDEN",
        Some(json!("o4")),
    )
    .await;
    expect_error(
        &mut owner,
        json!({"type": "nope", "payload": 3, "id": "o5"}),
        "UNKNOWN_TYPE",
        Some(json!("o5")),
    )
    .await;
    expect_error(
        &mut v1,
        json!({"type": "nope", "id": "o6"}),
        "UNKNOWN_TYPE",
        Some(json!("o6")),
    )
    .await;
    quiet_all([&mut owner, &mut v1]).await;
    assert_stored(&app, "pv1", json!({}), 0);
    alive(&mut owner).await;
    alive(&mut v1).await;
}

// ---------------------------------------------------------------------------
// §3.1 frames that close the connection

/// A binary frame closes 1003 `unsupported data`, after the replies already
/// queued (the pong for the ping sent just before); other connections are unaffected.
#[tokio::test]
async fn binary_frame_closes_unsupported_data() {
    let app = spawn_app().await;
    let mut other = app.connect("pv1", "v2").await;
    for user in ["owner", "v1"] {
        let mut c = app.connect("pv1", user).await;
        c.send(json!({"type": "ping", "id": "before"})).await;
        c.ws.send(Message::binary(br#"{"type":"ping"}"#.to_vec()))
            .await
            .expect("send binary");
        let pong = next(&mut c).await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["id"], "before", "{pong}");
        assert_close_exact(&mut c, 1003, "unsupported data").await;
    }
    alive(&mut other).await;
}

/// Text that is not JSON closes 1003 `unsupported data`.
#[tokio::test]
async fn non_json_text_closes_unsupported_data() {
    let app = spawn_app().await;
    for text in ["hello", "{nope", "", "{\"type\":\"ping\"", "ping"] {
        let mut c = app.connect("pv1", "owner").await;
        c.send_text(text).await;
        assert_close_exact(&mut c, 1003, "unsupported data").await;
    }
}

/// JSON that is not an object (array, string, number, null, boolean) closes
/// 1003 `unsupported data`, even an array holding a valid message.
#[tokio::test]
async fn json_non_object_closes_unsupported_data() {
    let app = spawn_app().await;
    for text in [
        r#"[{"type":"ping"}]"#,
        r#""ping""#,
        "5",
        "null",
        "true",
        "[]",
    ] {
        let mut c = app.connect("pv1", "v1").await;
        c.send_text(text).await;
        assert_close_exact(&mut c, 1003, "unsupported data").await;
    }
}

/// A JSON object without a string `type` (`{"type":5}`, `{}`, null type,
/// array type, only a payload) closes 1003 `unsupported data`; nothing applied.
#[tokio::test]
async fn json_without_string_type_closes_unsupported_data() {
    let app = spawn_app().await;
    for text in [
        r#"{"type":5}"#,
        "{}",
        r#"{"type":null}"#,
        r#"{"type":["ping"]}"#,
        r#"{"type":{"name":"ping"}}"#,
        r#"{"payload":{"a":1},"id":"x"}"#,
    ] {
        let mut c = app.connect("pv1", "owner").await;
        c.send_text(text).await;
        assert_close_exact(&mut c, 1003, "unsupported data").await;
    }
    assert_stored(&app, "pv1", json!({}), 0);
}

/// A text frame that is not valid UTF-8 closes 1007 `invalid utf-8`.
#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let app = spawn_app().await;
    let mut c = app.connect("pv1", "owner").await;
    let bytes = b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec();
    send_frame(
        &mut c,
        Frame::message(bytes, OpCode::Data(Data::Text), true),
    )
    .await;
    assert_close_exact(&mut c, 1007, "invalid utf-8").await;
}

/// With `max_message_bytes = 1024`: a message of exactly 1024 bytes is served,
/// 1025 bytes closes 1009 `message too big`.
#[tokio::test]
async fn oversize_message_closes_1009_at_configured_limit() {
    let app = spawn_app_with(|c| c.max_message_bytes = 1024).await;
    let mut c = app.connect("pv1", "owner").await;
    c.send_text(&ping_of_len(1024)).await;
    let pong = next(&mut c).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "big", "{pong}");
    c.send_text(&ping_of_len(1025)).await;
    assert_close_exact(&mut c, 1009, "message too big").await;
}

/// The limit applies to the reassembled message: two 600-byte fragments (each
/// under 1024) close 1009; two small fragments of one message are served.
#[tokio::test]
async fn fragmented_message_is_limited_as_a_whole() {
    let app = spawn_app_with(|c| c.max_message_bytes = 1024).await;
    let mut c = app.connect("pv1", "owner").await;
    let text = r#"{"type":"portal-view-update","payload":{"frag":true},"id":"fr"}"#.as_bytes();
    let (a, b) = text.split_at(20);
    send_frame(
        &mut c,
        Frame::message(a.to_vec(), OpCode::Data(Data::Text), false),
    )
    .await;
    send_frame(
        &mut c,
        Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true),
    )
    .await;
    assert_eq!(
        next(&mut c).await,
        json!({"type": "ack", "id": "fr", "version": 1})
    );
    assert_stored(&app, "pv1", json!({"frag": true}), 1);

    let big = ping_of_len(1200).into_bytes();
    let (a, b) = big.split_at(600);
    send_frame(
        &mut c,
        Frame::message(a.to_vec(), OpCode::Data(Data::Text), false),
    )
    .await;
    send_frame(
        &mut c,
        Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true),
    )
    .await;
    assert_close_exact(&mut c, 1009, "message too big").await;
}

/// SPEC §5 default: 65536 bytes; a 70 KB text frame closes 1009.
#[tokio::test]
async fn oversize_message_closes_1009_at_default_limit() {
    let app = spawn_app().await;
    assert_eq!(app.config.max_message_bytes, 65536);
    let mut c = app.connect("pv1", "owner").await;
    c.send_text(&ping_of_len(60_000)).await;
    assert_eq!(next(&mut c).await["id"], "big");
    c.send_text(&ping_of_len(70_000)).await;
    assert_close_exact(&mut c, 1009, "message too big").await;
}

// ---------------------------------------------------------------------------
// §3.1/§3.2 broadcast semantics and ordering

/// A change reaches every other connection of the view (a second tab of the
/// sender's own user included), never the sender (which gets only its ack),
/// never a connection on another view.
#[tokio::test]
async fn broadcast_reaches_every_other_connection_of_the_view_only() {
    let app = spawn_app().await;
    let mut tab_a = app.connect("pv1", "owner").await;
    let mut tab_b = app.connect("pv1", "owner").await;
    let Room {
        mut ed,
        mut v1,
        mut v2,
        owner: mut tab_c,
    } = room(&app).await;
    let mut elsewhere_c = app.connect("pv2", "owner").await;
    let mut elsewhere_v = app.connect("pv2", "v1").await;
    let mut other_lib = app.connect("pv3", "outsider").await;

    assert_eq!(update(&mut tab_a, json!({"slide": 1}), "a1").await, 1);
    let expected = json!({"type": "portal-view-update", "payload": {"slide": 1}, "version": 1, "from": from(&tab_a)});
    for c in [&mut tab_b, &mut tab_c, &mut ed, &mut v1, &mut v2] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([
        &mut tab_a,
        &mut tab_b,
        &mut tab_c,
        &mut ed,
        &mut v1,
        &mut v2,
        &mut elsewhere_c,
        &mut elsewhere_v,
        &mut other_lib,
    ])
    .await;
    assert_stored(&app, "pv1", json!({"slide": 1}), 1);
    assert_stored(&app, "pv2", json!({}), 0);
}

/// Acks carry the version each change got; a change without an `id` gets no
/// ack but is still applied and broadcast (with no `id` in the broadcast).
#[tokio::test]
async fn acks_carry_versions_and_id_less_changes_are_silent_to_the_sender() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    assert_eq!(update(&mut owner, json!({"a": 1}), "x").await, 1);
    assert_eq!(update(&mut owner, json!({"b": 2}), "y").await, 2);
    owner
        .send(json!({"type": "portal-view-update", "payload": {"c": 3}}))
        .await;
    expect_ack(
        &mut owner,
        json!({"type": "item-update", "payload": {"itemId": 1, "d": 4}}),
        json!(-0.5),
        4,
    )
    .await;
    for (version, ty, payload) in [
        (1, "portal-view-update", json!({"a": 1})),
        (2, "portal-view-update", json!({"b": 2})),
        (3, "portal-view-update", json!({"c": 3})),
        (4, "item-update", json!({"itemId": 1, "d": 4})),
    ] {
        assert_eq!(
            next(&mut v1).await,
            json!({"type": ty, "payload": payload, "version": version, "from": from(&owner)})
        );
    }
    quiet_all([&mut owner, &mut v1]).await;
    assert_stored(
        &app,
        "pv1",
        json!({"a": 1, "b": 2, "c": 3, "items": {"1": {"d": 4}}}),
        4,
    );
}

/// 200 rapid updates from one controller: the sender's acks and every
/// receiver's broadcasts (two viewers, another controller) step by exactly 1
/// from 1 to 200 in order; the stored row is version 200 with the last state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_updates_arrive_gapless_and_in_order() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    for n in 1..=200 {
        owner
            .send(json!({"type": "portal-view-update", "payload": {"n": n}, "id": n}))
            .await;
    }
    for n in 1..=200 {
        assert_eq!(
            next(&mut owner).await,
            json!({"type": "ack", "id": n, "version": n})
        );
    }
    let sender = from(&owner);
    for c in [&mut ed, &mut v1, &mut v2] {
        for n in 1..=200 {
            assert_eq!(
                next(c).await,
                json!({"type": "portal-view-update", "payload": {"n": n}, "version": n, "from": sender}),
                "receiver {}",
                c.connected["userId"]
            );
        }
    }
    quiet_all([&mut owner, &mut ed, &mut v1, &mut v2]).await;
    assert_stored(&app, "pv1", json!({"n": 200}), 200);
}

/// Two controllers sending 100 updates each at once: every viewer sees
/// versions 1..=200 gapless and in order, each sender's own updates in the
/// order it sent them; each controller's acks plus the broadcasts it got make
/// up 1..=200 exactly; the stored version is 200 with the state of version 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_controllers_produce_one_gapless_order() {
    let app = spawn_app().await;
    let Room {
        owner,
        ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let senders = [from(&owner), from(&ed)];

    let drive = |mut c: Client, tag: &'static str| {
        tokio::spawn(async move {
            for n in 1..=100 {
                c.send(
                    json!({"type": "portal-view-update", "payload": {"by": tag, "n": n}, "id": n}),
                )
                .await;
            }
            let (mut acks, mut seen) = (Vec::new(), Vec::new());
            while acks.len() < 100 || seen.len() < 100 {
                let m = next(&mut c).await;
                match m["type"].as_str() {
                    Some("ack") => {
                        assert_eq!(m["id"], json!(acks.len() + 1), "acks in send order: {m}");
                        acks.push(m["version"].as_i64().expect("version"));
                    }
                    Some("portal-view-update") => {
                        assert_ne!(m["payload"]["by"], tag, "no echo of own update: {m}");
                        seen.push(m["version"].as_i64().expect("version"));
                    }
                    _ => panic!("unexpected {m}"),
                }
            }
            (acks, seen)
        })
    };
    let a = drive(owner, "owner");
    let b = drive(ed, "ed");

    let mut last_payload = Value::Null;
    for v in [&mut v1, &mut v2] {
        let mut next_n = [1, 1];
        for version in 1..=200 {
            let m = next(v).await;
            assert_eq!(m["type"], "portal-view-update", "{m}");
            assert_eq!(m["version"], version, "gapless, in order: {m}");
            let who = usize::from(m["payload"]["by"] == "ed");
            assert_eq!(m["from"], senders[who], "{m}");
            assert_eq!(m["payload"]["n"], next_n[who], "per-sender order: {m}");
            next_n[who] += 1;
            last_payload = m["payload"].clone();
        }
        quiet(v).await;
    }
    for task in [a, b] {
        let (acks, seen) = task.await.expect("controller task");
        assert!(
            acks.windows(2).all(|w| w[0] < w[1]),
            "acks increase: {acks:?}"
        );
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "broadcasts increase: {seen:?}"
        );
        let mut all: Vec<i64> = acks.into_iter().chain(seen).collect();
        all.sort_unstable();
        assert_eq!(all, (1..=200).collect::<Vec<i64>>());
    }
    assert_stored(&app, "pv1", last_payload, 200);
}

// ---------------------------------------------------------------------------
// §3.1 merge-patch semantics end to end

/// portal-view-update is an RFC 7386 merge patch: `null` deletes, objects merge
/// recursively, arrays and scalars replace; the broadcast carries the patch as
/// sent (nulls included).
#[tokio::test]
async fn portal_view_update_is_a_merge_patch() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    let first = json!({"a": 1, "b": {"c": 1, "d": 2}, "arr": [1, 2, 3], "s": "x"});
    let second = json!({"a": null, "b": {"c": null, "e": {"f": 3}}, "arr": [9], "s": {"now": "object"}, "gone": null});
    let third = json!({"b": {"e": {"g": 4}}, "new": {"deep": {"x": null}}, "arr": {"k": 1}});
    for (n, patch) in [&first, &second, &third].into_iter().enumerate() {
        let version = n as i64 + 1;
        assert_eq!(update(&mut owner, patch.clone(), "m").await, version);
        assert_eq!(
            next(&mut v1).await,
            json!({"type": "portal-view-update", "payload": patch, "version": version, "from": from(&owner)})
        );
    }
    assert_stored(
        &app,
        "pv1",
        json!({"b": {"d": 2, "e": {"f": 3, "g": 4}}, "arr": {"k": 1}, "s": {"now": "object"}, "new": {"deep": {}}}),
        3,
    );
}

/// An empty patch `{}` changes nothing in the state but still bumps the
/// version, is acked and broadcast.
#[tokio::test]
async fn empty_patch_bumps_the_version() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    assert_eq!(update(&mut owner, json!({"keep": true}), "k").await, 1);
    assert_eq!(next(&mut v1).await["version"], 1);
    assert_eq!(update(&mut owner, json!({}), "e").await, 2);
    assert_eq!(
        next(&mut v1).await,
        json!({"type": "portal-view-update", "payload": {}, "version": 2, "from": from(&owner)})
    );
    assert_stored(&app, "pv1", json!({"keep": true}), 2);
}

/// item-update creates and merges `state.items[itemId]`: string ids, integer
/// ids (stored under their decimal string, 0 and 2^53 included), null deleting
/// a field, nested merge, a payload with only `itemId` making an empty item.
#[tokio::test]
async fn item_update_creates_and_merges_items() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    let max_id = "m".repeat(64);
    let patches = [
        json!({"itemId": "slide-1", "title": "A", "pos": {"x": 1}, "tags": ["a"]}),
        json!({"itemId": "slide-1", "title": null, "pos": {"y": 2}, "tags": ["b", "c"]}),
        json!({"itemId": 7, "on": true}),
        json!({"itemId": 0, "zero": 0}),
        json!({"itemId": 9_007_199_254_740_992_u64, "max": true}),
        json!({"itemId": max_id, "long": true}),
        json!({"itemId": "empty"}),
        json!({"itemId": "7", "off": false}),
    ];
    for (n, patch) in patches.iter().enumerate() {
        let version = n as i64 + 1;
        expect_ack(
            &mut owner,
            json!({"type": "item-update", "payload": patch}),
            json!(version),
            version,
        )
        .await;
        assert_eq!(
            next(&mut v1).await,
            json!({"type": "item-update", "payload": patch, "version": version, "from": from(&owner)})
        );
    }
    let mut items = serde_json::Map::new();
    items.insert(
        "slide-1".into(),
        json!({"pos": {"x": 1, "y": 2}, "tags": ["b", "c"]}),
    );
    items.insert("7".into(), json!({"on": true, "off": false}));
    items.insert("0".into(), json!({"zero": 0}));
    items.insert("9007199254740992".into(), json!({"max": true}));
    items.insert(max_id, json!({"long": true}));
    items.insert("empty".into(), json!({}));
    assert_stored(&app, "pv1", json!({"items": items}), patches.len() as i64);
}

/// A `state.items` that is not an object (array, string, number) is
/// replaced by an object holding the item; an item that is not an object is
/// replaced too; the rest of the state is kept.
#[tokio::test]
async fn item_update_replaces_non_object_items() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    for (n, items) in [json!([1, 2]), json!("str"), json!(5)]
        .into_iter()
        .enumerate()
    {
        let base = 2 * n as i64;
        expect_ack(
            &mut owner,
            json!({"type": "sync-response", "payload": {"items": items, "keep": 1}}),
            json!("s"),
            base + 1,
        )
        .await;
        expect_ack(
            &mut owner,
            json!({"type": "item-update", "payload": {"itemId": "a", "x": 1}}),
            json!("i"),
            base + 2,
        )
        .await;
        assert_stored(
            &app,
            "pv1",
            json!({"items": {"a": {"x": 1}}, "keep": 1}),
            base + 2,
        );
    }
    expect_ack(
        &mut owner,
        json!({"type": "sync-response", "payload": {"items": {"a": [1], "b": 2}}}),
        json!("s"),
        7,
    )
    .await;
    expect_ack(
        &mut owner,
        json!({"type": "item-update", "payload": {"itemId": "a", "y": 2}}),
        json!("i"),
        8,
    )
    .await;
    assert_stored(&app, "pv1", json!({"items": {"a": {"y": 2}, "b": 2}}), 8);
}

/// sync-response replaces the whole state (keys not in the payload are gone,
/// nulls are kept as values, not deletions); `{}` empties it; each bumps the version.
#[tokio::test]
async fn sync_response_replaces_the_whole_state() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    assert_eq!(
        update(&mut owner, json!({"a": 1, "b": {"c": 2}}), "u").await,
        1
    );
    let replacement = json!({"b": {"d": 3}, "x": null});
    expect_ack(
        &mut owner,
        json!({"type": "sync-response", "payload": replacement}),
        json!("r"),
        2,
    )
    .await;
    assert_eq!(next(&mut v1).await["version"], 1);
    assert_eq!(
        next(&mut v1).await,
        json!({"type": "sync-response", "payload": replacement, "version": 2, "from": from(&owner)})
    );
    assert_stored(&app, "pv1", replacement, 2);
    expect_ack(
        &mut owner,
        json!({"type": "sync-response", "payload": {}}),
        json!("z"),
        3,
    )
    .await;
    assert_eq!(
        next(&mut v1).await,
        json!({"type": "sync-response", "payload": {}, "version": 3, "from": from(&owner)})
    );
    assert_stored(&app, "pv1", json!({}), 3);
}

// ---------------------------------------------------------------------------
// §3.1 request-sync

/// With controllers online, a viewer's request-sync is forwarded to every
/// controller connection (two tabs of one user included) with `from`, without
/// the viewer's payload (SPEC §3.1) or `id`; a second viewer's request in the
/// same window follows in the next one. The viewer gets nothing back, other
/// viewers and other views get nothing, nothing is stored.
#[tokio::test]
async fn request_sync_is_forwarded_to_online_controllers() {
    let app = spawn_app().await;
    let Room {
        mut owner,
        mut ed,
        mut v1,
        mut v2,
    } = room(&app).await;
    let mut owner_tab2 = app.connect("pv1", "owner").await;
    let mut elsewhere = app.connect("pv2", "owner").await;
    v1.send(json!({"type": "request-sync", "payload": {"want": "items"}, "id": "r1"}))
        .await;
    let expected = json!({"type": "request-sync", "from": from(&v1)});
    for c in [&mut owner, &mut owner_tab2, &mut ed] {
        assert_eq!(next(c).await, expected);
    }
    v2.send(json!({"type": "request-sync"})).await;
    let expected = json!({"type": "request-sync", "from": from(&v2)});
    for c in [&mut owner, &mut owner_tab2, &mut ed] {
        assert_eq!(next(c).await, expected);
    }
    quiet_all([
        &mut owner,
        &mut owner_tab2,
        &mut ed,
        &mut v1,
        &mut v2,
        &mut elsewhere,
    ])
    .await;
    assert_stored(&app, "pv1", json!({}), 0);
}

/// With no controller connected, the server answers the viewer itself:
/// `{"type":"sync-response","payload":<stored state>,"version":n,"source":"server","id"?}`
/// — for state written by another tool, and after a controller made changes
/// and left. Nothing is stored, other viewers get nothing.
#[tokio::test]
async fn request_sync_without_controller_gets_server_snapshot() {
    let app = spawn_app().await;
    // State written by another tool while nobody is connected.
    foreign::write_state_and_version(&app.database, "pv2", r#"{"seeded":{"by":"tool"}}"#, 5);
    let mut v1 = app.connect("pv2", "v1").await;
    assert_connected(
        &v1,
        "pv2",
        "v1",
        "viewer",
        json!({"seeded": {"by": "tool"}}),
        5,
        [0, 1, 1],
    );
    v1.send(json!({"type": "request-sync", "id": "r1"})).await;
    assert_eq!(
        next(&mut v1).await,
        json!({"type": "sync-response", "payload": {"seeded": {"by": "tool"}}, "version": 5, "source": "server", "id": "r1"})
    );
    v1.send(json!({"type": "request-sync", "payload": {"any": 1}}))
        .await;
    assert_eq!(
        next(&mut v1).await,
        json!({"type": "sync-response", "payload": {"seeded": {"by": "tool"}}, "version": 5, "source": "server"})
    );
    assert_stored(&app, "pv2", json!({"seeded": {"by": "tool"}}), 5);

    // A controller changes pv1, then leaves.
    let mut owner = app.connect("pv1", "owner").await;
    let mut viewer = app.connect("pv1", "v1").await;
    assert_eq!(update(&mut owner, json!({"slide": 3}), "u").await, 1);
    assert_eq!(next(&mut viewer).await["version"], 1);
    drop(owner);
    wait_until_no_controller(&app, "pv1").await;
    viewer.send(json!({"type": "request-sync", "id": 12})).await;
    assert_eq!(
        next(&mut viewer).await,
        json!({"type": "sync-response", "payload": {"slide": 3}, "version": 1, "source": "server", "id": 12})
    );
    quiet(&mut viewer).await;
    assert_stored(&app, "pv1", json!({"slide": 3}), 1);
}

// ---------------------------------------------------------------------------
// §3 connected: state on join, presence counts

/// A connection opened after changes gets the current state and version in
/// its `connected` message, whatever its role; each connection has its own id.
#[tokio::test]
async fn connected_carries_current_state_and_version() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    assert_eq!(
        update(&mut owner, json!({"slide": 1, "items": {"x": 1}}), "a").await,
        1
    );
    expect_ack(
        &mut owner,
        json!({"type": "item-update", "payload": {"itemId": "x", "y": 2}}),
        json!("b"),
        2,
    )
    .await;
    assert_eq!(update(&mut owner, json!({"slide": 2}), "c").await, 3);
    let state = json!({"slide": 2, "items": {"x": {"y": 2}}});
    let v1 = app.connect("pv1", "v1").await;
    assert_connected(&v1, "pv1", "v1", "viewer", state.clone(), 3, [1, 1, 2]);
    let ed = app.connect("pv1", "ed").await;
    assert_connected(&ed, "pv1", "ed", "controller", state.clone(), 3, [2, 1, 3]);
    let other = app.connect("pv2", "v1").await;
    assert_connected(&other, "pv2", "v1", "viewer", json!({}), 0, [0, 1, 1]);
    let ids = [&owner, &v1, &ed, &other].map(|c| c.connected["connectionId"].clone());
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b, "connection ids are distinct");
        }
    }
    assert_stored(&app, "pv1", state, 3);
}

/// Presence counts distinct users per role and every connection, including
/// the new one: a second tab of a user counts once in controllers/viewers and
/// again in connections; other views are counted apart.
#[tokio::test]
async fn presence_counts_people_not_tabs() {
    let app = spawn_app().await;
    let steps = [
        ("owner", "controller", [1, 0, 1]),
        ("owner", "controller", [1, 0, 2]),
        ("v1", "viewer", [1, 1, 3]),
        ("v1", "viewer", [1, 1, 4]),
        ("ed", "controller", [2, 1, 5]),
        ("v2", "viewer", [2, 2, 6]),
        ("ed", "controller", [2, 2, 7]),
    ];
    let mut open = Vec::new();
    for (user, role, presence) in steps {
        let c = app.connect("pv1", user).await;
        assert_connected(&c, "pv1", user, role, json!({}), 0, presence);
        open.push(c);
    }
    let c = app.connect("pv2", "v1").await;
    assert_connected(&c, "pv2", "v1", "viewer", json!({}), 0, [0, 1, 1]);
    assert_eq!(open.len(), 7);
}

// ---------------------------------------------------------------------------
// §3.2 persistence across a restart

/// Acked changes survive a restart: a new connection's `connected` has the same
/// state and version, the stored row matches, and versions continue from there.
#[tokio::test]
async fn state_survives_restart() {
    let mut app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    for n in 1..=20 {
        assert_eq!(
            update(&mut owner, json!({"n": n, "list": [n]}), "u").await,
            n
        );
    }
    expect_ack(
        &mut owner,
        json!({"type": "item-update", "payload": {"itemId": 3, "t": "x"}}),
        json!("i"),
        21,
    )
    .await;
    let mut other = app.connect("pv2", "ed").await;
    expect_ack(
        &mut other,
        json!({"type": "sync-response", "payload": {"pv2": true}}),
        json!("s"),
        1,
    )
    .await;
    drop(owner);
    drop(other);
    let state = json!({"n": 20, "list": [20], "items": {"3": {"t": "x"}}});
    assert_stored(&app, "pv1", state.clone(), 21);

    app.restart().await;

    assert_stored(&app, "pv1", state.clone(), 21);
    assert_stored(&app, "pv2", json!({"pv2": true}), 1);
    let mut owner = app.connect("pv1", "owner").await;
    assert_connected(
        &owner,
        "pv1",
        "owner",
        "controller",
        state.clone(),
        21,
        [1, 0, 1],
    );
    let v1 = app.connect("pv2", "v1").await;
    assert_connected(
        &v1,
        "pv2",
        "v1",
        "viewer",
        json!({"pv2": true}),
        1,
        [0, 1, 1],
    );
    assert_eq!(update(&mut owner, json!({"after": true}), "next").await, 22);
    assert_stored(
        &app,
        "pv1",
        json!({"n": 20, "list": [20], "items": {"3": {"t": "x"}}, "after": true}),
        22,
    );
}

/// Nothing acknowledged is lost: 50 updates acked just before a restart are
/// all stored afterwards; connections open during the restart are closed with
/// 1001 `server shutting down` (SPEC §3.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_updates_are_durable_across_restart() {
    let mut app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let v1 = app.connect("pv1", "v1").await;
    for n in 1..=50 {
        owner
            .send(json!({"type": "portal-view-update", "payload": {"n": n}, "id": n}))
            .await;
    }
    for n in 1..=50 {
        assert_eq!(
            next(&mut owner).await,
            json!({"type": "ack", "id": n, "version": n})
        );
    }
    let closes = [owner, v1].map(|mut c| {
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(WAIT, c.ws.next())
                    .await
                    .expect("close in time")
                {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.to_string())
                    }
                    Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        })
    });
    app.restart().await;
    for close in closes {
        assert_eq!(
            close.await.expect("reader"),
            (1001, "server shutting down".to_string())
        );
    }
    assert_stored(&app, "pv1", json!({"n": 50}), 50);
    let c = app.connect("pv1", "v1").await;
    assert_connected(&c, "pv1", "v1", "viewer", json!({"n": 50}), 50, [0, 1, 1]);
}

// ---------------------------------------------------------------------------
// Writes that fail after the message was accepted

/// Storage that fails under an open session (state corrupted by another tool):
/// the sender is closed 1011 `internal error`, nothing is acked or broadcast,
/// the row is left as it was, and the server keeps serving other views.
#[tokio::test]
async fn write_failure_closes_1011_without_ack_or_broadcast() {
    let app = spawn_app().await;
    let mut controller = app.connect("pv1", "owner").await;
    let mut viewer = app.connect("pv1", "v1").await;
    foreign::write_state(&app.database, "pv1", "nope");
    controller
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    controller.assert_closed(1011, "internal error").await;
    let (raw, version) = foreign::raw_state(&app.database, "pv1");
    assert_eq!(version, 0);
    assert_eq!(raw, foreign::as_stored(&app.database, "nope"));
    viewer.assert_silent(Duration::from_millis(300)).await;
    let mut other = app.connect("pv2", "owner").await;
    other
        .send(json!({"type": "portal-view-update", "payload": {"b": 2}, "id": 2}))
        .await;
    assert_eq!(
        other.recv().await,
        json!({"type": "ack", "id": 2, "version": 1})
    );
}

/// A view deleted while a controller is connected: its next change closes it
/// 1008 `portal view not found`.
#[tokio::test]
async fn write_to_deleted_view_closes_1008_view_not_found() {
    let app = spawn_app().await;
    let mut controller = app.connect("pv2", "owner").await;
    foreign::delete_view(&app.database, "pv2");
    controller
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    controller
        .assert_closed(1008, "portal view not found")
        .await;
}

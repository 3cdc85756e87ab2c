//! Issue 3's guarantees against a real server: presence events (SPEC §3.3),
//! liveness, token expiry and revocation (§3.4), the membership routes (§4),
//! the limits of §5, the origin check, metrics and storage faults.

mod common;
use common::*;

use std::time::{Duration, Instant};

use futures::StreamExt;
use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::now_secs;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Adds `n` viewers `crowd0…` to lib1 and returns their ids.
fn add_viewers(app: &TestApp, n: usize) -> Vec<String> {
    let admin = app.db.admin();
    (0..n)
        .map(|i| {
            let id = format!("crowd{i}");
            admin
                .add_user(&id, &format!("{id}@test"), &id)
                .expect("user");
            admin
                .set_member("lib1", &id, LibraryRole::Viewer)
                .expect("member");
            id
        })
        .collect()
}

/// Reads frames for `wait`, answering pings (tungstenite does when polled) and
/// returning the text messages that arrived.
async fn read_for(client: &mut Client, wait: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(frame) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        match frame {
            Some(Ok(Message::Text(t))) => got.push(serde_json::from_str(t.as_str()).expect("json")),
            Some(Ok(_)) => {}
            other => panic!("socket ended while reading: {other:?}"),
        }
    }
    got
}

/// The value of one sample line of the Prometheus text, e.g.
/// `portal_closes_total{code="1008"}`; 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Presence (SPEC §3.3)

/// A second tab is no news; the last tab closing is. Viewers hear nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_people_and_tells_controllers_of_first_and_last_tabs() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    assert_eq!(
        owner.connected["presence"],
        json!({"controllers": 1, "viewers": 0, "connections": 1})
    );
    let mut v2 = app.connect("pv1", "v2").await;
    let joined = owner.recv_type("presence").await;
    assert_eq!(
        joined,
        json!({"type": "presence", "joined": [{"userId": "v2", "role": "viewer"}], "left": [],
               "presence": {"controllers": 1, "viewers": 1, "connections": 2}})
    );

    let tab1 = app.connect("pv1", "v1").await;
    let first = owner.recv_type("presence").await;
    assert_eq!(first["joined"], json!([{"userId": "v1", "role": "viewer"}]));
    let mut tab2 = app.connect("pv1", "v1").await;
    assert_eq!(
        tab2.connected["presence"],
        json!({"controllers": 1, "viewers": 2, "connections": 4})
    );
    let second_tab = owner.recv_type("presence").await;
    assert_eq!(
        second_tab,
        json!({"type": "presence", "joined": [], "left": [],
               "presence": {"controllers": 1, "viewers": 2, "connections": 4}}),
        "a second tab only changes the counts"
    );

    drop(tab1);
    let one_tab_left = owner.recv_type("presence").await;
    assert_eq!(one_tab_left["left"], json!([]));
    assert_eq!(one_tab_left["presence"]["connections"], 3);
    tab2.ws.close(None).await.expect("close");
    let gone = owner.recv_type("presence").await;
    assert_eq!(
        gone,
        json!({"type": "presence", "joined": [], "left": [{"userId": "v1", "role": "viewer"}],
               "presence": {"controllers": 1, "viewers": 1, "connections": 2}})
    );
    // Viewers receive no presence events at all.
    for message in read_for(&mut v2, Duration::from_millis(300)).await {
        assert_ne!(message["type"], "presence", "{message}");
    }
}

/// 300 viewers joining at once: the controller gets every one of them, in
/// few events (one per batch window), never one per viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_joining_at_once_is_batched() {
    let app = spawn_app_with(|c| c.presence_batch = Duration::from_millis(200)).await;
    let crowd = add_viewers(&app, 300);
    let mut owner = app.connect("pv1", "owner").await;
    let started = Instant::now();
    let mut joins = Vec::new();
    for user in &crowd {
        let url = app.ws_url("pv1", Some(&app.token(user)));
        joins.push(tokio::spawn(async move {
            let mut c = open_ws(url.into_client_request().expect("url")).await;
            let connected = c.recv().await;
            assert_eq!(connected["type"], "connected");
            c
        }));
    }
    let mut clients = Vec::new();
    for join in joins {
        clients.push(join.await.expect("join task"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut events = 0;
    while seen.len() < crowd.len() {
        let event = owner.recv_type("presence").await;
        events += 1;
        for person in event["joined"].as_array().expect("joined") {
            assert_eq!(person["role"], "viewer");
            assert!(seen.insert(person["userId"].as_str().expect("id").to_string()));
        }
    }
    let windows = (started.elapsed().as_millis() / 200) as usize + 2;
    assert!(
        events <= windows,
        "{events} presence events for 300 joins in {:?}: at most one per 200 ms window",
        started.elapsed()
    );
    drop(clients);
}

// ---------------------------------------------------------------------------
// Liveness, expiry (SPEC §3.4)

/// A peer that stops reading answers no pings and is dropped; one that reads
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let app = spawn_app_with(|c| {
        c.ping_interval = Duration::from_millis(500);
        c.ping_timeout = Duration::from_millis(500);
    })
    .await;
    let _dead = app.connect("pv1", "v1").await; // never polled again: no pongs
    let mut alive = app.connect("pv1", "v2").await;
    let pings_seen = {
        // Reading lets tungstenite answer the server's pings.
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
        while let Ok(frame) = tokio::time::timeout_at(deadline, alive.ws.next()).await {
            match frame {
                Some(Ok(Message::Ping(_))) => n += 1,
                Some(Ok(_)) => {}
                other => panic!("the live peer was cut: {other:?}"),
            }
        }
        n
    };
    assert!(pings_seen >= 2, "pinged every 500 ms, saw {pings_seen}");
    wait_connections(&app, 1).await;
    alive.assert_alive().await;
    let text = metrics(&app).await;
    assert_eq!(sample(&text, "portal_ping_timeouts_total"), 1.0, "{text}");
    assert_eq!(sample(&text, "portal_closes_total{code=\"dropped\"}"), 1.0);
}

/// A token that expires during the session closes it: 1008 `token expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_closed_when_its_token_expires() {
    let app = spawn_app().await;
    let exp = now_secs() + 3;
    let token = app.token_with(SECRET, json!({"sub": "v1", "exp": exp}));
    let mut client = app.open(&app.ws_url("pv1", Some(&token))).await;
    assert_eq!(client.recv().await["type"], "connected");
    // Less than --token-warning (60 s) left: warned at once (SPEC §9).
    assert_eq!(
        client.recv().await,
        json!({"type": "token-expiring", "exp": exp})
    );
    client.assert_alive().await;
    client.assert_closed(1008, "token expired").await;
    let closed_at = now_secs();
    assert!(
        closed_at >= exp && closed_at <= exp + 2,
        "closed at {closed_at}, exp {exp}"
    );
}

// ---------------------------------------------------------------------------
// Membership routes and revocation (SPEC §4, §3.4)

async fn member_request(
    app: &TestApp,
    method: reqwest::Method,
    caller: &str,
    library: &str,
    user: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = app
        .http()
        .request(
            method,
            app.http_url(&format!("/api/libraries/{library}/members/{user}")),
        )
        .bearer_auth(app.token(caller));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn put_role(app: &TestApp, caller: &str, user: &str, role: &str) -> (u16, Value) {
    let body = json!({ "role": role }).to_string();
    member_request(app, reqwest::Method::PUT, caller, "lib1", user, Some(&body)).await
}

fn stored_role(app: &TestApp, library: &str, user: &str) -> Option<String> {
    app.db.admin().member_role(library, user).expect("role")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_member_closes_their_sockets_within_a_second() {
    let app = spawn_app().await;
    let mut v1_pv1 = app.connect("pv1", "v1").await;
    let mut v1_pv2 = app.connect("pv2", "v1").await;
    let mut v2 = app.connect("pv1", "v2").await;
    let started = Instant::now();
    let (status, body) =
        member_request(&app, reqwest::Method::DELETE, "owner", "lib1", "v1", None).await;
    assert_eq!(status, 204, "{body}");
    v1_pv1.assert_closed(1008, "access revoked").await;
    v1_pv2.assert_closed(1008, "access revoked").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    v2.assert_alive().await;
    assert_eq!(stored_role(&app, "lib1", "v1"), None);
    // Coming back is refused now.
    let mut again = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    again.assert_closed(1008, "access denied").await;
    let text = metrics(&app).await;
    assert_eq!(sample(&text, "portal_revocation_closes_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_closes_and_the_user_returns_with_the_new_role() {
    let app = spawn_app().await;
    let mut ed = app.connect("pv1", "ed").await;
    assert_eq!(ed.connected["role"], "controller");
    let mut om = app.connect("pv1", "om").await;
    // Setting the same role again changes nothing: no close.
    let (status, body) = put_role(&app, "om", "ed", "EDITOR").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"libraryId": "lib1", "userId": "ed", "role": "EDITOR"})
    );
    ed.assert_alive().await;

    let (status, body) = put_role(&app, "om", "ed", "VIEWER").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "VIEWER");
    ed.assert_closed(1008, "access revoked").await;
    om.assert_alive().await;
    let ed = app.connect("pv1", "ed").await;
    assert_eq!(ed.connected["role"], "viewer");
    assert_eq!(stored_role(&app, "lib1", "ed").as_deref(), Some("VIEWER"));

    // A new member is added with 200; nothing to close.
    let (status, body) = put_role(&app, "owner", "outsider", "EDITOR").await;
    assert_eq!(status, 200, "{body}");
    let outsider = app.connect("pv1", "outsider").await;
    assert_eq!(outsider.connected["role"], "controller");
}

/// Every refusal of the membership routes, in the order they are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_route_refusals() {
    use reqwest::Method;
    let app = spawn_app().await;
    let put = Method::PUT;
    let del = Method::DELETE;
    let role = Some(r#"{"role":"VIEWER"}"#);
    // (name, method, caller, library, user, body, status, code)
    type Case<'a> = (
        &'a str,
        Method,
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "an editor may not manage members",
            put.clone(),
            "ed",
            "lib1",
            "v1",
            role,
            403,
            "FORBIDDEN",
        ),
        (
            "a viewer may not",
            del.clone(),
            "v2",
            "lib1",
            "v1",
            None,
            403,
            "FORBIDDEN",
        ),
        (
            "a non-member may not",
            put.clone(),
            "outsider",
            "lib1",
            "v1",
            role,
            403,
            "ACCESS_DENIED",
        ),
        (
            "unknown library",
            put.clone(),
            "owner",
            "nope",
            "v1",
            role,
            404,
            "NOT_FOUND",
        ),
        (
            "path tricks in the library id",
            put.clone(),
            "owner",
            "lib1%27--",
            "v1",
            role,
            404,
            "NOT_FOUND",
        ),
        (
            "unknown user",
            put.clone(),
            "owner",
            "lib1",
            "ghost",
            role,
            404,
            "NOT_FOUND",
        ),
        (
            "not a member",
            del.clone(),
            "owner",
            "lib1",
            "outsider",
            None,
            404,
            "NOT_FOUND",
        ),
        (
            "the owner cannot be changed",
            put.clone(),
            "om",
            "lib1",
            "owner",
            role,
            409,
            "CONFLICT",
        ),
        (
            "the owner cannot be removed",
            del.clone(),
            "om",
            "lib1",
            "owner",
            None,
            409,
            "CONFLICT",
        ),
        (
            "a role that does not exist",
            put.clone(),
            "owner",
            "lib1",
            "v1",
            Some(r#"{"role":"ADMIN"}"#),
            400,
            "BAD_REQUEST",
        ),
        (
            "no role",
            put.clone(),
            "owner",
            "lib1",
            "v1",
            Some("{}"),
            400,
            "BAD_REQUEST",
        ),
        (
            "not JSON",
            put.clone(),
            "owner",
            "lib1",
            "v1",
            Some("role=VIEWER"),
            400,
            "BAD_REQUEST",
        ),
    ];
    for (name, method, caller, library, user, body, status, code) in cases {
        let (got, answer) = member_request(&app, method, caller, library, user, body).await;
        assert_eq!(got, status, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
    }
    // No token, an unknown caller, a PUT without Content-Type.
    let url = app.http_url("/api/libraries/lib1/members/v1");
    let response = app.http().delete(&url).send().await.expect("request");
    assert_eq!(response.status(), 401);
    let response = app
        .http()
        .delete(&url)
        .bearer_auth(app.token("ghost"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
    let response = app
        .http()
        .put(&url)
        .bearer_auth(app.token("owner"))
        .body(r#"{"role":"VIEWER"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 415);
    // Nothing changed along the way.
    assert_eq!(stored_role(&app, "lib1", "v1").as_deref(), Some("VIEWER"));
    assert_eq!(stored_role(&app, "lib1", "ed").as_deref(), Some("EDITOR"));
}

/// The admin CLI writes the database directly; the running server sees the
/// change in its log and closes the member's sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_revokes_access_on_a_running_server() {
    let app = spawn_app().await;
    let mut v1 = app.connect("pv1", "v1").await;
    let mut ed = app.connect("pv2", "ed").await;
    let mut v2 = app.connect("pv1", "v2").await;
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portal-sync"));
        cmd.arg("--db").arg(app.database.arg()).args(args);
        cmd.env_remove("PORTAL_DB");
        cmd
    };
    let started = Instant::now();
    let status = cli(&["member", "remove", "--library", "lib1", "--user", "v1"])
        .status()
        .expect("run the CLI");
    assert!(status.success());
    v1.assert_closed(1008, "access revoked").await;
    let status = cli(&[
        "member",
        "set",
        "--library",
        "lib1",
        "--user",
        "ed",
        "--role",
        "VIEWER",
    ])
    .status()
    .expect("run the CLI");
    assert!(status.success());
    ed.assert_closed(1008, "access revoked").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "two CLI runs and two closes took {:?}",
        started.elapsed()
    );
    v2.assert_alive().await;
}

// ---------------------------------------------------------------------------
// Limits (SPEC §5)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_per_user_per_view_and_server_wide() {
    let app = spawn_app_with(|c| {
        c.max_conns_per_user = 2;
        c.max_conns_per_view = 3;
        c.max_conns = 5;
    })
    .await;
    let v1_a = app.connect("pv1", "v1").await;
    let _v1_b = app.connect("pv2", "v1").await;
    let mut third = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    third.assert_closed(1008, "too many connections").await;

    let _v2 = app.connect("pv1", "v2").await;
    let _ed = app.connect("pv1", "ed").await;
    let mut fourth_in_view = app.open(&app.ws_url("pv1", Some(&app.token("om")))).await;
    fourth_in_view
        .assert_closed(1008, "too many connections")
        .await;

    let _om = app.connect("pv2", "om").await; // the 5th connection on the server
    let mut fifth = app
        .open(&app.ws_url("pv3", Some(&app.token("outsider"))))
        .await;
    fifth.assert_closed(1008, "too many connections").await;

    // Closing one frees its slot.
    drop(v1_a);
    wait_connections(&app, 4).await;
    app.connect("pv3", "outsider").await;
    let text = metrics(&app).await;
    assert_eq!(
        sample(&text, "portal_handshakes_refused_total{code=\"1008\"}"),
        3.0
    );
}

/// Over the burst: `RATE_LIMITED` (echoing the id); more than 10 × burst
/// refusals within a minute: the replies, then 1008 `rate limit exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_is_rate_limited_then_closed() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 1.0;
        c.rate_burst = 3;
    })
    .await;
    let mut c = app.connect("pv1", "owner").await;
    for i in 0..3 {
        c.send(json!({"type": "ping", "id": i})).await;
        assert_eq!(c.recv().await["type"], "pong");
    }
    c.send(json!({"type": "portal-view-update", "payload": {"x": 1}, "id": "over"}))
        .await;
    let refused = c.recv().await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "RATE_LIMITED");
    assert_eq!(refused["id"], "over");
    // Refused messages count too: 29 more refusals are tolerated (30 = 10 × 3),
    // the 31st closes after its reply.
    for i in 0..30 {
        c.send(json!({"type": "ping", "id": i})).await;
    }
    let mut replies = 0;
    loop {
        match tokio::time::timeout(WAIT, c.ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).expect("json");
                assert_eq!(m["code"], "RATE_LIMITED", "{m}");
                replies += 1;
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008);
                assert_eq!(frame.reason.as_str(), "rate limit exceeded");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(replies, 30, "every refusal was answered before the close");
    assert_eq!(app.stored("pv1").version, 0, "nothing refused was applied");
}

/// A viewer that never reads while a controller sends: its queue fills, it is
/// closed (1013, or the TCP connection dropped when not even the close frame
/// fits), the controller is unaffected, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_not_skipped() {
    let app = spawn_app_with(|c| {
        c.send_queue_bytes = 1 << 20;
        c.rate_per_sec = 100_000.0;
        c.rate_burst = 100_000;
    })
    .await;
    // The sleeper's socket has a tiny receive buffer, so the kernel holds little
    // for it and its queue on the server must overflow.
    let mut sleeper = {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(app.addr).await.expect("connect");
        let url = app.ws_url("pv1", Some(&app.token("v1")));
        let (ws, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .expect("handshake");
        let mut c = Client {
            ws,
            connected: Value::Null,
        };
        assert_eq!(c.recv().await["type"], "connected");
        c
    };
    let mut reader = app.connect("pv1", "v2").await;
    let mut owner = app.connect("pv1", "owner").await;
    // 1 KiB updates: one writer batch (at most 512 changes) fits in the reader's
    // 1 MiB queue, so a reader that keeps reading is never cut off; 8,000 of
    // them (9 MB) are more than the server's socket buffer (4 MB at most) plus
    // the sleeper's queue.
    let filler = "x".repeat(1024);
    let n = 8000;
    // The controller sends in chunks and lets the reader catch up after each,
    // so the reader is never more than one chunk (~450 KB) behind: a reader
    // that keeps reading is never the slow one, however loaded the machine.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let reading = tokio::spawn(async move {
        let mut versions = Vec::new();
        while versions.len() < n {
            let m = reader.recv().await;
            if m["type"] == "portal-view-update" {
                versions.push(m["version"].as_i64().expect("version"));
                counter.store(versions.len(), std::sync::atomic::Ordering::Release);
            }
        }
        (versions, reader)
    });
    let chunk = 400;
    let mut acked = 0;
    for start in (1..=n).step_by(chunk) {
        let end = (start + chunk - 1).min(n);
        for i in start..=end {
            owner
                .send(json!({"type": "portal-view-update", "payload": {"n": i, "fill": filler}, "id": i}))
                .await;
        }
        while acked < end {
            if owner.recv().await["type"] == "ack" {
                acked += 1;
            }
        }
        let deadline = Instant::now() + WAIT;
        while received.load(std::sync::atomic::Ordering::Acquire) < end {
            assert!(Instant::now() < deadline, "the reader fell behind");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let (versions, mut reader) = reading.await.expect("reader");
    assert_eq!(
        versions,
        (1..=n as i64).collect::<Vec<_>>(),
        "the reader got all"
    );
    wait_connections(&app, 2).await; // the sleeper is gone
    let text = metrics(&app).await;
    assert_eq!(
        sample(&text, "portal_slow_consumer_closes_total"),
        1.0,
        "{text}"
    );

    // What the sleeper finally reads: a gapless prefix, then the end.
    let mut last = 0;
    loop {
        match tokio::time::timeout(WAIT, sleeper.ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).expect("json");
                if let Some(v) = m["version"].as_i64() {
                    assert_eq!(v, last + 1, "no gaps before the close");
                    last = v;
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1013);
                assert_eq!(frame.reason.as_str(), "slow consumer");
                break;
            }
            Some(Ok(_)) => {}
            // Dropped: not even the close frame could be queued.
            None | Some(Err(_)) => break,
        }
    }
    assert!(
        last < n as i64,
        "the sleeper was cut off, not served everything"
    );
    assert_eq!(app.stored("pv1").version, n as i64);
    reader.assert_alive().await;
}

// ---------------------------------------------------------------------------
// Origin check

fn with_origin(
    url: &str,
    origin: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().expect("url");
    request
        .headers_mut()
        .insert("origin", HeaderValue::from_str(origin).expect("origin"));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused_before_the_upgrade() {
    let app = spawn_app_with(|c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let url = app.ws_url("pv1", Some(&app.token("v1")));
    match tokio_tungstenite::connect_async(with_origin(&url, "https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    for allowed in [
        format!("http://{}", app.addr),
        "https://app.example.com".into(),
    ] {
        let mut c = open_ws(with_origin(&url, &allowed)).await;
        assert_eq!(c.recv().await["type"], "connected", "{allowed}");
    }

    let rest = app.http_url("/api/portal-views/pv1");
    let refused = app
        .http()
        .get(&rest)
        .bearer_auth(app.token("v1"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "FORBIDDEN_ORIGIN");
    let listed = app
        .http()
        .get(&rest)
        .bearer_auth(app.token("v1"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(listed.status(), 200);
    assert_eq!(
        listed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let preflight = app
        .http()
        .request(reqwest::Method::OPTIONS, &rest)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "PATCH")
        .send()
        .await
        .expect("request");
    assert_eq!(preflight.status(), 204);
    assert!(preflight.headers()["access-control-allow-methods"]
        .to_str()
        .expect("text")
        .contains("PATCH"));
}

// ---------------------------------------------------------------------------
// Metrics and faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_messages_and_deliveries() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut v1 = app.connect("pv1", "v1").await;
    let _v2 = app.connect("pv1", "v2").await;
    owner
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    owner.recv_type("ack").await;
    v1.send(json!({"type": "portal-view-update", "payload": {"a": 2}}))
        .await;
    assert_eq!(v1.recv_type("error").await["code"], "FORBIDDEN");
    v1.send(json!({"type": "nope"})).await;
    assert_eq!(v1.recv_type("error").await["code"], "UNKNOWN_TYPE");
    v1.send_text("not json").await;
    v1.assert_closed(1003, "unsupported data").await;
    wait_connections(&app, 2).await;

    let text = metrics(&app).await;
    for (name, value) in [
        ("portal_connections{role=\"controller\"}", 1.0),
        ("portal_connections{role=\"viewer\"}", 1.0),
        ("portal_connects_total", 3.0),
        ("portal_closes_total{code=\"1003\"}", 1.0),
        (
            "portal_inbound_messages_total{outcome=\"accepted\",type=\"portal-view-update\"}",
            1.0,
        ),
        (
            "portal_inbound_messages_total{outcome=\"forbidden\",type=\"portal-view-update\"}",
            1.0,
        ),
        (
            "portal_inbound_messages_total{outcome=\"unknown_type\",type=\"unknown\"}",
            1.0,
        ),
        (
            "portal_inbound_messages_total{outcome=\"unsupported\",type=\"invalid\"}",
            1.0,
        ),
        ("portal_broadcasts_total", 1.0),
        ("portal_deliveries_total", 2.0),
        ("portal_sqlite_write_seconds_count", 1.0),
        ("portal_fanout_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&text, name), value, "{name} in:\n{text}");
    }
    assert!(text.contains("# TYPE portal_fanout_seconds histogram"));
}

/// Storage that stops working mid-run: handshakes close 1011, `/health` says
/// 503, a message's write closes 1011, nothing crashes; once storage is back,
/// everything works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_storage_gives_1011_and_503_then_recovers() {
    let app = spawn_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    // Another tool renames the table away: storage stops working.
    foreign::rename_table(&app.database, "portal_views", "portal_views_away");
    let mut refused = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    refused.assert_closed(1011, "internal error").await;
    let (status, body) = health(&app).await;
    assert_eq!(status, 503, "{body}");
    owner
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    owner.assert_closed(1011, "internal error").await;

    foreign::rename_table(&app.database, "portal_views_away", "portal_views");
    let (status, _) = health(&app).await;
    assert_eq!(status, 200);
    let mut owner = app.connect("pv1", "owner").await;
    owner
        .send(json!({"type": "portal-view-update", "payload": {"a": 2}, "id": 2}))
        .await;
    assert_eq!(owner.recv_type("ack").await["version"], 1);
    assert_eq!(app.stored_state("pv1"), json!({"a": 2}));
}

/// A state may nest at most 64 levels (`merge::MAX_STATE_DEPTH`), so that every
/// stored state can be read back, by the server and by clients whose JSON
/// parsers stop at 128 levels: one level deeper is `BAD_REQUEST` (400 on REST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_depth_is_bounded_at_the_limit() {
    let app = spawn_app().await;
    let nested = |k: usize| -> Value {
        let mut v = json!({});
        for _ in 1..k {
            v = json!({ "a": v });
        }
        v
    };
    let mut owner = app.connect("pv1", "owner").await;
    // state.items.x.deep.<61 levels>: 64 in all.
    owner
        .send(
            json!({"type": "item-update", "payload": {"itemId": "x", "deep": nested(61)}, "id": 1}),
        )
        .await;
    assert_eq!(owner.recv().await["type"], "ack");
    owner
        .send(
            json!({"type": "item-update", "payload": {"itemId": "x", "deep": nested(62)}, "id": 2}),
        )
        .await;
    let refused = owner.recv().await;
    assert_eq!(refused["code"], "BAD_REQUEST", "{refused}");
    assert_eq!(refused["id"], 2);
    let patch = |k: usize| {
        app.http()
            .patch(app.http_url("/api/portal-views/pv1"))
            .bearer_auth(app.token("owner"))
            .header("content-type", "application/json")
            .body(json!({ "deep": nested(k) }).to_string())
            .send()
    };
    assert_eq!(patch(63).await.expect("patch").status(), 200);
    assert_eq!(patch(64).await.expect("patch").status(), 400);
    assert_eq!(app.stored("pv1").version, 2);
    // The stored state reads back, and the view stays writable.
    let fresh = app.connect("pv1", "v1").await;
    assert_eq!(fresh.connected["version"], 2);
    owner
        .send(json!({"type": "portal-view-update", "payload": {"n": 1}, "id": 3}))
        .await;
    assert_eq!(owner.recv_type("ack").await["version"], 3);
}

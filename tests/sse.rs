//! SPEC §7's HTTP fallback against a real server: the SSE stream and the POST
//! route, side by side with WebSockets, sharing their rules, presence, limits,
//! ordering and closes.

mod common;
use common::*;

use std::time::{Duration, Instant};

use portal_sync::protocol::auth::now_secs;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A GET of the stream with `token`; returns the status and the JSON body.
async fn sse_refusal(app: &TestApp, url: &str) -> (u16, Value) {
    let response = app.http().get(url).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON error body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_viewer_and_a_websocket_viewer_get_the_same_versions_in_order() {
    let app = spawn_app().await;
    let mut sse = app.sse("pv1", "v1").await;
    let mut ws = app.connect("pv1", "v2").await;
    assert_eq!(sse.connected["role"], "viewer");
    assert_eq!(sse.connected["presence"]["viewers"], 1);
    let mut owner = app.connect("pv1", "owner").await;
    // Every state-changing kind, from a WebSocket and from REST; one payload
    // pretty-printed, whose line breaks must not split its event.
    let messages = [
        json!({"type": "portal-view-update", "payload": {"currentItem": 1}}),
        json!({"type": "item-update", "payload": {"itemId": "a", "title": "A"}, "id": 1}),
        json!({"type": "sync-response", "payload": {"items": {}, "currentItem": 2}}),
    ];
    for message in &messages {
        owner.send(message.clone()).await;
    }
    owner
        .send_text("{\"type\":\"portal-view-update\",\r\n \"payload\": {\n\"b\": 2}, \"id\": 4}")
        .await;
    // Stored before the PATCH below, so that the order is known.
    while owner.recv_type("ack").await["id"] != 4 {}
    let response = app
        .http()
        .patch(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(app.token("ed"))
        .header("content-type", "application/json")
        .body(r#"{"c":3}"#)
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 200);
    let mut over_sse = Vec::new();
    for _ in 0..5 {
        let event = sse.next_event().await.expect("an event");
        // Events carrying a version carry it as their id too.
        assert_eq!(
            event.id,
            Some(event.data["version"].to_string()),
            "{:?}",
            event
        );
        over_sse.push(event.data);
    }
    let mut over_ws = Vec::new();
    for _ in 0..5 {
        over_ws.push(ws.recv().await);
    }
    assert_eq!(over_sse, over_ws, "the same messages, in the same order");
    let versions: Vec<i64> = over_sse
        .iter()
        .map(|m| m["version"].as_i64().expect("version"))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    assert_eq!(over_sse[3]["payload"], json!({"b": 2}));
    assert_eq!(over_sse[4]["source"], "rest");
    assert_eq!(
        app.stored_state("pv1"),
        json!({"items": {}, "currentItem": 2, "b": 2, "c": 3})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_sse_and_post_drives_websocket_viewers() {
    let app = spawn_app().await;
    let mut viewer = app.connect("pv1", "v1").await;
    let mut presenter = app.sse("pv1", "ed").await;
    let me = presenter.connection_id();
    let update = json!({"type": "portal-view-update", "payload": {"currentItem": 3}, "id": "u1"});
    let (status, ack) = app.post_message("pv1", "ed", Some(&me), &update).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack, json!({"type": "ack", "id": "u1", "version": 1}));
    // Acked means stored.
    assert_eq!(app.stored("pv1").version, 1);
    assert_eq!(app.stored_state("pv1"), json!({"currentItem": 3}));
    let seen = viewer.recv().await;
    assert_eq!(
        seen,
        json!({"type": "portal-view-update", "payload": {"currentItem": 3}, "version": 1,
               "from": {"userId": "ed", "connectionId": me}})
    );
    // Without an id there is no ack, but the answer still waits for the write.
    let item = json!({"type": "item-update", "payload": {"itemId": 7, "done": true}});
    let (status, body) = app.post_message("pv1", "ed", Some(&me), &item).await;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(app.stored("pv1").version, 2);
    assert_eq!(viewer.recv().await["version"], 2);
    let (status, pong) = app
        .post_message("pv1", "ed", Some(&me), &json!({"type": "ping", "id": 9}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 9);
    // The sender's own stream does not get its changes back; others' it does.
    let mut owner = app.connect("pv1", "owner").await;
    owner
        .send(json!({"type": "portal-view-update", "payload": {"x": 1}, "id": 1}))
        .await;
    let next = presenter.recv_type("portal-view-update").await;
    assert_eq!(
        next["version"], 3,
        "own versions 1 and 2 were skipped: {next}"
    );
    assert_eq!(next["from"]["userId"], "owner");
    // A POST that names no stream is broadcast to everyone, from the user alone.
    let (status, _) = app
        .post_message(
            "pv1",
            "ed",
            None,
            &json!({"type": "portal-view-update", "payload": {"y": 1}}),
        )
        .await;
    assert_eq!(status, 200);
    let last = presenter.recv_type("portal-view-update").await;
    assert_eq!(last["version"], 4);
    assert_eq!(last["from"], json!({"userId": "ed"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handshake_check_is_its_http_status() {
    let app = spawn_app_with(|c| c.max_conns_per_user = 1).await;
    let expired = app.token_with(SECRET, json!({"sub": "v1", "exp": now_secs() - 1}));
    let forged = app.token_with(
        "not-the-secret",
        json!({"sub": "v1", "exp": now_secs() + 60}),
    );
    let cases = [
        (
            app.sse_url("pv1", None),
            401,
            "INVALID_TOKEN",
            "invalid token",
        ),
        (
            app.sse_url("pv1", Some("garbage")),
            401,
            "INVALID_TOKEN",
            "invalid token",
        ),
        (
            app.sse_url("pv1", Some(&forged)),
            401,
            "INVALID_TOKEN",
            "invalid token",
        ),
        (
            app.sse_url("pv1", Some(&expired)),
            401,
            "TOKEN_EXPIRED",
            "token expired",
        ),
        (
            app.sse_url("pv1", Some(&app.token("ghost"))),
            401,
            "UNKNOWN_USER",
            "unknown user",
        ),
        (
            app.sse_url("nope", Some(&app.token("v1"))),
            404,
            "NOT_FOUND",
            "portal view not found",
        ),
        (
            app.sse_url("pv1", Some(&app.token("outsider"))),
            403,
            "ACCESS_DENIED",
            "access denied",
        ),
    ];
    for (url, status, code, message) in cases {
        let (got, body) = sse_refusal(&app, &url).await;
        assert_eq!(got, status, "{url}: {body}");
        assert_eq!(body["error"]["code"], code, "{url}");
        assert_eq!(body["error"]["message"], message, "{url}");
    }
    // The token may come in a header instead.
    let response = app
        .http()
        .get(app.sse_url("pv1", None))
        .bearer_auth(app.token("v1"))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 200);
    let mut by_header = SseClient::new(response);
    assert_eq!(by_header.recv().await["type"], "connected");
    // That stream is v1's one connection: another, on either transport, is refused.
    let (got, body) = sse_refusal(&app, &app.sse_url("pv2", Some(&app.token("v1")))).await;
    assert_eq!(
        (got, &body["error"]["message"]),
        (429, &json!("too many connections"))
    );
    let mut ws = app.open(&app.ws_url("pv1", Some(&app.token("v1")))).await;
    ws.assert_closed(1008, "too many connections").await;
    let text = metrics(&app).await;
    assert!(text.contains("portal_sse_streams 1"), "{text}");
    assert!(
        text.contains("portal_handshakes_refused_total{code=\"1008\"} 9"),
        "{text}"
    );
    // A foreign page is refused before anything else.
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(&app.token("v2"))))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    // Storage failing is a 500.
    foreign::rename_table(&app.database, "portal_views", "portal_views_away");
    let (got, body) = sse_refusal(&app, &app.sse_url("pv1", Some(&app.token("v2")))).await;
    assert_eq!(
        (got, &body["error"]["message"]),
        (500, &json!("internal error"))
    );
    foreign::rename_table(&app.database, "portal_views_away", "portal_views");
}

const APP_ORIGIN: &str = "https://app.example.com";

/// `OPTIONS path` as a browser preflights a GET with `Authorization` from `origin`.
async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.http()
        .request(reqwest::Method::OPTIONS, app.http_url(path))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight")
}

fn header_text<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_may_preflight_and_read_the_stream() {
    let app = spawn_app_with(|c| c.allowed_origins = vec![APP_ORIGIN.into()]).await;
    let answer = preflight(&app, "/sse/portal-view/pv1", APP_ORIGIN).await;
    assert_eq!(answer.status(), 204);
    assert_eq!(
        header_text(&answer, "access-control-allow-origin"),
        APP_ORIGIN
    );
    let methods = header_text(&answer, "access-control-allow-methods");
    assert!(methods.split(", ").any(|m| m == "GET"), "{methods}");
    let headers = header_text(&answer, "access-control-allow-headers");
    assert!(
        headers.split(", ").any(|h| h == "authorization"),
        "{headers}"
    );
    // The same answer whatever the view: the preflight carries no token.
    let unknown = preflight(&app, "/sse/portal-view/nope", APP_ORIGIN).await;
    assert_eq!(unknown.status(), 204);

    // The stream itself, fetched with the token in a header, is readable.
    let response = app
        .http()
        .get(app.sse_url("pv1", None))
        .bearer_auth(app.token("v1"))
        .header("origin", APP_ORIGIN)
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 200);
    assert_eq!(
        header_text(&response, "access-control-allow-origin"),
        APP_ORIGIN
    );
    assert_eq!(header_text(&response, "content-type"), "text/event-stream");
    let mut stream = SseClient::new(response);
    let connected = stream.recv().await;
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["userId"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_origin_gets_the_api_preflight_refusal_on_the_stream() {
    let app = spawn_app_with(|c| c.allowed_origins = vec![APP_ORIGIN.into()]).await;
    let api = preflight(&app, "/api/portal-views/pv1", "https://evil.example").await;
    let sse = preflight(&app, "/sse/portal-view/pv1", "https://evil.example").await;
    assert_eq!(api.status(), 405, "the api preflight's refusal");
    assert_eq!(sse.status(), api.status());
    for refused in [&api, &sse] {
        for name in [
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-headers",
        ] {
            assert!(refused.headers().get(name).is_none(), "{name}");
        }
    }
    let (api, sse): (Value, Value) = (
        api.json().await.expect("JSON"),
        sse.json().await.expect("JSON"),
    );
    assert_eq!(sse, api);
    assert_eq!(sse["error"]["code"], "METHOD_NOT_ALLOWED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_closed_when_its_token_expires() {
    let app = spawn_app().await;
    let exp = now_secs() + 2;
    let token = app.token_with(SECRET, json!({"sub": "v1", "exp": exp}));
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(&token)))
        .send()
        .await;
    let mut client = SseClient::new(response.expect("SSE"));
    assert_eq!(client.recv().await["type"], "connected");
    // Less than --token-warning (60 s) left: warned at once (SPEC §9).
    assert_eq!(
        client.recv().await,
        json!({"type": "token-expiring", "exp": exp})
    );
    client.assert_closed(1008, "token expired").await;
    let closed_at = now_secs();
    assert!(
        closed_at >= exp && closed_at <= exp + 2,
        "closed at {closed_at}, exp {exp}"
    );
    wait_connections(&app, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_shutdown_end_streams_with_closed() {
    let mut app = spawn_app().await;
    let mut v1 = app.sse("pv1", "v1").await;
    let mut v2 = app.sse("pv1", "v2").await;
    let started = Instant::now();
    let response = app
        .http()
        .delete(app.http_url("/api/libraries/lib1/members/v1"))
        .bearer_auth(app.token("owner"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 204);
    v1.assert_closed(1008, "access revoked").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (status, _) = sse_refusal(&app, &app.sse_url("pv1", Some(&app.token("v1")))).await;
    assert_eq!(status, 403);
    // Shutdown: the last event is 1001, and the server stops in time.
    let stopping = tokio::spawn(async move {
        app.shutdown().await.expect("clean shutdown");
        app
    });
    v2.assert_closed(1001, "server shutting down").await;
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stops in time")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_refusals_follow_the_websocket_rules() {
    let app = spawn_app().await;
    let viewer = app.sse("pv1", "v1").await;
    let mine = viewer.connection_id();
    let v2 = app.sse("pv1", "v2").await;
    let other = v2.connection_id();
    let (status, body) = app
        .post_message(
            "pv1",
            "v1",
            Some(&mine),
            &json!({"type": "portal-view-update", "payload": {}, "id": "x"}),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["type"], "error");
    assert_eq!(
        (&body["code"], &body["id"]),
        (&json!("FORBIDDEN"), &json!("x"))
    );
    let table = [
        (json!({"type": "dance", "id": 1}), 400, "UNKNOWN_TYPE"),
        (json!({"type": "ping", "id": null}), 400, "BAD_REQUEST"),
        (
            json!({"type": "ping", "id": {"not": "an id"}}),
            400,
            "BAD_REQUEST",
        ),
        (json!([1, 2]), 400, "BAD_REQUEST"),
        (json!({"no": "type"}), 400, "BAD_REQUEST"),
    ];
    for (message, status, code) in table {
        let (got, body) = app.post_message("pv1", "v1", Some(&mine), &message).await;
        assert_eq!(got, status, "{message}: {body}");
        assert_eq!(body["type"], "error", "{message}");
        assert_eq!(body["code"], code, "{message}");
    }
    // A stream that is not yours, or none at all, is named in vain.
    for id in [other.as_str(), "0123456789abcdef01234567"] {
        let (status, body) = app
            .post_message("pv1", "v1", Some(id), &json!({"type": "ping"}))
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST");
    }
    // The §3 checks and the REST body rules, as REST errors.
    let (status, body) = app
        .post_message("nope", "v1", None, &json!({"type": "ping"}))
        .await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("NOT_FOUND")));
    let (status, _) = app
        .post_message("pv3", "v1", None, &json!({"type": "ping"}))
        .await;
    assert_eq!(status, 403);
    let url = app.http_url("/api/portal-views/pv1/messages");
    let response = app.http().post(&url).body("{}").send().await.expect("POST");
    assert_eq!(response.status(), 401);
    let response = app
        .http()
        .post(&url)
        .bearer_auth(app.token("v1"))
        .header("content-type", "text/plain")
        .body(r#"{"type":"ping"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 415);
    let huge = json!({"type": "ping", "payload": "x".repeat(70_000)});
    let (status, _) = app.post_message("pv1", "v1", None, &huge).await;
    assert_eq!(status, 413);
    // Nothing was applied, and the streams are still open.
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(health(&app).await.1["connections"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sync_over_post_reaches_controllers_or_is_answered_by_the_server() {
    let app = spawn_app().await;
    let viewer = app.sse("pv1", "v1").await;
    let mine = viewer.connection_id();
    // No controller: the server answers with the stored state.
    let (status, body) = app
        .post_message(
            "pv1",
            "v1",
            Some(&mine),
            &json!({"type": "request-sync", "id": "s"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"type": "sync-response", "payload": {}, "version": 0, "source": "server", "id": "s"})
    );
    // A controller on SSE is asked, and the POST answers `{}`.
    let mut presenter = app.sse("pv1", "owner").await;
    let (status, body) = app
        .post_message(
            "pv1",
            "v1",
            Some(&mine),
            &json!({"type": "request-sync", "id": "t"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    let asked = presenter.recv_type("request-sync").await;
    assert_eq!(asked["from"], json!({"userId": "v1", "connectionId": mine}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_rate_limited_per_stream_and_a_flood_closes_the_stream() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 0.001;
        c.rate_burst = 2;
    })
    .await;
    let mut viewer = app.sse("pv1", "v1").await;
    let mine = viewer.connection_id();
    for i in 0..2 {
        let (status, _) = app
            .post_message("pv1", "v1", Some(&mine), &json!({"type": "ping", "id": i}))
            .await;
        assert_eq!(status, 200);
    }
    let (status, body) = app
        .post_message(
            "pv1",
            "v1",
            Some(&mine),
            &json!({"type": "ping", "id": "late"}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        (&body["code"], &body["id"]),
        (&json!("RATE_LIMITED"), &json!("late"))
    );
    // A POST without a stream counts against its user's own bucket.
    for _ in 0..2 {
        let (status, _) = app
            .post_message("pv1", "v2", None, &json!({"type": "ping"}))
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = app
        .post_message("pv1", "v2", None, &json!({"type": "ping"}))
        .await;
    assert_eq!(status, 429);
    // 10 × burst refusals are tolerated; the next closes the stream.
    for _ in 0..20 {
        let (status, _) = app
            .post_message("pv1", "v1", Some(&mine), &json!({"type": "ping"}))
            .await;
        assert_eq!(status, 429);
    }
    viewer.assert_closed(1008, "rate limit exceeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_connections_count_in_presence_and_keep_alives_flow() {
    let app = spawn_app_with(|c| c.ping_interval = Duration::from_millis(300)).await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut viewer = app.sse("pv1", "v1").await;
    let joined = owner.recv_type("presence").await;
    assert_eq!(
        joined["joined"],
        json!([{"userId": "v1", "role": "viewer"}])
    );
    assert_eq!(
        joined["presence"],
        json!({"controllers": 1, "viewers": 1, "connections": 2})
    );
    // Keep-alive comments arrive at the heartbeat interval, and nothing else does.
    let started = Instant::now();
    owner.send(json!({"type": "ping"})).await;
    owner.recv_type("pong").await;
    let update = json!({"type": "portal-view-update", "payload": {"k": 1}, "id": 1});
    tokio::time::sleep(Duration::from_millis(1000)).await;
    owner.send(update).await;
    assert_eq!(viewer.recv().await["type"], "portal-view-update");
    assert!(
        viewer.comments >= 2,
        "{} keep-alives in {:?}",
        viewer.comments,
        started.elapsed()
    );
    // Closing the stream (the browser tab going away) is a `left`.
    drop(viewer);
    let left = owner.recv_type("presence").await;
    assert_eq!(left["left"], json!([{"userId": "v1", "role": "viewer"}]));
    wait_connections(&app, 1).await;
    assert!(metrics(&app).await.contains("portal_sse_streams 0"));
}

/// The body of a raw chunked HTTP/1.1 response: its bytes, and whether the
/// terminating chunk arrived (the response ended rather than the connection).
fn dechunk(raw: &[u8]) -> (Vec<u8>, bool) {
    let start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let (mut rest, mut body) = (&raw[start..], Vec::new());
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).expect("size"), 16)
            .expect("hex chunk size");
        if size == 0 {
            return (body, true);
        }
        let Some(chunk) = rest.get(eol + 2..eol + 2 + size) else {
            return (body, false);
        };
        body.extend_from_slice(chunk);
        rest = rest.get(eol + 4 + size..).unwrap_or_default();
    }
}

/// A stream whose reader stops reading is cut off, after a gapless prefix,
/// rather than skipped or held: its TCP connection is dropped when not even
/// the `closed` event can get through (SPEC §3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_reader_that_stops_reading_is_dropped() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 100_000.0;
        c.rate_burst = 100_000;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut sleeper = socket.connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /sse/portal-view/pv1?token={} HTTP/1.1\r\nHost: {}\r\n\r\n",
        app.token("v1"),
        app.addr
    );
    sleeper
        .write_all(request.as_bytes())
        .await
        .expect("request");
    let mut owner = app.connect("pv1", "owner").await;
    wait_connections(&app, 2).await;
    // Chunks of 100 KB, each stored before the next, never overflow the
    // 1 MiB queue of a reader that reads; 8 MB is more than the kernel, hyper
    // and the queue hold for one that does not.
    let filler = "x".repeat(1024);
    let mut sent = 0;
    while sent < 8000 && health(&app).await.1["connections"] == 2 {
        for i in sent + 1..=sent + 100 {
            owner
                .send(json!({"type": "portal-view-update", "payload": {"n": i, "fill": filler}, "id": i}))
                .await;
        }
        sent += 100;
        while owner.recv_type("ack").await["id"] != sent {}
    }
    wait_connections(&app, 1).await;
    let text = metrics(&app).await;
    assert!(
        text.contains("portal_slow_consumer_closes_total 1"),
        "{text}"
    );
    // Reading now gets what was buffered, then the end of the connection.
    let mut raw = Vec::new();
    let read = tokio::time::timeout(WAIT, sleeper.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    let (body, ended) = dechunk(&raw);
    assert!(
        !ended,
        "the response cannot have ended: its end could not be written"
    );
    let body = String::from_utf8(body).expect("UTF-8");
    let versions: Vec<i64> = body
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.split('\n').next()?).ok())
        .filter(|m| m["type"] == "portal-view-update")
        .map(|m| m["version"].as_i64().expect("version"))
        .collect();
    assert!(versions.len() > 100, "{} delivered", versions.len());
    let expected: Vec<i64> = (1..=versions.len() as i64).collect();
    assert_eq!(versions, expected, "a gapless prefix");
    owner.send(json!({"type": "ping", "id": "alive?"})).await;
    assert_eq!(owner.recv_type("pong").await["id"], "alive?");
}

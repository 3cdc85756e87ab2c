//! Checks made when a change is applied, not only when it arrives (SPEC §4),
//! the state cap (SPEC §5 `--max-state-bytes`), and the per-user rate of REST
//! changes (SPEC §4).
//!
//! The slow-body tests send a request head with `Expect: 100-continue` over
//! raw TCP: hyper answers `100 Continue` only once the route starts reading
//! the body, that is once every check made on arrival has passed. Then the
//! test changes the world (removes the member, downgrades them, lets the
//! token expire) and only then sends the body.

mod common;
use common::*;

use std::time::{Duration, Instant};

use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::now_secs;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// A request whose body is held back

/// A request whose head the server has checked and whose body it waits for.
struct HeldBody {
    stream: TcpStream,
    body: Vec<u8>,
}

/// Sends the head of `method path` with `token` and `extra` headers, and
/// waits for the server's `100 Continue`.
async fn hold_body(
    app: &TestApp,
    method: &str,
    path: &str,
    token: &str,
    extra: &[(&str, &str)],
    body: &Value,
) -> HeldBody {
    let body = body.to_string().into_bytes();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer to the head in time")
            .expect("read");
        assert!(n > 0, "connection closed after the head: {:?}", text(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "the head passed its checks: expected 100 Continue, got {:?}",
        text(&got)
    );
    HeldBody { stream, body }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl HeldBody {
    /// Sends the body; returns the final status and JSON body.
    async fn finish(mut self) -> (u16, Value) {
        self.stream.write_all(&self.body).await.expect("write body");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, self.stream.read_to_end(&mut answer))
            .await
            .expect("the answer in time")
            .expect("read answer");
        let answer = text(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").expect("a response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON ({e}): {body}"));
        (status, body)
    }
}

// ---------------------------------------------------------------------------
// SPEC §4: access and the token hold when the change is applied

/// What happens to the editor `ed` between the request's head and its body.
#[derive(Clone, Copy)]
enum Meanwhile {
    /// Removed from lib1.
    Removed,
    /// Changed to VIEWER.
    Downgraded,
    /// The request's token (valid for a few seconds) expires.
    Expired,
}

/// How the change is sent.
#[derive(Clone, Copy)]
enum Route {
    Patch,
    /// `POST …/messages` naming no stream.
    Post,
    /// `POST …/messages` with `X-Connection-Id` naming ed's own SSE stream.
    PostFromStream,
}

/// `ed` sends a change whose body arrives after `meanwhile`: refused with
/// the status and code SPEC §4 gives, nothing stored, and a sending stream is
/// closed as an open connection would be.
async fn change_across(route: Route, meanwhile: Meanwhile) {
    let app = spawn_app().await;
    let (token, exp) = match meanwhile {
        Meanwhile::Expired => {
            let exp = now_secs() + 3;
            let claims = json!({"sub": "ed", "exp": exp});
            (app.token_with(SECRET, claims), Some(exp))
        }
        _ => (app.token("ed"), None),
    };
    let mut stream = match route {
        Route::PostFromStream => Some(app.sse("pv1", "ed").await),
        _ => None,
    };
    let connection_id = stream.as_ref().map(SseClient::connection_id);
    let message = json!({"type": "portal-view-update", "payload": {"late": true}, "id": "late"});
    let held = match route {
        Route::Patch => {
            let path = "/api/portal-views/pv1";
            hold_body(&app, "PATCH", path, &token, &[], &json!({"late": true})).await
        }
        Route::Post | Route::PostFromStream => {
            let path = "/api/portal-views/pv1/messages";
            let extra: Vec<(&str, &str)> = connection_id
                .iter()
                .map(|id| ("X-Connection-Id", id.as_str()))
                .collect();
            hold_body(&app, "POST", path, &token, &extra, &message).await
        }
    };
    match meanwhile {
        Meanwhile::Removed => {
            assert!(app.db.admin().remove_member("lib1", "ed").expect("remove"));
        }
        Meanwhile::Downgraded => {
            app.db
                .admin()
                .set_member("lib1", "ed", LibraryRole::Viewer)
                .expect("downgrade");
        }
        Meanwhile::Expired => {
            let exp = exp.expect("exp");
            let deadline = Instant::now() + Duration::from_secs(10);
            while now_secs() < exp {
                assert!(Instant::now() < deadline, "the clock reaches exp");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let (status, body) = held.finish().await;
    let (want_status, want_code, want_reason) = match meanwhile {
        Meanwhile::Removed => (403, "ACCESS_DENIED", "access revoked"),
        Meanwhile::Downgraded => (403, "FORBIDDEN", "access revoked"),
        Meanwhile::Expired => (401, "TOKEN_EXPIRED", "token expired"),
    };
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let stored = app.stored("pv1");
    assert_eq!(stored.version, 0, "nothing stored");
    assert_eq!(stored.state.get(), "{}");
    if let Some(stream) = &mut stream {
        stream.assert_closed(1008, want_reason).await;
    }
}

#[tokio::test]
async fn patch_whose_author_is_removed_before_its_body_is_403() {
    change_across(Route::Patch, Meanwhile::Removed).await;
}

#[tokio::test]
async fn patch_whose_author_is_downgraded_before_its_body_is_403() {
    change_across(Route::Patch, Meanwhile::Downgraded).await;
}

#[tokio::test]
async fn patch_whose_token_expires_before_its_body_is_401() {
    change_across(Route::Patch, Meanwhile::Expired).await;
}

#[tokio::test]
async fn post_whose_author_is_removed_before_its_body_is_403() {
    change_across(Route::Post, Meanwhile::Removed).await;
}

#[tokio::test]
async fn post_whose_author_is_downgraded_before_its_body_is_403() {
    change_across(Route::Post, Meanwhile::Downgraded).await;
}

#[tokio::test]
async fn post_whose_token_expires_before_its_body_is_401() {
    change_across(Route::Post, Meanwhile::Expired).await;
}

#[tokio::test]
async fn stream_post_whose_author_is_removed_is_403_and_the_stream_closes() {
    change_across(Route::PostFromStream, Meanwhile::Removed).await;
}

#[tokio::test]
async fn stream_post_whose_author_is_downgraded_is_403_and_the_stream_closes() {
    change_across(Route::PostFromStream, Meanwhile::Downgraded).await;
}

#[tokio::test]
async fn stream_post_whose_token_expires_is_401_and_the_stream_closes() {
    change_across(Route::PostFromStream, Meanwhile::Expired).await;
}

// ---------------------------------------------------------------------------
// SPEC §5: --max-state-bytes

const CAP: usize = 4096;

async fn capped_app() -> TestApp {
    spawn_app_with(|c| c.max_state_bytes = CAP).await
}

fn len(state: &Value) -> usize {
    state.to_string().len()
}

fn assert_state_too_large(reply: &Value, id: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "BAD_REQUEST", "{reply}");
    assert_eq!(reply["id"], id, "{reply}");
    let message = reply["message"].as_str().expect("message");
    assert!(message.starts_with("state too large"), "{reply}");
}

/// Grows pv1 with 300-byte item-updates over a WebSocket, then fills it to
/// exactly the cap; one more byte is refused with SPEC's `BAD_REQUEST`,
/// changes nothing and reaches no one; the socket, the view and an unrelated
/// view go on working.
#[tokio::test]
async fn item_updates_up_to_the_cap_then_one_more_is_refused() {
    let app = capped_app().await;
    // The viewer first: a controller is not told of joins from before its own.
    let mut viewer = app.connect("pv1", "v1").await;
    let mut owner = app.connect("pv1", "owner").await;
    let mut state = json!({});
    let mut version = 0;
    while len(&state) + 400 < CAP {
        let id = format!("i{version}");
        let title = "x".repeat(300);
        owner
            .send(json!({"type": "item-update", "payload": {"itemId": id, "t": title}, "id": version}))
            .await;
        version += 1;
        assert_eq!(
            owner.recv().await,
            json!({"type": "ack", "id": version - 1, "version": version})
        );
        state
            .as_object_mut()
            .expect("object")
            .entry("items")
            .or_insert_with(|| json!({}))[&id] = json!({"t": title});
    }
    // `,"pad":"…"`: 9 bytes plus the padding.
    let pad = "y".repeat(CAP - len(&state) - 9);
    owner
        .send(json!({"type": "portal-view-update", "payload": {"pad": pad}, "id": "fill"}))
        .await;
    version += 1;
    assert_eq!(
        owner.recv().await,
        json!({"type": "ack", "id": "fill", "version": version})
    );
    state["pad"] = json!(pad);
    assert_eq!(len(&state), CAP);
    assert_eq!(app.stored_state("pv1"), state);
    assert_eq!(
        app.stored("pv1").state.get().len(),
        CAP,
        "exactly at the cap is allowed"
    );

    // One byte more: refused, the id echoed, nothing changed.
    let longer = format!("{}x", "x".repeat(300));
    owner
        .send(
            json!({"type": "item-update", "payload": {"itemId": "i0", "t": longer}, "id": "over"}),
        )
        .await;
    assert_state_too_large(&owner.recv().await, "over");
    assert_eq!(app.stored("pv1").version, version);
    assert_eq!(app.stored_state("pv1"), state);

    // The socket is still served, and a change that does not grow the state is.
    owner.assert_alive().await;
    owner
        .send(json!({"type": "item-update", "payload": {"itemId": "i0", "t": "short"}, "id": "ok"}))
        .await;
    assert_eq!(
        owner.recv().await,
        json!({"type": "ack", "id": "ok", "version": version + 1})
    );
    state["items"]["i0"] = json!({"t": "short"});
    assert_eq!(app.stored_state("pv1"), state);

    // The viewer saw every accepted change in order and nothing between them:
    // the refused one reached no one.
    for v in 1..=version + 1 {
        let message = viewer.recv().await;
        assert_eq!(message["version"], v, "{message}");
    }

    // An unrelated view is unaffected.
    let mut other = app.connect("pv2", "owner").await;
    other
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": "pv2"}))
        .await;
    assert_eq!(
        other.recv().await,
        json!({"type": "ack", "id": "pv2", "version": 1})
    );
}

/// REST PATCH past the cap: 413 `STATE_TOO_LARGE`, the row unchanged; under
/// it: 200.
#[tokio::test]
async fn patch_past_the_cap_is_413_and_changes_nothing() {
    let app = capped_app().await;
    let patch = |body: Value| {
        app.http()
            .patch(app.http_url("/api/portal-views/pv1"))
            .bearer_auth(app.token("ed"))
            .json(&body)
            .send()
    };
    let response = patch(json!({"big": "x".repeat(CAP)})).await.expect("PATCH");
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "STATE_TOO_LARGE", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("state too large"), "{body}");
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(app.stored_state("pv1"), json!({}));

    // `{"big":"…"}` is 10 bytes plus the string.
    let fits = "x".repeat(CAP - 10);
    let response = patch(json!({"big": fits})).await.expect("PATCH");
    assert_eq!(response.status(), 200);
    let response = patch(json!({"more": 1})).await.expect("PATCH");
    assert_eq!(response.status(), 413);
    assert_eq!(app.stored("pv1").version, 1);
    assert_eq!(app.stored_state("pv1"), json!({"big": fits}));
}

/// `POST …/messages` past the cap: 400 with the `error` message a WebSocket
/// would get; a sending stream stays open and goes on working.
#[tokio::test]
async fn post_past_the_cap_is_400_and_keeps_the_stream() {
    let app = capped_app().await;
    let big =
        json!({"type": "item-update", "payload": {"itemId": 1, "t": "x".repeat(CAP)}, "id": "big"});
    let (status, reply) = app.post_message("pv1", "owner", None, &big).await;
    assert_eq!(status, 400, "{reply}");
    assert_state_too_large(&reply, "big");

    let mut stream = app.sse("pv1", "owner").await;
    let id = stream.connection_id();
    let (status, reply) = app.post_message("pv1", "owner", Some(&id), &big).await;
    assert_eq!(status, 400, "{reply}");
    assert_state_too_large(&reply, "big");
    assert_eq!(app.stored("pv1").version, 0);

    let small = json!({"type": "item-update", "payload": {"itemId": 1, "t": "x"}, "id": "small"});
    let (status, reply) = app.post_message("pv1", "owner", Some(&id), &small).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"type": "ack", "id": "small", "version": 1}));
    // The stream is still open: a REST change reaches it.
    let response = app
        .http()
        .patch(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(app.token("ed"))
        .json(&json!({"after": true}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 200);
    let update = stream.recv_type("portal-view-update").await;
    assert_eq!(update["version"], 2, "{update}");
    assert_eq!(
        app.stored_state("pv1"),
        json!({"items": {"1": {"t": "x"}}, "after": true})
    );
}

/// A `sync-response` whose payload would replace the state with one past the
/// cap is refused like any other change.
#[tokio::test]
async fn sync_response_past_the_cap_is_refused() {
    let app = capped_app().await;
    let mut owner = app.connect("pv1", "owner").await;
    owner
        .send(json!({"type": "sync-response", "payload": {"s": "x".repeat(CAP)}, "id": "sr"}))
        .await;
    assert_state_too_large(&owner.recv().await, "sr");
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(app.stored_state("pv1"), json!({}));
    owner
        .send(json!({"type": "sync-response", "payload": {"s": "small"}, "id": "ok"}))
        .await;
    assert_eq!(
        owner.recv().await,
        json!({"type": "ack", "id": "ok", "version": 1})
    );
    assert_eq!(app.stored_state("pv1"), json!({"s": "small"}));
}

// ---------------------------------------------------------------------------
// SPEC §4: PATCH counts against a per-user rate

/// With a burst of 5 and (practically) no refill: five PATCHes pass, the rest
/// are 429 `RATE_LIMITED` before their body is even read, the stored version
/// counts exactly the 200s; the same user's stream-less POSTs share the
/// bucket; another user is unaffected.
#[tokio::test]
async fn patch_flood_gets_429_after_the_burst() {
    let app = spawn_app_with(|c| {
        c.rate_burst = 5;
        c.rate_per_sec = 0.001;
    })
    .await;
    let token = app.token("ed");
    let mut statuses = Vec::new();
    for i in 0..12 {
        let response = app
            .http()
            .patch(app.http_url("/api/portal-views/pv1"))
            .bearer_auth(&token)
            .json(&json!({"n": i}))
            .send()
            .await
            .expect("PATCH");
        let status = response.status().as_u16();
        if status == 429 {
            let body: Value = response.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [[200; 5].as_slice(), &[429; 7]].concat());
    assert_eq!(app.stored("pv1").version, 5);
    assert_eq!(app.stored_state("pv1"), json!({"n": 4}));

    // Refused before the body is read: a body that is not even JSON, with the
    // wrong Content-Type, still gets the 429.
    let response = app
        .http()
        .patch(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("not json")
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 429);

    // The same user's stream-less POSTs take from the same bucket.
    let message = json!({"type": "portal-view-update", "payload": {"p": 1}, "id": "p"});
    let (status, reply) = app.post_message("pv1", "ed", None, &message).await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(reply["code"], "RATE_LIMITED", "{reply}");
    assert_eq!(app.stored("pv1").version, 5);

    // Another user has a bucket of their own.
    let response = app
        .http()
        .patch(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(app.token("owner"))
        .json(&json!({"owner": true}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 200);
    assert_eq!(app.stored("pv1").version, 6);
}

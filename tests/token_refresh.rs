//! SPEC §9 against a real server: `refresh-token` moves a live session's
//! expiry (WebSocket, and SSE + POST), refusals keep the old one, and
//! `token-expiring` comes once per expiry, `--token-warning` before it.

mod common;
use common::*;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portal_sync::protocol::auth::now_secs;
use serde_json::{json, Value};

/// How far off an expiry's close or warning may arrive.
const TOLERANCE: f64 = 0.5;

/// Now, with its fraction, on the clock tokens are read against.
fn now_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

async fn sleep_until_wall(at: f64) {
    let left = at - now_f();
    if left > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(left)).await;
    }
}

/// That something seen now happened at `expected` (seconds since the epoch).
fn assert_now_near(expected: u64, what: &str) {
    let now = now_f();
    assert!(
        (now - expected as f64).abs() <= TOLERANCE,
        "{what} at {now:.3}, expected {expected} ± {TOLERANCE}"
    );
}

fn token(app: &TestApp, sub: &str, exp: u64) -> String {
    app.token_with(SECRET, json!({"sub": sub, "exp": exp}))
}

/// A WebSocket for `user` on pv1 with a token expiring at `exp`, its
/// `connected` read.
async fn connect_until(app: &TestApp, user: &str, exp: u64) -> Client {
    let mut client = app
        .open(&app.ws_url("pv1", Some(&token(app, user, exp))))
        .await;
    let connected = client.recv().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    client
}

/// An SSE stream for `user` on pv1 with a token expiring at `exp`, its
/// `connected` read.
async fn sse_until(app: &TestApp, user: &str, exp: u64) -> SseClient {
    let response = app
        .http()
        .get(app.sse_url("pv1", Some(&token(app, user, exp))))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 200);
    let mut client = SseClient::new(response);
    client.connected = client.recv().await;
    assert_eq!(client.connected["type"], "connected");
    client
}

fn bad_request(message: &str, id: impl Into<Value>) -> Value {
    let id = id.into();
    json!({"type": "error", "code": "BAD_REQUEST", "message": message, "id": id})
}

/// The refusals of SPEC §9, each with the exact answer: (message, answer).
fn refusals(app: &TestApp, user: &str) -> Vec<(Value, Value)> {
    let later = now_secs() + 3600;
    let cases = [
        (
            json!({"token": app.token_with("another-secret", json!({"sub": user, "exp": later}))}),
            "invalid token",
        ),
        (json!({"token": "not.a.jwt"}), "invalid token"),
        (
            json!({"token": app.token_with(SECRET, json!({"sub": user, "exp": later, "nbf": later - 60}))}),
            "invalid token",
        ),
        (
            json!({"token": token(app, "ed", later)}),
            "token is for another user",
        ),
        (
            json!({"token": token(app, user, now_secs() - 1)}),
            "token expired",
        ),
        (
            json!({}),
            "refresh-token needs a string token at the top level of the message",
        ),
        (json!({"token": 12}), "token must be a string"),
        (json!({"token": null}), "token must be a string"),
        (
            json!({"payload": {"token": token(app, user, later)}}),
            "token goes at the top level of the message, not in payload",
        ),
    ];
    cases
        .into_iter()
        .enumerate()
        .map(|(n, (mut message, answer))| {
            let id = format!("r{n}");
            message["type"] = json!("refresh-token");
            message["id"] = json!(id);
            (message, bad_request(answer, id))
        })
        .collect()
}

/// A 4-second token refreshed at second 2: the session outlives it, a change
/// sent after it is still applied (its check uses the new token), and the
/// session closes 1008 `token expired` at the new expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_session_outlives_its_first_token_and_closes_at_the_new_one() {
    let app = spawn_app_with(|c| c.token_warning = Duration::ZERO).await;
    let first = now_secs() + 4;
    let mut owner = connect_until(&app, "owner", first).await;
    sleep_until_wall(first as f64 - 2.0).await;
    let second = first + 2;
    owner
        .send(json!({"type": "refresh-token", "token": token(&app, "owner", second), "id": 1}))
        .await;
    assert_eq!(
        owner.recv().await,
        json!({"type": "token-refreshed", "exp": second, "id": 1})
    );
    sleep_until_wall(first as f64 + 0.5).await;
    owner
        .send(json!({"type": "portal-view-update", "payload": {"after": true}, "id": "u"}))
        .await;
    assert_eq!(
        owner.recv().await,
        json!({"type": "ack", "id": "u", "version": 1})
    );
    assert_eq!(app.stored_state("pv1"), json!({"after": true}));
    owner.assert_closed(1008, "token expired").await;
    assert_now_near(second, "closed");
}

/// Every refusal answers `BAD_REQUEST` with the id, and the session still
/// closes at its first token's expiry. A viewer may refresh as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_answer_bad_request_and_keep_the_old_expiry() {
    let app = spawn_app_with(|c| c.token_warning = Duration::ZERO).await;
    let first = now_secs() + 3;
    let mut viewer = connect_until(&app, "v1", first).await;
    for (message, answer) in refusals(&app, "v1") {
        viewer.send(message.clone()).await;
        assert_eq!(viewer.recv().await, answer, "for {message}");
    }
    viewer.assert_closed(1008, "token expired").await;
    assert_now_near(first, "closed");
}

/// `--token-warning 2` with a 4-second token: `token-expiring` once, 2 s
/// before; after a refresh, once more for the new expiry, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiring_comes_once_per_expiry() {
    let app = spawn_app_with(|c| c.token_warning = Duration::from_secs(2)).await;
    let first = now_secs() + 4;
    let mut client = connect_until(&app, "ed", first).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "token-expiring", "exp": first})
    );
    assert_now_near(first - 2, "first warning");
    let second = first + 2;
    client
        .send(json!({"type": "refresh-token", "token": token(&app, "ed", second), "id": "r"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "token-refreshed", "exp": second, "id": "r"})
    );
    // No second warning for the first expiry: the next message is the new one's.
    assert_eq!(
        client.recv().await,
        json!({"type": "token-expiring", "exp": second})
    );
    assert_now_near(second - 2, "second warning");
    client.assert_closed(1008, "token expired").await;
    assert_now_near(second, "closed");
}

/// A session that starts with less than `--token-warning` left is warned
/// right after `connected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_starting_inside_the_warning_is_warned_at_once() {
    let app = spawn_app().await;
    let exp = now_secs() + 30;
    let mut client = connect_until(&app, "v2", exp).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "token-expiring", "exp": exp})
    );
    client.assert_alive().await;
}

/// `POST …/messages` with the stream's `X-Connection-Id` and a body of
/// `refresh-token`.
async fn post_refresh(app: &TestApp, stream: Option<&str>, message: &Value) -> (u16, Value) {
    app.post_message("pv1", "v1", stream, message).await
}

/// Over SSE + POST: the stream is warned, refreshed through a POST naming it,
/// warned again, and ends with `closed` 1008 at the new expiry; refusals are
/// 400 and keep its expiry; a POST naming no stream has nothing to refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_is_refreshed_through_post() {
    let app = spawn_app_with(|c| c.token_warning = Duration::from_secs(2)).await;
    let first = now_secs() + 4;
    let mut stream = sse_until(&app, "v1", first).await;
    let id = stream.connection_id();
    for (message, answer) in refusals(&app, "v1") {
        assert_eq!(
            post_refresh(&app, Some(&id), &message).await,
            (400, answer),
            "for {message}"
        );
    }
    let refresh = |exp| json!({"type": "refresh-token", "token": token(&app, "v1", exp), "id": 7});
    assert_eq!(
        post_refresh(&app, None, &refresh(first + 60)).await,
        (
            400,
            bad_request(
                "refresh-token needs X-Connection-Id naming your SSE stream: \
                 a POST of its own has no session to refresh",
                7
            )
        )
    );
    assert_eq!(
        stream.recv().await,
        json!({"type": "token-expiring", "exp": first})
    );
    assert_now_near(first - 2, "first warning");
    let second = first + 2;
    assert_eq!(
        post_refresh(&app, Some(&id), &refresh(second)).await,
        (
            200,
            json!({"type": "token-refreshed", "exp": second, "id": 7})
        )
    );
    // The reply went to the POST; the stream's next event is the new warning.
    assert_eq!(
        stream.recv().await,
        json!({"type": "token-expiring", "exp": second})
    );
    assert_now_near(second - 2, "second warning");
    stream.assert_closed(1008, "token expired").await;
    assert_now_near(second, "closed");
}

/// A refresh counts against the rate like any message, refused ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_count_against_the_rate() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 0.0;
        c.rate_burst = 2;
    })
    .await;
    let mut client = app.connect("pv1", "v1").await;
    let later = now_secs() + 3600;
    client
        .send(json!({"type": "refresh-token", "token": 1, "id": "a"}))
        .await;
    assert_eq!(
        client.recv().await,
        bad_request("token must be a string", "a")
    );
    client
        .send(json!({"type": "refresh-token", "token": token(&app, "v1", later), "id": "b"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "token-refreshed", "exp": later, "id": "b"})
    );
    client
        .send(json!({"type": "refresh-token", "token": token(&app, "v1", later), "id": "c"}))
        .await;
    let refused = client.recv().await;
    assert_eq!(refused["code"], "RATE_LIMITED", "{refused}");
    assert_eq!(refused["id"], "c");
}

/// A token that expires sooner than the session's is accepted too (the
/// client asked for it): the session then closes at the earlier expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_to_an_earlier_expiry_closes_the_session_sooner() {
    let app = spawn_app_with(|c| c.token_warning = Duration::ZERO).await;
    let mut client = connect_until(&app, "v1", now_secs() + 600).await;
    let sooner = now_secs() + 2;
    client
        .send(json!({"type": "refresh-token", "token": token(&app, "v1", sooner), "id": "s"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "token-refreshed", "exp": sooner, "id": "s"})
    );
    client.assert_closed(1008, "token expired").await;
    assert_now_near(sooner, "closed");
}

/// The binary's `--token-warning` and `PORTAL_TOKEN_WARNING` (default 60, 0
/// off): a 30-second token is warned at once by default, never with 0, and a
/// 10-minute one at once with `--token-warning 3600`. The token is never
/// logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_token_warning_from_its_flag_and_environment() {
    use common::binary::start_serve;
    use portal_sync::protocol::auth::Tokens;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("warning.db");
    seed(&*open_store(&db));
    let db = db.to_str().expect("utf-8");
    let secret = "0123456789abcdef0123456789abcdef";
    let tokens = Tokens::new(secret.as_bytes(), 0);
    /// (flags, environment, the token's lifetime, warned at once).
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], u64, bool);
    let cases: [Case; 3] = [
        (&[], &[], 30, true),
        (&[], &[("PORTAL_TOKEN_WARNING", "0")], 30, false),
        (&["--token-warning", "3600"], &[], 600, true),
    ];
    for (flags, envs, ttl, warned) in cases {
        let mut args = vec!["serve", "--addr", "127.0.0.1:0", "--db", db];
        args.extend(["--jwt-secret", secret]);
        args.extend(flags);
        let served = start_serve(dir.path(), &args, envs).await;
        let token = tokens.issue("v1", ttl).expect("token");
        let url = format!(
            "{}/ws/portal-view/pv1?token={token}",
            served.base.replacen("http", "ws", 1)
        );
        let mut client = open_ws(
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .expect("request"),
        )
        .await;
        assert_eq!(client.recv().await["type"], "connected");
        let exp = tokens.verify(&token).expect("valid").exp;
        if warned {
            assert_eq!(
                client.recv().await,
                json!({"type": "token-expiring", "exp": exp}),
                "{flags:?} {envs:?}"
            );
        }
        // Not warned: the answer to this is the next message.
        let refresh = tokens.issue("v1", ttl + 60).expect("token");
        client
            .send(json!({"type": "refresh-token", "token": refresh, "id": 1}))
            .await;
        assert_eq!(
            client.recv().await["type"],
            "token-refreshed",
            "{flags:?} {envs:?}"
        );
        drop(client);
        let (code, logs) = served.stop().await;
        assert_eq!(code, Some(0));
        assert!(!logs.contains(&token) && !logs.contains(&refresh), "{logs}");
    }
}

//! REST routes of SPEC §4 (and the token rules of §2 as REST applies them),
//! against a real server from the harness.

mod common;
use common::*;

use std::time::Duration;

use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::now_secs;
use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a request answered: status, headers and the body as JSON (`Null` when
/// the body is empty).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body is exactly `{"error":{"code":code,"message":<string>}}`, with
    /// `message` equal to `message` when given, and the status is `status`.
    fn assert_error(&self, status: u16, code: &str, message: Option<&str>) {
        assert_eq!(self.status.as_u16(), status, "status (body {})", self.body);
        let error = &self.body["error"];
        assert_eq!(error["code"], code, "error code in {}", self.body);
        let text = error["message"]
            .as_str()
            .unwrap_or_else(|| panic!("error.message is a string in {}", self.body));
        assert!(!text.is_empty(), "error.message is not empty");
        if let Some(message) = message {
            assert_eq!(text, message, "error message in {}", self.body);
        }
        let keys: Vec<&String> = self.body.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            ["error"],
            "the error body has only `error`: {}",
            self.body
        );
        assert_eq!(
            error.as_object().expect("error object").len(),
            2,
            "error has exactly code and message: {}",
            self.body
        );
        assert!(
            self.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "errors are JSON: {:?}",
            self.header("content-type")
        );
        if status == 401 {
            assert_eq!(
                self.header("www-authenticate"),
                Some("Bearer"),
                "401 carries WWW-Authenticate"
            );
        }
    }
}

/// Sends `request` and reads its whole answer, all within the harness's WAIT.
async fn call(request: RequestBuilder) -> Answer {
    tokio::time::timeout(WAIT, async move {
        // Every answer is checked against docs/openapi.json on the way.
        let contract::Answered {
            status,
            headers,
            body: bytes,
        } = contract::send_checked(request).await;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("body is JSON ({e}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        Answer {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("answer in time")
}

fn view_url(app: &TestApp, view: &str) -> String {
    app.http_url(&format!("/api/portal-views/{view}"))
}

/// GET a view as `user` (a fresh token).
async fn get_view(app: &TestApp, view: &str, user: &str) -> Answer {
    call(
        app.http()
            .get(view_url(app, view))
            .bearer_auth(app.token(user)),
    )
    .await
}

/// A PATCH of `view` as `user` with `Content-Type: application/json` and `body`.
fn patch(app: &TestApp, view: &str, user: &str, body: impl Into<String>) -> RequestBuilder {
    app.http()
        .patch(view_url(app, view))
        .bearer_auth(app.token(user))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
}

/// Checks a view body has exactly the fields of SPEC §4 with these values.
fn assert_view(answer: &Answer, id: &str, library: &str, state: &Value, version: i64) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let body = answer.body.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "id",
            "libraryId",
            "name",
            "presence",
            "state",
            "updatedAt",
            "version"
        ],
        "view fields"
    );
    assert_eq!(body["id"], id);
    assert_eq!(body["libraryId"], library);
    assert!(body["name"].is_string());
    assert_eq!(&body["state"], state);
    assert_eq!(body["version"], version);
    let presence = body["presence"].as_object().expect("presence object");
    for k in ["controllers", "viewers", "connections"] {
        assert!(
            presence[k].is_u64(),
            "presence.{k} is a count: {}",
            answer.body
        );
    }
    assert_eq!(
        answer.header("etag"),
        Some(format!("\"{version}\"").as_str()),
        "ETag is the quoted version"
    );
}

/// Polls GET until `presence` equals `expected` (presence may lag a close).
async fn wait_presence(app: &TestApp, view: &str, expected: Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = get_view(app, view, "owner").await;
        if answer.body["presence"] == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence stayed {} instead of {expected}",
            answer.body["presence"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw HTTP/1.1 request over TCP: writes `head` then every part of `body` as
/// its own write, tolerating the server closing early, and returns the status
/// code and body of the answer.
async fn raw_request(app: &TestApp, head: &str, body: &[Vec<u8>]) -> (u16, Value) {
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write head");
        for part in body {
            // The server may answer 413 and stop reading before we are done.
            if stream.write_all(part).await.is_err() {
                break;
            }
        }
        let _ = stream.flush().await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_end, content_length) = loop {
            let n = stream.read(&mut chunk).await.expect("read answer");
            assert!(
                n > 0,
                "connection closed before a full answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>().expect("content-length"))
                    .expect("the answer has a Content-Length");
                break (i + 4, length);
            }
        };
        while buf.len() < head_end + content_length {
            let n = stream.read(&mut chunk).await.expect("read answer body");
            assert!(n > 0, "connection closed inside the answer body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let status_line = String::from_utf8_lossy(&buf[..head_end])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let body =
            serde_json::from_slice(&buf[head_end..head_end + content_length]).expect("JSON body");
        (status, body)
    })
    .await
    .expect("raw answer in time")
}

/// One chunk of a chunked request body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------
// GET

/// A viewer may read a view: 200 with exactly the §4 fields, the stored state and
/// version, zero presence, and `ETag: "0"`.
#[tokio::test]
async fn get_as_viewer_returns_the_view_with_etag() {
    let app = spawn_app().await;
    let answer = get_view(&app, "pv1", "v1").await;
    assert_view(&answer, "pv1", "lib1", &json!({}), 0);
    assert_eq!(answer.body["name"], "View 1");
    assert_eq!(
        answer.body["presence"],
        json!({"controllers": 0, "viewers": 0, "connections": 0})
    );
    assert!(answer.body["updatedAt"].is_string() || answer.body["updatedAt"].is_null());
    assert!(answer
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
}

/// Every kind of controller (library owner, OWNER member, EDITOR member) reads a
/// view the same way, with its ETag.
#[tokio::test]
async fn get_as_controllers_returns_the_view_with_etag() {
    let app = spawn_app().await;
    for user in ["owner", "om", "ed"] {
        let answer = get_view(&app, "pv2", user).await;
        assert_view(&answer, "pv2", "lib1", &json!({}), 0);
        assert_eq!(answer.body["name"], "View 2", "as {user}");
    }
    // `outsider` owns lib2: controller of pv3.
    let answer = get_view(&app, "pv3", "outsider").await;
    assert_view(&answer, "pv3", "lib2", &json!({}), 0);
}

/// SPEC §2: a numeric `sub` is read as its decimal string, so a token with
/// `"sub": 42` is the user `42` (a VIEWER of lib1) and may GET.
#[tokio::test]
async fn numeric_sub_user_can_get() {
    let app = spawn_app().await;
    let token = app.token_with(SECRET, json!({"sub": 42, "exp": now_secs() + 600}));
    let answer = call(app.http().get(view_url(&app, "pv1")).bearer_auth(token)).await;
    assert_view(&answer, "pv1", "lib1", &json!({}), 0);
    // The same user as a string `sub`.
    let answer = get_view(&app, "pv1", "42").await;
    assert_view(&answer, "pv1", "lib1", &json!({}), 0);
}

/// The GET body reflects the view's open WebSockets: distinct controllers and
/// viewers, all connections, and the counts fall again when sockets close.
#[tokio::test]
async fn get_presence_reflects_open_websockets() {
    let app = spawn_app().await;
    let owner_a = app.connect("pv1", "owner").await;
    let owner_b = app.connect("pv1", "owner").await;
    let ed = app.connect("pv1", "ed").await;
    let v1 = app.connect("pv1", "v1").await;
    let _other_view = app.connect("pv2", "v2").await;
    let answer = get_view(&app, "pv1", "v2").await;
    assert_view(&answer, "pv1", "lib1", &json!({}), 0);
    assert_eq!(
        answer.body["presence"],
        json!({"controllers": 2, "viewers": 1, "connections": 4})
    );
    assert_eq!(
        get_view(&app, "pv2", "v2").await.body["presence"],
        json!({"controllers": 0, "viewers": 1, "connections": 1})
    );
    drop(owner_b);
    wait_presence(
        &app,
        "pv1",
        json!({"controllers": 2, "viewers": 1, "connections": 3}),
    )
    .await;
    drop(owner_a);
    drop(v1);
    wait_presence(
        &app,
        "pv1",
        json!({"controllers": 1, "viewers": 0, "connections": 1}),
    )
    .await;
    drop(ed);
    wait_presence(
        &app,
        "pv1",
        json!({"controllers": 0, "viewers": 0, "connections": 0}),
    )
    .await;
}

// ---------------------------------------------------------------------------
// 401

/// No Authorization header: 401 INVALID_TOKEN "invalid token" with
/// `WWW-Authenticate: Bearer`, on GET and PATCH.
#[tokio::test]
async fn missing_authorization_is_401_invalid_token() {
    let app = spawn_app().await;
    call(app.http().get(view_url(&app, "pv1")))
        .await
        .assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    call(
        app.http()
            .patch(view_url(&app, "pv1"))
            .header(header::CONTENT_TYPE, "application/json")
            .body("{}"),
    )
    .await
    .assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    assert_eq!(app.stored("pv1").version, 0);
}

/// An Authorization header with another scheme, no scheme, or an empty bearer
/// is no token: 401 INVALID_TOKEN.
#[tokio::test]
async fn wrong_auth_scheme_is_401_invalid_token() {
    let app = spawn_app().await;
    let token = app.token("owner");
    for value in [
        format!("Basic {token}"),
        format!("Token {token}"),
        token.clone(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
    ] {
        let answer = call(
            app.http()
                .get(view_url(&app, "pv1"))
                .header(header::AUTHORIZATION, value.as_str()),
        )
        .await;
        answer.assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    }
}

/// Malformed tokens, a token signed with another secret or another algorithm
/// than HS256, and tokens missing `sub` or `exp` (or with a non-numeric `exp`)
/// are invalid (SPEC §2): 401 INVALID_TOKEN.
#[tokio::test]
async fn malformed_or_wrongly_signed_token_is_401_invalid_token() {
    let app = spawn_app().await;
    let exp = now_secs() + 600;
    let tokens = [
        "not-a-jwt".to_string(),
        "a.b.c".to_string(),
        app.token_with("another-secret", json!({"sub": "owner", "exp": exp})),
        app.token_with(SECRET, json!({"sub": "owner"})),
        app.token_with(SECRET, json!({"exp": exp})),
        app.token_with(SECRET, json!({"sub": "owner", "exp": "soon"})),
        // Right secret, wrong algorithm: SPEC §2 says HS256.
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &json!({"sub": "owner", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign"),
    ];
    for token in tokens {
        for request in [
            app.http().get(view_url(&app, "pv1")),
            app.http()
                .patch(view_url(&app, "pv1"))
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}"),
        ] {
            call(request.bearer_auth(&token)).await.assert_error(
                401,
                "INVALID_TOKEN",
                Some("invalid token"),
            );
        }
    }
    assert_eq!(app.stored("pv1").version, 0);
}

/// A token whose `exp` is past, or exactly now (leeway 0), is 401 TOKEN_EXPIRED.
#[tokio::test]
async fn expired_token_is_401_token_expired() {
    let app = spawn_app().await;
    let now = now_secs();
    for exp in [now - 3600, now - 1, now] {
        let token = app.token_with(SECRET, json!({"sub": "owner", "exp": exp}));
        call(app.http().get(view_url(&app, "pv1")).bearer_auth(&token))
            .await
            .assert_error(401, "TOKEN_EXPIRED", Some("token expired"));
        call(
            app.http()
                .patch(view_url(&app, "pv1"))
                .bearer_auth(&token)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}"),
        )
        .await
        .assert_error(401, "TOKEN_EXPIRED", Some("token expired"));
    }
    assert_eq!(app.stored("pv1").version, 0);
}

/// A valid token for a user that does not exist is 401 UNKNOWN_USER, even for
/// a view that does not exist (401 comes before 404).
#[tokio::test]
async fn unknown_user_is_401_unknown_user() {
    let app = spawn_app().await;
    for view in ["pv1", "nope"] {
        get_view(&app, view, "ghost")
            .await
            .assert_error(401, "UNKNOWN_USER", Some("unknown user"));
        call(patch(&app, view, "ghost", "{}")).await.assert_error(
            401,
            "UNKNOWN_USER",
            Some("unknown user"),
        );
    }
    let numeric = app.token_with(SECRET, json!({"sub": 43, "exp": now_secs() + 600}));
    call(app.http().get(view_url(&app, "pv1")).bearer_auth(numeric))
        .await
        .assert_error(401, "UNKNOWN_USER", Some("unknown user"));
}

/// REST takes the token only from `Authorization: Bearer`; `?token=` (the
/// WebSocket's browser fallback) is not accepted: 401 INVALID_TOKEN.
#[tokio::test]
async fn token_in_query_is_not_accepted_for_rest() {
    let app = spawn_app().await;
    let token = app.token("owner");
    let url = format!("{}?token={token}", view_url(&app, "pv1"));
    call(app.http().get(&url))
        .await
        .assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    call(
        app.http()
            .patch(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(r#"{"a":1}"#),
    )
    .await
    .assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    assert_eq!(app.stored("pv1").version, 0);
}

// ---------------------------------------------------------------------------
// 403 / 404 / 405

/// A user with no role in the view's library gets 403 ACCESS_DENIED "access
/// denied" on GET and PATCH, and nothing is written.
#[tokio::test]
async fn non_member_is_403_access_denied() {
    let app = spawn_app().await;
    get_view(&app, "pv1", "outsider").await.assert_error(
        403,
        "ACCESS_DENIED",
        Some("access denied"),
    );
    call(patch(&app, "pv1", "outsider", r#"{"a":1}"#))
        .await
        .assert_error(403, "ACCESS_DENIED", Some("access denied"));
    // lib1's people have no role in lib2.
    for user in ["owner", "v1"] {
        get_view(&app, "pv3", user)
            .await
            .assert_error(403, "ACCESS_DENIED", Some("access denied"));
    }
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(app.stored_state("pv1"), json!({}));
}

/// A viewer may read but not PATCH: 403 FORBIDDEN, nothing written or broadcast.
#[tokio::test]
async fn viewer_patch_is_403_forbidden() {
    let app = spawn_app().await;
    let mut watcher = app.connect("pv1", "v2").await;
    for user in ["v1", "42"] {
        call(patch(&app, "pv1", user, r#"{"a":1}"#))
            .await
            .assert_error(403, "FORBIDDEN", None);
    }
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(app.stored_state("pv1"), json!({}));
    watcher.assert_silent(Duration::from_millis(300)).await;
}

/// A view that does not exist (or whose id is not a valid id) is 404 NOT_FOUND
/// "portal view not found" on GET and PATCH.
#[tokio::test]
async fn unknown_view_is_404_not_found() {
    let app = spawn_app().await;
    for view in ["nope", "a%20b", "x.y"] {
        get_view(&app, view, "owner").await.assert_error(
            404,
            "NOT_FOUND",
            Some("portal view not found"),
        );
        call(patch(&app, view, "owner", "{}")).await.assert_error(
            404,
            "NOT_FOUND",
            Some("portal view not found"),
        );
    }
}

/// Unknown routes answer 404 NOT_FOUND "no such route" as JSON.
#[tokio::test]
async fn unknown_route_is_404_json() {
    let app = spawn_app().await;
    for path in [
        "/nope",
        "/api/portal-views",
        "/api/portal-views/pv1/extra",
        // `/` is the sign-in page now (web.rs); its file name is not a route.
        "/index.html",
    ] {
        call(
            app.http()
                .get(app.http_url(path))
                .bearer_auth(app.token("owner")),
        )
        .await
        .assert_error(404, "NOT_FOUND", Some("no such route"));
    }
}

/// A known route with the wrong method answers 405 with a JSON error body.
#[tokio::test]
async fn wrong_method_is_405_json() {
    let app = spawn_app().await;
    let token = app.token("owner");
    for request in [
        app.http().post(view_url(&app, "pv1")),
        app.http().delete(view_url(&app, "pv1")),
        app.http().put(view_url(&app, "pv1")),
        app.http().post(app.http_url("/health")),
    ] {
        let answer = call(
            request
                .bearer_auth(&token)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}"),
        )
        .await;
        answer.assert_error(405, "METHOD_NOT_ALLOWED", None);
    }
    assert_eq!(app.stored("pv1").version, 0);
}

// ---------------------------------------------------------------------------
// /health

/// `GET /health` needs no token and answers 200 `{"status":"ok","connections":n}`
/// with n the open WebSockets.
#[tokio::test]
async fn health_reports_ok_and_connections() {
    let app = spawn_app().await;
    let answer = call(app.http().get(app.http_url("/health"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, json!({"status": "ok", "connections": 0}));
    let a = app.connect("pv1", "owner").await;
    let _b = app.connect("pv2", "v1").await;
    let answer = call(app.http().get(app.http_url("/health"))).await;
    assert_eq!(answer.body, json!({"status": "ok", "connections": 2}));
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = call(app.http().get(app.http_url("/health"))).await;
        if answer.body == json!({"status": "ok", "connections": 1}) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stayed {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// PATCH: success

/// PATCH merge-patches `state` (RFC 7386: nested merge, `null` deletes, arrays
/// replace), bumps the version by one per request, answers the view as GET does
/// with the new ETag, and the SQLite row holds the same state and version.
#[tokio::test]
async fn patch_applies_merge_patch_and_persists() {
    let app = spawn_app().await;
    let before = app.stored("pv1");
    let first = call(patch(
        &app,
        "pv1",
        "owner",
        r#"{"a":1,"b":{"c":2,"d":3},"list":[1,2]}"#,
    ))
    .await;
    assert_view(
        &first,
        "pv1",
        "lib1",
        &json!({"a":1,"b":{"c":2,"d":3},"list":[1,2]}),
        1,
    );
    let second = call(patch(
        &app,
        "pv1",
        "ed",
        r#"{"a":null,"b":{"c":null,"e":4},"list":[3]}"#,
    ))
    .await;
    let expected = json!({"b":{"d":3,"e":4},"list":[3]});
    assert_view(&second, "pv1", "lib1", &expected, 2);

    let row = app.stored("pv1");
    assert_eq!(row.version, 2);
    assert_eq!(app.stored_state("pv1"), expected);
    assert_eq!(row.library_id, "lib1");
    assert!(row.updated_at.is_some(), "updated_at is set");
    assert_eq!(second.body["updatedAt"].as_str(), row.updated_at.as_deref());
    assert!(row.updated_at >= before.updated_at);

    // GET agrees with the PATCH answer.
    let get = get_view(&app, "pv1", "v1").await;
    assert_view(&get, "pv1", "lib1", &expected, 2);
    assert_eq!(get.body, second.body);
    // Other views are untouched.
    assert_eq!(app.stored("pv2").version, 0);
}

/// An empty patch `{}` is still an accepted change: version +1, state unchanged.
#[tokio::test]
async fn empty_patch_bumps_the_version() {
    let app = spawn_app().await;
    let answer = call(patch(&app, "pv1", "om", "{}")).await;
    assert_view(&answer, "pv1", "lib1", &json!({}), 1);
    assert_eq!(app.stored("pv1").version, 1);
}

/// `application/merge-patch+json`, a `charset` parameter, and any letter case of
/// the media type are accepted.
#[tokio::test]
async fn merge_patch_json_and_charset_are_accepted() {
    let app = spawn_app().await;
    let types = [
        "application/merge-patch+json",
        "application/json; charset=utf-8",
        "application/merge-patch+json;charset=UTF-8",
        "Application/JSON",
    ];
    for (i, content_type) in types.into_iter().enumerate() {
        let answer = call(
            app.http()
                .patch(view_url(&app, "pv1"))
                .bearer_auth(app.token("owner"))
                .header(header::CONTENT_TYPE, content_type)
                .body(format!(r#"{{"k{i}":{i}}}"#)),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{content_type}: {}",
            answer.body
        );
        assert_eq!(answer.body["version"], i + 1, "{content_type}");
    }
    assert_eq!(
        app.stored_state("pv1"),
        json!({"k0":0,"k1":1,"k2":2,"k3":3})
    );
}

/// A REST PATCH reaches every WebSocket of the view, the PATCHing user's own
/// sockets included, as exactly `{"type":"portal-view-update","payload":<patch>,
/// "version":n,"from":{"userId":…},"source":"rest"}` (no connectionId); sockets
/// of other views hear nothing.
#[tokio::test]
async fn patch_broadcasts_to_every_websocket_of_the_view() {
    let app = spawn_app().await;
    let mut own = app.connect("pv1", "owner").await;
    let mut controller = app.connect("pv1", "ed").await;
    let mut viewer = app.connect("pv1", "v1").await;
    let mut numeric = app.connect("pv1", "42").await;
    let mut elsewhere = app.connect("pv2", "v2").await;

    let patch_body = json!({"currentItem": 2, "nested": {"x": [1, 2]}, "gone": null});
    let answer = call(patch(&app, "pv1", "owner", patch_body.to_string())).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"], 1);

    let expected = json!({
        "type": "portal-view-update",
        "payload": patch_body,
        "version": 1,
        "from": {"userId": "owner"},
        "source": "rest"
    });
    // Viewers get no presence events, so the broadcast is their next message.
    assert_eq!(viewer.recv().await, expected);
    assert_eq!(numeric.recv().await, expected);
    // Controllers may get presence events first.
    assert_eq!(controller.recv_type("portal-view-update").await, expected);
    assert_eq!(own.recv_type("portal-view-update").await, expected);

    // A second PATCH by another controller: version 2, from ed.
    let answer = call(patch(&app, "pv1", "ed", r#"{"currentItem":3}"#)).await;
    assert_eq!(answer.body["version"], 2);
    let expected = json!({
        "type": "portal-view-update",
        "payload": {"currentItem": 3},
        "version": 2,
        "from": {"userId": "ed"},
        "source": "rest"
    });
    assert_eq!(viewer.recv().await, expected);
    assert_eq!(controller.recv_type("portal-view-update").await, expected);
    assert_eq!(own.recv_type("portal-view-update").await, expected);

    elsewhere.assert_silent(Duration::from_millis(300)).await;
    viewer.assert_silent(Duration::from_millis(100)).await;
}

/// `If-Match` takes `"<version>"`, a bare number, `*`, or a list; a matching
/// condition lets the PATCH through.
#[tokio::test]
async fn if_match_forms_are_accepted() {
    let app = spawn_app().await;
    let forms = [
        ("\"0\"", 1),
        ("1", 2),
        ("*", 3),
        ("\"7\", \"3\"", 4),
        ("9, 4", 5),
        ("\"5\",\"6\"", 6),
    ];
    for (if_match, version) in forms {
        let answer = call(
            patch(&app, "pv1", "owner", format!(r#"{{"v":{version}}}"#))
                .header(header::IF_MATCH, if_match),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "If-Match {if_match}: {}",
            answer.body
        );
        assert_eq!(answer.body["version"], version, "If-Match {if_match}");
        assert_eq!(
            answer.header("etag"),
            Some(format!("\"{version}\"").as_str())
        );
    }
    assert_eq!(app.stored("pv1").version, 6);
    assert_eq!(app.stored_state("pv1"), json!({"v": 6}));
}

/// A stale `If-Match` is 412 PRECONDITION_FAILED with the current version as
/// ETag; a weak tag `W/"n"` never matches; nothing is written or broadcast.
#[tokio::test]
async fn stale_or_weak_if_match_is_412_with_current_etag() {
    let app = spawn_app().await;
    for i in 0..3 {
        let answer = call(patch(&app, "pv1", "owner", format!(r#"{{"n":{i}}}"#))).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(app.stored("pv1").version, 3);
    let mut viewer = app.connect("pv1", "v1").await;
    for if_match in ["\"2\"", "2", "\"4\"", "W/\"3\"", "\"1\", \"2\"", "garbage"] {
        let answer =
            call(patch(&app, "pv1", "owner", r#"{"n":99}"#).header(header::IF_MATCH, if_match))
                .await;
        answer.assert_error(412, "PRECONDITION_FAILED", None);
        assert_eq!(answer.header("etag"), Some("\"3\""), "If-Match {if_match}");
    }
    assert_eq!(app.stored("pv1").version, 3);
    assert_eq!(app.stored_state("pv1"), json!({"n": 2}));
    viewer.assert_silent(Duration::from_millis(300)).await;
    // The ETag of a GET is a valid If-Match.
    let etag = get_view(&app, "pv1", "ed")
        .await
        .header("etag")
        .expect("etag")
        .to_string();
    let answer = call(patch(&app, "pv1", "ed", r#"{"n":3}"#).header(header::IF_MATCH, etag)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"], 4);
}

// ---------------------------------------------------------------------------
// PATCH: body errors

/// A body that is not JSON is 400 BAD_REQUEST; nothing is written.
#[tokio::test]
async fn patch_body_not_json_is_400() {
    let app = spawn_app().await;
    for body in ["", "{", "not json", "{\"a\":1}x", "{'a':1}"] {
        call(patch(&app, "pv1", "owner", body))
            .await
            .assert_error(400, "BAD_REQUEST", None);
    }
    assert_eq!(app.stored("pv1").version, 0);
}

/// JSON that is not an object (array, string, number, null, true) is 400
/// BAD_REQUEST; nothing is written.
#[tokio::test]
async fn patch_body_not_an_object_is_400() {
    let app = spawn_app().await;
    for body in ["[1,2]", "[]", "\"text\"", "3", "null", "true"] {
        call(patch(&app, "pv1", "owner", body))
            .await
            .assert_error(400, "BAD_REQUEST", None);
    }
    assert_eq!(app.stored("pv1").version, 0);
    assert_eq!(app.stored_state("pv1"), json!({}));
}

/// No Content-Type on a body is 415 UNSUPPORTED_MEDIA_TYPE.
#[tokio::test]
async fn patch_without_content_type_is_415() {
    let app = spawn_app().await;
    let answer = call(
        app.http()
            .patch(view_url(&app, "pv1"))
            .bearer_auth(app.token("owner"))
            .body(r#"{"a":1}"#),
    )
    .await;
    answer.assert_error(415, "UNSUPPORTED_MEDIA_TYPE", None);
    assert_eq!(app.stored("pv1").version, 0);
}

/// A Content-Type other than application/json or application/merge-patch+json
/// is 415 UNSUPPORTED_MEDIA_TYPE, even when the body is a JSON object.
#[tokio::test]
async fn patch_with_wrong_content_type_is_415() {
    let app = spawn_app().await;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/json",
        "application/jsonp",
        "application/json-patch+json",
        "multipart/form-data; boundary=x",
    ] {
        call(
            app.http()
                .patch(view_url(&app, "pv1"))
                .bearer_auth(app.token("owner"))
                .header(header::CONTENT_TYPE, content_type)
                .body(r#"{"a":1}"#),
        )
        .await
        .assert_error(415, "UNSUPPORTED_MEDIA_TYPE", None);
    }
    assert_eq!(app.stored("pv1").version, 0);
}

/// With `--max-message-bytes 1024`, a body of exactly 1024 bytes passes and one
/// of 1025 bytes is 413 PAYLOAD_TOO_LARGE (Content-Length given).
#[tokio::test]
async fn oversized_body_is_413() {
    let app = spawn_app_with(|c| c.max_message_bytes = 1024).await;
    let body_of = |len: usize| {
        let padding = len - r#"{"pad":""}"#.len();
        let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(padding));
        assert_eq!(body.len(), len);
        body
    };
    call(patch(&app, "pv1", "owner", body_of(1025)))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);
    call(patch(&app, "pv1", "owner", body_of(4096)))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);
    assert_eq!(app.stored("pv1").version, 0);
    let answer = call(patch(&app, "pv1", "owner", body_of(1024))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"], 1);
}

/// The default limit is 65536 bytes: a 70 000-byte body is 413.
#[tokio::test]
async fn oversized_body_over_default_limit_is_413() {
    let app = spawn_app().await;
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000));
    call(patch(&app, "pv1", "owner", body))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(60_000));
    let answer = call(patch(&app, "pv1", "owner", body)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(app.stored("pv1").version, 1);
}

/// A chunked body without Content-Length is refused with 413 as soon as it
/// passes the limit, without waiting for the end of the body; a small chunked
/// body is accepted.
#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let app = spawn_app_with(|c| c.max_message_bytes = 1024).await;
    let head = |token: &str| {
        format!(
            "PATCH /api/portal-views/pv1 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            app.addr
        )
    };
    // Three chunks of 400 bytes (1200 > 1024) and never the final chunk: the
    // server must answer without the rest of the body.
    let mut parts = vec![chunk(format!(r#"{{"pad":"{}"#, "x".repeat(391)).as_bytes())];
    parts.push(chunk("x".repeat(400).as_bytes()));
    parts.push(chunk("x".repeat(400).as_bytes()));
    assert!(parts.iter().all(|p| p.len() > 400));
    let (status, body) = raw_request(&app, &head(&app.token("owner")), &parts).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE");
    assert_eq!(app.stored("pv1").version, 0);

    // A small chunked body goes through.
    let parts = vec![
        chunk(br#"{"chunked":"#),
        chunk(b"true}"),
        b"0\r\n\r\n".to_vec(),
    ];
    let (status, body) = raw_request(&app, &head(&app.token("owner")), &parts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(app.stored_state("pv1"), json!({"chunked": true}));
}

// ---------------------------------------------------------------------------
// Check order

/// PATCH checks run in order: auth (401) → view (404) → access (403) → role
/// (403 FORBIDDEN) → content type (415) → size (413) → JSON object (400) →
/// If-Match (412). Each request below fails two checks and must report the
/// earlier one.
#[tokio::test]
async fn patch_checks_run_in_spec_order() {
    let app = spawn_app_with(|c| c.max_message_bytes = 1024).await;
    let big_garbage = "x".repeat(2000);
    let request = |view: &str,
                   token: &str,
                   content_type: Option<&str>,
                   body: &str,
                   if_match: Option<&str>| {
        let mut r = app
            .http()
            .patch(view_url(&app, view))
            .bearer_auth(token)
            .body(body.to_string());
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        if let Some(m) = if_match {
            r = r.header(header::IF_MATCH, m);
        }
        r
    };
    let bad = app.token_with("wrong", json!({"sub": "owner", "exp": now_secs() + 600}));
    let expired = app.token_with(SECRET, json!({"sub": "owner", "exp": now_secs() - 5}));
    let (owner, outsider, viewer) = (app.token("owner"), app.token("outsider"), app.token("v1"));
    let ghost = app.token("ghost");
    let json_ct = Some("application/json");

    // 401 before 404.
    call(request("nope", &bad, None, &big_garbage, Some("\"9\"")))
        .await
        .assert_error(401, "INVALID_TOKEN", Some("invalid token"));
    call(request("nope", &expired, None, &big_garbage, None))
        .await
        .assert_error(401, "TOKEN_EXPIRED", Some("token expired"));
    call(request("nope", &ghost, None, &big_garbage, None))
        .await
        .assert_error(401, "UNKNOWN_USER", Some("unknown user"));
    // 404 before 403.
    call(request("nope", &outsider, None, &big_garbage, None))
        .await
        .assert_error(404, "NOT_FOUND", Some("portal view not found"));
    // Access before role, role before content type.
    call(request(
        "pv1",
        &outsider,
        Some("text/plain"),
        &big_garbage,
        None,
    ))
    .await
    .assert_error(403, "ACCESS_DENIED", Some("access denied"));
    call(request(
        "pv1",
        &viewer,
        Some("text/plain"),
        &big_garbage,
        None,
    ))
    .await
    .assert_error(403, "FORBIDDEN", None);
    call(request("pv1", &viewer, None, "[]", Some("\"9\"")))
        .await
        .assert_error(403, "FORBIDDEN", None);
    // Content type before size.
    call(request(
        "pv1",
        &owner,
        Some("text/plain"),
        &big_garbage,
        None,
    ))
    .await
    .assert_error(415, "UNSUPPORTED_MEDIA_TYPE", None);
    call(request("pv1", &owner, None, &big_garbage, None))
        .await
        .assert_error(415, "UNSUPPORTED_MEDIA_TYPE", None);
    // Size before JSON.
    call(request("pv1", &owner, json_ct, &big_garbage, Some("\"9\"")))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);
    // JSON object before If-Match.
    call(request("pv1", &owner, json_ct, "[1]", Some("\"9\"")))
        .await
        .assert_error(400, "BAD_REQUEST", None);
    call(request("pv1", &owner, json_ct, "nope", Some("\"9\"")))
        .await
        .assert_error(400, "BAD_REQUEST", None);
    // Finally the precondition.
    call(request("pv1", &owner, json_ct, "{}", Some("\"9\"")))
        .await
        .assert_error(412, "PRECONDITION_FAILED", None);
    assert_eq!(app.stored("pv1").version, 0);
}

// ---------------------------------------------------------------------------
// Concurrency

/// 50 PATCHes in parallel each get a distinct version, together exactly 1..=50
/// (gapless); the stored row holds all 50 changes at version 50, and a socket of
/// the view receives the 50 broadcasts in version order (SPEC §3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_patches_get_gapless_distinct_versions() {
    const N: usize = 50;
    let app = spawn_app().await;
    let mut viewer = app.connect("pv1", "v1").await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let user = ["owner", "ed", "om"][i % 3];
        let request = patch(&app, "pv1", user, format!(r#"{{"k{i}":{i}}}"#));
        tasks.push(tokio::spawn(async move {
            let answer = call(request).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            let version = answer.body["version"].as_i64().expect("version");
            assert_eq!(
                answer.header("etag"),
                Some(format!("\"{version}\"").as_str())
            );
            // The answer's state includes this request's own change.
            assert_eq!(answer.body["state"][format!("k{i}")], i);
            version
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(
            tokio::time::timeout(WAIT, task)
                .await
                .expect("in time")
                .expect("task"),
        );
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=N as i64).collect::<Vec<_>>(),
        "distinct, gapless versions"
    );

    let row = app.stored("pv1");
    assert_eq!(row.version, N as i64);
    let state = app.stored_state("pv1");
    assert_eq!(state.as_object().expect("object").len(), N);
    for i in 0..N {
        assert_eq!(state[format!("k{i}")], i);
    }
    for expected in 1..=N as i64 {
        let message = viewer.recv().await;
        assert_eq!(message["type"], "portal-view-update");
        assert_eq!(message["source"], "rest");
        assert_eq!(message["version"], expected, "broadcasts in version order");
    }
    viewer.assert_silent(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------
// Access read fresh

/// SPEC §1: rows other tools write while the server runs are seen within 1 s;
/// portal-sync keeps no access cache, so they are seen at the very next request.
/// Making `outsider` an EDITOR of lib1 lets them PATCH; demoting `ed` to VIEWER
/// makes their PATCH 403 FORBIDDEN; removing `v2` makes their GET 403.
#[tokio::test]
async fn access_changes_by_other_tools_are_seen_by_rest() {
    let app = spawn_app().await;
    {
        let admin = app.db.admin();
        admin
            .set_member("lib1", "outsider", LibraryRole::Editor)
            .expect("set");
        admin
            .set_member("lib1", "ed", LibraryRole::Viewer)
            .expect("set");
        admin.remove_member("lib1", "v2").expect("remove");
    }
    let answer = call(patch(&app, "pv1", "outsider", r#"{"by":"outsider"}"#)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"], 1);
    call(patch(&app, "pv1", "ed", r#"{"by":"ed"}"#))
        .await
        .assert_error(403, "FORBIDDEN", None);
    assert_view(
        &get_view(&app, "pv1", "ed").await,
        "pv1",
        "lib1",
        &json!({"by":"outsider"}),
        1,
    );
    get_view(&app, "pv1", "v2")
        .await
        .assert_error(403, "ACCESS_DENIED", Some("access denied"));
}

/// The library's `owner_id` is a controller whatever their member row says
/// (SPEC §1): the owner listed as a VIEWER member may still PATCH.
#[tokio::test]
async fn library_owner_is_controller_even_as_viewer_member() {
    let app = spawn_app().await;
    {
        app.db
            .admin()
            .set_member("lib1", "owner", LibraryRole::Viewer)
            .expect("set");
    }
    let answer = call(patch(&app, "pv1", "owner", r#"{"a":1}"#)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["version"], 1);
}

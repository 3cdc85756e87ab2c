//! What the binary logs (issue 16, item 1): one startup line, a line per
//! connection open and close and per refused handshake, under their own
//! targets; `--log-format json` one object per line; never a token or the
//! secret, and no WebSocket or HTTP frame dumps at `RUST_LOG=debug`.

mod common;
use common::binary::*;
use common::*;

use std::path::Path;

use portal_sync::protocol::auth::Tokens;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const LOG_SECRET: &str = "logs-test-secret-0123456789abcdef";

/// A seeded database in `dir`.
fn seeded_db(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("logs.db");
    seed(&*open_store(&db));
    db
}

async fn serve(dir: &Path, db: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Served {
    let db = db.to_str().expect("utf-8 path");
    let mut args = vec![
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--db",
        db,
        "--jwt-secret",
        LOG_SECRET,
    ];
    args.extend_from_slice(extra);
    start_serve(dir, &args, envs).await
}

fn ws_base(served: &Served) -> String {
    served.base.replacen("http://", "ws://", 1)
}

/// The JSON lines whose `target` is `target`.
fn with_target<'a>(lines: &'a [Value], target: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["target"] == target).collect()
}

/// The one line of `lines` whose fields include all of `fields`.
fn the_line<'a>(lines: &[&'a Value], fields: &Value) -> &'a Value {
    let matching: Vec<&Value> = lines
        .iter()
        .copied()
        .filter(|l| {
            fields
                .as_object()
                .expect("fields")
                .iter()
                .all(|(k, v)| &l[k] == v)
        })
        .collect();
    assert_eq!(matching.len(), 1, "one line with {fields}: {lines:#?}");
    matching[0]
}

/// At `RUST_LOG=debug --log-format json`, a session of two WebSockets, an
/// SSE stream and three refusals: every line is one JSON object with `ts`,
/// `level`, `target` and `msg`; the startup line names the engine, database,
/// Redis and limits; each connection has an open and a close line with its
/// fields; each refusal its reason; no token, signature or secret appears,
/// and no tungstenite or hyper line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_at_debug_tell_each_connection_and_refusal_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = seeded_db(dir.path());
    let served = serve(
        dir.path(),
        &db,
        &["--log-format", "json", "--max-conns-per-user", "5"],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let tokens = Tokens::new(LOG_SECRET.as_bytes(), 0);
    let token = |user: &str| tokens.issue(user, 3600).expect("token");
    let (ed_token, v1_token, v2_token, outsider_token) =
        (token("ed"), token("v1"), token("v2"), token("outsider"));
    let bogus = "bogus.token-5e1f2a";
    let url = |view: &str, token: &str| {
        format!("{}/ws/portal-view/{view}?token={token}", ws_base(&served))
    };

    // ed (controller) and v1 (viewer): one update, then v1 leaves with 4001.
    // A client's X-Forwarded-For is not taken for its address.
    let mut request = url("pv1", &ed_token).as_str().into_request();
    request
        .headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().expect("header"));
    let mut ed = open_ws(request).await;
    let connected = ed.recv().await;
    let ed_id = connected["connectionId"].as_str().expect("id").to_string();
    let mut v1 = open_ws(url("pv1", &v1_token).as_str().into_request()).await;
    let connected = v1.recv().await;
    let v1_id = connected["connectionId"].as_str().expect("id").to_string();
    ed.send(json!({"type": "portal-view-update", "payload": {"slide": 2}, "id": 1}))
        .await;
    assert_eq!(ed.recv_type("ack").await["version"], 1);
    assert_eq!(v1.recv().await["type"], "portal-view-update");
    v1.ws
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "bye now".into(),
        }))
        .await
        .expect("close");
    let _ = tokio::time::timeout(WAIT, async {
        use futures::StreamExt;
        while let Some(Ok(_)) = v1.ws.next().await {}
    })
    .await;

    // v2 over SSE: one POSTed ping, then the client goes away.
    let http = reqwest::Client::new();
    let response = http
        .get(format!(
            "{}/sse/portal-view/pv1?token={v2_token}",
            served.base
        ))
        .send()
        .await
        .expect("SSE");
    assert_eq!(response.status(), 200);
    let mut sse = SseClient::new(response);
    let connected = sse.recv().await;
    let v2_id = connected["connectionId"].as_str().expect("id").to_string();
    let pong = http
        .post(format!("{}/api/portal-views/pv1/messages", served.base))
        .bearer_auth(&v2_token)
        .header("x-connection-id", &v2_id)
        .header("content-type", "application/json")
        .body(r#"{"type":"ping","id":"p"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(pong.status(), 200);
    drop(sse);

    // Refusals: a bogus token (WebSocket), no access (WebSocket), a bogus
    // token (SSE, in a header).
    let mut refused = open_ws(url("pv1", bogus).as_str().into_request()).await;
    refused.assert_closed(1008, "invalid token").await;
    let mut refused = open_ws(url("pv1", &outsider_token).as_str().into_request()).await;
    refused.assert_closed(1008, "access denied").await;
    let status = http
        .get(format!("{}/sse/portal-view/pv1", served.base))
        .bearer_auth(bogus)
        .send()
        .await
        .expect("SSE")
        .status();
    assert_eq!(status, 401);
    for id in [&v1_id, &v2_id] {
        let close = format!("\"msg\":\"connection closed\",\"conn\":\"{id}\"");
        wait_for_text(&served.stderr, &close).await;
    }
    wait_for_text(
        &served.stderr,
        "\"reason\":\"invalid_token\",\"view\":\"pv1\",\"user\":null,\"transport\":\"sse\"",
    )
    .await;

    let stop = tokio::spawn(served.stop());
    ed.assert_closed(1001, "server shutting down").await;
    let (code, logs) = stop.await.expect("stop");
    assert_eq!(code, Some(0), "{logs}");

    // Every line is one JSON object with the four fields.
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            for key in ["ts", "level", "target", "msg"] {
                assert!(value[key].is_string(), "{key} in {line}");
            }
            let ts = value["ts"].as_str().expect("ts");
            assert!(
                ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "RFC 3339 UTC with milliseconds: {ts}"
            );
            assert!(
                ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                    .contains(&value["level"].as_str().expect("level")),
                "{line}"
            );
            value
        })
        .collect();
    assert!(lines.len() >= 10, "{logs}");

    // No frame dumps: nothing from the WebSocket and HTTP crates at debug.
    for line in &lines {
        let target = line["target"].as_str().expect("target");
        let quiet = ["tungstenite", "tokio_tungstenite", "hyper", "warp"]
            .iter()
            .any(|quiet| target.starts_with(quiet));
        let level = line["level"].as_str().expect("level");
        assert!(
            !quiet || !["DEBUG", "TRACE"].contains(&level),
            "a dump from {target}: {line}"
        );
    }

    // The startup line.
    let startup = with_target(&lines, "portal_sync::startup");
    assert_eq!(startup.len(), 1, "{logs}");
    let startup = startup[0];
    assert_eq!(startup["level"], "INFO");
    assert!(
        startup["msg"]
            .as_str()
            .expect("msg")
            .contains(" listening on http://127.0.0.1:"),
        "{startup}"
    );
    assert_eq!(startup["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(startup["storage"], "sqlite");
    assert_eq!(startup["db"], db.to_str().expect("path"));
    assert_eq!(startup["sqlite_synchronous"], "full");
    assert_eq!(startup["redis"], "off");
    assert_eq!(startup["max_conns_per_user"], 5);
    assert_eq!(startup["max_message_bytes"], 65536);
    assert_eq!(startup["rate_burst"], 200);

    // Connection lines: an open and a close for each.
    let conn = with_target(&lines, "portal_sync::conn");
    assert_eq!(conn.len(), 6, "three opens, three closes: {conn:#?}");
    for line in &conn {
        assert_eq!(line["level"], "INFO");
        let peer = line["peer"].as_str().expect("peer");
        assert!(peer.starts_with("127.0.0.1:"), "the socket's peer: {line}");
    }
    let opened = |id: &str| the_line(&conn, &json!({"msg": "connection opened", "conn": id}));
    let closed = |id: &str| the_line(&conn, &json!({"msg": "connection closed", "conn": id}));
    let ed_open = opened(&ed_id);
    assert_eq!(ed_open["user"], "ed");
    assert_eq!(ed_open["view"], "pv1");
    assert_eq!(ed_open["role"], "controller");
    assert_eq!(ed_open["transport"], "ws");
    let v1_close = closed(&v1_id);
    assert_eq!(v1_close["user"], "v1");
    assert_eq!(v1_close["role"], "viewer");
    assert_eq!(v1_close["by"], "peer");
    assert_eq!(v1_close["code"], 4001);
    assert_eq!(v1_close["reason"], "bye now");
    assert_eq!(v1_close["messages_in"], 0);
    assert_eq!(v1_close["messages_out"], 2, "connected and the update");
    assert!(v1_close["duration_ms"].is_u64(), "{v1_close}");
    let v2_open = opened(&v2_id);
    assert_eq!(v2_open["transport"], "sse");
    assert_eq!(v2_open["role"], "viewer");
    let v2_close = closed(&v2_id);
    assert_eq!(v2_close["by"], "peer");
    assert_eq!(v2_close["code"], Value::Null);
    assert_eq!(v2_close["messages_in"], 1, "the POSTed ping");
    let ed_close = closed(&ed_id);
    assert_eq!(ed_close["by"], "server");
    assert_eq!(ed_close["code"], 1001);
    assert_eq!(ed_close["reason"], "server shutting down");
    assert_eq!(ed_close["messages_in"], 1);

    // Refusals with their reason; the user once the token named one.
    let refusals = with_target(&lines, "portal_sync::refusal");
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    let bad_ws = the_line(
        &refusals,
        &json!({"reason": "invalid_token", "transport": "ws"}),
    );
    assert_eq!(bad_ws["view"], "pv1");
    assert_eq!(bad_ws["user"], Value::Null);
    assert_eq!(bad_ws["message"], "invalid token");
    let denied = the_line(
        &refusals,
        &json!({"reason": "access_denied", "transport": "ws"}),
    );
    assert_eq!(denied["user"], "outsider");
    the_line(
        &refusals,
        &json!({"reason": "invalid_token", "transport": "sse"}),
    );

    // No secret of any kind.
    for token in [&ed_token, &v1_token, &v2_token, &outsider_token] {
        assert!(
            !logs.contains(token.as_str()),
            "a token in the logs:\n{logs}"
        );
        let signature = token.rsplit('.').next().expect("signature");
        assert!(
            !logs.contains(signature),
            "a signature in the logs:\n{logs}"
        );
    }
    assert!(
        !logs.contains(bogus),
        "an invalid token in the logs:\n{logs}"
    );
    assert!(
        !logs.contains(LOG_SECRET),
        "the secret in the logs:\n{logs}"
    );
    assert!(
        !logs.contains("203.0.113.9"),
        "a forwarded-for address:\n{logs}"
    );
}

/// `RUST_LOG=info,portal_sync::conn=off` silences the connection lines and
/// nothing else; the text format prints a refusal's fields as `key=value`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lines_have_their_own_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = seeded_db(dir.path());
    let served = serve(
        dir.path(),
        &db,
        &[],
        &[("RUST_LOG", "info,portal_sync::conn=off")],
    )
    .await;
    let token = Tokens::new(LOG_SECRET.as_bytes(), 0)
        .issue("v1", 3600)
        .expect("token");
    let base = ws_base(&served);
    let mut v1 = open_ws(
        format!("{base}/ws/portal-view/pv1?token={token}")
            .as_str()
            .into_request(),
    )
    .await;
    assert_eq!(v1.recv().await["type"], "connected");
    v1.ws.close(None).await.expect("close");
    // A refusal after the session: once its line is out, so is anything the
    // session logged (its open line is written before `connected`).
    let mut refused = open_ws(format!("{base}/ws/portal-view/pv2").as_str().into_request()).await;
    refused.assert_closed(1008, "invalid token").await;
    let logs = wait_for_text(&served.stderr, "handshake refused").await;
    let refusal = logs
        .lines()
        .find(|l| l.contains("handshake refused"))
        .expect("line");
    assert!(
        refusal.contains(" INFO  portal_sync::refusal > handshake refused reason=invalid_token view=pv2 transport=ws peer=127.0.0.1:"),
        "{refusal}"
    );
    assert!(refusal.ends_with(" message=\"invalid token\""), "{refusal}");
    assert!(!logs.contains("portal_sync::conn"), "{logs}");
    assert!(!logs.contains("connection opened"), "{logs}");
    let startup = logs
        .lines()
        .find(|l| l.contains("portal_sync::startup"))
        .expect("startup line");
    assert!(startup.contains(" storage=sqlite "), "{startup}");
    assert!(startup.contains(" redis=off "), "{startup}");
    let (code, logs) = served.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(!logs.contains("connection closed"), "{logs}");
    assert!(!logs.contains(&token), "{logs}");
}

trait IntoRequest {
    fn into_request(self) -> tokio_tungstenite::tungstenite::handshake::client::Request;
}

impl IntoRequest for &str {
    fn into_request(self) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        self.into_client_request().expect("request")
    }
}

//! SSE without sticky sessions (issue 15, item 8; SPEC §7): a `POST
//! …/messages` naming a stream another node holds is forwarded to that node
//! through Redis and answered exactly as there. Real nodes on one database
//! and one Redis (`PORTAL_REDIS_URL`; unset, every test is skipped).

mod common;

use std::time::Duration;

use common::cluster::{cluster_with, random_prefix, redis_url};
use common::machine::spawn_machine;
use common::{SseClient, WAIT};
use serde_json::{json, Value};

/// An answer without `key` (which differs between two posts).
fn without(mut answer: Value, key: &str) -> Value {
    if let Some(map) = answer.as_object_mut() {
        map.remove(key);
    }
    answer
}

/// The next state-change broadcast a stream is sent.
async fn next_change(stream: &mut SseClient) -> Value {
    loop {
        let data = stream.recv().await;
        if data["version"].is_i64() && data["type"] != "presence" {
            return data;
        }
    }
}

#[tokio::test]
async fn a_post_on_another_node_is_answered_as_on_the_streams_node() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster_with(&url, 2, &random_prefix(), |_| {}).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut stream = a.sse("pv1", "om").await;
    let me = stream.connection_id();
    let mut viewer = b.connect("pv1", "v1").await;
    let mut other = b.connect("pv1", "ed").await;

    // An update through B: A's ack, A's broadcast (from the stream).
    let update = json!({"type": "item-update", "payload": {"itemId": 1, "t": "x"}, "id": 5});
    let (status, ack) = b.post_message("pv1", "om", Some(&me), &update).await;
    assert_eq!(
        (status, &ack),
        (200, &json!({"type": "ack", "id": 5, "version": 1}))
    );
    let seen = viewer.recv_type("item-update").await;
    assert_eq!(seen["version"], 1);
    assert_eq!(seen["from"], json!({"userId": "om", "connectionId": me}));
    // The stream is left out of its own broadcast: its next change is ed's.
    other
        .send(json!({"type": "portal-view-update", "payload": {"by": "ed"}}))
        .await;
    let next = next_change(&mut stream).await;
    assert_eq!(
        (next["version"].as_i64(), &next["payload"]),
        (Some(2), &json!({"by": "ed"}))
    );
    // The same POST on A: the same answer.
    let (status_a, ack_a) = a.post_message("pv1", "om", Some(&me), &update).await;
    assert_eq!(status_a, 200);
    assert_eq!(without(ack_a, "version"), without(ack, "version"));

    // A ping: the pong, as on A.
    let ping = json!({"type": "ping", "id": "p1"});
    let (status, pong) = b.post_message("pv1", "om", Some(&me), &ping).await;
    let (status_a, pong_a) = a.post_message("pv1", "om", Some(&me), &ping).await;
    assert_eq!((status, status_a), (200, 200));
    assert_eq!(pong["type"], "pong");
    assert!(pong["timestamp"].is_u64(), "{pong}");
    assert_eq!(without(pong, "timestamp"), without(pong_a, "timestamp"));

    // A viewer's stream may not change the view: the same 403 either way.
    let watcher = a.sse("pv1", "v2").await;
    let theirs = watcher.connection_id();
    let change = json!({"type": "portal-view-update", "payload": {"no": 1}, "id": 9});
    let refused = b.post_message("pv1", "v2", Some(&theirs), &change).await;
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert_eq!(
        refused,
        a.post_message("pv1", "v2", Some(&theirs), &change).await
    );

    // Another user's token naming om's stream: refused as on A, nothing run.
    let forged = b.post_message("pv1", "ed", Some(&me), &update).await;
    assert_eq!(
        forged,
        (
            400,
            json!({"error": {"code": "BAD_REQUEST", "message": "X-Connection-Id does not name an open SSE stream of yours on this view"}})
        )
    );
    assert_eq!(
        forged,
        a.post_message("pv1", "ed", Some(&me), &update).await
    );
    // The stream on the wrong view: the same.
    let wrong_view = b.post_message("pv2", "om", Some(&me), &ping).await;
    assert_eq!(wrong_view, forged);
    assert_eq!(a.stored("pv1").version, 3);
}

/// The stream's rate counts its POSTs wherever they land.
#[tokio::test]
async fn forwarded_posts_count_against_the_streams_rate() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster_with(&url, 2, &random_prefix(), |c| {
        c.rate_burst = 3;
        c.rate_per_sec = 0.01;
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let stream = a.sse("pv1", "om").await;
    let me = stream.connection_id();
    let ping = json!({"type": "ping", "id": 1});
    assert_eq!(b.post_message("pv1", "om", Some(&me), &ping).await.0, 200);
    assert_eq!(a.post_message("pv1", "om", Some(&me), &ping).await.0, 200);
    assert_eq!(b.post_message("pv1", "om", Some(&me), &ping).await.0, 200);
    let (status, body) = b.post_message("pv1", "om", Some(&me), &ping).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        (&body["type"], &body["code"]),
        (&json!("error"), &json!("RATE_LIMITED"))
    );
    let (status, _) = a.post_message("pv1", "om", Some(&me), &ping).await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn a_post_for_a_stream_whose_node_is_gone_gets_a_bounded_answer() {
    let Some(url) = redis_url().await else { return };
    let prefix = random_prefix();
    let nodes = cluster_with(&url, 1, &prefix, |_| {}).await;
    let b = &nodes[0];
    let mut child = spawn_machine(&b.database, &url, &prefix).await;
    let stream = child.sse("pv1", "om").await;
    let me = stream.connection_id();
    let ping = json!({"type": "ping", "id": 1});
    // The child may still be subscribing to its channel: wait for a pong.
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.post_message("pv1", "om", Some(&me), &ping).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGKILL: its Redis connections close with it, so B knows at once.
    child.kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    let gone = loop {
        let answer = b.post_message("pv1", "om", Some(&me), &ping).await;
        if answer.0 != 200 {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline);
    };
    assert_eq!(
        gone,
        (
            400,
            json!({"error": {"code": "BAD_REQUEST", "message": "X-Connection-Id does not name an open SSE stream of yours on this view"}})
        )
    );

    // A node that is subscribed but never answers (hung): 503 after the wait.
    let hung = "00ff00ff00ff00ff00ff00ff";
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut silent = client.get_async_pubsub().await.expect("pubsub");
    silent
        .subscribe(format!("{prefix}:node:{hung}"))
        .await
        .expect("subscribe");
    let started = std::time::Instant::now();
    let (status, body) = b
        .post_message("pv1", "om", Some(&format!("{hung}-0123")), &ping)
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < WAIT,
        "{waited:?}"
    );
    drop(silent);
}

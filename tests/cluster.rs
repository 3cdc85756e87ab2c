//! Several nodes on one database fanning out through a real Redis
//! (`PORTAL_REDIS_URL`, e.g. `redis://127.0.0.1:6379`). Unset: every test is
//! skipped with a note; set but Redis does not answer: every test fails.
//! Each test uses its own random channel prefix, so tests (and people) sharing
//! the Redis do not see each other's messages.

mod common;

use std::time::Duration;

use common::{open_ws, spawn_app_with, spawn_peer, Client, TestApp, WAIT};
use futures::StreamExt;
use portal_sync::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The Redis URL, or `None` (after a note) when the cluster tests are off.
async fn redis_url() -> Option<String> {
    let Ok(url) = std::env::var("PORTAL_REDIS_URL") else {
        eprintln!("note: PORTAL_REDIS_URL is not set: skipping the cluster tests");
        return None;
    };
    let client = redis::Client::open(url.as_str()).expect("PORTAL_REDIS_URL is a Redis URL");
    let pong: String = tokio::time::timeout(Duration::from_secs(5), async {
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("PORTAL_REDIS_URL is set but Redis does not answer");
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .expect("Redis answers PING")
    })
    .await
    .expect("Redis answers in time");
    assert_eq!(pong, "PONG");
    Some(url)
}

fn random_prefix() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("portal-sync-test-{hex}")
}

/// `n` nodes on one database and one Redis channel prefix.
async fn cluster(url: &str, n: usize) -> Vec<TestApp> {
    cluster_with(url, n, &random_prefix(), |_| {}).await
}

async fn cluster_with(
    url: &str,
    n: usize,
    prefix: &str,
    tweak: impl Fn(&mut Config),
) -> Vec<TestApp> {
    let prefix = prefix.to_string();
    let with_redis = |config: &mut Config| {
        config.redis_url = Some(url.to_string());
        config.redis_prefix = prefix.clone();
        tweak(config);
    };
    let first = spawn_app_with(with_redis).await;
    let mut nodes = Vec::with_capacity(n);
    for _ in 1..n {
        let mut config = first.config.clone();
        with_redis(&mut config);
        nodes.push(spawn_peer(&first, config).await);
    }
    nodes.insert(0, first);
    for node in &nodes {
        wait_redis_up(node).await;
    }
    nodes
}

async fn health(node: &TestApp) -> Value {
    common::health(node).await.1
}

async fn wait_redis_up(node: &TestApp) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = health(node).await;
        if body["redis"] == "up" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node never reached Redis: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads state-change broadcasts until `last`, checking that they come in
/// version order with no gap and no duplicate; returns their payloads.
/// `skip` holds versions this client is not sent (its own changes).
async fn collect_until(client: &mut Client, last: i64, skip: &[i64]) -> Vec<(i64, Value)> {
    let mut version = client.connected["version"].as_i64().expect("version");
    let mut got = Vec::new();
    while version < last {
        let msg = client.recv().await;
        let Some(v) = msg["version"].as_i64() else {
            continue; // ack, presence
        };
        if msg["type"] == "ack" {
            continue;
        }
        let mut expected = version + 1;
        while skip.contains(&expected) {
            expected += 1;
        }
        assert_eq!(v, expected, "after version {version}: {msg}");
        version = v;
        got.push((v, msg["payload"].clone()));
    }
    got
}

/// Every message that arrives within `wait`.
async fn read_for(client: &mut Client, wait: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            got.push(serde_json::from_str(text.as_str()).expect("json"));
        }
    }
    got
}

async fn patch(node: &TestApp, user: &str, body: Value) -> Value {
    let response = node
        .http()
        .patch(node.http_url("/api/portal-views/pv1"))
        .bearer_auth(node.token(user))
        .json(&body)
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

#[tokio::test]
async fn three_nodes_deliver_every_version_in_order() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 3).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut viewer_b = nodes[1].connect("pv1", "v1").await;
    let mut viewer_c = nodes[2].connect("pv1", "v2").await;
    let mut viewer_a = nodes[0].connect("pv1", "42").await;
    let mut own = Vec::new();
    for i in 0..100 {
        controller
            .send(json!({"type": "portal-view-update", "payload": {"n": i}, "id": i}))
            .await;
        if i % 10 == 0 {
            patch(&nodes[2], "owner", json!({"rest": i})).await;
        }
    }
    // The controller's acks tell which versions were its own.
    while own.len() < 100 {
        let msg = controller.recv().await;
        if msg["type"] == "ack" {
            own.push(msg["version"].as_i64().expect("version"));
        }
    }
    let last = nodes[0].stored("pv1").version;
    assert_eq!(last, 110);
    for viewer in [&mut viewer_a, &mut viewer_b, &mut viewer_c] {
        let got = collect_until(viewer, last, &[]).await;
        assert_eq!(got.len(), 110);
    }
}

#[tokio::test]
async fn concurrent_controllers_on_two_nodes_give_one_sequence() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 2).await;
    let ed = nodes[0].connect("pv1", "ed").await;
    let om = nodes[1].connect("pv1", "om").await;
    let mut viewers = vec![
        nodes[0].connect("pv1", "v1").await,
        nodes[1].connect("pv1", "v2").await,
    ];
    let run = |mut client: Client, key: &'static str| async move {
        for i in 0..150 {
            client
                .send(json!({"type": "portal-view-update", "payload": {key: i}, "id": i}))
                .await;
        }
        let (mut acks, mut seen) = (Vec::new(), Vec::new());
        while acks.len() < 150 {
            let msg = client.recv().await;
            match (msg["type"].as_str(), msg["version"].as_i64()) {
                (Some("ack"), Some(v)) => acks.push(v),
                (Some("portal-view-update"), Some(v)) => seen.push(v),
                _ => {}
            }
        }
        (client, acks, seen)
    };
    let ((ed, ed_acks, ed_seen), (om, om_acks, om_seen)) = tokio::join!(run(ed, "a"), run(om, "b"));
    let last = nodes[0].stored("pv1").version;
    assert_eq!(last, 300);
    let stored = nodes[0].stored_state("pv1");
    for viewer in &mut viewers {
        let got = collect_until(viewer, last, &[]).await;
        let mut state = serde_json::Map::new();
        for (_, payload) in got {
            for (k, v) in payload.as_object().expect("object") {
                state.insert(k.clone(), v.clone());
            }
        }
        assert_eq!(Value::Object(state), stored);
    }
    // Each controller gets every version but its own, in order.
    for (mut client, acks, mut seen) in [(ed, ed_acks, ed_seen), (om, om_acks, om_seen)] {
        while seen.len() + acks.len() < 300 {
            let msg = client.recv().await;
            if let (Some("portal-view-update"), Some(v)) =
                (msg["type"].as_str(), msg["version"].as_i64())
            {
                seen.push(v);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
        let mut all: Vec<i64> = seen.iter().chain(acks.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (1..=300).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn nodes_recover_when_their_redis_connections_are_killed() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 2).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    let killer = redis::Client::open(url.as_str()).expect("url");
    let mut conn = killer
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for i in 0..60 {
        controller
            .send(json!({"type": "portal-view-update", "payload": {"n": i}}))
            .await;
        if i == 20 {
            let _: redis::Value = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "pubsub"])
                .query_async(&mut conn)
                .await
                .expect("client kill pubsub");
        }
        if i == 40 {
            let _: redis::Value = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
                .query_async(&mut conn)
                .await
                .expect("client kill normal");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = collect_until(&mut viewer, 60, &[]).await;
    assert_eq!(got.len(), 60);
    assert_eq!(nodes[1].stored("pv1").version, 60);
    // Both nodes report Redis as up again, and changes flow through it again.
    for node in &nodes {
        wait_redis_up(node).await;
    }
    controller
        .send(json!({"type": "portal-view-update", "payload": {"n": "after"}}))
        .await;
    viewer.connected["version"] = json!(60);
    let got = collect_until(&mut viewer, 61, &[]).await;
    assert_eq!(got[0].1, json!({"n": "after"}));
}

#[tokio::test]
async fn a_revocation_on_one_node_closes_sockets_on_another() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 2).await;
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    let response = nodes[0]
        .http()
        .delete(nodes[0].http_url("/api/libraries/lib1/members/v1"))
        .bearer_auth(nodes[0].token("owner"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 204);
    viewer.assert_closed(1008, "access revoked").await;
}

#[tokio::test]
async fn request_sync_reaches_a_controller_on_another_node() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 2).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut local = nodes[1].connect("pv1", "om").await;
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    viewer.send(json!({"type": "request-sync", "id": 1})).await;
    let forwarded = controller.recv_type("request-sync").await;
    assert_eq!(forwarded["from"]["userId"], "v1");
    // The controller on the viewer's own node gets it once, not twice.
    local.recv_type("request-sync").await;
    let rest: Vec<Value> = read_for(&mut local, Duration::from_millis(500)).await;
    assert!(rest.iter().all(|m| m["type"] != "request-sync"), "{rest:?}");
    // The controller answers; the viewer gets it through the cluster.
    controller
        .send(json!({"type": "sync-response", "payload": {"slide": 3}}))
        .await;
    let msg = viewer.recv_type("sync-response").await;
    assert!(msg["version"].as_i64().is_some(), "{msg}");
}

/// Polls node's `GET /api/portal-views/pv1` until its presence counts
/// `controllers` (other nodes' included).
async fn wait_controllers(node: &TestApp, controllers: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view: Value = node
            .http()
            .get(node.http_url("/api/portal-views/pv1"))
            .bearer_auth(node.token("owner"))
            .send()
            .await
            .expect("GET view")
            .json()
            .await
            .expect("JSON");
        if view["presence"]["controllers"] == controllers {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never showed {controllers} controller(s): {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SPEC §3.1 across nodes. The only controller is on node A, the viewer on
/// node B. The controller's sync-response, committed on A, reaches B through
/// the cluster and answers the viewer there: no server answer follows, even
/// past the timeout. A request the controller ignores is answered by B itself
/// after the timeout.
#[tokio::test]
async fn a_controller_on_another_node_answers_or_the_requesters_node_does() {
    let Some(url) = redis_url().await else { return };
    let timeout = Duration::from_secs(1);
    let nodes = cluster_with(&url, 2, &random_prefix(), |c| c.sync_timeout = timeout).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    wait_controllers(&nodes[1], 1).await;
    let from = json!({"userId": "v1", "connectionId": viewer.connected["connectionId"]});

    viewer
        .send(json!({"type": "request-sync", "payload": {"big": "x"}, "id": "a"}))
        .await;
    assert_eq!(
        controller.recv_type("request-sync").await,
        json!({"type": "request-sync", "from": from})
    );
    controller
        .send(json!({"type": "sync-response", "payload": {"slide": 1}, "id": "c"}))
        .await;
    assert_eq!(controller.recv_type("ack").await["version"], 1);
    let answer = viewer.recv().await;
    assert_eq!(
        answer,
        json!({"type": "sync-response", "payload": {"slide": 1}, "version": 1,
               "from": {"userId": "ed", "connectionId": controller.connected["connectionId"]}})
    );
    let rest = read_for(&mut viewer, timeout + Duration::from_millis(500)).await;
    assert!(
        rest.is_empty(),
        "no server answer after the controller's: {rest:?}"
    );

    let started = std::time::Instant::now();
    viewer
        .send(json!({"type": "request-sync", "id": "b"}))
        .await;
    controller.recv_type("request-sync").await;
    let answer = tokio::time::timeout(timeout + Duration::from_secs(3), viewer.recv())
        .await
        .expect("the viewer's node answers within --sync-timeout (plus slack)");
    assert_eq!(
        answer,
        json!({"type": "sync-response", "payload": {"slide": 1}, "version": 1, "source": "server", "id": "b"})
    );
    assert!(
        started.elapsed() >= timeout * 9 / 10,
        "{:?}",
        started.elapsed()
    );
}

/// Coalescing holds for a controller whatever node its requesters are on:
/// viewers on both nodes flood request-sync, and the controller gets at most
/// one forward per window, each naming one of them, without payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_from_every_node_share_a_controllers_window() {
    use futures::SinkExt;
    let Some(url) = redis_url().await else { return };
    let nodes = cluster_with(&url, 2, &random_prefix(), |c| {
        c.sync_timeout = Duration::from_millis(250);
    })
    .await;
    let window = nodes[0].config.presence_batch;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut viewers = Vec::new();
    for node in &nodes {
        for user in ["v1", "v2"] {
            for _ in 0..2 {
                viewers.push((node.addr, node.connect("pv1", user).await));
            }
        }
    }
    wait_controllers(&nodes[1], 1).await;
    let requesters: std::collections::HashMap<Value, std::net::SocketAddr> = viewers
        .iter()
        .map(|(addr, v)| {
            let from = json!({"userId": v.connected["userId"], "connectionId": v.connected["connectionId"]});
            (from, *addr)
        })
        .collect();
    let flood = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = viewers
        .into_iter()
        .map(|(_, viewer)| {
            tokio::spawn(async move {
                let (mut sink, mut stream) = viewer.ws.split();
                let reader =
                    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                let end = tokio::time::Instant::now() + flood;
                let mut tick = tokio::time::interval(Duration::from_millis(60));
                while tokio::time::Instant::now() < end {
                    tick.tick().await;
                    let request =
                        json!({"type": "request-sync", "payload": {"pad": "y".repeat(1000)}});
                    sink.send(tokio_tungstenite::tungstenite::Message::text(
                        request.to_string(),
                    ))
                    .await
                    .expect("send");
                }
                reader.abort();
            })
        })
        .collect();
    let mut forwards = 0usize;
    let mut nodes_named = std::collections::HashSet::new();
    let mut last = started;
    loop {
        let wait = if started.elapsed() < flood {
            flood
        } else {
            Duration::from_millis(500)
        };
        let Ok(msg) = tokio::time::timeout(wait, controller.recv()).await else {
            break;
        };
        if msg["type"] != "request-sync" {
            continue;
        }
        assert_eq!(
            msg.as_object().map(|m| m.len()),
            Some(2),
            "type and from only: {msg}"
        );
        let node = requesters
            .get(&msg["from"])
            .unwrap_or_else(|| panic!("from names a requester: {msg}"));
        nodes_named.insert(*node);
        forwards += 1;
        last = std::time::Instant::now();
    }
    for task in tasks {
        task.await.expect("viewer task");
    }
    let span = last - started;
    let bound = (span.as_secs_f64() / window.as_secs_f64()) as usize + 2;
    eprintln!("{forwards} forwards in {span:?} (bound {bound})");
    assert!(
        forwards <= bound,
        "{forwards} forwards in {span:?}: more than one per window"
    );
    assert_eq!(
        nodes_named.len(),
        2,
        "requesters on both nodes were forwarded"
    );
}

/// SPEC §7's streams are sessions like any other: an SSE viewer on one node
/// gets a WebSocket controller's changes from another, in order; an SSE
/// controller's POSTs reach WebSocket viewers elsewhere; presence spans both.
#[tokio::test]
async fn sse_streams_take_part_in_the_cluster() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster(&url, 2).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut sse_viewer = nodes[1].sse("pv1", "v1").await;
    let mut ws_viewer = nodes[0].connect("pv1", "v2").await;
    let presence = presence_until(&mut controller, |p| p["presence"]["viewers"] == 2).await;
    assert!(
        names(&presence, "joined").contains(&"v1".to_string()),
        "{presence:?}"
    );
    for i in 1..=20 {
        controller
            .send(json!({"type": "portal-view-update", "payload": {"i": i}}))
            .await;
    }
    let mut versions = Vec::new();
    while versions.len() < 20 {
        let event = sse_viewer.next_event().await.expect("stream open");
        if event.data["type"] == "portal-view-update" {
            assert_eq!(event.id, Some(event.data["version"].to_string()));
            versions.push(event.data["version"].as_i64().expect("version"));
        }
    }
    assert_eq!(versions, (1..=20).collect::<Vec<i64>>());
    // An SSE controller on node B drives the WebSocket viewer on node A.
    let presenter = nodes[1].sse("pv1", "om").await;
    let me = presenter.connection_id();
    let update = json!({"type": "item-update", "payload": {"itemId": 1, "t": "x"}, "id": 5});
    let (status, ack) = nodes[1].post_message("pv1", "om", Some(&me), &update).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["version"], 21);
    let seen = ws_viewer.recv_type("item-update").await;
    assert_eq!(seen["version"], 21);
    assert_eq!(seen["from"], json!({"userId": "om", "connectionId": me}));
}

#[tokio::test]
async fn health_reports_redis_down_and_serving_continues() {
    let Some(_) = redis_url().await else { return };
    // A port nothing listens on: the node serves, and says Redis is down.
    let node = spawn_app_with(|config: &mut Config| {
        config.redis_url = Some("redis://127.0.0.1:1".into());
        config.redis_prefix = random_prefix();
    })
    .await;
    let body = health(&node).await;
    assert_eq!(body["redis"], "down", "{body}");
    assert_eq!(body["status"], "ok", "degraded, still serving: {body}");
    let mut controller = node.connect("pv1", "ed").await;
    let mut viewer = node.connect("pv1", "v1").await;
    controller
        .send(json!({"type": "portal-view-update", "payload": {"x": 1}}))
        .await;
    let got = collect_until(&mut viewer, 1, &[]).await;
    assert_eq!(got, vec![(1, json!({"x": 1}))]);
}

/// A real `portal-sync serve` process on `first`'s database: a node that can
/// be SIGKILLed. Killed when dropped.
struct ChildNode {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl ChildNode {
    async fn start(first: &TestApp, url: &str, prefix: &str) -> ChildNode {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_portal-sync"))
            .arg("serve")
            .arg("--addr")
            .arg(addr.to_string())
            .env("PORTAL_DB", first.database.arg())
            .env("PORTAL_JWT_SECRET", common::SECRET)
            .env("PORTAL_REDIS_URL", url)
            .env("PORTAL_REDIS_PREFIX", prefix)
            .env("PORTAL_SQLITE_SYNCHRONOUS", "normal")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the binary");
        let node = ChildNode { child, addr };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let up = reqwest::get(format!("http://{addr}/health")).await;
            if let Ok(response) = up {
                let body: Value = response.json().await.expect("json");
                if body["redis"] == "up" {
                    return node;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "child node did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connect(&self, first: &TestApp, user: &str) -> Client {
        let url = format!(
            "ws://{}/ws/portal-view/pv1?token={}",
            self.addr,
            first.token(user)
        );
        let mut client = open_ws(url.into_client_request().expect("request")).await;
        let connected = client.recv().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        client.connected = connected;
        client
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads presence events until `check` accepts one.
async fn presence_until(client: &mut Client, check: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let event = client.recv_type("presence").await;
        seen.push(event.clone());
        if check(&event) {
            return seen;
        }
    }
}

fn names(events: &[Value], list: &str) -> Vec<String> {
    let mut names: Vec<String> = events
        .iter()
        .flat_map(|e| e[list].as_array().cloned().unwrap_or_default())
        .map(|p| p["userId"].as_str().expect("userId").to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn presence_covers_every_node_and_a_killed_node_leaves() {
    let Some(url) = redis_url().await else { return };
    let prefix = random_prefix();
    let nodes = cluster_with(&url, 2, &prefix, |_| {}).await;
    let mut child = ChildNode::start(&nodes[0], &url, &prefix).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let _v1 = nodes[1].connect("pv1", "v1").await;
    let _v2 = child.connect(&nodes[0], "v2").await;
    let _v42 = nodes[0].connect("pv1", "42").await;
    let events = presence_until(&mut controller, |e| e["presence"]["viewers"] == 3).await;
    assert_eq!(names(&events, "joined"), ["42", "v1", "v2"]);
    assert_eq!(events.last().expect("event")["presence"]["connections"], 4);
    // A second controller on the child node counts everyone, on every node.
    let om = child.connect(&nodes[0], "om").await;
    assert_eq!(
        om.connected["presence"],
        json!({"controllers": 2, "viewers": 3, "connections": 5})
    );
    presence_until(&mut controller, |e| e["presence"]["controllers"] == 2).await;
    // SIGKILL: no goodbye; its connections leave once its heartbeat expires.
    let killed = std::time::Instant::now();
    let _ = child.child.kill();
    let _ = child.child.wait();
    let events = presence_until(&mut controller, |e| e["presence"]["viewers"] == 2).await;
    let left = names(&events, "left");
    assert!(left.contains(&"v2".to_string()), "{events:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "left after {:?}",
        killed.elapsed()
    );
    let last = events.last().expect("event");
    assert_eq!(
        last["presence"],
        json!({"controllers": 1, "viewers": 2, "connections": 3})
    );
    drop(om);
}

#[tokio::test]
async fn the_per_user_limit_counts_every_node() {
    let Some(url) = redis_url().await else { return };
    let nodes = cluster_with(&url, 2, &random_prefix(), |c| c.max_conns_per_user = 2).await;
    let _a = nodes[0].connect("pv1", "v1").await;
    let _b = nodes[1].connect("pv2", "v1").await;
    // The other node hears of each connection within a presence window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &nodes {
        let mut third = node
            .open(&node.ws_url("pv1", Some(&node.token("v1"))))
            .await;
        third.assert_closed(1008, "too many connections").await;
    }
    drop(_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].connect("pv1", "v1").await;
}

#[tokio::test]
async fn a_node_shut_down_gracefully_leaves_presence_at_once() {
    let Some(url) = redis_url().await else { return };
    let mut nodes = cluster(&url, 2).await;
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    presence_until(&mut controller, |e| e["presence"]["viewers"] == 1).await;
    // The viewer answers the server's 1001 close, so shutdown does not linger.
    tokio::spawn(async move { while let Some(Ok(_)) = viewer.ws.next().await {} });
    let stopped = std::time::Instant::now();
    nodes[1].shutdown().await.expect("clean shutdown");
    let events = presence_until(&mut controller, |e| e["presence"]["viewers"] == 0).await;
    assert_eq!(names(&events, "left"), ["v1"]);
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "left after {:?}",
        stopped.elapsed()
    );
}

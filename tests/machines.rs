//! Several machines (SPEC §8): nodes that are separate processes, each from
//! an empty working directory of its own, sharing nothing but one PostgreSQL
//! database and one Redis. Runs in the suite's PostgreSQL pass
//! (`PORTAL_TEST_PG_URL`) with `PORTAL_REDIS_URL`; skipped otherwise.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{random_prefix, redis_url};
use common::machine::spawn_machine;
use common::{db::on_postgres, foreign, Client, TestApp, TestDb, WAIT};
use serde_json::{json, Map, Value};

/// `n` machines on a fresh seeded database, or `None` when this run has no
/// PostgreSQL or no Redis.
async fn machines(n: usize) -> Option<(Arc<TestDb>, Vec<TestApp>)> {
    if !on_postgres() {
        eprintln!("note: PORTAL_TEST_PG_URL is not set: skipping the several-machines tests");
        return None;
    }
    let redis = redis_url().await?;
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDb::seeded(dir.path());
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(spawn_machine(&database, &redis, &prefix).await);
    }
    Some((database, nodes))
}

/// Reads broadcasts until `last`, asserting each is the next version; returns
/// the state their payloads replay to (merge patches of flat objects).
async fn replay_until(client: &mut Client, last: i64) -> Map<String, Value> {
    let mut version = client.connected["version"].as_i64().expect("version");
    let mut state = Map::new();
    while version < last {
        let msg = client.recv().await;
        if msg["type"] != "portal-view-update" {
            continue; // presence, acks
        }
        let v = msg["version"].as_i64().expect("version");
        assert_eq!(v, version + 1, "after version {version}: {msg}");
        version = v;
        for (k, value) in msg["payload"].as_object().expect("object") {
            state.insert(k.clone(), value.clone());
        }
    }
    state
}

/// Sends `count` updates setting `{key}{i}` and returns the versions acked.
async fn send_updates(client: &mut Client, key: &str, count: usize) -> BTreeMap<i64, String> {
    for i in 0..count {
        client
            .send(
                json!({"type": "portal-view-update", "payload": {format!("{key}{i}"): i}, "id": i}),
            )
            .await;
    }
    let mut acked = BTreeMap::new();
    while acked.len() < count {
        let msg = client.recv().await;
        if msg["type"] == "ack" {
            let i = msg["id"].as_u64().expect("id");
            acked.insert(
                msg["version"].as_i64().expect("version"),
                format!("{key}{i}"),
            );
        }
    }
    acked
}

async fn get_view(node: &TestApp, user: &str) -> Value {
    let response = node
        .http()
        .get(node.http_url("/api/portal-views/pv1"))
        .bearer_auth(node.token(user))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// Two controllers on two machines write one view at once while a third
/// machine takes REST changes: one gapless sequence, and at every viewer the
/// replay of what it received is the stored state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_writing_one_view_give_one_gapless_sequence() {
    let Some((_db, nodes)) = machines(3).await else {
        return;
    };
    let mut viewers = Vec::new();
    for (node, user) in nodes.iter().zip(["v1", "v2", "42"]) {
        viewers.push(node.connect("pv1", user).await);
    }
    let mut ed = nodes[0].connect("pv1", "ed").await;
    let mut om = nodes[1].connect("pv1", "om").await;
    let rest = async {
        for i in 0..20 {
            let response = nodes[2]
                .http()
                .patch(nodes[2].http_url("/api/portal-views/pv1"))
                .bearer_auth(nodes[2].token("owner"))
                .json(&json!({ format!("r{i}"): i }))
                .send()
                .await
                .expect("PATCH");
            assert_eq!(response.status(), 200);
        }
    };
    let (ed_acks, om_acks, ()) = tokio::join!(
        send_updates(&mut ed, "a", 150),
        send_updates(&mut om, "b", 150),
        rest
    );
    let stored = get_view(&nodes[2], "owner").await;
    assert_eq!(stored["version"], 320);
    let mut versions: Vec<i64> = ed_acks.keys().chain(om_acks.keys()).copied().collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 300, "no version acked twice");
    for viewer in &mut viewers {
        let replay = replay_until(viewer, 320).await;
        assert_eq!(Value::Object(replay), stored["state"]);
    }
}

/// A membership removed with plain SQL (`psql`) closes the user's sockets on
/// every machine within a second (SPEC §8: revocation within 1 s of any
/// committed change, whoever made it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_by_psql_closes_sockets_on_every_machine_within_a_second() {
    let Some((db, nodes)) = machines(3).await else {
        return;
    };
    let mut sockets = Vec::new();
    for node in &nodes {
        sockets.push(node.connect("pv1", "v1").await);
    }
    let mut bystander = nodes[1].connect("pv1", "v2").await;
    let removed = Instant::now();
    foreign::psql(&db, |c| {
        c.batch_execute("DELETE FROM library_members WHERE library_id = 'lib1' AND user_id = 'v1'")
            .expect("delete")
    });
    for socket in &mut sockets {
        socket.assert_closed(1008, "access revoked").await;
    }
    assert!(
        removed.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        removed.elapsed()
    );
    bystander.assert_alive().await;
}

/// Kills every database connection of every node (`pg_terminate_backend`)
/// while a controller streams changes: nodes reconnect by themselves, every
/// acked change is in the stored state, viewers on another machine see one
/// gapless sequence, and revocation still works afterwards (the LISTEN
/// connection came back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_database_connections_are_replaced_and_nothing_acked_is_lost() {
    let Some((db, nodes)) = machines(2).await else {
        return;
    };
    let mut viewer = nodes[1].connect("pv1", "v2").await;
    let mut acked: BTreeMap<i64, String> = BTreeMap::new();
    let mut round = 0;
    while round < 3 {
        let mut controller = nodes[0].connect("pv1", "ed").await;
        let killer = {
            let db = db.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                foreign::psql(&db, |c| {
                    c.batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    )
                    .expect("terminate")
                });
            })
        };
        let key = format!("k{round}_");
        for i in 0..200 {
            controller
                .send(json!({"type": "portal-view-update", "payload": {format!("{key}{i}"): i}, "id": i}))
                .await;
        }
        // Acks until the 200th, or a 1011 close for a change that could not be
        // committed (nothing after it is acked).
        loop {
            match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut controller.ws)).await {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                    let msg: Value = serde_json::from_str(text.as_str()).expect("json");
                    if msg["type"] == "ack" {
                        let i = msg["id"].as_u64().expect("id");
                        acked.insert(msg["version"].as_i64().expect("v"), format!("{key}{i}"));
                        if i == 199 {
                            break;
                        }
                    }
                }
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(1011), "only a storage failure closes it");
                    break;
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("the controller's socket was left hanging: {other:?}"),
            }
        }
        killer.await.expect("killer");
        round += 1;
    }
    // Every node writes again on fresh connections.
    let mut after = nodes[0].connect("pv1", "om").await;
    after
        .send(json!({"type": "portal-view-update", "payload": {"after": true}, "id": "x"}))
        .await;
    let ack = after.recv_type("ack").await;
    let last = ack["version"].as_i64().expect("version");
    let stored = get_view(&nodes[1], "owner").await;
    assert_eq!(stored["version"], last);
    for key in acked.values() {
        assert!(stored["state"].get(key).is_some(), "acked {key} was lost");
    }
    let replay = replay_until(&mut viewer, last).await;
    assert_eq!(Value::Object(replay), stored["state"]);
    // The LISTEN connection was killed too; it is back.
    let mut member = nodes[1].connect("pv1", "v1").await;
    let removed = Instant::now();
    foreign::psql(&db, |c| {
        c.batch_execute("DELETE FROM library_members WHERE library_id = 'lib1' AND user_id = 'v1'")
            .expect("delete")
    });
    member.assert_closed(1008, "access revoked").await;
    assert!(
        removed.elapsed() < Duration::from_secs(1),
        "{:?}",
        removed.elapsed()
    );
}

/// While the database refuses connections: a change over a WebSocket closes
/// it 1011 with no ack, a PATCH is 500, `/health` is 503; once it is back,
/// the node serves again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_unreachable_writes_fail_and_health_is_503() {
    let Some((db, nodes)) = machines(1).await else {
        return;
    };
    let node = &nodes[0];
    let mut controller = node.connect("pv1", "ed").await;
    let TestDb::Postgres { name, .. } = &*db else {
        unreachable!()
    };
    let admin = common::db::pg_admin_url().expect("admin url");
    let set = move |allow: bool, name: String, admin: String| {
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls).expect("admin");
            c.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}"))
                .expect("alter database");
            if !allow {
                c.batch_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                ))
                .expect("terminate");
            }
        })
        .join()
        .expect("admin thread")
    };
    set(false, name.clone(), admin.clone());
    controller
        .send(json!({"type": "portal-view-update", "payload": {"a": 1}, "id": 1}))
        .await;
    controller.assert_closed(1011, "internal error").await;
    let response = node
        .http()
        .patch(node.http_url("/api/portal-views/pv1"))
        .bearer_auth(node.token("owner"))
        .json(&json!({"b": 1}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 500);
    assert_eq!(common::health(node).await.0, 503);
    set(true, name.clone(), admin.clone());
    let deadline = Instant::now() + WAIT;
    while common::health(node).await.0 != 200 {
        assert!(Instant::now() < deadline, "the node never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = node.connect("pv1", "ed").await;
    again
        .send(json!({"type": "portal-view-update", "payload": {"c": 1}, "id": 2}))
        .await;
    assert_eq!(
        again.recv_type("ack").await["version"],
        1,
        "nothing was committed while down"
    );
}

/// A machine killed with SIGKILL: its people leave presence within the
/// heartbeat's TTL, and the others go on delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_killed_with_sigkill_leaves_presence_and_the_others_go_on() {
    let Some((_db, mut nodes)) = machines(3).await else {
        return;
    };
    let mut controller = nodes[0].connect("pv1", "ed").await;
    let _gone = nodes[1].connect("pv1", "v1").await;
    let mut viewer = nodes[2].connect("pv1", "v2").await;
    loop {
        let p = controller.recv_type("presence").await;
        if p["presence"]["viewers"] == 2 {
            break;
        }
    }
    let killed = Instant::now();
    nodes[1].kill();
    loop {
        let p = controller.recv_type("presence").await;
        if p["presence"]["viewers"] == 1 {
            let left: Vec<&str> = p["left"]
                .as_array()
                .map(|l| l.iter().filter_map(|x| x["userId"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(left, ["v1"], "{p}");
            break;
        }
    }
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "{:?}",
        killed.elapsed()
    );
    controller
        .send(json!({"type": "portal-view-update", "payload": {"on": true}, "id": 1}))
        .await;
    let v = controller.recv_type("ack").await["version"]
        .as_i64()
        .expect("v");
    let got = viewer.recv_type("portal-view-update").await;
    assert_eq!(got["version"], v);
}

/// An SSE stream held by one machine, and its `POST …/messages` landing on
/// another (a load balancer that is not sticky): answered as if it had
/// landed on the stream's machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_post_landing_on_another_machine_is_answered_as_on_its_own() {
    let Some((_db, nodes)) = machines(2).await else {
        return;
    };
    let mut stream = nodes[0].sse("pv1", "ed").await;
    let id = stream.connection_id();
    let mut viewer = nodes[1].connect("pv1", "v1").await;
    let (status, body) = nodes[1]
        .post_message(
            "pv1",
            "ed",
            Some(&id),
            &json!({"type": "portal-view-update", "payload": {"x": 1}, "id": "p1"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"type": "ack", "id": "p1", "version": 1}))
    );
    let got = viewer.recv_type("portal-view-update").await;
    assert_eq!(got["from"]["connectionId"], id.as_str());
    let (status, body) = nodes[1]
        .post_message("pv1", "ed", Some(&id), &json!({"type": "ping", "id": 2}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["type"], "pong");
    // Another user cannot drive the stream from either machine.
    for node in &nodes {
        let (status, body) = node
            .post_message(
                "pv1",
                "om",
                Some(&id),
                &json!({"type": "portal-view-update", "payload": {"y": 1}}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{body}");
    }
    // The stream is the sender: it is not sent its own change, only the next.
    let response = nodes[1]
        .http()
        .patch(nodes[1].http_url("/api/portal-views/pv1"))
        .bearer_auth(nodes[1].token("owner"))
        .json(&json!({"z": 1}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 200);
    let next = stream.recv_type("portal-view-update").await;
    assert_eq!(next["version"], 2, "{next}");
}

//! Per-view Redis channels (issue 15, item 7): a node receives the
//! broadcasts of the views it has connections to and nothing else, a view
//! it starts watching is caught up at once, and a lost subscription is made
//! again. Real nodes on one database and one Redis (`PORTAL_REDIS_URL`;
//! unset, every test is skipped with a note).

mod common;

use std::time::Duration;

use common::cluster::{
    cluster_with, eventually, metric, numsub, random_prefix, redis_proxy, redis_url,
    versions_until, wait_redis_up,
};
use common::{Client, TestApp};
use serde_json::{json, Map};

const VIEW_MESSAGES: &str = "portal_redis_messages_received_total{channel=\"view\"}";
const SUBSCRIBED: &str = "portal_redis_subscribed_views";

/// Sends `n` updates and reads until every one is acked; returns the last
/// version.
async fn commit(controller: &mut Client, n: usize) -> i64 {
    for i in 0..n {
        controller
            .send(json!({"type": "portal-view-update", "payload": {"n": i}, "id": i}))
            .await;
    }
    let mut acked = 0;
    let mut last = 0;
    while acked < n {
        let msg = controller.recv().await;
        if msg["type"] == "ack" {
            acked += 1;
            last = msg["version"].as_i64().expect("version");
        }
    }
    last
}

async fn subscribed(node: &TestApp) -> f64 {
    metric(node, SUBSCRIBED).await
}

#[tokio::test]
async fn a_node_receives_only_the_views_it_has_connections_to() {
    let Some(url) = redis_url().await else { return };
    let prefix = random_prefix();
    // No periodic catch-up: what B delivers came through Redis.
    let nodes = cluster_with(&url, 2, &prefix, |c| {
        c.redis_catch_up = Duration::from_secs(3600);
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let pv1 = format!("{prefix}:view:pv1");
    let pv2 = format!("{prefix}:view:pv2");
    let mut controller = a.connect("pv2", "ed").await;
    let mut viewer = b.connect("pv1", "v1").await;
    eventually("each node subscribed to its one view", || async {
        numsub(&url, &pv1).await == 1
            && numsub(&url, &pv2).await == 1
            && subscribed(a).await == 1.0
            && subscribed(b).await == 1.0
    })
    .await;
    let (a_before, b_before) = (
        metric(a, VIEW_MESSAGES).await,
        metric(b, VIEW_MESSAGES).await,
    );
    assert_eq!(commit(&mut controller, 20).await, 20);
    // A change of pv1, published after pv2's on A's one ordered publishing
    // connection: once B delivered it, B has read everything A published.
    let response = a
        .http()
        .patch(a.http_url("/api/portal-views/pv1"))
        .bearer_auth(a.token("owner"))
        .json(&json!({"marker": 1}))
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status(), 200);
    assert_eq!(versions_until(&mut viewer, 0, 1).await, [1]);
    assert_eq!(
        metric(b, VIEW_MESSAGES).await - b_before,
        1.0,
        "B received pv1's marker and none of pv2's 20 changes"
    );
    // A has a room for pv2 and none for pv1: its own 20 come back to it.
    assert_eq!(metric(a, VIEW_MESSAGES).await - a_before, 20.0);

    // A viewer of pv2 on B: B subscribes, and gets pv2's changes from then on.
    let mut late = b.connect("pv2", "v2").await;
    assert_eq!(late.connected["version"], 20);
    eventually("B subscribed to pv2", || async {
        numsub(&url, &pv2).await == 2 && subscribed(b).await == 2.0
    })
    .await;
    let b_before = metric(b, VIEW_MESSAGES).await;
    assert_eq!(commit(&mut controller, 1).await, 21);
    assert_eq!(versions_until(&mut late, 20, 21).await, [21]);
    assert_eq!(metric(b, VIEW_MESSAGES).await - b_before, 1.0);

    // Its last connection gone, B lets the channel go after the linger.
    drop(late);
    eventually("B unsubscribed from pv2", || async {
        numsub(&url, &pv2).await == 1 && subscribed(b).await == 1.0
    })
    .await;
    assert_eq!(numsub(&url, &pv1).await, 1);
}

/// A viewer's node subscribes to the view only once the viewer has joined,
/// so a change committed on another node just then is published before the
/// subscription is live. Node B reaches Redis through a link that holds its
/// commands back 40 ms, so that each round's commit, made right after B's
/// viewer is connected, lands in that window. The periodic catch-up is off:
/// only the catch-up that follows the subscription's confirmation can
/// deliver it.
#[tokio::test]
async fn a_viewer_joining_as_a_controller_commits_elsewhere_misses_nothing() {
    let Some(url) = redis_url().await else { return };
    let prefix = random_prefix();
    let no_periodic = |c: &mut portal_sync::Config| c.redis_catch_up = Duration::from_secs(3600);
    let a = cluster_with(&url, 1, &prefix, no_periodic).await.remove(0);
    let mut config = a.config.clone();
    let proxy = redis_proxy(&url, Duration::from_millis(40)).await;
    config.redis_url = Some(proxy.url.clone());
    let b = common::spawn_peer(&a, config).await;
    wait_redis_up(&b).await;
    for round in 0..24u64 {
        // A view B has never subscribed to (nor lingers on).
        let view = format!("race{round}");
        a.db.admin()
            .add_view(&view, "lib1", "Race", &Map::new())
            .expect("view");
        let mut controller = a.connect(&view, "ed").await;
        let before = commit(&mut controller, 1).await;
        // Each round a little later, sweeping the window.
        let late_commit = async {
            tokio::time::sleep(Duration::from_millis(2 * round)).await;
            commit(&mut controller, 2).await
        };
        let (mut viewer, last) = tokio::join!(b.connect(&view, "v1"), late_commit);
        assert_eq!((before, last), (1, 3));
        let from = viewer.connected["version"].as_i64().expect("version");
        let got = versions_until(&mut viewer, from, 3).await;
        assert_eq!(got, ((from + 1)..=3).collect::<Vec<_>>(), "round {round}");
    }
}

/// The network drops a node's Redis connections: it subscribes again to
/// every view it has a room for, then catches them up (the periodic
/// catch-up is off, so nothing else would deliver what was missed). Only
/// node B's connections are cut (they go through a proxy), so other tests
/// on the same Redis are untouched.
#[tokio::test]
async fn a_lost_subscription_is_made_again_and_caught_up() {
    let Some(url) = redis_url().await else { return };
    let prefix = random_prefix();
    let no_periodic = |c: &mut portal_sync::Config| c.redis_catch_up = Duration::from_secs(3600);
    let a = cluster_with(&url, 1, &prefix, no_periodic).await.remove(0);
    let proxy = redis_proxy(&url, Duration::ZERO).await;
    let mut config = a.config.clone();
    config.redis_url = Some(proxy.url.clone());
    let b = common::spawn_peer(&a, config).await;
    wait_redis_up(&b).await;
    let pv1 = format!("{prefix}:view:pv1");
    let mut controller = a.connect("pv1", "ed").await;
    let mut viewer = b.connect("pv1", "v1").await;
    let _other = b.connect("pv2", "v2").await;
    eventually("both nodes on pv1", || async {
        numsub(&url, &pv1).await == 2 && subscribed(&b).await == 2.0
    })
    .await;
    proxy.cut();
    eventually("B's subscription gone", || async {
        numsub(&url, &pv1).await == 1
    })
    .await;
    // Committed while B is (or may still be) resubscribing.
    assert_eq!(commit(&mut controller, 10).await, 10);
    assert_eq!(
        versions_until(&mut viewer, 0, 10).await,
        (1..=10).collect::<Vec<_>>()
    );
    wait_redis_up(&b).await;
    eventually("B subscribed again to both views", || async {
        numsub(&url, &pv1).await == 2 && subscribed(&b).await == 2.0
    })
    .await;
    assert_eq!(commit(&mut controller, 1).await, 11);
    assert_eq!(versions_until(&mut viewer, 10, 11).await, [11]);
}

//! Several nodes on one database (`--redis-url`): every broadcast is published
//! on a Redis channel, and each node delivers every view's versions to its own
//! connections strictly in order, with no gaps and no duplicates.
//!
//! Versions are assigned by the SQLite transaction, so two nodes may publish
//! versions 13 and 14 in either order, and Redis may drop messages while it
//! restarts. Redis is therefore only the fast path: each change's broadcast is
//! also stored in `portal_view_events` in the transaction that made it, and a
//! version that arrives early makes the node read the missing ones from there
//! (they committed before it, since writes serialize on the database). All
//! deliveries, this node's own commits included, go through one task, the
//! sequencer, which compares each version with the room's last delivered one
//! (`Room::last_version` in the hub). A catch-up every second, and at once
//! after Redis comes back, compares every local room with the stored version,
//! so a change whose Redis message was lost still arrives within a second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::core::hub::{CloseRequest, Hub, Summary};
use crate::core::metrics::Metrics;
use crate::domain::error::Error;
use crate::store::Storage;

/// How often every local room is compared with the stored version, so that a
/// broadcast lost on Redis is delivered from the database within this time.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Pause between attempts to reach Redis.
const RECONNECT: Duration = Duration::from_millis(500);
/// The subscriber pings Redis this often, so a half-open connection is noticed.
const PING: Duration = Duration::from_secs(2);
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Sent to a room's connections when versions it needs are no longer stored
/// (more than `store::EVENTS_KEPT` behind, or written by a node without Redis):
/// they reconnect and resynchronise from `connected`.
const RESYNC: CloseRequest = CloseRequest {
    code: 1013,
    reason: "try again later",
};

/// What travels on the Redis channel.
#[derive(Serialize, Deserialize)]
struct Envelope {
    node: String,
    view: String,
    /// The change's version; 0 for a forwarded `request-sync`.
    #[serde(default)]
    version: i64,
    /// The sender's hub key on `node`, left out of the delivery.
    #[serde(default)]
    conn: Option<u64>,
    #[serde(default)]
    message: String,
    /// Set on presence news: the sending node's connections to `view`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
}

/// What the sequencer handles, in arrival order.
enum Event {
    Change {
        view: String,
        version: i64,
        node: String,
        conn: Option<u64>,
        message: String,
    },
    RequestSync {
        view: String,
        node: String,
        message: String,
    },
    Presence {
        view: String,
        node: String,
        summary: Summary,
    },
    /// Redis (re)connected: anything may have been missed meanwhile.
    CatchUp,
}

/// This node's side of the cluster; cheap to share.
pub struct Cluster {
    /// Random per process: tells our own messages from other nodes' ones.
    pub node_id: Arc<str>,
    events: mpsc::UnboundedSender<Event>,
    publish: mpsc::UnboundedSender<String>,
    subscribed: Arc<AtomicBool>,
    publishing: Arc<AtomicBool>,
    sharing: Sharing,
}

impl Cluster {
    /// Starts the subscriber, the publisher and the sequencer. Fails only on a
    /// malformed URL: an unreachable Redis is retried in the background while
    /// the node serves its own connections.
    pub fn start(
        url: &str,
        prefix: &str,
        db: Storage,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        presence_window: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Cluster>, Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Internal(format!("invalid --redis-url: {e}")))?;
        let channel = format!("{prefix}:events");
        let node_id: Arc<str> = crate::core::session::new_connection_id().into();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (publish, publish_rx) = mpsc::unbounded_channel();
        let reload = Arc::new(AtomicBool::new(true));
        let sharing = Sharing {
            client: client.clone(),
            prefix: prefix.to_string(),
            channel: channel.clone(),
            node_id: node_id.clone(),
            hub: hub.clone(),
            reload: reload.clone(),
            window: presence_window,
        };
        let cluster = Arc::new(Cluster {
            node_id: node_id.clone(),
            events: events.clone(),
            publish,
            subscribed: Arc::new(AtomicBool::new(false)),
            publishing: Arc::new(AtomicBool::new(false)),
            sharing: sharing.clone(),
        });
        hub.share_presence();
        spawn_until(
            shutdown.clone(),
            subscribe(
                client.clone(),
                channel.clone(),
                events,
                cluster.subscribed.clone(),
                reload.clone(),
            ),
        );
        spawn_until(shutdown.clone(), share_presence(sharing));
        spawn_until(
            shutdown.clone(),
            publisher(client, channel, publish_rx, cluster.publishing.clone()),
        );
        spawn_until(shutdown, sequencer(node_id, db, hub, metrics, events_rx));
        Ok(cluster)
    }

    /// At the end of a graceful shutdown (every local connection closed): tells
    /// the other nodes at once, instead of letting them wait for this node's
    /// heartbeat to expire. Best effort, bounded by a timeout.
    pub async fn goodbye(&self) {
        let s = &self.sharing;
        let _ = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut c = s.client.get_multiplexed_async_connection().await?;
            s.reload.store(false, Ordering::Release);
            share_once(s, &mut c, &mut Some(tokio::time::Instant::now())).await?;
            redis::cmd("DEL")
                .arg(format!("{}:node:{}", s.prefix, s.node_id))
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    /// Whether this node can reach Redis both ways (`/health`).
    pub fn redis_up(&self) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.publishing.load(Ordering::Acquire)
    }

    /// A change this node committed: delivered locally through the sequencer
    /// (so Redis being down does not hold it up) and published to the others.
    pub fn committed(&self, view: &str, version: i64, conn: Option<u64>, message: String) {
        let envelope = Envelope {
            node: self.node_id.to_string(),
            view: view.to_string(),
            version,
            conn,
            message,
            summary: None,
        };
        if let Ok(text) = serde_json::to_string(&envelope) {
            let _ = self.publish.send(text);
        }
        let _ = self.events.send(Event::Change {
            view: envelope.view,
            version,
            node: envelope.node,
            conn,
            message: envelope.message,
        });
    }

    /// A viewer's `request-sync`, forwarded to the controllers on other nodes
    /// (this node's own controllers got it directly). Called at most once per
    /// view per window (see `sync_requests`); the answer to it is a
    /// controller's `sync-response`, which reaches every node as a broadcast
    /// and clears that view's waiting requesters there, or, after the timeout,
    /// the server's own from the requester's node.
    pub fn request_sync(&self, view: &str, message: &str) {
        let envelope = Envelope {
            node: self.node_id.to_string(),
            view: view.to_string(),
            version: 0,
            conn: None,
            message: message.to_string(),
            summary: None,
        };
        if let Ok(text) = serde_json::to_string(&envelope) {
            let _ = self.publish.send(text);
        }
    }
}

fn spawn_until(
    mut shutdown: watch::Receiver<bool>,
    task: impl std::future::Future + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|down| *down) => {}
            _ = task => {}
        }
    });
}

/// Keeps one subscription to the channel, reconnecting for as long as it
/// takes; every (re)subscription is followed by a catch-up.
async fn subscribe(
    client: redis::Client,
    channel: String,
    events: mpsc::UnboundedSender<Event>,
    up: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) {
    let mut first = true;
    loop {
        match tokio::time::timeout(REDIS_TIMEOUT, subscribed(&client, &channel)).await {
            Ok(Ok((mut sink, mut stream))) => {
                up.store(true, Ordering::Release);
                if !first {
                    log::info!("redis: subscribed again to {channel}");
                }
                first = false;
                let _ = events.send(Event::CatchUp);
                reload.store(true, Ordering::Release);
                let mut ping = tokio::time::interval(PING);
                ping.tick().await;
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            let Ok(text) = msg.get_payload::<String>() else { continue };
                            match serde_json::from_str::<Envelope>(&text) {
                                Ok(Envelope { summary: Some(summary), node, view, .. }) => {
                                    let _ = events.send(Event::Presence { view, node, summary });
                                }
                                Ok(e) if e.version > 0 => {
                                    let _ = events.send(Event::Change {
                                        view: e.view,
                                        version: e.version,
                                        node: e.node,
                                        conn: e.conn,
                                        message: e.message,
                                    });
                                }
                                Ok(e) => {
                                    let _ = events.send(Event::RequestSync {
                                        view: e.view,
                                        node: e.node,
                                        message: e.message,
                                    });
                                }
                                Err(e) => log::warn!("redis: unreadable message on {channel}: {e}"),
                            }
                        }
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(
                                REDIS_TIMEOUT,
                                sink.ping::<redis::Value>(),
                            )
                            .await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                log::warn!("redis: subscription to {channel} lost; reconnecting");
            }
            Ok(Err(e)) => log::warn!("redis: cannot subscribe: {e}"),
            Err(_) => log::warn!("redis: cannot subscribe: timed out"),
        }
        up.store(false, Ordering::Release);
        tokio::time::sleep(RECONNECT).await;
    }
}

async fn subscribed(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.split())
}

/// Publishes in order on one connection. While Redis is unreachable messages
/// are dropped, not queued: other nodes' catch-up reads them from the database.
async fn publisher(
    client: redis::Client,
    channel: String,
    mut rx: mpsc::UnboundedReceiver<String>,
    up: Arc<AtomicBool>,
) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    loop {
        let mut conn = match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                if up.swap(false, Ordering::AcqRel) {
                    log::warn!("redis: cannot connect to publish: {e}");
                }
                tokio::time::sleep(RECONNECT).await;
                while rx.try_recv().is_ok() {}
                continue;
            }
        };
        up.store(true, Ordering::Release);
        while let Some(text) = rx.recv().await {
            let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(text)
                .query_async(&mut conn)
                .await;
            if let Err(e) = sent {
                log::warn!("redis: publishing failed: {e}; reconnecting");
                up.store(false, Ordering::Release);
                break;
            }
        }
        if rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

/// Delivers every change to this node's rooms in version order.
async fn sequencer(
    node_id: Arc<str>,
    db: Storage,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let seq = Sequencer {
        node_id,
        db,
        hub,
        metrics,
    };
    let mut tick = tokio::time::interval(CATCH_UP);
    let mut batch = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => {
                if n == 0 {
                    return;
                }
                // Versions that arrived together are put in order first, so
                // a reordering within one read costs no database lookup.
                let mut catch_up = false;
                let mut changes = Vec::new();
                for event in batch.drain(..) {
                    match event {
                        Event::Change { view, version, node, conn, message } => {
                            changes.push((view, version, node, conn, message));
                        }
                        Event::RequestSync { view, node, message } => {
                            // This node's own controllers got it directly; the
                            // others' forwards share its window (SPEC §3.1).
                            if node != *seq.node_id {
                                seq.hub.remote_request_sync(&view, Message::text(message));
                            }
                        }
                        Event::Presence { view, node, summary } => {
                            if node != *seq.node_id {
                                seq.hub.apply_remote(&view, &node, Some(summary));
                            }
                        }
                        Event::CatchUp => catch_up = true,
                    }
                }
                changes.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
                for (view, version, node, conn, message) in changes {
                    seq.change(&view, version, &node, conn, message).await;
                }
                if catch_up {
                    seq.catch_up().await;
                }
            }
            _ = tick.tick() => seq.catch_up().await,
        }
    }
}

struct Sequencer {
    node_id: Arc<str>,
    db: Storage,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl Sequencer {
    async fn change(
        &self,
        view: &str,
        version: i64,
        node: &str,
        conn: Option<u64>,
        message: String,
    ) {
        // No local room: nobody here to tell; a later joiner reads the snapshot.
        let Some(last) = self.hub.last_version(view) else {
            return;
        };
        if version <= last {
            return;
        }
        if version > last + 1 {
            self.fill(view, last + 1, version - 1).await;
        }
        if self.hub.last_version(view) == Some(version - 1) {
            self.deliver(view, version, node, conn, message);
        }
    }

    fn deliver(&self, view: &str, version: i64, node: &str, conn: Option<u64>, message: String) {
        let except = if node == &*self.node_id { conn } else { None };
        let delivered = self
            .hub
            .broadcast(view, &Message::text(message), version, except);
        self.metrics.deliveries.inc_by(delivered as u64);
    }

    /// Delivers `from..=to` from the stored events. Versions that are not
    /// stored cannot be delivered in order: the room's sockets resynchronise.
    async fn fill(&self, view: &str, from: i64, to: i64) {
        let rows = match self.db.events_between(view, from, to).await {
            Ok(rows) => rows,
            Err(e) => {
                e.log("reading stored broadcasts");
                Vec::new()
            }
        };
        log::debug!("{view}: versions {from}..={to} filled from the database");
        for row in rows {
            if self.hub.last_version(view) == Some(row.version - 1) {
                self.deliver(view, row.version, &row.node, row.conn, row.message);
            }
        }
        if self.hub.last_version(view).is_some_and(|last| last < to) {
            let closed = self.hub.resync_room(view, to, RESYNC);
            log::warn!("versions {from}..={to} of {view} are not stored: {closed} connection(s) resynchronise");
        }
    }

    /// Brings every local room up to the stored version.
    async fn catch_up(&self) {
        let rooms = self.hub.room_versions();
        if rooms.is_empty() {
            return;
        }
        let ids: Vec<String> = rooms.iter().map(|(v, _)| v.to_string()).collect();
        let stored = match self.db.versions(ids).await {
            Ok(stored) => stored,
            Err(e) => {
                e.log("catching up with stored versions");
                return;
            }
        };
        for (view, version) in stored {
            if let Some(last) = self.hub.last_version(&view) {
                if version > last {
                    self.fill(&view, last + 1, version).await;
                }
            }
        }
    }
}

/// A node's heartbeat key lives this long: a node killed without a goodbye
/// leaves everyone's presence within about this time plus [`BEAT`].
const NODE_TTL: Duration = Duration::from_secs(5);
/// How often a node refreshes its heartbeat and looks for dead nodes.
const BEAT: Duration = Duration::from_millis(1500);

#[derive(Clone)]
struct Sharing {
    client: redis::Client,
    prefix: String,
    channel: String,
    node_id: Arc<str>,
    hub: Arc<Hub>,
    /// Set by the subscriber after every (re)subscription.
    reload: Arc<AtomicBool>,
    /// The presence batching window: local changes go out at most this often.
    window: Duration,
}

/// Tells the other nodes about this node's connections (one summary per
/// changed view per window, kept in the hash `<prefix>:presence:<view>` and
/// published), keeps this node's heartbeat key alive, and drops the
/// connections of nodes whose heartbeat expired.
async fn share_presence(s: Sharing) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(s.window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if conn.is_none() {
            match s
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(c) => {
                    conn = Some(c);
                    last_beat = None;
                    s.hub.share_all_again();
                    s.reload.store(true, Ordering::Release);
                }
                Err(_) => continue,
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if let Err(e) = share_once(&s, c, &mut last_beat).await {
            log::warn!("redis: sharing presence failed: {e}; reconnecting");
            conn = None;
            s.hub.share_all_again();
        }
    }
}

async fn share_once(
    s: &Sharing,
    c: &mut redis::aio::MultiplexedConnection,
    last_beat: &mut Option<tokio::time::Instant>,
) -> redis::RedisResult<()> {
    let node_key = |node: &str| format!("{}:node:{node}", s.prefix);
    let view_key = |view: &str| format!("{}:presence:{view}", s.prefix);
    if last_beat.is_none_or(|at| at.elapsed() >= BEAT) {
        redis::cmd("SET")
            .arg(node_key(&s.node_id))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL.as_millis() as u64)
            .query_async::<()>(c)
            .await?;
        *last_beat = Some(tokio::time::Instant::now());
        for node in s.hub.remote_nodes() {
            let alive: bool = redis::cmd("EXISTS")
                .arg(node_key(&node))
                .query_async(c)
                .await?;
            if !alive {
                let views = s.hub.forget_node(&node);
                log::info!(
                    "node {node} is gone: its connections to {} view(s) left",
                    views.len()
                );
                for view in views {
                    redis::cmd("HDEL")
                        .arg(view_key(&view))
                        .arg(&*node)
                        .query_async::<()>(c)
                        .await?;
                }
            }
        }
    }
    if s.reload.swap(false, Ordering::AcqRel) {
        reload(s, c).await?;
    }
    for (view, summary) in s.hub.take_summaries() {
        if summary.connections == 0 {
            redis::cmd("HDEL")
                .arg(view_key(&view))
                .arg(&*s.node_id)
                .query_async::<()>(c)
                .await?;
        } else {
            let text = serde_json::to_string(&summary).unwrap_or_default();
            redis::cmd("HSET")
                .arg(view_key(&view))
                .arg(&*s.node_id)
                .arg(text)
                .query_async::<()>(c)
                .await?;
        }
        let envelope = Envelope {
            node: s.node_id.to_string(),
            view: view.to_string(),
            version: 0,
            conn: None,
            message: String::new(),
            summary: Some(summary),
        };
        redis::cmd("PUBLISH")
            .arg(&s.channel)
            .arg(serde_json::to_string(&envelope).unwrap_or_default())
            .query_async::<()>(c)
            .await?;
    }
    Ok(())
}

/// Reads every node's summaries from Redis (live nodes only).
async fn reload(s: &Sharing, c: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
    let prefix = format!("{}:presence:", s.prefix);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut alive: std::collections::HashMap<String, bool> = Default::default();
    let mut entries = Vec::new();
    for key in keys {
        let view = key[prefix.len()..].to_string();
        let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(&key).query_async(c).await?;
        for (node, text) in fields {
            if node == *s.node_id {
                continue;
            }
            let live = match alive.get(&node) {
                Some(live) => *live,
                None => {
                    let live: bool = redis::cmd("EXISTS")
                        .arg(format!("{}:node:{node}", s.prefix))
                        .query_async(c)
                        .await?;
                    alive.insert(node.clone(), live);
                    live
                }
            };
            if !live {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&node)
                    .query_async::<()>(c)
                    .await?;
                continue;
            }
            if let Ok(summary) = serde_json::from_str::<Summary>(&text) {
                entries.push((view.clone(), node, summary));
            }
        }
    }
    s.hub.replace_remote(entries);
    Ok(())
}

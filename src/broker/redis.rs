//! Several nodes on one database (`--redis-url`): every broadcast is published
//! on a Redis channel, and each node delivers every view's versions to its own
//! connections strictly in order, with no gaps and no duplicates.
//!
//! Two nodes may publish versions 13 and 14 in either order, and Redis may
//! drop messages while it restarts. Redis is therefore only the fast path:
//! each change's broadcast is also stored in the transaction that made it, and
//! `core::sequencer` fills what arrives early from there. All deliveries, this
//! node's own commits included, go through one task, which hands them to the
//! sequencer in order. A catch-up every second, and at once after Redis comes
//! back, compares every local room with the stored version, so a change whose
//! Redis message was lost still arrives within a second. Presence is shared
//! too: each node's connections per view, and a heartbeat key per node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::core::broker::Broker;
use crate::core::context::Parts;
use crate::core::delivery::Broadcast;
use crate::core::hub::{Hub, Summary};
use crate::core::sequencer::Sequencer;
use crate::core::shutdown::spawn_until;
use crate::domain::error::Error;

/// How often every local room is compared with the stored version, so that a
/// broadcast lost on Redis is delivered from the database within this time.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Pause between attempts to reach Redis.
const RECONNECT: Duration = Duration::from_millis(500);
/// The subscriber pings Redis this often, so a half-open connection is noticed.
const PING: Duration = Duration::from_secs(2);
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

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

/// What the delivery task handles, in arrival order.
enum Event {
    /// A view's broadcasts, this node's own commits or another node's (the
    /// skipped connection already resolved for this node).
    Changes {
        view: Arc<str>,
        frames: Vec<Broadcast>,
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

/// This node's side of the cluster.
pub struct Redis {
    /// Random per process: tells our own messages from other nodes' ones.
    node_id: Arc<str>,
    events: mpsc::UnboundedSender<Event>,
    publish: mpsc::UnboundedSender<String>,
    subscribed: Arc<AtomicBool>,
    publishing: Arc<AtomicBool>,
    sharing: Sharing,
}

impl Redis {
    /// Starts the subscriber, the publisher, presence sharing and the
    /// delivery task. Fails only on a malformed URL: an unreachable Redis is
    /// retried in the background while the node serves its own connections.
    pub fn start(url: &str, parts: &Parts) -> Result<Arc<Redis>, Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Internal(format!("invalid --redis-url: {e}")))?;
        let prefix = &parts.config.redis_prefix;
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
            hub: parts.hub.clone(),
            reload: reload.clone(),
            window: parts.config.presence_batch,
        };
        let sequencer = parts.sequencer(Some(node_id.clone()));
        let broker = Arc::new(Redis {
            node_id: node_id.clone(),
            events: events.clone(),
            publish,
            subscribed: Arc::new(AtomicBool::new(false)),
            publishing: Arc::new(AtomicBool::new(false)),
            sharing: sharing.clone(),
        });
        parts.hub.share_presence();
        let shutdown = &parts.shutdown;
        spawn_until(
            shutdown.clone(),
            subscribe(
                client.clone(),
                channel.clone(),
                sequencer.clone(),
                events,
                broker.subscribed.clone(),
                reload,
            ),
        );
        spawn_until(shutdown.clone(), share_presence(sharing));
        spawn_until(
            shutdown.clone(),
            publisher(client, channel, publish_rx, broker.publishing.clone()),
        );
        spawn_until(
            shutdown.clone(),
            in_order(node_id, sequencer, parts.hub.clone(), events_rx),
        );
        Ok(broker)
    }

    fn publish(&self, envelope: &Envelope) {
        if let Ok(text) = serde_json::to_string(envelope) {
            let _ = self.publish.send(text);
        }
    }
}

impl Broker for Redis {
    fn node_id(&self) -> Option<Arc<str>> {
        Some(self.node_id.clone())
    }

    /// This node's commits: published to the others, and delivered locally
    /// through the delivery task (so Redis being down does not hold them up),
    /// in order with the other nodes' changes.
    fn deliver(&self, view_id: Arc<str>, frames: Vec<Broadcast>) {
        for frame in &frames {
            self.publish(&Envelope {
                node: self.node_id.to_string(),
                view: view_id.to_string(),
                version: frame.version,
                conn: frame.except,
                message: frame.msg.to_text().unwrap_or_default().to_string(),
                summary: None,
            });
        }
        let _ = self.events.send(Event::Changes {
            view: view_id,
            frames,
        });
    }

    /// The answer to it is a controller's `sync-response`, which reaches
    /// every node as a broadcast and clears that view's waiting requesters
    /// there, or, after the timeout, the server's own from the requester's
    /// node.
    fn request_sync(&self, view_id: &str, forward: &Message) {
        let Ok(message) = forward.to_text() else {
            return;
        };
        self.publish(&Envelope {
            node: self.node_id.to_string(),
            view: view_id.to_string(),
            version: 0,
            conn: None,
            message: message.to_string(),
            summary: None,
        });
    }

    /// Up when this node can reach Redis both ways.
    fn reachable(&self) -> Option<bool> {
        Some(self.subscribed.load(Ordering::Acquire) && self.publishing.load(Ordering::Acquire))
    }

    /// Shares this node's (now empty) presence and deletes its heartbeat key,
    /// so the others need not wait for it to expire.
    fn goodbye(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
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
        })
    }
}

/// Keeps one subscription to the channel, reconnecting for as long as it
/// takes; every (re)subscription is followed by a catch-up.
async fn subscribe(
    client: redis::Client,
    channel: String,
    sequencer: Sequencer,
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
                                    let frame = Broadcast {
                                        except: sequencer.except(&e.node, e.conn),
                                        msg: Message::text(e.message),
                                        version: e.version,
                                    };
                                    let _ = events.send(Event::Changes {
                                        view: e.view.into(),
                                        frames: vec![frame],
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

/// Hands every change to the sequencer in version order, and applies the
/// other nodes' request-syncs and presence.
async fn in_order(
    node_id: Arc<str>,
    sequencer: Sequencer,
    hub: Arc<Hub>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
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
                let mut changes: Vec<(Arc<str>, Broadcast)> = Vec::new();
                for event in batch.drain(..) {
                    match event {
                        Event::Changes { view, frames } => {
                            changes.extend(frames.into_iter().map(|f| (view.clone(), f)));
                        }
                        Event::RequestSync { view, node, message } => {
                            // This node's own controllers got it directly; the
                            // others' forwards share its window (SPEC §3.1).
                            if node != *node_id {
                                hub.remote_request_sync(&view, Message::text(message));
                            }
                        }
                        Event::Presence { view, node, summary } => {
                            if node != *node_id {
                                hub.apply_remote(&view, &node, Some(summary));
                            }
                        }
                        Event::CatchUp => catch_up = true,
                    }
                }
                changes.sort_by(|a, b| (&a.0, a.1.version).cmp(&(&b.0, b.1.version)));
                // Our own commits come back from Redis too.
                changes.dedup_by(|a, b| a.0 == b.0 && a.1.version == b.1.version);
                let mut changes = changes.into_iter().peekable();
                while let Some((view, first)) = changes.next() {
                    let mut frames = vec![first];
                    while let Some((_, frame)) = changes.next_if(|(v, _)| *v == view) {
                        frames.push(frame);
                    }
                    sequencer.deliver(&view, &frames).await;
                }
                if catch_up {
                    sequencer.catch_up().await;
                }
            }
            _ = tick.tick() => sequencer.catch_up().await,
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

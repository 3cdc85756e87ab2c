//! Presence across nodes: each node's connections per view, kept in the hash
//! `<prefix>:presence:<view>` and published on the one presence channel every
//! node subscribes to (presence is counted over all nodes, the per-user limit
//! too, so every node needs every view's summaries); a heartbeat key per node,
//! and the connections of nodes whose heartbeat expired dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::wire::{Envelope, REDIS_TIMEOUT};
use crate::core::hub::{Hub, Summary};

/// A node's heartbeat key lives this long: a node killed without a goodbye
/// leaves everyone's presence within about this time plus [`BEAT`].
const NODE_TTL: Duration = Duration::from_secs(5);
/// How often a node refreshes its heartbeat and looks for dead nodes.
const BEAT: Duration = Duration::from_millis(1500);

#[derive(Clone)]
pub(super) struct Sharing {
    pub(super) client: redis::Client,
    pub(super) prefix: String,
    pub(super) channel: String,
    pub(super) node_id: Arc<str>,
    pub(super) hub: Arc<Hub>,
    /// Set by the subscriber after every (re)subscription.
    pub(super) reload: Arc<AtomicBool>,
    /// The presence batching window: local changes go out at most this often.
    pub(super) window: Duration,
}

/// Tells the other nodes about this node's connections (one summary per
/// changed view per window, kept in the hash `<prefix>:presence:<view>` and
/// published), keeps this node's heartbeat key alive, and drops the
/// connections of nodes whose heartbeat expired.
pub(super) async fn share_presence(s: Sharing) {
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

pub(super) async fn share_once(
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

//! Forwarded `POST …/messages` between nodes (SPEC §7 without sticky
//! sessions, see `core::forward`): a request goes out on the holder's node
//! channel `<prefix>:node:<nodeId>`, its answer comes back on the sender's.
//!
//! PUBLISH says how many subscribers got it: none means the holder is gone
//! (its subscriber connection closed with it), answered at once as an
//! unknown stream. Otherwise the answer is awaited for [`FORWARD_TIMEOUT`],
//! then 503. What waits here is bounded by [`MAX_PENDING`]; each forward is
//! one POST that passed the token and access checks on the receiving node,
//! its body already bounded by `--max-message-bytes`, and the holder counts
//! it against the stream's rate as a local POST.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::wire::{Channels, REDIS_TIMEOUT};
use crate::core::forward::{ForwardReply, ForwardedPost, PostHandler};
use crate::core::lock::lock;
use crate::domain::error::Error;

/// How long a node waits for the holder's answer.
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwards waiting for an answer, at most; more are refused with 503.
const MAX_PENDING: usize = 10_000;

/// What travels on a node's channel.
#[derive(Serialize, Deserialize)]
enum NodeMessage {
    Post {
        from: String,
        id: u64,
        post: ForwardedPost,
    },
    Reply {
        id: u64,
        reply: ForwardReply,
    },
}

pub(super) struct Forwarder {
    node_id: Arc<str>,
    channels: Channels,
    client: redis::Client,
    /// Answers go out in order with everything else this node publishes.
    publish: mpsc::UnboundedSender<(String, String)>,
    pending: Mutex<HashMap<u64, oneshot::Sender<ForwardReply>>>,
    next: AtomicU64,
    /// A connection for the forwards' own PUBLISH, whose count is needed.
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    handler: OnceLock<PostHandler>,
}

/// Forgets a forward however its wait ends.
struct Waiting<'a> {
    forwarder: &'a Forwarder,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.forwarder.pending).remove(&self.id);
    }
}

impl Forwarder {
    pub(super) fn new(
        node_id: Arc<str>,
        channels: Channels,
        client: redis::Client,
        publish: mpsc::UnboundedSender<(String, String)>,
    ) -> Forwarder {
        Forwarder {
            node_id,
            channels,
            client,
            publish,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            conn: tokio::sync::Mutex::new(None),
            handler: OnceLock::new(),
        }
    }

    pub(super) fn serve(&self, handler: PostHandler) {
        let _ = self.handler.set(handler);
    }

    /// Sends `post` to `node` and waits for its answer.
    pub(super) async fn forward(
        &self,
        node: &str,
        post: ForwardedPost,
    ) -> Result<ForwardReply, Error> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                return Err(Error::Unavailable(
                    "too many requests waiting for other nodes",
                ));
            }
            pending.insert(id, tx);
        }
        let _waiting = Waiting {
            forwarder: self,
            id,
        };
        let message = NodeMessage::Post {
            from: self.node_id.to_string(),
            id,
            post,
        };
        let text = serde_json::to_string(&message)
            .map_err(|e| Error::Internal(format!("encoding a forwarded POST: {e}")))?;
        let receivers = self
            .publish_counted(&self.channels.node(node), text)
            .await?;
        if receivers == 0 {
            return Ok(ForwardReply::NotHeld);
        }
        match tokio::time::timeout(FORWARD_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(Error::Unavailable(
                "the node holding this stream did not answer in time; the message may or may not have been applied",
            )),
        }
    }

    /// PUBLISH on the forwards' connection; how many subscribers got it.
    async fn publish_counted(&self, channel: &str, text: String) -> Result<u64, Error> {
        let unreachable = || Error::Unavailable("the other nodes cannot be reached (Redis)");
        let mut slot = self.conn.lock().await;
        if slot.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT));
            match self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(conn) => *slot = Some(conn),
                Err(e) => {
                    log::warn!("redis: cannot connect to forward a POST: {e}");
                    return Err(unreachable());
                }
            }
        }
        let mut conn = slot.clone().ok_or_else(unreachable)?;
        drop(slot);
        let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(text)
            .query_async(&mut conn)
            .await;
        sent.map_err(|e| {
            log::warn!("redis: forwarding a POST failed: {e}");
            if let Ok(mut slot) = self.conn.try_lock() {
                *slot = None;
            }
            unreachable()
        })
    }

    /// A message on this node's channel: another node's POST to run here,
    /// or the answer to one of ours.
    pub(super) fn received(&self, text: &str) {
        match serde_json::from_str::<NodeMessage>(text) {
            Ok(NodeMessage::Post { from, id, post }) => {
                let handler = self.handler.get().cloned();
                let channel = self.channels.node(&from);
                let publish = self.publish.clone();
                tokio::spawn(async move {
                    let reply = match handler {
                        Some(handler) => handler(post).await,
                        None => ForwardReply::NotHeld,
                    };
                    if let Ok(text) = serde_json::to_string(&NodeMessage::Reply { id, reply }) {
                        let _ = publish.send((channel, text));
                    }
                });
            }
            Ok(NodeMessage::Reply { id, reply }) => {
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            Err(e) => log::warn!("redis: unreadable message on this node's channel: {e}"),
        }
    }
}

//! Several nodes on one database (`--redis-url`): each broadcast is published
//! on its view's Redis channel, and each node delivers every view's versions
//! to its own connections strictly in order, with no gaps and no duplicates.
//!
//! Channels (`<prefix>` is `--redis-prefix`):
//! - `<prefix>:view:<viewId>`: the view's broadcasts and request-syncs. A node
//!   subscribes only to the views it has connections to (`subscriptions.rs`),
//!   so it receives nothing of the others.
//! - `<prefix>:presence`: every node's presence summaries (`presence.rs`);
//!   every node needs them, as presence and the per-user limit span nodes.
//! - `<prefix>:node:<nodeId>`: POSTs forwarded to the node holding their SSE
//!   stream, and the answers (`forward.rs`).
//!
//! Two nodes may publish versions 13 and 14 in either order, Redis may drop
//! messages while it restarts, and a node hears nothing of a view until its
//! subscription is confirmed. Redis is therefore only the fast path: each
//! change's broadcast is also stored in the transaction that made it, and
//! `core::sequencer` fills what arrives early from there. All deliveries,
//! this node's own commits included, go through one task, which hands them to
//! the sequencer in order. A catch-up compares local rooms with the stored
//! versions: every second (a lost message arrives within a second), at once
//! for a view whose subscription was just confirmed (what was committed
//! before it went live), and at once for every room after Redis comes back.

mod forward;
mod presence;
mod subscriptions;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::core::broker::Broker;
use crate::core::context::Parts;
use crate::core::delivery::Broadcast;
use crate::core::forward::{ForwardReply, ForwardedPost, PostHandler};
use crate::core::hub::Hub;
use crate::core::sequencer::Sequencer;
use crate::core::shutdown::spawn_until;
use crate::domain::error::Error;
use presence::Sharing;
use wire::{Channels, Envelope, Event, RECONNECT, REDIS_TIMEOUT};

/// This node's side of the cluster.
pub struct Redis {
    /// Random per process: tells our own messages from other nodes' ones.
    node_id: Arc<str>,
    channels: Channels,
    events: mpsc::UnboundedSender<Event>,
    publish: mpsc::UnboundedSender<(String, String)>,
    subscribed: Arc<AtomicBool>,
    publishing: Arc<AtomicBool>,
    sharing: Sharing,
    forwarder: Arc<forward::Forwarder>,
}

impl Redis {
    /// Starts the subscriber, the publisher, presence sharing and the
    /// delivery task. Fails only on a malformed URL: an unreachable Redis is
    /// retried in the background while the node serves its own connections.
    pub fn start(url: &str, parts: &Parts) -> Result<Arc<Redis>, Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Internal(format!("invalid --redis-url: {e}")))?;
        let channels = Channels {
            prefix: parts.config.redis_prefix.clone(),
        };
        let node_id: Arc<str> = crate::core::session::new_connection_id().into();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (publish, publish_rx) = mpsc::unbounded_channel();
        let reload = Arc::new(AtomicBool::new(true));
        let sharing = Sharing {
            client: client.clone(),
            prefix: channels.prefix.clone(),
            channel: channels.presence(),
            node_id: node_id.clone(),
            hub: parts.hub.clone(),
            reload: reload.clone(),
            window: parts.config.presence_batch,
        };
        let sequencer = parts.sequencer(Some(node_id.clone()));
        let forwarder = Arc::new(forward::Forwarder::new(
            node_id.clone(),
            channels.clone(),
            client.clone(),
            publish.clone(),
        ));
        let broker = Arc::new(Redis {
            node_id: node_id.clone(),
            channels: channels.clone(),
            events: events.clone(),
            publish,
            subscribed: Arc::new(AtomicBool::new(false)),
            publishing: Arc::new(AtomicBool::new(false)),
            sharing: sharing.clone(),
            forwarder: forwarder.clone(),
        });
        parts.hub.share_presence();
        parts.hub.watch_rooms();
        let shutdown = &parts.shutdown;
        spawn_until(
            shutdown.clone(),
            subscriptions::run(subscriptions::Subscriber {
                client: client.clone(),
                channels,
                node_id: node_id.clone(),
                forwarder,
                hub: parts.hub.clone(),
                metrics: parts.metrics.clone(),
                sequencer: sequencer.clone(),
                events,
                up: broker.subscribed.clone(),
                reload,
            }),
        );
        spawn_until(shutdown.clone(), presence::share_presence(sharing));
        spawn_until(
            shutdown.clone(),
            publisher(client, publish_rx, broker.publishing.clone()),
        );
        spawn_until(
            shutdown.clone(),
            in_order(
                node_id,
                sequencer,
                parts.hub.clone(),
                events_rx,
                parts.config.redis_catch_up,
            ),
        );
        Ok(broker)
    }

    fn publish(&self, envelope: &Envelope) {
        if let Ok(text) = serde_json::to_string(envelope) {
            let _ = self
                .publish
                .send((self.channels.view(&envelope.view), text));
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
    /// every node with a connection to the view as a broadcast and clears
    /// that view's waiting requesters there, or, after the timeout, the
    /// server's own from the requester's node.
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
                presence::share_once(s, &mut c, &mut Some(tokio::time::Instant::now())).await?;
                redis::cmd("DEL")
                    .arg(format!("{}:node:{}", s.prefix, s.node_id))
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        })
    }

    fn forward_post(
        &self,
        node: &str,
        post: ForwardedPost,
    ) -> BoxFuture<'_, Result<ForwardReply, Error>> {
        let node = node.to_string();
        Box::pin(async move { self.forwarder.forward(&node, post).await })
    }

    fn serve_posts(&self, handler: PostHandler) {
        self.forwarder.serve(handler);
    }
}

/// Publishes in order on one connection. While Redis is unreachable messages
/// are dropped, not queued: other nodes' catch-up reads them from the database.
async fn publisher(
    client: redis::Client,
    mut rx: mpsc::UnboundedReceiver<(String, String)>,
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
        while let Some((channel, text)) = rx.recv().await {
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
    every: Duration,
) {
    // `Config::redis_catch_up`: a broadcast lost on Redis is delivered from
    // the database within this time.
    let mut tick = tokio::time::interval(every);
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
                let mut catch_up_views = Vec::new();
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
                        Event::CatchUpViews(views) => catch_up_views.extend(views),
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
                } else if !catch_up_views.is_empty() {
                    sequencer.catch_up_views(&catch_up_views).await;
                }
            }
            _ = tick.tick() => sequencer.catch_up().await,
        }
    }
}

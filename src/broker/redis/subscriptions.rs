//! The subscriber: one Redis pub/sub connection carrying the presence channel
//! and the channel of every view this node has a room for, kept in step with
//! the rooms, reconnected for as long as it takes.
//!
//! A view's channel is subscribed when its first local connection joins and
//! unsubscribed [`LINGER`] after its last one left, so a reconnect storm
//! (every tab of a view reconnecting at once) costs no churn. Whatever
//! changed meanwhile goes out as one SUBSCRIBE and one UNSUBSCRIBE, one
//! after the other on this task, so the commands sent are bounded by Redis's
//! round trips, not by how fast connections come and go, and each names
//! only views the joiner's handshake found and was allowed into. Channels
//! held are at most the rooms plus the views left within `LINGER`.
//!
//! Until Redis confirms a SUBSCRIBE, the view's broadcasts are not received.
//! So each confirmation is followed by a catch-up of exactly those views
//! (stored version against the room's, `Sequencer::catch_up_views`): a
//! change committed between a joiner's snapshot and the subscription going
//! live is filled from the database at once. After a reconnection every
//! needed view is subscribed again, then every room caught up.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::forward::Forwarder;
use super::wire::{Channels, Envelope, Event, RECONNECT, REDIS_TIMEOUT};
use crate::core::delivery::Broadcast;
use crate::core::hub::Hub;
use crate::core::metrics::Metrics;
use crate::core::sequencer::Sequencer;

/// How long a view's channel stays subscribed after its last local
/// connection left.
const LINGER: Duration = Duration::from_secs(5);
/// The subscriber pings Redis this often, so a half-open connection is
/// noticed; it also looks at the rooms then, whatever woke it before.
const PING: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHUNK: usize = 500;

pub(super) struct Subscriber {
    pub client: redis::Client,
    pub channels: Channels,
    pub node_id: Arc<str>,
    /// Takes what arrives on this node's own channel.
    pub forwarder: Arc<Forwarder>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub sequencer: Sequencer,
    pub events: mpsc::UnboundedSender<Event>,
    /// Up while subscribed (for `/health`).
    pub up: Arc<AtomicBool>,
    /// Set after every (re)subscription: presence is read again.
    pub reload: Arc<AtomicBool>,
}

/// The views subscribed on the current connection.
struct Held {
    views: HashSet<Arc<str>>,
    /// Subscribed views with no room, and when to let them go.
    lingering: HashMap<Arc<str>, Instant>,
}

pub(super) async fn run(s: Subscriber) {
    let mut first = true;
    loop {
        match tokio::time::timeout(REDIS_TIMEOUT, connect(&s)).await {
            Ok(Ok((sink, stream, views))) => {
                s.up.store(true, Ordering::Release);
                if !first {
                    log::info!("redis: subscribed again ({} view(s))", views.len());
                }
                first = false;
                let mut held = Held {
                    views,
                    lingering: HashMap::new(),
                };
                s.metrics
                    .redis_subscribed_views
                    .set(held.views.len() as i64);
                let _ = s.events.send(Event::CatchUp);
                s.reload.store(true, Ordering::Release);
                serve(&s, sink, stream, &mut held).await;
                log::warn!("redis: subscription lost; reconnecting");
            }
            Ok(Err(e)) => log::warn!("redis: cannot subscribe: {e}"),
            Err(_) => log::warn!("redis: cannot subscribe: timed out"),
        }
        s.up.store(false, Ordering::Release);
        s.metrics.redis_subscribed_views.set(0);
        tokio::time::sleep(RECONNECT).await;
    }
}

/// A new connection, subscribed to presence and to every room's view.
async fn connect(
    s: &Subscriber,
) -> redis::RedisResult<(
    redis::aio::PubSubSink,
    redis::aio::PubSubStream,
    HashSet<Arc<str>>,
)> {
    let (mut sink, stream) = s.client.get_async_pubsub().await?.split();
    sink.subscribe(&[s.channels.presence(), s.channels.node(&s.node_id)])
        .await?;
    // Changes marked before this are in the room list; later ones are
    // handled by `serve`.
    s.hub.take_room_changes();
    let views: Vec<Arc<str>> = s.hub.room_ids();
    subscribe(&mut sink, &s.channels, &views).await?;
    Ok((sink, stream, views.into_iter().collect()))
}

async fn subscribe(
    sink: &mut redis::aio::PubSubSink,
    channels: &Channels,
    views: &[Arc<str>],
) -> redis::RedisResult<()> {
    for chunk in views.chunks(CHUNK) {
        let names: Vec<String> = chunk.iter().map(|v| channels.view(v)).collect();
        sink.subscribe(names).await?;
    }
    Ok(())
}

async fn unsubscribe(
    sink: &mut redis::aio::PubSubSink,
    channels: &Channels,
    views: &[Arc<str>],
) -> redis::RedisResult<()> {
    for chunk in views.chunks(CHUNK) {
        let names: Vec<String> = chunk.iter().map(|v| channels.view(v)).collect();
        sink.unsubscribe(names).await?;
    }
    Ok(())
}

/// Reads messages and keeps the subscriptions in step with the rooms until
/// the connection fails.
async fn serve(
    s: &Subscriber,
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
    held: &mut Held,
) {
    let mut ping = tokio::time::interval(PING);
    ping.tick().await;
    loop {
        let next_release = held.lingering.values().min().copied();
        let release = async move {
            match next_release {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return };
                received(s, &msg);
                Ok(())
            }
            _ = s.hub.rooms_changed() => follow_rooms(s, &mut sink, held).await,
            _ = release => release_due(s, &mut sink, held).await,
            _ = ping.tick() => {
                let pong = tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>()).await;
                match pong {
                    Ok(Ok(_)) => follow_rooms(s, &mut sink, held).await,
                    _ => return,
                }
            }
        };
        if step.is_err() {
            return;
        }
        s.metrics
            .redis_subscribed_views
            .set(held.views.len() as i64);
    }
}

/// Subscribes to the views that gained a room (then catches them up), and
/// starts the linger of those that lost theirs.
async fn follow_rooms(
    s: &Subscriber,
    sink: &mut redis::aio::PubSubSink,
    held: &mut Held,
) -> Result<(), ()> {
    let now = Instant::now();
    let mut new = Vec::new();
    for view in s.hub.take_room_changes() {
        if s.hub.has_room(&view) {
            if held.lingering.remove(&view).is_none() && !held.views.contains(&view) {
                new.push(view);
            }
        } else if held.views.contains(&view) {
            held.lingering.entry(view).or_insert(now + LINGER);
        }
    }
    if new.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(REDIS_TIMEOUT, subscribe(sink, &s.channels, &new)).await {
        Ok(Ok(())) => {
            held.views.extend(new.iter().cloned());
            let _ = s.events.send(Event::CatchUpViews(new));
            Ok(())
        }
        Ok(Err(e)) => {
            log::warn!("redis: subscribing failed: {e}");
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Unsubscribes from the views whose linger is over and that still have no
/// room (one that has one again is kept, and its change is a no-op).
async fn release_due(
    s: &Subscriber,
    sink: &mut redis::aio::PubSubSink,
    held: &mut Held,
) -> Result<(), ()> {
    let now = Instant::now();
    let due: Vec<Arc<str>> = held
        .lingering
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(view, _)| view.clone())
        .collect();
    let mut gone = Vec::new();
    for view in due {
        held.lingering.remove(&view);
        if !s.hub.has_room(&view) {
            gone.push(view);
        }
    }
    if gone.is_empty() {
        return Ok(());
    }
    for view in &gone {
        held.views.remove(view);
    }
    match tokio::time::timeout(REDIS_TIMEOUT, unsubscribe(sink, &s.channels, &gone)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// One message from Redis, handed to the delivery task.
fn received(s: &Subscriber, msg: &redis::Msg) {
    let channel = msg.get_channel_name();
    let kind = if s.channels.view_of(channel).is_some() {
        "view"
    } else if channel == s.channels.presence() {
        "presence"
    } else {
        "node"
    };
    s.metrics.redis_received.with_label_values(&[kind]).inc();
    let Ok(text) = msg.get_payload::<String>() else {
        return;
    };
    if kind == "node" {
        s.forwarder.received(&text);
        return;
    }
    match serde_json::from_str::<Envelope>(&text) {
        Ok(Envelope {
            summary: Some(summary),
            node,
            view,
            ..
        }) => {
            let _ = s.events.send(Event::Presence {
                view,
                node,
                summary,
            });
        }
        Ok(e) if e.version > 0 => {
            let frame = Broadcast {
                except: s.sequencer.except(&e.node, e.conn),
                msg: Message::text(e.message),
                version: e.version,
            };
            let _ = s.events.send(Event::Changes {
                view: e.view.into(),
                frames: vec![frame],
            });
        }
        Ok(e) => {
            let _ = s.events.send(Event::RequestSync {
                view: e.view,
                node: e.node,
                message: e.message,
            });
        }
        Err(e) => log::warn!("redis: unreadable message on {channel}: {e}"),
    }
}

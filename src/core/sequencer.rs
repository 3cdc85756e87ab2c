//! The one path from a committed broadcast to this node's connections,
//! whichever broker carried it: each room's last delivered version, the
//! in-order check (`core::delivery`), gaps filled from the stored events,
//! and the resync close when they cannot be.
//!
//! Versions are assigned by the store's transaction. On a single node the
//! writer hands every committed batch over in commit order, so nothing can be
//! missing and a version that skips ahead (a room created after some commit,
//! or a row another tool wrote) is delivered as it is. With other nodes,
//! versions 13 and 14 may arrive in either order and the broker may lose
//! some; each change is then stored with its broadcast, and a version that
//! arrives early makes the node read the missing ones from the store (they
//! committed before it, since writes serialize on the database).

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use crate::core::delivery::{Broadcast, Offered};
use crate::core::hub::{CloseRequest, Hub};
use crate::core::metrics::Metrics;
use crate::store::Storage;

/// Sent to a room's connections when versions it needs are no longer stored
/// (more than `store::EVENTS_KEPT` behind, or written by a node without a
/// broker): they reconnect and resynchronise from `connected`.
const RESYNC: CloseRequest = CloseRequest {
    code: 1013,
    reason: "try again later",
};

/// Cheap to clone.
#[derive(Clone)]
pub struct Sequencer {
    hub: Arc<Hub>,
    store: Storage,
    metrics: Arc<Metrics>,
    /// This node's id when it is one of several: gaps are then filled from
    /// the stored events, which name the node that committed them.
    node: Option<Arc<str>>,
}

impl Sequencer {
    pub fn new(
        hub: Arc<Hub>,
        store: Storage,
        metrics: Arc<Metrics>,
        node: Option<Arc<str>>,
    ) -> Sequencer {
        Sequencer {
            hub,
            store,
            metrics,
            node,
        }
    }

    /// Queues, under the room's lock, what continues the room's versions.
    /// Synchronous, so a single node's writer delivers its batches itself.
    /// `None` when this node has no connection to the view: nobody here to
    /// tell, and a later joiner reads the snapshot.
    pub fn offer(&self, view_id: &str, frames: &[Broadcast]) -> Option<Offered> {
        let offered = self.hub.deliver(view_id, frames, self.node.is_some())?;
        self.metrics.deliveries.inc_by(offered.queued as u64);
        Some(offered)
    }

    /// [`Sequencer::offer`], filling every gap from the stored events first.
    /// `frames` are in increasing version order.
    pub async fn deliver(&self, view_id: &str, frames: &[Broadcast]) {
        let mut rest = frames;
        while let Some(Offered { gap: Some(gap), .. }) = self.offer(view_id, rest) {
            self.fill(view_id, gap.from, gap.to).await;
            rest = &rest[gap.at..];
        }
    }

    /// The connection a broadcast skips: the sender's, when it is on this node.
    pub fn except(&self, node: &str, conn: Option<u64>) -> Option<u64> {
        match &self.node {
            Some(me) if **me == *node => conn,
            _ => None,
        }
    }

    /// Delivers `from..=to` from the stored events. Versions that are not
    /// stored cannot be delivered in order: the room's sockets resynchronise,
    /// and the room continues from `to`.
    async fn fill(&self, view_id: &str, from: i64, to: i64) {
        let rows = match self.store.events_between(view_id, from, to).await {
            Ok(rows) => rows,
            Err(e) => {
                e.log("reading stored broadcasts");
                Vec::new()
            }
        };
        log::debug!("{view_id}: versions {from}..={to} filled from the database");
        let frames: Vec<Broadcast> = rows
            .into_iter()
            .map(|row| Broadcast {
                except: self.except(&row.node, row.conn),
                msg: Message::text(row.message),
                version: row.version,
            })
            .collect();
        let Some(offered) = self.offer(view_id, &frames) else {
            return;
        };
        if offered.last < to {
            let closed = self.hub.resync_room(view_id, to, RESYNC);
            log::warn!("versions {from}..={to} of {view_id} are not stored: {closed} connection(s) resynchronise");
        }
    }

    /// Brings every local room up to the stored version, so that a change
    /// whose broker message was lost still arrives.
    pub async fn catch_up(&self) {
        let rooms: Vec<Arc<str>> = self
            .hub
            .room_versions()
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        self.catch_up_views(&rooms).await;
    }

    /// [`Sequencer::catch_up`] for some views: those whose broker
    /// subscription has just been confirmed, so that a change committed
    /// elsewhere before it was (and after the joiner's snapshot) is
    /// delivered now rather than at the next periodic catch-up.
    pub async fn catch_up_views(&self, views: &[Arc<str>]) {
        let ids: Vec<String> = views
            .iter()
            .filter(|v| self.hub.has_room(v))
            .map(|v| v.to_string())
            .collect();
        if ids.is_empty() {
            return;
        }
        let stored = match self.store.versions(ids).await {
            Ok(stored) => stored,
            Err(e) => {
                e.log("catching up with stored versions");
                return;
            }
        };
        for (view_id, version) in stored {
            if let Some(last) = self.hub.last_version(&view_id) {
                if version > last {
                    self.fill(&view_id, last + 1, version).await;
                }
            }
        }
    }
}

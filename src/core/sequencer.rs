//! The one path from a committed broadcast to this node's connections,
//! whichever broker carried it: each room's last delivered version, the
//! in-order check, gaps filled from the stored events, and the resync close
//! when they cannot be.
//!
//! Versions are assigned by the store's transaction. On a single node the
//! writer hands every committed batch over in commit order, so nothing can be
//! missing and a version that skips ahead (a room created after some commit,
//! or a row another tool wrote) is delivered as it is. With other nodes,
//! versions 13 and 14 may arrive in either order and the broker may lose
//! some; each change is then stored with its broadcast, and a version that
//! arrives early makes the node read the missing ones from the store (they
//! committed before it, since writes serialize on the database).

use std::ops::Range;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use crate::core::hub::{Broadcast, CloseRequest, Hub};
use crate::core::metrics::Metrics;
use crate::store::Storage;

/// Sent to a room's connections when versions it needs are no longer stored
/// (more than `store::EVENTS_KEPT` behind, or written by a node without a
/// broker): they reconnect and resynchronise from `connected`.
const RESYNC: CloseRequest = CloseRequest {
    code: 1013,
    reason: "try again later",
};

/// Versions `from..=to` are missing before `frames[at]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub at: usize,
    pub from: i64,
    pub to: i64,
}

/// What one offer to a room did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    /// Frames queued, over all connections.
    pub queued: usize,
    /// The room's last delivered version afterwards.
    pub last: i64,
    /// Where delivery stopped, when gaps are filled.
    pub gap: Option<Gap>,
}

/// Which of a view's `frames` (in increasing version order) a room whose
/// last delivered version is `last` takes now: versions it already has are
/// skipped, and, when gaps are filled, the run stops before a version that
/// skips ahead. The hub applies this under the room's lock.
pub(crate) fn in_order(
    last: i64,
    frames: &[Broadcast],
    fill_gaps: bool,
) -> (Range<usize>, Option<Gap>) {
    let start = frames.partition_point(|f| f.version <= last);
    if !fill_gaps {
        return (start..frames.len(), None);
    }
    let mut prev = last;
    for (i, frame) in frames.iter().enumerate().skip(start) {
        if frame.version != prev + 1 {
            let gap = Gap {
                at: i,
                from: prev + 1,
                to: frame.version - 1,
            };
            return (start..i, Some(gap));
        }
        prev = frame.version;
    }
    (start..frames.len(), None)
}

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
        let rooms = self.hub.room_versions();
        if rooms.is_empty() {
            return;
        }
        let ids: Vec<String> = rooms.iter().map(|(v, _)| v.to_string()).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(versions: &[i64]) -> Vec<Broadcast> {
        versions
            .iter()
            .map(|&version| Broadcast {
                msg: Message::text("x"),
                version,
                except: None,
            })
            .collect()
    }

    #[test]
    fn versions_already_delivered_are_skipped() {
        assert_eq!(in_order(5, &frames(&[4, 5, 6, 7]), true), (2..4, None));
        assert_eq!(in_order(5, &frames(&[4, 5]), false), (2..2, None));
    }

    #[test]
    fn a_version_that_skips_ahead_stops_the_run_when_gaps_are_filled() {
        let gap = Gap {
            at: 2,
            from: 8,
            to: 9,
        };
        assert_eq!(
            in_order(5, &frames(&[6, 7, 10, 11]), true),
            (0..2, Some(gap))
        );
        assert_eq!(
            in_order(5, &frames(&[8]), true),
            (
                0..0,
                Some(Gap {
                    at: 0,
                    from: 6,
                    to: 7
                })
            )
        );
        // One writer in commit order: nothing between can be missing.
        assert_eq!(in_order(5, &frames(&[6, 7, 10, 11]), false), (0..4, None));
    }
}

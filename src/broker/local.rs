//! One node, no one else to tell: a committed batch's broadcasts go straight
//! into this node's rooms, from the writer's delivery task.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_tungstenite::tungstenite::Message;

use crate::core::broker::Broker;
use crate::core::context::Parts;
use crate::core::delivery::Broadcast;
use crate::core::sequencer::Sequencer;

pub struct Local {
    sequencer: Sequencer,
}

impl Local {
    pub fn new(parts: &Parts) -> Local {
        Local {
            sequencer: parts.sequencer(None),
        }
    }
}

impl Broker for Local {
    fn node_id(&self) -> Option<Arc<str>> {
        None
    }

    /// Synchronous: no task hop and no extra wake-up between a commit and
    /// its fan-out.
    fn deliver(&self, view_id: Arc<str>, frames: Vec<Broadcast>) {
        self.sequencer.offer(&view_id, &frames);
    }

    fn request_sync(&self, _view_id: &str, _forward: &Message) {}

    fn reachable(&self) -> Option<bool> {
        None
    }

    fn goodbye(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

//! What the Redis broker's files share, below all of them: the channel
//! names of one cluster, what travels on the view and presence channels,
//! what the delivery task is handed, and the timeouts.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::delivery::Broadcast;
use crate::core::hub::Summary;

/// Pause between attempts to reach Redis.
pub(super) const RECONNECT: Duration = Duration::from_millis(500);
pub(super) const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The channel names of one cluster (one `--redis-prefix`).
#[derive(Clone)]
pub(super) struct Channels {
    pub(super) prefix: String,
}

impl Channels {
    pub(super) fn view(&self, view_id: &str) -> String {
        format!("{}:view:{view_id}", self.prefix)
    }

    /// The view a view channel is for.
    pub(super) fn view_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":view:")
    }

    pub(super) fn presence(&self) -> String {
        format!("{}:presence", self.prefix)
    }

    pub(super) fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.prefix)
    }
}

/// What travels on a view's channel and the presence channel.
#[derive(Serialize, Deserialize)]
pub(super) struct Envelope {
    pub(super) node: String,
    pub(super) view: String,
    /// The change's version; 0 for a forwarded `request-sync`.
    #[serde(default)]
    pub(super) version: i64,
    /// The sender's hub key on `node`, left out of the delivery.
    #[serde(default)]
    pub(super) conn: Option<u64>,
    #[serde(default)]
    pub(super) message: String,
    /// Set on presence news: the sending node's connections to `view`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) summary: Option<Summary>,
}

/// What the delivery task handles, in arrival order.
pub(super) enum Event {
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
    /// These views' subscriptions were just confirmed.
    CatchUpViews(Vec<Arc<str>>),
}

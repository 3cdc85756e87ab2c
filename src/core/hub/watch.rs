//! Which views gained their first or lost their last local connection since
//! the broker last looked: with several nodes, a node subscribes to exactly
//! the views it has rooms for (see `broker::redis::subscriptions`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::core::lock::lock;

/// `None` until a broker asks for the changes, so a single node pays nothing.
#[derive(Default)]
pub(super) struct RoomChanges {
    views: Mutex<Option<HashSet<Arc<str>>>>,
    notify: Notify,
}

impl RoomChanges {
    pub fn enable(&self) {
        let mut views = lock(&self.views);
        if views.is_none() {
            *views = Some(HashSet::new());
        }
    }

    /// A room was created or dropped. Called under `Hub::rooms`, so a
    /// broker that takes the changes and then looks at the rooms sees every
    /// change either in the set or in the rooms.
    pub fn mark(&self, view_id: &Arc<str>) {
        if let Some(views) = lock(&self.views).as_mut() {
            if views.insert(view_id.clone()) && views.len() == 1 {
                // A stored permit: a broker not yet waiting still sees it.
                self.notify.notify_one();
            }
        }
    }

    pub fn take(&self) -> HashSet<Arc<str>> {
        lock(&self.views)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Resolves once a change was marked since the last [`RoomChanges::take`]
    /// (possibly at once, for one marked before the wait began).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

//! Closing connections whose access changed (SPEC §3.4): watches the
//! `membership_changes` log that schema.sql's triggers fill, whoever changed
//! the membership (the REST routes, the admin CLI, another node on the same
//! database), and closes the affected connections with 1008 `access revoked`.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::core::hub::Hub;
use crate::core::metrics::Metrics;
use crate::store::Storage;

/// Wakes the watcher at once (after a REST change) instead of at its next poll.
#[derive(Clone, Default)]
pub struct Nudge(Arc<Notify>);

impl Nudge {
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Runs until the runtime stops. A storage error skips one poll; the log keeps
/// the changes, so none is missed.
pub async fn watch(
    db: Storage,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    every: std::time::Duration,
    nudge: Nudge,
) {
    // An engine that hears of changes as they commit (PostgreSQL's LISTEN)
    // nudges; the poll below stays as the backstop.
    let wake = nudge.clone();
    db.blocking().watch_membership(Arc::new(move || wake.now()));
    let mut seen = loop {
        match db.membership_changes_start().await {
            Ok(seq) => break seq,
            Err(e) => {
                e.log("reading the membership change log");
                tokio::time::sleep(every).await;
            }
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = nudge.0.notified() => {}
        }
        let since = seen;
        let changes = match db.membership_changes_since(since).await {
            Ok(changes) => changes,
            Err(e) => {
                e.log("reading the membership change log");
                continue;
            }
        };
        for change in changes {
            seen = change.seq;
            let closed = hub.revoke(&change.library_id, &change.user_id);
            if closed > 0 {
                metrics.revocation_closes.inc_by(closed as u64);
                log::info!(
                    "membership of {} in {} changed: closing {closed} connection(s)",
                    change.user_id,
                    change.library_id
                );
            }
        }
    }
}

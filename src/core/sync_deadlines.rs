//! The task that acts on the request-sync deadlines of every room (see
//! `core::sync_requests` for the per-room state machine): what the hub hands
//! back goes to the other nodes through the broker, and the server's own
//! answers through the writer.

use std::sync::Arc;

use tokio::time::Instant;

use crate::core::broker::Broker;
use crate::core::hub::Hub;
use crate::core::writer::{Job, ReplyTo, Snapshot, Writer};

/// Acts on the rooms' deadlines: sends the forwards owed at the end of a
/// window (to this node's controllers, which the hub does, and through the
/// broker to the other nodes), and answers requesters whose wait is over
/// with the server's own `sync-response`. It goes through the writer, as
/// `Job::Snapshot` does for a view without controllers, so that it is
/// ordered with the view's broadcasts.
pub async fn run(hub: Arc<Hub>, writer: Writer, broker: Arc<dyn Broker>) {
    loop {
        let scheduled = hub.sync_scheduled();
        match hub.next_sync_deadline() {
            None => {
                scheduled.await;
                continue;
            }
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    // Something earlier may have been scheduled: look again.
                    _ = scheduled => continue,
                }
            }
            Some(_) => {}
        }
        for due in hub.take_due_syncs(Instant::now()) {
            if let Some(forward) = &due.to_nodes {
                broker.request_sync(&due.view_id, forward);
            }
            for (outbox, id) in due.answers {
                let job = Job::Snapshot(Snapshot {
                    view_id: due.view_id.clone(),
                    to: ReplyTo::Outbox(outbox),
                    id,
                });
                if writer.submit(job).await.is_err() {
                    return;
                }
            }
        }
    }
}

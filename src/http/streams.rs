//! This node's SSE streams by connection id (SPEC §7), which the context
//! holds and the SSE routes fill and read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::core::connlog::Traffic;
use crate::core::hub::Outbox;
use crate::core::session::{lock, RateLimit, Sender, Session};

/// This node's open SSE streams by connection id, so that a POST's
/// `X-Connection-Id` can name its sender. (A POST that names none counts
/// against its user's REST bucket, `rest_rate`.)
///
/// `std::sync::Mutex`: each critical section is one map operation and nothing
/// is awaited while a lock is held (see `hub.rs`).
#[derive(Default)]
pub(crate) struct Streams {
    by_id: Arc<Mutex<HashMap<Arc<str>, StreamEntry>>>,
}

/// What a POST needs of the stream it names.
#[derive(Clone)]
pub(crate) struct StreamEntry {
    pub(crate) sender: Sender,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) rate: Arc<Mutex<RateLimit>>,
    /// Where the stream's close line counts the messages POSTed to it.
    pub(crate) traffic: Arc<Traffic>,
}

/// Removes a stream from [`Streams`] when its session ends.
pub(crate) struct Registration {
    by_id: Arc<Mutex<HashMap<Arc<str>, StreamEntry>>>,
    connection_id: Arc<str>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.by_id).remove(&self.connection_id);
    }
}

impl Streams {
    pub(crate) fn register(&self, session: &Session) -> Registration {
        let connection_id = session.connection_id().clone();
        let entry = StreamEntry {
            sender: session.sender.clone(),
            outbox: session.outbox.clone(),
            rate: session.rate.clone(),
            traffic: session.log.traffic().clone(),
        };
        lock(&self.by_id).insert(connection_id.clone(), entry);
        Registration {
            by_id: self.by_id.clone(),
            connection_id,
        }
    }

    /// The stream `connection_id` if it is `user_id`'s, on `view_id`.
    pub(crate) fn find(
        &self,
        connection_id: &str,
        user_id: &str,
        view_id: &str,
    ) -> Option<StreamEntry> {
        let streams = lock(&self.by_id);
        let entry = streams.get(connection_id)?;
        (&*entry.sender.user_id == user_id && &*entry.sender.view_id == view_id)
            .then(|| entry.clone())
    }
}

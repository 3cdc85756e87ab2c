//! The seam to the other nodes: what the write path, sessions, request-syncs
//! and `/health` need from whoever carries a committed change beyond this
//! process. Engines live in `crate::broker` (one node in process, or Redis);
//! `engines.rs` picks one and hands it to [`Core`](crate::core::context::Core).

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_tungstenite::tungstenite::Message;

use crate::core::delivery::Broadcast;
use crate::core::forward::{ForwardReply, ForwardedPost, PostHandler};
use crate::domain::error::Error;

pub trait Broker: Send + Sync {
    /// This node's id when it is one of several. Each change then carries its
    /// rendered broadcast into the store (an `EventTemplate`), so that another
    /// node can fill from the database what it missed on the wire; a single
    /// node stores none.
    fn node_id(&self) -> Option<Arc<str>>;

    /// Delivers a view's broadcasts from one committed batch, in version
    /// order, to this node's connections (through
    /// [`Sequencer`](crate::core::sequencer::Sequencer)) and to the other
    /// nodes. Called from the writer's delivery task: a broker that can
    /// deliver here and now must, as a hop through another task would delay
    /// every fan-out.
    fn deliver(&self, view_id: Arc<str>, frames: Vec<Broadcast>);

    /// A viewer's `request-sync`, for the controllers on the other nodes (this
    /// node's own were sent it by the hub). Called at most once per view per
    /// window (see `sync_requests`).
    fn request_sync(&self, view_id: &str, forward: &Message);

    /// Whether the other nodes can be reached, for `/health`; `None` when
    /// there is nobody to reach.
    fn reachable(&self) -> Option<bool>;

    /// At the end of a graceful shutdown (every local connection closed):
    /// tells the other nodes at once, instead of letting them notice this
    /// node is gone. Best effort, and bounded in time.
    fn goodbye(&self) -> BoxFuture<'_, ()>;

    /// Sends a `POST …/messages` to `node`, which holds the stream it names
    /// (see `core::forward`), and waits for its answer, for a bounded time.
    /// A node that is not there answers [`ForwardReply::NotHeld`].
    fn forward_post(
        &self,
        node: &str,
        post: ForwardedPost,
    ) -> BoxFuture<'_, Result<ForwardReply, Error>> {
        let _ = (node, post);
        Box::pin(std::future::ready(Ok(ForwardReply::NotHeld)))
    }

    /// How this node answers the other nodes' forwarded POSTs.
    fn serve_posts(&self, handler: PostHandler) {
        let _ = handler;
    }
}

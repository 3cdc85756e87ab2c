//! SSE without sticky sessions (SPEC §7): a `POST …/messages` whose
//! `X-Connection-Id` names a stream another node holds travels to that node
//! and back, as these values. The connection id itself says which node holds
//! the stream (`<nodeId>-<random>`), so finding it costs nothing.
//!
//! The receiving node has checked the token and the user's access; the
//! holder checks again that the stream is that user's on that view, then
//! runs the message through the same code as a local POST (the stream's rate
//! included) and sends back the HTTP answer it would have given.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::domain::model::Role;

/// A POST on its way to the node holding its stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedPost {
    pub view_id: String,
    /// The user the request's token names.
    pub user_id: String,
    /// Their role as the receiving node read it for this request.
    pub role: Role,
    pub connection_id: String,
    /// The request's token's expiry (seconds since the epoch, leeway added).
    pub token_expires: u64,
    /// The message; `None` when the receiving node refused the body (its
    /// type, size or encoding) and only asks whether the stream is there,
    /// so that the answer's order of checks is a local POST's.
    pub body: Option<String>,
}

/// The holder's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    /// No such stream of this user on this view here (or this node is not
    /// the one the id names): the receiving node answers as for an unknown id.
    NotHeld,
    /// The stream is here; the body was not sent.
    Held,
    /// The HTTP answer, as the holder would have given it.
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

/// What the HTTP layer hands the broker to answer other nodes' forwards.
pub type PostHandler = Arc<dyn Fn(ForwardedPost) -> BoxFuture<'static, ForwardReply> + Send + Sync>;

/// A connection id that names its node, when there are several.
pub fn connection_id(node: Option<&str>, random: String) -> String {
    match node {
        Some(node) => format!("{node}-{random}"),
        None => random,
    }
}

/// The node a connection id names, if any (a node id is short hex, so no
/// header can make up an arbitrary channel name).
pub fn holder(connection_id: &str) -> Option<&str> {
    let (node, _) = connection_id.split_once('-')?;
    (!node.is_empty() && node.len() <= 64 && node.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_id_names_its_node_only_when_there_are_several() {
        let id = connection_id(Some("00ab"), "f00d".into());
        assert_eq!(id, "00ab-f00d");
        assert_eq!(holder(&id), Some("00ab"));
        assert_eq!(connection_id(None, "f00d".into()), "f00d");
        assert_eq!(holder("f00d"), None);
        // A header cannot make up a channel name.
        assert_eq!(holder("a:b-c"), None);
        assert_eq!(holder("-c"), None);
        assert_eq!(holder(&format!("{}-c", "a".repeat(65))), None);
    }
}

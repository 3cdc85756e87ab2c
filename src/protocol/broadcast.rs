//! A state change's broadcast: who caused it and how it arrived decide its
//! form and whom it skips (SPEC §3.2, §4).

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use crate::protocol::outbound as protocol;

/// Who asked for a change, as broadcasts name them in `from`.
#[derive(Debug, Clone)]
pub struct Author {
    pub user_id: Arc<str>,
    pub via: Via,
}

/// How a change arrived, which decides the form of its broadcast and whom it skips.
#[derive(Debug, Clone)]
pub enum Via {
    /// `PATCH /api/portal-views/{id}`: tagged `"source":"rest"`, sent to every
    /// connection of the view, the caller's own included.
    Rest,
    /// A client message of SPEC §3.1 from this connection (hub key, connection
    /// id), which its broadcast skips; `None` for a `POST …/messages` that
    /// names no SSE stream of its own (SPEC §7).
    Message(Option<(u64, Arc<str>)>),
}

impl Author {
    /// The change's broadcast, exactly as every node renders it.
    pub(crate) fn broadcast(
        &self,
        message_type: &'static str,
        payload: &RawValue,
        version: i64,
    ) -> Message {
        let (message_type, connection_id, source) = match &self.via {
            Via::Rest => ("portal-view-update", None, Some("rest")),
            Via::Message(connection) => {
                (message_type, connection.as_ref().map(|(_, id)| &**id), None)
            }
        };
        let from = protocol::From {
            user_id: &self.user_id,
            connection_id,
        };
        protocol::change_broadcast(message_type, payload, version, &from, source)
    }

    /// The hub key of the sending connection, which does not get its own change back.
    pub(crate) fn skips(&self) -> Option<u64> {
        match &self.via {
            Via::Message(Some((key, _))) => Some(*key),
            _ => None,
        }
    }
}

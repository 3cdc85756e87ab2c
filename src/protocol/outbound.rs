//! Every server message (SPEC §3), each serialized once into a `Message`,
//! whose text is a reference-counted buffer, so a broadcast clones a pointer
//! per recipient.

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use crate::domain::error::Error;
use crate::domain::model::{Presence, Role};

/// Who caused a broadcast.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct From<'a> {
    #[serde(rename = "userId")]
    pub(crate) user_id: &'a str,
    #[serde(rename = "connectionId", skip_serializing_if = "Option::is_none")]
    pub(crate) connection_id: Option<&'a str>,
}

fn to_message<T: Serialize>(value: &T) -> Message {
    // Serializing these structs (strings, numbers, RawValue, Value) cannot fail.
    Message::text(serde_json::to_string(value).unwrap_or_default())
}

pub(crate) struct Connected<'a> {
    pub(crate) portal_view_id: &'a str,
    pub(crate) connection_id: &'a str,
    pub(crate) user_id: &'a str,
    pub(crate) role: Role,
    pub(crate) state: &'a RawValue,
    pub(crate) version: i64,
    pub(crate) presence: Presence,
}

pub(crate) fn connected(c: &Connected) -> Message {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        portal_view_id: &'a str,
        connection_id: &'a str,
        user_id: &'a str,
        role: Role,
        state: &'a RawValue,
        version: i64,
        presence: Presence,
    }
    to_message(&Wire {
        ty: "connected",
        portal_view_id: c.portal_view_id,
        connection_id: c.connection_id,
        user_id: c.user_id,
        role: c.role,
        state: c.state,
        version: c.version,
        presence: c.presence,
    })
}

pub(crate) fn pong(id: Option<&RawValue>, timestamp_ms: u64) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        timestamp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    to_message(&Wire {
        ty: "pong",
        timestamp: timestamp_ms,
        id,
    })
}

pub(crate) fn ack(id: &RawValue, version: i64) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        id: &'a RawValue,
        version: i64,
    }
    to_message(&Wire {
        ty: "ack",
        id,
        version,
    })
}

pub fn error(error: &Error, id: Option<&RawValue>) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    to_message(&Wire {
        ty: "error",
        code: error.code(),
        message: error.client_message(),
        id,
    })
}

/// A person in a presence event.
#[derive(Debug, Serialize)]
pub(crate) struct Person<'a> {
    #[serde(rename = "userId")]
    pub(crate) user_id: &'a str,
    pub(crate) role: Role,
}

/// SPEC §3.3: who came and went since the controller's last event.
pub(crate) fn presence_event(joined: &[Person], left: &[Person], presence: Presence) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        joined: &'a [Person<'a>],
        left: &'a [Person<'a>],
        presence: Presence,
    }
    to_message(&Wire {
        ty: "presence",
        joined,
        left,
        presence,
    })
}

/// A state change as every other connection of the view receives it.
pub(crate) fn change_broadcast(
    message_type: &'static str,
    payload: &RawValue,
    version: i64,
    from: &From,
    source: Option<&'static str>,
) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        payload: &'a RawValue,
        version: i64,
        from: &'a From<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<&'static str>,
    }
    to_message(&Wire {
        ty: message_type,
        payload,
        version,
        from,
        source,
    })
}

/// Whether a state-change broadcast is a controller's `sync-response`, which
/// answers every request-sync of the view waiting on this node. Broadcasts
/// are serialized by [`change_broadcast`] alone (on every node, and into the
/// cluster's stored events), with `type` first, so its start tells. (The
/// server's own `sync-response` is a reply, never a broadcast.)
pub(crate) fn answers_sync_requests(broadcast: &Message) -> bool {
    broadcast
        .to_text()
        .is_ok_and(|text| text.starts_with(r#"{"type":"sync-response","#))
}

/// A viewer's `request-sync` as the controllers receive it: who asked, never
/// the viewer's payload (SPEC §3.1).
pub(crate) fn request_sync_forward(from: &From) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        from: &'a From<'a>,
    }
    to_message(&Wire {
        ty: "request-sync",
        from,
    })
}

/// SPEC §9: the session's token now expires at `exp` (the new token's claim).
pub(crate) fn token_refreshed(exp: u64, id: Option<&RawValue>) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    to_message(&Wire {
        ty: "token-refreshed",
        exp,
        id,
    })
}

/// SPEC §9: the session will be closed 1008 `token expired` at `exp` unless
/// it is sent a `refresh-token` first.
pub(crate) fn token_expiring(exp: u64) -> Message {
    #[derive(Serialize)]
    struct Wire {
        #[serde(rename = "type")]
        ty: &'static str,
        exp: u64,
    }
    to_message(&Wire {
        ty: "token-expiring",
        exp,
    })
}

/// SSE's last event where a WebSocket would get a close frame (SPEC §7).
pub(crate) fn closed(code: u16, reason: &str) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        code: u16,
        reason: &'a str,
    }
    to_message(&Wire {
        ty: "closed",
        code,
        reason,
    })
}

/// The server's own answer to `request-sync`: no controller is connected, or
/// none answered within `--sync-timeout`.
pub(crate) fn server_sync_response(
    state: &RawValue,
    version: i64,
    id: Option<&RawValue>,
) -> Message {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        payload: &'a RawValue,
        version: i64,
        source: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    to_message(&Wire {
        ty: "sync-response",
        payload: state,
        version,
        source: "server",
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_controllers_sync_response_broadcast_answers_sync_requests() {
        let raw =
            RawValue::from_string(r#"{"a":"{\"type\":\"sync-response\","}"#.into()).expect("raw");
        let from = From {
            user_id: "u",
            connection_id: Some("c"),
        };
        assert!(answers_sync_requests(&change_broadcast(
            "sync-response",
            &raw,
            3,
            &from,
            None
        )));
        for ty in ["portal-view-update", "item-update"] {
            assert!(!answers_sync_requests(&change_broadcast(
                ty, &raw, 3, &from, None
            )));
        }
        assert!(!answers_sync_requests(&request_sync_forward(&from)));
    }
}

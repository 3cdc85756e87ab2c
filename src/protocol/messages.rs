//! The wire protocol of SPEC §3.1: inbound frames parsed into a [`Command`] and
//! checked against the role, and every outbound message, serialized once.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

pub use crate::domain::access::Kind;
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::domain::model::{is_valid_id, Presence, Role};

/// A checked client message, ready to apply.
#[derive(Debug)]
pub enum Command {
    Ping,
    /// A state change; `payload` is the text the client sent, forwarded verbatim
    /// in the broadcast ("what was sent plus the server's facts").
    Change {
        change: Change,
        payload: Box<RawValue>,
    },
    /// A viewer asks for the current state. Its payload, if any, is not kept:
    /// it is never forwarded (SPEC §3.1), so a flood of 64 KB requests costs
    /// no copies.
    RequestSync,
}

/// A parsed message and the `id` to echo on its reply.
#[derive(Debug)]
pub struct Inbound {
    pub id: Option<Box<RawValue>>,
    pub command: Command,
}

/// Why an inbound frame was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// Answer with an `error` reply (echoing `id` if it was valid); the socket stays open.
    Reply {
        error: Error,
        id: Option<Box<RawValue>>,
    },
    /// Not our protocol: close with 1003 `unsupported data`.
    Unsupported,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// `Some` for any present value, `null` included: SPEC counts an `"id": null` as
/// a wrong type rather than as no id.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame and runs SPEC §3.1's checks in order (after the rate
/// check, which the caller owns): `id` type, known type, role, payload shape.
pub fn parse(text: &str, role: Role) -> Result<Inbound, Refusal> {
    // serde would also read a JSON array as a struct; SPEC wants objects only.
    if !text.trim_start().starts_with('{') {
        return Err(Refusal::Unsupported);
    }
    let envelope: Envelope = serde_json::from_str(text).map_err(|_| Refusal::Unsupported)?;
    let id = match envelope.id {
        None => None,
        Some(raw) if is_string_or_number(raw) => Some(raw.to_owned()),
        Some(_) => {
            return Err(Refusal::Reply {
                error: Error::BadRequest("id must be a string or a number".into()),
                id: None,
            })
        }
    };
    let refuse = |error| Refusal::Reply {
        error,
        id: id.clone(),
    };
    let Some(kind) = Kind::from_name(&envelope.ty) else {
        return Err(refuse(Error::UnknownType));
    };
    kind.check(role).map_err(refuse)?;
    let command = command(kind, envelope.payload).map_err(refuse)?;
    Ok(Inbound { id, command })
}

/// The SPEC §3.1 rate check comes first, but its `RATE_LIMITED` reply still
/// echoes a valid `id`: reads only the envelope. A frame that is not our
/// protocol is still `Unsupported` (it closes the socket whatever the rate).
pub fn rate_limited(text: &str) -> Result<Refusal, Refusal> {
    if !text.trim_start().starts_with('{') {
        return Err(Refusal::Unsupported);
    }
    let envelope: Envelope = serde_json::from_str(text).map_err(|_| Refusal::Unsupported)?;
    Ok(Refusal::Reply {
        error: Error::RateLimited,
        id: envelope
            .id
            .filter(|raw| is_string_or_number(raw))
            .map(RawValue::to_owned),
    })
}

/// The message type for metrics: a known type's name, else `unknown`.
pub fn type_label(text: &str) -> &'static str {
    serde_json::from_str::<Envelope>(text)
        .ok()
        .and_then(|e| Kind::from_name(&e.ty))
        .map_or("unknown", Kind::name)
}

impl Command {
    /// The message type this command came from.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::Change { change, .. } => change.message_type(),
            Command::RequestSync => "request-sync",
        }
    }
}

fn is_string_or_number(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

/// Checks the payload's shape for `kind` and builds the command.
pub fn command(kind: Kind, payload: Option<&RawValue>) -> Result<Command, Error> {
    let change = match kind {
        Kind::Ping => return Ok(Command::Ping),
        Kind::RequestSync => return Ok(Command::RequestSync),
        Kind::PortalViewUpdate => Change::Merge(object_payload(payload)?),
        Kind::SyncResponse => Change::Replace(object_payload(payload)?),
        Kind::ItemUpdate => {
            let mut patch = object_payload(payload)?;
            let item_id = patch
                .remove("itemId")
                .as_ref()
                .and_then(item_id)
                .ok_or_else(|| {
                    Error::BadRequest(
                        "payload.itemId must be an id ([A-Za-z0-9_-], 1-64 characters) \
                         or an integer from 0 to 2^53"
                            .into(),
                    )
                })?;
            Change::Item { item_id, patch }
        }
    };
    change.check_depth()?;
    let payload = payload
        .map(RawValue::to_owned)
        .ok_or_else(|| Error::Internal("payload checked above".into()))?;
    Ok(Command::Change { change, payload })
}

fn object_payload(payload: Option<&RawValue>) -> Result<Map<String, Value>, Error> {
    let not_object = || Error::BadRequest("payload must be a JSON object".into());
    let raw = payload.ok_or_else(not_object)?;
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(not_object()),
        Err(e) => Err(Error::BadRequest(format!("payload: {e}"))),
    }
}

/// SPEC §3.1: an id as in §1, or an integer literal 0..=2^53 read as its decimal
/// string (`7.0` is a float, not one).
fn item_id(value: &Value) -> Option<String> {
    const MAX: u64 = 1 << 53;
    match value {
        Value::String(s) if is_valid_id(s) => Some(s.clone()),
        Value::Number(n) => n.as_u64().filter(|&n| n <= MAX).map(|n| n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Outbound messages. Each is serialized once into a `Message`, whose text is a
// reference-counted buffer, so a broadcast clones a pointer per recipient.

/// Who caused a broadcast.
#[derive(Debug, Clone, Serialize)]
pub struct From<'a> {
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    #[serde(rename = "connectionId", skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<&'a str>,
}

fn to_message<T: Serialize>(value: &T) -> Message {
    // Serializing these structs (strings, numbers, RawValue, Value) cannot fail.
    Message::text(serde_json::to_string(value).unwrap_or_default())
}

pub struct Connected<'a> {
    pub portal_view_id: &'a str,
    pub connection_id: &'a str,
    pub user_id: &'a str,
    pub role: Role,
    pub state: &'a RawValue,
    pub version: i64,
    pub presence: Presence,
}

pub fn connected(c: &Connected) -> Message {
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

pub fn pong(id: Option<&RawValue>, timestamp_ms: u64) -> Message {
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

pub fn ack(id: &RawValue, version: i64) -> Message {
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
pub struct Person<'a> {
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    pub role: Role,
}

/// SPEC §3.3: who came and went since the controller's last event.
pub fn presence_event(joined: &[Person], left: &[Person], presence: Presence) -> Message {
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
pub fn change_broadcast(
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
pub fn answers_sync_requests(broadcast: &Message) -> bool {
    broadcast
        .to_text()
        .is_ok_and(|text| text.starts_with(r#"{"type":"sync-response","#))
}

/// A viewer's `request-sync` as the controllers receive it: who asked, never
/// the viewer's payload (SPEC §3.1).
pub fn request_sync_forward(from: &From) -> Message {
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

/// SSE's last event where a WebSocket would get a close frame (SPEC §7).
pub fn closed(code: u16, reason: &str) -> Message {
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
pub fn server_sync_response(state: &RawValue, version: i64, id: Option<&RawValue>) -> Message {
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

    fn refusal_code(text: &str, role: Role) -> Option<&'static str> {
        match parse(text, role) {
            Ok(_) => None,
            Err(Refusal::Unsupported) => Some("1003"),
            Err(Refusal::Reply { error, .. }) => Some(error.code()),
        }
    }

    #[test]
    fn check_order_and_shapes() {
        use Role::*;
        assert_eq!(refusal_code("[1]", Controller), Some("1003"));
        assert_eq!(refusal_code("\"x\"", Controller), Some("1003"));
        assert_eq!(refusal_code("{}", Controller), Some("1003"));
        assert_eq!(refusal_code(r#"{"type":1}"#, Controller), Some("1003"));
        assert_eq!(refusal_code("{nope", Controller), Some("1003"));
        // id type comes before the type check
        assert_eq!(
            refusal_code(r#"{"type":"zzz","id":null}"#, Controller),
            Some("BAD_REQUEST")
        );
        assert_eq!(
            refusal_code(r#"{"type":"zzz","id":1}"#, Controller),
            Some("UNKNOWN_TYPE")
        );
        // role before payload shape
        assert_eq!(
            refusal_code(r#"{"type":"portal-view-update","payload":3}"#, Viewer),
            Some("FORBIDDEN")
        );
        assert_eq!(
            refusal_code(r#"{"type":"portal-view-update","payload":3}"#, Controller),
            Some("BAD_REQUEST")
        );
        assert_eq!(
            refusal_code(r#"{"type":"portal-view-update"}"#, Controller),
            Some("BAD_REQUEST")
        );
        assert_eq!(
            refusal_code(r#"{"type":"ping","payload":[1]}"#, Viewer),
            None
        );
        assert_eq!(
            refusal_code(r#"{"type":"request-sync","id":"a"}"#, Viewer),
            None
        );
    }

    #[test]
    fn item_ids() {
        let ok = |p: &str| match parse(
            &format!(r#"{{"type":"item-update","payload":{p}}}"#),
            Role::Controller,
        ) {
            Ok(Inbound {
                command:
                    Command::Change {
                        change: Change::Item { item_id, .. },
                        ..
                    },
                ..
            }) => Some(item_id),
            _ => None,
        };
        assert_eq!(ok(r#"{"itemId":"a-1","x":1}"#).as_deref(), Some("a-1"));
        assert_eq!(ok(r#"{"itemId":7}"#).as_deref(), Some("7"));
        assert_eq!(
            ok(r#"{"itemId":9007199254740992}"#).as_deref(),
            Some("9007199254740992")
        );
        assert_eq!(ok(r#"{"itemId":9007199254740993}"#), None);
        assert_eq!(ok(r#"{"itemId":7.0}"#), None);
        assert_eq!(ok(r#"{"itemId":-1}"#), None);
        assert_eq!(ok(r#"{"itemId":"a b"}"#), None);
        assert_eq!(ok(r#"{"itemId":null}"#), None);
        assert_eq!(ok(r#"{"x":1}"#), None);
    }

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

    #[test]
    fn ids_are_echoed_verbatim() {
        let inbound = parse(
            r#"{"type":"ping","id":12345678901234567890123}"#,
            Role::Viewer,
        )
        .expect("valid");
        let id = inbound.id.expect("id");
        assert_eq!(id.get(), "12345678901234567890123");
        let text = pong(Some(&id), 5).into_text().expect("text");
        assert_eq!(
            text.as_str(),
            r#"{"type":"pong","timestamp":5,"id":12345678901234567890123}"#
        );
    }
}

//! Client messages (SPEC §3.1): a text frame parsed into a [`Command`] and
//! checked, in SPEC's order, against the sender's role.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::access::Kind;
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::domain::model::{is_valid_id, Role};

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
    /// SPEC §9: a new token for the session (checked by the session, which
    /// knows whose it must be).
    RefreshToken(Token),
}

/// A JWT a client sent in a message. Its `Debug` shows no part of it: tokens
/// never reach a log (SPEC §6), not even through a `{:?}` of a command.
pub struct Token(String);

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
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
    let command = command(kind, envelope.payload, text).map_err(refuse)?;
    Ok(Inbound { id, command })
}

/// The SPEC §3.1 rate check comes first, but its `RATE_LIMITED` reply still
/// echoes a valid `id`: reads only the envelope. A frame that is not our
/// protocol is still `Unsupported` (it closes the socket whatever the rate).
pub(crate) fn rate_limited(text: &str) -> Result<Refusal, Refusal> {
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
pub(crate) fn type_label(text: &str) -> &'static str {
    serde_json::from_str::<Envelope>(text)
        .ok()
        .and_then(|e| Kind::from_name(&e.ty))
        .map_or("unknown", Kind::name)
}

impl Command {
    /// The message type this command came from.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::Change { change, .. } => change.message_type(),
            Command::RequestSync => "request-sync",
            Command::RefreshToken(_) => "refresh-token",
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
fn command(kind: Kind, payload: Option<&RawValue>, text: &str) -> Result<Command, Error> {
    let change = match kind {
        Kind::Ping => return Ok(Command::Ping),
        Kind::RequestSync => return Ok(Command::RequestSync),
        Kind::RefreshToken => return refresh_token(payload, text).map(Command::RefreshToken),
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

/// SPEC §9 puts the token at the top level of the message, beside `type`,
/// and only there: a `payload.token` is not read (one place for it, as SPEC
/// writes it), but the refusal says where it goes. The envelope leaves
/// `token` out so that the other types parse as they did; this second read
/// happens for this rare message only.
fn refresh_token(payload: Option<&RawValue>, text: &str) -> Result<Token, Error> {
    #[derive(Deserialize)]
    struct Body {
        /// `null` is present, and not a string.
        #[serde(default, deserialize_with = "present_value")]
        token: Option<Value>,
    }
    fn present_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Value::deserialize(d).map(Some)
    }
    let in_payload = |p: &RawValue| {
        serde_json::from_str::<Map<String, Value>>(p.get()).is_ok_and(|m| m.contains_key("token"))
    };
    let body: Body = serde_json::from_str(text)
        .map_err(|_| Error::BadRequest("token must be a string".into()))?;
    match body.token {
        Some(Value::String(token)) => Ok(Token(token)),
        Some(_) => Err(Error::BadRequest("token must be a string".into())),
        None if payload.is_some_and(in_payload) => Err(Error::BadRequest(
            "token goes at the top level of the message, not in payload".into(),
        )),
        None => Err(Error::BadRequest(
            "refresh-token needs a string token at the top level of the message".into(),
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::outbound::pong;

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
    fn refresh_token_shapes() {
        let parsed = |text: &str| match parse(text, Role::Viewer) {
            Ok(Inbound {
                command: Command::RefreshToken(token),
                ..
            }) => Ok(token.as_str().to_string()),
            Ok(other) => panic!("{other:?}"),
            Err(Refusal::Reply { error, .. }) => Err(error.client_message()),
            Err(Refusal::Unsupported) => Err("1003".into()),
        };
        assert_eq!(
            parsed(r#"{"type":"refresh-token","token":"a.b.c","id":1}"#),
            Ok("a.b.c".into())
        );
        assert_eq!(
            parsed(r#"{"type":"refresh-token","token":7}"#),
            Err("token must be a string".into())
        );
        assert_eq!(
            parsed(r#"{"type":"refresh-token","token":null}"#),
            Err("token must be a string".into())
        );
        assert_eq!(
            parsed(r#"{"type":"refresh-token","payload":{"token":"a.b.c"}}"#),
            Err("token goes at the top level of the message, not in payload".into())
        );
        assert_eq!(
            parsed(r#"{"type":"refresh-token"}"#),
            Err("refresh-token needs a string token at the top level of the message".into())
        );
        let token = parse(
            r#"{"type":"refresh-token","token":"secret.jwt"}"#,
            Role::Controller,
        )
        .expect("valid");
        assert!(!format!("{token:?}").contains("secret"));
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

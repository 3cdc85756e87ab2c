//! Property tests (proptest) over the two pure cores of the server, through the
//! library's public API:
//!
//! - inbound message parsing, `protocol::parse`, for both roles: it never
//!   panics on any text; for any JSON value its answer equals a model written
//!   here from SPEC §3.1 (close 1003 / `id` check / `UNKNOWN_TYPE` / the
//!   permission table / payload shapes), which includes the id echo rules;
//! - JSON Merge Patch, `merge::merge_patch` and `merge::Change::apply`: equal
//!   to RFC 7386's pseudo-code, idempotent, `null` removes, no null member is
//!   ever introduced, `{}` changes nothing.
//!
//! Cases per property: `PROPTEST_CASES` (default [`DEFAULT_CASES`], which keeps
//! this file at a few seconds in a debug build on a busy 2-core machine).

use portal_sync::domain::merge::{merge_patch, Change};
use portal_sync::domain::model::{is_valid_id, Role};
use portal_sync::protocol::{self, Command, Inbound, Refusal};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Number, Value};

const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Shrinking a failure is worth more than speed, but keep it bounded.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

const ROLES: [Role; 2] = [Role::Controller, Role::Viewer];

/// SPEC §3.1's permission table, written out again here on purpose (the test
/// must not read it from the code under test): (type, controller, viewer).
const PERMISSIONS: [(&str, bool, bool); 6] = [
    ("ping", true, true),
    ("portal-view-update", true, false),
    ("item-update", true, false),
    ("request-sync", false, true),
    ("sync-response", true, false),
    ("refresh-token", true, true),
];

// ---------------------------------------------------------------------------
// Strategies

/// Numbers that survive a text round trip exactly (serde_json's default float
/// parser may be one ULP off on arbitrary doubles, which is not what is tested).
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        Just(json!(9_007_199_254_740_992_u64)),
        Just(json!(9_007_199_254_740_993_u64)),
        Just(json!(0)),
        Just(json!(-1)),
    ]
}

/// Keys from a small set (so patches and targets share keys), plus any string.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "items", "itemId", "type", "id", "payload"])
            .prop_map(str::to_string),
        1 => "\\PC{0,6}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        "\\PC{0,8}".prop_map(Value::String),
    ]
}

/// Any JSON value, a few levels deep.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object (the shape of states and of the patches the server applies).
fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(key(), value(), 0..6).prop_map(|m| m.into_iter().collect())
}

/// An object with no `null` member anywhere outside arrays.
fn null_free_object() -> impl Strategy<Value = Map<String, Value>> {
    object().prop_map(|mut m| {
        strip_null_members(&mut m);
        m
    })
}

fn strip_null_members(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(inner) = v {
            strip_null_members(inner);
        }
    }
}

fn message_type() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => prop::sample::select(PERMISSIONS.map(|(t, ..)| t).to_vec())
            .prop_map(|t| Some(json!(t))),
        1 => prop::sample::select(vec!["PING", "", "ack", "pong", "portal_view_update", "error"])
            .prop_map(|t| Some(json!(t))),
        1 => "\\PC{0,12}".prop_map(|t| Some(json!(t))),
        1 => leaf().prop_filter("not a string", |v| !v.is_string()).prop_map(Some),
        1 => Just(None),
    ]
}

fn message_id() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        3 => "\\PC{0,10}".prop_map(|s| Some(json!(s))),
        3 => number().prop_map(Some),
        2 => value().prop_filter("not a string or number", |v| !v.is_string() && !v.is_number())
            .prop_map(Some),
    ]
}

/// `itemId` candidates around every edge of SPEC §3.1's rule.
fn item_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => "[A-Za-z0-9_-]{1,64}".prop_map(Value::from),
        1 => "[A-Za-z0-9_-]{65,70}".prop_map(Value::from),
        1 => "\\PC{0,8}".prop_map(Value::from),
        2 => (0u64..=(1 << 53) + 2).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => (-40i32..40).prop_map(|n| Value::from(f64::from(n) / 2.0)),
        1 => leaf(),
    ]
}

fn payload() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        4 => object().prop_map(|m| Some(Value::Object(m))),
        2 => (item_id(), object()).prop_map(|(id, mut m)| {
            m.insert("itemId".into(), id);
            Some(Value::Object(m))
        }),
        2 => value().prop_map(Some),
    ]
}

/// A message-like JSON value: mostly objects with the envelope's keys, some
/// extra keys, sometimes anything at all.
fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (message_type(), payload(), message_id(), prop::collection::btree_map(prop_oneof!["x[a-z]{0,3}", Just("token".to_string())], value(), 0..2))
            .prop_map(|(ty, payload, id, extra)| {
                let mut m: Map<String, Value> = extra.into_iter().collect();
                if let Some(ty) = ty {
                    m.insert("type".into(), ty);
                }
                if let Some(p) = payload {
                    m.insert("payload".into(), p);
                }
                if let Some(id) = id {
                    m.insert("id".into(), id);
                }
                Value::Object(m)
            }),
        1 => value(),
    ]
}

/// Texts near the protocol: JSON-ish fragments, whole messages with a byte
/// changed, and anything printable.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "\\PC{0,64}",
        2 => "[ \\t\\r\\n{}\\[\\]\":,0-9a-z.eE+-]{0,64}",
        3 => (message(), any::<prop::sample::Index>(), "\\PC{0,3}", 0usize..3).prop_map(
            |(m, at, insert, delete)| {
                let s = m.to_string();
                let chars: Vec<char> = s.chars().collect();
                let i = at.index(chars.len() + 1);
                let end = (i + delete).min(chars.len());
                chars[..i].iter().collect::<String>() + &insert + &chars[end..].iter().collect::<String>()
            }
        ),
        1 => message().prop_map(|m| format!(" \n\t{m}")),
    ]
}

// ---------------------------------------------------------------------------
// parse: what it answered, and what SPEC says it should answer

/// A comparable summary of a parse result.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Close 1003 `unsupported data`.
    Unsupported,
    /// An `error` reply; `id` is the raw JSON text echoed, if any.
    Refused {
        code: &'static str,
        id: Option<String>,
    },
    Ping {
        id: Option<String>,
    },
    /// The payload, whatever it is, is dropped (SPEC §3.1: never forwarded).
    RequestSync {
        id: Option<String>,
    },
    Merge {
        id: Option<String>,
        patch: Map<String, Value>,
        payload: String,
    },
    Replace {
        id: Option<String>,
        state: Map<String, Value>,
        payload: String,
    },
    Item {
        id: Option<String>,
        item_id: String,
        patch: Map<String, Value>,
        payload: String,
    },
    /// SPEC §9: the top-level `token`, a string.
    Refresh {
        id: Option<String>,
        token: String,
    },
}

fn actual(text: &str, role: Role) -> Outcome {
    match protocol::parse(text, role) {
        Err(Refusal::Unsupported) => Outcome::Unsupported,
        Err(Refusal::Reply { error, id }) => Outcome::Refused {
            code: error.code(),
            id: id.map(|raw| raw.get().to_string()),
        },
        Ok(Inbound { id, command }) => {
            let id = id.map(|raw| raw.get().to_string());
            match command {
                Command::Ping => Outcome::Ping { id },
                Command::RequestSync => Outcome::RequestSync { id },
                Command::RefreshToken(token) => Outcome::Refresh {
                    id,
                    token: token.as_str().to_string(),
                },
                Command::Change { change, payload } => {
                    let payload = payload.get().to_string();
                    match change {
                        Change::Merge(patch) => Outcome::Merge { id, patch, payload },
                        Change::Replace(state) => Outcome::Replace { id, state, payload },
                        Change::Item { item_id, patch } => Outcome::Item {
                            id,
                            item_id,
                            patch,
                            payload,
                        },
                    }
                }
            }
        }
    }
}

/// SPEC §3.1 for a message given as a JSON value (serialized compactly).
fn model(message: &Value, role: Role) -> Outcome {
    let Some(object) = message.as_object() else {
        return Outcome::Unsupported;
    };
    let Some(ty) = object.get("type").and_then(Value::as_str) else {
        return Outcome::Unsupported;
    };
    let id = match object.get("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id.to_string()),
        Some(_) => {
            return Outcome::Refused {
                code: "BAD_REQUEST",
                id: None,
            }
        }
    };
    let refused = |code| Outcome::Refused {
        code,
        id: id.clone(),
    };
    let Some(&(_, controller, viewer)) = PERMISSIONS.iter().find(|(t, ..)| *t == ty) else {
        return refused("UNKNOWN_TYPE");
    };
    let allowed = match role {
        Role::Controller => controller,
        Role::Viewer => viewer,
    };
    if !allowed {
        return refused("FORBIDDEN");
    }
    let payload = object.get("payload");
    let raw = payload.map(Value::to_string);
    let as_object = payload.and_then(Value::as_object).cloned();
    match (ty, as_object, raw) {
        ("ping", ..) => Outcome::Ping { id },
        ("request-sync", ..) => Outcome::RequestSync { id },
        ("refresh-token", ..) => match object.get("token") {
            Some(Value::String(token)) => Outcome::Refresh {
                id,
                token: token.clone(),
            },
            _ => refused("BAD_REQUEST"),
        },
        ("portal-view-update", Some(patch), Some(payload)) => Outcome::Merge { id, patch, payload },
        ("sync-response", Some(state), Some(payload)) => Outcome::Replace { id, state, payload },
        ("item-update", Some(mut patch), Some(payload)) => {
            match patch.remove("itemId").as_ref().and_then(model_item_id) {
                Some(item_id) => Outcome::Item {
                    id,
                    item_id,
                    patch,
                    payload,
                },
                None => refused("BAD_REQUEST"),
            }
        }
        _ => refused("BAD_REQUEST"),
    }
}

/// SPEC §3.1: an id as in §1, or an integer literal 0..=2^53 as its decimal string.
fn model_item_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if is_valid_id(s) => Some(s.clone()),
        Value::Number(n) => n.as_u64().filter(|&n| n <= 1 << 53).map(|n| n.to_string()),
        _ => None,
    }
}

/// The `error` message a refusal becomes on the wire carries exactly the echoed
/// id, or none.
fn check_error_message(text: &str, role: Role) -> Result<(), TestCaseError> {
    if let Err(Refusal::Reply { error, id }) = protocol::parse(text, role) {
        let wire = protocol::error(&error, id.as_deref());
        let wire = wire.into_text().expect("a text message");
        let reply: Value = match serde_json::from_str(wire.as_str()) {
            Ok(v) => v,
            // An echoed id a strict parser cannot read (1e400): compare text.
            Err(_) => {
                let raw = id.as_ref().map(|r| r.get().to_string()).unwrap_or_default();
                let tail = format!(r#","id":{raw}}}"#);
                prop_assert!(
                    wire.as_str().ends_with(&tail),
                    "{} echoes {}",
                    wire.as_str(),
                    raw
                );
                return Ok(());
            }
        };
        prop_assert_eq!(&reply["type"], "error");
        prop_assert_eq!(&reply["code"], error.code());
        match id {
            Some(raw) => {
                let echoed: Value = serde_json::from_str(raw.get()).expect("raw id is JSON");
                prop_assert_eq!(reply.get("id"), Some(&echoed));
            }
            None => prop_assert!(reply.get("id").is_none(), "no id echoed: {}", reply),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Merge patch: RFC 7386 §2's pseudo-code, as a reference

fn rfc7386(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut result = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            result.remove(name);
        } else {
            let current = result.get(name).cloned().unwrap_or(Value::Null);
            result.insert(name.clone(), rfc7386(&current, value));
        }
    }
    Value::Object(result)
}

fn merged(target: &Value, patch: &Value) -> Value {
    let mut t = target.clone();
    merge_patch(&mut t, patch);
    t
}

/// True when some object member (reached through objects only; arrays are
/// values and kept verbatim) is `null`.
fn has_null_member(value: &Value) -> bool {
    match value {
        Value::Object(m) => m.values().any(|v| v.is_null() || has_null_member(v)),
        _ => false,
    }
}

fn applied(state: &Map<String, Value>, change: &Change) -> Map<String, Value> {
    let mut s = state.clone();
    change.apply(&mut s);
    s
}

// ---------------------------------------------------------------------------
// The properties

proptest! {
    #![proptest_config(config())]

    /// Any text at all, either role: no panic, and text that is not JSON
    /// (or JSON that is not an object) is never anything but 1003.
    #[test]
    fn parse_never_panics_on_any_text(text in text()) {
        for role in ROLES {
            let outcome = actual(&text, role);
            let is_json = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
            if !is_json || !text.trim_start().starts_with('{') {
                prop_assert_eq!(&outcome, &Outcome::Unsupported, "{:?}", text);
            }
            check_error_message(&text, role)?;
        }
    }

    /// Arbitrary bytes made into a string (invalid UTF-8 replaced), either
    /// role: no panic.
    #[test]
    fn parse_never_panics_on_lossy_bytes(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let text = String::from_utf8_lossy(&bytes);
        for role in ROLES {
            let _ = actual(&text, role);
        }
    }

    /// For any JSON value sent as a message, either role, the parse equals
    /// SPEC §3.1's model: 1003 for non-objects and a missing/non-string type;
    /// BAD_REQUEST without id for an id that is not a string or number;
    /// otherwise the id echoed verbatim on every reply; UNKNOWN_TYPE; FORBIDDEN
    /// exactly where the permission table says ❌; the payload shapes; the
    /// payload forwarded verbatim.
    #[test]
    fn parse_follows_the_spec_model(message in message()) {
        let text = message.to_string();
        for role in ROLES {
            prop_assert_eq!(actual(&text, role), model(&message, role), "{} as {:?}", text, role);
            check_error_message(&text, role)?;
        }
    }

    /// The permission table, type by type: a message that passes every other
    /// check is FORBIDDEN for exactly the roles the table refuses, with its id
    /// echoed; the checks before the role check answer the same for both roles.
    #[test]
    fn permission_table_is_respected(
        index in 0..PERMISSIONS.len(),
        id in prop_oneof![Just(None), "[a-z0-9]{1,6}".prop_map(|s| Some(json!(s))), any::<i32>().prop_map(|n| Some(json!(n)))],
        patch in object(),
        item in "[A-Za-z0-9_-]{1,64}",
    ) {
        let (ty, controller, viewer) = PERMISSIONS[index];
        let mut payload = patch;
        payload.insert("itemId".into(), json!(item));
        let mut message = json!({"type": ty, "payload": payload, "token": "a.b.c"});
        if let Some(id) = &id {
            message["id"] = id.clone();
        }
        let text = message.to_string();
        for (role, allowed) in [(Role::Controller, controller), (Role::Viewer, viewer)] {
            let outcome = actual(&text, role);
            if allowed {
                prop_assert!(!matches!(outcome, Outcome::Refused { .. } | Outcome::Unsupported),
                    "{} refused for {:?}: {:?}", ty, role, outcome);
            } else {
                prop_assert_eq!(outcome, Outcome::Refused {
                    code: "FORBIDDEN",
                    id: id.as_ref().map(Value::to_string),
                });
            }
        }
    }

    /// merge_patch is RFC 7386 §2 exactly, for any target and any patch.
    #[test]
    fn merge_patch_is_rfc7386(target in value(), patch in value()) {
        prop_assert_eq!(merged(&target, &patch), rfc7386(&target, &patch));
    }

    /// Applying a patch twice equals applying it once.
    #[test]
    fn merge_patch_is_idempotent(target in value(), patch in value()) {
        let once = merged(&target, &patch);
        prop_assert_eq!(merged(&once, &patch), once);
    }

    /// A `null` for a key removes it, whatever the target held there.
    #[test]
    fn null_removes_the_key(target in object(), mut patch in object(), name in key()) {
        patch.insert(name.clone(), Value::Null);
        let result = merged(&Value::Object(target), &Value::Object(patch));
        prop_assert!(result.as_object().is_some_and(|m| !m.contains_key(&name)), "{}", result);
    }

    /// An object patch on a target without null members never leaves a null
    /// member behind: patch nulls delete, they are not stored.
    #[test]
    fn patch_introduces_no_null_members(target in null_free_object(), patch in object()) {
        let result = merged(&Value::Object(target), &Value::Object(patch));
        prop_assert!(!has_null_member(&result), "{}", result);
    }

    /// `{}` leaves an object unchanged (and makes anything else `{}`).
    #[test]
    fn empty_patch_changes_nothing(target in value()) {
        let result = merged(&target, &json!({}));
        if target.is_object() {
            prop_assert_eq!(result, target);
        } else {
            prop_assert_eq!(result, json!({}));
        }
    }

    /// A patch that is not an object replaces the target.
    #[test]
    fn non_object_patch_replaces(target in value(), patch in value().prop_filter("not an object", |v| !v.is_object())) {
        prop_assert_eq!(merged(&target, &patch), patch);
    }

    /// The three kinds of change the writer applies: `Merge` is merge_patch on
    /// the state, `Item` is merge_patch on `state.items[itemId]` (a non-object
    /// `items` replaced by an object) leaving every other key alone, `Replace`
    /// replaces; Merge and Item are idempotent too.
    #[test]
    fn changes_are_merge_patches(
        state in object(),
        patch in object(),
        item in "[A-Za-z0-9_-]{1,8}",
    ) {
        let before = Value::Object(state.clone());

        let merge = Change::Merge(patch.clone());
        let after = applied(&state, &merge);
        prop_assert_eq!(Value::Object(after.clone()), rfc7386(&before, &Value::Object(patch.clone())));
        prop_assert_eq!(applied(&after, &merge), after);

        let change = Change::Item { item_id: item.clone(), patch: patch.clone() };
        let after = applied(&state, &change);
        let old_item = state.get("items").and_then(|i| i.get(&item)).cloned().unwrap_or(Value::Null);
        prop_assert_eq!(&after["items"][&item], &rfc7386(&old_item, &Value::Object(patch.clone())));
        if let Some(Value::Object(old_items)) = state.get("items") {
            for (k, v) in old_items.iter().filter(|(k, _)| **k != item) {
                prop_assert_eq!(&after["items"][k], v, "item {} kept", k);
            }
        }
        for (k, v) in state.iter().filter(|(k, _)| *k != "items") {
            prop_assert_eq!(&after[k], v, "key {} kept", k);
        }
        prop_assert_eq!(applied(&after, &change), after);

        let replace = Change::Replace(patch.clone());
        prop_assert_eq!(applied(&state, &replace), patch);
    }
}

/// Numbers the strategies must not produce (a guard for the round-trip
/// assumption behind [`number`]): every generated float is a multiple of 1/8.
#[test]
fn generated_floats_round_trip() {
    for n in -4000i32..4000 {
        let v = Value::from(f64::from(n) / 8.0);
        let back: Value = serde_json::from_str(&v.to_string()).expect("JSON");
        assert_eq!(back, v);
        assert!(matches!(v, Value::Number(ref x) if x.is_f64()));
    }
    let _: Number = Number::from(1u64 << 53);
}

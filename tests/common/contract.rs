//! The machine-readable contract as the tests hold the server to it:
//! docs/openapi.json and docs/messages.schema.json, loaded and compiled once,
//! and the checks the harness runs on every server message and REST answer it
//! sees (`check_server_message`, `check_response`).
//!
//! A failed check panics with the route or message, what the document says
//! and what the server sent, so a disagreement between SPEC, the documents
//! and the server is found where it happens, in whichever test it happens.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::{Draft, Registry, Validator};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

pub const OPENAPI_TEXT: &str = include_str!("../../docs/openapi.json");
pub const MESSAGES_TEXT: &str = include_str!("../../docs/messages.schema.json");
/// The OpenAPI 3.1 meta-schema (the OpenAPI Initiative's, 2022-10-07,
/// Apache-2.0), vendored so the check runs offline.
pub const OAS_31_SCHEMA_TEXT: &str = include_str!("../data/oas-3.1.schema.json");

/// Where the two documents live for reference resolution: the OpenAPI
/// document refers to `messages.schema.json#/$defs/…`, relative to itself, as
/// a client that fetched `/api/openapi.json` finds it at
/// `/api/messages.schema.json`. The host is reserved (RFC 2606): nothing is
/// ever fetched.
pub const BASE: &str = "https://portal-sync.invalid/api/";

struct Contract {
    openapi: Value,
    registry: Registry<'static>,
    /// Compiled schemas by URI (`openapi.json#/paths/…`), built on first use.
    validators: Mutex<HashMap<String, Arc<Validator>>>,
}

fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let openapi: Value = serde_json::from_str(OPENAPI_TEXT).expect("docs/openapi.json is JSON");
        let messages: Value =
            serde_json::from_str(MESSAGES_TEXT).expect("docs/messages.schema.json is JSON");
        let registry = Registry::new()
            .draft(Draft::Draft202012)
            .add(format!("{BASE}openapi.json"), openapi.clone())
            .expect("openapi.json registered")
            .add(format!("{BASE}messages.schema.json"), messages)
            .expect("messages.schema.json registered")
            .prepare()
            .expect("the contract's registry");
        Contract {
            openapi,
            registry,
            validators: Mutex::new(HashMap::new()),
        }
    })
}

/// The parsed OpenAPI document.
pub fn openapi() -> &'static Value {
    &contract().openapi
}

/// The compiled schema at `uri` (`openapi.json#/…` or
/// `messages.schema.json#/…`, relative to [`BASE`]); panics when it does not
/// compile or a `$ref` in it does not resolve.
pub fn validator(uri: &str) -> Arc<Validator> {
    let contract = contract();
    let cached = lock(&contract.validators).get(uri).cloned();
    if let Some(v) = cached {
        return v;
    }
    let compiled = jsonschema::options()
        .with_draft(Draft::Draft202012)
        .with_registry(&contract.registry)
        .build(&json!({ "$ref": format!("{BASE}{}", percent_encode(uri)) }))
        .unwrap_or_else(|e| panic!("the schema at {uri} does not compile: {e}"));
    let compiled = Arc::new(compiled);
    lock(&contract.validators).insert(uri.to_string(), compiled.clone());
    compiled
}

/// A JSON Pointer in a URI fragment (RFC 6901 §6): what a fragment may not
/// hold (`{id}` of a path template, say) percent-encoded.
fn percent_encode(uri: &str) -> String {
    let mut out = String::with_capacity(uri.len());
    for c in uri.chars() {
        if c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?#%".contains(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// A test that panicked elsewhere does not spoil the cache for the others.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every error of `instance` against the schema at `uri`, as text.
pub fn errors(uri: &str, instance: &Value) -> Vec<String> {
    validator(uri)
        .iter_errors(instance)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect()
}

fn assert_valid(uri: &str, instance: &Value, context: &str) {
    let errors = errors(uri, instance);
    assert!(
        errors.is_empty(),
        "contract: {context} does not match {uri}:\n  {}\n  sent: {instance}",
        errors.join("\n  ")
    );
}

/// Any message the server sends (WebSocket frame, SSE event data, a POST's
/// reply) matches `messages.schema.json#/$defs/ServerMessage`.
pub fn check_server_message(message: &Value) {
    const ANY: &str = "messages.schema.json#/$defs/ServerMessage";
    if validator(ANY).is_valid(message) {
        return;
    }
    // `oneOf` says only "no branch matched": name the errors of the
    // branches whose `type` this message has.
    let defs = &messages_schema()["$defs"];
    let mut detail = Vec::new();
    for branch in defs["ServerMessage"]["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = branch["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix("#/$defs/"))
        else {
            continue;
        };
        if defs[name]["properties"]["type"]["const"] == message["type"] {
            let uri = format!("messages.schema.json#/$defs/{name}");
            detail.push(format!("as {name}: {}", errors(&uri, message).join("; ")));
        }
    }
    if detail.is_empty() {
        detail.push(format!("no server message has type {}", message["type"]));
    }
    panic!(
        "contract: a server message does not match {ANY}:\n  {}\n  sent: {message}",
        detail.join("\n  ")
    );
}

/// The parsed message schema.
pub fn messages_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| serde_json::from_str(MESSAGES_TEXT).expect("messages.schema.json"))
}

/// Whether `message` is a client message of the schema (for the tests of the
/// schema itself: the harness sends bad messages on purpose).
pub fn client_message_errors(message: &Value) -> Vec<String> {
    errors("messages.schema.json#/$defs/ClientMessage", message)
}

/// The OpenAPI path template that serves `path` (a request's path, no query):
/// `{x}` stands for one non-empty segment; a path item marked
/// `x-portal-sync-prefix` serves every path below it too. One trailing `/`
/// is ignored, as the router ignores it.
pub fn route_template(path: &str) -> Option<&'static str> {
    let concrete = segments(path);
    let paths = openapi()["paths"].as_object().expect("paths");
    paths.iter().find_map(|(template, item)| {
        let pattern = segments(template);
        let prefix = item["x-portal-sync-prefix"] == true;
        let fits = pattern.iter().zip(&concrete).all(|(p, s)| {
            if p.starts_with('{') && p.ends_with('}') {
                !s.is_empty()
            } else {
                p == s
            }
        });
        let length = if prefix {
            concrete.len() >= pattern.len()
        } else {
            concrete.len() == pattern.len()
        };
        (fits && length).then_some(template.as_str())
    })
}

/// `/a/b/` → `["a", "b"]`; `/` → `[]`.
fn segments(path: &str) -> Vec<&str> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    }
}

/// The methods a path item documents, upper case (`options` included).
pub fn documented_methods(template: &str) -> BTreeSet<String> {
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    openapi()["paths"][template]
        .as_object()
        .map(|item| {
            item.keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(|k| k.to_ascii_uppercase())
                .collect()
        })
        .unwrap_or_default()
}

/// JSON Pointer escaping (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Follows a `#/components/…` reference inside the OpenAPI document; returns
/// the object and its pointer.
fn resolve(pointer: String, value: &'static Value) -> (String, &'static Value) {
    match value.get("$ref").and_then(Value::as_str) {
        Some(target) => {
            let local = target
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local refs here: {target}"));
            let found = openapi()
                .pointer(local)
                .unwrap_or_else(|| panic!("{target} does not resolve"));
            resolve(local.to_string(), found)
        }
        None => (pointer, value),
    }
}

fn media_essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media: &str) -> bool {
    media == "application/json" || media.ends_with("+json")
}

/// An error body as every route sends it, with this code (and message).
fn assert_error_body(body: &[u8], code: &str, message: Option<&str>, context: &str) {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("contract: {context}: the body is not JSON ({e})"));
    assert_valid(
        "openapi.json#/components/schemas/ErrorBody",
        &value,
        context,
    );
    assert_eq!(value["error"]["code"], code, "contract: {context}: {value}");
    if let Some(message) = message {
        assert_eq!(value["error"]["message"], message, "contract: {context}");
    }
}

/// Checks one HTTP answer against the OpenAPI document: its route and method
/// are documented (or it is the router's 404 / 405, with `Allow` naming the
/// documented methods), its status is documented for that operation, its
/// `Content-Type` is one the document lists, its JSON body validates against
/// that schema, and every required header is there and matches. `body` is
/// `None` for a stream whose body the caller reads itself (SSE).
pub fn check_response(
    method: &str,
    path: &str,
    status: u16,
    headers: &HeaderMap,
    body: Option<&[u8]>,
) {
    let context = format!("{method} {path} → {status}");
    let Some(template) = route_template(path) else {
        assert_eq!(
            status, 404,
            "contract: {context}: no path of docs/openapi.json serves {path:?}; \
             a new route needs its path item there"
        );
        if let Some(body) = body {
            assert_error_body(body, "NOT_FOUND", Some("no such route"), &context);
        }
        return;
    };
    let lower = method.to_ascii_lowercase();
    let item = &openapi()["paths"][template];
    let documented = documented_methods(template);
    if status == 405 || item.get(&lower).is_none() {
        assert_eq!(
            status, 405,
            "contract: {context}: {method} is not documented on {template}"
        );
        let allow: BTreeSet<String> = headers
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("contract: {context}: a 405 carries Allow"))
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .collect();
        let without_options = |set: &BTreeSet<String>| -> BTreeSet<String> {
            set.iter().filter(|m| *m != "OPTIONS").cloned().collect()
        };
        assert_eq!(
            without_options(&allow),
            without_options(&documented),
            "contract: {context}: Allow names the documented methods of {template}"
        );
        assert!(
            !allow.contains("OPTIONS") || documented.contains("OPTIONS"),
            "contract: {context}: Allow names OPTIONS, which {template} does not document"
        );
        if let Some(body) = body {
            assert_error_body(body, "METHOD_NOT_ALLOWED", None, &context);
        }
        return;
    }
    let op_pointer = format!("/paths/{}/{lower}", escape(template));
    let responses = &item[&lower]["responses"];
    let key = status.to_string();
    let range = format!("{}XX", status / 100);
    let (key, response) = [key.as_str(), range.as_str(), "default"]
        .into_iter()
        .find_map(|k| responses.get(k).map(|r| (k.to_string(), r)))
        .unwrap_or_else(|| {
            panic!(
                "contract: {context}: status {status} is not documented for {} {template} \
                 (documented: {:?})",
                method,
                responses.as_object().map(|o| o.keys().collect::<Vec<_>>())
            )
        });
    let (pointer, response) = resolve(format!("{op_pointer}/responses/{key}"), response);

    // Headers the document requires, and their values.
    if let Some(documented_headers) = response["headers"].as_object() {
        for (name, header) in documented_headers {
            let (hpointer, header) = resolve(format!("{pointer}/headers/{}", escape(name)), header);
            let value = headers.get(name.as_str()).and_then(|v| v.to_str().ok());
            match value {
                None => assert!(
                    header["required"] != true,
                    "contract: {context}: the header {name} is required"
                ),
                Some(value) if header.get("schema").is_some() => assert_valid(
                    &format!("openapi.json#{hpointer}/schema"),
                    &Value::String(value.to_string()),
                    &format!("{context}, header {name}"),
                ),
                Some(_) => {}
            }
        }
    }

    let has_body = !(method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304);
    let Some(content) = response["content"].as_object() else {
        if let Some(body) = body {
            assert!(
                body.is_empty(),
                "contract: {context}: the document gives no body, the server sent {} bytes",
                body.len()
            );
        }
        return;
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("contract: {context}: a body needs a Content-Type"));
    let media = media_essence(content_type);
    let Some((media_key, _)) = content.iter().find(|(k, _)| media_essence(k) == media) else {
        panic!(
            "contract: {context}: Content-Type {content_type:?} is not one of {:?}",
            content.keys().collect::<Vec<_>>()
        );
    };
    let Some(body) = body.filter(|_| has_body) else {
        return;
    };
    if is_json(&media) && content[media_key].get("schema").is_some() {
        let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "contract: {context}: the body is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        });
        let uri = format!(
            "openapi.json#{pointer}/content/{}/schema",
            escape(media_key)
        );
        assert_valid(&uri, &value, &context);
    }
}

/// Every schema in the OpenAPI document, as URIs [`validator`] takes: the
/// components' and every operation's request and response bodies and headers.
pub fn all_schema_uris() -> Vec<String> {
    fn walk(value: &Value, pointer: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let p = format!("{pointer}/{}", escape(k));
                    if (k == "schema" && v.is_object()) || k == "x-portal-sync-events" {
                        out.push(format!("openapi.json#{p}"));
                    } else {
                        walk(v, &p, out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{pointer}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&openapi()["paths"], "/paths", &mut out);
    walk(
        &openapi()["components"]["responses"],
        "/components/responses",
        &mut out,
    );
    walk(
        &openapi()["components"]["headers"],
        "/components/headers",
        &mut out,
    );
    walk(
        &openapi()["components"]["parameters"],
        "/components/parameters",
        &mut out,
    );
    if let Some(schemas) = openapi()["components"]["schemas"].as_object() {
        for name in schemas.keys() {
            out.push(format!("openapi.json#/components/schemas/{}", escape(name)));
        }
    }
    out
}

/// What an HTTP request answered, its body read whole.
pub struct Answered {
    pub status: reqwest::StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// Sends `request`, reads the whole answer and checks it with
/// [`check_response`]: the one path the harness's REST helpers take.
pub async fn send_checked(request: reqwest::RequestBuilder) -> Answered {
    let (client, request) = request.build_split();
    let request = request.expect("the request builds");
    let method = request.method().as_str().to_string();
    let path = request.url().path().to_string();
    let response = client.execute(request).await.expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("body read");
    check_response(&method, &path, status.as_u16(), &headers, Some(&body));
    Answered {
        status,
        headers,
        body,
    }
}

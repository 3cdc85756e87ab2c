//! The machine-readable contract (docs/openapi.json, docs/messages.schema.json):
//! both documents are valid, the server serves them byte for byte, every route
//! the router serves is documented and every documented route is served, and
//! the checks the harness runs on every answer (tests/common/contract.rs) do
//! catch what they are for.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use portal_sync::http::router::ROUTE_METHODS;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

fn panics(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the check should have failed");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn json_headers(extra: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in extra {
        headers.insert(*name, HeaderValue::from_str(value).expect("header"));
    }
    headers
}

/// Every local `$ref` of a document, with where it is.
fn refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(target) = v.as_str() {
                        out.push((at.to_string(), target.to_string()));
                    }
                } else {
                    refs(v, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// The documents themselves

#[test]
fn openapi_document_is_valid_openapi_3_1() {
    let doc = contract::openapi();
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3.1."), "openapi = {version:?}");

    // The OpenAPI Initiative's own schema of a 3.1 document.
    let meta: Value = serde_json::from_str(contract::OAS_31_SCHEMA_TEXT).expect("meta-schema");
    let validator = jsonschema::validator_for(&meta).expect("the OAS 3.1 schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "not OpenAPI 3.1:\n{}", errors.join("\n"));
    // The meta-schema does bite: no `info`, or a 3.0 version, is refused.
    for broken in [
        {
            let mut d = doc.clone();
            d.as_object_mut().expect("object").remove("info");
            d
        },
        {
            let mut d = doc.clone();
            d["openapi"] = json!("3.0.3");
            d
        },
        {
            let mut d = doc.clone();
            d["paths"]["/health"]["get"]["responses"] = json!([]);
            d
        },
    ] {
        assert!(!validator.is_valid(&broken));
    }

    // Every reference resolves: in this document, or in the message schema.
    let messages: Value = serde_json::from_str(contract::MESSAGES_TEXT).expect("messages");
    let mut found = Vec::new();
    refs(doc, "", &mut found);
    assert!(found.len() > 50, "the document uses its components");
    for (at, target) in found {
        let (file, pointer) = target.split_once('#').expect("refs carry a fragment");
        let base = match file {
            "" => doc,
            "messages.schema.json" => &messages,
            other => panic!("{at}: a reference to {other:?}, which is not ours"),
        };
        assert!(
            base.pointer(pointer).is_some(),
            "{at}: {target} does not resolve"
        );
    }
    // And every schema in it compiles (with its references) as JSON Schema 2020-12.
    let uris = contract::all_schema_uris();
    assert!(uris.len() > 80, "{} schemas", uris.len());
    for uri in uris {
        contract::validator(&uri);
    }
}

#[test]
fn message_schema_is_valid_json_schema_2020_12() {
    let schema: Value = serde_json::from_str(contract::MESSAGES_TEXT).expect("JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("not a 2020-12 schema: {e} at {}", e.instance_path());
    }
    let mut broken = schema.clone();
    broken["$defs"]["Ack"]["type"] = json!("objekt");
    assert!(jsonschema::draft202012::meta::validate(&broken).is_err());
    let mut found = Vec::new();
    refs(&schema, "", &mut found);
    for (at, target) in found {
        let pointer = target.strip_prefix('#').expect("local refs only");
        assert!(schema.pointer(pointer).is_some(), "{at}: {target}");
    }
    for name in schema["$defs"].as_object().expect("$defs").keys() {
        contract::validator(&format!("messages.schema.json#/$defs/{name}"));
    }
}

/// The examples of SPEC §3, §3.1, §3.3, §7 and §9 are valid server messages;
/// each altered in one way (a stray field, a wrong value) is not.
#[test]
fn message_schema_takes_specs_examples_and_refuses_strays() {
    let cid = "0123456789abcdef01234567";
    let valid = [
        json!({"type":"connected","portalViewId":"pv1","connectionId":cid,"userId":"u1",
               "role":"controller","state":{"a":1},"version":12,
               "presence":{"controllers":1,"viewers":3,"connections":5}}),
        json!({"type":"presence","joined":[{"userId":"u2","role":"viewer"}],"left":[],
               "presence":{"controllers":1,"viewers":1,"connections":2}}),
        json!({"type":"portal-view-update","payload":{"currentItem":2},"version":13,
               "from":{"userId":"u1","connectionId":cid}}),
        json!({"type":"portal-view-update","payload":{},"version":1,
               "from":{"userId":"u1"},"source":"rest"}),
        json!({"type":"item-update","payload":{"itemId":7,"title":"x"},"version":2,
               "from":{"userId":"u1","connectionId":cid}}),
        json!({"type":"sync-response","payload":{},"version":3,"from":{"userId":"u1"}}),
        json!({"type":"sync-response","payload":{"a":1},"version":0,"source":"server","id":"r"}),
        json!({"type":"request-sync","from":{"userId":"u3","connectionId":cid}}),
        json!({"type":"ack","id":"m1","version":13}),
        json!({"type":"ack","id":7,"version":1}),
        json!({"type":"pong","timestamp":1700000000000u64}),
        json!({"type":"error","code":"FORBIDDEN","message":"viewers cannot","id":"x"}),
        json!({"type":"token-refreshed","exp":1700000000,"id":1}),
        json!({"type":"token-expiring","exp":1700000000}),
        json!({"type":"closed","code":1008,"reason":"access revoked"}),
    ];
    for message in &valid {
        contract::check_server_message(message);
    }
    let invalid = [
        // A stray field.
        json!({"type":"connected","portalViewId":"pv1","connectionId":cid,"userId":"u1",
               "role":"controller","state":{},"version":0,"extra":1,
               "presence":{"controllers":1,"viewers":0,"connections":1}}),
        // A role SPEC does not have.
        json!({"type":"presence","joined":[{"userId":"u2","role":"owner"}],"left":[],
               "presence":{"controllers":1,"viewers":1,"connections":2}}),
        // A REST broadcast names no connection.
        json!({"type":"portal-view-update","payload":{},"version":1,
               "from":{"userId":"u1","connectionId":cid},"source":"rest"}),
        // A broadcast's version is at least 1; its payload an object.
        json!({"type":"portal-view-update","payload":{},"version":0,"from":{"userId":"u1"}}),
        json!({"type":"portal-view-update","payload":[1],"version":1,"from":{"userId":"u1"}}),
        json!({"type":"item-update","payload":{"title":"x"},"version":2,"from":{"userId":"u1"}}),
        // The viewer's payload is never forwarded.
        json!({"type":"request-sync","from":{"userId":"u3"},"payload":{}}),
        json!({"type":"ack","version":1}),
        json!({"type":"ack","id":null,"version":1}),
        json!({"type":"error","code":"ACCESS_DENIED","message":"no"}),
        json!({"type":"error","code":"BAD_REQUEST","message":""}),
        json!({"type":"pong","timestamp":"now"}),
        json!({"type":"closed","code":1008}),
        json!({"type":"hello"}),
    ];
    for message in &invalid {
        let message_text = panics(|| contract::check_server_message(message));
        assert!(message_text.contains("ServerMessage"), "{message_text}");
    }
}

/// What the client schema accepts, the server accepts (no `error` reply);
/// what it refuses, the server refuses with `BAD_REQUEST`.
#[tokio::test]
async fn client_schema_agrees_with_the_server() {
    let app = spawn_app().await;
    let mut controller = app.connect("pv1", "owner").await;
    let mut viewer = app.connect("pv1", "v1").await;
    let accepted = [
        (json!({"type":"ping","id":"p"}), "pong"),
        (
            json!({"type":"portal-view-update","payload":{"a":1},"id":1}),
            "ack",
        ),
        (
            json!({"type":"item-update","payload":{"itemId":"i-1","t":2},"id":"i"}),
            "ack",
        ),
        (
            json!({"type":"item-update","payload":{"itemId":9007199254740992u64},"id":"big"}),
            "ack",
        ),
        (
            json!({"type":"sync-response","payload":{"b":2},"id":"s"}),
            "ack",
        ),
    ];
    for (message, reply) in accepted {
        let errors = contract::client_message_errors(&message);
        assert!(errors.is_empty(), "{message}: {errors:?}");
        controller.send(message.clone()).await;
        let answer = controller.recv_type(reply).await;
        assert_eq!(answer["id"], message["id"], "{answer}");
    }
    let request = json!({"type":"request-sync","payload":{"anything":true}});
    assert!(contract::client_message_errors(&request).is_empty());
    viewer.send(request).await;
    let forward = controller.recv_type("request-sync").await;
    assert_eq!(forward["from"]["userId"], "v1");

    let refused = [
        json!({"type":"portal-view-update","payload":[1],"id":"a"}),
        json!({"type":"portal-view-update","id":"b"}),
        json!({"type":"item-update","payload":{"itemId":"a b"},"id":"c"}),
        json!({"type":"item-update","payload":{"itemId":-1},"id":"d"}),
        json!({"type":"item-update","payload":{"itemId":9007199254740993u64},"id":"e"}),
        json!({"type":"sync-response","payload":"x","id":"f"}),
        json!({"type":"ping","id":null}),
        json!({"type":"ping","id":[1]}),
    ];
    for message in refused {
        assert!(
            !contract::client_message_errors(&message).is_empty(),
            "the schema should refuse {message}"
        );
        controller.send(message.clone()).await;
        let error = controller.recv_type("error").await;
        assert_eq!(error["code"], "BAD_REQUEST", "{message}: {error}");
    }
}

// ---------------------------------------------------------------------------
// Served as they are kept

#[tokio::test]
async fn the_documents_are_served_byte_for_byte_and_cacheable() {
    let app = spawn_app().await;
    for (path, text) in [
        ("/api/openapi.json", contract::OPENAPI_TEXT),
        ("/api/messages.schema.json", contract::MESSAGES_TEXT),
    ] {
        let answer = contract::send_checked(app.http().get(app.http_url(path))).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.headers["content-type"], "application/json", "{path}");
        assert_eq!(
            &answer.body[..],
            text.as_bytes(),
            "{path} is the docs/ file"
        );
        let etag = answer.headers["etag"].to_str().expect("etag").to_string();
        let again = contract::send_checked(
            app.http()
                .get(app.http_url(path))
                .header("if-none-match", &etag),
        )
        .await;
        assert_eq!(again.status, 304, "{path} revalidates");
        assert!(again.body.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Every route documented, every documented route served

/// `ROUTE_METHODS`' pattern as an OpenAPI path with its parameters blanked:
/// `["api", "portal-views", "*"]` → `/api/portal-views/{}`; `**` → a prefix.
fn pattern_path(pattern: &[&str]) -> (String, bool) {
    let prefix = pattern.last() == Some(&"**");
    let fixed = if prefix {
        &pattern[..pattern.len() - 1]
    } else {
        pattern
    };
    let path: Vec<&str> = fixed
        .iter()
        .map(|s| if *s == "*" { "{}" } else { s })
        .collect();
    let mut path = format!("/{}", path.join("/"));
    if prefix {
        path.push('/');
    }
    (path, prefix)
}

fn blank_params(template: &str) -> String {
    template
        .split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn the_router_and_the_document_name_the_same_routes_and_methods() {
    let doc = contract::openapi();
    let paths = doc["paths"].as_object().expect("paths");
    let mut undocumented = Vec::new();
    let mut seen = BTreeSet::new();
    for (pattern, methods, preflight) in ROUTE_METHODS {
        let (path, prefix) = pattern_path(pattern);
        let Some((template, item)) = paths.iter().find(|(t, _)| blank_params(t) == path) else {
            undocumented.push(path);
            continue;
        };
        seen.insert(template.clone());
        assert_eq!(
            item["x-portal-sync-prefix"] == true,
            prefix,
            "{template}: a prefix route is marked x-portal-sync-prefix, and only it"
        );
        let mut served: BTreeSet<String> = methods.split(", ").map(str::to_string).collect();
        if *preflight {
            served.insert("OPTIONS".into());
        }
        assert_eq!(
            served,
            contract::documented_methods(template),
            "{template}: the methods the router serves (ROUTE_METHODS) and the document's"
        );
    }
    assert!(
        undocumented.is_empty(),
        "routes the router serves that docs/openapi.json does not document: {undocumented:?}"
    );
    let extra: Vec<&String> = paths.keys().filter(|t| !seen.contains(*t)).collect();
    assert!(
        extra.is_empty(),
        "paths docs/openapi.json documents that ROUTE_METHODS does not serve: {extra:?}"
    );
}

/// Every documented method of every documented path, on a real server with
/// real values: each answers its success status (checked against the
/// document on the way), so no documented route is the router's 404.
#[tokio::test]
async fn every_documented_route_is_served() {
    const ORIGIN: &str = "https://app.example.test";
    let app = spawn_app_with(|c| c.allowed_origins = vec![ORIGIN.into()]).await;
    let token = app.token("owner");
    let fill = |template: &str| {
        template
            .replace("{id}", "pv1")
            .replace("{libraryId}", "lib1")
            .replace("{userId}", "v2")
            .replace("{name}", "app.js")
    };
    let doc = contract::openapi();
    let mut tried = 0;
    for (template, _) in doc["paths"].as_object().expect("paths") {
        let path = fill(template);
        assert!(!path.contains('{'), "a parameter left in {path}");
        let url = app.http_url(&path);
        for method in contract::documented_methods(template) {
            tried += 1;
            let http = app.http();
            let (request, expected) = match (method.as_str(), template.as_str()) {
                ("OPTIONS", _) => (
                    http.request(reqwest::Method::OPTIONS, &url)
                        .header("origin", ORIGIN)
                        .header("access-control-request-method", "GET"),
                    204,
                ),
                ("GET", "/ws/portal-view/{id}") => {
                    // The upgrade (the harness checks `connected`), and a
                    // plain GET, which is its documented 426.
                    drop(app.connect("pv1", "owner").await);
                    (http.get(&url), 426)
                }
                ("GET", "/socket.io/") => (http.get(&url), 426),
                ("GET", "/sse/portal-view/{id}") => {
                    // The harness checks its status, headers and `connected`.
                    drop(app.sse("pv1", "owner").await);
                    continue;
                }
                ("GET", "/api/portal-views/{id}") => (http.get(&url).bearer_auth(&token), 200),
                ("PATCH", _) => (
                    http.patch(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/merge-patch+json")
                        .body(r#"{"a":1}"#),
                    200,
                ),
                ("POST", _) => (
                    http.post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(r#"{"type":"ping","id":1}"#),
                    200,
                ),
                ("PUT", _) => (
                    http.put(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(r#"{"role":"EDITOR"}"#),
                    200,
                ),
                ("DELETE", _) => (http.delete(&url).bearer_auth(&token), 204),
                ("GET", _) => (http.get(&url), 200),
                ("HEAD", _) => (http.head(&url), 200),
                (other, _) => panic!("{other} {template}: no probe for this method"),
            };
            let answer = contract::send_checked(request).await;
            assert_eq!(
                answer.status.as_u16(),
                expected,
                "{method} {path}: {}",
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    assert!(tried >= 20, "{tried} routes tried");
}

#[tokio::test]
async fn a_route_the_document_does_not_name_is_404() {
    let app = spawn_app().await;
    for path in [
        "/api/nope",
        "/api/portal-views/pv1/nope",
        "/api/portal-views/",
        "/nothing",
        "/assets",
    ] {
        assert_eq!(contract::route_template(path), None, "{path}");
        let answer = contract::send_checked(app.http().get(app.http_url(path))).await;
        assert_eq!(answer.status, 404, "{path}");
        let body: Value = serde_json::from_slice(&answer.body).expect("JSON");
        assert_eq!(
            body,
            json!({"error":{"code":"NOT_FOUND","message":"no such route"}}),
            "{path}"
        );
    }
    // A documented path with a method it does not document: 405 with the
    // document's methods in Allow (send_checked compares them).
    let answer = contract::send_checked(app.http().delete(app.http_url("/health"))).await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.headers["allow"], "GET");
}

// ---------------------------------------------------------------------------
// The checks catch what they are for

#[test]
fn route_templates_match_as_the_router_does() {
    let cases = [
        ("/", Some("/")),
        ("/health", Some("/health")),
        ("/health/", Some("/health")),
        ("/api/portal-views/pv1", Some("/api/portal-views/{id}")),
        (
            "/api/portal-views/pv1/messages",
            Some("/api/portal-views/{id}/messages"),
        ),
        (
            "/api/libraries/l/members/u",
            Some("/api/libraries/{libraryId}/members/{userId}"),
        ),
        ("/socket.io/", Some("/socket.io/")),
        ("/socket.io/a/b", Some("/socket.io/")),
        ("/api/openapi.json", Some("/api/openapi.json")),
        ("/api/portal-views//messages", None),
        ("/ws/portal-view", None),
    ];
    for (path, template) in cases {
        assert_eq!(contract::route_template(path), template, "{path}");
    }
}

#[test]
fn check_response_refuses_what_the_document_does_not_say() {
    let view = json!({"id":"pv1","libraryId":"lib1","name":"View 1","state":{},"version":3,
                      "updatedAt":null,"presence":{"controllers":0,"viewers":0,"connections":0}});
    let body = view.to_string();
    let etag = [("etag", "\"3\"")];
    // The well-formed answer passes.
    contract::check_response(
        "GET",
        "/api/portal-views/pv1",
        200,
        &json_headers(&etag),
        Some(body.as_bytes()),
    );
    let failures = [
        // An undocumented route answering.
        panics(|| contract::check_response("GET", "/api/nope", 200, &json_headers(&[]), None)),
        // An undocumented status.
        panics(|| contract::check_response("GET", "/health", 418, &json_headers(&[]), None)),
        // A stray field in the body.
        panics(|| {
            let mut stray = view.clone();
            stray["extra"] = json!(1);
            let text = stray.to_string();
            contract::check_response(
                "GET",
                "/api/portal-views/pv1",
                200,
                &json_headers(&etag),
                Some(text.as_bytes()),
            )
        }),
        // A required header missing, and one of the wrong form.
        panics(|| {
            contract::check_response(
                "GET",
                "/api/portal-views/pv1",
                200,
                &json_headers(&[]),
                Some(body.as_bytes()),
            )
        }),
        panics(|| {
            contract::check_response(
                "GET",
                "/api/portal-views/pv1",
                200,
                &json_headers(&[("etag", "W/\"3\"")]),
                Some(body.as_bytes()),
            )
        }),
        // The wrong Content-Type.
        panics(|| {
            let mut headers = json_headers(&etag);
            headers.insert("content-type", HeaderValue::from_static("text/plain"));
            contract::check_response(
                "GET",
                "/api/portal-views/pv1",
                200,
                &headers,
                Some(body.as_bytes()),
            )
        }),
        // An error body of another shape.
        panics(|| {
            contract::check_response(
                "GET",
                "/api/portal-views/pv1",
                404,
                &json_headers(&[]),
                Some(br#"{"error":"not found"}"#),
            )
        }),
        // A 405 whose Allow disagrees with the document.
        panics(|| {
            contract::check_response(
                "DELETE",
                "/health",
                405,
                &json_headers(&[("allow", "GET, POST")]),
                Some(br#"{"error":{"code":"METHOD_NOT_ALLOWED","message":"m"}}"#),
            )
        }),
    ];
    for failure in failures {
        assert!(failure.contains("contract:"), "{failure}");
    }
}

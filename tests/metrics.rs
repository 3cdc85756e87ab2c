//! `GET /metrics` after real traffic (issue 16, item 2): the process family
//! and the build, handshake refusals by reason and transport, and request
//! durations by route pattern and method, with bounded labels and no
//! WebSocket or SSE session counted as a (slow) request.

mod common;
use common::*;

use std::time::Duration;

use portal_sync::protocol::auth::now_secs;
use serde_json::json;

/// The value of one series (`name{labels}` exactly as exported), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("a number"))
    })
}

/// Every series line of the family `name` (its `_bucket`, `_sum`, `_count`
/// lines for a histogram).
fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
        })
        .collect()
}

fn refusals(text: &str, reason: &str, transport: &str) -> f64 {
    let series = format!(
        "portal_handshakes_refused_by_reason_total{{reason=\"{reason}\",transport=\"{transport}\"}}"
    );
    sample(text, &series).unwrap_or(0.0)
}

/// The process metrics of Prometheus's conventions and `portal_build_info`.
#[tokio::test]
async fn process_metrics_and_the_build_are_exported() {
    let app = spawn_app().await;
    let text = metrics(&app).await;
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("portal_build_info", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is a {kind}: {text}"
        );
    }
    let positive = |series: &str| {
        let value = sample(&text, series).unwrap_or_else(|| panic!("{series} in {text}"));
        assert!(value > 0.0, "{series} = {value}");
        value
    };
    positive("process_resident_memory_bytes");
    let virt = positive("process_virtual_memory_bytes");
    assert!(virt >= positive("process_resident_memory_bytes"));
    // This test process holds the database, the listener and the scrape.
    let open = positive("process_open_fds");
    assert!(open < positive("process_max_fds"));
    let started = positive("process_start_time_seconds");
    let now = now_secs() as f64;
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "the process started within the hour: {started} vs {now}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "portal_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
}

/// Each refused handshake adds exactly 1 to its reason and transport, and
/// nothing else in the family moves.
#[tokio::test]
async fn refused_handshakes_count_by_reason_and_transport() {
    let app = spawn_app_with(|c| c.max_conns_per_user = 1).await;
    let http = app.http();
    let before = metrics(&app).await;
    assert!(
        family(&before, "portal_handshakes_refused_by_reason_total").is_empty(),
        "no refusal yet: {before}"
    );

    let mut bad = app.open(&app.ws_url("pv1", Some("not-a-jwt"))).await;
    bad.assert_closed(1008, "invalid token").await;
    let text = metrics(&app).await;
    assert_eq!(refusals(&text, "invalid_token", "ws"), 1.0, "{text}");
    assert_eq!(
        family(&text, "portal_handshakes_refused_by_reason_total").len(),
        1,
        "{text}"
    );

    let expired = app.token_with(SECRET, json!({"sub": "v1", "exp": now_secs() - 10}));
    let mut client = app.open(&app.ws_url("pv1", Some(&expired))).await;
    client.assert_closed(1008, "token expired").await;
    let mut client = app
        .open(&app.ws_url("pv1", Some(&app.token("ghost"))))
        .await;
    client.assert_closed(1008, "unknown user").await;
    let mut client = app.open(&app.ws_url("nope", Some(&app.token("v1")))).await;
    client.assert_closed(1008, "portal view not found").await;
    let mut client = app
        .open(&app.ws_url("pv1", Some(&app.token("outsider"))))
        .await;
    client.assert_closed(1008, "access denied").await;
    let _first = app.connect("pv1", "v2").await;
    let mut second = app.open(&app.ws_url("pv2", Some(&app.token("v2")))).await;
    second.assert_closed(1008, "too many connections").await;
    let origin = http
        .get(
            app.ws_url("pv1", Some(&app.token("v1")))
                .replacen("ws://", "http://", 1),
        )
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(origin.status(), 403);
    let sse = http
        .get(app.sse_url("pv1", Some("not-a-jwt")))
        .send()
        .await
        .expect("request");
    assert_eq!(sse.status(), 401);
    let sse = http
        .get(app.sse_url("pv1", Some(&app.token("outsider"))))
        .send()
        .await
        .expect("request");
    assert_eq!(sse.status(), 403);

    let text = metrics(&app).await;
    let expected = [
        ("invalid_token", "ws"),
        ("token_expired", "ws"),
        ("unknown_user", "ws"),
        ("not_found", "ws"),
        ("access_denied", "ws"),
        ("too_many_connections", "ws"),
        ("origin", "ws"),
        ("invalid_token", "sse"),
        ("access_denied", "sse"),
    ];
    for (reason, transport) in expected {
        assert_eq!(
            refusals(&text, reason, transport),
            1.0,
            "{reason}/{transport}: {text}"
        );
    }
    assert_eq!(
        family(&text, "portal_handshakes_refused_by_reason_total").len(),
        expected.len(),
        "no other series: {text}"
    );
}

/// Requests are labelled with their route's pattern, never a raw id, a
/// path no route answers is `other`, and so is a method HTTP does not name.
#[tokio::test]
async fn request_durations_are_labelled_by_route_pattern_and_method() {
    let app = spawn_app().await;
    let http = app.http();
    let owner = app.token("owner");
    let get = |path: &str| http.get(app.http_url(path)).bearer_auth(&owner);
    assert_eq!(
        get("/api/portal-views/pv1")
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    assert_eq!(
        get("/api/portal-views/pv2/")
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    assert_eq!(
        get("/api/portal-views/secret-id-4711")
            .send()
            .await
            .expect("GET")
            .status(),
        404
    );
    assert_eq!(
        get("/no/such/path-0815")
            .send()
            .await
            .expect("GET")
            .status(),
        404
    );
    let patch = http
        .patch(app.http_url("/api/portal-views/pv1"))
        .bearer_auth(&owner)
        .header("content-type", "application/json")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .expect("PATCH");
    assert_eq!(patch.status(), 200);
    let brew = reqwest::Method::from_bytes(b"BREW").expect("method");
    let teapot = http
        .request(brew, app.http_url("/api/portal-views/pv1"))
        .send()
        .await
        .expect("BREW");
    assert_eq!(teapot.status(), 405);

    let text = metrics(&app).await;
    let count = |labels: &str| {
        sample(
            &text,
            &format!("portal_http_request_seconds_count{{{labels}}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        count(r#"method="GET",route="/api/portal-views/{id}",status="200""#),
        2.0,
        "{text}"
    );
    assert_eq!(
        count(r#"method="GET",route="/api/portal-views/{id}",status="404""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"method="GET",route="other",status="404""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"method="PATCH",route="/api/portal-views/{id}",status="200""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"method="other",route="/api/portal-views/{id}",status="405""#),
        1.0,
        "{text}"
    );
    for line in family(&text, "portal_http_request_seconds") {
        for raw in ["pv1", "pv2", "secret-id-4711", "path-0815", "BREW"] {
            assert!(!line.contains(raw), "a raw {raw:?} in a label: {line}");
        }
    }
}

/// A WebSocket idle for 10 s and an SSE stream are sessions, not requests:
/// neither appears in `portal_http_request_seconds`, whose every request
/// took under a second.
#[tokio::test]
async fn idle_sessions_are_not_slow_requests() {
    let app = spawn_app().await;
    let mut ws = app.connect("pv1", "v1").await;
    let sse = app.sse("pv1", "v2").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    ws.assert_alive().await;
    ws.ws.close(None).await.expect("close");
    assert_eq!(sse.connected["type"], "connected");
    drop(sse);
    let (status, _) = health(&app).await;
    assert_eq!(status, 200);
    let text = metrics(&app).await;
    let lines = family(&text, "portal_http_request_seconds");
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("status=\"101\"") && !l.contains("/ws/portal-view")),
        "no upgrade counted: {text}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !(l.contains("/sse/portal-view/{id}") && l.contains("status=\"200\""))),
        "no SSE stream counted: {text}"
    );
    // Every request of this test (the health check) was fast.
    let counts: Vec<_> = lines.iter().filter(|l| l.contains("_count{")).collect();
    assert!(
        counts.iter().any(|l| l.contains("route=\"/health\"")),
        "{text}"
    );
    for count in counts {
        let labels = &count[count.find('{').expect("labels") + 1..count.find('}').expect("end")];
        let total = sample(
            &text,
            &format!("portal_http_request_seconds_count{{{labels}}}"),
        );
        let fast = sample(
            &text,
            &format!("portal_http_request_seconds_bucket{{{labels},le=\"1\"}}"),
        );
        assert_eq!(fast, total, "a request over 1 s: {labels} in {text}");
    }
}

//! The browser app's routes (`web.rs`): pages and assets with the right
//! Content-Type and security headers, 304 revalidation, 404 for anything not
//! in the embedded table, and no way out of it through the path.

mod common;
use common::*;

use std::collections::BTreeSet;

use reqwest::header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CSP: &str = portal_sync::http::web::CONTENT_SECURITY_POLICY;

struct Fetched {
    status: u16,
    headers: header::HeaderMap,
    body: String,
}

async fn get(app: &TestApp, path: &str) -> Fetched {
    fetch(app.http().get(app.http_url(path))).await
}

async fn fetch(request: reqwest::RequestBuilder) -> Fetched {
    tokio::time::timeout(WAIT, async move {
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("body");
        Fetched {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("answer in time")
}

fn header<'a>(fetched: &'a Fetched, name: &str) -> &'a str {
    fetched
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ASCII header")
}

/// What every page and asset must carry.
fn assert_hardened(fetched: &Fetched, what: &str) {
    assert_eq!(header(fetched, "content-security-policy"), CSP, "{what}");
    assert_eq!(
        header(fetched, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
    assert_eq!(header(fetched, "referrer-policy"), "no-referrer", "{what}");
}

/// `/assets/…` URLs an HTML page loads (`src=`/`href=`), and modules a script
/// imports (`from './x.js'`).
fn references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for marker in ["src=\"/assets/", "href=\"/assets/", "from './"] {
        for part in text.split(marker).skip(1) {
            let end = part.find(['"', '\'']).expect("closing quote");
            found.insert(part[..end].to_string());
        }
    }
    found
}

#[tokio::test]
async fn pages_are_html_with_a_strict_csp_and_no_inline_code() {
    let app = spawn_app().await;
    for (path, script) in [
        ("/", "/assets/index.js"),
        ("/presenter", "/assets/presenter.js"),
        ("/viewer", "/assets/viewer.js"),
    ] {
        let page = get(&app, path).await;
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
        assert_eq!(header(&page, "cache-control"), "no-cache", "{path}");
        assert_hardened(&page, path);
        assert!(
            page.body.contains(&format!(
                "<script type=\"module\" src=\"{script}\"></script>"
            )),
            "{path} loads {script}"
        );
        // The CSP forbids inline code: the pages must not need any.
        assert_eq!(
            page.body.matches("<script").count(),
            page.body.matches("<script type=\"module\" src=").count(),
            "{path} has an inline script"
        );
        for inline in [" style=", " onclick=", " onload=", "javascript:"] {
            assert!(!page.body.contains(inline), "{path} has {inline}");
        }
    }
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self' ws: wss:",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(CSP.contains(directive), "CSP has {directive}: {CSP}");
    }
    assert!(!CSP.contains("unsafe"), "no unsafe-inline or unsafe-eval");
}

#[tokio::test]
async fn every_referenced_asset_is_served_with_its_content_type() {
    let app = spawn_app().await;
    let mut pending: Vec<String> = Vec::new();
    for path in ["/", "/presenter", "/viewer"] {
        pending.extend(references(&get(&app, path).await.body));
    }
    let mut seen = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let asset = get(&app, &format!("/assets/{name}")).await;
        assert_eq!(asset.status, 200, "/assets/{name}");
        let expected = match name.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            other => panic!("unexpected asset type {other:?}"),
        };
        assert_eq!(header(&asset, "content-type"), expected, "{name}");
        assert_hardened(&asset, &name);
        if name.ends_with(".js") {
            pending.extend(references(&asset.body));
        }
    }
    let expected: BTreeSet<String> = [
        "app.js",
        "client.js",
        "icon.svg",
        "index.js",
        "presenter.js",
        "rules.js",
        "sse.js",
        "style.css",
        "viewer.js",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        seen, expected,
        "the pages reach exactly the embedded assets"
    );
}

#[tokio::test]
async fn unchanged_assets_revalidate_with_304() {
    let app = spawn_app().await;
    let first = get(&app, "/assets/client.js").await;
    let etag = header(&first, "etag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = fetch(
        app.http()
            .get(app.http_url("/assets/client.js"))
            .header(header::IF_NONE_MATCH, &etag),
    )
    .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(header(&again, "etag"), etag);
    let stale = fetch(
        app.http()
            .get(app.http_url("/assets/client.js"))
            .header(header::IF_NONE_MATCH, "\"0000000000000000\""),
    )
    .await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, first.body);
    let other = get(&app, "/assets/viewer.js").await;
    assert_ne!(header(&other, "etag"), etag, "each file has its own tag");
}

#[tokio::test]
async fn unknown_assets_and_methods_are_refused() {
    let app = spawn_app().await;
    for path in [
        "/assets/nope.js",
        "/assets/",
        "/assets/CLIENT.JS",
        "/assets/client.js.map",
        "/assets/index.html",
        "/assets/client.js/x",
        "/presenter.html",
        "/web/client.js",
        "/static/client.js",
    ] {
        let response = get(&app, path).await;
        assert_eq!(response.status, 404, "{path}");
        assert!(
            response.body.contains("NOT_FOUND"),
            "{path}: {}",
            response.body
        );
    }
    let post = fetch(app.http().post(app.http_url("/presenter"))).await;
    assert_eq!(post.status, 405);
    let head = fetch(app.http().head(app.http_url("/assets/style.css"))).await;
    assert_eq!(head.status, 200);
    assert_eq!(header(&head, "content-type"), "text/css; charset=utf-8");
    assert!(head.body.is_empty());
}

/// Sends `target` verbatim (an HTTP client would normalise `..` away) and
/// returns the status line and the body.
async fn raw_get(app: &TestApp, target: &str) -> (String, String) {
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text.lines().next().unwrap_or_default().to_string();
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    })
    .await
    .expect("answer in time")
}

#[tokio::test]
async fn no_path_leads_out_of_the_embedded_table() {
    let app = spawn_app().await;
    for target in [
        "/assets/../Cargo.toml",
        "/assets/../../Cargo.toml",
        "/assets/..%2fCargo.toml",
        "/assets/..%2F..%2FCargo.toml",
        "/assets/%2e%2e/Cargo.toml",
        "/assets/%2e%2e%2fsrc%2fweb.rs",
        "/assets/....//Cargo.toml",
        "/assets/..\\Cargo.toml",
        "/assets/%5c..%5cCargo.toml",
        "/assets/client.js%00.html",
        "/assets//etc/passwd",
        "/assets/%2fetc%2fpasswd",
        "/../web/client.js",
        "/assets/./client.js/..",
    ] {
        let (status, body) = raw_get(&app, target).await;
        assert!(
            status.starts_with("HTTP/1.1 404") || status.starts_with("HTTP/1.1 400"),
            "{target}: {status}"
        );
        for leaked in ["[package]", "pub fn", "root:", "export class"] {
            assert!(!body.contains(leaked), "{target} leaked a file: {body}");
        }
    }
    // The same request without tricks works, so the checks above are meaningful.
    let (status, body) = raw_get(&app, "/assets/client.js").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains("export class PortalClient"));
}

/// The pages leave the API and WebSocket routes as they were.
#[tokio::test]
async fn the_app_routes_do_not_shadow_the_api() {
    let app = spawn_app().await;
    let health = get(&app, "/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(header(&health, "content-type"), "application/json");
    let view = get(&app, "/api/portal-views/pv1").await;
    assert_eq!(view.status, 401, "the API still wants a token");
    let ws = get(&app, "/ws/portal-view/pv1").await;
    assert_eq!(ws.status, 426);
    let mut client = app.connect("pv1", "owner").await;
    client.assert_alive().await;
}

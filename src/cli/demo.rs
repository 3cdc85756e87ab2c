//! `portal-sync demo`: the demo users, library and view, and the banner with
//! their links and tokens.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::Config;
use crate::config::Synchronous;
use crate::domain::access::LibraryRole;
use crate::domain::error::Error;
use crate::engines;
use crate::protocol::auth::Tokens;

pub const DEMO_VIEW: &str = "demo";
const DEMO_USERS: [(&str, &str, &str); 3] = [
    ("alice", "Alice", "owner of the library: controller"),
    ("bob", "Bob", "EDITOR: controller"),
    ("carol", "Carol", "VIEWER: viewer"),
];

/// Creates the demo users, library and view unless the view already exists.
/// Each row is added only if missing, and one that appears meanwhile (a
/// second demo starting at once on the same PostgreSQL) is taken as made.
pub fn seed_demo(path: &Path) -> Result<(), Error> {
    let store = engines::open(path, Synchronous::Full)?;
    if store.view(DEMO_VIEW)?.is_some() {
        return Ok(());
    }
    let admin = store.admin();
    for (id, name, _) in DEMO_USERS {
        if !admin.user_exists(id)? {
            made(admin.add_user(id, &format!("{id}@example.com"), name))?;
        }
    }
    if admin.library("demo-library")?.is_none() {
        made(admin.add_library("demo-library", "Demo library", "alice"))?;
    }
    admin.set_member("demo-library", "alice", LibraryRole::Owner)?;
    admin.set_member("demo-library", "bob", LibraryRole::Editor)?;
    admin.set_member("demo-library", "carol", LibraryRole::Viewer)?;
    let state = json!({
        "currentItem": "1",
        "visible": true,
        "items": {
            "1": {"title": "Welcome", "body": "portal-sync keeps every viewer on the same page."},
            "2": {"title": "How it works", "body": "The presenter pushes; the server stores, orders and fans out."},
            "3": {"title": "Questions?", "body": "Send a request-sync and get the current state at once."}
        }
    });
    let Value::Object(state) = state else {
        return Err(Error::Internal("demo state is an object".into()));
    };
    made(admin.add_view(DEMO_VIEW, "demo-library", "Demo presentation", &state))
}

/// An add that found its row already there has what it wanted.
fn made(added: Result<(), Error>) -> Result<(), Error> {
    match added {
        Err(Error::Conflicting(_)) => Ok(()),
        other => other,
    }
}

/// The banner; `origin` says where the secret comes from and whether the
/// links outlive this run.
pub(super) fn print_demo(config: &Config, addr: SocketAddr, origin: &str) {
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let tokens = Tokens::new(config.jwt_secret.as_bytes(), 0);
    println!("portal-sync demo on http://{host} (database {})", config.db);
    println!("JWT secret for this run: {}", config.jwt_secret);
    println!("({origin})");
    println!("(tokens below are valid for 24 hours; Ctrl-C stops the server)\n");
    for (id, name, what) in DEMO_USERS {
        let Ok(token) = tokens.issue(id, 24 * 3600) else {
            continue;
        };
        let url = format!("ws://{host}/ws/portal-view/{DEMO_VIEW}?token={token}");
        println!("{name} ({what})");
        // The browser pages (web.rs); the token rides in the URL fragment.
        for (label, page) in [
            ("Presenter page:", "presenter"),
            ("Viewer page:   ", "viewer"),
        ] {
            let url =
                crate::http::web::page_url(&format!("http://{host}"), page, &token, DEMO_VIEW);
            println!("  {label} {url}");
        }
        println!("  WebSocket URL (wscat, or `new WebSocket(url)` in a browser console):");
        println!("    {url}");
        println!("  wscat:  npx wscat -c '{url}'");
        println!(
            "  REST:   curl -H 'Authorization: Bearer {token}' http://{host}/api/portal-views/{DEMO_VIEW}\n"
        );
    }
    println!("As alice or bob, type:  {{\"type\":\"portal-view-update\",\"payload\":{{\"currentItem\":\"2\"}},\"id\":1}}");
    println!("As carol, type:         {{\"type\":\"request-sync\"}}\n");
}

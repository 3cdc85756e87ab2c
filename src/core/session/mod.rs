//! A connection's life apart from its transport: SPEC §3's checks, the
//! `connected` snapshot, the loop that drains its [`Outbox`] and enforces
//! expiry, liveness and shutdown, and the handling of inbound client messages.
//!
//! The WebSocket (`ws.rs`) and the SSE stream (`sse.rs`) are two [`Link`]s to
//! the same loop, and SSE's `POST …/messages` goes through the same
//! [`handle`] as a WebSocket's text frame: one copy of the rules.
//!
//! Here the session itself; `admit.rs` opens one (token, access, join),
//! `serve.rs` runs it over a [`Link`], `handle.rs` handles one inbound
//! message, `liveness.rs` keeps the heartbeats, `rate.rs` the rate and
//! `expiry.rs` the token's expiry (`refresh-token`, `token-expiring`).

mod admit;
mod expiry;
mod handle;
mod liveness;
mod rate;
mod serve;

use std::sync::{Arc, Mutex};

pub use admit::Params;
pub(crate) use admit::{new_connection_id, open};
pub(crate) use expiry::Expiry;
pub(crate) use handle::{handle, Flow};
pub(crate) use rate::{RateLimit, Verdict};
pub(crate) use serve::{Ended, Incoming, Link};

use crate::core::connlog::ConnLog;
use crate::core::context::Core;
use crate::core::hub::Outbox;
/// The transports lock rate buckets and stream maps the same way.
pub(crate) use crate::core::lock::lock;
use crate::domain::model::Role;

/// Unsubscribes from the hub however the session ends.
struct Membership {
    ctx: Core,
    view_id: Arc<str>,
    key: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.ctx.hub.leave(&self.view_id, self.key);
    }
}

/// Who sent a client message, as SPEC §3.1's rules need to know.
#[derive(Clone)]
pub(crate) struct Sender {
    pub user_id: Arc<str>,
    pub view_id: Arc<str>,
    pub role: Role,
    /// The sending connection (hub key, connection id), which its broadcasts
    /// skip; `None` for a POST that names no stream of its own.
    pub connection: Option<(u64, Arc<str>)>,
    /// When the token that authorised the message expires (its `exp` plus
    /// `--jwt-leeway`, seconds since the epoch): its change is refused from
    /// then on, however long it waited for the writer. A session's loop keeps
    /// it at its [`Expiry`]'s, which `refresh-token` moves.
    pub token_expires: u64,
    /// The session whose token a `refresh-token` replaces; `None` for a POST
    /// that names no stream of its own (there is no session to refresh).
    pub expiry: Option<Arc<Expiry>>,
}

pub(crate) struct Session {
    /// Leaves the hub when the session is dropped, however it ends.
    _membership: Membership,
    pub sender: Sender,
    pub outbox: Arc<Outbox>,
    /// The last state version written to this connection; older broadcasts
    /// (already in the `connected` snapshot) are dropped.
    last_version: i64,
    /// When the session is warned and closed; `refresh-token` moves it.
    expiry: Arc<Expiry>,
    /// Shared with SSE's POST route, which counts its messages here.
    pub rate: Arc<Mutex<RateLimit>>,
    /// Its open and close lines (`core::connlog`).
    pub log: ConnLog,
}

impl Session {
    pub fn connection_id(&self) -> &Arc<str> {
        let (_, id) = self
            .sender
            .connection
            .as_ref()
            .expect("a session's sender is its connection");
        id
    }
}

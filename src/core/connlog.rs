//! What an operator reads about connections: one info line when a session
//! opens and one when it closes (target [`CONN`]), one per refused handshake
//! (target [`REFUSAL`]), each with its fields as structured key-values (the
//! logger prints them as `key=value`, or as JSON fields), and the bounded
//! reason a refusal is counted under in the metrics.
//!
//! Own targets, so that `RUST_LOG=info,portal_sync::conn=off` silences a busy
//! server's connection lines and keeps everything else. Never a token: the
//! lines name the user a verified token is for, not the token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::core::metrics::Metrics;
use crate::domain::error::Error;
use crate::domain::model::Role;

/// The log target of connection open and close lines.
pub const CONN: &str = "portal_sync::conn";
/// The log target of refused handshakes.
pub const REFUSAL: &str = "portal_sync::refusal";

/// A path segment from the URL is the client's: at most this much of it is
/// logged.
const MAX_LOGGED_VIEW: usize = 80;

/// How a session reaches its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    /// The `transport` field and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// Where a connection comes from: the transport, and the TCP peer as the
/// socket says (never `X-Forwarded-For`, which any client can write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub transport: Transport,
    /// `None` when the embedder's own accept loop did not say.
    pub addr: Option<SocketAddr>,
}

impl Peer {
    /// The address as text; IPv4 by hand, as `Display` for it pads through
    /// `fmt` at several times the cost (two lines per connection).
    fn addr_text(&self) -> String {
        match self.addr {
            Some(SocketAddr::V4(a)) => {
                let mut text = String::with_capacity(21);
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push('.');
                    }
                    push_decimal(&mut text, u32::from(octet));
                }
                text.push(':');
                push_decimal(&mut text, u32::from(a.port()));
                text
            }
            Some(a) => a.to_string(),
            None => "unknown".into(),
        }
    }
}

fn push_decimal(text: &mut String, n: u32) {
    let mut started = false;
    for div in [10_000, 1000, 100, 10, 1] {
        let digit = n / div % 10;
        if started || digit != 0 || div == 1 {
            started = true;
            text.push(char::from(b'0' + digit as u8));
        }
    }
}

/// Messages one session received and sent, for its close line. Shared with
/// SSE's POST route, which receives that stream's messages.
#[derive(Debug, Default)]
pub struct Traffic {
    inbound: AtomicU64,
    outbound: AtomicU64,
}

impl Traffic {
    pub fn received(&self) {
        self.inbound.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent(&self, messages: usize) {
        self.outbound.fetch_add(messages as u64, Ordering::Relaxed);
    }
}

/// Who a session is, as its lines name it.
pub struct Who<'a> {
    pub connection_id: &'a str,
    pub user_id: &'a str,
    pub view_id: &'a str,
    pub role: Role,
}

/// How a session ended, as its close line says it.
pub struct Close<'a> {
    /// `server`, `peer` or `dropped` (no close handshake: a dead or stuck peer).
    pub by: &'static str,
    /// Our close code, the peer's, or none.
    pub code: Option<u16>,
    pub reason: &'a str,
}

/// One session's log: where it came from, when, what passed.
pub struct ConnLog {
    peer: Peer,
    opened: Instant,
    traffic: Arc<Traffic>,
}

impl ConnLog {
    pub fn new(peer: Peer) -> ConnLog {
        ConnLog {
            peer,
            opened: Instant::now(),
            traffic: Arc::default(),
        }
    }

    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    pub fn opened(&self, who: &Who<'_>) {
        log::info!(
            target: CONN,
            conn = who.connection_id,
            user = who.user_id,
            view = who.view_id,
            role = role_name(who.role),
            transport = self.peer.transport.as_str(),
            peer = self.peer.addr_text().as_str();
            "connection opened"
        );
    }

    pub fn closed(&self, who: &Who<'_>, close: &Close<'_>) {
        log::info!(
            target: CONN,
            conn = who.connection_id,
            user = who.user_id,
            view = who.view_id,
            role = role_name(who.role),
            transport = self.peer.transport.as_str(),
            peer = self.peer.addr_text().as_str(),
            by = close.by,
            code = close.code,
            reason = close.reason,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            messages_in = self.traffic.inbound.load(Ordering::Relaxed),
            messages_out = self.traffic.outbound.load(Ordering::Relaxed);
            "connection closed"
        );
    }
}

/// A handshake refused (SPEC §3's checks, the origin, shutdown): counted by
/// reason and transport, and logged at info with the user when the token
/// named one. `view_id` is the path's, cut to [`MAX_LOGGED_VIEW`].
pub fn refused(metrics: &Metrics, peer: &Peer, view_id: &str, user_id: Option<&str>, e: &Error) {
    let reason = reason(e);
    metrics
        .refused_by_reason
        .with_label_values(&[reason, peer.transport.as_str()])
        .inc();
    if !log::log_enabled!(target: REFUSAL, log::Level::Info) {
        return;
    }
    let view = cut(view_id, MAX_LOGGED_VIEW);
    log::info!(
        target: REFUSAL,
        reason = reason,
        view = view,
        user = user_id,
        transport = peer.transport.as_str(),
        peer = peer.addr_text().as_str(),
        message = e.client_message().as_str();
        "handshake refused"
    );
}

/// The bounded `reason` of a refusal: one per check of SPEC §3, plus the
/// origin, shutdown and the Socket.IO probe.
pub fn reason(e: &Error) -> &'static str {
    match e {
        Error::InvalidToken => "invalid_token",
        Error::TokenExpired => "token_expired",
        Error::UnknownUser => "unknown_user",
        Error::ViewNotFound => "not_found",
        Error::AccessDenied => "access_denied",
        Error::AccessRevoked => "access_revoked",
        Error::TooManyConnections => "too_many_connections",
        Error::ForbiddenOrigin => "origin",
        Error::ShuttingDown => "shutting_down",
        Error::Storage(_) | Error::DatabaseMissing => "storage",
        Error::Internal(_) => "internal",
        _ => "other",
    }
}

/// The reason a Socket.IO / Engine.IO client is turned away with (1003).
pub const UNSUPPORTED_PROTOCOL: &str = "unsupported_protocol";

/// Counts and logs a Socket.IO client's upgrade (SPEC §3: closed 1003).
pub fn refused_protocol(metrics: &Metrics, peer: &Peer) {
    metrics
        .refused_by_reason
        .with_label_values(&[UNSUPPORTED_PROTOCOL, peer.transport.as_str()])
        .inc();
    log::info!(
        target: REFUSAL,
        reason = UNSUPPORTED_PROTOCOL,
        transport = peer.transport.as_str(),
        peer = peer.addr_text().as_str();
        "handshake refused"
    );
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Controller => "controller",
        Role::Viewer => "viewer",
    }
}

/// At most `max` bytes of `text`, on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_bounded_labels() {
        assert_eq!(reason(&Error::InvalidToken), "invalid_token");
        assert_eq!(reason(&Error::TokenExpired), "token_expired");
        assert_eq!(reason(&Error::UnknownUser), "unknown_user");
        assert_eq!(reason(&Error::ViewNotFound), "not_found");
        assert_eq!(reason(&Error::AccessDenied), "access_denied");
        assert_eq!(reason(&Error::TooManyConnections), "too_many_connections");
        assert_eq!(reason(&Error::ForbiddenOrigin), "origin");
        assert_eq!(reason(&Error::ShuttingDown), "shutting_down");
        assert_eq!(reason(&Error::Storage("disk".into())), "storage");
        assert_eq!(reason(&Error::DatabaseMissing), "storage");
        assert_eq!(reason(&Error::BadRequest("x".into())), "other");
    }

    #[test]
    fn peers_read_as_display_writes_them() {
        for addr in [
            "127.0.0.1:44810",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:3000",
        ] {
            let peer = Peer {
                transport: Transport::Ws,
                addr: Some(addr.parse().expect("addr")),
            };
            assert_eq!(peer.addr_text(), addr);
        }
    }

    #[test]
    fn long_views_are_cut_on_a_character_boundary() {
        assert_eq!(cut("pv1", 80), "pv1");
        assert_eq!(cut(&"a".repeat(100), 80).len(), 80);
        let text = format!("{}é", "a".repeat(79));
        assert_eq!(cut(&text, 80), "a".repeat(79));
    }
}

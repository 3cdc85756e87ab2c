//! One error type for the whole server, and the faces every transport shares:
//! a machine-readable code, the message a client is shown, a WebSocket close
//! code, and whether a message's refusal keeps the socket open. The HTTP face
//! (status, JSON body) is `http::error`'s.
//!
//! The cause of an internal error is logged; the client only ever sees
//! `internal error`.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Token missing, malformed or wrongly signed.
    InvalidToken,
    TokenExpired,
    /// A valid token whose `sub` is not a user.
    UnknownUser,
    ViewNotFound,
    /// The user has no role in the view's library.
    AccessDenied,
    /// A role that may not do this (a viewer PATCHing, say).
    Forbidden(&'static str),
    UnknownType,
    BadRequest(String),
    PreconditionFailed {
        current: i64,
    },
    PayloadTooLarge,
    /// A change that would make a view's serialized state `len` bytes, over
    /// `--max-state-bytes` (SPEC §5). REST shows it as 413 `STATE_TOO_LARGE`;
    /// a client message gets it as `BAD_REQUEST` ([`Error::as_message_refusal`]).
    StateTooLarge {
        len: usize,
        max: usize,
    },
    UnsupportedMediaType,
    NotFound(&'static str),
    /// A named row that does not exist (`user ghost not found`): what the
    /// admin CLI tells an operator, a 404 elsewhere.
    Missing {
        what: &'static str,
        id: String,
    },
    Conflict(&'static str),
    /// A refusal because of what is stored, explained with its ids (`user
    /// alice already exists`, `library lib has 2 portal views`).
    Conflicting(String),
    /// The connection's inbound message rate was exceeded.
    RateLimited,
    /// A connection limit (per user, per view, server-wide) would be exceeded.
    TooManyConnections,
    /// The user's membership changed while connected (SPEC §3.4).
    AccessRevoked,
    /// A browser page from an origin not on the allow-list.
    ForbiddenOrigin,
    /// A new connection while the server stops.
    ShuttingDown,
    /// Another node that must do part of the work did not answer in time
    /// (a forwarded POST, SPEC §7): the outcome is unknown.
    Unavailable(&'static str),
    /// SQLite or pool failure; the string is for the log only.
    Storage(String),
    Internal(String),
    /// The database file was deleted or replaced under the running server
    /// (the SQLite engine's `check_file`): a storage failure, logged once where it is
    /// noticed rather than once per refused request.
    DatabaseMissing,
}

impl Error {
    /// The WebSocket close code (SPEC §3): 1008 for policy refusals, 1011 for
    /// anything that is our fault.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            Error::Storage(_) | Error::Internal(_) => 1011,
            Error::DatabaseMissing => 1011,
            Error::ShuttingDown => 1001,
            Error::Unavailable(_) => 1011,
            _ => 1008,
        }
    }

    /// Machine-readable code, the same on REST bodies and WebSocket `error` replies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidToken => "INVALID_TOKEN",
            Error::TokenExpired => "TOKEN_EXPIRED",
            Error::UnknownUser => "UNKNOWN_USER",
            Error::ViewNotFound | Error::NotFound(_) | Error::Missing { .. } => "NOT_FOUND",
            Error::AccessDenied => "ACCESS_DENIED",
            Error::Forbidden(_) => "FORBIDDEN",
            Error::UnknownType => "UNKNOWN_TYPE",
            Error::BadRequest(_) => "BAD_REQUEST",
            Error::PreconditionFailed { .. } => "PRECONDITION_FAILED",
            Error::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Error::StateTooLarge { .. } => "STATE_TOO_LARGE",
            Error::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Error::Conflict(_) | Error::Conflicting(_) => "CONFLICT",
            Error::TooManyConnections => "TOO_MANY_CONNECTIONS",
            Error::RateLimited => "RATE_LIMITED",
            Error::AccessRevoked => "ACCESS_REVOKED",
            Error::ForbiddenOrigin => "FORBIDDEN_ORIGIN",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::Unavailable(_) => "UNAVAILABLE",
            Error::Storage(_) | Error::Internal(_) => "INTERNAL",
            Error::DatabaseMissing => "INTERNAL",
        }
    }

    /// What the client is told. For the handshake refusals this is the exact close
    /// reason of SPEC §3; internal causes are never shown.
    pub fn client_message(&self) -> String {
        match self {
            Error::InvalidToken => "invalid token".into(),
            Error::TokenExpired => "token expired".into(),
            Error::UnknownUser => "unknown user".into(),
            Error::ViewNotFound => "portal view not found".into(),
            Error::AccessDenied => "access denied".into(),
            Error::TooManyConnections => "too many connections".into(),
            Error::RateLimited => "rate limit exceeded: slow down".into(),
            Error::AccessRevoked => "access revoked".into(),
            Error::ForbiddenOrigin => "origin not allowed".into(),
            Error::ShuttingDown => "server shutting down".into(),
            Error::Forbidden(m)
            | Error::NotFound(m)
            | Error::Conflict(m)
            | Error::Unavailable(m) => (*m).into(),
            Error::UnknownType => "unknown message type".into(),
            Error::BadRequest(m) | Error::Conflicting(m) => m.clone(),
            Error::Missing { what, id } => format!("{what} {id} not found"),
            Error::PreconditionFailed { current } => {
                format!("version mismatch: the current version is {current}")
            }
            Error::PayloadTooLarge => "body larger than the maximum message size".into(),
            Error::StateTooLarge { len, max } => format!(
                "state too large: the change would make the state {len} bytes, over the limit of {max}"
            ),
            Error::UnsupportedMediaType => {
                "Content-Type must be application/json or application/merge-patch+json".into()
            }
            Error::Storage(_) | Error::Internal(_) => "internal error".into(),
            Error::DatabaseMissing => "internal error".into(),
        }
    }

    /// A refusal at apply time that a client message is answered with, the
    /// socket kept open (SPEC §3.1: `state too large` is a `BAD_REQUEST`);
    /// `None` for a failure that ends the sender's connection.
    pub(crate) fn as_message_refusal(&self) -> Option<Error> {
        match self {
            Error::StateTooLarge { .. } => Some(Error::BadRequest(self.client_message())),
            _ => None,
        }
    }

    /// Logs internal causes once, where they are turned into a client answer.
    pub(crate) fn log(&self, context: &str) {
        match self {
            Error::Storage(cause) | Error::Internal(cause) => {
                log::error!("{context}: {cause}")
            }
            other => log::debug!("{context}: {}", other.client_message()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Storage(cause) => write!(f, "storage: {cause}"),
            Error::Internal(cause) => write!(f, "internal: {cause}"),
            Error::DatabaseMissing => f.write_str("storage: the database file is missing"),
            other => f.write_str(&other.client_message()),
        }
    }
}

impl std::error::Error for Error {}

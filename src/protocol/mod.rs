//! The wire: tokens (SPEC §2), client messages parsed and checked
//! (`inbound`), every server message rendered once (`outbound`), and the
//! form of a change's broadcast (`broadcast`). The re-exports keep
//! `crate::protocol::x` the one way to name them.

pub mod auth;
mod broadcast;
mod inbound;
mod outbound;

pub use broadcast::{Author, Via};
pub use inbound::{parse, Command, Inbound, Refusal, Token};
pub(crate) use inbound::{rate_limited, type_label};
/// Broadcasts are rendered through [`Author::broadcast`]; tests build one
/// directly.
#[cfg(test)]
pub(crate) use outbound::change_broadcast;
pub use outbound::error;
pub(crate) use outbound::{
    ack, answers_sync_requests, closed, connected, pong, presence_event, request_sync_forward,
    server_sync_response, token_expiring, token_refreshed, Connected, From, Person,
};

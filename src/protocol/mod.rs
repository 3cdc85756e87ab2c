//! The wire: tokens (SPEC §2), inbound messages parsed and checked, and every
//! outbound message rendered once (SPEC §3.1).

pub mod auth;
mod broadcast;
mod messages;

pub use broadcast::{Author, Via};
pub use messages::*;

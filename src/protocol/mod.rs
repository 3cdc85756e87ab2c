//! The wire: tokens (SPEC §2), inbound messages parsed and checked, and every
//! outbound message rendered once (SPEC §3.1).

pub mod auth;
mod messages;

pub use messages::*;

//! The live server, whatever the transport and the engines: rooms and
//! outboxes, the write path and its ordering, sessions, rates, revocation.

pub mod broker;
pub mod connlog;
pub mod context;
pub mod delivery;
pub mod forward;
pub mod hub;
pub mod lock;
pub mod metrics;
pub mod rest_rate;
pub mod revocation;
pub mod sequencer;
pub mod session;
pub mod shutdown;
pub mod startup;
pub mod sync_deadlines;
pub mod sync_requests;
pub mod writer;

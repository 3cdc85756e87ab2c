//! portal-sync: a real-time sync server for portal views.
//!
//! A controller (presenter) pushes state changes over a WebSocket or REST; the
//! server checks the token and the user's role, stores the new state in SQLite and
//! fans it out, in version order, to every connection watching that portal view.
//! The contract is SPEC.md; the README summarises it.
//!
//! The binary (`src/main.rs`) is a thin caller of [`cli::main`]; tests and examples
//! use the library the same way: bind a listener, call [`server::run`].

pub(crate) mod broker;
pub mod cli;
pub mod config;
pub(crate) mod core;
pub mod domain;
pub mod engines;
pub mod http;
pub mod protocol;
pub mod store;

pub use config::Config;
pub use domain::error::Error;

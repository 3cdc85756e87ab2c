//! portal-sync: a real-time sync server for portal views.
//!
//! A controller (presenter) pushes state changes over a WebSocket or REST; the
//! server checks the token and the user's role, stores the new state in SQLite and
//! fans it out, in version order, to every connection watching that portal view.
//! The contract is SPEC.md; the README summarises it.
//!
//! The binary (`src/main.rs`) is a thin caller of [`cli::main`]; tests and examples
//! use the library the same way: bind a listener, call [`server::run`].

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod context;
pub mod db;
pub mod error;
pub mod fdlimit;
pub mod frames;
pub mod hub;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod origin;
pub mod pending;
pub mod protocol;
pub mod rest_rate;
pub mod revocation;
pub mod routes;
pub mod server;
pub mod session;
pub mod sse;
pub mod sync_requests;
pub mod web;
pub mod write_timeout;
pub mod writer;
pub mod ws;

pub use config::Config;
pub use error::Error;

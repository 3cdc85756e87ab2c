//! HTTP: the accept loop, the router, REST, WebSocket, SSE + POST, the pages,
//! and the HTTP face of errors. Embedders use `server` (`bind`, `run`); the
//! rest is the crate's own.

mod context;
mod contract;
mod error;
mod fdlimit;
mod filters;
mod forwarded;
mod frames;
mod origin;
mod pending;
mod rest;
mod route_label;
pub mod router;
pub mod server;
mod sse;
mod streams;
pub mod web;
mod write_timeout;
mod ws;

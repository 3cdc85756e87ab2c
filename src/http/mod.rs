//! HTTP: the accept loop, the router and its error mapping, REST, WebSocket,
//! SSE + POST, the pages.

pub mod context;
pub mod fdlimit;
pub mod frames;
pub mod origin;
pub mod pending;
pub mod routes;
pub mod server;
pub mod sse;
pub mod web;
pub mod write_timeout;
pub mod ws;

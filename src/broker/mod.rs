//! How a committed change reaches the other nodes' connections.

pub mod redis;

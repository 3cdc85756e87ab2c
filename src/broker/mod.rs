//! The engines behind `core::broker::Broker`: how a committed change reaches
//! the other nodes' connections, if there are any.

pub mod local;
pub mod redis;

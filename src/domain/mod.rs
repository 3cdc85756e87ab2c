//! The words of SPEC §1 that every other layer speaks: ids, roles, the change
//! kinds and their merge patch, every permission rule, and the one error enum.
//! It imports nothing from the crate.

pub mod access;
pub mod error;
pub mod merge;
pub mod model;

//! The words of SPEC §1 that every other layer speaks: ids, roles, the change
//! kinds and their merge patch, every permission rule, the one error enum and
//! the clock. It imports nothing outside itself.

pub mod access;
pub mod clock;
pub mod error;
pub mod merge;
pub mod model;

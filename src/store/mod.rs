//! Storage (SPEC §1): the seam every engine sits behind.

pub mod sqlite;

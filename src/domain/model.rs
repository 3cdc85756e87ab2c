//! Domain words shared by every layer: ids, roles, presence counts.

use serde::Serialize;

/// SPEC §1: ids are 1–64 characters of `[A-Za-z0-9_-]`. Checking this before any
/// lookup keeps path tricks, SQL fragments and megabyte ids away from storage.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What a user may do in a portal view (SPEC §1 "Role").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Controller,
    Viewer,
}

/// Presence counts people, not tabs (SPEC §3.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Presence {
    pub controllers: usize,
    pub viewers: usize,
    pub connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("pv1"));
        assert!(is_valid_id("A-b_9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("../etc"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("x' OR 1=1--"));
        assert!(!is_valid_id("é"));
    }
}

//! Administration (CLI `user`, `library`, `member`, `view`; fixtures) and
//! SPEC §4's membership routes.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};

use super::reads::user_exists;
use crate::domain::access::{self};
use crate::domain::error::Error;
use crate::domain::model::is_valid_id;
use crate::store::MemberChange;

// ---------------------------------------------------------------------------
// Administration (CLI `user`, `library`, `member`, `view`; tests' fixtures).

pub(super) fn require_id(what: &str, id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} id must be 1-64 characters of [A-Za-z0-9_-]"
        )))
    }
}

pub(super) fn add_user(conn: &Connection, id: &str, email: &str, name: &str) -> Result<(), Error> {
    require_id("user", id)?;
    conn.execute(
        "INSERT INTO users (id, email, name) VALUES (?1, ?2, ?3)",
        params![id, email, name],
    )?;
    Ok(())
}

pub(super) fn add_library(
    conn: &Connection,
    id: &str,
    name: &str,
    owner_id: &str,
) -> Result<(), Error> {
    require_id("library", id)?;
    conn.execute(
        "INSERT INTO libraries (id, name, owner_id) VALUES (?1, ?2, ?3)",
        params![id, name, owner_id],
    )?;
    Ok(())
}

/// Adds a member or changes their role; returns the previous role, if any.
pub(super) fn set_member(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
    role: &str,
) -> Result<Option<String>, Error> {
    let previous = member_role(conn, library_id, user_id)?;
    conn.execute(
        "INSERT INTO library_members (library_id, user_id, role) VALUES (?1, ?2, ?3)
         ON CONFLICT (library_id, user_id) DO UPDATE SET role = excluded.role",
        params![library_id, user_id, role],
    )?;
    Ok(previous)
}

pub(super) fn member_role(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
) -> Result<Option<String>, Error> {
    Ok(conn
        .query_row(
            "SELECT role FROM library_members WHERE library_id = ?1 AND user_id = ?2",
            params![library_id, user_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Returns whether a membership was removed.
pub(super) fn remove_member(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
) -> Result<bool, Error> {
    Ok(conn.execute(
        "DELETE FROM library_members WHERE library_id = ?1 AND user_id = ?2",
        params![library_id, user_id],
    )? > 0)
}

pub(super) fn add_view(
    conn: &Connection,
    id: &str,
    library_id: &str,
    name: &str,
    state: &Map<String, Value>,
) -> Result<(), Error> {
    require_id("portal view", id)?;
    let state = serde_json::to_string(state)
        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
    conn.execute(
        "INSERT INTO portal_views (id, library_id, name, state, version, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        params![id, library_id, name, state],
    )?;
    Ok(())
}

/// SPEC §4's membership routes, all checks and the change in one transaction:
/// unknown caller (401), no such library (404), caller not an owner (403),
/// no such user or not a member (404), the library's `owner_id` (409).
/// Applies nothing when `apply` is false (the check before reading a body).
/// Returns the member's role afterwards (`None` once removed).
pub(super) fn change_member(
    conn: &mut Connection,
    caller: &str,
    library_id: &str,
    user_id: &str,
    change: &MemberChange,
    apply: bool,
) -> Result<Option<String>, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !user_exists(&tx, caller)? {
        return Err(Error::UnknownUser);
    }
    let owner: Option<String> = if is_valid_id(library_id) {
        tx.query_row(
            "SELECT owner_id FROM libraries WHERE id = ?1",
            [library_id],
            |r| r.get(0),
        )
        .optional()?
    } else {
        None
    };
    let owner = owner.ok_or(Error::NotFound("library not found"))?;
    let caller_member = member_role(&tx, library_id, caller)?;
    access::may_manage_members(caller, &owner, caller_member.as_deref())?;
    if !apply {
        return Ok(None);
    }
    access::may_change_member(user_id, &owner)?;
    let role = match change {
        MemberChange::Set(role) => {
            if !user_exists(&tx, user_id)? {
                return Err(Error::NotFound("user not found"));
            }
            set_member(&tx, library_id, user_id, role.as_str())?;
            Some(role.as_str().to_string())
        }
        MemberChange::Remove => {
            if !remove_member(&tx, library_id, user_id)? {
                return Err(Error::NotFound("not a member of this library"));
            }
            None
        }
    };
    tx.commit()?;
    Ok(role)
}

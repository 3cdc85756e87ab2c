//! Administration (CLI `user`, `library`, `member`, `view`; fixtures) and
//! SPEC §4's membership routes.

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
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

/// An IMMEDIATE transaction on a shared connection: the checks that name
/// what is missing and the write they guard see the same rows.
pub(super) fn immediate(conn: &Connection) -> Result<Transaction<'_>, Error> {
    Ok(Transaction::new_unchecked(
        conn,
        TransactionBehavior::Immediate,
    )?)
}

pub(super) fn library_exists(conn: &Connection, library_id: &str) -> Result<bool, Error> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM libraries WHERE id = ?1")?;
    Ok(stmt.exists([library_id])?)
}

pub(super) fn view_exists(conn: &Connection, view_id: &str) -> Result<bool, Error> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM portal_views WHERE id = ?1")?;
    Ok(stmt.exists([view_id])?)
}

pub(super) fn missing(what: &'static str, id: &str) -> Error {
    Error::Missing {
        what,
        id: id.to_string(),
    }
}

/// Refuses a taken id or email by name, rather than SQLite's `UNIQUE
/// constraint failed`.
pub(super) fn add_user(conn: &Connection, id: &str, email: &str, name: &str) -> Result<(), Error> {
    require_id("user", id)?;
    let tx = immediate(conn)?;
    if user_exists(&tx, id)? {
        return Err(Error::Conflicting(format!("user {id} already exists")));
    }
    let holder: Option<String> = tx
        .query_row("SELECT id FROM users WHERE email = ?1", [email], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(holder) = holder {
        return Err(Error::Conflicting(format!(
            "email {email} is already used by user {holder}"
        )));
    }
    tx.execute(
        "INSERT INTO users (id, email, name) VALUES (?1, ?2, ?3)",
        params![id, email, name],
    )?;
    tx.commit()?;
    Ok(())
}

pub(super) fn add_library(
    conn: &Connection,
    id: &str,
    name: &str,
    owner_id: &str,
) -> Result<(), Error> {
    require_id("library", id)?;
    let tx = immediate(conn)?;
    if library_exists(&tx, id)? {
        return Err(Error::Conflicting(format!("library {id} already exists")));
    }
    if !user_exists(&tx, owner_id)? {
        return Err(missing("user", owner_id));
    }
    tx.execute(
        "INSERT INTO libraries (id, name, owner_id) VALUES (?1, ?2, ?3)",
        params![id, name, owner_id],
    )?;
    tx.commit()?;
    Ok(())
}

/// Adds a member or changes their role; returns the previous role, if any.
/// An unknown library or user is named (not SQLite's `FOREIGN KEY
/// constraint failed`). The owner rule is the caller's (`domain::access`):
/// fixtures and the demo seed give the owner a member row on purpose.
pub(super) fn set_member(
    conn: &Connection,
    library_id: &str,
    user_id: &str,
    role: &str,
) -> Result<Option<String>, Error> {
    let tx = immediate(conn)?;
    if !library_exists(&tx, library_id)? {
        return Err(missing("library", library_id));
    }
    if !user_exists(&tx, user_id)? {
        return Err(missing("user", user_id));
    }
    let previous = upsert_member(&tx, library_id, user_id, role)?;
    tx.commit()?;
    Ok(previous)
}

fn upsert_member(
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
    let tx = immediate(conn)?;
    if view_exists(&tx, id)? {
        return Err(Error::Conflicting(format!(
            "portal view {id} already exists"
        )));
    }
    if !library_exists(&tx, library_id)? {
        return Err(missing("library", library_id));
    }
    tx.execute(
        "INSERT INTO portal_views (id, library_id, name, state, version, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        params![id, library_id, name, state],
    )?;
    tx.commit()?;
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
            upsert_member(&tx, library_id, user_id, role.as_str())?;
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

//! Administration (CLI `user`, `library`, `member`, `view`; fixtures) and
//! SPEC §4's membership routes. Errors are the SQLite engine's for the same
//! situation, with its messages: a refused id is `BadRequest`, a taken id or
//! email `Conflicting`, an unknown owner, library or user `Missing`. Each
//! change checks and writes in one transaction; the rows a check relies on
//! are locked (`FOR KEY SHARE`: they cannot be removed meanwhile) and a
//! duplicate that commits between the check and the insert is caught by
//! `ON CONFLICT DO NOTHING` and named like the check would have.

use postgres::types::Type;
use postgres::GenericClient;
use serde_json::{Map, Value};

use super::pool::Fail;
use super::reads::{iso_ms, user_exists};
use crate::domain::access;
use crate::domain::error::Error;
use crate::domain::model::is_valid_id;
use crate::store::{LibraryRow, MemberChange, MemberRow, UserRow, ViewSummary};

pub(super) fn require_id(what: &str, id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} id must be 1-64 characters of [A-Za-z0-9_-]"
        )))
    }
}

/// `what` exists, locked against removal until the transaction ends.
pub(super) fn exists_locked(
    c: &mut impl GenericClient,
    table: Table,
    id: &str,
) -> Result<bool, Fail> {
    Ok(c.query_typed_opt(table.lock_sql(), &[(&id, Type::TEXT)])?
        .is_some())
}

/// The tables whose rows a check locks (`FOR KEY SHARE`).
#[derive(Clone, Copy)]
pub(super) enum Table {
    Users,
    Libraries,
}

impl Table {
    fn lock_sql(self) -> &'static str {
        match self {
            Table::Users => "SELECT 1 FROM users WHERE id = $1 FOR KEY SHARE",
            Table::Libraries => "SELECT 1 FROM libraries WHERE id = $1 FOR KEY SHARE",
        }
    }
}

pub(super) fn missing(what: &'static str, id: &str) -> Error {
    Error::Missing {
        what,
        id: id.to_string(),
    }
}

/// A COMMIT that goes unanswered is reported, not retried: the change may
/// have been applied, and a second try would answer "already exists".
pub(super) fn commit(tx: postgres::Transaction<'_>) -> Result<(), Fail> {
    tx.commit().map_err(|e| Fail::Err(e.into()))
}

/// Why a new user's id or email is taken, if it is.
fn user_taken(c: &mut impl GenericClient, id: &str, email: &str) -> Result<Option<Error>, Fail> {
    if user_exists(c, id)? {
        return Ok(Some(Error::Conflicting(format!(
            "user {id} already exists"
        ))));
    }
    let holder: Option<String> = c
        .query_typed_opt(
            "SELECT id FROM users WHERE email = $1",
            &[(&email, Type::TEXT)],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    Ok(holder.map(|holder| {
        Error::Conflicting(format!("email {email} is already used by user {holder}"))
    }))
}

/// Refuses a taken id or email by name, rather than the database's
/// `duplicate key value violates unique constraint`.
pub(super) fn add_user(
    c: &mut impl GenericClient,
    id: &str,
    email: &str,
    name: &str,
) -> Result<(), Fail> {
    require_id("user", id)?;
    let mut tx = c.transaction()?;
    if let Some(taken) = user_taken(&mut tx, id, email)? {
        return Err(taken.into());
    }
    let added = tx.execute(
        "INSERT INTO users (id, email, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&id, &email, &name],
    )?;
    if added == 0 {
        // Taken by a transaction that committed after the check: now seen.
        return Err(match user_taken(&mut tx, id, email)? {
            Some(taken) => taken.into(),
            // ...and gone again since: nothing was written, try afresh.
            None => Fail::Retry(format!("user {id}: a conflicting row came and went")),
        });
    }
    commit(tx)
}

pub(super) fn add_library(
    c: &mut impl GenericClient,
    id: &str,
    name: &str,
    owner_id: &str,
) -> Result<(), Fail> {
    require_id("library", id)?;
    let taken = || Error::Conflicting(format!("library {id} already exists"));
    let mut tx = c.transaction()?;
    if library_exists(&mut tx, id)? {
        return Err(taken().into());
    }
    if !exists_locked(&mut tx, Table::Users, owner_id)? {
        return Err(missing("user", owner_id).into());
    }
    let added = tx.execute(
        "INSERT INTO libraries (id, name, owner_id) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO NOTHING",
        &[&id, &name, &owner_id],
    )?;
    if added == 0 {
        return Err(taken().into());
    }
    commit(tx)
}

pub(super) fn library_exists(c: &mut impl GenericClient, id: &str) -> Result<bool, Fail> {
    Ok(c.query_typed_opt(
        "SELECT 1 FROM libraries WHERE id = $1",
        &[(&id, Type::TEXT)],
    )?
    .is_some())
}

pub(super) fn view_exists(c: &mut impl GenericClient, id: &str) -> Result<bool, Fail> {
    Ok(c.query_typed_opt(
        "SELECT 1 FROM portal_views WHERE id = $1",
        &[(&id, Type::TEXT)],
    )?
    .is_some())
}

/// Adds a member or changes their role; returns the previous role, if any.
/// An unknown library or user is named (not the database's foreign key
/// violation); both rows are locked until the change commits. The owner
/// rule is the caller's (`domain::access`), as on SQLite.
pub(super) fn set_member(
    c: &mut impl GenericClient,
    library_id: &str,
    user_id: &str,
    role: &str,
) -> Result<Option<String>, Fail> {
    let mut tx = c.transaction()?;
    if !exists_locked(&mut tx, Table::Libraries, library_id)? {
        return Err(missing("library", library_id).into());
    }
    if !exists_locked(&mut tx, Table::Users, user_id)? {
        return Err(missing("user", user_id).into());
    }
    let previous = upsert_member(&mut tx, library_id, user_id, role)?;
    commit(tx)?;
    Ok(previous)
}

/// Adds a member or changes their role; returns the previous role, if any
/// (read in the same statement, so a retry or a concurrent change cannot
/// split the two).
fn upsert_member(
    c: &mut impl GenericClient,
    library_id: &str,
    user_id: &str,
    role: &str,
) -> Result<Option<String>, Fail> {
    let row = c.query_one(
        "WITH previous AS (
             SELECT role FROM library_members WHERE library_id = $1 AND user_id = $2
         ), upsert AS (
             INSERT INTO library_members (library_id, user_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (library_id, user_id) DO UPDATE SET role = EXCLUDED.role
         )
         SELECT (SELECT role FROM previous)",
        &[&library_id, &user_id, &role],
    )?;
    Ok(row.try_get(0)?)
}

pub(super) fn member_role(
    c: &mut impl GenericClient,
    library_id: &str,
    user_id: &str,
) -> Result<Option<String>, Fail> {
    Ok(c.query_typed_opt(
        "SELECT role FROM library_members WHERE library_id = $1 AND user_id = $2",
        &[(&library_id, Type::TEXT), (&user_id, Type::TEXT)],
    )?
    .map(|r| r.try_get(0))
    .transpose()?)
}

pub(super) fn remove_member(
    c: &mut impl GenericClient,
    library_id: &str,
    user_id: &str,
) -> Result<bool, Fail> {
    Ok(c.execute(
        "DELETE FROM library_members WHERE library_id = $1 AND user_id = $2",
        &[&library_id, &user_id],
    )? > 0)
}

pub(super) fn add_view(
    c: &mut impl GenericClient,
    id: &str,
    library_id: &str,
    name: &str,
    state: &Map<String, Value>,
) -> Result<(), Fail> {
    require_id("portal view", id)?;
    let state = serde_json::to_string(state)
        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
    let taken = || Error::Conflicting(format!("portal view {id} already exists"));
    let mut tx = c.transaction()?;
    if view_exists(&mut tx, id)? {
        return Err(taken().into());
    }
    if !exists_locked(&mut tx, Table::Libraries, library_id)? {
        return Err(missing("library", library_id).into());
    }
    let added = tx.execute(
        "INSERT INTO portal_views (id, library_id, name, state, version, updated_at)
         VALUES ($1, $2, $3, $4::text::jsonb, 0, date_trunc('milliseconds', now()))
         ON CONFLICT (id) DO NOTHING",
        &[&id, &library_id, &name, &state],
    )?;
    if added == 0 {
        return Err(taken().into());
    }
    commit(tx)
}

pub(super) fn user(c: &mut impl GenericClient, id: &str) -> Result<Option<UserRow>, Fail> {
    c.query_typed_opt(
        "SELECT id, email, name FROM users WHERE id = $1",
        &[(&id, Type::TEXT)],
    )?
    .map(|r| {
        Ok(UserRow {
            id: r.try_get(0)?,
            email: r.try_get(1)?,
            name: r.try_get(2)?,
        })
    })
    .transpose()
}

pub(super) fn library(c: &mut impl GenericClient, id: &str) -> Result<Option<LibraryRow>, Fail> {
    c.query_typed_opt(
        "SELECT id, name, owner_id FROM libraries WHERE id = $1",
        &[(&id, Type::TEXT)],
    )?
    .map(|r| {
        Ok(LibraryRow {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            owner_id: r.try_get(2)?,
        })
    })
    .transpose()
}

pub(super) fn users(c: &mut impl GenericClient) -> Result<Vec<UserRow>, Fail> {
    c.query("SELECT id, email, name FROM users ORDER BY id", &[])?
        .iter()
        .map(|r| {
            Ok(UserRow {
                id: r.try_get(0)?,
                email: r.try_get(1)?,
                name: r.try_get(2)?,
            })
        })
        .collect()
}

pub(super) fn libraries(c: &mut impl GenericClient) -> Result<Vec<LibraryRow>, Fail> {
    c.query("SELECT id, name, owner_id FROM libraries ORDER BY id", &[])?
        .iter()
        .map(|r| {
            Ok(LibraryRow {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                owner_id: r.try_get(2)?,
            })
        })
        .collect()
}

pub(super) fn members(
    c: &mut impl GenericClient,
    library_id: &str,
) -> Result<Vec<MemberRow>, Fail> {
    c.query(
        "SELECT user_id, role FROM library_members WHERE library_id = $1 ORDER BY user_id",
        &[&library_id],
    )?
    .iter()
    .map(|r| {
        Ok(MemberRow {
            user_id: r.try_get(0)?,
            role: r.try_get(1)?,
        })
    })
    .collect()
}

pub(super) fn views(c: &mut impl GenericClient) -> Result<Vec<ViewSummary>, Fail> {
    c.query(
        concat!(
            "SELECT id, library_id, name, version, ",
            iso_ms!("updated_at"),
            " FROM portal_views ORDER BY id"
        ),
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(ViewSummary {
            id: r.try_get(0)?,
            library_id: r.try_get(1)?,
            name: r.try_get(2)?,
            version: r.try_get(3)?,
            updated_at: r.try_get(4)?,
        })
    })
    .collect()
}

/// SPEC §4's membership routes, all checks and the change in one
/// transaction: unknown caller (401), no such library (404), caller not an
/// owner (403), no such user or not a member (404), the library's
/// `owner_id` (409). The library row is locked first, so two changes to one
/// library take turns (as SQLite's single writer gives). Applies nothing
/// when `apply` is false. A COMMIT that goes unanswered is reported, not
/// retried: the route answers 500 and the caller may look and try again.
pub(super) fn change_member(
    c: &mut impl GenericClient,
    caller: &str,
    library_id: &str,
    user_id: &str,
    change: &MemberChange,
    apply: bool,
) -> Result<Option<String>, Fail> {
    let mut tx = c.transaction()?;
    if !user_exists(&mut tx, caller)? {
        return Err(Error::UnknownUser.into());
    }
    let owner: Option<String> = if is_valid_id(library_id) {
        tx.query_typed_opt(
            "SELECT owner_id FROM libraries WHERE id = $1 FOR UPDATE",
            &[(&library_id, Type::TEXT)],
        )?
        .map(|r| r.try_get(0))
        .transpose()?
    } else {
        None
    };
    let owner = owner.ok_or(Error::NotFound("library not found"))?;
    let caller_member = member_role(&mut tx, library_id, caller)?;
    access::may_manage_members(caller, &owner, caller_member.as_deref())?;
    if !apply {
        return Ok(None);
    }
    access::may_change_member(user_id, &owner)?;
    let role = match change {
        MemberChange::Set(role) => {
            if !user_exists(&mut tx, user_id)? {
                return Err(Error::NotFound("user not found").into());
            }
            upsert_member(&mut tx, library_id, user_id, role.as_str())?;
            Some(role.as_str().to_string())
        }
        MemberChange::Remove => {
            if !remove_member(&mut tx, library_id, user_id)? {
                return Err(Error::NotFound("not a member of this library").into());
            }
            None
        }
    };
    commit(tx)?;
    Ok(role)
}

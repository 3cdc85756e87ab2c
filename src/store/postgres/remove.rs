//! Removing users, libraries and portal views (the admin CLI's `remove`):
//! refused while other rows depend on them, or with their dependents in one
//! transaction when asked to cascade, with the SQLite engine's messages.
//!
//! Every removal leaves `membership_changes` rows for the (library, user)
//! pairs whose access it ends, so running servers close those connections
//! (1008 `access revoked`). Deleted member rows log themselves through the
//! schema's trigger; a library's owner and the members of a library losing a
//! view are logged here, under the trigger's advisory lock (schema.sql's
//! cursor trap) and with its NOTIFY.
//!
//! Locks are taken in the order the batch takes them (a library's views
//! `FOR UPDATE` in id order, then the library row), so a removal and a
//! state write queue rather than deadlock; the library row `FOR UPDATE`
//! keeps new views and members out (their insert needs it `FOR KEY SHARE`)
//! until the removal commits.

use postgres::types::Type;
use postgres::GenericClient;

use super::admin::{commit, missing};
use super::pool::Fail;
use crate::domain::error::Error;
use crate::store::Removed;

/// schema.sql's `portal_membership_changed()` lock: whoever draws a
/// `membership_changes` seq holds it until commit.
const MEMBERSHIP_LOCK: i64 = 7_061_727_469_616_301;

fn strings(c: &mut impl GenericClient, sql: &str, id: &str) -> Result<Vec<String>, Fail> {
    c.query_typed(sql, &[(&id, Type::TEXT)])?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

/// "1 library", "2 portal views".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Records that everyone with access to `library_id` through it (its owner
/// and every member) may have lost it, as the trigger does for one row.
fn record_library_access(c: &mut impl GenericClient, library_id: &str) -> Result<(), Fail> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&MEMBERSHIP_LOCK])?;
    c.execute(
        "INSERT INTO membership_changes (library_id, user_id)
         SELECT id, owner_id FROM libraries WHERE id = $1
         UNION SELECT library_id, user_id FROM library_members WHERE library_id = $1",
        &[&library_id],
    )?;
    c.execute("SELECT pg_notify('portal_membership', '')", &[])?;
    Ok(())
}

/// Locks a library and its views (see the module's note on order); `None`
/// when there is no such library. Returns its views' ids.
fn lock_library(c: &mut impl GenericClient, library_id: &str) -> Result<Option<Vec<String>>, Fail> {
    const VIEWS: &str = "SELECT id FROM portal_views WHERE library_id = $1 ORDER BY id FOR UPDATE";
    strings(c, VIEWS, library_id)?;
    let found = c
        .query_typed_opt(
            "SELECT 1 FROM libraries WHERE id = $1 FOR UPDATE",
            &[(&library_id, Type::TEXT)],
        )?
        .is_some();
    if !found {
        return Ok(None);
    }
    // A view added before the library was locked is locked now too.
    Ok(Some(strings(c, VIEWS, library_id)?))
}

/// A locked library, its views (and their stored events) and its member rows.
fn delete_library_rows(
    c: &mut impl GenericClient,
    library_id: &str,
    views: usize,
) -> Result<Removed, Fail> {
    c.execute(
        "DELETE FROM portal_view_events
          WHERE view_id IN (SELECT id FROM portal_views WHERE library_id = $1)",
        &[&library_id],
    )?;
    c.execute(
        "DELETE FROM portal_views WHERE library_id = $1",
        &[&library_id],
    )?;
    record_library_access(c, library_id)?;
    let members = c.execute(
        "DELETE FROM library_members WHERE library_id = $1",
        &[&library_id],
    )?;
    c.execute("DELETE FROM libraries WHERE id = $1", &[&library_id])?;
    Ok(Removed {
        libraries: 1,
        views,
        members: members as usize,
    })
}

/// A library; with views or members only when `cascade` (they go with it).
pub(super) fn remove_library(
    c: &mut impl GenericClient,
    library_id: &str,
    cascade: bool,
) -> Result<Removed, Fail> {
    let mut tx = c.transaction()?;
    let views = lock_library(&mut tx, library_id)?.ok_or_else(|| missing("library", library_id))?;
    let members: i64 = tx
        .query_typed_one(
            "SELECT count(*) FROM library_members WHERE library_id = $1",
            &[(&library_id, Type::TEXT)],
        )?
        .try_get(0)?;
    if !cascade && (!views.is_empty() || members > 0) {
        return Err(Error::Conflicting(format!(
            "library {library_id} has {} and {}",
            counted(views.len(), "portal view", "portal views"),
            counted(members as usize, "member", "members"),
        ))
        .into());
    }
    let removed = delete_library_rows(&mut tx, library_id, views.len())?;
    commit(tx)?;
    Ok(removed)
}

/// A user; one who owns libraries or is a member only when `cascade` (their
/// libraries, with everything in them, and their member rows go too). The
/// user row is locked first: no library or membership can name them
/// meanwhile.
pub(super) fn remove_user(
    c: &mut impl GenericClient,
    user_id: &str,
    cascade: bool,
) -> Result<Removed, Fail> {
    let mut tx = c.transaction()?;
    let found = tx
        .query_typed_opt(
            "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
            &[(&user_id, Type::TEXT)],
        )?
        .is_some();
    if !found {
        return Err(missing("user", user_id).into());
    }
    let owned = strings(
        &mut tx,
        "SELECT id FROM libraries WHERE owner_id = $1 ORDER BY id",
        user_id,
    )?;
    let memberships = strings(
        &mut tx,
        "SELECT library_id FROM library_members WHERE user_id = $1 ORDER BY library_id",
        user_id,
    )?;
    if !cascade && (!owned.is_empty() || !memberships.is_empty()) {
        let mut what = Vec::new();
        if !owned.is_empty() {
            what.push(format!(
                "owns {} ({})",
                counted(owned.len(), "library", "libraries"),
                owned.join(", ")
            ));
        }
        if !memberships.is_empty() {
            what.push(format!(
                "is a member of {} ({})",
                counted(memberships.len(), "library", "libraries"),
                memberships.join(", ")
            ));
        }
        return Err(Error::Conflicting(format!("user {user_id} {}", what.join(" and "))).into());
    }
    let mut removed = Removed::default();
    for library in &owned {
        // Removed meanwhile (psql): nothing left to remove.
        let Some(views) = lock_library(&mut tx, library)? else {
            continue;
        };
        let gone = delete_library_rows(&mut tx, library, views.len())?;
        removed.libraries += gone.libraries;
        removed.views += gone.views;
        removed.members += gone.members;
    }
    removed.members += tx.execute(
        "DELETE FROM library_members WHERE user_id = $1",
        &[&user_id],
    )? as usize;
    tx.execute("DELETE FROM users WHERE id = $1", &[&user_id])?;
    commit(tx)?;
    Ok(removed)
}

/// A portal view and its stored events. Its library's users get a
/// membership change entry so their open connections to it are closed
/// (their connections to the library's other views reconnect).
pub(super) fn remove_view(c: &mut impl GenericClient, view_id: &str) -> Result<Removed, Fail> {
    let mut tx = c.transaction()?;
    let library: String = tx
        .query_typed_opt(
            "SELECT library_id FROM portal_views WHERE id = $1 FOR UPDATE",
            &[(&view_id, Type::TEXT)],
        )?
        .ok_or_else(|| missing("portal view", view_id))?
        .try_get(0)?;
    tx.execute(
        "DELETE FROM portal_view_events WHERE view_id = $1",
        &[&view_id],
    )?;
    tx.execute("DELETE FROM portal_views WHERE id = $1", &[&view_id])?;
    record_library_access(&mut tx, &library)?;
    commit(tx)?;
    Ok(Removed {
        views: 1,
        ..Removed::default()
    })
}

#[cfg(test)]
mod tests {
    /// The lock taken here is the one the trigger takes.
    #[test]
    fn the_membership_lock_is_the_triggers() {
        let schema = include_str!("schema.sql");
        let call = format!("pg_advisory_xact_lock({})", super::MEMBERSHIP_LOCK);
        assert!(schema.contains(&call), "schema.sql has no {call}");
    }
}

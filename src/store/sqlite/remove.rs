//! Removing users, libraries and portal views (the admin CLI's `remove`):
//! refused while other rows depend on them, or with their dependents in one
//! transaction when asked to cascade.
//!
//! Every removal leaves `membership_changes` rows for the (library, user)
//! pairs whose access it ends, so running servers close those connections
//! (1008 `access revoked`) as they do for any membership change.

use rusqlite::{params, Connection};

use super::admin::{immediate, library_exists, missing, view_exists};
use super::reads::user_exists;
use crate::domain::error::Error;
use crate::store::Removed;

fn strings(conn: &Connection, sql: &str, id: &str) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([id], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// "1 library", "2 portal views".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Records that everyone with access to `library_id` through it (its owner
/// and every member) may have lost it. Member rows deleted afterwards add
/// their own entries through the schema's trigger.
fn record_library_access(conn: &Connection, library_id: &str) -> Result<(), Error> {
    conn.execute(
        "INSERT INTO membership_changes (library_id, user_id)
         SELECT id, owner_id FROM libraries WHERE id = ?1
         UNION SELECT library_id, user_id FROM library_members WHERE library_id = ?1",
        [library_id],
    )?;
    Ok(())
}

fn delete_view_rows(conn: &Connection, view_id: &str) -> Result<(), Error> {
    conn.execute(
        "DELETE FROM portal_view_events WHERE view_id = ?1",
        [view_id],
    )?;
    conn.execute("DELETE FROM portal_views WHERE id = ?1", [view_id])?;
    Ok(())
}

/// A library, its views (and their stored events) and its member rows.
fn delete_library_rows(conn: &Connection, library_id: &str) -> Result<Removed, Error> {
    let views = strings(
        conn,
        "SELECT id FROM portal_views WHERE library_id = ?1",
        library_id,
    )?;
    record_library_access(conn, library_id)?;
    for view in &views {
        delete_view_rows(conn, view)?;
    }
    let members = conn.execute(
        "DELETE FROM library_members WHERE library_id = ?1",
        [library_id],
    )?;
    conn.execute("DELETE FROM libraries WHERE id = ?1", [library_id])?;
    Ok(Removed {
        libraries: 1,
        views: views.len(),
        members,
    })
}

/// A library; with views or members only when `cascade` (they go with it).
pub(super) fn remove_library(
    conn: &Connection,
    library_id: &str,
    cascade: bool,
) -> Result<Removed, Error> {
    let tx = immediate(conn)?;
    if !library_exists(&tx, library_id)? {
        return Err(missing("library", library_id));
    }
    let views: i64 = tx.query_row(
        "SELECT count(*) FROM portal_views WHERE library_id = ?1",
        [library_id],
        |r| r.get(0),
    )?;
    let members: i64 = tx.query_row(
        "SELECT count(*) FROM library_members WHERE library_id = ?1",
        [library_id],
        |r| r.get(0),
    )?;
    if !cascade && (views > 0 || members > 0) {
        return Err(Error::Conflicting(format!(
            "library {library_id} has {} and {}",
            counted(views as usize, "portal view", "portal views"),
            counted(members as usize, "member", "members"),
        )));
    }
    let removed = delete_library_rows(&tx, library_id)?;
    tx.commit()?;
    Ok(removed)
}

/// A user; one who owns libraries or is a member only when `cascade` (their
/// libraries, with everything in them, and their member rows go too).
pub(super) fn remove_user(
    conn: &Connection,
    user_id: &str,
    cascade: bool,
) -> Result<Removed, Error> {
    let tx = immediate(conn)?;
    if !user_exists(&tx, user_id)? {
        return Err(missing("user", user_id));
    }
    let owned = strings(
        &tx,
        "SELECT id FROM libraries WHERE owner_id = ?1 ORDER BY id",
        user_id,
    )?;
    let memberships = strings(
        &tx,
        "SELECT library_id FROM library_members WHERE user_id = ?1 ORDER BY library_id",
        user_id,
    )?;
    let depended_on = !owned.is_empty() || !memberships.is_empty();
    if depended_on && !cascade {
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
        return Err(Error::Conflicting(format!(
            "user {user_id} {}",
            what.join(" and ")
        )));
    }
    let mut removed = Removed::default();
    for library in &owned {
        let gone = delete_library_rows(&tx, library)?;
        removed.libraries += gone.libraries;
        removed.views += gone.views;
        removed.members += gone.members;
    }
    removed.members += tx.execute("DELETE FROM library_members WHERE user_id = ?1", [user_id])?;
    tx.execute("DELETE FROM users WHERE id = ?1", params![user_id])?;
    tx.commit()?;
    Ok(removed)
}

/// A portal view and its stored events. Its library's users get a
/// membership change entry so their open connections to it are closed
/// (their connections to the library's other views reconnect).
pub(super) fn remove_view(conn: &Connection, view_id: &str) -> Result<Removed, Error> {
    let tx = immediate(conn)?;
    if !view_exists(&tx, view_id)? {
        return Err(missing("portal view", view_id));
    }
    let library: String = tx.query_row(
        "SELECT library_id FROM portal_views WHERE id = ?1",
        [view_id],
        |r| r.get(0),
    )?;
    record_library_access(&tx, &library)?;
    delete_view_rows(&tx, view_id)?;
    tx.commit()?;
    Ok(Removed {
        views: 1,
        ..Removed::default()
    })
}

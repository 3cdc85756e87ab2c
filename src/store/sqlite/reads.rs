//! The lookups: a handshake's access, a view, stored events and versions,
//! the membership change log.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;

use crate::domain::access::{self, LibraryRole, Standing};
use crate::domain::error::Error;
use crate::domain::model::{is_valid_id, Role};
use crate::store::{Access, Grant, MembershipChange, StoredEvent, ViewRow};

pub(super) fn user_exists(conn: &Connection, user_id: &str) -> Result<bool, Error> {
    if !is_valid_id(user_id) {
        return Ok(false);
    }
    let mut stmt = conn.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?;
    Ok(stmt.exists([user_id])?)
}

/// A view's columns `$columns` with its library's owner and the user's
/// member row (`?1` the user, `?2` the view): the one lookup behind
/// [`access`] and [`grant`], which differ only in the columns they read.
macro_rules! view_with_role {
    ($columns:literal) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM portal_views v
               LEFT JOIN libraries l ON l.id = v.library_id
               LEFT JOIN library_members m ON m.library_id = v.library_id AND m.user_id = ?1
              WHERE v.id = ?2"
        )
    };
}

/// The user's role from the view's library row and their member row, as
/// `domain::access` rules it; no role is `ACCESS_DENIED`.
fn role_of(
    user_id: &str,
    owner_id: Option<String>,
    member_role: Option<String>,
) -> Result<Role, Error> {
    access::required_role(
        user_id,
        owner_id.as_deref(),
        member_role.as_deref().and_then(LibraryRole::parse),
    )
}

/// The checks of SPEC §3 that need storage, in its order: unknown user, view not
/// found, access denied. Reads the current rows, so access changes made by other
/// tools are seen at the next handshake.
pub(super) fn access(conn: &Connection, user_id: &str, view_id: &str) -> Result<Access, Error> {
    known_user_and_view_id(conn, user_id, view_id)?;
    let mut stmt = conn.prepare_cached(view_with_role!(
        "v.library_id, v.name, v.state, v.version, v.updated_at, l.owner_id, m.role"
    ))?;
    let row = stmt
        .query_row(params![user_id, view_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })
        .optional()?;
    let Some((library_id, name, state, version, updated_at, owner_id, member_role)) = row else {
        return Err(Error::ViewNotFound);
    };
    let role = role_of(user_id, owner_id, member_role)?;
    Ok(Access {
        role,
        view: ViewRow::from_columns(view_id, (library_id, name, state, version, updated_at))?,
    })
}

/// The first two checks of SPEC §3 that need storage: the user exists, and the
/// view id could name a view.
pub(super) fn known_user_and_view_id(
    conn: &Connection,
    user_id: &str,
    view_id: &str,
) -> Result<(), Error> {
    if !user_exists(conn, user_id)? {
        return Err(Error::UnknownUser);
    }
    if !is_valid_id(view_id) {
        return Err(Error::ViewNotFound);
    }
    Ok(())
}

/// [`access`] without reading the `state` column: same checks, same order.
pub(super) fn grant(conn: &Connection, user_id: &str, view_id: &str) -> Result<Grant, Error> {
    known_user_and_view_id(conn, user_id, view_id)?;
    let mut stmt = conn.prepare_cached(view_with_role!(
        "v.library_id, v.version, l.owner_id, m.role"
    ))?;
    let row = stmt
        .query_row(params![user_id, view_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .optional()?;
    let Some((library_id, version, owner_id, member_role)) = row else {
        return Err(Error::ViewNotFound);
    };
    let role = role_of(user_id, owner_id, member_role)?;
    Ok(Grant {
        role,
        library_id,
        version,
    })
}

/// The user's standing in a library, read inside the caller's transaction.
pub(super) fn standing_in(
    conn: &Connection,
    user_id: &str,
    library_id: &str,
) -> Result<Standing, Error> {
    if !user_exists(conn, user_id)? {
        return Ok(Standing::NoSuchUser);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT l.owner_id, m.role
           FROM libraries l
           LEFT JOIN library_members m ON m.library_id = l.id AND m.user_id = ?1
          WHERE l.id = ?2",
    )?;
    let row = stmt
        .query_row(params![user_id, library_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?;
    Ok(Standing::Role(row.and_then(|(owner_id, member_role)| {
        access::role_in_library(
            user_id,
            Some(&owner_id),
            member_role.as_deref().and_then(LibraryRole::parse),
        )
    })))
}

/// Validates stored state text: another tool may have written anything.
pub(super) fn state_json(view_id: &str, text: String) -> Result<Box<RawValue>, Error> {
    let corrupt = || {
        Error::Storage(format!(
            "stored state of view {view_id} is not a JSON object"
        ))
    };
    if !text.trim_start().starts_with('{') {
        return Err(corrupt());
    }
    RawValue::from_string(text).map_err(|_| corrupt())
}

pub(super) fn view(conn: &Connection, view_id: &str) -> Result<Option<ViewRow>, Error> {
    select_view(conn, view_id)?
        .map(|columns| ViewRow::from_columns(view_id, columns))
        .transpose()
}

impl ViewRow {
    /// Builds a row from its columns, validating the stored state text.
    fn from_columns(view_id: &str, columns: ViewColumns) -> Result<ViewRow, Error> {
        let (library_id, name, state, version, updated_at) = columns;
        Ok(ViewRow {
            id: view_id.to_string(),
            library_id,
            name,
            state: state_json(view_id, state)?,
            version,
            updated_at,
        })
    }
}

/// A view's columns: library id, name, state text, version, updated at.
pub(super) type ViewColumns = (String, String, String, i64, Option<String>);

pub(super) fn select_view(conn: &Connection, view_id: &str) -> Result<Option<ViewColumns>, Error> {
    if !is_valid_id(view_id) {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT library_id, name, state, version, updated_at FROM portal_views WHERE id = ?1",
    )?;
    Ok(stmt
        .query_row([view_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?)
}

/// The stored broadcasts of a view with versions in `from..=to`, in order.
pub(super) fn events_between(
    conn: &Connection,
    view_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, node, conn, message FROM portal_view_events \
         WHERE view_id = ?1 AND version BETWEEN ?2 AND ?3 ORDER BY version",
    )?;
    let rows = stmt.query_map(params![view_id, from, to], |r| {
        Ok(StoredEvent {
            version: r.get(0)?,
            node: r.get(1)?,
            conn: r.get::<_, Option<i64>>(2)?.map(|k| k as u64),
            message: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Current versions of the given views (missing views are left out).
pub(super) fn versions(
    conn: &Connection,
    view_ids: &[String],
) -> Result<Vec<(String, i64)>, Error> {
    let mut stmt = conn.prepare_cached("SELECT version FROM portal_views WHERE id = ?1")?;
    let mut out = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        if let Some(v) = stmt
            .query_row(params![id], |r| r.get::<_, i64>(0))
            .optional()?
        {
            out.push((id.clone(), v));
        }
    }
    Ok(out)
}

/// The newest recorded membership change (where a starting server begins
/// watching), after pruning entries older than a day.
pub(super) fn membership_changes_start(conn: &Connection) -> Result<i64, Error> {
    conn.execute(
        "DELETE FROM membership_changes WHERE at < CAST(strftime('%s', 'now') AS INTEGER) - 86400",
        [],
    )?;
    Ok(conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM membership_changes",
        [],
        |r| r.get(0),
    )?)
}

pub(super) fn membership_changes_since(
    conn: &Connection,
    seq: i64,
) -> Result<Vec<MembershipChange>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, library_id, user_id FROM membership_changes WHERE seq > ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([seq], |r| {
        Ok(MembershipChange {
            seq: r.get(0)?,
            library_id: r.get(1)?,
            user_id: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

//! The lookups: a handshake's access, a view, stored events and versions,
//! the membership change log. Each is one statement, and each is safe to run
//! again on another connection. A handshake's two lookups (and the batch's
//! standing check) are prepared once per connection (`pool::Conn`); the rest
//! are rare and go unprepared (`query_typed`: one round trip, no prepare).

use postgres::types::Type;
use postgres::GenericClient;
use serde_json::value::RawValue;

use super::canonical::to_serde_text;
use super::pool::{Conn, Fail, Prepared};
use crate::domain::access::{self, LibraryRole, Standing};
use crate::domain::error::Error;
use crate::domain::model::{is_valid_id, Role};
use crate::store::{Access, Grant, MembershipChange, StoredEvent, ViewRow};

/// `updated_at` as text, in the SQLite engine's format (milliseconds, UTC,
/// `Z`: `strftime('%Y-%m-%dT%H:%M:%fZ')`), so both engines answer alike.
macro_rules! iso_ms {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}
pub(super) use iso_ms;

/// Whether the user exists, and the view's columns `$columns` with its
/// library's owner and the user's member row (`$1` the user, `$2` the
/// view), in one round trip: the lookup behind [`access`] and [`grant`].
/// The row is always there; the view's columns are NULL when it is not.
macro_rules! user_and_view_with_role {
    ($columns:expr) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1), ",
            $columns,
            " FROM (SELECT 1) AS one
               LEFT JOIN portal_views v ON v.id = $2
               LEFT JOIN libraries l ON l.id = v.library_id
               LEFT JOIN library_members m ON m.library_id = v.library_id AND m.user_id = $1"
        )
    };
}

pub(super) fn user_exists(c: &mut impl GenericClient, user_id: &str) -> Result<bool, Fail> {
    if !is_valid_id(user_id) {
        return Ok(false);
    }
    Ok(c.query_typed_opt(
        "SELECT 1 FROM users WHERE id = $1",
        &[(&user_id, Type::TEXT)],
    )?
    .is_some())
}

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

/// Runs the lookup and applies SPEC §3's first two checks in its order:
/// unknown user, then view not found (`library_id`, column 1, is NULL).
fn user_and_view(
    c: &mut Conn,
    query: &'static str,
    user_id: &str,
    view_id: &str,
) -> Result<postgres::Row, Fail> {
    if !is_valid_id(user_id) {
        return Err(Error::UnknownUser.into());
    }
    let view = if is_valid_id(view_id) { view_id } else { "" };
    let row = c.with_prepared(query, &[Type::TEXT, Type::TEXT], |client, statement| {
        client.query_one(statement, &[&user_id, &view])
    })?;
    if !row.try_get::<_, bool>(0)? {
        return Err(Error::UnknownUser.into());
    }
    if row.try_get::<_, Option<String>>(1)?.is_none() {
        return Err(Error::ViewNotFound.into());
    }
    Ok(row)
}

/// The checks of SPEC §3 that need storage, in its order: unknown user,
/// view not found, access denied; reads the current rows.
pub(super) fn access(c: &mut Conn, user_id: &str, view_id: &str) -> Result<Access, Fail> {
    let row = user_and_view(
        c,
        user_and_view_with_role!(concat!(
            "v.library_id, v.name, v.state::text, v.version, ",
            iso_ms!("v.updated_at"),
            ", l.owner_id, m.role"
        )),
        user_id,
        view_id,
    )?;
    let role = role_of(user_id, row.try_get(6)?, row.try_get(7)?)?;
    Ok(Access {
        role,
        view: ViewRow {
            id: view_id.to_string(),
            library_id: row.try_get(1)?,
            name: row.try_get(2)?,
            state: state_json(view_id, row.try_get(3)?)?,
            version: row.try_get(4)?,
            updated_at: row.try_get(5)?,
        },
    })
}

/// [`access`] without reading the `state` column: same checks, same order.
pub(super) fn grant(c: &mut Conn, user_id: &str, view_id: &str) -> Result<Grant, Fail> {
    let row = user_and_view(
        c,
        user_and_view_with_role!("v.library_id, v.version, l.owner_id, m.role"),
        user_id,
        view_id,
    )?;
    let role = role_of(user_id, row.try_get(3)?, row.try_get(4)?)?;
    Ok(Grant {
        role,
        library_id: row.try_get(1)?,
        version: row.try_get(2)?,
    })
}

/// The user's standing in a library, inside the batch's transaction. The
/// library row and the member row are locked `FOR SHARE` until the batch
/// commits: a membership change that commits meanwhile (on any node, in
/// psql) waits for the batch, so a change is never applied after the
/// revocation that should have refused it — as SQLite's one writer at a
/// time gives.
pub(super) fn standing_in(
    c: &mut impl GenericClient,
    prepared: &mut Prepared,
    user_id: &str,
    library_id: &str,
) -> Result<Standing, Fail> {
    if !is_valid_id(user_id) {
        return Ok(Standing::NoSuchUser);
    }
    let statement = prepared.get(
        c,
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1),
                (SELECT owner_id FROM libraries WHERE id = $2 FOR SHARE),
                (SELECT role FROM library_members
                  WHERE library_id = $2 AND user_id = $1 FOR SHARE)",
        &[Type::TEXT, Type::TEXT],
    )?;
    let row = c.query_one(&statement, &[&user_id, &library_id])?;
    if !row.try_get::<_, bool>(0)? {
        return Ok(Standing::NoSuchUser);
    }
    let owner: Option<String> = row.try_get(1)?;
    let role: Option<String> = row.try_get(2)?;
    Ok(Standing::Role(owner.and_then(|owner| {
        access::role_in_library(
            user_id,
            Some(&owner),
            role.as_deref().and_then(LibraryRole::parse),
        )
    })))
}

/// The state as the merge would have written it: JSONB keeps its own text
/// (keys ordered by length, `": "` separators), so it is rewritten in
/// serde_json's (canonical.rs): the text is then the one the SQLite engine
/// returns and a commit's own row carries, and clients comparing texts agree.
pub(super) fn state_json(view_id: &str, text: String) -> Result<Box<RawValue>, Error> {
    let corrupt = || {
        Error::Storage(format!(
            "stored state of view {view_id} is not a JSON object"
        ))
    };
    let text = to_serde_text(&text)
        .filter(|t| t.starts_with('{'))
        .ok_or_else(corrupt)?;
    RawValue::from_string(text).map_err(|_| corrupt())
}

pub(super) fn view(c: &mut impl GenericClient, view_id: &str) -> Result<Option<ViewRow>, Fail> {
    if !is_valid_id(view_id) {
        return Ok(None);
    }
    let row = c.query_typed_opt(
        concat!(
            "SELECT library_id, name, state::text, version, ",
            iso_ms!("updated_at"),
            " FROM portal_views WHERE id = $1"
        ),
        &[(&view_id, Type::TEXT)],
    )?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(ViewRow {
        id: view_id.to_string(),
        library_id: row.try_get(0)?,
        name: row.try_get(1)?,
        state: state_json(view_id, row.try_get(2)?)?,
        version: row.try_get(3)?,
        updated_at: row.try_get(4)?,
    }))
}

/// The stored broadcasts of a view with versions in `from..=to`, in order:
/// a per-view range, which is safe across nodes (a view's versions commit
/// in order under its row lock), where a global serial cursor is not.
pub(super) fn events_between(
    c: &mut impl GenericClient,
    view_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, Fail> {
    let rows = c.query_typed(
        "SELECT version, node, conn, message FROM portal_view_events
          WHERE view_id = $1 AND version BETWEEN $2 AND $3 ORDER BY version",
        &[
            (&view_id, Type::TEXT),
            (&from, Type::INT8),
            (&to, Type::INT8),
        ],
    )?;
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                version: r.try_get(0)?,
                node: r.try_get(1)?,
                conn: r.try_get::<_, Option<i64>>(2)?.map(|k| k as u64),
                message: r.try_get(3)?,
            })
        })
        .collect()
}

/// Current versions of the given views (missing views are left out), in
/// one statement.
pub(super) fn versions(
    c: &mut impl GenericClient,
    view_ids: &[String],
) -> Result<Vec<(String, i64)>, Fail> {
    let rows = c.query_typed(
        "SELECT id, version FROM portal_views WHERE id = ANY($1)",
        &[(&view_ids, Type::TEXT_ARRAY)],
    )?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        found.insert(r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?);
    }
    // In the order asked, as the SQLite engine answers.
    Ok(view_ids
        .iter()
        .filter_map(|id| found.get(id).map(|v| (id.clone(), *v)))
        .collect())
}

/// The newest recorded membership change (where a starting server begins
/// watching), after pruning entries older than a day.
pub(super) fn membership_changes_start(c: &mut impl GenericClient) -> Result<i64, Fail> {
    c.execute(
        "DELETE FROM membership_changes WHERE at < now() - interval '1 day'",
        &[],
    )?;
    Ok(
        c.query_typed_one("SELECT coalesce(max(seq), 0) FROM membership_changes", &[])?
            .try_get(0)?,
    )
}

/// Changes after `seq`. Safe as a cursor: the triggers draw seqs in commit
/// order (schema.sql), so no earlier seq can still be uncommitted.
pub(super) fn membership_changes_since(
    c: &mut impl GenericClient,
    seq: i64,
) -> Result<Vec<MembershipChange>, Fail> {
    let rows = c.query_typed(
        "SELECT seq, library_id, user_id FROM membership_changes WHERE seq > $1 ORDER BY seq",
        &[(&seq, Type::INT8)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(MembershipChange {
                seq: r.try_get(0)?,
                library_id: r.try_get(1)?,
                user_id: r.try_get(2)?,
            })
        })
        .collect()
}

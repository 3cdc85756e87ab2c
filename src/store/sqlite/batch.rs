//! The one write: a batch of changes in one IMMEDIATE transaction.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::{Map, Value};

use super::reads::{select_view, standing_in};
use crate::domain::access::Standing;
use crate::domain::error::Error;
use crate::domain::merge::json_len;
use crate::store::{StoreOp, Stored, ViewRow, EVENTS_KEPT};

pub(super) struct Loaded {
    library_id: Arc<str>,
    name: String,
    state: Map<String, Value>,
    /// The state's serialized length, counted when the batch first changes it.
    len: Option<usize>,
    version: i64,
    updated_at: Option<String>,
    dirty: bool,
}

pub(super) enum LoadFailure {
    NotFound,
    Corrupt,
}

/// Applies many ops in one IMMEDIATE transaction (group commit): each view is
/// read and parsed once, every change bumps its version by exactly one, and each
/// changed view is written once at the end. Returns one result per op; the outer
/// error means nothing was committed.
///
/// Each op is checked in order: the view exists, its requester may still do
/// it (token, user, role: one lookup per user and library per batch), its
/// `If-Match`, and that the state it leaves is at most `max_state_bytes`
/// serialized. A refused op changes nothing and leaves the rest of the batch
/// alone.
pub(super) fn apply_batch(
    conn: &mut Connection,
    ops: &[StoreOp],
    max_state_bytes: usize,
) -> Result<Vec<Result<Stored, Error>>, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now: String = tx.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [], |r| {
        r.get(0)
    })?;
    let now_secs = crate::domain::clock::now_secs();
    let mut views: HashMap<&str, Result<Loaded, LoadFailure>> = HashMap::new();
    let mut standings: HashMap<(&str, Arc<str>), Standing> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        if !views.contains_key(op.view_id.as_str()) {
            let loaded = load(&tx, &op.view_id)?;
            views.insert(&op.view_id, loaded);
        }
        let entry = match views.get_mut(op.view_id.as_str()) {
            Some(Ok(entry)) => entry,
            Some(Err(LoadFailure::Corrupt)) => {
                results.push(Err(Error::Storage(format!(
                    "stored state of view {} is not a JSON object",
                    op.view_id
                ))));
                continue;
            }
            Some(Err(LoadFailure::NotFound)) | None => {
                results.push(Err(Error::ViewNotFound));
                continue;
            }
        };
        if let Some(requester) = &op.requester {
            let key = (&*requester.user_id, entry.library_id.clone());
            let standing = match standings.get(&key) {
                Some(standing) => *standing,
                None => {
                    let found = standing_in(&tx, &requester.user_id, &entry.library_id)?;
                    standings.insert(key, found);
                    found
                }
            };
            if let Some(refusal) = requester.refusal(now_secs, standing) {
                results.push(Err(refusal));
                continue;
            }
        }
        if let Some(versions) = &op.if_match {
            if !versions.contains(&entry.version) {
                results.push(Err(Error::PreconditionFailed {
                    current: entry.version,
                }));
                continue;
            }
        }
        let mut event = None;
        if let Some(change) = &op.change {
            let len = *entry.len.get_or_insert_with(|| json_len(&entry.state));
            let len_after = change.len_after(&entry.state, len);
            if len_after > max_state_bytes {
                results.push(Err(Error::StateTooLarge {
                    len: len_after,
                    max: max_state_bytes,
                }));
                continue;
            }
            change.apply(&mut entry.state);
            entry.len = Some(len_after);
            entry.version += 1;
            entry.updated_at = Some(now.clone());
            entry.dirty = true;
            if let Some(template) = &op.event {
                let text = (template.render)(entry.version);
                let conn_key = template.conn.map(|k| k as i64);
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO portal_view_events (view_id, version, node, conn, message) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![op.view_id, entry.version, &*template.node, conn_key, text])?;
                tx.prepare_cached(
                    "DELETE FROM portal_view_events WHERE view_id = ?1 AND version <= ?2",
                )?
                .execute(params![op.view_id, entry.version - EVENTS_KEPT])?;
                event = Some(text);
            }
        }
        let row = op
            .want_row
            .then(|| row_of(&op.view_id, entry))
            .transpose()?;
        results.push(Ok(Stored {
            version: entry.version,
            row,
            event,
        }));
    }
    {
        let mut update = tx.prepare_cached(
            "UPDATE portal_views SET state = ?1, version = ?2, updated_at = ?3 WHERE id = ?4",
        )?;
        for (id, entry) in &views {
            if let Ok(entry) = entry {
                if entry.dirty {
                    let state = serde_json::to_string(&entry.state)
                        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
                    update.execute(params![state, entry.version, entry.updated_at, id])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

pub(super) fn load(conn: &Connection, view_id: &str) -> Result<Result<Loaded, LoadFailure>, Error> {
    let Some((library_id, name, state, version, updated_at)) = select_view(conn, view_id)? else {
        return Ok(Err(LoadFailure::NotFound));
    };
    let Ok(Value::Object(state)) = serde_json::from_str::<Value>(&state) else {
        return Ok(Err(LoadFailure::Corrupt));
    };
    Ok(Ok(Loaded {
        library_id: library_id.into(),
        name,
        state,
        len: None,
        version,
        updated_at,
        dirty: false,
    }))
}

pub(super) fn row_of(view_id: &str, entry: &Loaded) -> Result<ViewRow, Error> {
    let state = serde_json::value::to_raw_value(&entry.state)
        .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
    Ok(ViewRow {
        id: view_id.to_string(),
        library_id: entry.library_id.to_string(),
        name: entry.name.clone(),
        state,
        version: entry.version,
        updated_at: entry.updated_at.clone(),
    })
}

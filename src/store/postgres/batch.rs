//! The one write: a batch of changes in one transaction, its views locked in
//! sorted order, and how a batch whose COMMIT went unanswered is told apart
//! from one that never committed.
//!
//! Gapless versions across nodes: the batch locks every view it touches
//! (`FOR UPDATE`, in id order, so two nodes' batches over {a, b} and {b, a}
//! queue rather than deadlock) before reading them, so a view's version is
//! read and bumped by one writer at a time, whichever node it runs on; a
//! sequence could not do this (it is never rolled back).
//!
//! Unknown outcomes: each batch carries a random id, inserted into
//! `portal_batches` as the transaction's first statement. When an attempt
//! fails at COMMIT with its connection lost, the next attempt (on a fresh
//! connection) inserts the same id first: a conflict means the earlier one
//! committed, and its results are returned; an insert means it did not, and
//! the batch is applied afresh. The insert also waits for an earlier attempt
//! still in flight on a half-dead connection, so the answer cannot go stale.

use std::collections::HashMap;
use std::sync::Arc;

use postgres::types::Type;
use postgres::{Client, Transaction};
use serde_json::{Map, Value};

use super::pool::{is_retryable, Fail};
use super::reads::{iso_ms, parse_state, standing_in};
use crate::domain::access::Standing;
use crate::domain::error::Error;
use crate::domain::merge::json_len;
use crate::domain::model::is_valid_id;
use crate::store::{StoreOp, Stored, ViewRow, EVENTS_KEPT};

/// One batch's results.
pub(super) type Results = Vec<Result<Stored, Error>>;

/// How one attempt ended, when it did not fail.
pub(super) enum Applied {
    /// Committed now.
    Now(Results),
    /// An earlier attempt of this batch had committed: its results stand.
    Earlier(Results),
}

/// A test's way to break a batch at its most delicate point.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The backend is killed (`pg_terminate_backend`) just before COMMIT.
    KillBeforeCommit,
    /// COMMIT succeeds and its answer is "lost" (reported as a lost connection).
    LoseCommitReply,
}

struct Loaded {
    library_id: Arc<str>,
    name: String,
    state: Map<String, Value>,
    len: Option<usize>,
    version: i64,
    updated_at: Option<String>,
    dirty: bool,
    /// Whether this batch stored a broadcast for the view (to prune once).
    evented: bool,
}

enum LoadFailure {
    NotFound,
    Corrupt,
}

/// One attempt on `client`. `uncertain` holds the results of an earlier
/// attempt whose COMMIT went unanswered; this attempt settles it (taking it
/// back when that attempt committed, clearing it when it did not) and
/// leaves its own there when its COMMIT goes unanswered too.
pub(super) fn attempt(
    client: &mut Client,
    batch_id: &str,
    ops: &[StoreOp],
    max_state_bytes: usize,
    uncertain: &mut Option<Results>,
    #[cfg(test)] fault: Option<Fault>,
) -> Result<Applied, Fail> {
    let mut tx = client.transaction()?;
    if uncertain.is_some() {
        // Waiting on an earlier attempt's row is bounded.
        tx.batch_execute("SET LOCAL lock_timeout = '3s'")?;
    }
    let inserted = tx.query_typed_opt(
        concat!(
            "INSERT INTO portal_batches (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING ",
            iso_ms!("at")
        ),
        &[(&batch_id, Type::TEXT)],
    )?;
    let Some(inserted) = inserted else {
        return match uncertain.take() {
            Some(results) => Ok(Applied::Earlier(results)),
            None => Err(Error::Internal(format!("batch id {batch_id} already used")).into()),
        };
    };
    *uncertain = None;
    let now: String = inserted.try_get(0)?;
    let results = apply_ops(&mut tx, ops, max_state_bytes, &now)?;
    #[cfg(test)]
    if fault == Some(Fault::KillBeforeCommit) {
        let _ = tx.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())");
    }
    match tx.commit() {
        Ok(()) => {}
        Err(e) if is_retryable(&e) => {
            // Committed or not: the next attempt finds out.
            *uncertain = Some(results);
            return Err(Fail::Retry(format!("COMMIT unanswered: {e}")));
        }
        Err(e) => return Err(Fail::Err(e.into())),
    }
    #[cfg(test)]
    if fault == Some(Fault::LoseCommitReply) {
        *uncertain = Some(results);
        return Err(Fail::Retry("COMMIT reply lost (test fault)".into()));
    }
    Ok(Applied::Now(results))
}

/// The ops in batch order, with the SQLite engine's checks in its order:
/// the view exists, its requester may still do it (`domain::access`, one
/// lookup per user and library per batch), its `If-Match`, and the state it
/// leaves is at most `max_state_bytes` serialized. A refused op changes
/// nothing and leaves the rest of the batch alone.
fn apply_ops(
    tx: &mut Transaction<'_>,
    ops: &[StoreOp],
    max_state_bytes: usize,
    now: &str,
) -> Result<Results, Fail> {
    let mut views = lock_views(tx, ops)?;
    let now_secs = crate::domain::clock::now_secs();
    let mut standings: HashMap<(&str, Arc<str>), Standing> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
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
                    let found = standing_in(tx, &requester.user_id, &entry.library_id)?;
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
            entry.updated_at = Some(now.to_string());
            entry.dirty = true;
            if let Some(template) = &op.event {
                let text = (template.render)(entry.version);
                let conn_key = template.conn.map(|k| k as i64);
                tx.execute_typed(
                    "INSERT INTO portal_view_events (view_id, version, node, conn, message)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (view_id, version) DO UPDATE
                        SET node = EXCLUDED.node, conn = EXCLUDED.conn, message = EXCLUDED.message",
                    &[
                        (&op.view_id, Type::TEXT),
                        (&entry.version, Type::INT8),
                        (&&*template.node, Type::TEXT),
                        (&conn_key, Type::INT8),
                        (&text, Type::TEXT),
                    ],
                )?;
                entry.evented = true;
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
    write_views(tx, &views)?;
    Ok(results)
}

/// Locks and reads every view of the batch, in id order.
fn lock_views<'a>(
    tx: &mut Transaction<'_>,
    ops: &'a [StoreOp],
) -> Result<HashMap<&'a str, Result<Loaded, LoadFailure>>, Fail> {
    let mut ids: Vec<&str> = ops
        .iter()
        .map(|op| op.view_id.as_str())
        .filter(|id| is_valid_id(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = tx.query_typed(
        concat!(
            "SELECT id, library_id, name, state::text, version, ",
            iso_ms!("updated_at"),
            " FROM portal_views WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ),
        &[(&ids, Type::TEXT_ARRAY)],
    )?;
    let mut views: HashMap<&str, Result<Loaded, LoadFailure>> = ops
        .iter()
        .map(|op| (op.view_id.as_str(), Err(LoadFailure::NotFound)))
        .collect();
    for row in rows {
        let id: String = row.try_get(0)?;
        let Some(&key) = views.get_key_value(id.as_str()).map(|(k, _)| k) else {
            continue;
        };
        let state: String = row.try_get(3)?;
        let loaded = match parse_state(&state) {
            Some(state) => Ok(Loaded {
                library_id: row.try_get::<_, String>(1)?.into(),
                name: row.try_get(2)?,
                state,
                len: None,
                version: row.try_get(4)?,
                updated_at: row.try_get(5)?,
                dirty: false,
                evented: false,
            }),
            None => Err(LoadFailure::Corrupt),
        };
        views.insert(key, loaded);
    }
    Ok(views)
}

/// Writes each changed view once, and prunes its stored broadcasts to the
/// last [`EVENTS_KEPT`].
fn write_views(
    tx: &mut Transaction<'_>,
    views: &HashMap<&str, Result<Loaded, LoadFailure>>,
) -> Result<(), Fail> {
    for (id, entry) in views {
        let Ok(entry) = entry else { continue };
        if !entry.dirty {
            continue;
        }
        let state = serde_json::to_string(&entry.state)
            .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
        tx.execute_typed(
            "UPDATE portal_views
                SET state = $1::text::jsonb, version = $2, updated_at = $3::text::timestamptz
              WHERE id = $4",
            &[
                (&state, Type::TEXT),
                (&entry.version, Type::INT8),
                (&entry.updated_at, Type::TEXT),
                (id, Type::TEXT),
            ],
        )?;
        if entry.evented {
            tx.execute_typed(
                "DELETE FROM portal_view_events WHERE view_id = $1 AND version <= $2",
                &[
                    (id, Type::TEXT),
                    (&(entry.version - EVENTS_KEPT), Type::INT8),
                ],
            )?;
        }
    }
    Ok(())
}

fn row_of(view_id: &str, entry: &Loaded) -> Result<ViewRow, Error> {
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

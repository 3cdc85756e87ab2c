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

use postgres::types::Type;
use postgres::{Client, Transaction};

use super::pool::{is_retryable, Conn, Fail, Prepared};
use super::reads::{iso_ms, standing_in};
use crate::domain::access::Standing;
use crate::domain::error::Error;
use crate::domain::model::is_valid_id;
use crate::store::batch::{apply_ops, BatchIo, LoadFailure, Loaded, Views};
use crate::store::{StoreOp, Stored, EVENTS_KEPT};

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

/// One attempt on `client`. `uncertain` holds the results of an earlier
/// attempt whose COMMIT went unanswered; this attempt settles it (taking it
/// back when that attempt committed, clearing it when it did not) and
/// leaves its own there when its COMMIT goes unanswered too.
pub(super) fn attempt(
    conn: &mut Conn,
    batch_id: &str,
    ops: &[StoreOp],
    max_state_bytes: usize,
    uncertain: &mut Option<Results>,
    #[cfg(test)] fault: Option<Fault>,
) -> Result<Applied, Fail> {
    let (client, prepared) = conn.split();
    let outcome = attempt_on(
        client,
        prepared,
        batch_id,
        ops,
        max_state_bytes,
        uncertain,
        #[cfg(test)]
        fault,
    );
    if let Err(Fail::Retry(_)) = &outcome {
        // Whatever the cause, the next attempt prepares afresh (a stale
        // statement is one of the causes a retry must get past).
        prepared.forget();
    }
    outcome
}

/// [`attempt`] with its statements prepared on `client` (`prepared`).
fn attempt_on(
    client: &mut Client,
    prepared: &mut Prepared,
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
    let insert = prepared.get(
        &mut tx,
        concat!(
            "INSERT INTO portal_batches (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING ",
            iso_ms!("at")
        ),
        &[Type::TEXT],
    )?;
    let inserted = tx.query_opt(&insert, &[&batch_id])?;
    let Some(inserted) = inserted else {
        return match uncertain.take() {
            Some(results) => Ok(Applied::Earlier(results)),
            None => Err(Error::Internal(format!("batch id {batch_id} already used")).into()),
        };
    };
    *uncertain = None;
    let now: String = inserted.try_get(0)?;
    let mut views = lock_views(&mut tx, prepared, ops)?;
    let mut io = Io {
        tx: &mut tx,
        prepared,
        events: Events::default(),
    };
    let results = apply_ops(&mut io, &mut views, ops, max_state_bytes, &now)?;
    io.store_events()?;
    write_views(&mut tx, prepared, &views)?;
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

/// The batch's transaction, for `store::batch`, and the broadcasts its
/// changes carry: stored in one statement at the end of the batch, since one
/// INSERT per change was a round trip each (BENCHMARKS.md: two nodes' acked
/// updates/s 3.4× with one).
struct Io<'a, 't> {
    tx: &'a mut Transaction<'t>,
    prepared: &'a mut Prepared,
    events: Events,
}

/// `portal_view_events` rows, column by column, for `unnest`.
#[derive(Default)]
struct Events {
    view_ids: Vec<String>,
    versions: Vec<i64>,
    nodes: Vec<String>,
    conns: Vec<Option<i64>>,
    messages: Vec<String>,
}

impl Io<'_, '_> {
    /// Versions only grow within a batch, so no row is named twice.
    fn store_events(&mut self) -> Result<(), Fail> {
        let e = &self.events;
        if e.view_ids.is_empty() {
            return Ok(());
        }
        self.tx.execute_typed(
            "INSERT INTO portal_view_events (view_id, version, node, conn, message)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[])
             ON CONFLICT (view_id, version) DO UPDATE
                SET node = EXCLUDED.node, conn = EXCLUDED.conn, message = EXCLUDED.message",
            &[
                (&e.view_ids, Type::TEXT_ARRAY),
                (&e.versions, Type::INT8_ARRAY),
                (&e.nodes, Type::TEXT_ARRAY),
                (&e.conns, Type::INT8_ARRAY),
                (&e.messages, Type::TEXT_ARRAY),
            ],
        )?;
        Ok(())
    }
}

impl BatchIo for Io<'_, '_> {
    type Fail = Fail;

    fn standing(&mut self, user_id: &str, library_id: &str) -> Result<Standing, Fail> {
        standing_in(self.tx, self.prepared, user_id, library_id)
    }

    fn store_event(
        &mut self,
        view_id: &str,
        version: i64,
        node: &str,
        conn: Option<i64>,
        message: &str,
    ) -> Result<(), Fail> {
        let e = &mut self.events;
        e.view_ids.push(view_id.to_string());
        e.versions.push(version);
        e.nodes.push(node.to_string());
        e.conns.push(conn);
        e.messages.push(message.to_string());
        Ok(())
    }
}

/// Locks and reads every view of the batch, in id order.
fn lock_views<'a>(
    tx: &mut Transaction<'_>,
    prepared: &mut Prepared,
    ops: &'a [StoreOp],
) -> Result<Views<'a>, Fail> {
    let mut ids: Vec<&str> = ops
        .iter()
        .map(|op| op.view_id.as_str())
        .filter(|id| is_valid_id(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let select = prepared.get(
        tx,
        concat!(
            "SELECT id, library_id, name, state::text, version, ",
            iso_ms!("updated_at"),
            " FROM portal_views WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ),
        &[Type::TEXT_ARRAY],
    )?;
    let rows = tx.query(&select, &[&ids])?;
    let mut views: Views<'a> = ops
        .iter()
        .map(|op| (op.view_id.as_str(), Err(LoadFailure::NotFound)))
        .collect();
    for row in rows {
        let id: String = row.try_get(0)?;
        let Some(&key) = views.get_key_value(id.as_str()).map(|(k, _)| k) else {
            continue;
        };
        let state: String = row.try_get(3)?;
        let loaded = Loaded::parse(
            row.try_get(1)?,
            row.try_get(2)?,
            &state,
            row.try_get(4)?,
            row.try_get(5)?,
        );
        views.insert(key, loaded);
    }
    Ok(views)
}

/// Writes each changed view once, and prunes its stored broadcasts to the
/// last [`EVENTS_KEPT`].
fn write_views(
    tx: &mut Transaction<'_>,
    prepared: &mut Prepared,
    views: &Views<'_>,
) -> Result<(), Fail> {
    for (id, entry) in views {
        let Ok(entry) = entry else { continue };
        if !entry.dirty {
            continue;
        }
        let state = entry.state_text()?;
        let update = prepared.get(
            tx,
            "UPDATE portal_views
                SET state = $1::text::jsonb, version = $2, updated_at = $3::text::timestamptz
              WHERE id = $4",
            &[Type::TEXT, Type::INT8, Type::TEXT, Type::TEXT],
        )?;
        tx.execute(&update, &[&state, &entry.version, &entry.updated_at, id])?;
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

//! The one write: a batch of changes in one IMMEDIATE transaction. What each
//! op may do is `store::batch`'s; this file loads, stores and writes back.

use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::reads::{select_view, standing_in};
use crate::domain::access::Standing;
use crate::domain::error::Error;
use crate::store::batch::{apply_ops, BatchIo, LoadFailure, Loaded, Views};
use crate::store::{StoreOp, Stored, EVENTS_KEPT};

/// Applies many ops in one IMMEDIATE transaction (group commit): each view is
/// read and parsed once, the ops are checked and applied in order
/// ([`apply_ops`]), and each changed view is written once at the end.
/// Returns one result per op; the outer error means nothing was committed.
pub(super) fn apply_batch(
    conn: &mut Connection,
    ops: &[StoreOp],
    max_state_bytes: usize,
) -> Result<Vec<Result<Stored, Error>>, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now: String = tx.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [], |r| {
        r.get(0)
    })?;
    let mut views: Views<'_> = Views::new();
    for op in ops {
        if !views.contains_key(op.view_id.as_str()) {
            views.insert(&op.view_id, load(&tx, &op.view_id)?);
        }
    }
    let results = apply_ops(&mut Io(&tx), &mut views, ops, max_state_bytes, &now)?;
    {
        let mut update = tx.prepare_cached(
            "UPDATE portal_views SET state = ?1, version = ?2, updated_at = ?3 WHERE id = ?4",
        )?;
        let mut prune = tx.prepare_cached(
            "DELETE FROM portal_view_events WHERE view_id = ?1 AND version <= ?2",
        )?;
        for (id, entry) in &views {
            let Ok(entry) = entry else { continue };
            if entry.dirty {
                update.execute(params![
                    entry.state_text()?,
                    entry.version,
                    entry.updated_at,
                    id
                ])?;
            }
            if entry.evented {
                prune.execute(params![id, entry.version - EVENTS_KEPT])?;
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

/// The batch's transaction, for `store::batch`.
struct Io<'a, 'c>(&'a Transaction<'c>);

impl BatchIo for Io<'_, '_> {
    type Fail = Error;

    fn standing(&mut self, user_id: &str, library_id: &str) -> Result<Standing, Error> {
        standing_in(self.0, user_id, library_id)
    }

    fn store_event(
        &mut self,
        view_id: &str,
        version: i64,
        node: &str,
        conn: Option<i64>,
        message: &str,
    ) -> Result<(), Error> {
        self.0
            .prepare_cached(
                "INSERT OR REPLACE INTO portal_view_events (view_id, version, node, conn, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![view_id, version, node, conn, message])?;
        Ok(())
    }
}

pub(super) fn load(conn: &Connection, view_id: &str) -> Result<Result<Loaded, LoadFailure>, Error> {
    let Some((library_id, name, state, version, updated_at)) = select_view(conn, view_id)? else {
        return Ok(Err(LoadFailure::NotFound));
    };
    Ok(Loaded::parse(library_id, name, &state, version, updated_at))
}

//! What a batch does to each of its ops, whatever the engine: the checks of
//! [`Store::apply_batch`](crate::store::Store::apply_batch) in their order,
//! and the change applied to the view in memory. An engine locks and loads
//! the views, answers standings, stores broadcasts and writes back the views
//! that changed; this module decides, so the two engines cannot drift apart
//! on who may write what.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::domain::access::Standing;
use crate::domain::error::Error;
use crate::domain::merge::json_len;
use crate::store::{StoreOp, Stored, ViewRow};

/// A view as a batch holds it, from its load to its write-back.
pub(crate) struct Loaded {
    pub library_id: Arc<str>,
    pub name: String,
    pub state: Map<String, Value>,
    /// The state's serialized length, counted when the batch first changes it.
    pub len: Option<usize>,
    pub version: i64,
    pub updated_at: Option<String>,
    /// Changed by this batch: to be written back.
    pub dirty: bool,
    /// This batch stored a broadcast of it (old ones to be pruned once).
    pub evented: bool,
}

/// Why a view of the batch could not be loaded.
pub(crate) enum LoadFailure {
    NotFound,
    /// Its stored state is not a JSON object (another tool wrote it).
    Corrupt,
}

/// The views of a batch by id, as loaded.
pub(crate) type Views<'a> = HashMap<&'a str, Result<Loaded, LoadFailure>>;

impl Loaded {
    /// A view as stored; `state` is its text, refused unless a JSON object.
    pub fn parse(
        library_id: String,
        name: String,
        state: &str,
        version: i64,
        updated_at: Option<String>,
    ) -> Result<Loaded, LoadFailure> {
        let Ok(Value::Object(state)) = serde_json::from_str::<Value>(state) else {
            return Err(LoadFailure::Corrupt);
        };
        Ok(Loaded {
            library_id: library_id.into(),
            name,
            state,
            len: None,
            version,
            updated_at,
            dirty: false,
            evented: false,
        })
    }

    pub fn row(&self, view_id: &str) -> Result<ViewRow, Error> {
        let state = serde_json::value::to_raw_value(&self.state)
            .map_err(|e| Error::Internal(format!("serializing state: {e}")))?;
        Ok(ViewRow {
            id: view_id.to_string(),
            library_id: self.library_id.to_string(),
            name: self.name.clone(),
            state,
            version: self.version,
            updated_at: self.updated_at.clone(),
        })
    }

    /// The state as the text an engine stores.
    pub fn state_text(&self) -> Result<String, Error> {
        serde_json::to_string(&self.state)
            .map_err(|e| Error::Internal(format!("serializing state: {e}")))
    }
}

/// What a batch needs from its engine's open transaction.
pub(crate) trait BatchIo {
    /// The engine's failure (its own retry signals, or the domain's error).
    type Fail: From<Error>;

    /// A user's standing in a library, as of this transaction.
    fn standing(&mut self, user_id: &str, library_id: &str) -> Result<Standing, Self::Fail>;

    /// Stores a change's broadcast with the change, in this transaction
    /// (at once, or with the batch's others before it commits).
    fn store_event(
        &mut self,
        view_id: &str,
        version: i64,
        node: &str,
        conn: Option<i64>,
        message: &str,
    ) -> Result<(), Self::Fail>;
}

/// The ops in batch order, each checked in turn: the view exists, its
/// requester may still do it (`domain::access`, one lookup per user and
/// library per batch), its `If-Match`, and that the state it leaves is at
/// most `max_state_bytes` serialized. A refused op changes nothing and
/// leaves the rest of the batch alone. `now` is the transaction's time, as
/// `updated_at` stores it. The outer error means the batch must not commit.
pub(crate) fn apply_ops<Io: BatchIo>(
    io: &mut Io,
    views: &mut Views<'_>,
    ops: &[StoreOp],
    max_state_bytes: usize,
    now: &str,
) -> Result<Vec<Result<Stored, Error>>, Io::Fail> {
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
                    let found = io.standing(&requester.user_id, &entry.library_id)?;
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
                let conn = template.conn.map(|k| k as i64);
                io.store_event(&op.view_id, entry.version, &template.node, conn, &text)?;
                entry.evented = true;
                event = Some(text);
            }
        }
        let row = op.want_row.then(|| entry.row(&op.view_id)).transpose()?;
        results.push(Ok(Stored {
            version: entry.version,
            row,
            event,
        }));
    }
    Ok(results)
}

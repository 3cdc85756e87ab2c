//! Storage (SPEC §1): the seam every engine sits behind. [`Store`] holds the
//! domain's questions and its one write (a batch of changes, applied in one
//! transaction); [`Admin`] what the CLI and fixtures need. Engines are
//! blocking; [`Storage`] runs their calls on storage threads of their own.
//!
//! An engine renders nothing: a change's broadcast text comes ready to be
//! stored through [`EventTemplate::render`], which the write path builds.

pub(crate) mod batch;
pub(crate) mod postgres;
pub(crate) mod sqlite;
mod storage;

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::access::LibraryRole;
pub use crate::domain::access::{Needs, Requester};
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::domain::model::Role;
pub use storage::Storage;

/// The domain's storage: every method is one short blocking call.
pub trait Store: Send + Sync + 'static {
    /// SPEC §3's checks that need storage, in its order: unknown user (401),
    /// view not found (404), access denied (403); with the view as stored.
    fn access(&self, user_id: &str, view_id: &str) -> Result<Access, Error>;

    /// [`Store::access`] without the view's state.
    fn grant(&self, user_id: &str, view_id: &str) -> Result<Grant, Error>;

    fn view(&self, view_id: &str) -> Result<Option<ViewRow>, Error>;

    /// Applies many ops in one transaction (group commit). Each op is checked
    /// in order: the view exists, its requester may still do it (the rules of
    /// `domain::access`), its `If-Match`, and that the state it leaves is at
    /// most `max_state_bytes` serialized. Every change bumps its view's
    /// version by exactly one. Returns one result per op; the outer error
    /// means nothing was committed.
    fn apply_batch(
        &self,
        ops: &[StoreOp],
        max_state_bytes: usize,
    ) -> Result<Vec<Result<Stored, Error>>, Error>;

    /// The stored broadcasts of a view with versions in `from..=to`, in order.
    fn events_between(&self, view_id: &str, from: i64, to: i64) -> Result<Vec<StoredEvent>, Error>;

    /// Current versions of the given views (missing views are left out).
    fn versions(&self, view_ids: &[String]) -> Result<Vec<(String, i64)>, Error>;

    /// The newest recorded membership change, where a starting server begins
    /// watching (old entries may be pruned here).
    fn membership_changes_start(&self) -> Result<i64, Error>;

    /// Membership changes recorded after `seq`, whoever made them.
    fn membership_changes_since(&self, seq: i64) -> Result<Vec<MembershipChange>, Error>;

    /// SPEC §4's membership routes, every check and the change in one
    /// transaction: unknown caller (401), no such library (404), caller may
    /// not manage members (403), the library's owner (409), no such user or
    /// not a member (404). Applies nothing when `apply` is false (the check
    /// before reading a body). Returns the member's role afterwards (`None`
    /// once removed).
    fn change_member(
        &self,
        caller: &str,
        library_id: &str,
        user_id: &str,
        change: &MemberChange,
        apply: bool,
    ) -> Result<Option<String>, Error>;

    /// `/health`: a fresh look at the engine, through a real query.
    fn ping(&self) -> Result<(), Error>;

    /// Whether a handshake's lookups ([`Store::access`], [`Store::grant`])
    /// may run on the async thread that asks, rather than be queued for a
    /// storage thread. True where they are a few microseconds of local,
    /// non-blocking reads (SQLite in WAL mode: readers never wait for the
    /// writer); the two thread hops they save were a third of a handshake's
    /// CPU (BENCHMARKS.md, issue 18). False over a network.
    fn reads_inline(&self) -> bool {
        false
    }

    /// A refusal known without any I/O (the SQLite file was seen deleted),
    /// looked at before every queued call.
    fn unavailable(&self) -> Option<Error> {
        None
    }

    /// Calls `wake` whenever a membership change may have committed (and
    /// once after every (re)connect), so the revocation watcher reads the
    /// log at once rather than at its next poll. Engines that cannot tell
    /// leave it to the poll.
    fn watch_membership(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let _ = wake;
    }

    fn admin(&self) -> &dyn Admin;
}

/// Administration: the CLI's `user`, `library`, `member`, `view` commands
/// and the tests' fixtures.
pub trait Admin {
    /// A taken id or email is [`Error::Conflicting`], naming it.
    fn add_user(&self, id: &str, email: &str, name: &str) -> Result<(), Error>;
    /// A taken id is [`Error::Conflicting`]; an unknown owner [`Error::Missing`].
    fn add_library(&self, id: &str, name: &str, owner_id: &str) -> Result<(), Error>;
    /// Adds a member or changes their role; returns the previous role text.
    /// An unknown library or user is [`Error::Missing`]. No owner rule here
    /// (the seed gives the owner a row); the CLI applies `domain::access`'s.
    fn set_member(
        &self,
        library_id: &str,
        user_id: &str,
        role: LibraryRole,
    ) -> Result<Option<String>, Error>;
    /// The stored role text of a member row, as another tool may have written it.
    fn member_role(&self, library_id: &str, user_id: &str) -> Result<Option<String>, Error>;
    /// Returns whether a membership was removed.
    fn remove_member(&self, library_id: &str, user_id: &str) -> Result<bool, Error>;
    /// A taken id is [`Error::Conflicting`]; an unknown library [`Error::Missing`].
    fn add_view(
        &self,
        id: &str,
        library_id: &str,
        name: &str,
        state: &Map<String, Value>,
    ) -> Result<(), Error>;
    fn user_exists(&self, user_id: &str) -> Result<bool, Error>;
    fn user(&self, user_id: &str) -> Result<Option<UserRow>, Error>;
    fn library(&self, library_id: &str) -> Result<Option<LibraryRow>, Error>;
    /// Removes a user. One who owns libraries or is a member is refused
    /// ([`Error::Conflicting`], naming them) unless `cascade`: then their
    /// libraries (with their views and members) and member rows go too, in
    /// one transaction. Unknown: [`Error::Missing`].
    fn remove_user(&self, user_id: &str, cascade: bool) -> Result<Removed, Error>;
    /// Removes a library; one with views or members only when `cascade`.
    fn remove_library(&self, library_id: &str, cascade: bool) -> Result<Removed, Error>;
    /// Removes a portal view and its stored events; the library's users get a
    /// membership change entry, so servers close their connections to it.
    fn remove_view(&self, view_id: &str) -> Result<Removed, Error>;
    fn users(&self) -> Result<Vec<UserRow>, Error>;
    fn libraries(&self) -> Result<Vec<LibraryRow>, Error>;
    /// A library's member rows, by user id.
    fn members(&self, library_id: &str) -> Result<Vec<MemberRow>, Error>;
    /// Every view, by id, without its state.
    fn views(&self) -> Result<Vec<ViewSummary>, Error>;
}

/// What a removal deleted, dependents included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub libraries: usize,
    pub views: usize,
    pub members: usize,
}

/// A portal view as stored. `state` is kept as validated JSON text so it can be
/// embedded in replies without a parse/serialize round trip.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewRow {
    pub id: String,
    pub library_id: String,
    pub name: String,
    pub state: Box<RawValue>,
    pub version: i64,
    pub updated_at: Option<String>,
}

/// The answer to "may this user see this view, and as what".
#[derive(Debug)]
pub struct Access {
    pub role: Role,
    pub view: ViewRow,
}

/// [`Access`] without the view's state, for routes that do not send it (a
/// PATCH, a POST): reading a state of hundreds of kilobytes for every request
/// on its view, refused ones included, was most of their cost.
#[derive(Debug, Clone)]
pub struct Grant {
    pub role: Role,
    pub library_id: String,
    pub version: i64,
}

/// `--json` names its fields as REST does (camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
}

/// `--json` names its fields as REST does (camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LibraryRow {
    pub id: String,
    pub name: String,
    pub owner_id: String,
}

/// `--json` names its fields as REST does (camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRow {
    pub user_id: String,
    pub role: String,
}

/// `--json` names its fields as REST does (camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewSummary {
    pub id: String,
    pub library_id: String,
    pub name: String,
    pub version: i64,
    pub updated_at: Option<String>,
}

/// One unit of work for [`Store::apply_batch`].
#[derive(Debug)]
pub struct StoreOp {
    pub view_id: String,
    /// `None` reads the view as of this point of the batch without changing it.
    pub change: Option<Change>,
    /// REST `If-Match`: the versions that may be current, or `None` for no condition.
    pub if_match: Option<Vec<i64>>,
    /// Return the whole row as of this op (REST answers, server sync-responses).
    pub want_row: bool,
    /// With several nodes: the change's broadcast, stored with the change in
    /// the same transaction, so that another node can fill a gap in what the
    /// broker delivered.
    pub event: Option<EventTemplate>,
    /// Who must still be allowed to do this when it is applied; `None` for
    /// the server's own work.
    pub requester: Option<Requester>,
}

/// A change's broadcast, to be stored once its version is known.
pub struct EventTemplate {
    /// The broadcast frame's text for a version, exactly as a single node
    /// would send it (built by the write path from `protocol`).
    pub render: Box<dyn Fn(i64) -> String + Send + Sync>,
    /// The node that committed it, so the sender's own socket is skipped.
    pub node: Arc<str>,
    /// The sending connection's hub key on that node, if any.
    pub conn: Option<u64>,
}

impl std::fmt::Debug for EventTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventTemplate")
            .field("node", &self.node)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

/// Stored broadcasts kept per view: enough to fill any gap a broker hiccup
/// leaves, small enough to stay cheap.
pub const EVENTS_KEPT: i64 = 4096;

/// One stored broadcast (see [`EventTemplate`]).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub version: i64,
    pub node: String,
    pub conn: Option<u64>,
    pub message: String,
}

#[derive(Debug)]
pub struct Stored {
    pub version: i64,
    pub row: Option<ViewRow>,
    /// The rendered broadcast, when the op carried an [`EventTemplate`].
    pub event: Option<String>,
}

/// What `PUT`/`DELETE /api/libraries/{id}/members/{userId}` asks for.
#[derive(Debug, Clone)]
pub enum MemberChange {
    Set(LibraryRole),
    Remove,
}

/// A membership change recorded by the engine (schema.sql's triggers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub seq: i64,
    pub library_id: String,
    pub user_id: String,
}

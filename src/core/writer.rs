//! The write path: one task that commits state changes in batches (group
//! commit), then broadcasts and acknowledges them in commit order.
//!
//! Every state change, from any WebSocket or REST request, goes through this one
//! queue. That is what makes the ordering promise of SPEC §3.2 cheap: versions
//! are assigned by the SQLite transaction, and the same task that committed them
//! pushes the broadcasts into every outbox before it commits the next batch, so
//! each connection sees a view's versions in order. An update is acknowledged
//! and broadcast only after its transaction has committed.

use std::io::Write;
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::broker::redis::Cluster;
use crate::core::hub::{Broadcast, CloseRequest, Hub, Outbox};
use crate::core::metrics::Metrics;
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::protocol;
use crate::protocol::{Author, Via};
use crate::store::{EventTemplate, Requester, Storage, StoreOp, Stored, ViewRow};

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer; senders wait (backpressure) when it is full.
const QUEUE: usize = 8192;
/// Committed batches waiting to be broadcast; the writer waits when it is full,
/// so commits never run far ahead of the fan-out.
const COMMITTED: usize = 4;

/// Where the answers to one client message go.
pub enum ReplyTo {
    /// The sender's own connection, in order with everything else it is sent.
    Outbox(Arc<Outbox>),
    /// A `POST …/messages` (SPEC §7) waiting for its response. `stream` is the
    /// SSE stream it named as its sender: a write that fails closes it, as it
    /// would close a WebSocket.
    Post {
        tx: oneshot::Sender<Answer>,
        stream: Option<Arc<Outbox>>,
    },
}

/// What a `POST …/messages` answers.
pub enum Answer {
    /// The reply a WebSocket would get, or `None` where it would get none.
    Reply(Option<Message>),
    /// A refusal of SPEC §3.1: the `error` message, with its HTTP status.
    Refused {
        error: Error,
        id: Option<Box<RawValue>>,
    },
    /// Accepted, then failed in storage: nothing was applied or acknowledged.
    Failed(Error),
}

impl ReplyTo {
    /// Sends a reply; a connection is sent nothing for `None`, a POST hears it
    /// (its response is due either way).
    pub fn reply(self, msg: Option<Message>) {
        match self {
            ReplyTo::Outbox(outbox) => {
                if let Some(msg) = msg {
                    outbox.push(msg, 0);
                }
            }
            ReplyTo::Post { tx, .. } => {
                let _ = tx.send(Answer::Reply(msg));
            }
        }
    }

    /// A refusal that keeps the connection open (SPEC §3.1's `error` reply).
    pub fn refuse(self, error: Error, id: Option<Box<RawValue>>) {
        match self {
            ReplyTo::Outbox(outbox) => {
                outbox.push(protocol::error(&error, id.as_deref()), 0);
            }
            ReplyTo::Post { tx, .. } => {
                let _ = tx.send(Answer::Refused { error, id });
            }
        }
    }

    /// A message that is not our protocol. A connection is closed 1003
    /// instead of being told; a POST gets a 400 `BAD_REQUEST`.
    pub fn unsupported(self) {
        if let ReplyTo::Post { .. } = self {
            self.refuse(
                Error::BadRequest(
                    "not a client message: send a JSON object with a string \"type\"".into(),
                ),
                None,
            );
        }
    }

    /// A write that failed after the message was accepted.
    fn fail(self, e: Error) {
        e.log("applying a message");
        match self {
            ReplyTo::Outbox(outbox) => close_after_failure(&outbox, &e),
            ReplyTo::Post { tx, stream } => {
                if let Some(stream) = stream {
                    close_after_failure(&stream, &e);
                }
                let _ = tx.send(Answer::Failed(e));
            }
        }
    }
}

/// Where the outcome of a job goes.
pub enum Reply {
    /// A client message: an `ack` if it carried an `id`.
    Message {
        to: ReplyTo,
        id: Option<Box<RawValue>>,
    },
    /// A REST request waiting for the stored view.
    Rest(oneshot::Sender<Result<ViewRow, Error>>),
}

/// Who asked for the server's own `sync-response`, and where it goes.
pub struct Snapshot {
    pub view_id: Arc<str>,
    pub to: ReplyTo,
    pub id: Option<Box<RawValue>>,
}

pub enum Job {
    Change {
        view_id: Arc<str>,
        change: Change,
        /// Forwarded verbatim as the broadcast's `payload`.
        payload: Box<RawValue>,
        author: Author,
        /// Checked again when the change is applied (SPEC §4).
        requester: Requester,
        if_match: Option<Vec<i64>>,
        reply: Reply,
    },
    /// The server's own `sync-response` (no controller online). It goes through
    /// the writer so that it is ordered with the view's broadcasts.
    Snapshot(Snapshot),
    /// Resolves once every job queued before it has been handled.
    Barrier(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer: SQLite on a thread of its own, and the broadcasts and
    /// replies of each committed batch in one tokio task.
    ///
    /// Why split: as a single task, every batch went to a blocking thread for
    /// SQLite and came back through the runtime's injection queue, behind the
    /// session tasks the last fan-out had woken. As a single thread, it woke
    /// each of 5,000 sessions from outside the runtime, one injection-queue
    /// push (a shared lock) each, while the OS shared the cores among more
    /// threads: pushing one update to 5,000 viewers took 7.8 ms at the median
    /// and 37 ms at p99. From a task, the wake-ups go to the worker's own queue,
    /// as in the `limit` peer (see BENCHMARKS.md).
    ///
    /// With a `cluster`, broadcasts go through it (stored with the change,
    /// published, delivered in order) instead of straight to the hub.
    ///
    /// The hand-off itself rings a doorbell (a socket pair) rather than waking
    /// the task directly: a wake from outside the runtime is queued behind
    /// every task in its shared injection queue, where the previous fan-out's
    /// crowd of sessions overflowed, so each update waited for one whole
    /// fan-out (28 ms at 5,000 viewers) before its own began. A socket's
    /// readiness is picked up by a worker's I/O driver and runs next, as the
    /// `limit` peer's inbound frames do.
    ///
    /// `max_state_bytes` is SPEC §5's `--max-state-bytes`, enforced on every
    /// change as it is applied.
    pub fn spawn(
        db: Storage,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
        max_state_bytes: usize,
    ) -> Result<Writer, Error> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (committed, batches) = mpsc::channel(COMMITTED);
        let (bell, ringer) = doorbell()
            .map_err(|e| Error::Internal(format!("creating the writer's doorbell: {e}")))?;
        let node = cluster.as_ref().map(|c| c.node_id.clone());
        tokio::spawn(deliver(hub, metrics.clone(), cluster, batches, bell));
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || run(db, metrics, node, max_state_bytes, rx, committed, ringer))
            .map_err(|e| Error::Internal(format!("starting the writer: {e}")))?;
        Ok(Writer { tx })
    }

    pub async fn submit(&self, job: Job) -> Result<(), Error> {
        self.tx
            .send(job)
            .await
            .map_err(|_| Error::Internal("the writer has stopped".into()))
    }

    /// Waits until everything submitted so far is committed and answered.
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        if self.submit(Job::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// A REST change by `requester`: waits for the commit and returns the
    /// stored view.
    pub async fn change_and_wait(
        &self,
        view_id: &str,
        change: Change,
        payload: Box<RawValue>,
        requester: Requester,
        if_match: Option<Vec<i64>>,
    ) -> Result<ViewRow, Error> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Change {
            view_id: view_id.into(),
            change,
            payload,
            author: Author {
                user_id: requester.user_id.clone(),
                via: Via::Rest,
            },
            requester,
            if_match,
            reply: Reply::Rest(tx),
        })
        .await?;
        rx.await
            .map_err(|_| Error::Internal("the writer dropped a request".into()))?
    }
}

/// A committed batch on its way from the writer thread to [`deliver`].
struct Committed {
    pending: Vec<Pending>,
    /// One result per op; empty when the whole batch failed.
    results: Vec<Result<Stored, Error>>,
    /// When the transaction committed (for the fan-out latency metric).
    at: std::time::Instant,
}

/// Commits batches until every [`Writer`] handle is gone (or the runtime,
/// and with it [`deliver`], is).
fn run(
    db: Storage,
    metrics: Arc<Metrics>,
    node: Option<Arc<str>>,
    max_state_bytes: usize,
    mut rx: mpsc::Receiver<Job>,
    committed: mpsc::Sender<Committed>,
    ringer: std::os::unix::net::UnixStream,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while rx.blocking_recv_many(&mut jobs, MAX_BATCH) > 0 {
        let (ops, pending): (Vec<Option<StoreOp>>, Vec<Pending>) =
            jobs.drain(..).map(|job| split(job, node.as_ref())).unzip();
        let ops: Vec<StoreOp> = ops.into_iter().flatten().collect();
        let results = if ops.is_empty() {
            Ok(Vec::new())
        } else {
            metrics.sqlite_batch_size.observe(ops.len() as f64);
            let timer = metrics.sqlite_write_seconds.start_timer();
            let results = commit(&db, &ops, max_state_bytes);
            timer.observe_duration();
            results
        };
        let results = results.unwrap_or_else(|e| {
            e.log("committing a batch of state changes");
            Vec::new()
        });
        let at = std::time::Instant::now();
        if committed
            .blocking_send(Committed {
                pending,
                results,
                at,
            })
            .is_err()
        {
            return;
        }
        // Non-blocking: when the socket is full, rings are already pending.
        let _ = (&ringer).write(&[1]);
    }
}

/// The two ends of the writer's doorbell: the deliver task's and the writer
/// thread's (non-blocking, so a ring never waits).
fn doorbell() -> std::io::Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (bell, ringer) = std::os::unix::net::UnixStream::pair()?;
    bell.set_nonblocking(true)?;
    ringer.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(bell)?, ringer))
}

/// Broadcasts and answers committed batches, in commit order.
async fn deliver(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
    mut batches: mpsc::Receiver<Committed>,
    bell: tokio::net::UnixStream,
) {
    let mut rings = [0u8; 256];
    loop {
        let Committed {
            pending,
            results,
            at,
        } = match batches.try_recv() {
            Ok(batch) => batch,
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Every batch is sent before its ring, so nothing is missed
                // between the empty channel and the wait.
                if bell.readable().await.is_err() {
                    return;
                }
                loop {
                    match bell.try_read(&mut rings) {
                        Ok(0) => break, // the writer has stopped: drain and end
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => return,
                    }
                }
                if let Ok(batch) = batches.try_recv() {
                    batch
                } else if batches.is_closed() && batches.is_empty() {
                    return;
                } else {
                    continue;
                }
            }
        };
        let mut results = results.into_iter();
        let mut fanout = Fanout::default();
        for job in pending {
            let result = match job {
                Pending::Barrier(_) => None,
                // A failed batch has no results: every job in it failed.
                _ => Some(
                    results
                        .next()
                        .unwrap_or_else(|| Err(Error::Storage("batch failed".into()))),
                ),
            };
            finish(&hub, &metrics, cluster.as_deref(), &mut fanout, job, result);
        }
        fanout.flush(&hub, &metrics);
        metrics.fanout_seconds.observe(at.elapsed().as_secs_f64());
    }
}

/// A batch's WebSocket broadcasts and acks, held back so that each view's
/// broadcasts go out together: pushing them one change at a time locked and
/// woke every connection once per change, and was the writer's main cost when
/// a controller sent back to back (`Outbox::push` was 18% of the server's
/// samples with 5,000 viewers; see BENCHMARKS.md).
///
/// Everything a connection gets stays in commit order: acks and replies are
/// pushed after the broadcasts before them, and anything that is not held back
/// (a REST broadcast, a server sync-response, a barrier) flushes first.
#[derive(Default)]
struct Fanout {
    /// Per view, in order of first appearance: its broadcasts in version order.
    views: Vec<(Arc<str>, Vec<Broadcast>)>,
    /// Replies to the batch's messages, sent after its broadcasts.
    acks: Vec<(ReplyTo, Due)>,
}

/// What a client message is answered once its batch has committed.
enum Due {
    /// The `ack`, or nothing for a change without an `id`.
    Reply(Option<Message>),
    /// A refusal that keeps the connection open (`state too large`).
    Refuse(Error, Option<Box<RawValue>>),
}

impl Fanout {
    fn broadcast(&mut self, view_id: &Arc<str>, frame: Broadcast) {
        match self.views.iter_mut().find(|(v, _)| v == view_id) {
            Some((_, frames)) => frames.push(frame),
            None => self.views.push((view_id.clone(), vec![frame])),
        }
    }

    fn flush(&mut self, hub: &Hub, metrics: &Metrics) {
        for (view_id, frames) in self.views.drain(..) {
            let delivered = hub.broadcast_many(&view_id, &frames);
            metrics.deliveries.inc_by(delivered as u64);
        }
        for (to, due) in self.acks.drain(..) {
            match due {
                Due::Reply(msg) => to.reply(msg),
                Due::Refuse(error, id) => to.refuse(error, id),
            }
        }
    }
}

/// Commits one batch. A panic fails the batch (its jobs get errors) instead
/// of ending the writer, and with it every later write.
fn commit(
    db: &Storage,
    ops: &[StoreOp],
    max_state_bytes: usize,
) -> Result<Vec<Result<Stored, Error>>, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.blocking().apply_batch(ops, max_state_bytes)
    }))
    .unwrap_or_else(|_| Err(Error::Internal("the batch commit panicked".into())))
}

/// A job whose change has moved into the batch: what is left to broadcast and
/// answer once the batch has committed.
enum Pending {
    Change {
        view_id: Arc<str>,
        message_type: &'static str,
        payload: Box<RawValue>,
        author: Author,
        reply: Reply,
    },
    Snapshot(Snapshot),
    Barrier(oneshot::Sender<()>),
}

fn split(job: Job, node: Option<&Arc<str>>) -> (Option<StoreOp>, Pending) {
    match job {
        Job::Change {
            view_id,
            change,
            payload,
            author,
            requester,
            if_match,
            reply,
        } => {
            let message_type = change.message_type();
            let event = node.map(|node| {
                let (payload, author) = (payload.clone(), author.clone());
                EventTemplate {
                    conn: author.skips(),
                    render: Box::new(move |version| {
                        let msg = author.broadcast(message_type, &payload, version);
                        msg.into_text()
                            .map(|t| t.as_str().to_string())
                            .unwrap_or_default()
                    }),
                    node: node.clone(),
                }
            });
            let op = StoreOp {
                view_id: view_id.to_string(),
                change: Some(change),
                if_match,
                want_row: matches!(reply, Reply::Rest(_)),
                event,
                requester: Some(requester),
            };
            (
                Some(op),
                Pending::Change {
                    view_id,
                    message_type,
                    payload,
                    author,
                    reply,
                },
            )
        }
        Job::Snapshot(snapshot) => (
            Some(StoreOp {
                view_id: snapshot.view_id.to_string(),
                change: None,
                if_match: None,
                want_row: true,
                event: None,
                requester: None,
            }),
            Pending::Snapshot(snapshot),
        ),
        Job::Barrier(done) => (None, Pending::Barrier(done)),
    }
}

/// SPEC §4's `broadcast_portal_view_update`: a REST change reaches every
/// connection of the view, the caller's own sockets included, tagged
/// `"source":"rest"`. Returns how many connections it was queued for.
pub fn broadcast_portal_view_update(
    hub: &Hub,
    view_id: &str,
    patch: &RawValue,
    version: i64,
    user_id: &str,
) -> usize {
    let author = Author {
        user_id: user_id.into(),
        via: Via::Rest,
    };
    let msg = author.broadcast("portal-view-update", patch, version);
    hub.broadcast(view_id, &msg, version, None)
}

/// Broadcasts and answers one job after its batch committed (or failed).
fn finish(
    hub: &Hub,
    metrics: &Metrics,
    cluster: Option<&Cluster>,
    fanout: &mut Fanout,
    job: Pending,
    result: Option<Result<Stored, Error>>,
) {
    match job {
        Pending::Barrier(done) => {
            fanout.flush(hub, metrics);
            let _ = done.send(());
        }
        Pending::Change {
            view_id,
            message_type,
            payload,
            author,
            reply,
        } => {
            let mut result = result.unwrap_or_else(|| Err(Error::Internal("no result".into())));
            if let (Some(cluster), Ok(stored)) = (cluster, &mut result) {
                // The cluster's sequencer delivers it, in order with the
                // other nodes' changes, and counts the deliveries.
                let text = stored.event.take().unwrap_or_default();
                cluster.committed(&view_id, stored.version, author.skips(), text);
                metrics.broadcasts.inc();
            } else if let Ok(stored) = &result {
                metrics.broadcasts.inc();
                if let Via::Rest = author.via {
                    // Not held back: it goes to every connection at once.
                    fanout.flush(hub, metrics);
                    let delivered = broadcast_portal_view_update(
                        hub,
                        &view_id,
                        &payload,
                        stored.version,
                        &author.user_id,
                    );
                    metrics.deliveries.inc_by(delivered as u64);
                } else {
                    let frame = Broadcast {
                        msg: author.broadcast(message_type, &payload, stored.version),
                        version: stored.version,
                        except: author.skips(),
                    };
                    fanout.broadcast(&view_id, frame);
                }
            }
            match reply {
                Reply::Rest(tx) => {
                    let _ = tx.send(result.and_then(|stored| {
                        stored
                            .row
                            .ok_or_else(|| Error::Internal("row not returned".into()))
                    }));
                }
                Reply::Message { to, id } => match result {
                    Ok(stored) => {
                        let ack = id.map(|id| protocol::ack(&id, stored.version));
                        fanout.acks.push((to, Due::Reply(ack)));
                    }
                    Err(e) => match e.as_message_refusal() {
                        // In order with the batch's other replies; the
                        // connection stays open.
                        Some(refusal) => fanout.acks.push((to, Due::Refuse(refusal, id))),
                        None => {
                            // Acks held back for this connection go before its close.
                            fanout.flush(hub, metrics);
                            to.fail(e);
                        }
                    },
                },
            }
        }
        Pending::Snapshot(Snapshot { to, id, view_id }) => match result {
            Some(Ok(Stored { row: Some(row), .. })) => {
                // Its state includes the broadcasts before it, so they go first.
                fanout.flush(hub, metrics);
                to.reply(Some(protocol::server_sync_response(
                    &row.state,
                    row.version,
                    id.as_deref(),
                )));
            }
            Some(Err(e)) => to.fail(e),
            _ => log::error!("snapshot of {view_id} returned no row"),
        },
    }
}

/// A write that failed after the message was accepted. Nothing was
/// acknowledged; the client's picture of the state can no longer be trusted, so
/// it is closed with the code SPEC's close table gives for the cause (and
/// resynchronises from `connected` when it reconnects). A sender whose token
/// or access no longer held when its change was applied is closed as SPEC
/// §3.4 closes it when that happens to an open connection.
fn close_after_failure(outbox: &Outbox, e: &Error) {
    let reason = match e {
        Error::ViewNotFound => "portal view not found",
        Error::TokenExpired => "token expired",
        Error::UnknownUser | Error::AccessDenied | Error::Forbidden(_) => "access revoked",
        _ => "internal error",
    };
    outbox.close(CloseRequest {
        code: e.close_code(),
        reason,
    });
}

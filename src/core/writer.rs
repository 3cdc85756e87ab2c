//! The write path: one task that commits state changes in batches (group
//! commit), then broadcasts and acknowledges them in commit order.
//!
//! Every state change, from any WebSocket or REST request, goes through this one
//! queue. That is what makes the ordering promise of SPEC §3.2 cheap: versions
//! are assigned by the store's transaction, and one task hands each committed
//! batch's broadcasts to the broker (which, on one node, pushes them into every
//! outbox there and then) before it takes the next batch, so each connection
//! sees a view's versions in order. An update is acknowledged and broadcast
//! only after its transaction has committed.

use std::io::Write;
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::core::broker::Broker;
use crate::core::delivery::Broadcast;
use crate::core::hub::{CloseRequest, Outbox};
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
    /// Starts the writer: the store on a thread of its own, and the
    /// broadcasts and replies of each committed batch in one tokio task, so
    /// that the fan-out's wake-ups go to a worker's own queue rather than
    /// through the runtime's shared injection queue. The thread hands a batch
    /// over by ringing a doorbell (a socket pair), whose readiness a worker's
    /// I/O driver picks up next, instead of waking the task from outside the
    /// runtime behind the previous fan-out's crowd of sessions. (Both were
    /// measured; see BENCHMARKS.md, "Why the code is shaped so".)
    ///
    /// The broker delivers each batch's broadcasts: on one node straight into
    /// the hub, from the delivery task; with several, stored with the change,
    /// published and delivered in order.
    ///
    /// `max_state_bytes` is SPEC §5's `--max-state-bytes`, enforced on every
    /// change as it is applied.
    pub fn spawn(
        db: Storage,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        max_state_bytes: usize,
    ) -> Result<Writer, Error> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (committed, batches) = mpsc::channel(COMMITTED);
        let (bell, ringer) = doorbell()
            .map_err(|e| Error::Internal(format!("creating the writer's doorbell: {e}")))?;
        let node = broker.node_id();
        tokio::spawn(deliver(broker, metrics.clone(), batches, bell));
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
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
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
            fanout.finish(&*broker, &metrics, job, result);
        }
        fanout.flush(&*broker);
        metrics.fanout_seconds.observe(at.elapsed().as_secs_f64());
    }
}

/// A batch's broadcasts and replies, held back so that each view's broadcasts
/// go out together: pushing them one change at a time locked and woke every
/// connection once per change (see BENCHMARKS.md).
///
/// Everything a connection gets stays in commit order: replies go after the
/// broadcasts before them, and what cannot wait for the end of the batch (a
/// server sync-response, a failure's close, a barrier) flushes first. A REST
/// change's broadcast is one of its view's like any other, and SPEC §4's
/// `broadcast_portal_view_update` is this path: it goes to every connection
/// of the view, the caller's own sockets included, tagged `"source":"rest"`,
/// and the REST response is sent once it is queued.
#[derive(Default)]
struct Fanout {
    /// Per view, in order of first appearance: its broadcasts in version order.
    views: Vec<(Arc<str>, Vec<Broadcast>)>,
    /// Answers to the batch's jobs, sent after its broadcasts.
    replies: Vec<Due>,
}

/// What a job is answered once its batch's broadcasts are out.
enum Due {
    /// The `ack`, or nothing for a change without an `id`.
    Reply(ReplyTo, Option<Message>),
    /// A refusal that keeps the connection open (`state too large`).
    Refuse(ReplyTo, Error, Option<Box<RawValue>>),
    /// A REST request's stored view.
    Rest(
        oneshot::Sender<Result<ViewRow, Error>>,
        Result<ViewRow, Error>,
    ),
}

impl Fanout {
    fn broadcast(&mut self, view_id: &Arc<str>, frame: Broadcast) {
        match self.views.iter_mut().find(|(v, _)| v == view_id) {
            Some((_, frames)) => frames.push(frame),
            None => self.views.push((view_id.clone(), vec![frame])),
        }
    }

    fn flush(&mut self, broker: &dyn Broker) {
        for (view_id, frames) in self.views.drain(..) {
            broker.deliver(view_id, frames);
        }
        for due in self.replies.drain(..) {
            match due {
                Due::Reply(to, msg) => to.reply(msg),
                Due::Refuse(to, error, id) => to.refuse(error, id),
                Due::Rest(tx, row) => {
                    let _ = tx.send(row);
                }
            }
        }
    }

    /// Broadcasts and answers one job after its batch committed (or failed).
    fn finish(
        &mut self,
        broker: &dyn Broker,
        metrics: &Metrics,
        job: Pending,
        result: Option<Result<Stored, Error>>,
    ) {
        match job {
            Pending::Barrier(done) => {
                self.flush(broker);
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
                if let Ok(stored) = &mut result {
                    metrics.broadcasts.inc();
                    // As stored for the other nodes, or rendered now: the same text.
                    let msg = match stored.event.take() {
                        Some(text) => Message::text(text),
                        None => author.broadcast(message_type, &payload, stored.version),
                    };
                    let frame = Broadcast {
                        msg,
                        version: stored.version,
                        except: author.skips(),
                    };
                    self.broadcast(&view_id, frame);
                }
                match reply {
                    Reply::Rest(tx) => {
                        let row = result.and_then(|stored| {
                            stored
                                .row
                                .ok_or_else(|| Error::Internal("row not returned".into()))
                        });
                        self.replies.push(Due::Rest(tx, row));
                    }
                    Reply::Message { to, id } => match result {
                        Ok(stored) => {
                            let ack = id.map(|id| protocol::ack(&id, stored.version));
                            self.replies.push(Due::Reply(to, ack));
                        }
                        Err(e) => match e.as_message_refusal() {
                            // In order with the batch's other replies; the
                            // connection stays open.
                            Some(refusal) => self.replies.push(Due::Refuse(to, refusal, id)),
                            None => {
                                // Replies held back for this connection go
                                // before its close.
                                self.flush(broker);
                                to.fail(e);
                            }
                        },
                    },
                }
            }
            Pending::Snapshot(Snapshot { to, id, view_id }) => match result {
                Some(Ok(Stored { row: Some(row), .. })) => {
                    // Its state includes the broadcasts before it, so they go first.
                    self.flush(broker);
                    to.reply(Some(protocol::server_sync_response(
                        &row.state,
                        row.version,
                        id.as_deref(),
                    )));
                }
                Some(Err(e)) => {
                    self.flush(broker);
                    to.fail(e);
                }
                _ => log::error!("snapshot of {view_id} returned no row"),
            },
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

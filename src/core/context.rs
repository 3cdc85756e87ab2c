//! The live server's shared parts, handed to every session and, through
//! `http::context::Ctx`, to every route.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::core::broker::Broker;
use crate::core::hub::{self, Hub, Limits};
use crate::core::metrics::Metrics;
use crate::core::revocation::{self, Nudge};
use crate::core::sequencer::Sequencer;
use crate::core::shutdown::spawn_until;
use crate::core::sync_deadlines;
use crate::core::sync_requests::SyncTiming;
use crate::core::writer::Writer;
use crate::domain::error::Error;
use crate::protocol::auth::Tokens;
use crate::store::Storage;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct Core(Arc<Shared>);

pub struct Shared {
    pub config: Config,
    pub store: Storage,
    pub hub: Arc<Hub>,
    pub writer: Writer,
    /// The other nodes, or none (see `core::broker`).
    pub broker: Arc<dyn Broker>,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    /// Asks the revocation watcher to look at the membership log now.
    pub revocation_nudge: Nudge,
    shutdown: watch::Receiver<bool>,
    sessions: AtomicUsize,
    sessions_done: Notify,
    /// Sessions still reading their client's messages (see [`Core::readers_stopped`]).
    readers: AtomicUsize,
    readers_done: Notify,
}

impl Deref for Core {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The first step of starting: what a broker is built on (see
/// [`Core::prepare`] and [`Core::start`]).
pub struct Parts {
    pub config: Config,
    pub store: Storage,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

impl Parts {
    /// The delivery path to this node's connections, for a broker; `node` is
    /// this node's id when it is one of several.
    pub fn sequencer(&self, node: Option<Arc<str>>) -> Sequencer {
        Sequencer::new(
            self.hub.clone(),
            self.store.clone(),
            self.metrics.clone(),
            node,
        )
    }
}

impl Core {
    /// Checks the config and builds the rooms and the metrics on an opened
    /// store; nothing runs yet.
    pub fn prepare(
        config: Config,
        store: Storage,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Parts, Error> {
        if config.jwt_secret.is_empty() {
            return Err(Error::Internal("a JWT secret is required".into()));
        }
        let hub = Arc::new(
            Hub::new(Limits {
                per_user: config.max_conns_per_user,
                per_view: config.max_conns_per_view,
                total: config.max_conns,
            })
            .with_sync_timing(SyncTiming {
                window: config.presence_batch,
                timeout: config.sync_timeout,
            }),
        );
        Ok(Parts {
            config,
            store,
            hub,
            metrics: Arc::new(Metrics::new()),
            shutdown,
        })
    }

    /// Starts the writer and the background tasks, with `broker` carrying
    /// changes to the other nodes. Must run inside a tokio runtime.
    pub fn start(parts: Parts, broker: Arc<dyn Broker>) -> Result<Core, Error> {
        let Parts {
            config,
            store,
            hub,
            metrics,
            shutdown,
        } = parts;
        let writer = Writer::spawn(
            store.clone(),
            broker.clone(),
            metrics.clone(),
            config.max_state_bytes,
        )?;
        let revocation_nudge = Nudge::default();
        spawn_until(
            shutdown.clone(),
            revocation::watch(
                store.clone(),
                hub.clone(),
                metrics.clone(),
                config.revocation_poll,
                revocation_nudge.clone(),
            ),
        );
        spawn_until(
            shutdown.clone(),
            sync_deadlines::run(hub.clone(), writer.clone(), broker.clone()),
        );
        spawn_until(
            shutdown.clone(),
            hub::flush_every(hub.clone(), metrics.clone(), config.presence_batch),
        );
        let tokens = Tokens::new(config.jwt_secret.as_bytes(), config.jwt_leeway);
        Ok(Core(Arc::new(Shared {
            config,
            store,
            hub,
            writer,
            broker,
            tokens,
            metrics,
            revocation_nudge,
            shutdown,
            sessions: AtomicUsize::new(0),
            sessions_done: Notify::new(),
            readers: AtomicUsize::new(0),
            readers_done: Notify::new(),
        })))
    }

    /// Resolves when the server starts shutting down.
    pub async fn shutting_down(&self) {
        let mut rx = self.shutdown.clone();
        // An error means the sender is gone, which is a shutdown too.
        let _ = rx.wait_for(|down| *down).await;
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Counts a live session until the guard drops, so shutdown can wait for it.
    pub fn session_guard(&self) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.clone())
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Resolves when no session is left.
    pub async fn sessions_closed(&self) {
        loop {
            let notified = self.sessions_done.notified();
            if self.live_sessions() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts a session as reading its client's messages until the guard
    /// drops (it stops at shutdown, or ends).
    pub fn reading_guard(&self) -> ReadingGuard {
        self.readers.fetch_add(1, Ordering::AcqRel);
        ReadingGuard(self.clone())
    }

    /// Resolves when no session reads its client's messages any more. After
    /// the shutdown signal this means nothing more will be submitted to the
    /// writer by a session, so one barrier then covers every change a client
    /// sent before the stop, whichever session it came through.
    pub async fn readers_stopped(&self) {
        loop {
            let notified = self.readers_done.notified();
            if self.readers.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct ReadingGuard(Core);

impl Drop for ReadingGuard {
    fn drop(&mut self) {
        if self.0.readers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.readers_done.notify_waiters();
        }
    }
}

pub struct SessionGuard(Core);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.sessions_done.notify_waiters();
        }
    }
}

//! The live server's shared parts, handed to every session and, through
//! `http::context::Ctx`, to every route.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::broker::redis::Cluster;
use crate::config::Config;
use crate::core::hub::{Hub, Limits};
use crate::core::metrics::Metrics;
use crate::core::revocation::{self, Nudge};
use crate::core::sync_requests::{self, SyncTiming};
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
    /// Set with `--redis-url`: this node is one of several (see `cluster`).
    pub cluster: Option<Arc<Cluster>>,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    /// Asks the revocation watcher to look at the membership log now.
    pub revocation_nudge: Nudge,
    shutdown: watch::Receiver<bool>,
    sessions: AtomicUsize,
    sessions_done: Notify,
}

impl Deref for Core {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Core {
    /// Starts the writer and the background tasks on an opened store. Must
    /// run inside a tokio runtime.
    pub fn new(
        config: Config,
        db: Storage,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Core, Error> {
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
        let metrics = Arc::new(Metrics::new());
        let cluster = match &config.redis_url {
            Some(url) => Some(Cluster::start(
                url,
                &config.redis_prefix,
                db.clone(),
                hub.clone(),
                metrics.clone(),
                config.presence_batch,
                shutdown.clone(),
            )?),
            None => None,
        };
        let writer = Writer::spawn(
            db.clone(),
            hub.clone(),
            metrics.clone(),
            cluster.clone(),
            config.max_state_bytes,
        )?;
        let revocation_nudge = Nudge::default();
        let stop = shutdown.clone();
        tokio::spawn(until_shutdown(
            stop.clone(),
            revocation::watch(
                db.clone(),
                hub.clone(),
                metrics.clone(),
                config.revocation_poll,
                revocation_nudge.clone(),
            ),
        ));
        tokio::spawn(until_shutdown(
            stop.clone(),
            sync_requests::run(hub.clone(), writer.clone(), cluster.clone()),
        ));
        tokio::spawn(until_shutdown(
            stop,
            flush_presence(hub.clone(), metrics.clone(), config.presence_batch),
        ));
        let tokens = Tokens::new(config.jwt_secret.as_bytes(), config.jwt_leeway);
        Ok(Core(Arc::new(Shared {
            config,
            store: db,
            hub,
            writer,
            cluster,
            tokens,
            metrics,
            revocation_nudge,
            shutdown,
            sessions: AtomicUsize::new(0),
            sessions_done: Notify::new(),
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
}

/// Runs a background task until the server shuts down.
async fn until_shutdown(mut shutdown: watch::Receiver<bool>, task: impl std::future::Future) {
    tokio::select! {
        _ = shutdown.wait_for(|down| *down) => {}
        _ = task => {}
    }
}

/// SPEC §3.3's batching: after the first change, wait one window and send
/// everything that piled up as one event per controller. A crowd of any size
/// costs each controller at most one presence event per window.
async fn flush_presence(hub: Arc<Hub>, metrics: Arc<Metrics>, window: std::time::Duration) {
    loop {
        hub.presence_changed().await;
        tokio::time::sleep(window).await;
        let sent = hub.flush_presence();
        metrics.presence_events.inc_by(sent as u64);
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

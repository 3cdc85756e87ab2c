//! Background tasks that live as long as the server.

use std::future::Future;

use tokio::sync::watch;

/// Spawns `task` and drops it when the server starts shutting down (or the
/// shutdown sender is gone), whichever comes first.
pub fn spawn_until(mut shutdown: watch::Receiver<bool>, task: impl Future + Send + 'static) {
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|down| *down) => {}
            _ = task => {}
        }
    });
}

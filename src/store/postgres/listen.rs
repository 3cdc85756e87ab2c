//! Membership changes as they commit: a thread with its own connection (not
//! the pool's: a pooled connection's notifications are read by nobody)
//! LISTENs on the channel schema.sql's triggers notify, and wakes the
//! revocation watcher, which reads the change log. LISTEN first, then wake
//! (so a change committed while no connection listened is found by the
//! rescan), on every (re)connect; the watcher's poll stays as the backstop.

use std::sync::{Arc, Weak};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::NoTls;

/// The channel the triggers notify (schema.sql).
pub(super) const CHANNEL: &str = "portal_membership";

/// How long to wait before reconnecting after an error.
const RECONNECT_AFTER: Duration = Duration::from_millis(250);

/// How often the thread looks whether its store is gone.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Starts the listening thread; it ends within about [`LOOK_EVERY`] once
/// `alive` can no longer be upgraded (the store was dropped).
pub(super) fn spawn(
    config: postgres::Config,
    wake: Arc<dyn Fn() + Send + Sync>,
    alive: Weak<()>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pg-listen".into())
        .stack_size(256 * 1024)
        .spawn(move || run(&config, &*wake, &alive))
        .map(|_| ())
}

fn run(config: &postgres::Config, wake: &(dyn Fn() + Send + Sync), alive: &Weak<()>) {
    // Logged once per outage, not once per reconnect attempt.
    let mut connected = true;
    while alive.upgrade().is_some() {
        match listen(config, wake, alive, &mut connected) {
            Ok(()) => return,
            Err(e) => {
                if connected {
                    log::warn!("membership LISTEN connection lost, reconnecting: {e}");
                }
                connected = false;
            }
        }
        std::thread::sleep(RECONNECT_AFTER);
    }
}

/// One connection's life: `Ok` when the store is gone, `Err` when the
/// connection is.
fn listen(
    config: &postgres::Config,
    wake: &(dyn Fn() + Send + Sync),
    alive: &Weak<()>,
    connected: &mut bool,
) -> Result<(), String> {
    let text = |e: postgres::Error| e.to_string();
    let mut client = config.connect(NoTls).map_err(text)?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(text)?;
    if !*connected {
        log::info!("membership LISTEN connection back");
    }
    *connected = true;
    wake();
    loop {
        if alive.upgrade().is_none() {
            return Ok(());
        }
        let woken = client
            .notifications()
            .timeout_iter(LOOK_EVERY)
            .next()
            .map_err(text)?;
        if woken.is_some() {
            // Several at once are one rescan.
            while client
                .notifications()
                .iter()
                .next()
                .map_err(text)?
                .is_some()
            {}
            wake();
        } else if client.is_closed() {
            return Err("the connection ended".into());
        }
    }
}

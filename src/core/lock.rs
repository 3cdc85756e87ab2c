//! The one way the server takes a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex even if a thread panicked while holding it: the data under
/// the server's locks stays consistent between statements, so a poisoned lock
/// is still safe to use, and one panicking connection must not take down the
/// rooms, a session's rate bucket or anyone else's state.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

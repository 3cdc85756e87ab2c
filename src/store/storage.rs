//! The handle the async server holds: an engine behind [`Store`], and the
//! storage threads its calls run on.

use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::oneshot;

use crate::domain::error::Error;
use crate::store::{Access, Grant, MemberChange, MembershipChange, Store, StoredEvent, ViewRow};

/// Threads that run [`Storage::call`] work. Two, so a handshake lookup never
/// waits behind the writer's commit, and no more: the work is short and the
/// machine this targets has two cores.
const STORAGE_THREADS: usize = 2;

/// Blocking storage work queued for a storage thread.
type Task = Box<dyn FnOnce(&dyn Store) + Send>;

/// Cheap to clone. A crowd of handshakes queues here and a busy thread takes
/// the next task without sleeping; `spawn_blocking` instead woke a parked
/// thread per call (a futex wake, a context switch each way), which was most
/// of a handshake's cost (see BENCHMARKS.md).
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn Store>,
    tasks: mpsc::Sender<Task>,
}

impl Storage {
    /// Starts the storage threads for an opened engine. They end once every
    /// handle is gone.
    pub fn start(store: Arc<dyn Store>) -> Result<Storage, Error> {
        let (tasks, queue) = mpsc::channel::<Task>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..STORAGE_THREADS {
            let (queue, store) = (queue.clone(), store.clone());
            std::thread::Builder::new()
                .name(format!("storage-{i}"))
                .spawn(move || storage_thread(&queue, &*store))
                .map_err(|e| Error::Internal(format!("starting a storage thread: {e}")))?;
        }
        Ok(Storage { store, tasks })
    }

    /// The engine itself, for blocking callers: the writer's own thread, the
    /// CLI, tests.
    pub fn blocking(&self) -> &dyn Store {
        &*self.store
    }

    /// Runs blocking storage work off the async threads, on a storage thread.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, Error> + Send + 'static,
    {
        if let Some(refusal) = self.store.unavailable() {
            return Err(refusal);
        }
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        self.tasks
            .send(task)
            .map_err(|_| Error::Internal("storage closed".into()))?;
        // A task that panicked dropped its sender.
        rx.await
            .map_err(|_| Error::Internal("storage task failed".into()))?
    }

    /// The engine itself, where its handshake lookups run inline
    /// ([`Store::reads_inline`]) and it is not refusing calls.
    fn inline(&self) -> Option<Result<&dyn Store, Error>> {
        if !self.store.reads_inline() {
            return None;
        }
        Some(match self.store.unavailable() {
            Some(refusal) => Err(refusal),
            None => Ok(&*self.store),
        })
    }

    pub async fn access(&self, user_id: &str, view_id: &str) -> Result<Access, Error> {
        if let Some(store) = self.inline() {
            return store?.access(user_id, view_id);
        }
        let (user, view) = (user_id.to_string(), view_id.to_string());
        self.call(move |s| s.access(&user, &view)).await
    }

    pub async fn grant(&self, user_id: &str, view_id: &str) -> Result<Grant, Error> {
        if let Some(store) = self.inline() {
            return store?.grant(user_id, view_id);
        }
        let (user, view) = (user_id.to_string(), view_id.to_string());
        self.call(move |s| s.grant(&user, &view)).await
    }

    pub async fn view(&self, view_id: &str) -> Result<Option<ViewRow>, Error> {
        let view = view_id.to_string();
        self.call(move |s| s.view(&view)).await
    }

    pub async fn events_between(
        &self,
        view_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<StoredEvent>, Error> {
        let view = view_id.to_string();
        self.call(move |s| s.events_between(&view, from, to)).await
    }

    pub async fn versions(&self, view_ids: Vec<String>) -> Result<Vec<(String, i64)>, Error> {
        self.call(move |s| s.versions(&view_ids)).await
    }

    pub async fn membership_changes_start(&self) -> Result<i64, Error> {
        self.call(|s| s.membership_changes_start()).await
    }

    pub async fn membership_changes_since(&self, seq: i64) -> Result<Vec<MembershipChange>, Error> {
        self.call(move |s| s.membership_changes_since(seq)).await
    }

    pub async fn change_member(
        &self,
        caller: &str,
        library_id: &str,
        user_id: &str,
        change: MemberChange,
        apply: bool,
    ) -> Result<Option<String>, Error> {
        let (caller, library, user) = (
            caller.to_string(),
            library_id.to_string(),
            user_id.to_string(),
        );
        self.call(move |s| s.change_member(&caller, &library, &user, &change, apply))
            .await
    }

    pub async fn ping(&self) -> Result<(), Error> {
        self.call(|s| s.ping()).await
    }
}

/// Takes tasks until every [`Storage`] handle is gone. A panicking task is
/// caught so the thread (and the storage of every other connection) lives on.
fn storage_thread(queue: &Mutex<mpsc::Receiver<Task>>, store: &dyn Store) {
    loop {
        let task = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(task) = task else { return };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(store))).is_err() {
            log::error!("a storage task panicked");
        }
    }
}

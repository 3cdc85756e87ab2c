//! The database file itself: created private, and watched so that a file
//! deleted or replaced under the running server is noticed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::domain::error::Error;

pub(super) const FILE_CHECK_EVERY: Duration = Duration::from_millis(500);

/// A path SQLite will open as a file of that name: not `:memory:`, not the
/// empty path (a private temp database), not a `file:` URI.
pub(super) fn is_file_path(path: &Path) -> bool {
    let text = path.to_string_lossy();
    !(text.is_empty() || text == ":memory:" || text.starts_with("file:"))
}

/// Creates the file 0600 unless it exists, so that SQLite never creates it
/// with the process's umask (0644 for most).
pub(super) fn create_private(path: &Path) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Storage(format!(
            "cannot create the database file {}: {e}",
            path.display()
        ))),
    }
}

/// The database file's identity at open (device, inode), and whether the path
/// still names it. SQLite keeps writing through its open descriptors into a
/// file that was unlinked, and happily acknowledges it; after a restart that
/// data is gone. So the path is looked at, and a change is a storage failure.
pub(super) struct FileWatch {
    path: PathBuf,
    identity: (u64, u64),
    missing: AtomicBool,
}

impl FileWatch {
    /// Records the identity and starts the background look, which ends once
    /// every [`SqliteStore`] (and so this watch) is gone.
    pub(super) fn start(path: &Path) -> Result<Option<Arc<FileWatch>>, Error> {
        let Some(identity) = identity(path)? else {
            return Ok(None);
        };
        let watch = Arc::new(FileWatch {
            path: path.to_path_buf(),
            identity,
            missing: AtomicBool::new(false),
        });
        let weak: Weak<FileWatch> = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("db-file-watch".into())
            // It only stats and, rarely, logs.
            .stack_size(256 * 1024)
            .spawn(move || loop {
                std::thread::sleep(FILE_CHECK_EVERY);
                let Some(watch) = weak.upgrade() else { return };
                let _ = watch.check();
            })
            .map_err(|e| Error::Internal(format!("starting the database file watch: {e}")))?;
        Ok(Some(watch))
    }

    /// What the last look found, without a `stat`.
    pub(super) fn is_missing(&self) -> bool {
        self.missing.load(Ordering::Acquire)
    }

    /// Logs each change of state once, not per refused request.
    pub(super) fn check(&self) -> Result<(), Error> {
        let now_missing = match identity(&self.path) {
            Ok(found) => found != Some(self.identity),
            Err(Error::DatabaseMissing) => true,
            // A `stat` that fails otherwise (a directory's permissions, say)
            // says nothing about the file; SQLite's own errors will.
            Err(_) => self.missing.load(Ordering::Acquire),
        };
        let was_missing = self.missing.swap(now_missing, Ordering::AcqRel);
        if now_missing && !was_missing {
            log::error!(
                "the database file {} was deleted or replaced while the server runs: \
                 every change is refused and /health answers 503; restart the server \
                 (with the file restored) to serve again",
                self.path.display()
            );
        } else if was_missing && !now_missing {
            log::warn!(
                "the database file {} is back: serving again",
                self.path.display()
            );
        }
        if now_missing {
            Err(Error::DatabaseMissing)
        } else {
            Ok(())
        }
    }
}

/// (device, inode) of the file at `path`; `DatabaseMissing` when nothing is
/// there; `None` where the platform has no such identity.
pub(super) fn identity(path: &Path) -> Result<Option<(u64, u64)>, Error> {
    match std::fs::metadata(path) {
        #[cfg(unix)]
        Ok(meta) => {
            use std::os::unix::fs::MetadataExt;
            Ok(Some((meta.dev(), meta.ino())))
        }
        #[cfg(not(unix))]
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(Error::DatabaseMissing)
        }
        Err(e) => Err(Error::Storage(format!(
            "cannot stat the database file {}: {e}",
            path.display()
        ))),
    }
}

//! The process's open-file limit: raised from the inherited soft limit to the
//! hard one at start, because every connection is a file descriptor and the
//! usual soft default (1024) is far below what one server is meant to hold.

use std::sync::OnceLock;

use rlimit::Resource;

/// Linux's default `fs.nr_open`: the most a soft limit can be raised to when
/// the hard limit is "unlimited" (setting the soft limit to infinity fails).
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The soft limit once raised, looked up (and logged) once per process: tests
/// and embedders start many servers in one process, and the limit is the
/// process's, not a server's.
static LIMIT: OnceLock<u64> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once per process) and
/// returns the soft limit now in force. Harmless to call again.
pub fn raise() -> u64 {
    *LIMIT.get_or_init(|| {
        let (soft, hard) = match Resource::NOFILE.get() {
            Ok(limits) => limits,
            Err(e) => {
                log::warn!("cannot read the open-file limit: {e}");
                return NR_OPEN_DEFAULT;
            }
        };
        let raised = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::increase_nofile_limit(hard.min(NR_OPEN_DEFAULT)));
        match raised {
            Ok(now) if now > soft => {
                log::info!("open-file limit raised from {soft} to {now} (the hard limit)");
                now
            }
            Ok(now) => {
                log::info!("open-file limit {now} (the hard limit; raise it with `ulimit -Hn`)");
                now
            }
            Err(e) => {
                log::warn!("open-file limit {soft}: cannot raise it to the hard limit {hard}: {e}");
                soft
            }
        }
    })
}

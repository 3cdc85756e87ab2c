//! How a command fails: one line on stderr and an exit code scripts can tell
//! apart (README "Exit codes"): 1 failure, 2 usage (clap's), 3 not found,
//! 4 conflict with what is stored.

use std::process::ExitCode;

use crate::domain::error::Error;

/// Anything else: a storage failure, a bad value, a file that cannot be read.
pub(super) const FAILURE: u8 = 1;
/// A named user, library, view or membership does not exist.
pub(super) const NOT_FOUND: u8 = 3;
/// Refused because of what is stored: a taken id, the owner rule, rows that
/// depend on what is being removed.
pub(super) const CONFLICT: u8 = 4;

#[derive(Debug)]
pub(super) struct Failure {
    pub(super) message: String,
    pub(super) code: u8,
}

impl Failure {
    pub(super) fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }

    pub(super) fn report(&self) -> ExitCode {
        eprintln!("error: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(FAILURE, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match e {
            Error::Missing { .. } | Error::NotFound(_) | Error::ViewNotFound => NOT_FOUND,
            Error::Conflict(_) | Error::Conflicting(_) => CONFLICT,
            _ => FAILURE,
        };
        let message = match e {
            // The CLI's operator may see the cause: it is their database.
            Error::Storage(cause) | Error::Internal(cause) => cause,
            other => other.client_message(),
        };
        Failure::new(code, message)
    }
}

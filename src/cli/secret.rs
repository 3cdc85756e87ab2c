//! The JWT secret: its flags (on `serve`, `demo`, `token` and `config print`
//! only: the admin commands never need it), where it comes from
//! (`--jwt-secret`, `--jwt-secret-file`, the demo's kept one) and the warning
//! about a short one.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::Database;

#[derive(Args, Debug, Clone)]
pub(super) struct SecretArgs {
    /// HS256 secret for tokens (`ps` shows it: prefer --jwt-secret-file)
    #[arg(long, env = "PORTAL_JWT_SECRET", hide_env_values = true)]
    pub(super) jwt_secret: Option<String>,

    /// File holding the HS256 secret (instead of --jwt-secret, which `ps` shows);
    /// surrounding whitespace is ignored
    #[arg(long, env = "PORTAL_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub(super) jwt_secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The configured secret, if any (see [`configured_secret`]).
    pub(super) fn configured(&self) -> Result<Option<String>, String> {
        configured_secret(self.jwt_secret.as_deref(), self.jwt_secret_file.as_deref())
    }

    /// The configured secret, required.
    pub(super) fn required(&self) -> Result<String, String> {
        self.configured()?.ok_or_else(|| {
            "no JWT secret: set --jwt-secret, --jwt-secret-file or PORTAL_JWT_SECRET \
             (or try `portal-sync demo`)"
                .to_string()
        })
    }
}

/// Where the demo keeps its secret, so that the links a run printed still
/// work after a restart: beside its SQLite file, or, on PostgreSQL (no file
/// to sit beside), [`PG_DEMO_SECRET`] in the working directory.
pub(super) fn demo_secret_path(db: &Path) -> PathBuf {
    match Database::parse(db) {
        Database::Postgres(_) => PathBuf::from(PG_DEMO_SECRET),
        Database::Sqlite(path) => {
            let mut name = path.into_os_string();
            name.push(".secret");
            PathBuf::from(name)
        }
    }
}

/// The demo's kept secret on PostgreSQL, relative to the working directory.
pub(super) const PG_DEMO_SECRET: &str = "portal-sync-demo.secret";

/// The demo's kept secret: read from `path`, or made once and written there
/// 0600 (created exclusively, so two demos starting at once agree on one).
pub(super) fn kept_secret(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            let secret = random_secret()?;
            file.write_all(format!("{secret}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write the demo secret to {shown}: {e}"))?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match configured_secret(None, Some(path))? {
                Some(secret) => Ok(secret),
                None => Err(format!("the demo secret file {shown} is empty")),
            }
        }
        Err(e) => Err(format!("cannot create the demo secret file {shown}: {e}")),
    }
}

/// The secret from `--jwt-secret-file` or `--jwt-secret` (clap refuses both).
/// An empty `--jwt-secret` is none (so `PORTAL_JWT_SECRET=` unsets it); a file
/// that cannot be read, is not text or holds only whitespace is an error that
/// names it, since whoever pointed at the file meant to use it.
pub(super) fn configured_secret(
    flag: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, String> {
    let Some(path) = file else {
        return Ok(flag.filter(|s| !s.is_empty()).map(str::to_string));
    };
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("the JWT secret file {shown} does not exist"),
        _ => format!("cannot read the JWT secret file {shown}: {e}"),
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("the JWT secret file {shown} is not UTF-8 text"))?;
    // `echo secret > file` leaves a newline that is not part of the secret.
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("the JWT secret file {shown} is empty"));
    }
    Ok(Some(secret.to_string()))
}

/// RFC 7518 §3.2: an HS256 key should be at least as long as the hash (32
/// bytes). SPEC §2 accepts a shorter one, with a warning at start; the
/// warning names the length, never the secret.
fn short_secret_warning(secret: &str) -> Option<String> {
    (secret.len() < 32).then(|| {
        format!(
            "the JWT secret is only {} bytes long: use at least 32 random bytes \
             (a short HS256 secret can be guessed offline from any token it signed)",
            secret.len()
        )
    })
}

/// `serve` and `demo` warn; `token` does not (its secret is the server's,
/// which warns at its own start, and scripts read its output).
pub(super) fn warn_if_short(secret: &str) {
    if let Some(warning) = short_secret_warning(secret) {
        log::warn!("{warning}");
    }
}

pub(super) fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a demo secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let err = configured_secret(None, Some(&missing)).expect_err("missing file");
        assert!(
            err.contains("does not exist") && err.contains("missing"),
            "{err}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n\t\n").expect("write");
        let err = configured_secret(None, Some(&empty)).expect_err("empty file");
        assert!(err.ends_with("is empty"), "{err}");
        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let err = configured_secret(None, Some(&binary)).expect_err("not text");
        assert!(err.contains("not UTF-8"), "{err}");
        let err = configured_secret(None, Some(dir.path())).expect_err("a directory");
        assert!(err.starts_with("cannot read the JWT secret file"), "{err}");
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cret\n").expect("write");
        assert_eq!(
            configured_secret(None, Some(&good)),
            Ok(Some("s3cret".into()))
        );
        assert_eq!(configured_secret(Some(""), None), Ok(None));
        assert_eq!(configured_secret(Some("x"), None), Ok(Some("x".into())));
    }

    #[test]
    fn the_demo_secret_sits_beside_a_file_or_in_the_working_directory() {
        assert_eq!(
            demo_secret_path(Path::new("dir/demo.db")),
            PathBuf::from("dir/demo.db.secret")
        );
        for url in ["postgres://u:pw@h/db", "postgresql://h/db?sslmode=disable"] {
            assert_eq!(
                demo_secret_path(Path::new(url)),
                PathBuf::from(PG_DEMO_SECRET)
            );
        }
    }

    #[test]
    fn short_secrets_are_warned_about_without_showing_them() {
        let short = "change-me";
        let warning = short_secret_warning(short).expect("9 bytes is short");
        assert!(!warning.contains(short), "{warning}");
        assert!(warning.contains("9 bytes"), "{warning}");
        assert!(short_secret_warning(&"k".repeat(31)).is_some());
        assert!(short_secret_warning(&"k".repeat(32)).is_none());
        // The demo's own secret needs no warning.
        let demo = random_secret().expect("random");
        assert!(demo.len() >= 32, "{}", demo.len());
        assert!(short_secret_warning(&demo).is_none());
    }
}

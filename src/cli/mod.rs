//! The `portal-sync` command line (SPEC §6): `serve`, `demo`, `token`, and the
//! administration of users, libraries, members and portal views.
//!
//! Here the clap definition and the dispatch; `serve.rs` runs the server,
//! `demo.rs` seeds and prints the demo, `secret.rs` reads the JWT secret and
//! `admin.rs` holds the administration commands.

mod admin;
mod config_file;
mod demo;
mod failure;
mod logging;
mod secret;
mod serve;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{Database, Synchronous};
use crate::engines;
use crate::protocol::auth::Tokens;
use admin::{LibraryCmd, MemberCmd, UserCmd, ViewCmd};
use demo::print_demo;
pub use demo::{seed_demo, DEMO_VIEW};
use failure::{Failure, FAILURE, NOT_FOUND};
use secret::{demo_secret_path, kept_secret, warn_if_short, SecretArgs};
use serve::{config, serve, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "portal-sync",
    version,
    about = "Real-time sync server for portal views",
    after_help = "Exit codes: 0 done, 1 failed, 2 usage error, 3 not found, 4 conflict \
                  (a taken id, the owner rule, rows depending on what is removed)."
)]
pub struct Cli {
    /// SQLite database file, or a `postgres://` URL (SPEC §8) [default: portal-sync.db;
    /// portal-sync-demo.db for `demo`]
    #[arg(long, env = "PORTAL_DB", global = true)]
    db: Option<PathBuf>,

    /// Log lines as text, or as JSON (one object per line) for log shippers
    #[arg(
        long,
        env = "PORTAL_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "text"
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server
    Serve(ServeArgs),
    /// Create a demo database if missing, print links and tokens, and serve
    Demo(ServeArgs),
    /// Print a token signed with the configured secret
    Token {
        /// User id (the token's `sub`); checked against the database when it exists
        #[arg(long)]
        user: String,
        /// Lifetime: seconds, or a number with s, m, h or d (more than 0, at most 3650d)
        #[arg(long, default_value = "1h", value_parser = parse_ttl, allow_hyphen_values = true)]
        ttl: Duration,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Users: add, list, show, remove
    #[command(subcommand)]
    User(UserCmd),
    /// Libraries: add, list, show, remove
    #[command(subcommand)]
    Library(LibraryCmd),
    /// Library members and their roles: set, remove, list
    #[command(subcommand)]
    Member(MemberCmd),
    /// Portal views: add, list, show, remove
    #[command(subcommand)]
    View(ViewCmd),
    /// The config file: check, print the effective settings, init
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Check a config file: exit 0, or non-zero with what is wrong
    Check {
        /// The TOML file
        file: PathBuf,
    },
    /// Print the settings `serve` would run with, as TOML, secrets as ***
    Print(Box<ServeArgs>),
    /// Write a config file with every setting, commented out, at its default
    Init {
        /// Where to write it
        #[arg(default_value = "portal-sync.toml")]
        file: PathBuf,
        /// Overwrite the file if it exists
        #[arg(long)]
        force: bool,
    },
}

/// The parsed command line, with the config file's settings merged in.
struct Parsed {
    cli: Cli,
    matches: ArgMatches,
    /// Keys whose value came from the config file.
    from_file: Vec<String>,
    /// Said once logging is set up.
    warnings: Vec<String>,
}

enum ParseFailure {
    Usage(clap::Error),
    Failed(Failure),
}

impl From<clap::Error> for ParseFailure {
    fn from(e: clap::Error) -> Self {
        ParseFailure::Usage(e)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let parsed = match parse(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(ParseFailure::Usage(e)) => return usage_error(&e),
        Err(ParseFailure::Failed(f)) => return f.report(),
    };
    logging::init(parsed.cli.log_format);
    for warning in &parsed.warnings {
        log::warn!("{warning}");
    }
    match run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// The subcommands that take `serve`'s settings (and so `--config`), by path.
const WITH_SETTINGS: [&[&str]; 3] = [&["serve"], &["demo"], &["config", "print"]];

fn settings_of<'m>(matches: &'m ArgMatches, path: &[&str]) -> Option<&'m ArgMatches> {
    path.iter()
        .try_fold(matches, |m, name| m.subcommand_matches(name))
}

fn settings_command<'c>(cmd: &'c clap::Command, path: &[&str]) -> Option<&'c clap::Command> {
    path.iter().try_fold(cmd, |c, name| c.find_subcommand(name))
}

/// Parses the command line; with `--config FILE` (or `PORTAL_CONFIG`), the
/// file's settings are appended as flags for those not given by flag or
/// environment, and the line is parsed again, so every value goes through
/// the same clap checks whatever its source.
fn parse(mut argv: Vec<OsString>) -> Result<Parsed, ParseFailure> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut matches = cmd.try_get_matches_from_mut(argv.clone())?;
    let mut from_file = Vec::new();
    let mut warnings = Vec::new();
    let found = WITH_SETTINGS.iter().find_map(|path| {
        let sub = settings_of(&matches, path)?;
        Some((path, sub.get_one::<PathBuf>("config")?.clone()))
    });
    if let Some((path, file)) = found {
        let fail = |e: String| ParseFailure::Failed(Failure::new(FAILURE, e));
        let table = config_file::read(&file).map_err(fail)?;
        warnings.extend(config_file::readable_secret(&file, &table));
        let (sub_cmd, sub) = settings_command(&cmd, path)
            .zip(settings_of(&matches, path))
            .ok_or_else(|| fail("internal: no such subcommand".into()))?;
        let (extra, used) = config_file::as_args(sub_cmd, sub, &table)
            .map_err(|e| fail(format!("{}: {e}", file.display())))?;
        argv.extend(extra);
        matches = cmd.try_get_matches_from_mut(argv)?;
        from_file = used;
    }
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(Parsed {
        cli,
        matches,
        from_file,
        warnings,
    })
}

/// clap's own message and exit code, plus a note where a secret set in the
/// environment is what conflicts: clap names it as the flag the user did not type.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    let from_env = ["PORTAL_JWT_SECRET", "PORTAL_JWT_SECRET_FILE"]
        .into_iter()
        .filter(|key| std::env::var_os(key).is_some())
        .collect::<Vec<_>>();
    if e.kind() == clap::error::ErrorKind::ArgumentConflict && !from_env.is_empty() {
        eprintln!(
            "note: {} in the environment counts as its flag; give the secret one way only",
            from_env.join(" and ")
        );
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// Whether `--db` names a database that exists (opening a file path would
/// create it).
fn db_exists(db: &Path) -> bool {
    match Database::parse(db) {
        Database::Postgres(_) => true,
        Database::Sqlite(path) => path.exists(),
    }
}

fn run(parsed: Parsed) -> Result<(), Failure> {
    let Parsed {
        cli,
        matches,
        from_file,
        ..
    } = parsed;
    let db_path = |default: &str| cli.db.clone().unwrap_or_else(|| PathBuf::from(default));
    match cli.command {
        Command::Serve(args) => {
            let secret = args.secret.required()?;
            warn_if_short(&secret);
            Ok(serve(
                config(&args, db_path("portal-sync.db"), secret),
                &args.addr,
                None,
            )?)
        }
        Command::Demo(args) => {
            let path = db_path("portal-sync-demo.db");
            seed_demo(&path)?;
            let (secret, origin) = match args.secret.configured()? {
                Some(s) => (
                    s,
                    "secret from --jwt-secret, --jwt-secret-file or their PORTAL_ variables: \
                     these links stay valid while it is the same"
                        .to_string(),
                ),
                None => {
                    let kept = demo_secret_path(&path);
                    (
                        kept_secret(&kept)?,
                        format!(
                            "secret kept in {} so these links stay valid across restarts",
                            kept.display()
                        ),
                    )
                }
            };
            warn_if_short(&secret);
            let cfg = config(&args, path, secret);
            Ok(serve(
                cfg,
                &args.addr,
                Some(Box::new(move |c, a| print_demo(c, a, &origin))),
            )?)
        }
        Command::Token { user, ttl, secret } => {
            let secret = secret.required()?;
            let db = db_path("portal-sync.db");
            if db_exists(&db) {
                let store = engines::open(&db, Synchronous::Full)?;
                if !store.admin().user_exists(&user)? {
                    return Err(Failure::new(
                        NOT_FOUND,
                        // A URL's password stays out of the message.
                        format!("user {user} not found in {}", Database::parse(&db)),
                    ));
                }
            }
            let token = Tokens::new(secret.as_bytes(), 0).issue(&user, ttl.as_secs())?;
            println!("{token}");
            Ok(())
        }
        Command::User(cmd) => admin::user(&db_path("portal-sync.db"), cmd),
        Command::Library(cmd) => admin::library(&db_path("portal-sync.db"), cmd),
        Command::Member(cmd) => admin::member(&db_path("portal-sync.db"), cmd),
        Command::View(cmd) => admin::view(&db_path("portal-sync.db"), cmd),
        Command::Config(ConfigCmd::Check { file }) => {
            let mut cmd = Cli::command();
            cmd.build();
            let serve = settings_command(&cmd, &["serve"])
                .ok_or_else(|| "internal: no serve command".to_string())?;
            let table = config_file::read(&file)?;
            config_file::check(serve, &table).map_err(|e| format!("{}: {e}", file.display()))?;
            // The whole line as `serve` would parse it (the secret's two
            // sources, say, cannot both be given).
            let argv = ["portal-sync", "config", "print", "--config"]
                .map(OsString::from)
                .into_iter()
                .chain([file.clone().into_os_string()])
                .collect();
            match parse(argv) {
                Ok(_) => {}
                Err(ParseFailure::Failed(f)) => return Err(f),
                Err(ParseFailure::Usage(e)) => {
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or_default();
                    return Err(format!(
                        "{}: {}",
                        file.display(),
                        first.strip_prefix("error: ").unwrap_or(first)
                    )
                    .into());
                }
            }
            println!("{}: ok ({} settings)", file.display(), table.len());
            Ok(())
        }
        Command::Config(ConfigCmd::Print(_)) => {
            let mut cmd = Cli::command();
            cmd.build();
            let path: &[&str] = &["config", "print"];
            let (sub_cmd, sub) = settings_command(&cmd, path)
                .zip(settings_of(&matches, path))
                .ok_or_else(|| "internal: no config print command".to_string())?;
            print!("{}", config_file::print(sub_cmd, sub, &from_file));
            Ok(())
        }
        Command::Config(ConfigCmd::Init { file, force }) => {
            let mut cmd = Cli::command();
            cmd.build();
            let serve = settings_command(&cmd, &["serve"])
                .ok_or_else(|| "internal: no serve command".to_string())?;
            if file.exists() && !force {
                return Err(Failure::new(
                    failure::CONFLICT,
                    format!("{} exists (--force overwrites it)", file.display()),
                ));
            }
            std::fs::write(&file, config_file::template(serve))
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            println!("wrote {}", file.display());
            Ok(())
        }
    }
}

/// `--ttl`: a duration of more than 0 and at most ten years (a token's `exp`
/// must stay a sane number).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl.is_zero() {
        return Err("must be more than 0 (a token with no lifetime is already expired)".into());
    }
    if ttl > Duration::from_secs(3650 * 86400) {
        return Err("must be at most 3650d".into());
    }
    Ok(ttl)
}

/// `90`, `90s`, `15m`, `1h`, `7d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90, 90s, 15m, 1h or 7d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h or d")),
    };
    let secs = n
        .checked_mul(unit)
        .ok_or_else(|| format!("`{text}` is too long"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("-5").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("3651d").is_err());
        assert_eq!(parse_ttl("3650d"), Ok(Duration::from_secs(3650 * 86400)));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

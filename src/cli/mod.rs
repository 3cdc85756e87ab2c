//! The `portal-sync` command line (SPEC §6): `serve`, `demo`, `token`, and the
//! administration of users, libraries, members and portal views.
//!
//! Here the clap definition and the dispatch; `serve.rs` runs the server,
//! `demo.rs` seeds and prints the demo, `secret.rs` reads the JWT secret and
//! `admin.rs` holds the administration commands.

mod admin;
mod demo;
mod logging;
mod secret;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::protocol::auth::Tokens;
use admin::{LibraryCmd, MemberCmd, UserCmd, ViewCmd};
use demo::print_demo;
pub use demo::{seed_demo, DEMO_VIEW};
use secret::{configured_secret, random_secret, warn_if_short};
use serve::{config, serve, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "portal-sync",
    version,
    about = "Real-time sync server for portal views"
)]
pub struct Cli {
    /// SQLite database file [default: portal-sync.db; portal-sync-demo.db for `demo`]
    #[arg(long, env = "PORTAL_DB", global = true)]
    db: Option<PathBuf>,

    /// HS256 secret for tokens (required by `serve` and `token`)
    #[arg(long, env = "PORTAL_JWT_SECRET", global = true, hide_env_values = true)]
    jwt_secret: Option<String>,

    /// File holding the HS256 secret (instead of --jwt-secret, which `ps` shows);
    /// surrounding whitespace is ignored
    #[arg(
        long,
        env = "PORTAL_JWT_SECRET_FILE",
        global = true,
        conflicts_with = "jwt_secret"
    )]
    jwt_secret_file: Option<PathBuf>,

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
        /// User id (the token's `sub`)
        #[arg(long)]
        user: String,
        /// Lifetime: seconds, or a number with s, m, h or d
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Users: add, list
    #[command(subcommand)]
    User(UserCmd),
    /// Libraries: add, list
    #[command(subcommand)]
    Library(LibraryCmd),
    /// Library members and their roles: set, remove, list
    #[command(subcommand)]
    Member(MemberCmd),
    /// Portal views: add, list, show
    #[command(subcommand)]
    View(ViewCmd),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
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

fn run(cli: Cli) -> Result<(), String> {
    let db_path = |default: &str| cli.db.clone().unwrap_or_else(|| PathBuf::from(default));
    // Read only by the commands that sign or check tokens: an admin command
    // has no use for the secret and must not fail on its file.
    let configured =
        || configured_secret(cli.jwt_secret.as_deref(), cli.jwt_secret_file.as_deref());
    let secret = || {
        configured()?.ok_or_else(|| {
            "no JWT secret: set --jwt-secret, --jwt-secret-file or PORTAL_JWT_SECRET \
             (or try `portal-sync demo`)"
                .to_string()
        })
    };
    match cli.command {
        Command::Serve(args) => {
            let secret = secret()?;
            warn_if_short(&secret);
            serve(
                config(&args, db_path("portal-sync.db"), secret),
                args.addr,
                None,
            )
        }
        Command::Demo(args) => {
            let secret = match configured()? {
                Some(s) => s,
                None => random_secret()?,
            };
            warn_if_short(&secret);
            let path = db_path("portal-sync-demo.db");
            seed_demo(&path).map_err(|e| e.to_string())?;
            let cfg = config(&args, path, secret);
            serve(cfg, args.addr, Some(print_demo))
        }
        Command::Token { user, ttl } => {
            let token = Tokens::new(secret()?.as_bytes(), 0)
                .issue(&user, ttl.as_secs())
                .map_err(|e| e.to_string())?;
            println!("{token}");
            Ok(())
        }
        Command::User(cmd) => admin::user(&db_path("portal-sync.db"), cmd),
        Command::Library(cmd) => admin::library(&db_path("portal-sync.db"), cmd),
        Command::Member(cmd) => admin::member(&db_path("portal-sync.db"), cmd),
        Command::View(cmd) => admin::view(&db_path("portal-sync.db"), cmd),
    }
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
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h or d")),
    };
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
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

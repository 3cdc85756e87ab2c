//! The `portal-sync` command line (SPEC §6): `serve`, `demo`, `token`, and the
//! administration of users, libraries, members and portal views.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::config::Synchronous;
use crate::domain::access::LibraryRole;
use crate::domain::error::Error;
use crate::engines;
use crate::protocol::auth::Tokens;
use crate::store::Store;

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

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "PORTAL_ADDR", default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Seconds of clock leeway when checking a token's `exp`
    #[arg(long, env = "PORTAL_JWT_LEEWAY", default_value_t = 0)]
    jwt_leeway: u64,
    /// Largest WebSocket message or REST body, in bytes (1009 / 413 above it)
    #[arg(long, env = "PORTAL_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    max_message_bytes: usize,
    /// Largest serialized state of a view, in bytes (a change past it is refused)
    #[arg(long, env = "PORTAL_MAX_STATE_BYTES", default_value_t = 512 * 1024)]
    max_state_bytes: usize,
    /// Seconds a viewer's request-sync waits for a controller's sync-response
    /// before the server answers with the stored state
    #[arg(long, env = "PORTAL_SYNC_TIMEOUT", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    sync_timeout: u64,
    /// Seconds an HTTP response may wait for a peer that does not read before
    /// the connection is dropped
    #[arg(long, env = "PORTAL_HTTP_WRITE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    http_write_timeout: u64,
    /// Connections that have not sent a complete request yet; past this the
    /// oldest is dropped [default: half the open-file limit]
    #[arg(long, env = "PORTAL_MAX_PENDING_CONNS", value_parser = clap::value_parser!(u64).range(1..))]
    max_pending_conns: Option<u64>,
    /// Outbound bytes queued per connection before it is closed 1013 `slow consumer`
    #[arg(long, env = "PORTAL_SEND_QUEUE_BYTES", default_value_t = 1 << 20)]
    send_queue_bytes: usize,
    /// Seconds shutdown waits for connections to close
    #[arg(long, env = "PORTAL_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    shutdown_timeout: u64,
    /// Seconds between pings to every connection
    #[arg(long, env = "PORTAL_PING_INTERVAL", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    ping_interval: u64,
    /// Seconds a ping may go unanswered before the connection is dropped
    #[arg(long, env = "PORTAL_PING_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    ping_timeout: u64,
    /// Inbound messages per second per connection (token bucket refill rate)
    #[arg(long, env = "PORTAL_RATE_PER_SEC", default_value_t = 100)]
    rate_per_sec: u32,
    /// Inbound messages a connection may send at once (token bucket size)
    #[arg(long, env = "PORTAL_RATE_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: u32,
    /// Open connections per user, over all views
    #[arg(long, env = "PORTAL_MAX_CONNS_PER_USER", default_value_t = 32)]
    max_conns_per_user: usize,
    /// Open connections per portal view
    #[arg(long, env = "PORTAL_MAX_CONNS_PER_VIEW", default_value_t = 100_000)]
    max_conns_per_view: usize,
    /// Open connections on this server
    #[arg(long, env = "PORTAL_MAX_CONNS", default_value_t = 200_000)]
    max_conns: usize,
    /// Browser origins allowed besides the server's own, comma-separated
    /// (`https://app.example.com`; `*` allows any origin)
    #[arg(long, env = "PORTAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// SQLite `synchronous` (full: acks survive power loss; normal: they survive a
    /// process crash)
    #[arg(
        long,
        env = "PORTAL_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "full"
    )]
    sqlite_synchronous: Synchronous,
    /// Redis for running several nodes on one database (`redis://127.0.0.1:6379`);
    /// unset: a single node, no Redis needed
    #[arg(long, env = "PORTAL_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of this cluster's Redis channels and keys
    #[arg(long, env = "PORTAL_REDIS_PREFIX", default_value = "portal-sync")]
    redis_prefix: String,
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add a user
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
    },
    /// List users
    List,
}

#[derive(Subcommand, Debug)]
enum LibraryCmd {
    /// Add a library owned by an existing user
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner: String,
    },
    /// List libraries
    List,
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Add a member or change their role
    Set {
        #[arg(long)]
        library: String,
        #[arg(long)]
        user: String,
        #[arg(long, value_parser = LibraryRole::NAMES)]
        role: String,
    },
    /// Remove a member
    Remove {
        #[arg(long)]
        library: String,
        #[arg(long)]
        user: String,
    },
    /// List the members of a library
    List {
        #[arg(long)]
        library: String,
    },
}

#[derive(Subcommand, Debug)]
enum ViewCmd {
    /// Add a portal view to a library
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        library: String,
        #[arg(long)]
        name: String,
        /// Initial state, a JSON object
        #[arg(long, default_value = "{}", value_parser = parse_object)]
        state: Map<String, Value>,
    },
    /// List portal views
    List,
    /// Print one portal view as JSON
    Show {
        #[arg(long)]
        id: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    init_logging();
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

fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    pretty_env_logger::formatted_timed_builder()
        .parse_filters(&filter)
        .init();
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
        Command::User(cmd) => admin(&db_path("portal-sync.db"), |s| {
            let c = s.admin();
            match cmd {
                UserCmd::Add { id, email, name } => {
                    c.add_user(&id, &email, &name)?;
                    println!("added user {id}");
                    Ok(())
                }
                UserCmd::List => {
                    for u in c.users()? {
                        row(&[&u.id, &u.email, &u.name]);
                    }
                    Ok(())
                }
            }
        }),
        Command::Library(cmd) => admin(&db_path("portal-sync.db"), |s| {
            let c = s.admin();
            match cmd {
                LibraryCmd::Add { id, name, owner } => {
                    c.add_library(&id, &name, &owner)?;
                    println!("added library {id} owned by {owner}");
                    Ok(())
                }
                LibraryCmd::List => {
                    for l in c.libraries()? {
                        row(&[&l.id, &l.name, &l.owner_id]);
                    }
                    Ok(())
                }
            }
        }),
        Command::Member(cmd) => admin(&db_path("portal-sync.db"), |s| {
            let c = s.admin();
            match cmd {
                MemberCmd::Set {
                    library,
                    user,
                    role,
                } => {
                    let parsed = LibraryRole::parse(&role)
                        .ok_or_else(|| Error::BadRequest(format!("{role} is not a role")))?;
                    match c.set_member(&library, &user, parsed)? {
                        Some(old) if old == role => {
                            println!("{user} already is {role} in {library}")
                        }
                        Some(old) => println!("{user}: {old} -> {role} in {library}"),
                        None => println!("added {user} to {library} as {role}"),
                    }
                    Ok(())
                }
                MemberCmd::Remove { library, user } => {
                    if c.remove_member(&library, &user)? {
                        println!("removed {user} from {library}");
                        Ok(())
                    } else {
                        Err(Error::BadRequest(format!(
                            "{user} is not a member of {library}"
                        )))
                    }
                }
                MemberCmd::List { library } => {
                    for m in c.members(&library)? {
                        row(&[&m.user_id, &m.role]);
                    }
                    Ok(())
                }
            }
        }),
        Command::View(cmd) => admin(&db_path("portal-sync.db"), |s| {
            let c = s.admin();
            match cmd {
                ViewCmd::Add {
                    id,
                    library,
                    name,
                    state,
                } => {
                    c.add_view(&id, &library, &name, &state)?;
                    println!("added portal view {id} to {library}");
                    Ok(())
                }
                ViewCmd::List => {
                    for v in c.views()? {
                        let version = v.version.to_string();
                        let updated = v.updated_at.unwrap_or_default();
                        row(&[&v.id, &v.library_id, &v.name, &version, &updated]);
                    }
                    Ok(())
                }
                ViewCmd::Show { id } => {
                    let view = s.view(&id)?.ok_or(Error::ViewNotFound)?;
                    let text = serde_json::to_string_pretty(&view)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    println!("{text}");
                    Ok(())
                }
            }
        }),
    }
}

/// The secret from `--jwt-secret-file` or `--jwt-secret` (clap refuses both).
/// An empty `--jwt-secret` is none (so `PORTAL_JWT_SECRET=` unsets it); a file
/// that cannot be read, is not text or holds only whitespace is an error that
/// names it, since whoever pointed at the file meant to use it.
fn configured_secret(flag: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
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
fn warn_if_short(secret: &str) {
    if let Some(warning) = short_secret_warning(secret) {
        log::warn!("{warning}");
    }
}

fn config(args: &ServeArgs, db_path: PathBuf, secret: String) -> Config {
    Config {
        jwt_leeway: args.jwt_leeway,
        max_message_bytes: args.max_message_bytes,
        max_state_bytes: args.max_state_bytes,
        sync_timeout: Duration::from_secs(args.sync_timeout),
        http_write_timeout: Duration::from_secs(args.http_write_timeout),
        max_pending_conns: args.max_pending_conns.map(|n| n as usize),
        send_queue_bytes: args.send_queue_bytes,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        ping_interval: Duration::from_secs(args.ping_interval),
        ping_timeout: Duration::from_secs(args.ping_timeout),
        rate_per_sec: f64::from(args.rate_per_sec),
        rate_burst: args.rate_burst,
        max_conns_per_user: args.max_conns_per_user,
        max_conns_per_view: args.max_conns_per_view,
        max_conns: args.max_conns,
        allowed_origins: args
            .allowed_origins
            .iter()
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        sqlite_synchronous: args.sqlite_synchronous,
        redis_url: args.redis_url.clone().filter(|u| !u.is_empty()),
        redis_prefix: args.redis_prefix.clone(),
        ..Config::new(db_path, secret)
    }
}

/// Runs an administration command on the store at `path`.
fn admin(path: &Path, f: impl FnOnce(&dyn Store) -> Result<(), Error>) -> Result<(), String> {
    let store = engines::open(path, Synchronous::Full).map_err(|e| e.to_string())?;
    f(&*store).map_err(|e| match e {
        Error::Storage(cause) => cause,
        other => other.client_message(),
    })
}

/// One line of a `list` command: tab-separated columns.
fn row(columns: &[&str]) {
    println!("{}", columns.join("\t"));
}

/// Runs the server until SIGINT or SIGTERM.
fn serve(
    config: Config,
    addr: SocketAddr,
    banner: Option<fn(&Config, SocketAddr)>,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener =
            crate::http::server::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().unwrap_or(addr);
        let shutdown = shutdown_signal()?;
        if let Some(banner) = banner {
            banner(&config, local);
        }
        crate::http::server::run(listener, config, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a signal that arrives right after the banner
/// (which tells scripts the server is up) must still shut down gracefully.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| format!("installing a signal handler: {e}"))
        };
        let mut term = install(SignalKind::terminate())?;
        let mut int = install(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a demo secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub const DEMO_VIEW: &str = "demo";
const DEMO_USERS: [(&str, &str, &str); 3] = [
    ("alice", "Alice", "owner of the library: controller"),
    ("bob", "Bob", "EDITOR: controller"),
    ("carol", "Carol", "VIEWER: viewer"),
];

/// Creates the demo users, library and view unless the view already exists.
pub fn seed_demo(path: &Path) -> Result<(), Error> {
    let store = engines::open(path, Synchronous::Full)?;
    if store.view(DEMO_VIEW)?.is_some() {
        return Ok(());
    }
    let admin = store.admin();
    for (id, name, _) in DEMO_USERS {
        if !admin.user_exists(id)? {
            admin.add_user(id, &format!("{id}@example.com"), name)?;
        }
    }
    admin.add_library("demo-library", "Demo library", "alice")?;
    admin.set_member("demo-library", "alice", LibraryRole::Owner)?;
    admin.set_member("demo-library", "bob", LibraryRole::Editor)?;
    admin.set_member("demo-library", "carol", LibraryRole::Viewer)?;
    let state = json!({
        "currentItem": "1",
        "visible": true,
        "items": {
            "1": {"title": "Welcome", "body": "portal-sync keeps every viewer on the same page."},
            "2": {"title": "How it works", "body": "The presenter pushes; the server stores, orders and fans out."},
            "3": {"title": "Questions?", "body": "Send a request-sync and get the current state at once."}
        }
    });
    let Value::Object(state) = state else {
        return Err(Error::Internal("demo state is an object".into()));
    };
    admin.add_view(DEMO_VIEW, "demo-library", "Demo presentation", &state)?;
    Ok(())
}

fn print_demo(config: &Config, addr: SocketAddr) {
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let tokens = Tokens::new(config.jwt_secret.as_bytes(), 0);
    println!(
        "portal-sync demo on http://{host} (database {})",
        config.db_path.display()
    );
    println!("JWT secret for this run: {}", config.jwt_secret);
    println!("(tokens below are valid for 24 hours; Ctrl-C stops the server)\n");
    for (id, name, what) in DEMO_USERS {
        let Ok(token) = tokens.issue(id, 24 * 3600) else {
            continue;
        };
        let url = format!("ws://{host}/ws/portal-view/{DEMO_VIEW}?token={token}");
        println!("{name} ({what})");
        // The browser pages (web.rs); the token rides in the URL fragment.
        for (label, page) in [
            ("Presenter page:", "presenter"),
            ("Viewer page:   ", "viewer"),
        ] {
            let url =
                crate::http::web::page_url(&format!("http://{host}"), page, &token, DEMO_VIEW);
            println!("  {label} {url}");
        }
        println!("  WebSocket URL (wscat, or `new WebSocket(url)` in a browser console):");
        println!("    {url}");
        println!("  wscat:  npx wscat -c '{url}'");
        println!(
            "  REST:   curl -H 'Authorization: Bearer {token}' http://{host}/api/portal-views/{DEMO_VIEW}\n"
        );
    }
    println!("As alice or bob, type:  {{\"type\":\"portal-view-update\",\"payload\":{{\"currentItem\":\"2\"}},\"id\":1}}");
    println!("As carol, type:         {{\"type\":\"request-sync\"}}\n");
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

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("must be a JSON object".into()),
    }
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

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

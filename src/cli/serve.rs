//! `serve` and `demo`'s server: its flags (SPEC §5), the `Config` they make,
//! and the runtime that runs it until a signal.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::secret::SecretArgs;
use crate::config::Config;
use crate::config::Synchronous;

#[derive(Args, Debug, Clone)]
pub(super) struct ServeArgs {
    /// TOML file with any of these flags as keys (`max-conns = 1000`);
    /// flags and environment variables win over it
    #[arg(long, env = "PORTAL_CONFIG")]
    pub(super) config: Option<PathBuf>,
    #[command(flatten)]
    pub(super) secret: SecretArgs,
    /// Address to listen on: IP:port or host:port (a host name is resolved and
    /// its first address bound)
    #[arg(long, env = "PORTAL_ADDR", default_value = "127.0.0.1:3000")]
    pub(super) addr: String,
    /// Seconds of clock leeway when checking a token's `exp`
    #[arg(long, env = "PORTAL_JWT_LEEWAY", default_value_t = 0)]
    jwt_leeway: u64,
    /// Seconds before a session's token expires that it is sent
    /// `token-expiring` (0: never)
    #[arg(long, env = "PORTAL_TOKEN_WARNING", default_value_t = 60)]
    token_warning: u64,
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

pub(super) fn config(args: &ServeArgs, db_path: PathBuf, secret: String) -> Config {
    Config {
        jwt_leeway: args.jwt_leeway,
        token_warning: Duration::from_secs(args.token_warning),
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

/// `--addr`: an IP address and port as is; a host name through the resolver.
/// Several addresses (`localhost` may be 127.0.0.1 and ::1): the first is
/// bound and the rest are named in the log, since one listener binds one.
pub(super) fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let mut found = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr}: {e} (use HOST:PORT, e.g. 127.0.0.1:3000)"))?;
    let first = found
        .next()
        .ok_or_else(|| format!("--addr {addr}: the host name has no address"))?;
    let rest: Vec<String> = found.map(|a| a.to_string()).collect();
    if !rest.is_empty() {
        log::info!(
            "{addr} resolves to {first} and {}; listening on {first} only",
            rest.join(", ")
        );
    }
    Ok(first)
}

/// What `demo` prints once the address is bound.
pub(super) type Banner = Box<dyn FnOnce(&Config, SocketAddr)>;

/// Runs the server until SIGINT or SIGTERM.
pub(super) fn serve(config: Config, addr: &str, banner: Option<Banner>) -> Result<(), String> {
    let addr = resolve(addr)?;
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

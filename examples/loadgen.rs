//! A load generator for portal-sync (and for any server that speaks the
//! benchmark subset of SPEC §3: `/ws/portal-view/{id}?token=`, `connected`
//! first, updates broadcast to every other connection of the view).
//!
//! Point it at your own install to see what it sustains:
//!
//! ```text
//! # 1,000 viewers on one view, one controller sending 50 updates/s for 10 s
//! cargo run --release --example loadgen -- --server ws://127.0.0.1:3000 \
//!     --secret "$PORTAL_JWT_SECRET" --viewers 1000 --rate 50 --duration 10
//! # 10,000 idle connections: handshakes/s, and the server's memory per connection
//! cargo run --release --example loadgen -- --mode idle --viewers 10000 \
//!     --secret "$PORTAL_JWT_SECRET" --server-pid "$(pidof portal-sync)"
//! # one controller, acked updates back to back (window of 512 in flight)
//! cargo run --release --example loadgen -- --secret S --viewers 1000 --rate 0 \
//!     --updates 30000 --ids --window 512
//! ```
//!
//! Users and views are named as `python3 ../shared/bench/fixture.py` makes them:
//! viewers `v0…` (VIEWER members), controllers `ed0…` (EDITORs), views `pv0…`.
//! Tokens are minted here with `--secret` (HS256, as the server checks them), or
//! read from `--tokens FILE` (lines `USER TOKEN`), or left out (servers without
//! auth, like the `limit` peer).
//!
//! What it measures, and why this way:
//! - Each update carries `{"t":<µs>,"seq":n}`; the server forwards the payload
//!   verbatim, so a viewer computes delivery latency against the same clock that
//!   stamped it (one process, one monotonic clock) and checks order by `seq`.
//! - Viewers scan the frame for `"seq":` and `"t":` instead of parsing the JSON
//!   (`--parse full` parses it, to show what that costs): the generator shares
//!   the machine with the server, so every microsecond it spends per delivery is
//!   one the server does not get. Its own CPU per delivery is reported too.
//! - Latencies go into per-thread log-linear histograms (1.6% resolution), not
//!   shared counters, so recording costs no cross-core traffic.
//! - With `--server-pid`, the server's RSS (`/proc/PID/status` VmRSS) before and
//!   after connecting gives bytes per connection, and its utime+stime
//!   (`/proc/PID/stat`) over the send phase gives CPU per delivery. Several
//!   pids (the nodes of a cluster, whose viewers `--viewer-servers` spreads
//!   over them) are summed.
//! - With `--pg-database`, the CPU of the PostgreSQL backends serving that
//!   database is measured the same way and reported apart (`pg_cpu_*`): with
//!   PostgreSQL, part of the cost of a commit or a lookup is spent there.
//! - Sockets close with a zero linger (RST): the generator then leaves no
//!   TIME_WAIT behind, so back-to-back runs of 10,000 connections do not run out
//!   of loopback ports.
//!
//! Progress goes to stderr once a second; the result is one JSON line on stdout.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Parser, Debug)]
#[command(about = "Load generator for portal-sync and compatible servers")]
struct Args {
    /// Server base URL (the controllers connect here; viewers too, unless
    /// --viewer-servers is given)
    #[arg(long, default_value = "ws://127.0.0.1:3000")]
    server: String,
    /// Base URLs the viewers connect to, comma-separated, round-robin (viewer i
    /// on server i mod K): the nodes of a cluster [default: --server]
    #[arg(long, value_delimiter = ',')]
    viewer_servers: Vec<String>,
    /// idle: connect the viewers, measure, hold, close. fanout: viewers plus one
    /// controller per view sending updates.
    #[arg(long, value_enum, default_value = "fanout")]
    mode: Mode,
    /// Viewer connections (users v0…v{N-1})
    #[arg(long, short = 'n', default_value_t = 1000)]
    viewers: usize,
    /// Portal views pv0…pv{P-1}; viewer i watches view i mod P
    #[arg(long, short = 'p', default_value_t = 1)]
    views: usize,
    /// Controller users ed0…ed{K-1}; view j is driven by ed{j mod K} [default: views]
    #[arg(long)]
    controller_users: Option<usize>,
    /// Handshakes in flight at once
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Updates per second per view; 0 sends back to back
    #[arg(long, short = 'r', default_value_t = 50.0)]
    rate: f64,
    /// Updates per view [default: rate × duration]
    #[arg(long)]
    updates: Option<u64>,
    /// Seconds of sending when --updates is not given
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Send an `id` with each update and wait for its ack (ack latency, acks/s)
    #[arg(long)]
    ids: bool,
    /// Updates in flight without an ack (with --ids)
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Extra bytes of padding in each update's payload
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// HS256 secret to mint tokens with
    #[arg(long, env = "PORTAL_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File of `USER TOKEN` lines, instead of --secret
    #[arg(long)]
    tokens: Option<std::path::PathBuf>,
    #[arg(long, default_value = "v")]
    viewer_prefix: String,
    #[arg(long, default_value = "ed")]
    controller_prefix: String,
    #[arg(long, default_value = "pv")]
    view_prefix: String,
    /// The server's pid, for its RSS and CPU time (from /proc); several
    /// comma-separated (the nodes of a cluster): their RSS and CPU are summed
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// A PostgreSQL database whose backends' CPU is measured apart (`pg_cpu_*`):
    /// the `postgres` processes whose title names it, found in /proc at each
    /// reading; `*` for every postgres process (walwriter, checkpointer, …)
    #[arg(long)]
    pg_database: Option<String>,
    /// Seconds to hold the connections open after measuring (idle mode)
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Milliseconds to wait after the last handshake before reading RSS
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Seconds to wait for outstanding deliveries and acks after the last send
    #[arg(long, default_value_t = 20.0)]
    drain_timeout: f64,
    /// Seconds one handshake may take before it counts as failed
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// How viewers read a delivery: scan for the fields, or a full JSON parse
    #[arg(long, value_enum, default_value = "scan")]
    parse: Parse,
    /// How viewers connect: WebSocket, or SPEC §7's SSE stream (controllers
    /// always use a WebSocket)
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// Bytes each socket reads at once. Small keeps 10,000 idle sockets cheap;
    /// larger means fewer read calls per delivery when updates come back to back
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Runtime worker threads
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Free-form label copied into the JSON result
    #[arg(long, default_value = "")]
    label: String,
    /// No progress lines on stderr
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Idle,
    Fanout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Parse {
    Scan,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Ws,
    Sse,
}

// ---------------------------------------------------------------------------
// Clock and histograms

/// Microseconds since the generator started: one monotonic clock for stamping
/// and for receiving, so latency needs no clock sync.
fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Log-linear histogram of microseconds: exact below 128, then 64 buckets per
/// power of two (at most 1.6% off), up to any u64.
#[derive(Clone)]
struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

const SUB: u64 = 128;
const HALF: u64 = 64;

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: vec![0; (SUB + 57 * HALF) as usize],
            total: 0,
            max: 0,
            sum: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros() as u64; // >= 7
        let mantissa = v >> (msb - 6); // 64..=127
        (SUB + (msb - 7) * HALF + (mantissa - HALF)) as usize
    }

    /// The highest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let k = (i - SUB) / HALF;
        let m = (i - SUB) % HALF + HALF;
        let shift = k + 1;
        ((m + 1) << shift) - 1
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }

    /// Percentiles in milliseconds, for the JSON result.
    fn summary_ms(&self) -> Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "count": self.total,
            "mean": if self.total > 0 { ms((self.sum / self.total as u128) as u64) } else { 0.0 },
            "p50": ms(self.quantile(0.50)),
            "p90": ms(self.quantile(0.90)),
            "p99": ms(self.quantile(0.99)),
            "p999": ms(self.quantile(0.999)),
            "max": ms(self.max),
        })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Handshake = 0,
    Delivery = 1,
    Ack = 2,
    /// The first viewer to get each update: the server's latency before its
    /// fan-out, as opposed to the fan-out's own length.
    First = 3,
}

type Hists = [Hist; 4];

/// Every thread's histograms, merged at the end.
static REGISTRY: Mutex<Vec<Arc<Mutex<Hists>>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Arc<Mutex<Hists>> = {
        let h = Arc::new(Mutex::new([Hist::new(), Hist::new(), Hist::new(), Hist::new()]));
        lock(&REGISTRY).push(h.clone());
        h
    };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records on this thread's histogram: an uncontended lock, no shared cache line.
fn record(kind: Kind, us: u64) {
    LOCAL.with(|h| lock(h)[kind as usize].record(us));
}

fn merged(kind: Kind) -> Hist {
    let mut out = Hist::new();
    for h in lock(&REGISTRY).iter() {
        out.merge(&lock(h)[kind as usize]);
    }
    out
}

// ---------------------------------------------------------------------------
// Shared counters

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    /// Connections that ended while the run still needed them.
    dropped: AtomicU64,
    received: AtomicU64,
    out_of_order: AtomicU64,
    /// Deliveries whose frame had no readable seq/t (counted, not timed).
    unparsed: AtomicU64,
    last_delivery_us: AtomicU64,
    sent: AtomicU64,
    acks: AtomicU64,
    last_ack_us: AtomicU64,
    /// `error` replies to updates (RATE_LIMITED, FORBIDDEN, …), by code.
    error_replies: AtomicU64,
    /// Set once the run is over: connections closing now are expected.
    stopping: AtomicBool,
    /// Why handshakes failed or connections closed, with counts.
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn reason(&self, why: String) {
        *lock(&self.reasons).entry(why).or_insert(0) += 1;
    }
}

// ---------------------------------------------------------------------------
// /proc

/// Clock ticks per second of /proc/PID/stat: USER_HZ, 100 on every Linux
/// architecture this runs on (reading it needs sysconf, i.e. libc).
const CLK_TCK: f64 = 100.0;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The summed RSS of the server's processes; None without pids or when one is gone.
fn rss_kib_sum(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_kib(p)).sum()
}

/// The summed utime + stime of the server's processes, in seconds.
fn cpu_secs_sum(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

/// CPU seconds of each PostgreSQL process serving `database` (`*`: every
/// postgres process), by pid. Backends name their database in their process
/// title (`postgres: [cluster: ]USER DATABASE HOST(PORT) STATE`), so this needs
/// no database connection of its own, and a backend the pool opens mid-run is
/// found at the next reading.
fn pg_cpu(database: &str) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline);
        let ours = if database == "*" {
            title.starts_with("postgres:") || title.contains("/bin/postgres")
        } else {
            pg_title_names(&title, database)
        };
        if ours {
            if let Some(cpu) = cpu_secs(&pid.to_string()) {
                out.insert(pid, cpu);
            }
        }
    }
    out
}

/// Whether a backend's title `postgres: [cluster: ]USER DATABASE HOST(PORT) …`
/// names `database`.
fn pg_title_names(title: &str, database: &str) -> bool {
    let Some(rest) = title.strip_prefix("postgres: ") else {
        return false;
    };
    // Skip the cluster name (`15/main: `) when there is one.
    let rest = match rest.split_once(": ") {
        Some((cluster, tail)) if !cluster.contains(' ') => tail,
        _ => rest,
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    words.len() >= 3
        && words[1] == database
        && (words[2].contains('(') || words[2].starts_with("[local]"))
}

/// CPU seconds the PostgreSQL processes of `before` and those found now spent
/// between the two readings; a process that appeared since counts from zero
/// (it started in between), one that exited is lost (pools keep theirs).
fn pg_cpu_delta(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, cpu)| (cpu - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// utime + stime in seconds.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// The soft open-files limit, to warn before a run that cannot work.
fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Tokens

struct TokenSource {
    secret: Option<jsonwebtoken::EncodingKey>,
    file: BTreeMap<String, String>,
}

impl TokenSource {
    fn new(args: &Args) -> Result<TokenSource, String> {
        let mut file = BTreeMap::new();
        if let Some(path) = &args.tokens {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let (user, token) = line
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("{}: `{line}` is not `USER TOKEN`", path.display()))?;
                file.insert(user.to_string(), token.trim().to_string());
            }
        }
        Ok(TokenSource {
            secret: args
                .secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| jsonwebtoken::EncodingKey::from_secret(s.as_bytes())),
            file,
        })
    }

    /// A token for `user`, or None when the server is to be reached without one.
    fn token(&self, user: &str) -> Result<Option<String>, String> {
        if let Some(t) = self.file.get(user) {
            return Ok(Some(t.clone()));
        }
        let Some(key) = &self.secret else {
            return if self.file.is_empty() {
                Ok(None)
            } else {
                Err(format!("no token for {user} in the tokens file"))
            };
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = json!({"sub": user, "iat": now, "exp": now + 6 * 3600});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key)
            .map(Some)
            .map_err(|e| format!("signing a token: {e}"))
    }
}

// ---------------------------------------------------------------------------
// Connections

type Ws = WebSocketStream<TcpStream>;

struct Target {
    addr: SocketAddr,
    base: String,
    config: WebSocketConfig,
    connect_timeout: Duration,
}

impl Target {
    fn url(&self, view: &str, token: Option<&str>) -> String {
        match token {
            Some(t) => format!("{}/ws/portal-view/{view}?token={t}", self.base),
            None => format!("{}/ws/portal-view/{view}", self.base),
        }
    }

    /// A viewer's connection on `transport`, with its handshake time in µs.
    async fn viewer(
        &self,
        view: &str,
        token: Option<&str>,
        transport: Transport,
    ) -> Result<(Feed, u64), String> {
        match transport {
            Transport::Ws => {
                let (ws, us) = self.connect(&self.url(view, token)).await?;
                Ok((Feed::Ws(Box::new(ws)), us))
            }
            Transport::Sse => {
                let target = match token {
                    Some(t) => format!("/sse/portal-view/{view}?token={t}"),
                    None => format!("/sse/portal-view/{view}"),
                };
                let start = now_us();
                let sse = tokio::time::timeout(self.connect_timeout, self.sse(&target))
                    .await
                    .map_err(|_| "handshake timed out".to_string())??;
                Ok((Feed::Sse(sse), now_us() - start))
            }
        }
    }

    /// `GET` of an SSE stream, its `200` and its `connected` event.
    async fn sse(&self, target: &str) -> Result<Sse, String> {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_zero_linger();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            self.addr
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let mut sse = Sse {
            stream,
            buf: Vec::with_capacity(self.config.read_buffer_size),
            read_size: self.config.read_buffer_size,
        };
        let head_end = loop {
            if let Some(at) = sse.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if !sse.fill().await? {
                return Err("ended before the response head".into());
            }
        };
        let head = String::from_utf8_lossy(&sse.buf[..head_end]).to_string();
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("refused: {}", short(&head)));
        }
        sse.buf.drain(..head_end);
        match sse.next().await? {
            Some(text) if msg_type(&text) == Some("connected") => Ok(sse),
            Some(text) => Err(format!("first event was not connected: {}", short(&text))),
            None => Err("ended before connected".into()),
        }
    }

    /// TCP connect, upgrade, and the `connected` message. Returns the socket and
    /// the handshake time in µs.
    async fn connect(&self, url: &str) -> Result<(Ws, u64), String> {
        let start = now_us();
        let work = async {
            let socket = if self.addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| format!("socket: {e}"))?;
            let stream = socket
                .connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let _ = stream.set_zero_linger();
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(self.config))
                    .await
                    .map_err(|e| format!("upgrade: {e}"))?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if msg_type(t.as_str()) == Some("connected") {
                            return Ok(ws);
                        }
                        return Err(format!("first message was not connected: {}", short(&t)));
                    }
                    Some(Ok(Message::Close(f))) => {
                        return Err(match f {
                            Some(f) => format!("closed {} {}", u16::from(f.code), f.reason),
                            None => "closed".into(),
                        })
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("reading connected: {e}")),
                    None => return Err("ended before connected".into()),
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(Ok(ws)) => Ok((ws, now_us() - start)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("handshake timed out".into()),
        }
    }
}

/// What a viewer reads deliveries from.
enum Feed {
    Ws(Box<Ws>),
    Sse(Sse),
}

impl Feed {
    /// The next text message; `Err` says why the connection ended.
    async fn next(&mut self) -> Result<String, String> {
        match self {
            Feed::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
                    Some(Ok(Message::Close(f))) => {
                        let why = f
                            .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_default();
                        return Err(format!("closed by server: {why}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("read error: {e}")),
                    None => return Err("connection ended".into()),
                }
            },
            Feed::Sse(sse) => match sse.next().await? {
                Some(text) if msg_type(&text) == Some("closed") => {
                    Err(format!("closed by server: {}", short(&text)))
                }
                Some(text) => Ok(text),
                None => Err("stream ended".into()),
            },
        }
    }
}

/// An SSE stream read line by line: each event's JSON is one `data:` line,
/// so the chunked framing around it (size lines) is skipped unparsed.
struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
    read_size: usize,
}

impl Sse {
    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, String> {
        use tokio::io::AsyncReadExt;
        self.buf.reserve(self.read_size);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| format!("read error: {e}"))?;
        Ok(n > 0)
    }

    /// The next event's data, or `None` at the end of the stream.
    async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            while let Some(eol) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=eol).collect();
                if let Some(data) = line.strip_prefix(b"data:") {
                    let text = String::from_utf8_lossy(data.trim_ascii()).to_string();
                    return Ok(Some(text));
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

fn short(text: &str) -> String {
    text.chars().take(120).collect()
}

/// The value of the top-level `"type"` without parsing the JSON. Every server
/// this drives writes `type` before the payload, so the first match is it.
fn msg_type(text: &str) -> Option<&str> {
    let at = text.find("\"type\":\"")? + 8;
    let len = text[at..].find('"')?;
    Some(&text[at..at + len])
}

/// The unsigned integer after `key` (e.g. `"seq":`), scanning, not parsing.
fn num_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// (seq, t) of an update, or None for other messages.
fn delivery(text: &str, parse: Parse) -> Option<Option<(u64, u64)>> {
    match parse {
        Parse::Scan => {
            let ty = msg_type(text)?;
            if ty != "portal-view-update" && ty != "item-update" {
                return None;
            }
            let seq = num_after(text, "\"seq\":");
            let t = num_after(text, "\"t\":");
            Some(seq.zip(t))
        }
        Parse::Full => {
            let v: Value = serde_json::from_str(text).ok()?;
            let ty = v["type"].as_str()?;
            if ty != "portal-view-update" && ty != "item-update" {
                return None;
            }
            Some(v["payload"]["seq"].as_u64().zip(v["payload"]["t"].as_u64()))
        }
    }
}

/// One viewer: handshake (bounded by `gate`), then read until the run ends.
#[allow(clippy::too_many_arguments)]
async fn viewer(
    target: Arc<Target>,
    view: String,
    token: Option<String>,
    transport: Transport,
    gate: Arc<Semaphore>,
    stats: Arc<Stats>,
    in_view: Arc<AtomicU64>,
    firsts: Arc<Firsts>,
    parse: Parse,
) {
    let permit = gate.acquire_owned().await;
    let mut feed = match target.viewer(&view, token.as_deref(), transport).await {
        Ok((feed, us)) => {
            record(Kind::Handshake, us);
            in_view.fetch_add(1, Relaxed);
            stats.connected.fetch_add(1, Relaxed);
            feed
        }
        Err(e) => {
            stats.connect_failed.fetch_add(1, Relaxed);
            stats.reason(format!("viewer handshake: {e}"));
            return;
        }
    };
    drop(permit);
    let mut last_seq = 0u64;
    loop {
        match feed.next().await {
            Ok(text) => match delivery(&text, parse) {
                Some(Some((seq, sent))) => {
                    let now = now_us();
                    record(Kind::Delivery, now.saturating_sub(sent));
                    if firsts.first(seq) {
                        record(Kind::First, now.saturating_sub(sent));
                    }
                    if seq <= last_seq {
                        stats.out_of_order.fetch_add(1, Relaxed);
                    } else {
                        last_seq = seq;
                    }
                    stats.last_delivery_us.fetch_max(now, Relaxed);
                    stats.received.fetch_add(1, Relaxed);
                }
                Some(None) => {
                    stats.unparsed.fetch_add(1, Relaxed);
                    stats.received.fetch_add(1, Relaxed);
                }
                None => {}
            },
            Err(why) => {
                if !stats.stopping.load(Relaxed) {
                    stats.dropped.fetch_add(1, Relaxed);
                    stats.reason(format!("viewer {why}"));
                }
                return;
            }
        }
    }
}

/// Which updates of a view some viewer has already received, one bit each.
struct Firsts(Vec<AtomicU64>);

impl Firsts {
    fn new(updates: u64) -> Firsts {
        Firsts((0..updates / 64 + 2).map(|_| AtomicU64::new(0)).collect())
    }

    /// True for the first viewer to report `seq`.
    fn first(&self, seq: u64) -> bool {
        let Some(word) = self.0.get((seq / 64) as usize) else {
            return false;
        };
        let bit = 1 << (seq % 64);
        word.load(Relaxed) & bit == 0 && word.fetch_or(bit, Relaxed) & bit == 0
    }
}

struct Plan {
    updates: u64,
    /// Seconds between updates; None for back to back.
    interval: Option<Duration>,
    ids: bool,
    window: usize,
    padding: String,
}

/// Sends one view's updates; with ids, keeps at most `window` unacknowledged
/// and times each ack. Returns how many updates went out.
async fn drive(ws: Ws, plan: Arc<Plan>, stats: Arc<Stats>) -> u64 {
    let (mut sink, mut stream) = ws.split();
    let window = Arc::new(Semaphore::new(plan.window.max(1)));
    let pending: Arc<Mutex<VecDeque<(u64, u64)>>> = Arc::default();
    let reader = {
        let (window, pending, stats) = (window.clone(), pending.clone(), stats.clone());
        tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                let text = match frame {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(f)) => {
                        if !stats.stopping.load(Relaxed) {
                            let why = f
                                .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                                .unwrap_or_default();
                            stats.reason(format!("controller closed by server: {why}"));
                        }
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        if !stats.stopping.load(Relaxed) {
                            stats.reason(format!("controller read error: {e}"));
                        }
                        break;
                    }
                };
                let ty = msg_type(text.as_str());
                let answered = match ty {
                    Some("ack") => true,
                    Some("error") => {
                        stats.error_replies.fetch_add(1, Relaxed);
                        let code = text
                            .as_str()
                            .split("\"code\":\"")
                            .nth(1)
                            .and_then(|s| s.split('"').next())
                            .unwrap_or("?");
                        stats.reason(format!("error reply {code}"));
                        true
                    }
                    _ => false,
                };
                if !answered {
                    continue; // presence events, echoes of other controllers, …
                }
                let Some(id) = num_after(text.as_str(), "\"id\":") else {
                    continue;
                };
                let now = now_us();
                let mut queue = lock(&pending);
                while let Some(&(seq, sent)) = queue.front() {
                    if seq > id {
                        break;
                    }
                    queue.pop_front();
                    if seq == id {
                        if ty == Some("ack") {
                            record(Kind::Ack, now - sent);
                            stats.acks.fetch_add(1, Relaxed);
                            stats.last_ack_us.fetch_max(now, Relaxed);
                        }
                        window.add_permits(1);
                    }
                }
            }
        })
    };
    let mut next = Instant::now();
    let mut sent = 0;
    for seq in 1..=plan.updates {
        if let Some(interval) = plan.interval {
            // A fixed schedule: a late tick sends at once rather than shifting
            // every later update.
            next += interval;
            tokio::time::sleep_until(next.into()).await;
        }
        if plan.ids {
            match window.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        }
        let t = now_us();
        let text = if plan.ids {
            lock(&pending).push_back((seq, t));
            format!(
                r#"{{"type":"portal-view-update","payload":{{"t":{t},"seq":{seq}{}}},"id":{seq}}}"#,
                plan.padding
            )
        } else {
            format!(
                r#"{{"type":"portal-view-update","payload":{{"t":{t},"seq":{seq}{}}}}}"#,
                plan.padding
            )
        };
        if let Err(e) = sink.send(Message::text(text)).await {
            stats.reason(format!("controller send: {e}"));
            break;
        }
        sent += 1;
        stats.sent.fetch_add(1, Relaxed);
    }
    // Keep reading acks until the run ends; the reader holds the other half.
    tokio::spawn(async move {
        let _sink = sink;
        let _ = reader.await;
    });
    sent
}

// ---------------------------------------------------------------------------

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = match runtime.block_on(run(args)) {
        Ok(result) => {
            println!("{result}");
            0
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            1
        }
    };
    // Dropping the runtime would wait on nothing useful; sockets close with the process.
    std::process::exit(code);
}

/// A `ws://host:port` base URL, resolved.
async fn resolve(server: &str) -> Result<(String, SocketAddr), String> {
    let base = server.trim_end_matches('/').to_string();
    let hostport = base
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{server}: servers must be ws://host:port (no TLS here)"))?;
    let addr: SocketAddr = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| format!("resolving {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport} resolves to nothing"))?;
    Ok((base, addr))
}

async fn run(args: Args) -> Result<Value, String> {
    now_us(); // start the clock
    let views = args.views.max(1);
    let controllers = if args.mode == Mode::Fanout { views } else { 0 };
    let sockets = args.viewers + controllers;
    if let Some(limit) = nofile_limit() {
        if limit < sockets as u64 + 64 {
            eprintln!(
                "loadgen: warning: open-files limit {limit} is below {} connections (raise `ulimit -n`)",
                sockets
            );
        }
    }
    let tokens = TokenSource::new(&args)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let connect_timeout = Duration::from_secs_f64(args.connect_timeout);
    let make_target = |(base, addr)| {
        Arc::new(Target {
            addr,
            base,
            config,
            connect_timeout,
        })
    };
    let target = make_target(resolve(&args.server).await?);
    let mut viewer_targets = Vec::new();
    for server in args.viewer_servers.iter().filter(|s| !s.is_empty()) {
        viewer_targets.push(make_target(resolve(server).await?));
    }
    if viewer_targets.is_empty() {
        viewer_targets.push(target.clone());
    }
    let stats = Arc::new(Stats::default());
    let pid = args.server_pid.clone();
    let self_pid = std::process::id().to_string();
    let pg = args.pg_database.clone();
    let pg_reading = || pg.as_deref().map(pg_cpu);

    // Progress, once a second, on stderr.
    let phase: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("connecting"));
    if !args.quiet {
        let (stats, phase) = (stats.clone(), phase.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last_received = 0;
            loop {
                tick.tick().await;
                let received = stats.received.load(Relaxed);
                eprintln!(
                    "[{:6.1}s] {:<10} connected {} failed {} dropped {} | sent {} acks {} | delivered {} ({}/s) out-of-order {}",
                    now_us() as f64 / 1e6,
                    *lock(&phase),
                    stats.connected.load(Relaxed),
                    stats.connect_failed.load(Relaxed),
                    stats.dropped.load(Relaxed),
                    stats.sent.load(Relaxed),
                    stats.acks.load(Relaxed),
                    received,
                    received - last_received,
                    stats.out_of_order.load(Relaxed),
                );
                last_received = received;
            }
        });
    }

    // --- connect
    let rss_before = rss_kib_sum(&pid);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut viewer_urls = Vec::with_capacity(args.viewers);
    for i in 0..args.viewers {
        let user = format!("{}{i}", args.viewer_prefix);
        let view = format!("{}{}", args.view_prefix, i % views);
        viewer_urls.push((view, tokens.token(&user)?));
    }
    let connect_cpu_before = cpu_secs_sum(&pid);
    let connect_pg_before = pg_reading();
    let connect_start = now_us();
    let updates = args
        .updates
        .unwrap_or_else(|| (args.rate * args.duration).round() as u64);
    let firsts: Vec<Arc<Firsts>> = (0..views)
        .map(|_| {
            Arc::new(Firsts::new(if args.mode == Mode::Fanout {
                updates
            } else {
                0
            }))
        })
        .collect();
    let mut tasks = Vec::with_capacity(args.viewers);
    let per_view: Vec<Arc<AtomicU64>> = (0..views).map(|_| Arc::default()).collect();
    for (i, (view, token)) in viewer_urls.into_iter().enumerate() {
        tasks.push(tokio::spawn(viewer(
            viewer_targets[i % viewer_targets.len()].clone(),
            view,
            token,
            args.transport,
            gate.clone(),
            stats.clone(),
            per_view[i % views].clone(),
            firsts[i % views].clone(),
            args.parse,
        )));
    }
    // Handshakes are done when every viewer is connected or has failed.
    while stats.connected.load(Relaxed) + stats.connect_failed.load(Relaxed) < args.viewers as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let connect_end = now_us();
    let connect_cpu_after = cpu_secs_sum(&pid);
    let connect_pg_after = pg_reading();
    let connect_secs = (connect_end - connect_start) as f64 / 1e6;
    let viewers_connected = stats.connected.load(Relaxed);
    let k = args.controller_users.unwrap_or(views).max(1);
    let mut controller_sockets = Vec::with_capacity(controllers);
    for j in 0..controllers {
        let user = format!("{}{}", args.controller_prefix, j % k);
        let view = format!("{}{j}", args.view_prefix);
        let url = target.url(&view, tokens.token(&user)?.as_deref());
        match target.connect(&url).await {
            Ok((ws, _)) => controller_sockets.push(ws),
            Err(e) => return Err(format!("controller {user} on {view}: {e}")),
        }
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_after = rss_kib_sum(&pid);
    let handshakes = merged(Kind::Handshake);
    let mut result = json!({
        "label": args.label,
        "server": args.server,
        "viewer_servers": viewer_targets.iter().map(|t| t.base.clone()).collect::<Vec<_>>(),
        "server_pids": pid,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "viewers": args.viewers,
        "views": views,
        "connect_concurrency": args.connect_concurrency,
        "connected": viewers_connected,
        "connect_failed": stats.connect_failed.load(Relaxed),
        "connect_secs": connect_secs,
        "handshakes_per_sec": viewers_connected as f64 / connect_secs.max(1e-9),
        "handshake_ms": handshakes.summary_ms(),
    });
    if let (Some(a), Some(b)) = (connect_cpu_before, connect_cpu_after) {
        if viewers_connected > 0 {
            result["server_cpu_us_per_handshake"] =
                json!(((b - a) * 1e6 / viewers_connected as f64 * 10.0).round() / 10.0);
        }
    }
    if let (Some(a), Some(b)) = (&connect_pg_before, &connect_pg_after) {
        let secs = pg_cpu_delta(a, b);
        result["pg_database"] = json!(pg);
        result["pg_connect_cpu_secs"] = json!(secs);
        if viewers_connected > 0 {
            result["pg_cpu_us_per_handshake"] =
                json!((secs * 1e6 / viewers_connected as f64 * 10.0).round() / 10.0);
        }
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let conns = (viewers_connected as usize + controller_sockets.len()).max(1);
        result["server_rss_before_kib"] = json!(before);
        result["server_rss_after_kib"] = json!(after);
        result["server_kib_per_conn"] =
            json!(((after as f64 - before as f64) / conns as f64 * 100.0).round() / 100.0);
    }

    if args.mode == Mode::Idle {
        *lock(&phase) = "holding";
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        result["dropped"] = json!(stats.dropped.load(Relaxed));
        finish(&stats, &mut result, tasks);
        return Ok(result);
    }

    // --- send
    let plan = Arc::new(Plan {
        updates,
        interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate)),
        ids: args.ids,
        window: args.window,
        padding: if args.payload_bytes > 0 {
            format!(r#","pad":"{}""#, "x".repeat(args.payload_bytes))
        } else {
            String::new()
        },
    });
    *lock(&phase) = "sending";
    let cpu_before = cpu_secs_sum(&pid);
    let pg_before = pg_reading();
    let self_cpu_before = cpu_secs(&self_pid);
    let send_start = now_us();
    let drivers: Vec<_> = controller_sockets
        .into_iter()
        .map(|ws| tokio::spawn(drive(ws, plan.clone(), stats.clone())))
        .collect();
    let mut sent_total = 0;
    // Every viewer of a view gets each update its controller sent.
    let mut expected = 0;
    for (d, in_view) in drivers.into_iter().zip(&per_view) {
        let sent = d.await.unwrap_or(0);
        sent_total += sent;
        expected += sent * in_view.load(Relaxed);
    }
    let send_end = now_us();
    *lock(&phase) = "draining";
    let deadline = now_us() + (args.drain_timeout * 1e6) as u64;
    while now_us() < deadline {
        let delivered = stats.received.load(Relaxed) >= expected;
        let acked =
            !args.ids || stats.acks.load(Relaxed) + stats.error_replies.load(Relaxed) >= sent_total;
        if delivered && acked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu_after = cpu_secs_sum(&pid);
    let pg_after = pg_reading();
    let self_cpu_after = cpu_secs(&self_pid);
    stats.stopping.store(true, Relaxed);
    let received = stats.received.load(Relaxed);
    let last = stats.last_delivery_us.load(Relaxed).max(send_end);
    let delivery_secs = (last - send_start) as f64 / 1e6;
    result["updates_per_view"] = json!(updates);
    result["rate_per_view"] = json!(args.rate);
    result["sent"] = json!(sent_total);
    result["send_secs"] = json!((send_end - send_start) as f64 / 1e6);
    result["deliveries_expected"] = json!(expected);
    result["deliveries_received"] = json!(received);
    result["deliveries_missing"] = json!(expected.saturating_sub(received));
    result["deliveries_out_of_order"] = json!(stats.out_of_order.load(Relaxed));
    result["deliveries_unparsed"] = json!(stats.unparsed.load(Relaxed));
    result["deliveries_per_sec"] = json!(received as f64 / delivery_secs.max(1e-9));
    result["delivery_ms"] = merged(Kind::Delivery).summary_ms();
    result["first_delivery_ms"] = merged(Kind::First).summary_ms();
    result["dropped"] = json!(stats.dropped.load(Relaxed));
    result["error_replies"] = json!(stats.error_replies.load(Relaxed));
    if args.ids {
        let acks = stats.acks.load(Relaxed);
        let ack_secs = (stats.last_ack_us.load(Relaxed).max(send_start) - send_start) as f64 / 1e6;
        result["window"] = json!(args.window);
        result["acks"] = json!(acks);
        result["acks_per_sec"] = json!(acks as f64 / ack_secs.max(1e-9));
        result["ack_ms"] = merged(Kind::Ack).summary_ms();
    }
    // Per delivery (what a fan-out costs), per update sent and per ack (what
    // the durable path costs, the only figure when nobody watches).
    let per = |secs: f64, count: u64| json!((secs * 1e6 / count as f64 * 1000.0).round() / 1000.0);
    let acks = stats.acks.load(Relaxed);
    let mut costs = |name: &str, secs: f64| {
        result[format!("{name}_cpu_secs")] = json!(secs);
        if received > 0 {
            result[format!("{name}_cpu_us_per_delivery")] = per(secs, received);
        }
        if sent_total > 0 {
            result[format!("{name}_cpu_us_per_update")] = per(secs, sent_total);
        }
        if args.ids && acks > 0 {
            result[format!("{name}_cpu_us_per_ack")] = per(secs, acks);
        }
    };
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        costs("server", b - a);
    }
    if let (Some(a), Some(b)) = (&pg_before, &pg_after) {
        costs("pg", pg_cpu_delta(a, b));
    }
    if let (Some(a), Some(b)) = (self_cpu_before, self_cpu_after) {
        result["loadgen_cpu_secs"] = json!(b - a);
        if received > 0 {
            result["loadgen_cpu_us_per_delivery"] =
                json!(((b - a) * 1e6 / received as f64 * 1000.0).round() / 1000.0);
        }
    }
    finish(&stats, &mut result, tasks);
    Ok(result)
}

/// Records why connections failed or closed, and ends the viewer tasks (their
/// sockets close with RST: see the module doc).
fn finish(stats: &Stats, result: &mut Value, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stats.stopping.store(true, Relaxed);
    result["reasons"] = json!(*lock(&stats.reasons));
    for t in tasks {
        t.abort();
    }
}

//! Measures what a view at `--max-state-bytes` costs the other views: one
//! EDITOR sends 60 KB item-updates at the rate limit to a view whose state is
//! at the cap (default 512 KiB), while another controller's small changes on
//! an unrelated view are timed from send to ack, and a viewer's handshake on
//! that unrelated view from connect to `connected`. Everything runs in this
//! process, on a temp database with the server's defaults (`--sqlite-synchronous
//! full`).
//!
//!     cargo run --release --example state_cap -- --seconds 10
//!
//! Three phases: no load; the EDITOR replacing items of the same size (every
//! change is stored: the writer parses, sizes, serializes and writes the
//! whole view each batch); the EDITOR adding items (every change is refused
//! as `state too large`: parsed and sized, not written).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::Tokens;
use portal_sync::Config;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Seconds each phase runs
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The EDITOR's item-updates per second (the default rate limit is 100)
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Bytes of each item-update's text
    #[arg(long, default_value_t = 60_000)]
    item_bytes: usize,
}

const SECRET: &str = "state-cap-secret";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Clone, Copy, PartialEq)]
enum Load {
    None,
    Stored,
    Refused,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state-cap.db");
    let config = Config::new(&path, SECRET);
    let cap = config.max_state_bytes;
    let db = portal_sync::engines::open(&path, config.sqlite_synchronous)?;
    {
        let admin = db.admin();
        for user in ["boss", "ed", "viewer"] {
            admin.add_user(user, &format!("{user}@x"), user)?;
        }
        admin.add_library("lib", "lib", "boss")?;
        admin.set_member("lib", "ed", LibraryRole::Editor)?;
        admin.set_member("lib", "viewer", LibraryRole::Viewer)?;
        admin.add_view("big", "lib", "big", &full_state(cap, args.item_bytes))?;
        admin.add_view("other", "lib", "other", &Map::new())?;
        let len = db.view("big")?.map_or(0, |v| v.state.get().len());
        println!("view big: {len} bytes stored, cap {cap}");
    }
    drop(db);
    let listener = portal_sync::http::server::bind("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = portal_sync::http::server::run(listener, config, async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(server);
    let tokens = Tokens::new(SECRET.as_bytes(), 0);
    let url = |view: &str, user: &str| -> Result<String, portal_sync::Error> {
        Ok(format!(
            "ws://{addr}/ws/portal-view/{view}?token={}",
            tokens.issue(user, 3600)?
        ))
    };
    // A viewer of the big view reads every broadcast, as a room would.
    let (mut big_viewer, _) = tokio_tungstenite::connect_async(url("big", "viewer")?).await?;
    tokio::spawn(async move { while let Some(Ok(_)) = big_viewer.next().await {} });

    for (name, load) in [
        ("no load", Load::None),
        ("60 KB item-updates, each stored", Load::Stored),
        ("60 KB item-updates, each refused", Load::Refused),
    ] {
        let answers = Arc::new(Answers::default());
        let editor = if load == Load::None {
            None
        } else {
            let (ws, _) = tokio_tungstenite::connect_async(url("big", "ed")?).await?;
            let answers = answers.clone();
            Some(tokio::spawn(drive(
                ws,
                load,
                args.rate,
                args.item_bytes,
                answers,
            )))
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (other, _) = tokio_tungstenite::connect_async(url("other", "boss")?).await?;
        let phase = Duration::from_secs(args.seconds);
        let acks = tokio::spawn(time_acks(other, phase));
        let mut handshakes = Vec::new();
        let until = Instant::now() + phase;
        while Instant::now() < until {
            let started = Instant::now();
            let (mut ws, _) = tokio_tungstenite::connect_async(url("other", "viewer")?).await?;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.to_text().is_ok_and(|t| t.contains("\"connected\"")) {
                    break;
                }
            }
            handshakes.push(started.elapsed());
            let _ = ws.close(None).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let acks = acks.await?.map_err(|e| e.to_string())?;
        let editor = match editor {
            Some(task) => {
                task.abort();
                match task.await {
                    Err(e) if e.is_cancelled() => String::new(),
                    Err(e) => format!(" (editor: {e})"),
                    Ok(Err(e)) => format!(" (editor: {e})"),
                    Ok(Ok(())) => String::new(),
                }
            }
            None => String::new(),
        };
        println!(
            "{name}:{editor} editor got {} acks, {} errors",
            answers.acks.load(Ordering::Relaxed),
            answers.errors.load(Ordering::Relaxed)
        );
        println!("  ack on the other view: {}", summary(acks));
        println!("  handshake on the other view: {}", summary(handshakes));
    }
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}

/// Items of `item_bytes` and a pad, as close under `cap` as they go.
fn full_state(cap: usize, item_bytes: usize) -> Map<String, Value> {
    let mut items = Map::new();
    let mut state = Map::new();
    let mut i = 0;
    loop {
        items.insert(format!("i{i}"), json!({"t": "a".repeat(item_bytes)}));
        state.insert("items".into(), Value::Object(items.clone()));
        if serde_json::to_string(&state).map_or(0, |s| s.len()) + 9 > cap {
            items.remove(&format!("i{i}"));
            state.insert("items".into(), Value::Object(items.clone()));
            break;
        }
        i += 1;
    }
    let len = serde_json::to_string(&state).map_or(0, |s| s.len());
    // `,"pad":"…"` is 9 bytes plus the pad.
    state.insert("pad".into(), json!("p".repeat(cap - len - 9 - 16)));
    state
}

/// What the EDITOR was answered during a phase.
#[derive(Default)]
struct Answers {
    acks: AtomicU64,
    errors: AtomicU64,
}

/// The EDITOR: an item-update every 1/rate s, its answers read and counted.
async fn drive(
    ws: Ws,
    load: Load,
    rate: u64,
    item_bytes: usize,
    answers: Arc<Answers>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            let Ok(text) = msg.to_text() else { continue };
            if text.contains("\"ack\"") {
                answers.acks.fetch_add(1, Ordering::Relaxed);
            } else if text.contains("\"error\"")
                && answers.errors.fetch_add(1, Ordering::Relaxed) == 0
            {
                println!("  first refusal: {}", &text[..text.len().min(160)]);
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        let letter = char::from(b'b' + (n % 20) as u8);
        let item_id = match load {
            Load::Refused => format!("new{n}"),
            _ => format!("i{}", n % 8),
        };
        let msg = json!({
            "type": "item-update",
            "payload": {"itemId": item_id, "t": letter.to_string().repeat(item_bytes)},
            "id": n,
        });
        tx.send(Message::text(msg.to_string())).await?;
        n += 1;
    }
}

/// Small changes on the unrelated view, one at a time, every 20 ms: the
/// time from send to ack of each.
async fn time_acks(
    mut ws: Ws,
    phase: Duration,
) -> Result<Vec<Duration>, Box<dyn std::error::Error + Send + Sync>> {
    let mut times = Vec::new();
    let until = Instant::now() + phase;
    let mut n = 0u64;
    while Instant::now() < until {
        let started = Instant::now();
        let msg = json!({"type": "portal-view-update", "payload": {"n": n}, "id": n});
        ws.send(Message::text(msg.to_string())).await?;
        loop {
            let Some(frame) = ws.next().await else {
                return Err("the other view's socket closed".into());
            };
            if frame?.to_text().is_ok_and(|t| t.contains("\"ack\"")) {
                break;
            }
        }
        times.push(started.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(times)
}

/// Ends the EDITOR's reader with the EDITOR.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn summary(mut times: Vec<Duration>) -> String {
    if times.is_empty() {
        return "no samples".into();
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "n={} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        times.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(at(1.0))
    )
}

//! Measures broadcast latency (controller send → viewer receive) on one node
//! and on two nodes fanning out through Redis, with the viewers split across
//! the nodes. Everything runs in this process on a temp database.
//!
//!     PORTAL_REDIS_URL=redis://127.0.0.1:6379 cargo run --release --example fanout -- --viewers 200 --updates 500
//!
//! Without `PORTAL_REDIS_URL` only the single-node case runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use portal_sync::config::Synchronous;
use portal_sync::domain::access::LibraryRole;
use portal_sync::protocol::auth::Tokens;
use portal_sync::Config;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Viewers (split evenly across the nodes)
    #[arg(long, default_value_t = 200)]
    viewers: usize,
    /// Updates the controller sends
    #[arg(long, default_value_t = 500)]
    updates: usize,
    /// Updates per second
    #[arg(long, default_value_t = 200)]
    rate: u64,
}

const SECRET: &str = "fanout-secret";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let redis = std::env::var("PORTAL_REDIS_URL").ok();
    println!(
        "{} viewers, {} updates at {}/s",
        args.viewers, args.updates, args.rate
    );
    run(&args, 1, None).await?;
    match redis {
        Some(url) => run(&args, 2, Some(url)).await?,
        None => println!("PORTAL_REDIS_URL unset: skipping the two-node case"),
    }
    Ok(())
}

async fn run(
    args: &Args,
    nodes: usize,
    redis: Option<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fanout.db");
    let db = portal_sync::engines::open(&path, Synchronous::Normal)?;
    {
        let admin = db.admin();
        admin.add_user("boss", "boss@x", "boss")?;
        admin.add_library("lib", "lib", "boss")?;
        for i in 0..args.viewers {
            let id = format!("v{i}");
            admin.add_user(&id, &format!("{id}@x"), &id)?;
            admin.set_member("lib", &id, LibraryRole::Viewer)?;
        }
        admin.add_view("pv", "lib", "pv", &serde_json::Map::new())?;
    }
    let prefix = format!("portal-sync-fanout-{}", now_us());
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..nodes {
        let mut config = Config::new(&path, SECRET);
        config.sqlite_synchronous = Synchronous::Normal;
        config.redis_url = redis.clone();
        config.redis_prefix = prefix.clone();
        // The controller sends faster than SPEC's default per-connection rate.
        config.rate_per_sec = 100_000.0;
        config.rate_burst = 100_000;
        let listener = portal_sync::http::server::bind("127.0.0.1:0".parse()?)?;
        addrs.push(listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(portal_sync::http::server::run(
            listener,
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        stops.push(stop);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tokens = Tokens::new(SECRET.as_bytes(), 0);
    let url = |node: usize, user: &str| -> String {
        format!(
            "ws://{}/ws/portal-view/pv?token={}",
            addrs[node % addrs.len()],
            tokens.issue(user, 3600).unwrap_or_default()
        )
    };
    let mut readers = Vec::new();
    for i in 0..args.viewers {
        let (mut ws, _) = tokio_tungstenite::connect_async(url(i, &format!("v{i}"))).await?;
        ws.next().await; // connected
        let updates = args.updates;
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(updates);
            while latencies.len() < updates {
                let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                let Ok(Some(Ok(Message::Text(text)))) = next else {
                    break;
                };
                let msg: serde_json::Value =
                    serde_json::from_str(text.as_str()).unwrap_or_default();
                if let Some(sent) = msg["payload"]["t"].as_u64() {
                    latencies.push(now_us().saturating_sub(sent));
                }
            }
            latencies
        }));
    }
    let (mut controller, _) = tokio_tungstenite::connect_async(url(0, "boss")).await?;
    controller.next().await;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate.max(1)));
    for _ in 0..args.updates {
        tick.tick().await;
        let msg = format!(
            r#"{{"type":"portal-view-update","payload":{{"t":{}}}}}"#,
            now_us()
        );
        controller.send(Message::text(msg)).await?;
    }
    let mut all = Vec::new();
    for reader in readers {
        all.extend(reader.await?);
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|us| *us as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    println!(
        "{nodes} node(s): {} deliveries (expected {}); latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        all.len(),
        args.viewers * args.updates,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    for stop in stops {
        let _ = stop.send(());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

//! A controller: sends state changes to a portal view and prints the replies.
//!
//! From flags (each `--set key=value` becomes one merge patch; values are JSON,
//! or plain strings when they are not JSON):
//!
//!     cargo run --example controller -- --token "$TOKEN" --set currentItem=2 --set visible=true
//!
//! From stdin, one line per message: a JSON message is sent as it is, and
//! `key=value` pairs (space separated) are sent as a `portal-view-update`:
//!
//!     cargo run --example controller -- --token "$TOKEN"
//!     currentItem=3
//!     {"type":"item-update","payload":{"itemId":"3","title":"Edited"}}
//!
//! Every message gets an `id`, and the program waits for each one's `ack` (or
//! `error`) before the next, so what it prints is what the server stored.

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Parser)]
struct Args {
    /// Server base URL
    #[arg(long, default_value = "ws://127.0.0.1:3000")]
    server: String,
    /// Portal view id
    #[arg(long, default_value = "demo")]
    view: String,
    /// JWT of an OWNER or EDITOR (see `portal-sync token`)
    #[arg(long, env = "PORTAL_TOKEN", hide_env_values = true)]
    token: String,
    /// key=value to merge into the state; repeat for several. Without any,
    /// messages are read from stdin.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let url = format!(
        "{}/ws/portal-view/{}?token={}",
        args.server.trim_end_matches('/'),
        args.view,
        args.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let connected = next_json(&mut ws).await?;
    println!("{connected}");
    if connected["type"] != "connected" {
        return Err("not connected".into());
    }
    let mut next_id = 1u64;
    if !args.set.is_empty() {
        let patch = pairs_to_patch(args.set.iter().map(String::as_str))?;
        send_and_wait(&mut ws, update(patch), &mut next_id).await?;
        ws.close(None).await?;
        return Ok(());
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let message = if line.starts_with('{') {
            serde_json::from_str(line)?
        } else {
            update(pairs_to_patch(line.split_whitespace())?)
        };
        send_and_wait(&mut ws, message, &mut next_id).await?;
    }
    ws.close(None).await?;
    Ok(())
}

fn update(patch: Map<String, Value>) -> Value {
    json!({"type": "portal-view-update", "payload": patch})
}

fn pairs_to_patch<'a>(pairs: impl Iterator<Item = &'a str>) -> Result<Map<String, Value>, String> {
    let mut patch = Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        patch.insert(key.to_string(), value);
    }
    Ok(patch)
}

/// Sends `message` with a fresh id and prints everything up to its answer.
async fn send_and_wait(
    ws: &mut Socket,
    mut message: Value,
    next_id: &mut u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let id = *next_id;
    *next_id += 1;
    message["id"] = json!(id);
    ws.send(Message::text(message.to_string())).await?;
    loop {
        let reply = next_json(ws).await?;
        println!("{reply}");
        let answers_us = reply["id"] == json!(id);
        if answers_us
            && matches!(
                reply["type"].as_str(),
                Some("ack" | "error" | "pong" | "sync-response")
            )
        {
            return Ok(());
        }
    }
}

async fn next_json(ws: &mut Socket) -> Result<Value, Box<dyn std::error::Error>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str())?),
            Some(Ok(Message::Close(frame))) => {
                let why = frame
                    .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_default();
                return Err(format!("server closed the connection: {why}").into());
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("connection ended".into()),
        }
    }
}

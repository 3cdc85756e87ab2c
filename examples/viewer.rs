//! A viewer: connects to a portal view and prints every message it receives,
//! one JSON document per line, until the server closes the socket.
//!
//!     cargo run --example viewer -- --server ws://127.0.0.1:3000 --view demo --token "$TOKEN"
//!
//! `--sync` sends a `request-sync` after connecting (answered by a controller, or
//! by the server itself when none is online).

use clap::Parser;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Server base URL
    #[arg(long, default_value = "ws://127.0.0.1:3000")]
    server: String,
    /// Portal view id
    #[arg(long, default_value = "demo")]
    view: String,
    /// JWT (see `portal-sync token`)
    #[arg(long, env = "PORTAL_TOKEN", hide_env_values = true)]
    token: String,
    /// Ask for the current state after connecting
    #[arg(long)]
    sync: bool,
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
    if args.sync {
        ws.send(Message::text(r#"{"type":"request-sync","id":"sync"}"#))
            .await?;
    }
    while let Some(frame) = ws.next().await {
        match frame? {
            Message::Text(text) => println!("{text}"),
            Message::Close(frame) => {
                match frame {
                    Some(f) => eprintln!("closed: {} {}", u16::from(f.code), f.reason),
                    None => eprintln!("closed"),
                }
                break;
            }
            _ => {}
        }
    }
    Ok(())
}

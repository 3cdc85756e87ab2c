//! Frame floods and the close that must reach a peer still sending (SPEC §3.1:
//! control and continuation frames count against the rate, a message has at
//! most 1024 frames; §5: a flood is closed 1008 `rate limit exceeded`).
//!
//! Clients here are raw TCP: one task writes masked frames as fast as it can
//! (bounded in count and time) while the test reads the server's frames off
//! the other half, so the server closes a connection whose peer is still
//! sending. The client must read the close frame itself: a server that drops
//! the socket with the peer's bytes unread sends a reset, and the close frame
//! is lost (the peer sees 1006).

mod common;
use common::frames::*;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A flood stops by itself after this long, whatever happens.
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// Frames written per `write_all` of a flood.
const BATCH: usize = 64;

// ---------------------------------------------------------------------------
// Client frames (masked, RFC 6455 §5.2)

/// One text message in `n` frames: `head`, `n - 2` empty continuations, `tail`.
fn fragmented(head: &str, n: usize, tail: &str) -> Vec<u8> {
    let mut out = text_start(head);
    for _ in 0..n - 2 {
        out.extend(cont(""));
    }
    out.extend(cont_fin(tail));
    out
}

// ---------------------------------------------------------------------------
// A raw client: the read half parses the server's (unmasked) frames

/// What the server sent next.
#[derive(Debug)]
enum Event {
    Text(String),
    Ping,
    Pong(Vec<u8>),
    Close(u16, String),
    /// The connection ended (EOF, or an error such as a reset) without a close
    /// frame in front of it.
    End(String),
}

struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Reader {
    /// Reads until `buf` has at least `n` bytes; the error says why not.
    async fn fill(&mut self, n: usize) -> Result<(), String> {
        let mut chunk = [0u8; 8192];
        while self.buf.len() < n {
            match self.half.read(&mut chunk).await {
                Ok(0) => return Err("end of stream".into()),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) => return Err(format!("{e} ({:?})", e.kind())),
            }
        }
        Ok(())
    }

    async fn next_untimed(&mut self) -> Event {
        if let Err(e) = self.fill(2).await {
            return Event::End(e);
        }
        let opcode = self.buf[0] & 0x0f;
        let (len, head) = match self.buf[1] & 0x7f {
            126 => {
                if let Err(e) = self.fill(4).await {
                    return Event::End(e);
                }
                (
                    usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    4,
                )
            }
            127 => {
                if let Err(e) = self.fill(10).await {
                    return Event::End(e);
                }
                let mut len = [0u8; 8];
                len.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(len) as usize, 10)
            }
            len => (usize::from(len), 2),
        };
        assert_eq!(self.buf[0] & 0x80, 0x80, "the server does not fragment");
        assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
        if let Err(e) = self.fill(head + len).await {
            return Event::End(e);
        }
        let payload: Vec<u8> = self.buf.drain(..head + len).skip(head).collect();
        match opcode {
            0x1 => Event::Text(String::from_utf8(payload).expect("UTF-8 text")),
            0x8 => {
                assert!(payload.len() >= 2, "a close frame with a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason");
                Event::Close(code, reason)
            }
            0x9 => Event::Ping,
            0xa => Event::Pong(payload),
            other => panic!("unexpected opcode {other:#x} from the server"),
        }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.next_untimed())
            .await
            .expect("the server sends something in time")
    }

    /// The next text message as JSON.
    async fn json(&mut self) -> Value {
        match self.next().await {
            Event::Text(t) => serde_json::from_str(&t).expect("JSON"),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Skips messages, pongs and pings until the close frame; a connection
    /// that ends first fails the test with what the client saw instead.
    async fn close(&mut self, context: &dyn Fn() -> String) -> (u16, String) {
        loop {
            match self.next().await {
                Event::Close(code, reason) => return (code, reason),
                Event::End(why) => panic!(
                    "the connection ended without a close frame ({why}): the client sees \
                     1006; {}",
                    context()
                ),
                _ => continue,
            }
        }
    }

    /// Reads until the server ends the connection.
    async fn end(&mut self) {
        let limit = Duration::from_secs(8);
        let ended = tokio::time::timeout(limit, async {
            loop {
                if let Event::End(_) = self.next_untimed().await {
                    return;
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the server kept the connection past {limit:?}"
        );
    }
}

/// A WebSocket for `user` on `view`, opened by hand, with `connected` read.
async fn open(app: &TestApp, view: &str, user: &str) -> (Reader, OwnedWriteHalf) {
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /ws/portal-view/{view}?token={} HTTP/1.1\r\nHost: localhost\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.token(user)
    );
    stream.write_all(request.as_bytes()).await.expect("upgrade");
    let (half, writer) = stream.into_split();
    let mut reader = Reader {
        half,
        buf: Vec::new(),
    };
    let head_end = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(i) = reader.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
            let more = reader.buf.len() + 1;
            reader.fill(more).await.expect("an upgrade answer");
        }
    })
    .await
    .expect("the upgrade is answered in time");
    let head = String::from_utf8_lossy(&reader.buf[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    reader.buf.drain(..head_end);
    let connected = reader.json().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["userId"], user, "{connected}");
    (reader, writer)
}

// ---------------------------------------------------------------------------
// Floods

/// A task writing `first` with a batch of `frame`s behind it (so the server
/// always has more coming when `first` trips its close), then batches of
/// `frame`, until told to stop, a write fails, `max_frames` are out, or
/// [`FLOOD_TIME`] passes.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    task: JoinHandle<(OwnedWriteHalf, Option<String>)>,
}

impl Flood {
    fn start(mut writer: OwnedWriteHalf, first: Vec<u8>, frame: Vec<u8>, max_frames: u64) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let batch = frame.repeat(BATCH);
        let task = tokio::spawn({
            let (stop, sent, running) = (stop.clone(), sent.clone(), running.clone());
            async move {
                let started = Instant::now();
                let mut next = [first, batch.clone()].concat();
                let mut failed = None;
                while failed.is_none()
                    && !stop.load(Ordering::Relaxed)
                    && sent.load(Ordering::Relaxed) < max_frames
                    && started.elapsed() < FLOOD_TIME
                {
                    match writer.write_all(&next).await {
                        Ok(()) => {
                            sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                        }
                        Err(e) => failed = Some(format!("{e} ({:?})", e.kind())),
                    }
                    if next.len() != batch.len() {
                        next = batch.clone();
                    }
                }
                running.store(false, Ordering::Relaxed);
                (writer, failed)
            }
        });
        Flood {
            stop,
            sent,
            running,
            task,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Stops the flood; returns the write half, the frames sent (besides
    /// the first) and the write error, if any.
    async fn stop(self) -> (OwnedWriteHalf, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (writer, failed) = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the flood stops")
            .expect("flood task");
        (writer, self.sent.load(Ordering::Relaxed), failed)
    }
}

/// Floods a fresh connection of `user` on pv1 with `first`, then `frame` (at
/// most `max_frames` of them), and asserts that the client, still sending,
/// reads the close frame `code` `reason`; that it had sent more than the
/// `trips` frames after which the server had to close; that the server then
/// ends the connection; and that it serves a new client at once.
async fn flood_is_closed(
    app: &TestApp,
    user: &str,
    (first, frame): (Vec<u8>, Vec<u8>),
    max_frames: u64,
    trips: u64,
    (code, reason): (u16, &str),
) {
    let (mut reader, writer) = open(app, "pv1", user).await;
    let flood = Flood::start(writer, first, frame, max_frames);
    let context = || {
        format!(
            "the client had sent {} frames and was {}",
            flood.sent(),
            if flood.running() {
                "still sending"
            } else {
                "done"
            }
        )
    };
    let (got_code, got_reason) = reader.close(&context).await;
    let running = flood.running();
    eprintln!("closed {got_code} {got_reason:?}; {}", context());
    assert_eq!(
        (got_code, got_reason.as_str()),
        (code, reason),
        "close code and reason"
    );
    assert!(
        running,
        "the client was still sending when it read the close"
    );
    let (mut writer, sent, failed) = flood.stop().await;
    assert_eq!(
        failed, None,
        "the server did not reset the connection under the flood"
    );
    assert!(
        sent > trips,
        "the client sent only {sent} frames, not past the {trips} that trip the close"
    );
    // Answer the close (the server stops discarding at once) and see the end.
    let _ = writer.write_all(&close_frame(code, b"")).await;
    reader.end().await;
    drop(writer);
    // Nothing keeps burning: the socket is gone and a new client is served.
    wait_connections(app, 0).await;
    let mut fresh = app.connect("pv1", "v2").await;
    fresh.assert_alive().await;
}

/// A small rate: burst 10, then 10 × 10 refusals, so a flood trips after ~111
/// frames (plus what 50/s refills meanwhile).
fn small_rate(c: &mut portal_sync::Config) {
    c.rate_per_sec = 50.0;
    c.rate_burst = 10;
}

const SMALL_RATE_TRIPS: u64 = 111;

// Flood bounds: each stays under the 16 MiB the server reads after its close
// (so a flood that ends cannot be the cause of a reset), and is large enough
// to still be under way when the close is read.
/// 7 bytes a frame: 7 MB.
const PING_FLOOD_FRAMES: u64 = 1_000_000;
/// 6 bytes a frame: 9 MB.
const CONT_FLOOD_FRAMES: u64 = 1_500_000;
/// 21 bytes a frame: 10.5 MB.
const TEXT_FLOOD_FRAMES: u64 = 500_000;

// ---------------------------------------------------------------------------
// The tests

/// SPEC §3.1: ping frames count against the rate. A client pinging as fast as
/// it can is closed 1008 `rate limit exceeded`, and reads that close while it
/// is still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_frame_flood_is_closed_1008_and_the_client_reads_the_close() {
    let app = spawn_app_with(small_rate).await;
    flood_is_closed(
        &app,
        "v1",
        (Vec::new(), ping_frame(b"p")),
        PING_FLOOD_FRAMES,
        SMALL_RATE_TRIPS,
        (1008, "rate limit exceeded"),
    )
    .await;
}

/// The same for unsolicited pong frames (nothing answers them, so nothing
/// else would ever stop them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pong_frame_flood_is_closed_1008_and_the_client_reads_the_close() {
    let app = spawn_app_with(small_rate).await;
    flood_is_closed(
        &app,
        "v1",
        (Vec::new(), pong_frame(b"")),
        PING_FLOOD_FRAMES,
        SMALL_RATE_TRIPS,
        (1008, "rate limit exceeded"),
    )
    .await;
}

/// A text frame without FIN, then empty continuation frames that never end
/// the message. With a rate that allows them all, the 1025th frame of the
/// message closes 1009 `message too big`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_continuation_flood_is_closed_1009_after_1024_frames() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 1_000_000.0;
        c.rate_burst = 1_000_000;
    })
    .await;
    flood_is_closed(
        &app,
        "v1",
        (text_start(r#"{"type":"ping""#), cont("")),
        CONT_FLOOD_FRAMES,
        1024,
        (1009, "message too big"),
    )
    .await;
}

/// The same flood with a small rate: the continuation frames are charged, and
/// the rate trips before the 1024-frame limit: 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_continuation_flood_with_a_small_rate_is_closed_1008() {
    let app = spawn_app_with(small_rate).await;
    flood_is_closed(
        &app,
        "v1",
        (text_start(r#"{"type":"ping""#), cont("")),
        CONT_FLOOD_FRAMES,
        SMALL_RATE_TRIPS,
        (1008, "rate limit exceeded"),
    )
    .await;
}

/// Item 6: a fragmented message over `--max-message-bytes` from a client that
/// keeps sending fragments gets its 1009 `message too big`, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fragmented_message_from_a_client_still_sending_gets_1009() {
    let app = spawn_app().await;
    let fragment = "x".repeat(8192);
    flood_is_closed(
        &app,
        "v1",
        (text_start(r#"{"type":"ping","pad":""#), cont(&fragment)),
        // 8 MB in all: under what the server reads after its close.
        1_024,
        65_536 / 8192,
        (1009, "message too big"),
    )
    .await;
}

/// Item 6: a text-message flood is answered `RATE_LIMITED`, then closed 1008
/// `rate limit exceeded`, and the client, still sending, reads the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_message_flood_from_a_client_still_sending_gets_1008() {
    let app = spawn_app_with(small_rate).await;
    flood_is_closed(
        &app,
        "v1",
        (Vec::new(), text(r#"{"type":"ping"}"#)),
        TEXT_FLOOD_FRAMES,
        SMALL_RATE_TRIPS,
        (1008, "rate limit exceeded"),
    )
    .await;
}

/// SPEC §3.1: a message may have at most 1024 frames. Exactly 1024 is a
/// message like any other (acked, stored); 1025 closes 1009.
#[tokio::test]
async fn a_message_of_1024_frames_is_accepted_and_1025_frames_close_1009() {
    // 1023 continuation frames are charged: a burst that covers them.
    let app = spawn_app_with(|c| c.rate_burst = 5_000).await;
    let (mut reader, mut writer) = open(&app, "pv1", "owner").await;
    let message = fragmented(
        r#"{"type":"portal-view-update","payload":{"frames":1024},"id":"f1024""#,
        1024,
        "}",
    );
    writer.write_all(&message).await.expect("write");
    loop {
        let reply = reader.json().await;
        if reply["type"] == "presence" {
            continue;
        }
        assert_eq!(reply, json!({"type": "ack", "id": "f1024", "version": 1}));
        break;
    }
    assert_eq!(app.stored_state("pv1"), json!({"frames": 1024}));
    assert_eq!(app.stored("pv1").version, 1);

    let message = fragmented(
        r#"{"type":"portal-view-update","payload":{"frames":1025},"id":"f1025""#,
        1025,
        "}",
    );
    writer.write_all(&message).await.expect("write");
    let (code, reason) = reader.close(&|| "after a 1025-frame message".into()).await;
    assert_eq!((code, reason.as_str()), (1009, "message too big"));
    assert_eq!(app.stored("pv1").version, 1, "nothing of it was applied");
    let _ = writer.write_all(&close_frame(1009, b"")).await;
    reader.end().await;
}

/// A ping frame over the rate is refused like a message, but has no `id` to
/// answer: it gets no pong at all. Within the rate pings are answered.
#[tokio::test]
async fn a_ping_frame_over_the_rate_gets_no_pong() {
    let app = spawn_app_with(|c| {
        c.rate_per_sec = 0.0;
        c.rate_burst = 3;
    })
    .await;
    let (mut reader, mut writer) = open(&app, "pv1", "v1").await;
    let mut bytes = Vec::new();
    for payload in [b"p1", b"p2", b"p3", b"p4", b"p5"] {
        bytes.extend(ping_frame(payload));
    }
    // The bucket is empty now: this message is refused with an answer.
    bytes.extend(text(r#"{"type":"ping","id":"after"}"#));
    bytes.extend(close_frame(1000, b""));
    writer.write_all(&bytes).await.expect("write");
    let mut pongs = Vec::new();
    let mut texts = Vec::new();
    loop {
        match reader.next().await {
            Event::Pong(payload) => pongs.push(String::from_utf8(payload).expect("payload")),
            Event::Text(t) => texts.push(serde_json::from_str::<Value>(&t).expect("JSON")),
            Event::Ping => {}
            Event::Close(code, _) => {
                assert_eq!(code, 1000, "our close echoed");
                break;
            }
            Event::End(why) => panic!("the connection ended without a close frame ({why})"),
        }
    }
    reader.end().await;
    // tungstenite may answer only the latest of pings it read together, so
    // not every allowed ping need have its own pong; the last one does.
    assert!(
        pongs
            .iter()
            .all(|p| ["p1", "p2", "p3"].contains(&p.as_str())),
        "only pings within the rate are answered: {pongs:?}"
    );
    assert_eq!(pongs.last().map(String::as_str), Some("p3"), "{pongs:?}");
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["code"], "RATE_LIMITED", "{texts:?}");
    assert_eq!(texts[0]["id"], "after", "{texts:?}");
}

/// Item 6 for the violations tungstenite finds itself: a text frame that is
/// not UTF-8, then more messages, gets its 1007.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_from_a_client_still_sending_gets_1007() {
    let app = spawn_app().await;
    flood_is_closed(
        &app,
        "v1",
        (
            frame(0x81, b"{\"type\":\"\xff\"}"),
            text(r#"{"type":"ping"}"#),
        ),
        TEXT_FLOOD_FRAMES,
        0,
        (1007, "invalid utf-8"),
    )
    .await;
}

/// The same for a protocol error (a continuation with nothing to continue):
/// 1002 `protocol error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_from_a_client_still_sending_gets_1002() {
    let app = spawn_app().await;
    flood_is_closed(
        &app,
        "v1",
        (cont_fin(r#"{"type":"ping"}"#), text(r#"{"type":"ping"}"#)),
        TEXT_FLOOD_FRAMES,
        0,
        (1002, "protocol error"),
    )
    .await;
}

/// A session the server closes leaves the room (presence, the connection
/// limits) as its close frame goes out, not when the close linger ends: a
/// viewer closed 1003 that never answers the close is `left` for the
/// controller while the server still holds, and reads, its socket.
#[tokio::test]
async fn a_closed_session_leaves_presence_before_its_close_linger_ends() {
    let app = spawn_app().await;
    let mut controller = app.connect("pv1", "owner").await;
    let (mut reader, mut writer) = open(&app, "pv1", "v1").await;
    let joined = controller.recv_type("presence").await;
    assert_eq!(
        joined["joined"],
        json!([{"userId": "v1", "role": "viewer"}])
    );
    writer
        .write_all(&frame(0x82, b"binary"))
        .await
        .expect("write");
    let (code, reason) = reader.close(&|| "a binary frame".into()).await;
    assert_eq!((code, reason.as_str()), (1003, "unsupported data"));
    // We neither answer the close nor end the connection: the server lingers.
    let left = controller.recv_type("presence").await;
    assert_eq!(left["left"], json!([{"userId": "v1", "role": "viewer"}]));
    assert_eq!(left["presence"]["connections"], 1, "{left}");
    // The linger is still on: the server still takes what we send. (Once it
    // has closed, the first write draws a reset and the next one fails.)
    for _ in 0..3 {
        writer
            .write_all(&ping_frame(b""))
            .await
            .expect("the server still reads during its close linger");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.end().await;
}

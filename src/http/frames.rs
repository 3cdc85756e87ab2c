//! The client's WebSocket frame headers, read as the bytes pass from the socket
//! to tungstenite: SPEC §3.1's charge for control and continuation frames, its
//! 1024 frames per message, and the close linger that reads what the peer still
//! sends so that our close frame is not lost to a TCP reset.
//!
//! tungstenite reassembles fragments and answers pings by itself, so the session
//! never sees those frames; this layer does, for a few byte operations per frame
//! header. Payloads are skipped, never copied or unmasked, and nothing is
//! allocated per frame. The write side is passed through untouched: writes are
//! the server's hot path.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::core::session::{lock, RateLimit, Verdict};

/// SPEC §3.1: a message may have at most this many frames (more: 1009).
pub const MAX_FRAMES_PER_MESSAGE: u32 = 1024;

/// Reads in a row that may all be refused control frames before the task
/// yields: a flood cannot keep one `poll_read` busy for long.
const READS_PER_POLL: usize = 16;

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xa;

/// Where the parser is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The first header byte: FIN, RSV, opcode.
    Start,
    /// The second: the mask bit and the 7-bit length.
    Length,
    /// `left` bytes of the 16- or 64-bit length still to come.
    Extended { left: u8, len: u64, mask: u8 },
    /// Mask key and payload bytes still to skip.
    Body { left: u64 },
}

/// The upgraded socket as tungstenite sees it (see the module doc).
pub(crate) struct Frames<S> {
    inner: S,
    step: Step,
    /// The current frame is a refused ping or pong: its bytes are taken out of
    /// the stream, so tungstenite neither answers nor even reads it.
    dropping: bool,
    /// The current frame is a close frame.
    closing: bool,
    /// Frames of the fragmented message in progress (0: none).
    frames_in_message: u32,
    /// The session's token bucket, once it has joined (nothing is read before).
    rate: Option<Arc<Mutex<RateLimit>>>,
    /// Why the connection must close; tungstenite is handed nothing from the
    /// offending frame on.
    violation: Option<(u16, &'static str)>,
    /// Past a violation, or while lingering after our close: headers are still
    /// followed (to see the peer's close frame) but every byte is discarded.
    discarding: bool,
    /// A whole close frame has come from the peer.
    peer_closed: bool,
}

impl<S> Frames<S> {
    pub fn new(inner: S) -> Frames<S> {
        Frames {
            inner,
            step: Step::Start,
            dropping: false,
            closing: false,
            frames_in_message: 0,
            rate: None,
            violation: None,
            discarding: false,
            peer_closed: false,
        }
    }

    /// Charges control and continuation frames to the session's bucket from
    /// now on (the session's messages are charged by the session itself).
    pub fn attach(&mut self, rate: Arc<Mutex<RateLimit>>) {
        self.rate = Some(rate);
    }

    /// The close code and reason a frame limit asks for, once one was passed.
    pub fn violation(&self) -> Option<(u16, &'static str)> {
        self.violation
    }

    fn violate(&mut self, code: u16, reason: &'static str) {
        self.violation.get_or_insert((code, reason));
        self.discarding = true;
    }

    /// Follows the frames in `buf` (bytes just read from the socket), moves
    /// the bytes tungstenite should see to its front, and returns their count.
    /// `now` is read at most once per call, and only to charge a frame.
    fn scan(&mut self, buf: &mut [u8]) -> usize {
        let mut now = None;
        let mut read = 0;
        let mut kept = 0;
        while read < buf.len() {
            let n = match self.step {
                Step::Body { left } => {
                    let n = usize::try_from(left)
                        .map_or(buf.len() - read, |left| left.min(buf.len() - read));
                    self.step = Step::Body {
                        left: left - n as u64,
                    };
                    n
                }
                Step::Start => {
                    self.start(buf[read], &mut now);
                    self.step = Step::Length;
                    1
                }
                Step::Length => {
                    let byte = buf[read];
                    let mask = if byte & 0x80 != 0 { 4 } else { 0 };
                    let len = byte & 0x7f;
                    if self.dropping && len > 125 {
                        // A control frame this long is a protocol error, which
                        // tungstenite would have reported had it seen the frame.
                        self.violate(1002, "protocol error");
                    }
                    self.step = match len {
                        126 => Step::Extended {
                            left: 2,
                            len: 0,
                            mask,
                        },
                        127 => Step::Extended {
                            left: 8,
                            len: 0,
                            mask,
                        },
                        len => Step::Body {
                            left: u64::from(len) + u64::from(mask),
                        },
                    };
                    1
                }
                Step::Extended { left, len, mask } => {
                    let len = len << 8 | u64::from(buf[read]);
                    self.step = if left > 1 {
                        Step::Extended {
                            left: left - 1,
                            len,
                            mask,
                        }
                    } else {
                        Step::Body {
                            left: len.saturating_add(u64::from(mask)),
                        }
                    };
                    1
                }
            };
            if !self.discarding && !self.dropping {
                if kept != read {
                    buf.copy_within(read..read + n, kept);
                }
                kept += n;
            }
            read += n;
            if self.step == (Step::Body { left: 0 }) {
                self.end_of_frame();
            }
        }
        kept
    }

    /// A frame begins with `byte`: count it and charge it.
    fn start(&mut self, byte: u8, now: &mut Option<tokio::time::Instant>) {
        let fin = byte & 0x80 != 0;
        let opcode = byte & 0x0f;
        self.closing = opcode == OPCODE_CLOSE;
        self.dropping = false;
        if self.discarding {
            return;
        }
        match opcode {
            OPCODE_CONTINUATION => {
                self.frames_in_message = self.frames_in_message.saturating_add(1);
                if self.frames_in_message > MAX_FRAMES_PER_MESSAGE {
                    self.violate(1009, "message too big");
                } else if self.charge(now) == Verdict::Exceeded {
                    // A refused continuation frame still goes through (a
                    // message cannot lose a piece); the whole message is
                    // charged again, and answered, when it ends.
                    self.violate(1008, "rate limit exceeded");
                } else if fin {
                    self.frames_in_message = 0;
                }
            }
            // Text, binary (and reserved data opcodes, which tungstenite
            // refuses): the first frame of a message, charged by the session.
            0x1..=0x7 => self.frames_in_message = u32::from(!fin),
            // A fragmented control frame is left to tungstenite (1002).
            OPCODE_PING | OPCODE_PONG if fin => match self.charge(now) {
                Verdict::Allowed => {}
                Verdict::Refused => self.dropping = true,
                Verdict::Exceeded => self.violate(1008, "rate limit exceeded"),
            },
            _ => {}
        }
    }

    fn end_of_frame(&mut self) {
        if self.closing {
            self.peer_closed = true;
        }
        self.step = Step::Start;
        self.dropping = false;
        self.closing = false;
    }

    fn charge(&self, now: &mut Option<tokio::time::Instant>) -> Verdict {
        match &self.rate {
            Some(rate) => lock(rate).check(*now.get_or_insert_with(tokio::time::Instant::now)),
            None => Verdict::Allowed,
        }
    }
}

impl<S: AsyncRead + Unpin> Frames<S> {
    /// After our close frame: reads and discards whatever the peer still sends
    /// (bypassing tungstenite, which may have given up on the stream) until its
    /// close frame is in, it ends the connection, or `max_bytes` were read.
    /// Closing a socket with unread bytes sends a reset, and the peer's stack
    /// then throws away our close frame before its reader sees it.
    /// The caller bounds the time.
    pub async fn drain(&mut self, max_bytes: usize) {
        self.discarding = true;
        if self.peer_closed {
            return;
        }
        // Small for a peer that only answers our close; larger for one that
        // keeps sending. Allocated here, not kept per connection.
        let mut buf = vec![0u8; 256];
        let mut total = 0;
        while !self.peer_closed && total < max_bytes {
            match self.inner.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    total += n;
                    self.scan(&mut buf[..n]);
                    if n == buf.len() && buf.len() < 8192 {
                        buf.resize(8192, 0);
                    }
                }
            }
        }
    }
}

fn limit_passed() -> io::Error {
    io::Error::other("WebSocket frame limit passed")
}

impl<S: AsyncRead + Unpin> AsyncRead for Frames<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        for _ in 0..READS_PER_POLL {
            if this.violation.is_some() {
                return Poll::Ready(Err(limit_passed()));
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let after = buf.filled().len();
            if after == before {
                return Poll::Ready(Ok(()));
            }
            let kept = this.scan(&mut buf.filled_mut()[before..after]);
            buf.set_filled(before + kept);
            if kept > 0 {
                // Frames before a violation still reach tungstenite; the next
                // read reports the violation.
                return Poll::Ready(Ok(()));
            }
            // Everything read was refused control frames (or a violation):
            // returning no bytes would read as the end of the stream.
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Frames<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn frame(first: u8, payload_len: usize) -> Vec<u8> {
        let mut out = vec![first];
        match payload_len {
            0..=125 => out.push(0x80 | payload_len as u8),
            126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(std::iter::repeat_n(b'x', payload_len));
        out
    }

    fn bucket(per_sec: f64, burst: u32) -> Arc<Mutex<RateLimit>> {
        Arc::new(Mutex::new(RateLimit::new(per_sec, burst)))
    }

    /// Feeds `bytes` in pieces of `piece` bytes; returns what tungstenite gets.
    fn feed(frames: &mut Frames<()>, bytes: &[u8], piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            let mut chunk = chunk.to_vec();
            let kept = frames.scan(&mut chunk);
            out.extend_from_slice(&chunk[..kept]);
        }
        out
    }

    #[test]
    fn headers_are_followed_across_any_split_and_every_length_form() {
        let mut stream = Vec::new();
        stream.extend(frame(0x81, 5));
        stream.extend(frame(0x01, 300));
        stream.extend(frame(0x89, 0));
        stream.extend(frame(0x80, 70_000));
        stream.extend(frame(0x88, 2));
        for piece in [1, 2, 3, 7, 4096, stream.len()] {
            let mut frames = Frames::new(());
            frames.attach(bucket(0.0, 100));
            assert_eq!(feed(&mut frames, &stream, piece), stream, "piece {piece}");
            assert_eq!(frames.step, Step::Start, "piece {piece}");
            assert_eq!(frames.frames_in_message, 0);
            assert!(frames.peer_closed, "the close frame was seen");
            assert!(frames.violation().is_none());
        }
    }

    #[test]
    fn refused_control_frames_are_taken_out_and_a_flood_is_a_violation() {
        let mut frames = Frames::new(());
        frames.attach(bucket(0.0, 2));
        let text = frame(0x81, 3);
        let ping = frame(0x89, 4);
        let pong = frame(0x8a, 0);
        // Two allowed, then refused ones vanish while text frames pass.
        let mut stream = [ping.clone(), pong.clone()].concat();
        let mut expected = stream.clone();
        for _ in 0..5 {
            stream.extend_from_slice(&ping);
            stream.extend_from_slice(&text);
            expected.extend_from_slice(&text);
        }
        for piece in [1, 5, 64] {
            let mut frames = Frames::new(());
            frames.attach(bucket(0.0, 2));
            assert_eq!(feed(&mut frames, &stream, piece), expected, "piece {piece}");
            assert!(frames.violation().is_none());
        }
        // 10 × burst refusals are tolerated, the next closes 1008; nothing
        // from that frame on reaches tungstenite.
        let mut flood = [ping.clone(), ping.clone()].concat();
        flood.extend(std::iter::repeat_n(pong.clone(), 20).flatten());
        assert_eq!(feed(&mut frames, &flood, 3), [ping.clone(), ping].concat());
        assert!(frames.violation().is_none());
        let after = [pong, text].concat();
        assert!(feed(&mut frames, &after, 100).is_empty());
        assert_eq!(frames.violation(), Some((1008, "rate limit exceeded")));
    }

    #[test]
    fn a_message_has_at_most_1024_frames() {
        let mut frames = Frames::new(());
        frames.attach(bucket(0.0, 10_000));
        let mut stream = frame(0x01, 1);
        for _ in 0..1022 {
            stream.extend(frame(0x00, 0));
        }
        stream.extend(frame(0x80, 1));
        assert_eq!(feed(&mut frames, &stream, 4096), stream);
        assert!(frames.violation().is_none(), "1024 frames are a message");
        let mut over = frame(0x01, 1);
        for _ in 0..1023 {
            over.extend(frame(0x00, 0));
        }
        let passed = feed(&mut frames, &over, 4096);
        assert_eq!(passed, over, "frames 1 to 1024 pass");
        assert!(frames.violation().is_none());
        assert!(feed(&mut frames, &frame(0x80, 1), 4096).is_empty());
        assert_eq!(frames.violation(), Some((1009, "message too big")));
    }

    #[test]
    fn a_refused_control_frame_longer_than_125_bytes_is_a_protocol_error() {
        let mut frames = Frames::new(());
        frames.attach(bucket(0.0, 1));
        let pong = frame(0x8a, 0);
        assert_eq!(feed(&mut frames, &pong, 1), pong);
        assert!(feed(&mut frames, &frame(0x89, 126), 1).is_empty());
        assert_eq!(frames.violation(), Some((1002, "protocol error")));
    }
}

//! The write timeout of HTTP responses: a socket whose writes make no
//! progress for `--http-write-timeout` (the peer's TCP window is full and it
//! does not read) fails with `TimedOut`, so hyper drops the connection and the
//! response it holds. Without it a GET whose reader never reads pins the
//! response's memory and the socket for as long as the peer keeps it open.
//!
//! WebSocket and SSE sessions have their own write deadlines (ping interval
//! plus ping timeout, see `core/session/liveness.rs`), so their connections
//! are disarmed (`Switch`) rather than made to obey a second, shorter one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Turns the timeout on or off for what the connection writes next; shared
/// between the IO and the request handler that knows what the response is.
#[derive(Clone, Debug)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    pub fn arm(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn disarm(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    fn armed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An IO whose writes time out when stalled. Reads pass through untouched.
pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    switch: Switch,
    /// Allocated at the first stall, then reset for each later one.
    stall: Option<Pin<Box<Sleep>>>,
    /// True while `stall` runs: since the first `Pending` without progress.
    stalled: bool,
    timeouts: IntCounter,
}

impl<T> WriteTimeout<T> {
    /// Armed from the start: hyper's own answers (a 400 for a bad head) are
    /// responses too. `timeouts` counts the connections it failed.
    pub fn new(inner: T, timeout: Duration, timeouts: IntCounter) -> WriteTimeout<T> {
        WriteTimeout {
            inner,
            timeout,
            switch: Switch(Arc::new(AtomicBool::new(true))),
            stall: None,
            stalled: false,
            timeouts,
        }
    }

    pub fn switch(&self) -> Switch {
        self.switch.clone()
    }

    /// Passes an operation's outcome on; a `Pending` starts (or continues)
    /// the stall, which fails the operation once it has lasted the whole
    /// timeout. Only a write that went through (`progress`) ends a stall: a
    /// socket's flush is ready whatever is still queued.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
        progress: bool,
    ) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            if progress {
                self.stalled = false;
            }
            return poll;
        }
        if !self.switch.armed() {
            self.stalled = false;
            return Poll::Pending;
        }
        if !self.stalled {
            self.stalled = true;
            let deadline = Instant::now() + self.timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(stall) = &mut self.stall else {
            return Poll::Pending;
        };
        ready!(stall.as_mut().poll(cx));
        self.stalled = false;
        self.timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer read nothing for the HTTP write timeout",
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn counter() -> IntCounter {
        IntCounter::new("t", "t").expect("counter")
    }

    const TIMEOUT: Duration = Duration::from_millis(200);

    /// A peer that never reads: the write stalls, then fails once the
    /// timeout has passed.
    #[tokio::test]
    async fn a_stalled_write_fails_after_the_timeout() {
        let (client, _peer) = tokio::io::duplex(16);
        let timeouts = counter();
        let mut io = WriteTimeout::new(client, TIMEOUT, timeouts.clone());
        let started = Instant::now();
        let err = io.write_all(&[0u8; 64]).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= TIMEOUT);
        assert_eq!(timeouts.get(), 1);
    }

    /// Disarmed (a WebSocket, an SSE stream), a stalled write just waits.
    #[tokio::test]
    async fn a_disarmed_write_waits() {
        let (client, _peer) = tokio::io::duplex(16);
        let mut io = WriteTimeout::new(client, TIMEOUT, counter());
        io.switch().disarm();
        let write = tokio::time::timeout(TIMEOUT * 5, io.write_all(&[0u8; 64]));
        assert!(write.await.is_err(), "still waiting after 5 timeouts");
    }

    /// Progress resets the clock: a slow reader that keeps reading is served
    /// however long the whole response takes.
    #[tokio::test]
    async fn progress_resets_the_stall() {
        let (client, mut peer) = tokio::io::duplex(16);
        let mut io = WriteTimeout::new(client, TIMEOUT, counter());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 256 {
                tokio::time::sleep(TIMEOUT / 4).await;
                total += peer.read(&mut buf).await.expect("read");
            }
            total
        });
        io.write_all(&[0u8; 256])
            .await
            .expect("every write progresses in time");
        assert_eq!(reader.await.expect("reader"), 256);
    }
}

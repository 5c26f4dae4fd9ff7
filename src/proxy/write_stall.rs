//! A limit on how long a write to a peer may stay blocked: a client's (`server.send_timeout`),
//! or an upstream's (the route's `body_idle_timeout`, see the `hyper::rt` impls below).
//!
//! Why: hyper has no write timeout. A client that asks for a large answer (a big static file,
//! a download from an upstream) and then never reads it fills its socket buffers, and every
//! write to it blocks from then on: its connection, its `server.max_connections` slot and the
//! upstream connection feeding it were held forever, so a few sockets that send one request
//! each and read nothing locked everyone else out. nginx closes such a connection after
//! `send_timeout` (60 s) "between two successive write operations"; this does the same.
//!
//! Only time spent blocked counts: a connection that writes nothing because it has nothing to
//! write (a slow upstream, a stream of server-sent events, idle keep-alive) is never cut, and
//! a slow reader that keeps taking bytes resets the clock with each write that goes through.
//! The timer is made only when a write blocks, so a client that reads costs no allocation.
//!
//! HTTP/2 flow control is another way to stall: a client that reads the socket but never
//! gives flow-control credit stalls hyper's stream, not the socket. `http2_idle.rs`
//! (`StreamActivity::stalled_for`) covers that with the same limit.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection's stream (a client's, or a pooled upstream's) whose writes fail with `TimedOut` once one has been blocked
/// for `limit`; hyper then closes the connection.
#[derive(Debug)]
pub(crate) struct WriteStallLimit<I> {
    io: I,
    limit: Duration,
    /// Running while the write in progress is blocked; none while writes go through.
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<I> WriteStallLimit<I> {
    pub(crate) fn new(io: I, limit: Duration) -> WriteStallLimit<I> {
        WriteStallLimit {
            io,
            limit,
            blocked: None,
        }
    }

    /// After a write (or flush, or shutdown) answered: a blocked one starts or continues the
    /// clock, which fails it once `limit` is over; one that went through stops the clock.
    fn account<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.blocked = None;
            return result;
        }
        let limit = self.limit;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer took no bytes for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStallLimit<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStallLimit<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.account(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.account(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.account(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.account(cx, result)
    }
}

/// The same limit on hyper's own IO traits: an upstream connection of the pool
/// (`upstream_pool.rs`), whose writes are the request going out. hyper writes a request's
/// body after its answer has come if the upstream answered early, with no timer of its own:
/// an upstream that then stops reading, and keeps the connection open, held the connection,
/// its driver task and the unsent body forever.
impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for WriteStallLimit<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for WriteStallLimit<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.account(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.account(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.account(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.account(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A write blocked for the limit fails with `TimedOut`; one that goes through in time
    /// stops the clock, so the limit is per blocked write, not per connection.
    #[tokio::test]
    async fn a_blocked_write_fails_after_the_limit_and_progress_resets_it() {
        const LIMIT: Duration = Duration::from_secs(2);
        let (client, mut server) = tokio::io::duplex(16);
        let mut limited = WriteStallLimit::new(client, LIMIT);
        // Fills the pipe: the next write blocks.
        limited.write_all(&[0; 16]).await.unwrap();
        let blocked = tokio::spawn(async move {
            let result = limited.write_all(&[1; 16]).await;
            (limited, result)
        });
        // Well within the limit the reader takes the bytes: the blocked write completes.
        tokio::time::sleep(LIMIT / 10).await;
        let mut taken = [0u8; 32];
        server.read_exact(&mut taken).await.unwrap();
        let (mut limited, result) = blocked.await.unwrap();
        result.unwrap();
        // Then nobody reads: the blocked write fails once the limit has passed, not before.
        limited.write_all(&[2; 16]).await.unwrap();
        let started = tokio::time::Instant::now();
        let error = limited.write_all(&[3; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= LIMIT, "{:?}", started.elapsed());
    }
}

//! The two directions of a spliced WebSocket: bytes are relayed as they come, never changed,
//! while [`Frames`] follows and checks the frame headers. Only a header not yet whole at the
//! end of a read is held back (its few bytes), to go on in front of the next read's once it
//! is whole and valid: so a malformed header is never relayed, even in part, and what each
//! side got always ends at a frame boundary when one is refused. Once a side's own Close
//! frame is relayed, nothing more from that side is (RFC 6455 §5.5.1): what it sends after
//! is read and discarded, until it ends. A close the proxy decides on is written between two
//! frames: the frame in flight is finished first, then a Close frame goes to each side, then
//! each side's own Close (or EOF) is awaited, then the write halves are shut.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frames::{CloseFrame, CloseReason, Extensions, Frames, Scanned, State, HELD_ROOM};

/// Read buffer of one direction (allocated once per WebSocket, as `copy_bidirectional`'s),
/// behind [`HELD_ROOM`] bytes where a header held back from the read before goes.
const BUFFER: usize = 8 * 1024;

/// One of the two connections of a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The browser's.
    Client,
    /// The API's.
    Upstream,
}

/// What a direction (or the pair) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// Relaying: both sides ended (EOF both ways). Closing: the close is over.
    Done,
    /// Relaying: a side sent a malformed frame header (`from_client`: the browser).
    Malformed { from_client: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Copying bytes as they come.
    Relay,
    /// Closing: the frame in flight is relayed to its end.
    Finish,
    /// Closing: our Close frame is written (unless the reader's own Close was relayed).
    Inject,
    /// Closing: the reader's Close (or EOF) is awaited; its bytes are discarded.
    Drain,
    /// The writer's write half is shut.
    Shutdown,
    Done,
}

/// One direction: reads one side, writes the other.
pub(super) struct Direction {
    /// [`HELD_ROOM`] bytes, then the read buffer.
    buf: Box<[u8]>,
    /// `buf[written..ready]` is still to be written.
    written: usize,
    ready: usize,
    frames: Frames,
    phase: Phase,
    need_flush: bool,
    /// The writer is the upstream: the proxy is the client there and masks its frames.
    to_upstream: bool,
    /// A malformed header was read: the writer got every frame before it (and no byte of
    /// it), so it ends at a frame boundary, where a Close can go.
    malformed: bool,
    /// The reader ended (EOF) or can no longer be followed.
    reader_done: bool,
    /// The reader's own Close was relayed to the writer: no Close of ours after it.
    close_relayed: bool,
    /// Bytes the reader sent after its Close were discarded (logged once).
    discarded: bool,
    /// The last I/O error was the writer's (else the reader's): which side failed.
    writer_failed: bool,
    /// Closing: the writer has got every byte up to a frame boundary.
    boundary_reached: bool,
    close: Option<CloseFrame>,
    close_written: usize,
}

impl Direction {
    /// The direction from the browser (`to_upstream`) or from the API, on a WebSocket that
    /// negotiated `extensions`.
    pub(super) fn new(to_upstream: bool, extensions: Extensions) -> Direction {
        Direction {
            buf: vec![0u8; HELD_ROOM + BUFFER].into_boxed_slice(),
            written: 0,
            ready: 0,
            frames: Frames::new(to_upstream, extensions),
            phase: Phase::Relay,
            need_flush: false,
            to_upstream,
            malformed: false,
            reader_done: false,
            close_relayed: false,
            discarded: false,
            writer_failed: false,
            boundary_reached: false,
            close: None,
            close_written: 0,
        }
    }

    /// Switches to closing with `reason` (a direction already ended stays so).
    pub(super) fn begin_close(&mut self, reason: CloseReason) {
        if self.phase == Phase::Relay {
            self.phase = Phase::Finish;
        }
        // A client's frames are masked with a fresh, unpredictable key (RFC 6455 §5.3).
        let mask = self.to_upstream.then(rand::random::<[u8; 4]>);
        self.close = Some(CloseFrame::new(reason, mask));
    }

    /// Closing after the reader's connection failed: the writer's side gets what was read
    /// already and a Close with `reason` if that leaves it at a frame boundary (else its
    /// write half is shut), and nothing more is read.
    fn close_to_survivor(&mut self, reason: CloseReason) {
        self.reader_done = true;
        self.begin_close(reason);
    }

    /// Closing after the writer's connection failed: nothing more is written to it; the
    /// reader's side is read (and discarded) until its Close or EOF, as a close would wait
    /// for its reply.
    fn drain_survivor(&mut self) {
        self.written = 0;
        self.ready = 0;
        self.need_flush = false;
        self.close = None;
        self.phase = match self.phase {
            Phase::Done => Phase::Done,
            _ => Phase::Drain,
        };
    }

    /// The side whose connection failed, once this direction's relaying failed: its
    /// writer's or its reader's (this direction writes to the upstream when `to_upstream`).
    fn failed_side(&self) -> Side {
        if self.writer_failed == self.to_upstream {
            Side::Upstream
        } else {
            Side::Client
        }
    }

    /// Whether this direction ended.
    fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Drives this direction. Relaying, an I/O error ends the WebSocket (returned); closing,
    /// it ends only this direction.
    pub(super) fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<Event>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let step = match self.phase {
                Phase::Relay => self.poll_relay(cx, reader, writer),
                Phase::Done => return Poll::Ready(Ok(Event::Done)),
                _ => match self.poll_closing(cx, reader, writer) {
                    Poll::Ready(Err(e)) => {
                        tracing::debug!("WebSocket: error while closing: {e}");
                        self.phase = Phase::Done;
                        Poll::Ready(Ok(None))
                    }
                    other => other,
                },
            };
            match ready!(step)? {
                Some(event) => return Poll::Ready(Ok(event)),
                None => continue,
            }
        }
    }

    /// Writes `buf[written..ready]`; Ready(Ok) once all of it is written.
    fn poll_write_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.written < self.ready {
            let written =
                ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.written..self.ready]));
            let n = written.inspect_err(|_| self.writer_failed = true)?;
            if n == 0 {
                self.writer_failed = true;
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.need_flush = true;
        }
        self.written = 0;
        self.ready = 0;
        Poll::Ready(Ok(()))
    }

    /// Scans the `n` bytes just read with [`Frames::scan`]: what goes on (a header held back
    /// from before, put in front of them, and those of them that belong to frames) is then
    /// `buf[written..ready]`.
    fn scan_read(&mut self, n: usize, stop: bool) -> State {
        let Some((room, data)) = self.buf.split_first_chunk_mut::<HELD_ROOM>() else {
            // The buffer is longer than the room (see `new`): never here.
            return State::Malformed;
        };
        let Scanned { held, used, state } = self.frames.scan(room, &data[..n], stop);
        self.written = HELD_ROOM - held;
        self.ready = HELD_ROOM + used;
        state
    }

    /// Follows `buf[HELD_ROOM + from..HELD_ROOM + to]` without relaying any of it.
    fn follow(&mut self, from: usize, to: usize) -> State {
        let data = &self.buf[HELD_ROOM + from..HELD_ROOM + to];
        self.frames.scan(&mut [0; HELD_ROOM], data, false).state
    }

    /// Reads into the buffer (after the room): Ready(Ok(0)) is EOF. Flushes the writer while
    /// waiting.
    fn poll_read_some<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(&mut self.buf[HELD_ROOM..]);
        match Pin::new(&mut *reader).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(read.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.need_flush {
                    let flushed = Pin::new(&mut *writer).poll_flush(cx);
                    if flushed
                        .map_err(|e| {
                            self.writer_failed = true;
                            e
                        })?
                        .is_ready()
                    {
                        self.need_flush = false;
                    }
                }
                Poll::Pending
            }
        }
    }

    /// One step of relaying: Some(event) to report, None to go on.
    fn poll_relay<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<Option<Event>>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.malformed {
            // Reported already (the caller closes): reported again.
            return Poll::Ready(Ok(Some(Event::Malformed {
                from_client: self.to_upstream,
            })));
        }
        ready!(self.poll_write_pending(cx, writer))?;
        let n = ready!(self.poll_read_some(cx, reader, writer))?;
        if n == 0 && !self.frames.close_seen() {
            // The reader's connection ended without its Close (a crashed process's socket
            // closes so): a failure of that side, as a reset is.
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        }
        if n == 0 {
            // The reader ended after its Close: so does its direction, as
            // `copy_bidirectional` does it.
            self.reader_done = true;
            self.phase = Phase::Shutdown;
            return Poll::Ready(Ok(None));
        }
        match self.scan_read(n, false) {
            State::Malformed => {
                self.malformed = true;
                self.reader_done = true;
                return Poll::Ready(Ok(Some(Event::Malformed {
                    from_client: self.to_upstream,
                })));
            }
            // The reader's Close is relayed (its last byte in this read, or earlier): what
            // it sent after it goes nowhere; reading on finds its EOF (or the other side's
            // reply Close ends the WebSocket). Not an error: the close handshake goes on.
            State::Closed if HELD_ROOM + n > self.ready && !self.discarded => {
                self.discarded = true;
                tracing::debug!(
                    from = if self.to_upstream {
                        "browser"
                    } else {
                        "upstream"
                    },
                    "WebSocket: bytes after a side's Close discarded (RFC 6455 §5.5.1)"
                );
            }
            _ => {}
        }
        Poll::Ready(Ok(None))
    }

    /// One step of closing: Some(Done) once this direction is over, None to go on.
    fn poll_closing<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<Option<Event>>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self.phase {
            Phase::Finish => {
                ready!(self.poll_write_pending(cx, writer))?;
                if self.malformed {
                    // Every frame before the malformed header is relayed, none of its bytes:
                    // a frame boundary, for the Close.
                    self.close_relayed = self.frames.close_seen();
                    self.phase = Phase::Inject;
                    return Poll::Ready(Ok(None));
                }
                if self.boundary_reached || self.frames.at_boundary() {
                    if !self.boundary_reached {
                        self.close_relayed = self.frames.close_seen();
                    }
                    self.phase = Phase::Inject;
                    return Poll::Ready(Ok(None));
                }
                if self.reader_done {
                    // The reader's connection failed inside a frame: no boundary to come.
                    self.phase = Phase::Shutdown;
                    return Poll::Ready(Ok(None));
                }
                let n = ready!(self.poll_read_some(cx, reader, writer))?;
                if n == 0 {
                    // Ended inside a frame: no boundary to write a Close at.
                    self.reader_done = true;
                    self.phase = Phase::Shutdown;
                    return Poll::Ready(Ok(None));
                }
                match self.scan_read(n, true) {
                    State::Malformed => {
                        self.malformed = true;
                        self.reader_done = true;
                    }
                    // Closed: the frame in flight was the reader's own Close, now relayed whole
                    // (what follows it is neither relayed nor followed).
                    State::Boundary | State::Closed => {
                        // The rest came after the close was due: not relayed, but followed
                        // (it may hold the reader's own Close).
                        self.close_relayed = self.frames.close_seen();
                        self.boundary_reached = true;
                        let used = self.ready - HELD_ROOM;
                        if self.follow(used, n) == State::Malformed {
                            self.reader_done = true;
                        }
                    }
                    State::InFrame => {}
                }
                Poll::Ready(Ok(None))
            }
            Phase::Inject => {
                if !self.close_relayed {
                    if let Some(close) = &self.close {
                        let bytes = close.as_bytes();
                        while self.close_written < bytes.len() {
                            let n =
                                ready!(Pin::new(&mut *writer)
                                    .poll_write(cx, &bytes[self.close_written..]))?;
                            if n == 0 {
                                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                            }
                            self.close_written += n;
                        }
                    }
                }
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.need_flush = false;
                self.phase = Phase::Drain;
                Poll::Ready(Ok(None))
            }
            Phase::Drain => {
                if self.reader_done || self.frames.close_seen() {
                    self.phase = Phase::Shutdown;
                    return Poll::Ready(Ok(None));
                }
                let n = ready!(self.poll_read_some(cx, reader, writer))?;
                if n == 0 || self.follow(0, n) == State::Malformed {
                    self.reader_done = true;
                }
                Poll::Ready(Ok(None))
            }
            Phase::Shutdown => {
                // Errors (a side already gone) end this direction all the same.
                let _ = ready!(Pin::new(&mut *writer).poll_shutdown(cx));
                self.phase = Phase::Done;
                Poll::Ready(Ok(Some(Event::Done)))
            }
            Phase::Relay | Phase::Done => Poll::Ready(Ok(Some(Event::Done))),
        }
    }
}

/// Both directions of one WebSocket.
pub(super) struct Splice<C, U> {
    pub(super) client: C,
    pub(super) upstream: U,
    to_upstream: Direction,
    to_client: Direction,
    /// The side whose connection failed while relaying, once one did.
    failed: Option<Side>,
}

impl<C, U> Splice<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// The splice of a WebSocket whose handshake negotiated `extensions`.
    pub(super) fn new(client: C, upstream: U, extensions: Extensions) -> Self {
        Splice {
            client,
            upstream,
            to_upstream: Direction::new(true, extensions),
            to_client: Direction::new(false, extensions),
            failed: None,
        }
    }

    /// The side whose connection failed while relaying (after [`Splice::poll`] returned
    /// its error).
    pub(super) fn failed(&self) -> Option<Side> {
        self.failed
    }

    /// Closes the side that did not fail with `reason` (then keep polling): it gets the
    /// frame in flight as far as it was read, then the Close (if that ends at a frame
    /// boundary), and its Close is awaited; nothing more goes to the side that failed.
    pub(super) fn begin_close_after_failure(&mut self, failed: Side, reason: CloseReason) {
        match failed {
            Side::Upstream => {
                self.to_client.close_to_survivor(reason);
                self.to_upstream.drain_survivor();
            }
            Side::Client => {
                self.to_upstream.close_to_survivor(reason);
                self.to_client.drain_survivor();
            }
        }
    }

    /// Closes both sides with `reason` (then keep polling).
    pub(super) fn begin_close(&mut self, reason: CloseReason) {
        self.to_upstream.begin_close(reason);
        self.to_client.begin_close(reason);
    }

    /// Relaying: Ready when both sides ended, a header was malformed, or an I/O error.
    /// Closing: Ready when the close is over (I/O errors then end one direction only).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Event>> {
        let up = self
            .to_upstream
            .poll(cx, &mut self.client, &mut self.upstream)
            .map_err(|e| {
                self.failed = Some(self.to_upstream.failed_side());
                e
            })?;
        if let Poll::Ready(event @ Event::Malformed { .. }) = up {
            return Poll::Ready(Ok(event));
        }
        let down = self
            .to_client
            .poll(cx, &mut self.upstream, &mut self.client)
            .map_err(|e| {
                self.failed = Some(self.to_client.failed_side());
                e
            })?;
        if let Poll::Ready(event @ Event::Malformed { .. }) = down {
            return Poll::Ready(Ok(event));
        }
        if self.to_upstream.done() && self.to_client.done() {
            Poll::Ready(Ok(Event::Done))
        } else {
            Poll::Pending
        }
    }
}

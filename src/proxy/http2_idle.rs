//! When an HTTP/2 client connection is idle: no stream open for `server.http2_idle_timeout`.
//!
//! Why: an HTTP/1 connection idle between requests is closed by hyper's header timer
//! (`server.header_read_timeout` runs again for each request head), but an HTTP/2 connection
//! with no stream open has no timer at all in hyper. A client could complete the preface and
//! then hold the connection, and its `server.max_connections` slot, forever; a few thousand such
//! connections lock everyone else out. nginx closes them after `keepalive_timeout` (75 s).
//!
//! A stream counts as open from its request's arrival until h2 has written the last frame of
//! its answer to the socket (or dropped it: a client reset, the connection gone), so a long
//! download or a slow upstream keeps the connection. Not merely until the response body has
//! ended: hyper hands each frame to h2 and drops the body once it has handed the last one, but
//! h2 sends a frame only as the client's flow-control credit allows; a slow client reading a
//! static file (one frame of the whole file) still had megabytes to take when its stream
//! already counted as closed, and the idle GOAWAY and the drop after it cut the download off.
//! So [`TrackedBody`] hands hyper frames of at most [`MAX_FRAME_SLICE`] bytes (hyper passes a
//! frame on to h2 only once h2 has credit for the ones before, and then asks for the next, so
//! the body lives as long as there is more than that to send), and its last frame carries the
//! stream's count ([`FinalFrame`]), which h2 drops only once the frame is written. Only HTTP/2 connections are
//! tracked: HTTP/1's request path pays nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
// tokio's clock, so that tests can run it paused.
use tokio::time::Instant;

/// The open streams of one HTTP/2 connection, and when the last one closed.
#[derive(Debug)]
pub(crate) struct StreamActivity {
    open: AtomicUsize,
    /// When the connection was opened: `last_closed` counts from here.
    start: Instant,
    /// Nanoseconds from `start` to when the last stream closed (0: none yet).
    last_closed: AtomicU64,
    /// Streams waiting to send (see [`Self::stalled_for`]): whose response body handed hyper
    /// a frame that hyper has not come back for (it waits for the client's flow-control
    /// credit to send it), or whose last frame h2 has not written yet. Counted by when the
    /// stream last made progress, in epochs of `epoch_nanos` (slot: epoch modulo
    /// [`OWED_EPOCHS`]), so that the check is per stream at the cost of an atomic increment and
    /// decrement when a stream's epoch changes, not a registry of streams.
    owed_since: [AtomicUsize; OWED_EPOCHS],
    /// A quarter of the stall limit: a stalled stream is found between the limit and 1.25
    /// times the limit after its last progress.
    epoch_nanos: u64,
}

/// Epoch slots of [`StreamActivity::owed_since`]: the current epoch, the 4 that a stream may
/// wait without being stalled, and 3 more, checked, so that a check up to 3 epochs late (a
/// loaded runtime) still finds a stalled stream before its slot is reused.
const OWED_EPOCHS: usize = 8;
/// Epochs in the stall limit.
const EPOCHS_PER_LIMIT: u64 = 4;

impl StreamActivity {
    /// `stall_limit`: how long a stream may wait to send (`send_timeout`).
    pub(crate) fn new(stall_limit: Duration) -> Arc<StreamActivity> {
        let limit_nanos = u64::try_from(stall_limit.as_nanos()).unwrap_or(u64::MAX);
        Arc::new(StreamActivity {
            open: AtomicUsize::new(0),
            start: Instant::now(),
            last_closed: AtomicU64::new(0),
            owed_since: Default::default(),
            epoch_nanos: (limit_nanos / EPOCHS_PER_LIMIT).max(1),
        })
    }

    /// Nanoseconds since the connection opened (saturates at ~584 years).
    fn age_nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn epoch_now(&self) -> u64 {
        self.age_nanos() / self.epoch_nanos
    }

    fn owed_slot(&self, epoch: u64) -> &AtomicUsize {
        // The remainder is below OWED_EPOCHS: the cast is lossless and the index in range.
        &self.owed_since[(epoch % OWED_EPOCHS as u64) as usize]
    }

    /// A stream waits to send from now: its clock (re)starts. `since` is the stream's own
    /// record of its epoch; nothing is touched while the epoch stays the same.
    fn owe(&self, since: &mut Option<u64>) {
        let now = self.epoch_now();
        match *since {
            Some(epoch) if epoch == now => return,
            Some(epoch) => {
                self.owed_slot(epoch).fetch_sub(1, Ordering::AcqRel);
            }
            None => {}
        }
        self.owed_slot(now).fetch_add(1, Ordering::AcqRel);
        *since = Some(now);
    }

    /// A stream no longer waits to send.
    fn settle(&self, since: &mut Option<u64>) {
        if let Some(epoch) = since.take() {
            self.owed_slot(epoch).fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Streams waiting to send now.
    #[cfg(test)]
    fn owed(&self) -> usize {
        self.owed_since
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .sum()
    }

    /// Completes once a stream has been waiting to send for the stall limit (between 1 and
    /// 1.25 times it) with no progress of its own: the client gives it no flow-control credit
    /// (it never sends WINDOW_UPDATE), so hyper's stream waits forever and no socket write ever
    /// blocks (the `write_stall` limit cannot see it). Such a client held its connection slot,
    /// and the upstream connections and answers of up to `http2_max_concurrent_streams`
    /// streams, forever. A stream waiting for its upstream is not waiting to send: a slow
    /// upstream or a quiet event stream never ends a connection. Progress is hyper asking the
    /// stream's body for a frame, which it does each time the client has given credit for the
    /// frames before (at most [`MAX_FRAME_SLICE`] bytes each), so a slow but steady reader is
    /// never cut. Per stream, not per connection: a client could otherwise keep one download
    /// trickling and hold every other stream of the connection (each with its upstream
    /// request) stalled, for the price of one slow reader.
    pub(crate) async fn stalled_for(&self) {
        loop {
            let now = self.epoch_now();
            // Epochs at least EPOCHS_PER_LIMIT + 1 back: a stream counted there has made no
            // progress since the end of that epoch, the limit ago or more.
            let stalled = (EPOCHS_PER_LIMIT + 1..OWED_EPOCHS as u64)
                .filter_map(|back| now.checked_sub(back))
                .any(|epoch| self.owed_slot(epoch).load(Ordering::Acquire) > 0);
            if stalled {
                return;
            }
            let nothing_owed = self
                .owed_since
                .iter()
                .all(|slot| slot.load(Ordering::Acquire) == 0);
            // Nothing owed: a stream starting to wait now is stalled a limit later at the
            // earliest, so one look per limit is enough (and costs no wake-up per epoch).
            let epochs = if nothing_owed { EPOCHS_PER_LIMIT } else { 1 };
            let next = self.start
                + Duration::from_nanos(now.saturating_add(epochs).saturating_mul(self.epoch_nanos));
            tokio::time::sleep_until(next).await;
        }
    }

    /// Counts a stream as open until the returned guard is dropped.
    pub(crate) fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard {
            activity: Arc::clone(self),
        }
    }

    /// No stream is open now.
    pub(crate) fn is_idle(&self) -> bool {
        self.open.load(Ordering::Acquire) == 0
    }

    /// When the connection last had a stream open (or was opened, if it never had one).
    fn idle_since(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_closed.load(Ordering::Acquire))
    }

    /// Completes once no stream has been open for `timeout`. While streams are open it checks
    /// again every `timeout`; once none is, it sleeps exactly until the deadline.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.open.load(Ordering::Acquire) == 0 {
                let deadline = self.idle_since() + timeout;
                if Instant::now() >= deadline {
                    // Re-checked: a stream may have opened while this task was being woken.
                    if self.open.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    continue;
                }
                tokio::time::sleep_until(deadline).await;
            } else {
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// One open stream; dropping it closes the stream's count.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    activity: Arc<StreamActivity>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let activity = &self.activity;
        // Saturates at ~584 years of connection age.
        let now = u64::try_from(activity.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // The time first, then the count: a watcher that sees the count at zero also sees
        // this stream's closing time, never an older one.
        activity.last_closed.fetch_max(now, Ordering::AcqRel);
        activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The largest data frame a [`TrackedBody`] hands hyper (the default and smallest HTTP/2
/// `SETTINGS_MAX_FRAME_SIZE`, so h2 sends each as one DATA frame). hyper passes a frame on to h2
/// only once h2 has the client's credit for the ones before (its `poll_capacity` wait) and then
/// asks for the next, so a bounded frame means: the body is asked again each time the client
/// has given this much credit (the progress [`StreamActivity::stalled_for`] watches for), and
/// what h2 holds without credit when the body has ended is this much at most, not a whole
/// static file. Slicing a `Bytes` is a reference count increment; nothing is copied.
pub(crate) const MAX_FRAME_SLICE: usize = 16 * 1024;

pin_project! {
    /// A response body that keeps its stream counted as open until h2 has written its last
    /// frame (or the body is dropped unfinished), hands hyper its data in frames of at most
    /// [`MAX_FRAME_SLICE`] bytes, and counts the stream as waiting to send from each frame it
    /// hands hyper until hyper asks again (the last frame: until h2 has written it).
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        // `None` once the last frame has taken the stream's count over.
        guard: Option<StreamGuard>,
        // What is left of a data frame larger than `MAX_FRAME_SLICE`.
        rest: Bytes,
        // Since when (epoch) the stream waits to send: a frame handed over, hyper not back.
        owed_since: Option<u64>,
    }

    impl<B> PinnedDrop for TrackedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(guard) = this.guard.as_ref() {
                guard.activity.settle(this.owed_since);
            }
        }
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, guard: StreamGuard) -> TrackedBody<B> {
        TrackedBody {
            inner,
            guard: Some(guard),
            rest: Bytes::new(),
            owed_since: None,
        }
    }
}

/// The last frame of a stream's answer, holding the stream's count (open, and waiting to
/// send) until h2 drops it: once it has written the frame to the socket, and since h2 writes a
/// stream's frames in order, every byte before it too; or when the stream is reset or the
/// connection is gone. Without it the stream counted as closed as soon as hyper had handed
/// the frame over, while it could still be waiting for the client's credit.
struct FinalFrame {
    data: Bytes,
    stream: StreamGuard,
    owed_since: Option<u64>,
}

impl FinalFrame {
    /// `data` as a `Bytes` that keeps the stream counted until dropped, waiting to send from
    /// `owed_since` (the body's record, taken over). One allocation per HTTP/2 answer (its
    /// last frame only).
    fn carry(data: Bytes, stream: StreamGuard, mut owed_since: Option<u64>) -> Bytes {
        // Handed over just now: progress.
        stream.activity.owe(&mut owed_since);
        Bytes::from_owner(FinalFrame {
            data,
            stream,
            owed_since,
        })
    }
}

impl AsRef<[u8]> for FinalFrame {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for FinalFrame {
    fn drop(&mut self) {
        // Written (or given up): nothing owed any more. The stream's count closes right
        // after, when `stream` drops.
        self.stream.activity.settle(&mut self.owed_since);
    }
}

impl<B: Body<Data = Bytes>> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let Some(guard) = this.guard.as_ref() else {
            // The last frame has been handed over (`is_end_stream` said so).
            return Poll::Ready(None);
        };
        let activity = &guard.activity;
        let data = if this.rest.is_empty() {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        if data.len() > MAX_FRAME_SLICE {
                            *this.rest = data.split_off(MAX_FRAME_SLICE);
                        }
                        Some(data)
                    }
                    // Trailers: hyper ends the stream with them and drops the body, so the
                    // count closes then, with up to one frame possibly still without credit
                    // (a `HeaderMap` cannot carry the count). Rare here: answers with trailers
                    // (gRPC) are not what browsers ask a BFF for.
                    Err(frame) => {
                        activity.owe(this.owed_since);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                // The end, found only now (a body of unknown length): an empty last frame
                // carries the count, in place of the one hyper would send for the end.
                Poll::Ready(None) => None,
                // Waiting for its upstream (not for the client), or failed.
                other => {
                    activity.settle(this.owed_since);
                    return other;
                }
            }
        } else if this.rest.len() > MAX_FRAME_SLICE {
            Some(this.rest.split_to(MAX_FRAME_SLICE))
        } else {
            Some(std::mem::take(this.rest))
        };
        let last = match &data {
            Some(_) => this.rest.is_empty() && this.inner.is_end_stream(),
            None => true,
        };
        if !last {
            // Asked again, so the frames before have the client's credit: progress, and the
            // stream waits to send this one from now.
            activity.owe(this.owed_since);
            return Poll::Ready(data.map(|data| Ok(Frame::data(data))));
        }
        // The stream's count and what it owes go with the last frame; `is_end_stream` now
        // tells hyper that it is the last (sent with END_STREAM, as before).
        let Some(stream) = this.guard.take() else {
            return Poll::Ready(None);
        };
        let data = FinalFrame::carry(data.unwrap_or_default(), stream, this.owed_since.take());
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || (self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.guard.is_none() {
            return SizeHint::with_exact(0);
        }
        let rest = self.rest.len() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, short timeouts: the lower bounds are exact (nothing can finish before its
    // deadline), the upper bounds generous for a loaded machine.
    const TIMEOUT: Duration = Duration::from_millis(150);
    const SLACK: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_connection_without_streams_is_idle_after_the_timeout() {
        let activity = StreamActivity::new(TIMEOUT);
        let started = Instant::now();
        activity.idle_for(TIMEOUT).await;
        let took = started.elapsed();
        assert!(took >= TIMEOUT && took < TIMEOUT + SLACK, "{took:?}");
    }

    #[tokio::test]
    async fn an_open_stream_keeps_the_connection_and_its_close_restarts_the_clock() {
        let activity = StreamActivity::new(TIMEOUT);
        let stream = activity.open_stream();
        let watcher = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.idle_for(TIMEOUT).await })
        };
        // Open for several timeouts: never idle meanwhile.
        tokio::time::sleep(TIMEOUT * 4).await;
        assert!(!watcher.is_finished());
        drop(stream);
        let closed = Instant::now();
        tokio::time::timeout(TIMEOUT * 2 + SLACK, watcher)
            .await
            .expect("idle once the stream closed")
            .unwrap();
        // Counted from the close, not from the connection's start or the last check.
        assert!(closed.elapsed() >= TIMEOUT, "{:?}", closed.elapsed());
    }

    /// A body that never has a frame: a stream waiting for its upstream.
    struct Waiting;

    impl Body for Waiting {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    /// The data of a frame the body handed over (panics on anything else).
    fn data_of<E: std::fmt::Debug>(polled: Poll<Option<Result<Frame<Bytes>, E>>>) -> Bytes {
        match polled {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().expect("a data frame"),
            other => panic!("expected a data frame: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_handed_a_frame_that_hyper_never_comes_back_for_is_stalled() {
        let activity = StreamActivity::new(TIMEOUT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // More than one frame: the first is owed until hyper asks for the next.
        let full = http_body_util::Full::new(Bytes::from(vec![1u8; MAX_FRAME_SLICE + 10]));
        let mut body = Box::pin(TrackedBody::new(full, activity.open_stream()));
        let first = data_of(body.as_mut().poll_frame(&mut cx));
        assert_eq!(first.len(), MAX_FRAME_SLICE);
        assert_eq!(activity.owed(), 1);
        let started = Instant::now();
        tokio::time::timeout(TIMEOUT + SLACK, activity.stalled_for())
            .await
            .expect("stalled");
        assert!(started.elapsed() >= TIMEOUT, "{:?}", started.elapsed());
        // hyper comes back for the last frame: still owed, now by the frame, until h2 has
        // written (dropped) it; then nothing is owed.
        let last = data_of(body.as_mut().poll_frame(&mut cx));
        assert_eq!(last.len(), 10);
        assert!(body.is_end_stream());
        assert_eq!(activity.owed(), 1);
        drop(body);
        assert_eq!(activity.owed(), 1);
        drop(last);
        assert_eq!(activity.owed(), 0);
        // A body dropped while owed (a client reset) is not owed any more either.
        let full = http_body_util::Full::new(Bytes::from(vec![1u8; MAX_FRAME_SLICE * 2]));
        let mut body = Box::pin(TrackedBody::new(full, activity.open_stream()));
        assert!(body.as_mut().poll_frame(&mut cx).is_ready());
        drop(body);
        assert_eq!(activity.owed(), 0);
    }

    /// Per stream: a stream that makes no progress is found while another one keeps moving.
    #[tokio::test]
    async fn a_stalled_stream_is_found_while_another_keeps_moving() {
        let activity = StreamActivity::new(TIMEOUT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let large = || http_body_util::Full::new(Bytes::from(vec![0u8; MAX_FRAME_SLICE * 1000]));
        let mut moving = Box::pin(TrackedBody::new(large(), activity.open_stream()));
        let mut stalled = Box::pin(TrackedBody::new(large(), activity.open_stream()));
        let started = Instant::now();
        data_of(stalled.as_mut().poll_frame(&mut cx));
        let watcher = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.stalled_for().await })
        };
        while !watcher.is_finished() {
            assert!(started.elapsed() < TIMEOUT * 2 + SLACK, "never found");
            data_of(moving.as_mut().poll_frame(&mut cx));
            tokio::time::sleep(TIMEOUT / 10).await;
        }
        assert!(started.elapsed() >= TIMEOUT, "{:?}", started.elapsed());
    }

    /// A static file is one frame of the whole file: handed to hyper in slices, and the stream
    /// counts as open until the last slice is written, not when the body ends.
    #[test]
    fn a_large_frame_is_handed_over_in_slices_and_the_last_one_holds_the_stream() {
        let activity = StreamActivity::new(TIMEOUT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let content: Vec<u8> = (0..MAX_FRAME_SLICE * 3 + 100).map(|i| i as u8).collect();
        let full = http_body_util::Full::new(Bytes::from(content.clone()));
        let mut body = Box::pin(TrackedBody::new(full, activity.open_stream()));
        assert_eq!(body.size_hint().exact(), Some(content.len() as u64));
        let mut received = Vec::new();
        while !body.is_end_stream() {
            let data = data_of(body.as_mut().poll_frame(&mut cx));
            assert!(data.len() <= MAX_FRAME_SLICE, "{}", data.len());
            received.push(data);
        }
        assert_eq!(received.len(), 4);
        assert_eq!(received.concat(), content);
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        // hyper drops the body once it has handed the last frame to h2.
        drop(body);
        assert!(!activity.is_idle(), "closed before h2 wrote the last frame");
        received.clear();
        assert!(activity.is_idle());
        assert_eq!(activity.owed(), 0);
    }

    /// A body whose end shows only as `None` (an upstream answer of unknown length): an empty
    /// last frame takes the place of the one hyper would send for the end, and holds the count.
    #[test]
    fn a_body_ending_with_none_ends_with_an_empty_frame_that_holds_the_stream() {
        let activity = StreamActivity::new(TIMEOUT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut body = Box::pin(TrackedBody::new(
            UnknownLength(Some(Bytes::from_static(b"chunk"))),
            activity.open_stream(),
        ));
        assert!(!body.is_end_stream());
        assert_eq!(&data_of(body.as_mut().poll_frame(&mut cx))[..], b"chunk");
        assert!(!body.is_end_stream());
        let end = data_of(body.as_mut().poll_frame(&mut cx));
        assert!(end.is_empty());
        assert!(body.is_end_stream());
        drop(body);
        assert!(!activity.is_idle());
        drop(end);
        assert!(activity.is_idle());
        assert_eq!(activity.owed(), 0);
    }

    /// One chunk, then `None`: a body that cannot tell its end in advance.
    struct UnknownLength(Option<Bytes>);

    impl Body for UnknownLength {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_upstream_is_never_stalled() {
        let activity = StreamActivity::new(TIMEOUT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut body = Box::pin(TrackedBody::new(Waiting, activity.open_stream()));
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(activity.owed(), 0);
        let stalled = tokio::time::timeout(TIMEOUT * 4, activity.stalled_for()).await;
        assert!(
            stalled.is_err(),
            "a stream waiting for its upstream counted as stalled"
        );
    }

    #[test]
    fn a_body_counts_its_stream_until_dropped() {
        let activity = StreamActivity::new(TIMEOUT);
        let body = TrackedBody::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
            activity.open_stream(),
        );
        assert_eq!(activity.open.load(Ordering::Acquire), 1);
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(activity.open.load(Ordering::Acquire), 0);
        assert!(activity.idle_since() > activity.start);
    }
}

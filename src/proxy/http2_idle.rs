//! When an HTTP/2 client connection is idle: no stream open for `server.http2_idle_timeout`.
//!
//! Why: an HTTP/1 connection idle between requests is closed by hyper's header timer
//! (`server.header_read_timeout` runs again for each request head), but an HTTP/2 connection
//! with no stream open has no timer at all in hyper. A client could complete the preface and
//! then hold the connection, and its `server.max_connections` slot, forever; a few thousand such
//! connections lock everyone else out. nginx closes them after `keepalive_timeout` (75 s).
//!
//! A stream counts as open from its request's arrival until its response body is finished or
//! dropped (a client reset included), so a long download or a slow upstream keeps the
//! connection. Only HTTP/2 connections are tracked: HTTP/1's request path pays nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// Streams whose response body handed hyper a frame that hyper has not come back for:
    /// it waits for the client's flow-control credit to send it (see [`Self::stalled_for`]).
    owed: AtomicUsize,
    /// Nanoseconds from `start` to the last time hyper asked any response body for a frame.
    last_pull: AtomicU64,
}

impl StreamActivity {
    pub(crate) fn new() -> Arc<StreamActivity> {
        Arc::new(StreamActivity {
            open: AtomicUsize::new(0),
            start: Instant::now(),
            last_closed: AtomicU64::new(0),
            owed: AtomicUsize::new(0),
            last_pull: AtomicU64::new(0),
        })
    }

    /// Nanoseconds since the connection opened (saturates at ~584 years).
    fn age_nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Completes once a stream has been waiting to send for `timeout` with no response body
    /// asked for a frame meanwhile: the client gives no flow-control credit (it never sends
    /// WINDOW_UPDATE), so hyper's stream waits forever and no socket write ever blocks (the
    /// `write_stall` limit cannot see it). Such a client held its connection slot, and the
    /// upstream connections and answers of up to `http2_max_concurrent_streams` streams,
    /// forever. A stream waiting for its upstream is not waiting to send: a slow upstream or
    /// a quiet event stream never ends a connection. Checked per connection: while any body
    /// is being read from, the connection counts as moving.
    pub(crate) async fn stalled_for(&self, timeout: Duration) {
        loop {
            if self.owed.load(Ordering::Acquire) > 0 {
                let deadline = self.start
                    + Duration::from_nanos(self.last_pull.load(Ordering::Acquire))
                    + timeout;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            } else {
                tokio::time::sleep(timeout).await;
            }
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

pin_project! {
    /// A response body that keeps its stream counted as open until it is finished or dropped,
    /// and counts it as waiting to send from each frame it hands hyper until hyper asks again.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: StreamGuard,
        owes: bool,
    }

    impl<B> PinnedDrop for TrackedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.owes {
                this.guard.activity.owed.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, guard: StreamGuard) -> TrackedBody<B> {
        TrackedBody {
            inner,
            guard,
            owes: false,
        }
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let activity = &this.guard.activity;
        activity
            .last_pull
            .fetch_max(activity.age_nanos(), Ordering::AcqRel);
        let polled = this.inner.poll_frame(cx);
        // Owed from a frame handed over until hyper, having sent it, asks again; not while
        // the body itself waits (its upstream) or once it has ended.
        let owes = matches!(polled, Poll::Ready(Some(Ok(_))));
        if owes != *this.owes {
            *this.owes = owes;
            if owes {
                activity.owed.fetch_add(1, Ordering::AcqRel);
            } else {
                activity.owed.fetch_sub(1, Ordering::AcqRel);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
        let activity = StreamActivity::new();
        let started = Instant::now();
        activity.idle_for(TIMEOUT).await;
        let took = started.elapsed();
        assert!(took >= TIMEOUT && took < TIMEOUT + SLACK, "{took:?}");
    }

    #[tokio::test]
    async fn an_open_stream_keeps_the_connection_and_its_close_restarts_the_clock() {
        let activity = StreamActivity::new();
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
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_stream_handed_a_frame_that_hyper_never_comes_back_for_is_stalled() {
        let activity = StreamActivity::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let full = http_body_util::Full::new(bytes::Bytes::from_static(b"answer"));
        let mut body = Box::pin(TrackedBody::new(full, activity.open_stream()));
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(activity.owed.load(Ordering::Acquire), 1);
        let started = Instant::now();
        tokio::time::timeout(TIMEOUT + SLACK, activity.stalled_for(TIMEOUT))
            .await
            .expect("stalled");
        assert!(started.elapsed() >= TIMEOUT, "{:?}", started.elapsed());
        // hyper comes back: the body has ended, nothing is owed.
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(activity.owed.load(Ordering::Acquire), 0);
        // A body dropped while owed (a client reset) is not owed any more either.
        let full = http_body_util::Full::new(bytes::Bytes::from_static(b"answer"));
        let mut body = Box::pin(TrackedBody::new(full, activity.open_stream()));
        assert!(body.as_mut().poll_frame(&mut cx).is_ready());
        drop(body);
        assert_eq!(activity.owed.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_upstream_is_never_stalled() {
        let activity = StreamActivity::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut body = Box::pin(TrackedBody::new(Waiting, activity.open_stream()));
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(activity.owed.load(Ordering::Acquire), 0);
        let stalled = tokio::time::timeout(TIMEOUT * 4, activity.stalled_for(TIMEOUT)).await;
        assert!(
            stalled.is_err(),
            "a stream waiting for its upstream counted as stalled"
        );
    }

    #[test]
    fn a_body_counts_its_stream_until_dropped() {
        let activity = StreamActivity::new();
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

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
}

impl StreamActivity {
    pub(crate) fn new() -> Arc<StreamActivity> {
        Arc::new(StreamActivity {
            open: AtomicUsize::new(0),
            start: Instant::now(),
            last_closed: AtomicU64::new(0),
        })
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
    /// A response body that keeps its stream counted as open until it is finished or dropped.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: StreamGuard,
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, guard: StreamGuard) -> TrackedBody<B> {
        TrackedBody { inner, guard }
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
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

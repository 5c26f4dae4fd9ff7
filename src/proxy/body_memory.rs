//! One cap on the memory every request body being read (or held for signing) takes at once,
//! across every connection and event loop: `server.max_body_memory`.
//!
//! Why: the proxy reads a request's body whole before it signs it (the signature covers its
//! digest), so each request in flight may hold up to its route's `max_body`. Each route's
//! limit bounds one request; nothing bounded their sum. One HTTP/2 connection may have
//! `http2_max_concurrent_streams` (256) requests in flight, so one client with a session, or
//! with an `Origin` on a public route that takes writes, could make the proxy hold 256 ×
//! `max_body` (256 MiB by default) and a few such connections exhaust the memory limit its
//! deployment runs under. With the cap, a body that would take the proxy's bodies past it
//! is refused at once with 503 `body_memory_limit` (`Retry-After: 1`), before more of it is
//! read; a request whose `Content-Length` says up front that it cannot fit is refused before
//! any byte of it is read.
//!
//! A request takes its share as its bytes arrive (its whole `Content-Length` at once when it
//! declares one, so a refusal comes before the read, not after most of it), and gives it back
//! when the proxy is done with the request: after its forward (or the login check) ends.
//! Bodiless requests (most GETs) never touch it. A lower limit on reload revokes nothing:
//! bodies being read keep their share, and new ones are refused until enough is given back.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Buf as _;
use http_body::{Body, Frame, SizeHint};

/// The memory request bodies may hold at once (`server.max_body_memory`), shared by every
/// event loop; a reload changes its limit ([`BodyMemory::set_limit`]).
///
/// Two atomics, no lock: a share is taken with one compare-and-swap loop on `held` and given
/// back with one `fetch_sub`.
pub struct BodyMemory {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// Requests refused for want of room (`/metrics`; the refusal counter has them too, by
    /// reason).
    refused: AtomicU64,
    /// Paces the warning about them: a flood of refusals is not a flood of lines.
    refusal_log: crate::layer::PacedLog,
}

impl std::fmt::Debug for BodyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMemory")
            .field("limit", &self.limit.load(Relaxed))
            .field("held", &self.held.load(Relaxed))
            .field("refused", &self.refused.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl BodyMemory {
    /// A cap of `limit` bytes, none of it held.
    pub fn new(limit: usize) -> BodyMemory {
        BodyMemory {
            limit: limit.into(),
            held: 0.into(),
            refused: 0.into(),
            refusal_log: crate::layer::PacedLog::new(),
        }
    }

    /// A reload's `server.max_body_memory`.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// An empty share for one request, given back whole when it is dropped.
    pub fn share(&self) -> BodyShare<'_> {
        BodyShare {
            memory: self,
            bytes: 0,
        }
    }

    /// Takes `bytes` more if the total stays within the limit.
    fn take(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Relaxed);
        self.held
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Counts a refusal; logs it (paced: one line per 10 s, naming how many went unlogged).
    fn refuse(&self, wanted: usize) {
        self.refused.fetch_add(1, Relaxed);
        if let Some(unlogged) = self.refusal_log.turn() {
            tracing::warn!(
                wanted,
                held = self.held.load(Relaxed),
                limit = self.limit.load(Relaxed),
                refused_since_last_line = unlogged,
                "a request body did not fit in server.max_body_memory: answered 503 \
                 body_memory_limit (more bodies are being read at once than the limit holds)"
            );
        }
    }

    /// `countersign_body_memory_{bytes,limit_bytes,refused_total}`.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "# HELP countersign_body_memory_bytes Bytes of request bodies being read or held \
             for signing now (server.max_body_memory bounds them).\n\
             # TYPE countersign_body_memory_bytes gauge\n\
             countersign_body_memory_bytes {}\n\
             # HELP countersign_body_memory_limit_bytes server.max_body_memory now (a reload \
             may change it).\n\
             # TYPE countersign_body_memory_limit_bytes gauge\n\
             countersign_body_memory_limit_bytes {}\n\
             # HELP countersign_body_memory_refused_total Requests answered 503 \
             body_memory_limit: their body did not fit in server.max_body_memory.\n\
             # TYPE countersign_body_memory_refused_total counter\n\
             countersign_body_memory_refused_total {}\n",
            self.held.load(Relaxed),
            self.limit.load(Relaxed),
            self.refused.load(Relaxed),
        );
    }
}

/// One request's part of [`BodyMemory`]: grows as its body arrives, given back when dropped.
#[derive(Debug)]
pub struct BodyShare<'a> {
    memory: &'a BodyMemory,
    bytes: usize,
}

impl BodyShare<'_> {
    /// Makes the share at least `total` bytes; false (and counted, and the share as it was)
    /// when the rest does not fit.
    pub(crate) fn cover(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|&more| more > 0) else {
            return true;
        };
        if self.memory.take(more) {
            self.bytes = total;
            true
        } else {
            self.memory.refuse(total);
            false
        }
    }
}

impl Drop for BodyShare<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.held.fetch_sub(self.bytes, Relaxed);
        }
    }
}

/// The error a [`Metered`] body ends with when its next bytes do not fit.
#[derive(Debug)]
pub(crate) struct OutOfBodyMemory;

impl std::fmt::Display for OutOfBodyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("server.max_body_memory is taken by other request bodies")
    }
}

impl std::error::Error for OutOfBodyMemory {}

pin_project_lite::pin_project! {
    /// A request body whose data frames are added to a [`BodyShare`] before they are handed
    /// on. Bytes past `limit` (the route's `max_body`) are not asked for: the reader refuses
    /// those as too large, which is what they are, whatever room is left.
    pub(crate) struct Metered<'s, 'm, B> {
        #[pin]
        body: B,
        share: &'s mut BodyShare<'m>,
        limit: usize,
        seen: usize,
    }
}

impl<'s, 'm, B> Metered<'s, 'm, B> {
    pub(crate) fn new(body: B, share: &'s mut BodyShare<'m>, limit: usize) -> Metered<'s, 'm, B> {
        Metered {
            body,
            share,
            limit,
            seen: 0,
        }
    }
}

impl<B> Body for Metered<'_, '_, B>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            *this.seen = this.seen.saturating_add(data.remaining());
            if *this.seen <= *this.limit && !this.share.cover(*this.seen) {
                return Poll::Ready(Some(Err(Box::new(OutOfBodyMemory))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, StreamBody};

    fn frames(sizes: &[usize]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// Shares add up to the limit and no further; what a dropped share held is free again,
    /// and a refused growth leaves the share as it was.
    #[test]
    fn shares_fit_within_the_limit_and_are_given_back() {
        let memory = BodyMemory::new(100);
        let mut a = memory.share();
        assert!(a.cover(60));
        let mut b = memory.share();
        assert!(!b.cover(41), "60 + 41 is over 100");
        assert!(b.cover(40));
        assert!(a.cover(60), "covering what is held takes nothing more");
        assert!(!a.cover(61));
        assert_eq!(memory.held.load(Relaxed), 100);
        drop(a);
        assert_eq!(memory.held.load(Relaxed), 40);
        assert!(b.cover(100));
        drop(b);
        assert_eq!(memory.held.load(Relaxed), 0);
        assert_eq!(memory.refused.load(Relaxed), 2);
        // usize::MAX asked for is refused, not wrapped.
        let mut c = memory.share();
        assert!(!c.cover(usize::MAX));
        drop(c);
        assert_eq!(memory.held.load(Relaxed), 0);
    }

    /// A lower limit revokes nothing held; new growth waits until enough is given back.
    #[test]
    fn a_lower_limit_keeps_what_is_held() {
        let memory = BodyMemory::new(100);
        let mut a = memory.share();
        assert!(a.cover(80));
        memory.set_limit(50);
        let mut b = memory.share();
        assert!(!b.cover(1));
        drop(a);
        assert!(b.cover(50));
    }

    /// The metered body takes its bytes frame by frame, refuses the frame that does not fit,
    /// and leaves bytes past the route's limit to the reader (never refused as memory).
    #[tokio::test]
    async fn the_metered_body_takes_its_frames_and_stops_at_the_cap() {
        let memory = BodyMemory::new(10);
        let mut share = memory.share();
        let collected = Metered::new(frames(&[4, 4]), &mut share, 100)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.to_bytes().len(), 8);
        assert_eq!(memory.held.load(Relaxed), 8, "held until the share drops");

        let mut other = memory.share();
        let error = Metered::new(frames(&[1, 4]), &mut other, 100)
            .collect()
            .await
            .unwrap_err();
        assert!(error.is::<OutOfBodyMemory>(), "{error}");
        assert_eq!(
            memory.held.load(Relaxed),
            9,
            "the refused frame took nothing"
        );
        drop(other);
        drop(share);
        assert_eq!(memory.held.load(Relaxed), 0);

        // Past the route's limit (3 bytes): not asked for, so not refused as memory.
        let tiny = BodyMemory::new(2);
        let mut share = tiny.share();
        let collected = Metered::new(frames(&[5]), &mut share, 3)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.to_bytes().len(), 5);
        assert_eq!(tiny.held.load(Relaxed), 0);
    }
}

//! One cap on the memory the request bodies being read (or held) take at once: the
//! [`VerifyLayer`](super::VerifyLayer)'s `max_body_memory`, and the proxy's
//! `server.max_body_memory` (`countersign::proxy::body_memory`).
//!
//! Why: a verifier reads a request's body whole before it can check its digest, so each
//! request in flight may hold up to its body limit. The limit bounds one request; nothing
//! bounded their sum. One HTTP/2 connection may have a few hundred requests in flight (hyper's
//! `max_concurrent_streams` is 200 by default, the proxy's 256), so one client could make the
//! process hold a few hundred times the body limit, and a few such connections exhaust the
//! memory it runs under. With the cap, a body that would take the bodies held past it is
//! refused at once with 503 `body_memory_limit` (`Retry-After: 1`), before more of it is read;
//! a request whose `Content-Length` says up front that it cannot fit is refused before any
//! byte of it is read.
//!
//! A request takes its share as its bytes arrive (its whole `Content-Length` at once when it
//! declares one, so a refusal comes before the read, not after most of it), and gives it back
//! when its share is dropped: its user says when (the proxy after the forward, the layer once
//! the inner service's future completes). Bodiless requests (most GETs) never touch it.
//!
//! It lives in the library, not under `src/proxy/`, because the layer uses it and the library
//! builds without the proxy; the proxy takes it from here (one implementation, one way).

use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf as _;
use http_body::{Body, Frame, SizeHint};

use super::verify::PacedLog;

/// The memory request bodies may hold at once, shared by every connection (and, in the proxy,
/// every event loop); the proxy's reload changes its limit ([`BodyMemory::set_limit`]).
///
/// Two atomics, no lock: a share is taken with one compare-and-swap loop on `held` and given
/// back with one `fetch_sub`.
pub struct BodyMemory {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// Requests refused for want of room (the proxy's `/metrics`).
    refused: AtomicU64,
    /// Paces the warning about them: a flood of refusals is not a flood of lines.
    refusal_log: PacedLog,
    /// The setting that sets the limit, named in that warning (`server.max_body_memory`,
    /// `VerifyLayer::max_body_memory`): what an operator reading it would raise.
    setting: &'static str,
}

impl std::fmt::Debug for BodyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMemory")
            .field("setting", &self.setting)
            .field("limit", &self.limit.load(Relaxed))
            .field("held", &self.held.load(Relaxed))
            .field("refused", &self.refused.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl BodyMemory {
    /// A cap of `limit` bytes, none of it held; `setting` names what sets the limit, in the
    /// warning about refusals (e.g. `"server.max_body_memory"`).
    pub fn new(limit: usize, setting: &'static str) -> BodyMemory {
        BodyMemory {
            limit: limit.into(),
            held: 0.into(),
            refused: 0.into(),
            refusal_log: PacedLog::new(),
            setting,
        }
    }

    /// A reload's `server.max_body_memory`. A lower limit revokes nothing held: new growth
    /// waits until enough is given back.
    #[cfg(feature = "proxy")]
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// An empty share for one request, given back whole when it is dropped.
    // The proxy's (borrowed: its request's `async fn` outlives it); the layer's are owned.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub fn share(&self) -> BodyShare<'_> {
        Share {
            memory: self,
            bytes: 0,
        }
    }

    /// An empty share that owns its reference to the cap (for a future that outlives any
    /// borrow, as the layer's does), given back whole when it is dropped.
    pub(crate) fn owned_share(self: &Arc<Self>) -> OwnedBodyShare {
        Share {
            memory: Arc::clone(self),
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
                "a request body did not fit in {}: answered 503 body_memory_limit (more bodies \
                 are being read at once than the limit holds)",
                self.setting
            );
        }
    }

    /// `countersign_body_memory_{bytes,limit_bytes,refused_total}`.
    #[cfg(feature = "proxy")]
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

    /// What is held now, the limit, and the bodies refused so far: a snapshot, each figure
    /// read on its own (a body may be taken or given back between two of them).
    pub fn usage(&self) -> BodyMemoryUsage {
        BodyMemoryUsage {
            held: self.held.load(Relaxed),
            limit: self.limit.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }

    /// The bytes held now (tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// The limit now (tests).
    #[cfg(test)]
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }
}

/// What a body memory cap holds and has refused ([`VerifyLayer::body_memory_usage`](
/// super::VerifyLayer::body_memory_usage)): the figures a backend exports as gauges and a
/// counter, beside its count of 503 `body_memory_limit` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BodyMemoryUsage {
    /// Bytes of request bodies being read or held now.
    pub held: usize,
    /// The cap in force, in bytes.
    pub limit: usize,
    /// Bodies refused 503 `body_memory_limit` since the cap was made.
    pub refused: u64,
}

/// One request's part of a [`BodyMemory`]: grows as its body arrives, given back when dropped.
/// `M` is how it reaches the cap: borrowed ([`BodyShare`], the proxy's, which lives in the
/// request's own `async fn`) or owned (`Arc`, the layer's, which a response future carries).
#[derive(Debug)]
pub struct Share<M: Deref<Target = BodyMemory>> {
    memory: M,
    bytes: usize,
}

/// A share borrowing its [`BodyMemory`].
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub type BodyShare<'a> = Share<&'a BodyMemory>;

/// A share owning a reference to its [`BodyMemory`].
pub(crate) type OwnedBodyShare = Share<Arc<BodyMemory>>;

impl<M: Deref<Target = BodyMemory>> Share<M> {
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

impl OwnedBodyShare {
    /// What this share holds, moved into a new share; this one is left empty (its drop gives
    /// back nothing). For a share that must outlive the body reader holding it.
    pub(crate) fn split_off(&mut self) -> OwnedBodyShare {
        Share {
            memory: Arc::clone(&self.memory),
            bytes: std::mem::take(&mut self.bytes),
        }
    }
}

impl<M: Deref<Target = BodyMemory>> Drop for Share<M> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.held.fetch_sub(self.bytes, Relaxed);
        }
    }
}

/// A share a [`Metered`] body grows: the share itself, or a borrow of it.
pub(crate) trait Cover {
    /// [`Share::cover`].
    fn cover(&mut self, total: usize) -> bool;
}

impl<M: Deref<Target = BodyMemory>> Cover for Share<M> {
    fn cover(&mut self, total: usize) -> bool {
        Share::cover(self, total)
    }
}

impl<T: Cover + ?Sized> Cover for &mut T {
    fn cover(&mut self, total: usize) -> bool {
        (**self).cover(total)
    }
}

/// The error a [`Metered`] body ends with when its next bytes do not fit.
#[derive(Debug)]
pub(crate) struct OutOfBodyMemory;

impl std::fmt::Display for OutOfBodyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the memory for request bodies is taken by other request bodies")
    }
}

impl std::error::Error for OutOfBodyMemory {}

pin_project_lite::pin_project! {
    /// A request body whose data frames are added to a share before they are handed on.
    /// Bytes past `limit` (the body limit) are not asked for: the reader refuses those as too
    /// large, which is what they are, whatever room is left.
    pub(crate) struct Metered<B, S> {
        #[pin]
        body: B,
        share: S,
        limit: usize,
        seen: usize,
    }
}

impl<B, S> Metered<B, S> {
    pub(crate) fn new(body: B, share: S, limit: usize) -> Metered<B, S> {
        Metered {
            body,
            share,
            limit,
            seen: 0,
        }
    }

    /// The share, to take what it holds once the body is read.
    pub(crate) fn share_mut(self: Pin<&mut Self>) -> &mut S {
        self.project().share
    }
}

impl<B, S> Body for Metered<B, S>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: Cover,
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
    use http_body_util::BodyExt as _;
    use std::collections::VecDeque;

    /// Data frames handed out one per poll, then the end (no stream crate: the library's
    /// tests build without default features).
    struct Frames(VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    fn frames(sizes: &[usize]) -> Frames {
        Frames(sizes.iter().map(|&n| Bytes::from(vec![b'x'; n])).collect())
    }

    fn memory(limit: usize) -> BodyMemory {
        BodyMemory::new(limit, "test.max_body_memory")
    }

    /// Shares add up to the limit and no further; what a dropped share held is free again,
    /// and a refused growth leaves the share as it was.
    #[test]
    fn shares_fit_within_the_limit_and_are_given_back() {
        let memory = memory(100);
        let mut a = memory.share();
        assert!(a.cover(60));
        let mut b = memory.share();
        assert!(!b.cover(41), "60 + 41 is over 100");
        assert!(b.cover(40));
        assert!(a.cover(60), "covering what is held takes nothing more");
        assert!(!a.cover(61));
        assert_eq!(memory.held(), 100);
        drop(a);
        assert_eq!(memory.held(), 40);
        assert!(b.cover(100));
        drop(b);
        assert_eq!(memory.held(), 0);
        assert_eq!(memory.refused.load(Relaxed), 2);
        // usize::MAX asked for is refused, not wrapped.
        let mut c = memory.share();
        assert!(!c.cover(usize::MAX));
        drop(c);
        assert_eq!(memory.held(), 0);
    }

    /// A lower limit revokes nothing held; new growth waits until enough is given back.
    #[cfg(feature = "proxy")]
    #[test]
    fn a_lower_limit_keeps_what_is_held() {
        let memory = memory(100);
        let mut a = memory.share();
        assert!(a.cover(80));
        memory.set_limit(50);
        let mut b = memory.share();
        assert!(!b.cover(1));
        drop(a);
        assert!(b.cover(50));
    }

    /// An owned share draws on the same cap as a borrowed one; what it holds moves with
    /// `split_off` (the emptied share gives back nothing) and is given back once, when the
    /// share holding it drops.
    #[test]
    fn an_owned_share_is_given_back_by_whoever_holds_it_last() {
        let memory = Arc::new(memory(100));
        let mut owned = memory.owned_share();
        assert!(owned.cover(70));
        let mut borrowed = memory.share();
        assert!(!borrowed.cover(31));
        let moved = owned.split_off();
        drop(owned);
        assert_eq!(memory.held(), 70, "the emptied share gave back nothing");
        drop(moved);
        assert_eq!(memory.held(), 0);
        assert!(borrowed.cover(100));
    }

    /// The metered body takes its bytes frame by frame, refuses the frame that does not fit,
    /// and leaves bytes past the body limit to the reader (never refused as memory).
    #[tokio::test]
    async fn the_metered_body_takes_its_frames_and_stops_at_the_cap() {
        let memory = memory(10);
        let mut share = memory.share();
        let collected = Metered::new(frames(&[4, 4]), &mut share, 100)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.to_bytes().len(), 8);
        assert_eq!(memory.held(), 8, "held until the share drops");

        let mut other = memory.share();
        let error = Metered::new(frames(&[1, 4]), &mut other, 100)
            .collect()
            .await
            .unwrap_err();
        assert!(error.is::<OutOfBodyMemory>(), "{error}");
        assert_eq!(memory.held(), 9, "the refused frame took nothing");
        drop(other);
        drop(share);
        assert_eq!(memory.held(), 0);

        // Past the body limit (3 bytes): not asked for, so not refused as memory.
        let tiny = BodyMemory::new(2, "test.max_body_memory");
        let mut share = tiny.share();
        let collected = Metered::new(frames(&[5]), &mut share, 3)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.to_bytes().len(), 5);
        assert_eq!(tiny.held(), 0);
    }
}

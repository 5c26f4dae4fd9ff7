//! A replay cache that only answers asynchronously, as a networked one does: it keeps the
//! trait's default `try_check_and_record_now` (`None`), and its answer comes only after the task
//! has yielded once, so the verify layer's waiting path is the one exercised. Shared by the
//! layer tests (`layer_verify`, `layer_perf_fast_path`).

use std::sync::{Arc, Mutex};

use countersign::replay::{
    MemoryReplayCache, ReplayCache, ReplayError, ReplayFuture, ReplayOutcome,
};

pub struct AsyncOnlyCache {
    /// Where nonces are kept (room for 100).
    pub memory: MemoryReplayCache,
    /// Answer every check with an error and report not ready (a cache that is down).
    pub unreachable: bool,
    /// The nonces the layer hinted with `prefetch`, in order.
    pub prefetched: Mutex<Vec<String>>,
}

impl AsyncOnlyCache {
    pub fn new(unreachable: bool) -> Arc<Self> {
        Arc::new(AsyncOnlyCache {
            memory: MemoryReplayCache::new(100),
            unreachable,
            prefetched: Mutex::new(Vec::new()),
        })
    }
}

impl ReplayCache for AsyncOnlyCache {
    fn check_and_record<'a>(
        &'a self,
        nonce: &'a str,
        expires_at: u64,
        now: u64,
    ) -> ReplayFuture<'a, Result<ReplayOutcome, ReplayError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            if self.unreachable {
                return Err(ReplayError::new("unreachable (test)"));
            }
            self.memory.check_and_record_now(nonce, expires_at, now)
        })
    }

    fn prefetch(&self, nonce: &str) {
        self.prefetched.lock().unwrap().push(nonce.to_owned());
        self.memory.prefetch(nonce);
    }

    fn ready(&self) -> ReplayFuture<'_, bool> {
        Box::pin(std::future::ready(!self.unreachable))
    }
}

//! Replay caches: remember each accepted nonce until its signature could no longer be accepted,
//! so a captured request cannot be sent twice.
//!
//! [`ReplayCache`] is object-safe (`Arc<dyn ReplayCache>`) and async through boxed futures, so a
//! networked store fits the same interface: its contract is an atomic "record the nonce until
//! `expires_at` unless already recorded", as Redis' `SET key <token> NX GET` with an expiry does (a new
//! record is [`ReplayOutcome::Fresh`], one already there [`ReplayOutcome::Replayed`], a
//! connection error a [`ReplayError`]). How long to keep it is best given relative to the
//! verifier's own clock, not as an absolute time the store's host reads on its own clock:
//! `RedisReplayCache` (feature `redis`) sends `expires_at - now` plus one second (`PX`), not
//! `EXAT`.
//! [`MemoryReplayCache`] is the in-process implementation; it also answers through
//! [`ReplayCache::try_check_and_record_now`], which spares the verify layer a boxed future per
//! request.
//!
//! Every implementation fails closed: when it cannot record a nonce (full, unreachable) it
//! returns an error, which the verify layer turns into `503 replay_cache_unavailable`. It never
//! evicts a live entry to make room, because eviction would re-open the replay it guards.
//!
//! Both implementations also fail closed when the wall clock went back: a nonce whose expiry
//! the cache has already seen pass (the latest `now` it was called with), while the caller's
//! `now` says it is still valid, may have been forgotten (counted out by the memory cache,
//! expired by Redis), so it is refused with a [`ReplayError`] saying `the clock went back`
//! instead of being recorded as new, until the clock is past what the cache saw (see
//! docs/OPERATIONS.md, Clocks). The one exception is a caller just one second behind the
//! cache, asking about a nonce that expires at the second the cache saw: that is only another
//! thread's request of the next second recorded first, no clock moved, and the signature's
//! window has closed by then: it is refused with [`ReplayError::expired`] (`401 expired`).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::core::{Reason, VerifyError};

mod memory;

pub use memory::{MemoryReplayCache, DEFAULT_SHARDS};
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redis_url;
#[cfg(feature = "redis")]
pub use self::redis::{
    RedisCallError, RedisConnection, RedisLink, RedisOptions, RedisReplayCache, RedisUrlError,
    SentinelOptions, DEFAULT_REPLAY_PREFIX, DEFAULT_SENTINEL_PORT,
};
#[cfg(feature = "redis")]
pub use self::redis_url::{
    host_port_entry_key, host_port_entry_problem, redis_url_parse_problem,
    split_host_less_redis_url, url_authority_host, HostLessRedisUrl, HostLessUrlProblem,
    HostPortProblem,
};

/// What [`ReplayCache::check_and_record`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayOutcome {
    /// The nonce was unseen and is now recorded.
    Fresh,
    /// The nonce was seen before and is still live: reject the request.
    Replayed,
}

/// The cache could not record the nonce. The request must be rejected with [`reason`]: almost
/// always [`Reason::ReplayCacheUnavailable`] (full, unreachable, or the clock went back);
/// [`Reason::Expired`] when the cache has already seen the second the signature's window
/// closes at ([`ReplayError::expired`]).
///
/// [`reason`]: ReplayError::reason
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError {
    reason: Reason,
    detail: Cow<'static, str>,
}

impl ReplayError {
    /// An error with a detail for logs (never sent to clients; must not contain secrets); its
    /// reason is [`Reason::ReplayCacheUnavailable`].
    pub fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        ReplayError {
            reason: Reason::ReplayCacheUnavailable,
            detail: detail.into(),
        }
    }

    /// The refusal of a nonce whose expiry (the signature's `replay_until`) is a second the
    /// cache has already seen, while the caller's `now` is the second just before it: a
    /// request of the next second was recorded first (another thread read the clock a moment
    /// later), and no clock needs to have moved. The signature's window has closed by the time
    /// it is answered, so its reason is [`Reason::Expired`], as for a body completed after the
    /// window (docs/PROTOCOL.md §6, phase 3).
    pub fn expired(detail: impl Into<Cow<'static, str>>) -> Self {
        ReplayError {
            reason: Reason::Expired,
            detail: detail.into(),
        }
    }

    /// What went wrong (for logs).
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The wire reason: [`Reason::ReplayCacheUnavailable`], or [`Reason::Expired`] for
    /// [`ReplayError::expired`].
    pub fn reason(&self) -> Reason {
        self.reason
    }
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Expired => write!(f, "signature expired: {}", self.detail),
            _ => write!(f, "replay cache unavailable: {}", self.detail),
        }
    }
}

impl std::error::Error for ReplayError {}

impl From<ReplayError> for VerifyError {
    fn from(e: ReplayError) -> Self {
        VerifyError::new(e.reason, e.detail)
    }
}

/// The future a [`ReplayCache`] method returns.
pub type ReplayFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store of seen nonces.
pub trait ReplayCache: Send + Sync + 'static {
    /// Atomically: if `nonce` is unseen, record it until `expires_at` (unix seconds, exclusive:
    /// from that second on the entry is gone) and return [`ReplayOutcome::Fresh`]; else
    /// [`ReplayOutcome::Replayed`]. `now` is the caller's unix time. Full or unreachable ->
    /// `Err` (fail closed, never evict live entries); an `expires_at` the cache has already
    /// seen pass -> `Err` too (see the module's documentation). The verify layer calls it only
    /// while the signature is still acceptable, so with `now < expires_at`.
    fn check_and_record<'a>(
        &'a self,
        nonce: &'a str,
        expires_at: u64,
        now: u64,
    ) -> ReplayFuture<'a, Result<ReplayOutcome, ReplayError>>;

    /// The same check answered without waiting, for caches that never wait (in process):
    /// `Some(result)` is exactly what [`check_and_record`](Self::check_and_record) would have
    /// resolved to, with the same effect on the cache; `None` means "ask
    /// [`check_and_record`](Self::check_and_record)" and must leave the cache untouched.
    ///
    /// The verify layer tries this first, so an in-process cache costs no boxed future and no
    /// await per request. The default answers `None`: a networked cache (Redis) needs nothing
    /// more than `check_and_record`.
    fn try_check_and_record_now(
        &self,
        nonce: &str,
        expires_at: u64,
        now: u64,
    ) -> Option<Result<ReplayOutcome, ReplayError>> {
        let _ = (nonce, expires_at, now);
        None
    }

    /// A hint that `nonce` will be checked soon: an in-process cache may start loading the
    /// memory that check will touch, so that the load overlaps the caller's work in between
    /// (the verify layer calls it once a signature's times check out, before the MAC and the
    /// body's digest). The request may still fail those, so it must not change what the cache
    /// holds or answers. The default does nothing.
    fn prefetch(&self, nonce: &str) {
        let _ = nonce;
    }

    /// Readiness (for `/readyz`): whether the cache can record nonces now.
    fn ready(&self) -> ReplayFuture<'_, bool>;
}

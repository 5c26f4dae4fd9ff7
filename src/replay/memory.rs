//! The in-process replay cache.
//!
//! Layout: `shards` independent shards, each behind its own `parking_lot::Mutex`, so concurrent
//! requests rarely contend. A shard holds
//! - `live`: the set of recorded nonces, each stored as a 128-bit keyed hash (two SipHash-1-3
//!   hashes under independent random keys, from std's `RandomState`): 16 bytes per entry
//!   whatever the nonce length, and since the keys are secret and random per cache, an attacker
//!   cannot choose nonces that collide or that all land in one shard. SipHash is a keyed PRF
//!   made for exactly this and costs a few nanoseconds per nonce, where the HMAC-SHA256 used
//!   before cost ~0.4 µs, the largest single cost of the cache;
//! - `expiry`: a `BTreeMap` from expiry second to the hashes expiring then.
//!
//! Expiry is lazy and O(1) amortised per entry: every call pops the shard's buckets whose second
//! has come (each entry is removed exactly once, by the bucket that holds it); nothing ever scans
//! the live entries. When the cache is full, one sweep of every shard's expired buckets runs at
//! most once per second before the cache reports an error.
//!
//! Capacity is global (one atomic counter), so `max_entries` is exact, not per shard.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::collections::hash_map::RandomState;

use parking_lot::Mutex;

use super::{ReplayCache, ReplayError, ReplayFuture, ReplayOutcome};

/// Default number of shards.
pub const DEFAULT_SHARDS: usize = 64;

/// A concurrent, sharded, bounded in-memory [`ReplayCache`].
///
/// Memory: about 40 bytes per entry (the 16-byte hash in a hash set and again in its expiry
/// bucket, plus table and vector slack), so one million entries take roughly 40-70 MiB.
pub struct MemoryReplayCache {
    /// The two secret SipHash keys of the 128-bit nonce hash (high and low half).
    hash_keys: [RandomState; 2],
    shards: Box<[PaddedShard]>,
    /// Entries recorded and not yet purged, over all shards.
    entries: AtomicUsize,
    max_entries: usize,
    /// The `now` of the last full sweep (rate-limits sweeps while full).
    last_sweep: AtomicU64,
}

impl std::fmt::Debug for MemoryReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash key is a secret: never printed.
        f.debug_struct("MemoryReplayCache")
            .field("shards", &self.shards.len())
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

/// A shard on cache lines of its own (128 bytes: the unit adjacent-line prefetchers pull in
/// pairs). Unpadded, neighbouring shards shared lines, so two cores recording nonces in
/// different shards still stole each other's lines, and one shard's lock and table header could
/// straddle two lines: padding alone cut the cost of a recording at 600k live entries from
/// ~250 to ~170 ns with one thread, and from ~500-770 to ~340-400 ns of CPU with two.
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

impl std::ops::Deref for PaddedShard {
    type Target = Mutex<Shard>;

    fn deref(&self) -> &Mutex<Shard> {
        &self.0
    }
}

#[derive(Default)]
struct Shard {
    /// A set (unit values): a map only for its entry API, which finds a key's slot once for
    /// both the "seen?" check and the insert.
    live: HashMap<u128, (), PrehashedState>,
    expiry: BTreeMap<u64, Vec<u128>>,
    /// Entries visited by purges (tests prove expiry never scans live entries).
    #[cfg(test)]
    examined: usize,
}

impl Shard {
    /// Pops every bucket whose second has come; returns how many entries it removed.
    fn purge(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while let Some(bucket) = self.expiry.first_entry() {
            if *bucket.key() > now {
                break;
            }
            for key in bucket.remove() {
                #[cfg(test)]
                {
                    self.examined += 1;
                }
                if self.live.remove(&key).is_some() {
                    removed += 1;
                }
            }
        }
        if removed > 0 && self.live.capacity() > 64 && self.live.len() < self.live.capacity() / 4 {
            // Give memory back after a burst, keeping room to grow without rehashing at once.
            self.live.shrink_to(self.live.len() * 2);
        }
        removed
    }
}

impl MemoryReplayCache {
    /// A cache holding at most `max_entries` live nonces, with [`DEFAULT_SHARDS`] shards.
    pub fn new(max_entries: usize) -> Self {
        Self::with_shards(max_entries, DEFAULT_SHARDS)
    }

    /// A cache with `shards` shards (at least one). More shards, less lock contention.
    pub fn with_shards(max_entries: usize, shards: usize) -> Self {
        // Each `RandomState` carries its own random SipHash key (seeded from the OS per
        // thread, then varied per instance), so the two halves are independent keyed hashes.
        let hash_keys = [RandomState::new(), RandomState::new()];
        let shards = (0..shards.max(1))
            .map(|_| PaddedShard(Mutex::new(Shard::default())))
            .collect();
        MemoryReplayCache {
            hash_keys,
            shards,
            entries: AtomicUsize::new(0),
            max_entries,
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Entries currently held (recorded and not yet purged; an expired entry counts until the
    /// next call touching its shard, or the next [`purge_expired`](Self::purge_expired)).
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured maximum.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Removes every entry expired at `now` from all shards (only expired buckets are visited).
    /// Optional: expiry also happens lazily on each call. Returns how many were removed.
    pub fn purge_expired(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let n = shard.lock().purge(now);
            self.entries.fetch_sub(n, Ordering::Relaxed);
            removed += n;
        }
        removed
    }

    /// The synchronous core of [`ReplayCache::check_and_record`].
    pub fn check_and_record_now(
        &self,
        nonce: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<ReplayOutcome, ReplayError> {
        let key = self.key_of(nonce);
        // An entry must outlive the current second, or a replay within it would pass.
        let expires_at = expires_at.max(now.saturating_add(1));
        let shard = &self.shards[self.shard_index(key)];
        if let Some(outcome) = self.try_record(shard, key, expires_at, now) {
            return Ok(outcome);
        }
        // Full. Other shards may hold expired entries nobody has touched yet: sweep them, at
        // most once per second so a full cache under load does not sweep on every request.
        let last = self.last_sweep.load(Ordering::Relaxed);
        if last < now
            && self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.purge_expired(now);
            if let Some(outcome) = self.try_record(shard, key, expires_at, now) {
                return Ok(outcome);
            }
        }
        tracing::warn!(
            max_entries = self.max_entries,
            "replay cache full: rejecting requests until entries expire"
        );
        Err(ReplayError::new("memory replay cache is full"))
    }

    /// `Some(outcome)`, or `None` when the cache is full.
    fn try_record(
        &self,
        shard: &Mutex<Shard>,
        key: u128,
        expires_at: u64,
        now: u64,
    ) -> Option<ReplayOutcome> {
        let mut guard = shard.lock();
        let shard = &mut *guard;
        let purged = shard.purge(now);
        // The counter is shared by every core: touch it only when something changed.
        if purged > 0 {
            self.entries.fetch_sub(purged, Ordering::Relaxed);
        }
        let Entry::Vacant(slot) = shard.live.entry(key) else {
            return Some(ReplayOutcome::Replayed);
        };
        // Reserve a slot before inserting, so concurrent shards never overshoot the maximum.
        self.entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .ok()?;
        slot.insert(());
        // Requests arrive in time order, so the entry nearly always joins the newest bucket:
        // reach it along the tree's right edge instead of searching for it.
        match shard.expiry.last_entry() {
            Some(mut newest) if *newest.key() == expires_at => newest.get_mut().push(key),
            _ => shard.expiry.entry(expires_at).or_default().push(key),
        }
        Some(ReplayOutcome::Fresh)
    }

    /// High bits pick the shard; the hash set uses the low bits.
    fn shard_index(&self, key: u128) -> usize {
        ((key >> 64) as u64 % self.shards.len() as u64) as usize
    }

    fn key_of(&self, nonce: &str) -> u128 {
        // `write` of the raw bytes: one message per hasher, and SipHash folds the length into
        // its last block, so no terminator is needed.
        let half = |state: &RandomState| {
            let mut hasher = state.build_hasher();
            hasher.write(nonce.as_bytes());
            hasher.finish()
        };
        (u128::from(half(&self.hash_keys[0])) << 64) | u128::from(half(&self.hash_keys[1]))
    }
}

impl ReplayCache for MemoryReplayCache {
    fn check_and_record<'a>(
        &'a self,
        nonce: &'a str,
        expires_at: u64,
        now: u64,
    ) -> ReplayFuture<'a, Result<ReplayOutcome, ReplayError>> {
        Box::pin(std::future::ready(
            self.check_and_record_now(nonce, expires_at, now),
        ))
    }

    fn try_check_and_record_now(
        &self,
        nonce: &str,
        expires_at: u64,
        now: u64,
    ) -> Option<Result<ReplayOutcome, ReplayError>> {
        Some(self.check_and_record_now(nonce, expires_at, now))
    }

    fn ready(&self) -> ReplayFuture<'_, bool> {
        // Ready while there is room (expired-but-unpurged entries count as taken: conservative).
        Box::pin(std::future::ready(self.len() < self.max_entries))
    }
}

/// Hash-set keys are already uniform keyed hashes: hashing them again (SipHash) would only cost
/// time, and HashDoS is impossible since the key is secret. This passes the low 64 bits through.
#[derive(Clone, Copy, Default)]
struct PrehashedState;

impl BuildHasher for PrehashedState {
    type Hasher = Prehashed;
    fn build_hasher(&self) -> Prehashed {
        Prehashed(0)
    }
}

#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed (via write_u128); fold anything else in for completeness.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prehashed_passes_low_bits() {
        let state = PrehashedState;
        let mut h = state.build_hasher();
        h.write_u128(0xdead_beef_0000_0000_0123_4567_89ab_cdef);
        assert_eq!(h.finish(), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn keys_differ_per_process_key_and_nonce() {
        let a = MemoryReplayCache::new(10);
        let b = MemoryReplayCache::new(10);
        assert_eq!(a.key_of("n1"), a.key_of("n1"));
        assert_ne!(a.key_of("n1"), a.key_of("n2"));
        assert_ne!(a.key_of("n1"), b.key_of("n1"));
    }

    #[test]
    fn expired_entry_is_purged_before_lookup() {
        let cache = MemoryReplayCache::with_shards(10, 1);
        assert_eq!(
            cache.check_and_record_now("n", 105, 100),
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            cache.check_and_record_now("n", 105, 104),
            Ok(ReplayOutcome::Replayed)
        );
        // At 105 the entry is gone: the same nonce records afresh (its signature is expired
        // anyway; the verifier rejects it before the cache is asked).
        assert_eq!(
            cache.check_and_record_now("n", 110, 105),
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(cache.len(), 1);
        let shard = cache.shards[0].lock();
        assert_eq!(shard.expiry.len(), 1);
        assert!(shard.expiry.contains_key(&110));
    }

    /// Nonces that land in shard `index`.
    fn nonces_in_shard(cache: &MemoryReplayCache, index: usize, count: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("nonce-{i}"))
            .filter(|n| cache.shard_index(cache.key_of(n)) == index)
            .take(count)
            .collect()
    }

    #[test]
    fn full_cache_sweeps_other_shards_at_most_once_per_second() {
        let cache = MemoryReplayCache::with_shards(2, 4);
        let in_zero = nonces_in_shard(&cache, 0, 2);
        let in_one = nonces_in_shard(&cache, 1, 2);
        for n in &in_zero {
            assert_eq!(
                cache.check_and_record_now(n, 103, 100),
                Ok(ReplayOutcome::Fresh)
            );
        }
        // Full, nothing expired: the sweep at 102 finds nothing.
        assert!(cache.check_and_record_now(&in_one[0], 110, 102).is_err());
        assert_eq!(cache.last_sweep.load(Ordering::Relaxed), 102);
        // At 103 shard 0's entries have expired, but shard 1 (touched) has none: only the
        // sweep of all shards makes room.
        assert_eq!(
            cache.check_and_record_now(&in_one[0], 110, 103),
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.shards[0].lock().live.len(), 0);

        // Rate limit: an entry in shard 0 that is expired at 103 (recorded by a caller whose
        // clock lagged) is not reclaimed by a second full-path call within second 103...
        assert_eq!(
            cache.check_and_record_now(&in_zero[0], 102, 101),
            Ok(ReplayOutcome::Fresh)
        );
        assert!(cache.check_and_record_now(&in_one[1], 110, 103).is_err());
        assert_eq!(cache.shards[0].lock().live.len(), 1);
        // ...but by the first one of the next second.
        assert_eq!(
            cache.check_and_record_now(&in_one[1], 110, 104),
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn expiry_visits_only_expired_entries() {
        let cache = MemoryReplayCache::with_shards(100_000, 1);
        for i in 0..20_000 {
            let expires = if i % 1000 == 0 { 105 } else { 150 };
            cache
                .check_and_record_now(&format!("n{i}"), expires, 100)
                .unwrap();
        }
        assert_eq!(cache.shards[0].lock().examined, 0);
        // At 105 the 20 short-lived entries go; the 19,980 live ones are not looked at.
        cache.check_and_record_now("probe", 150, 105).unwrap();
        assert_eq!(cache.shards[0].lock().examined, 20);
        assert_eq!(cache.len(), 19_981);
        // Later calls before 150 visit nothing.
        for now in 106..150 {
            cache
                .check_and_record_now(&format!("p{now}"), 150, now)
                .unwrap();
        }
        assert_eq!(cache.shards[0].lock().examined, 20);
        cache.purge_expired(150);
        assert_eq!(cache.shards[0].lock().examined, 20 + 19_981 + 44);
        assert!(cache.is_empty());
    }
}

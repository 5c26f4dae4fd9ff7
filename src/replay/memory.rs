//! The in-process replay cache.
//!
//! Layout: `shards` independent shards, each behind its own `parking_lot::Mutex`, so concurrent
//! requests rarely contend. A nonce is stored as a 128-bit keyed fingerprint (SipHash-1-3 with
//! 128-bit output, `siphasher`, under a 128-bit key drawn from the OS for each cache): 16 bytes
//! whatever the nonce length, and since the key is secret and random per cache, an attacker
//! cannot choose nonces that collide or that all land in one shard or one bucket. Two live
//! nonces share a fingerprint with probability ~n²/2¹²⁹ (n live entries): a false `replayed` is
//! negligible. (One 128-bit hash rather than two 64-bit ones from std's `RandomState`: those
//! keys are related, the second being the first plus one, and it is half the hashing.)
//!
//! Each shard is one open-addressed [`Table`] of 64-byte buckets, each bucket one cache line
//! holding three fingerprints, their expiry seconds and a probe marker. Why: the cache is
//! memory-bound (at ~1M live nonces nothing fits in cache), and a general-purpose hash set
//! touched two lines per record (control bytes, then the slot) plus a per-second expiry list;
//! here a record nearly always touches only its home bucket.
//!
//! Expiry is per second and O(1) amortised: a slot whose expiry second has come is free, and is
//! reused in place by a later insert (nothing ever scans the table to find expired entries);
//! each shard keeps only a count of entries per expiry second, popped as time passes, so it
//! knows how many live entries it holds. Probing stays correct without tombstones: a bucket
//! records until when a live entry that was pushed past it lives (`passed_until`), and a lookup
//! walks on only while that is in the future.
//!
//! Capacity (`max_entries`, exact) is leased to shards in chunks from one pool, so the shared
//! counter line is written once per chunk of inserts and expiries, not once per record. When the
//! pool runs dry, every shard's unused lease goes back to it (and expired entries are counted
//! out) before the cache reports itself full: the cache is full only when `max_entries` entries
//! are held. It never evicts a live entry.

use std::collections::BTreeMap;
use std::hash::Hasher as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use rand::RngCore as _;
use siphasher::sip128::{Hasher128 as _, SipHasher13};

use super::{ReplayCache, ReplayError, ReplayFuture, ReplayOutcome};

/// Default number of shards.
pub const DEFAULT_SHARDS: usize = 64;

/// Slots per bucket: three 16-byte fingerprints, three 4-byte expiries and a 4-byte marker fill
/// one 64-byte cache line exactly.
const SLOTS: usize = 3;

/// Smallest table per shard, in buckets (a power of two).
const MIN_BUCKETS: usize = 4;

/// Largest capacity lease a shard takes from the pool at once. Small enough that the leases
/// parked in shards are a small share of a large cache; large enough that the pool's cache line
/// is written once per 64 records instead of on every one.
const MAX_LEASE_CHUNK: usize = 64;

/// A concurrent, sharded, bounded in-memory [`ReplayCache`].
///
/// Memory: 64 bytes per three slots. A table grows (doubles) beyond 3/4 full of live entries,
/// so a growing cache holds 28-57 bytes per live entry (one million entries: roughly 30-55
/// MiB); after a burst expires it shrinks once under 1/8 full.
///
/// Expiries are stored as 32-bit unix seconds: times from 2106-02-07 on are refused with an
/// error (the verify layer answers 503 `replay_cache_unavailable`), never stored in a way that
/// would forget the nonce.
pub struct MemoryReplayCache {
    /// The secret SipHash key of the 128-bit nonce fingerprint.
    hash_key: [u8; 16],
    shards: Box<[PaddedShard]>,
    /// Capacity not leased to any shard.
    pool: AtomicUsize,
    /// How much capacity a shard leases from the pool at once.
    lease_chunk: usize,
    max_entries: usize,
}

impl std::fmt::Debug for MemoryReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash keys are secrets: never printed.
        f.debug_struct("MemoryReplayCache")
            .field("shards", &self.shards.len())
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

/// A shard on cache lines of its own (128 bytes: the unit adjacent-line prefetchers pull in
/// pairs). Unpadded, neighbouring shards shared lines, so two cores recording nonces in
/// different shards still stole each other's lines.
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

impl std::ops::Deref for PaddedShard {
    type Target = Mutex<Shard>;

    fn deref(&self) -> &Mutex<Shard> {
        &self.0
    }
}

/// One cache line of the table. A slot is free when its expiry second has come (`0`: never
/// used), so expiry needs no write to the table.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    fingerprints: [u128; SLOTS],
    expires: [u32; SLOTS],
    /// The latest expiry of a live entry whose probe passed over this (full) bucket to a later
    /// one: while it is in the future, a lookup must look at the next bucket too.
    passed_until: u32,
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

/// An open-addressed table of fingerprints with expiries, linear probing over buckets.
struct Table {
    /// A power of two long.
    buckets: Box<[Bucket]>,
}

/// What a probe for a fingerprint found.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Live,
    Absent,
}

impl Table {
    fn with_buckets(buckets: usize) -> Self {
        Table {
            buckets: vec![Bucket::default(); buckets].into_boxed_slice(),
        }
    }

    fn slots(&self) -> usize {
        self.buckets.len() * SLOTS
    }

    fn home(&self, key: u128) -> usize {
        // The low bits: the shard was chosen by the high ones.
        (key as usize) & (self.buckets.len() - 1)
    }

    /// Whether `key` is held live at `now`.
    fn probe(&self, key: u128, now: u32) -> Probe {
        let mask = self.buckets.len() - 1;
        let mut index = self.home(key);
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[index];
            for slot in 0..SLOTS {
                if bucket.expires[slot] > now && bucket.fingerprints[slot] == key {
                    return Probe::Live;
                }
            }
            // No live entry was pushed past this bucket: nothing further can be `key`'s.
            if bucket.passed_until <= now {
                break;
            }
            index = (index + 1) & mask;
        }
        Probe::Absent
    }

    /// Stores `key` (known absent) in the first free slot from its home bucket on, marking the
    /// full buckets it passes. `false` only when no slot is free (the caller keeps the table at
    /// most 3/4 full of live entries, so that does not happen).
    fn place(&mut self, key: u128, expires: u32, now: u32) -> bool {
        let mask = self.buckets.len() - 1;
        let mut index = self.home(key);
        for _ in 0..self.buckets.len() {
            let bucket = &mut self.buckets[index];
            if let Some(slot) = (0..SLOTS).find(|&slot| bucket.expires[slot] <= now) {
                bucket.fingerprints[slot] = key;
                bucket.expires[slot] = expires;
                return true;
            }
            bucket.passed_until = bucket.passed_until.max(expires);
            index = (index + 1) & mask;
        }
        false
    }

    /// The same entries live at `now` in a table of `buckets` buckets.
    fn rebuilt(&self, buckets: usize, now: u32) -> Table {
        let mut table = Table::with_buckets(buckets);
        for bucket in self.buckets.iter() {
            for slot in 0..SLOTS {
                if bucket.expires[slot] > now {
                    table.place(bucket.fingerprints[slot], bucket.expires[slot], now);
                }
            }
        }
        table
    }
}

struct Shard {
    table: Table,
    /// Entries whose expiry second has not come (as of `now`).
    live: usize,
    /// Capacity leased from the pool; `live <= leased` always.
    leased: usize,
    /// How many of the live entries expire at each second.
    expiring: BTreeMap<u32, usize>,
    /// The latest `now` any caller passed: time never runs backwards for a shard, so an entry
    /// is live exactly while its count is in `expiring`.
    now: u32,
    /// When `now` last moved on (the first call of that second; `None`: never). Readiness
    /// ([`MemoryReplayCache::ready`]) adds the whole seconds elapsed since to `now`, so a shard
    /// nobody has called since a burst still counts its entries out as they expire. The clock
    /// is read once per second per shard, never per record.
    now_since: Option<Instant>,
    /// Expiry seconds popped (tests prove expiry never scans entries).
    #[cfg(test)]
    seconds_popped: usize,
}

impl Shard {
    fn new() -> Self {
        Shard {
            table: Table::with_buckets(MIN_BUCKETS),
            live: 0,
            leased: 0,
            expiring: BTreeMap::new(),
            now: 0,
            now_since: None,
            #[cfg(test)]
            seconds_popped: 0,
        }
    }

    /// Moves the shard's clock to `now` (never back) and counts out the entries whose second has
    /// come; returns how many. Shrinks the table after a burst has expired.
    fn advance(&mut self, now: u64) -> usize {
        let second = seconds(now);
        if second > self.now {
            self.now = second;
            self.now_since = Some(Instant::now());
        }
        let mut removed = 0;
        while let Some(second) = self.expiring.first_entry() {
            if *second.key() > self.now {
                break;
            }
            removed += second.remove();
            #[cfg(test)]
            {
                self.seconds_popped += 1;
            }
        }
        self.live -= removed;
        if removed > 0 && self.live * 8 < self.table.slots() {
            // Under 1/8 full after a burst expired: give memory back, halving while the table
            // stays at most 3/8 full (far from the 3/4 that makes it grow again).
            let mut buckets = self.table.buckets.len();
            while buckets / 2 >= MIN_BUCKETS && self.live * 8 <= (buckets / 2) * SLOTS * 3 {
                buckets /= 2;
            }
            if buckets < self.table.buckets.len() {
                self.table = self.table.rebuilt(buckets, self.now);
            }
        }
        removed
    }

    /// Records `key` (known absent, capacity leased) until `expires_at`.
    fn insert(&mut self, key: u128, expires_at: u64) {
        // An entry must outlive the current second, or a replay within it would pass.
        let expires = seconds(expires_at).max(self.now.saturating_add(1));
        if (self.live + 1) * 4 > self.table.slots() * 3 {
            // Over 3/4 full: probes would grow long. Double (dropping expired slots).
            self.grow();
        }
        // A table at most 3/4 full of live entries always has a free slot; were it ever
        // otherwise, growing again is the answer, never a lost entry.
        while !self.table.place(key, expires, self.now) {
            self.grow();
        }
        self.live += 1;
        // Requests arrive in time order, so the entry nearly always joins the newest second:
        // reach it along the tree's right edge instead of searching for it.
        match self.expiring.last_entry() {
            Some(mut newest) if *newest.key() == expires => *newest.get_mut() += 1,
            _ => *self.expiring.entry(expires).or_default() += 1,
        }
    }

    fn grow(&mut self) {
        self.table = self.table.rebuilt(self.table.buckets.len() * 2, self.now);
    }

    /// Capacity leased but not used.
    fn spare(&self) -> usize {
        self.leased - self.live
    }

    /// How many entries are still live by the time the callers' clock has reached now, at the
    /// least: `now` plus the whole seconds elapsed since it moved on (a lower bound: the clock
    /// was at `now` or later then). Counted from the per-second counts; changes nothing.
    fn live_by_now(&self) -> usize {
        let elapsed = self.now_since.map_or(0, |since| since.elapsed().as_secs());
        let second = self
            .now
            .saturating_add(u32::try_from(elapsed).unwrap_or(u32::MAX));
        if second == self.now {
            return self.live;
        }
        self.expiring
            .range((
                std::ops::Bound::Excluded(second),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, count)| count)
            .sum()
    }
}

/// Unix seconds as stored in a bucket. Saturates at [`LAST_STORABLE_SECOND`], where a stored
/// expiry would no longer be later than "now": [`MemoryReplayCache::check_and_record_now`]
/// refuses such times before anything is stored, so saturation only ever meets `now`.
fn seconds(unix: u64) -> u32 {
    u32::try_from(unix).unwrap_or(u32::MAX)
}

/// The last unix second a bucket can hold exactly (2106-02-07): from there on an expiry and
/// "now" would both saturate to it, and an entry would count as expired the moment it is
/// stored. The cache refuses such times (an error: the request is refused as
/// `replay_cache_unavailable`) rather than forget nonces; a clock that far ahead is misset.
const LAST_STORABLE_SECOND: u64 = u32::MAX as u64;

/// What one attempt on a shard ended with.
enum Attempt {
    Done(ReplayOutcome),
    /// The nonce is unseen, but the shard has no capacity left and the pool is empty.
    NeedCapacity,
    /// The caller's clock says the nonce's signature is still acceptable, but the shard's
    /// clock (the latest `now` it saw) has already passed the nonce's expiry second: an entry
    /// for it would have been counted out, so the shard cannot tell a replay from a first use.
    /// A clock that went backwards gets here, and so does a caller in the last second of the
    /// nonce's window lagging another caller already in the next one ([`forgotten`] tells
    /// them apart).
    Forgotten {
        shard_now: u32,
    },
}

/// The refusal of a nonce whose expiry second the shard's clock has already passed while the
/// caller's clock has not (see [`Attempt::Forgotten`]). A shard's clock one second ahead of
/// the caller's (so at the nonce's expiry exactly) needs no step back: a request of the next
/// second, read a moment later on another thread, took the shard's lock first. The nonce's
/// window has closed by the time it is answered: `expired`, without a warning that the clock
/// went back. Further ahead, the caller's clock really is behind what the shard saw.
fn forgotten(expires_at: u64, now: u64, shard_now: u32) -> ReplayError {
    if u64::from(shard_now) <= now.saturating_add(1) {
        return ReplayError::expired(format!(
            "the signature's window closed (at {expires_at}) before its nonce was recorded: \
             the replay cache had already recorded a request of {shard_now} (now {now})"
        ));
    }
    ReplayError::new(format!(
        "the clock went back: this nonce expires at {expires_at}, and the replay cache already \
         saw {shard_now} (now {now}), so it may have forgotten the nonce; refusing until the \
         clock is past {shard_now} (docs/OPERATIONS.md, Clocks)"
    ))
}

impl MemoryReplayCache {
    /// A cache holding at most `max_entries` live nonces, with [`DEFAULT_SHARDS`] shards.
    pub fn new(max_entries: usize) -> Self {
        Self::with_shards(max_entries, DEFAULT_SHARDS)
    }

    /// A cache with `shards` shards (at least one). More shards, less lock contention.
    pub fn with_shards(max_entries: usize, shards: usize) -> Self {
        let mut hash_key = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut hash_key);
        let shard_count = shards.max(1);
        let shards = (0..shard_count)
            .map(|_| PaddedShard(Mutex::new(Shard::new())))
            .collect();
        // At most 1/64 of the capacity parked in shards' leases (and given back when the pool
        // runs dry); a lease of 1 for small caches.
        let lease_chunk = (max_entries / (shard_count * 64)).clamp(1, MAX_LEASE_CHUNK);
        MemoryReplayCache {
            hash_key,
            shards,
            pool: AtomicUsize::new(max_entries),
            lease_chunk,
            max_entries,
        }
    }

    /// Entries currently held (recorded and not yet counted out; an expired entry counts until
    /// the next call touching its shard, or the next [`purge_expired`](Self::purge_expired)).
    /// Visits every shard.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().live).sum()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured maximum.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Counts out every entry expired at `now` in all shards (only the per-second counts are
    /// visited, never the entries) and returns unused capacity leases to the pool. Optional:
    /// expiry also happens on each call. Returns how many entries expired.
    pub fn purge_expired(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            removed += shard.advance(now);
            let spare = shard.spare();
            shard.leased -= spare;
            self.pool.fetch_add(spare, Ordering::Relaxed);
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
        if expires_at.max(now) >= LAST_STORABLE_SECOND {
            return Err(ReplayError::new(
                "time beyond the memory replay cache's range (2106-02-07): is the clock set?",
            ));
        }
        let key = self.key_of(nonce);
        let shard = &self.shards[self.shard_index(key)];
        match self.try_record(shard, key, expires_at, now) {
            Attempt::Done(outcome) => return Ok(outcome),
            Attempt::Forgotten { shard_now } => return Err(forgotten(expires_at, now, shard_now)),
            Attempt::NeedCapacity => {}
        }
        // The pool is empty. Other shards may hold unused leases or expired entries nobody has
        // touched yet: take both back, then try once more. Only a cache really holding
        // `max_entries` entries refuses.
        self.purge_expired(now);
        match self.try_record(shard, key, expires_at, now) {
            Attempt::Done(outcome) => return Ok(outcome),
            Attempt::Forgotten { shard_now } => return Err(forgotten(expires_at, now, shard_now)),
            Attempt::NeedCapacity => {}
        }
        tracing::warn!(
            max_entries = self.max_entries,
            "replay cache full: rejecting requests until entries expire"
        );
        Err(ReplayError::new("memory replay cache is full"))
    }

    fn try_record(&self, shard: &Mutex<Shard>, key: u128, expires_at: u64, now: u64) -> Attempt {
        let mut guard = shard.lock();
        let shard = &mut *guard;
        if shard.advance(now) > 0 && shard.spare() > 2 * self.lease_chunk {
            // Entries expired: keep one chunk of room, give the rest back.
            let give_back = shard.spare() - self.lease_chunk;
            shard.leased -= give_back;
            self.pool.fetch_add(give_back, Ordering::Relaxed);
        }
        // Entries are counted out by the shard's clock, which never runs backwards. After the
        // wall clock stepped back, a signature captured before the step is acceptable again
        // (its `created` is back within the window) while its entry may already be gone: the
        // shard passed its expiry second before the step. Such a nonce cannot be vouched for,
        // so it is refused (fail closed) until the wall clock is past the shard's again. An
        // `expires_at` the caller itself sees as passed is not a clock step: it is kept for
        // the current second below, as before. (A shard only one second ahead is a request of
        // the next second recorded first, refused `expired`: see `forgotten`.) One comparison,
        // almost always false.
        let expires = seconds(expires_at);
        if expires <= shard.now && seconds(now) < expires {
            return Attempt::Forgotten {
                shard_now: shard.now,
            };
        }
        if shard.table.probe(key, shard.now) == Probe::Live {
            return Attempt::Done(ReplayOutcome::Replayed);
        }
        if shard.spare() == 0 {
            let chunk = self.lease_chunk;
            let Ok(pool) = self
                .pool
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pool| {
                    (pool > 0).then(|| pool - pool.min(chunk))
                })
            else {
                return Attempt::NeedCapacity;
            };
            shard.leased += pool.min(chunk);
        }
        shard.insert(key, expires_at);
        Attempt::Done(ReplayOutcome::Fresh)
    }

    /// High bits pick the shard; the table uses the low bits.
    fn shard_index(&self, key: u128) -> usize {
        ((key >> 64) as u64 % self.shards.len() as u64) as usize
    }

    fn key_of(&self, nonce: &str) -> u128 {
        // `write` of the raw bytes: one message per hasher, and SipHash folds the length into
        // its last block, so no terminator is needed.
        let mut hasher = SipHasher13::new_with_key(&self.hash_key);
        hasher.write(nonce.as_bytes());
        hasher.finish128().as_u128()
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

    fn prefetch(&self, nonce: &str) {
        let key = self.key_of(nonce);
        let shard = self.shards[self.shard_index(key)].lock();
        // The home bucket is where `try_record` probes first, and in a table of a million
        // entries it is the one DRAM miss of a record (~0.3 us). A prefetch is not ordered with
        // the unlock that follows (a load would make the unlock wait for it), so the line
        // arrives while the caller computes the MAC and the body's digest.
        if let Some(bucket) = shard.table.buckets.get(shard.table.home(key)) {
            mem_prefetch::prefetch_write_data::<Bucket, 3>(bucket);
        }
    }

    fn ready(&self) -> ReplayFuture<'_, bool> {
        // Ready while there is room. Entries are counted out by the callers' clock, on their
        // calls; a cache filled by a burst and called by nobody since (a `/readyz` answering
        // not ready takes the instance out of the load balancer: nobody will call) would count
        // its expired entries for ever. So each shard's clock is taken on by the time elapsed
        // since it last moved (whole seconds: an entry expiring within the current second
        // still counts), and what has expired by then does not count. Nothing is changed:
        // recording still goes by the callers' clock.
        let live: usize = self
            .shards
            .iter()
            .map(|shard| shard.lock().live_by_now())
            .sum();
        Box::pin(std::future::ready(live < self.max_entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_000;

    /// Keys that all have home bucket `home` in a table of `buckets` buckets.
    fn colliding(home: usize, buckets: usize, count: usize) -> Vec<u128> {
        (1..=count as u128)
            .map(|i| (i << 64) | (i * buckets as u128 + home as u128))
            .collect()
    }

    #[test]
    fn fingerprints_are_keyed_per_cache_and_use_all_128_bits() {
        let (a, b) = (MemoryReplayCache::new(16), MemoryReplayCache::new(16));
        let nonce = "AAAAAAAAAAAAAAAAAAAAAA";
        // The same cache: the same fingerprint; another cache (another random key): another.
        assert_eq!(a.key_of(nonce), a.key_of(nonce));
        assert_ne!(a.key_of(nonce), b.key_of(nonce));
        assert_ne!(a.key_of(nonce), a.key_of("AAAAAAAAAAAAAAAAAAAAAB"));
        // Both halves carry hash bits (the shard takes the high half, the table the low one).
        let key = a.key_of(nonce);
        assert_ne!(key >> 64, 0);
        assert_ne!(key as u64, 0);
        assert_ne!((key >> 64) as u64, key as u64);
    }

    #[test]
    fn bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn keys_differ_per_cache_key_and_nonce() {
        let a = MemoryReplayCache::new(10);
        let b = MemoryReplayCache::new(10);
        assert_eq!(a.key_of("n1"), a.key_of("n1"));
        assert_ne!(a.key_of("n1"), a.key_of("n2"));
        assert_ne!(a.key_of("n1"), b.key_of("n1"));
    }

    #[test]
    fn probe_follows_keys_pushed_past_full_buckets() {
        let mut table = Table::with_buckets(8);
        // Seven keys with the same home: they fill bucket 2 and 3 and spill into 4.
        let keys = colliding(2, 8, 7);
        for key in &keys {
            assert_eq!(table.probe(*key, NOW), Probe::Absent);
            assert!(table.place(*key, NOW + 10, NOW));
        }
        for key in &keys {
            assert_eq!(table.probe(*key, NOW), Probe::Live);
        }
        assert_eq!(table.buckets[2].passed_until, NOW + 10);
        assert_eq!(table.buckets[3].passed_until, NOW + 10);
        assert_eq!(table.buckets[4].passed_until, 0);
        // A key whose home is bucket 3 is looked for in 3 and 4 (marked), not beyond.
        let other = colliding(3, 8, 1)[0];
        assert_eq!(table.probe(other, NOW), Probe::Absent);
    }

    #[test]
    fn expired_slots_are_reused_and_later_keys_stay_reachable() {
        let mut table = Table::with_buckets(8);
        let keys = colliding(5, 8, 7);
        // The first three (bucket 5) expire at NOW + 1; the rest (buckets 6, 7) at NOW + 10.
        for (i, key) in keys.iter().enumerate() {
            let expires = if i < 3 { NOW + 1 } else { NOW + 10 };
            assert!(table.place(*key, expires, NOW));
        }
        let later = NOW + 1;
        for key in &keys[..3] {
            assert_eq!(table.probe(*key, later), Probe::Absent, "expired");
        }
        // The keys pushed past bucket 5 are still found although its slots are free now.
        for key in &keys[3..] {
            assert_eq!(table.probe(*key, later), Probe::Live);
        }
        // A new key reuses an expired slot of its home bucket.
        let new = colliding(5, 8, 8)[7];
        assert!(table.place(new, NOW + 20, later));
        assert!(table.buckets[5].fingerprints.contains(&new));
        // Once the spilled keys expire, the marker is stale and probes stop at home.
        let much_later = NOW + 10;
        for key in &keys[3..] {
            assert_eq!(table.probe(*key, much_later), Probe::Absent);
        }
        assert_eq!(table.probe(new, much_later), Probe::Live);
    }

    #[test]
    fn probe_wraps_around_the_end_of_the_table() {
        let mut table = Table::with_buckets(4);
        let keys = colliding(3, 4, 5);
        for key in &keys {
            assert!(table.place(*key, NOW + 5, NOW));
        }
        assert!(table.buckets[0].fingerprints.contains(&keys[3]));
        for key in &keys {
            assert_eq!(table.probe(*key, NOW), Probe::Live);
        }
    }

    #[test]
    fn a_full_table_refuses_to_place() {
        let mut table = Table::with_buckets(4);
        for key in colliding(0, 4, 12) {
            assert!(table.place(key, NOW + 5, NOW));
        }
        assert!(!table.place(colliding(1, 4, 13)[12], NOW + 5, NOW));
        // At NOW + 5 everything is free again.
        assert!(table.place(colliding(1, 4, 13)[12], NOW + 9, NOW + 5));
    }

    #[test]
    fn shard_grows_and_shrinks_keeping_live_entries() {
        let mut shard = Shard::new();
        shard.advance(u64::from(NOW));
        let keys: Vec<u128> = (1..=3000u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            let expires = if i < 2900 { NOW + 2 } else { NOW + 30 };
            assert_eq!(shard.table.probe(*key, shard.now), Probe::Absent);
            shard.insert(*key, u64::from(expires));
        }
        assert_eq!(shard.live, 3000);
        assert!(shard.table.slots() * 3 >= 3000 * 4);
        for key in &keys {
            assert_eq!(shard.table.probe(*key, shard.now), Probe::Live);
        }
        let grown = shard.table.buckets.len();
        assert_eq!(shard.advance(u64::from(NOW + 2)), 2900);
        assert_eq!(shard.live, 100);
        assert!(shard.table.buckets.len() < grown, "shrunk after the burst");
        for key in &keys[2900..] {
            assert_eq!(shard.table.probe(*key, shard.now), Probe::Live);
        }
        for key in &keys[..2900] {
            assert_eq!(shard.table.probe(*key, shard.now), Probe::Absent);
        }
    }

    #[test]
    fn shard_time_never_runs_backwards() {
        let mut shard = Shard::new();
        shard.advance(105);
        // A caller whose clock lags a second: its entry still outlives the shard's second.
        shard.advance(104);
        assert_eq!(shard.now, 105);
        shard.insert(7, 105);
        assert_eq!(shard.table.probe(7, shard.now), Probe::Live);
        assert_eq!(shard.advance(105), 0);
        assert_eq!(shard.advance(106), 1);
        assert_eq!(shard.table.probe(7, shard.now), Probe::Absent);
    }

    #[test]
    fn expired_entry_is_counted_out_before_lookup() {
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
        assert_eq!(shard.expiring.len(), 1);
        assert_eq!(shard.expiring.get(&110), Some(&1));
    }

    #[test]
    fn expiry_visits_only_expired_seconds() {
        let cache = MemoryReplayCache::with_shards(100_000, 1);
        for i in 0..20_000 {
            let expires = if i % 1000 == 0 { 105 } else { 150 };
            cache
                .check_and_record_now(&format!("n{i}"), expires, 100)
                .unwrap();
        }
        assert_eq!(cache.shards[0].lock().seconds_popped, 0);
        // At 105 the 20 short-lived entries go, with one count popped.
        cache.check_and_record_now("probe", 150, 105).unwrap();
        assert_eq!(cache.shards[0].lock().seconds_popped, 1);
        assert_eq!(cache.len(), 19_981);
        for now in 106..150 {
            cache
                .check_and_record_now(&format!("p{now}"), 150, now)
                .unwrap();
        }
        assert_eq!(cache.shards[0].lock().seconds_popped, 1);
        assert_eq!(cache.purge_expired(150), 19_981 + 44);
        assert_eq!(cache.shards[0].lock().seconds_popped, 2);
        assert!(cache.is_empty());
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
    fn leases_parked_in_other_shards_are_taken_back_when_the_pool_runs_dry() {
        // 4 shards, capacity 1024: leases of 4.
        let cache = MemoryReplayCache::with_shards(1024, 4);
        assert_eq!(cache.lease_chunk, 4);
        let in_zero = nonces_in_shard(&cache, 0, 1);
        cache.check_and_record_now(&in_zero[0], 110, 100).unwrap();
        assert_eq!(cache.pool.load(Ordering::Relaxed), 1020);
        // Shard 1 takes everything else; shard 0 keeps 3 leased but unused.
        for nonce in nonces_in_shard(&cache, 1, 1023) {
            assert_eq!(
                cache.check_and_record_now(&nonce, 110, 100),
                Ok(ReplayOutcome::Fresh)
            );
        }
        assert_eq!(cache.len(), 1024);
        assert_eq!(cache.pool.load(Ordering::Relaxed), 0);
        assert_eq!(cache.shards[0].lock().spare(), 0);
        assert!(cache.check_and_record_now("one-more", 110, 100).is_err());
        assert_eq!(cache.len(), 1024);
    }

    #[test]
    fn expired_entries_give_leases_back_beyond_a_chunk() {
        let cache = MemoryReplayCache::with_shards(64 * 64 * 10, 1);
        assert_eq!(cache.lease_chunk, 64);
        for i in 0..1000 {
            cache
                .check_and_record_now(&format!("b{i}"), 101, 100)
                .unwrap();
        }
        let pool_full = cache.pool.load(Ordering::Relaxed);
        assert_eq!(pool_full + cache.shards[0].lock().leased, 64 * 64 * 10);
        cache.check_and_record_now("after", 110, 101).unwrap();
        // 1,024 leased for the burst; at 101 all but one chunk of 64 went back.
        let shard = cache.shards[0].lock();
        assert_eq!(shard.live, 1);
        assert_eq!(shard.leased, 64);
        assert_eq!(cache.pool.load(Ordering::Relaxed), 64 * 64 * 10 - 64);
    }

    #[test]
    fn times_beyond_2106_are_refused_not_forgotten() {
        let cache = MemoryReplayCache::new(100);
        // The last storable times still work, replay included.
        let last = LAST_STORABLE_SECOND - 1;
        assert_eq!(
            cache.check_and_record_now("edge", last, last - 13),
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            cache.check_and_record_now("edge", last, last - 12),
            Ok(ReplayOutcome::Replayed)
        );
        // From there on: an error (the layer answers 503 replay_cache_unavailable), never a
        // second `Fresh` for the same nonce, and nothing is stored.
        for (expires_at, now) in [
            (LAST_STORABLE_SECOND, LAST_STORABLE_SECOND - 13),
            (5_000_000_013, 5_000_000_000),
            (u64::MAX, u64::MAX - 1),
        ] {
            for _ in 0..2 {
                assert!(
                    cache.check_and_record_now("far", expires_at, now).is_err(),
                    "{expires_at} at {now}"
                );
            }
        }
        assert_eq!(cache.len(), 1);
    }
}

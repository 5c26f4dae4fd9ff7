//! MemoryReplayCache: atomicity under concurrency, expiry, capacity, memory.
//!
//! Run: `cargo test --all-features --test replay_memory`

use std::sync::Arc;

use countersign::replay::{MemoryReplayCache, ReplayCache, ReplayOutcome};
use tokio::sync::Barrier;

const NOW: u64 = 1_700_000_000;

/// Runs `tasks` tasks that all call `check_and_record` with their nonce at the same moment.
async fn race(
    cache: Arc<dyn ReplayCache>,
    nonces: Vec<String>,
) -> Vec<Result<ReplayOutcome, countersign::replay::ReplayError>> {
    let barrier = Arc::new(Barrier::new(nonces.len()));
    let handles: Vec<_> = nonces
        .into_iter()
        .map(|nonce| {
            let cache = Arc::clone(&cache);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                cache.check_and_record(&nonce, NOW + 13, NOW).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(handle.await.unwrap());
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn same_nonce_from_64_tasks_is_fresh_exactly_once() {
    let cache = Arc::new(MemoryReplayCache::new(100_000));
    for round in 0..50 {
        let nonce = format!("nonce-{round}-AAAAAAAAAAAAAAAAAAAAAA");
        let outcomes = race(cache.clone(), vec![nonce; 64]).await;
        let fresh = outcomes
            .iter()
            .filter(|o| **o == Ok(ReplayOutcome::Fresh))
            .count();
        let replayed = outcomes
            .iter()
            .filter(|o| **o == Ok(ReplayOutcome::Replayed))
            .count();
        assert_eq!((fresh, replayed), (1, 63), "round {round}");
    }
    assert_eq!(cache.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_inserts_never_overshoot_the_maximum() {
    let cache = Arc::new(MemoryReplayCache::new(10));
    let nonces = (0..64).map(|i| format!("distinct-{i}")).collect();
    let outcomes = race(cache.clone(), nonces).await;
    let fresh = outcomes
        .iter()
        .filter(|o| **o == Ok(ReplayOutcome::Fresh))
        .count();
    let errors = outcomes.iter().filter(|o| o.is_err()).count();
    assert_eq!((fresh, errors), (10, 54));
    assert_eq!(cache.len(), 10);
}

#[tokio::test]
async fn full_cache_fails_closed_and_never_evicts_live_entries() {
    let cache = MemoryReplayCache::new(3);
    for i in 0..3 {
        assert_eq!(
            cache
                .check_and_record(&format!("n{i}"), NOW + 10, NOW)
                .await,
            Ok(ReplayOutcome::Fresh)
        );
    }
    assert!(!cache.ready().await);
    let error = cache
        .check_and_record("n3", NOW + 10, NOW)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), countersign::Reason::ReplayCacheUnavailable);
    // Still full a few seconds later (nothing expired): still an error, entries all live.
    assert!(cache
        .check_and_record("n4", NOW + 10, NOW + 9)
        .await
        .is_err());
    for i in 0..3 {
        assert_eq!(
            cache
                .check_and_record(&format!("n{i}"), NOW + 10, NOW + 9)
                .await,
            Ok(ReplayOutcome::Replayed),
            "live entry n{i} was evicted"
        );
    }
    assert_eq!(cache.len(), 3);
    // At their expiry second the entries are gone and there is room again.
    assert_eq!(
        cache.check_and_record("n3", NOW + 20, NOW + 10).await,
        Ok(ReplayOutcome::Fresh)
    );
    // Room came from the purge of n3's own shard when it held one of the expired entries (then
    // the others wait, expired, in their shards until touched), else from the sweep of every
    // shard: after a full purge only n3 is left either way. (Asserting `len() == 1` before the
    // purge failed in the ~5 % of runs where n3 shared a shard with an expired entry.)
    cache.purge_expired(NOW + 10);
    assert_eq!(cache.len(), 1);
    assert!(cache.ready().await);
}

#[tokio::test]
async fn a_replayed_nonce_is_reported_even_when_full() {
    let cache = MemoryReplayCache::new(1);
    assert_eq!(
        cache.check_and_record("only", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record("only", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

#[tokio::test]
async fn zero_capacity_rejects_everything() {
    let cache = MemoryReplayCache::new(0);
    assert!(cache.check_and_record("x", NOW + 10, NOW).await.is_err());
    assert!(!cache.ready().await);
}

/// Expiry is lazy: the call that touches a shard pops that shard's expired buckets. With one
/// shard every call touches it, so the size is exact after each call.
#[tokio::test]
async fn expiry_frees_entries_on_touch_and_keeps_live_ones() {
    let cache = MemoryReplayCache::with_shards(10_000, 1);
    for i in 0..1000 {
        let expires = if i % 2 == 0 { NOW + 5 } else { NOW + 50 };
        cache
            .check_and_record(&format!("e{i}"), expires, NOW)
            .await
            .unwrap();
    }
    assert_eq!(cache.len(), 1000);
    // One second before expiry nothing goes.
    cache
        .check_and_record("probe-1", NOW + 50, NOW + 4)
        .await
        .unwrap();
    assert_eq!(cache.len(), 1001);
    // At the expiry second the 500 short-lived entries go, the long-lived stay.
    cache
        .check_and_record("probe-2", NOW + 50, NOW + 5)
        .await
        .unwrap();
    assert_eq!(cache.len(), 502);
    for i in (1..1000).step_by(2) {
        assert_eq!(
            cache
                .check_and_record(&format!("e{i}"), NOW + 50, NOW + 5)
                .await,
            Ok(ReplayOutcome::Replayed)
        );
    }
    // An expired nonce may be recorded anew.
    assert_eq!(
        cache.check_and_record("e0", NOW + 60, NOW + 5).await,
        Ok(ReplayOutcome::Fresh)
    );
}

#[tokio::test]
async fn purge_expired_sweeps_every_shard() {
    let cache = MemoryReplayCache::new(100_000);
    for i in 0..10_000 {
        cache
            .check_and_record(&format!("p{i}"), NOW + 1 + (i % 10), NOW)
            .await
            .unwrap();
    }
    assert_eq!(cache.len(), 10_000);
    assert_eq!(cache.purge_expired(NOW + 5), 5_000);
    assert_eq!(cache.len(), 5_000);
    assert_eq!(cache.purge_expired(NOW + 5), 0);
    assert_eq!(cache.purge_expired(NOW + 11), 5_000);
    assert!(cache.is_empty());
}

/// A full cache lets a nonce in once entries have expired.
#[tokio::test]
async fn full_cache_reclaims_expired_entries() {
    let cache = MemoryReplayCache::new(256);
    for i in 0..256 {
        cache
            .check_and_record(&format!("f{i}"), NOW + 3, NOW)
            .await
            .unwrap();
    }
    assert!(cache
        .check_and_record("late", NOW + 10, NOW + 2)
        .await
        .is_err());
    // All 256 expire at NOW + 3: whichever shard "late" lands in, it is let in (by the purge
    // of its own shard, or by the sweep of all shards when its own had nothing expired).
    assert_eq!(
        cache.check_and_record("late", NOW + 10, NOW + 3).await,
        Ok(ReplayOutcome::Fresh)
    );
    // Never over the maximum. (This asserted `< 256`, which failed in the ~7 % of runs where
    // "late"'s shard held exactly one of the 256: one purged, one recorded, 256 again.)
    assert!(cache.len() <= 256);
    cache.purge_expired(NOW + 3);
    assert_eq!(cache.len(), 1);
}

/// An `expires_at` in the past still protects the current second.
#[tokio::test]
async fn past_expiry_is_kept_for_the_current_second() {
    let cache = MemoryReplayCache::new(10);
    assert_eq!(
        cache.check_and_record("n", NOW - 5, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record("n", NOW - 5, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

/// `prefetch` is a hint only: it records nothing, answers nothing, and on a full cache frees
/// nothing.
#[tokio::test]
async fn prefetch_changes_nothing() {
    let cache = MemoryReplayCache::new(2);
    cache.prefetch("a");
    assert!(cache.is_empty());
    assert_eq!(
        cache.check_and_record("a", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    cache.prefetch("a");
    assert_eq!(
        cache.check_and_record("a", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert_eq!(
        cache.check_and_record("b", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    for i in 0..10_000 {
        cache.prefetch(&format!("unseen-{i}"));
    }
    assert_eq!(cache.len(), 2);
    assert!(cache.check_and_record("c", NOW + 10, NOW).await.is_err());
    assert_eq!(
        cache.check_and_record("b", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

#[test]
fn debug_does_not_print_the_hash_key() {
    let cache = MemoryReplayCache::new(5);
    let text = format!("{cache:?}");
    assert!(text.starts_with("MemoryReplayCache {"), "{text}");
    assert!(!text.contains("hasher"), "{text}");
}

/// One million live nonces (22-character nonces, as signers send) must fit in well under
/// 150 MiB. Measured as the growth of the resident set of a child process that does nothing
/// else (the tests of this binary run in parallel and would blur an in-process measurement).
#[cfg(target_os = "linux")]
#[test]
fn one_million_entries_fit_in_well_under_150_mib() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "memory_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("COUNTERSIGN_MEMORY_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let grown_kib: u64 = stdout
        .lines()
        .find_map(|l| l.split("RSS_GROWTH_KIB=").nth(1))
        .unwrap_or_else(|| panic!("no measurement in: {stdout}"))
        .trim()
        .parse()
        .unwrap();
    let grown_mib = grown_kib / 1024;
    println!("1M entries: {grown_mib} MiB resident");
    assert!(grown_mib < 100, "1M entries took {grown_mib} MiB");
}

/// The measured part of the test above; runs only as its child.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "run by one_million_entries_fit_in_well_under_150_mib"]
fn memory_child() {
    if std::env::var_os("COUNTERSIGN_MEMORY_CHILD").is_none() {
        return;
    }
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let before = rss_kib();
    let cache = MemoryReplayCache::new(1_000_000);
    let mut nonce = String::with_capacity(22);
    for i in 0..1_000_000u64 {
        use std::fmt::Write as _;
        nonce.clear();
        write!(nonce, "{i:022}").unwrap();
        // Spread expiries over a 13-second window, as live traffic would.
        let outcome = cache.check_and_record_now(&nonce, NOW + 1 + i % 13, NOW);
        assert_eq!(outcome, Ok(ReplayOutcome::Fresh));
    }
    assert_eq!(cache.len(), 1_000_000);
    println!("RSS_GROWTH_KIB={}", rss_kib().saturating_sub(before));
    // The entries are really held, and the cache is exactly full.
    assert!(cache
        .check_and_record_now("full-now", NOW + 10, NOW)
        .is_err());
    assert_eq!(
        cache.check_and_record_now(&format!("{:022}", 999_999), NOW + 10, NOW),
        Ok(ReplayOutcome::Replayed)
    );
}

/// Capacity is leased to shards in chunks; when the pool runs dry, the unused leases are taken
/// back. Under concurrency the cache must still admit exactly `max_entries` distinct nonces:
/// small chunks (a capacity of 10,000 over 64 shards: chunks of 2) and the largest (64).
#[test]
fn concurrent_distinct_nonces_fill_exactly_to_the_maximum() {
    for (max_entries, threads, per_thread) in
        [(10_000usize, 8usize, 1_500usize), (300_000, 4, 76_000)]
    {
        let cache = Arc::new(MemoryReplayCache::new(max_entries));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    let (mut fresh, mut full) = (0usize, 0usize);
                    for i in 0..per_thread {
                        match cache.check_and_record_now(&format!("t{t}-{i}"), NOW + 13, NOW) {
                            Ok(ReplayOutcome::Fresh) => fresh += 1,
                            Ok(ReplayOutcome::Replayed) => panic!("distinct nonce replayed"),
                            Err(_) => full += 1,
                        }
                    }
                    (fresh, full)
                })
            })
            .collect();
        let (fresh, full) = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        assert_eq!(fresh, max_entries, "capacity {max_entries}");
        assert_eq!(full, threads * per_thread - max_entries);
        assert_eq!(cache.len(), max_entries);
        // Every admitted nonce is really held.
        let held = (0..threads)
            .flat_map(|t| (0..per_thread).map(move |i| format!("t{t}-{i}")))
            .filter(|n| cache.check_and_record_now(n, NOW + 13, NOW) == Ok(ReplayOutcome::Replayed))
            .count();
        assert_eq!(held, max_entries);
    }
}

/// Steady traffic for 100 seconds with a 13-second window: expired slots are reused and the
/// live count follows the window, so a cache sized for the window never fills, and every nonce
/// of the window is still known as replayed.
#[test]
fn steady_traffic_reuses_expired_entries() {
    let cache = MemoryReplayCache::new(14_000);
    for second in 0..100u64 {
        let now = NOW + second;
        for i in 0..1_000 {
            assert_eq!(
                cache.check_and_record_now(&format!("s{second}-{i}"), now + 13, now),
                Ok(ReplayOutcome::Fresh),
                "second {second}"
            );
        }
    }
    cache.purge_expired(NOW + 99);
    assert_eq!(cache.len(), 13_000);
    let now = NOW + 99;
    for second in 87..100u64 {
        for i in (0..1_000).step_by(97) {
            assert_eq!(
                cache.check_and_record_now(&format!("s{second}-{i}"), now + 13, now),
                Ok(ReplayOutcome::Replayed)
            );
        }
    }
    // Older ones expired and may be recorded again.
    assert_eq!(
        cache.check_and_record_now("s86-0", now + 13, now),
        Ok(ReplayOutcome::Fresh)
    );
}

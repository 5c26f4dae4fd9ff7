//! Session stores and the login throttle.
//!
//! `session_store_suite` and `capacity_suite` are generic over `Arc<dyn SessionStore>`: they
//! run here against the memory store and, unchanged, against Redis in
//! tests/redis_session_suite.rs (which includes this file as a module, hence the `pub(crate)`
//! items). Time is injected: every call passes `clock.now_unix()` of a `ManualClock` the test
//! moves.
#![cfg(feature = "proxy")]

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::{Clock as _, ManualClock, SharedClock};
use countersign::core::EncodedIdentity;
use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::session::{MemorySessionStore, SessionId, SessionStore, SessionTimeouts};
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::Identity;

/// The timeouts every store under the suite must be built with.
pub(crate) const IDLE: u64 = 60;
pub(crate) const ABSOLUTE: u64 = 300;
pub(crate) const T0: u64 = 1_700_000_000;

pub(crate) fn suite_timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: Duration::from_secs(IDLE),
        absolute: Duration::from_secs(ABSOLUTE),
    }
}

pub(crate) fn ident(user: &str, roles: &[&str]) -> Identity {
    Identity::new(user, roles.iter().copied())
}

/// The behaviour every `SessionStore` must have. `store` must be empty, built with
/// [`suite_timeouts`] and room for at least 1000 sessions; `clock` is the time the suite moves.
pub(crate) async fn session_store_suite(store: Arc<dyn SessionStore>, clock: ManualClock) {
    clock.set(T0);
    assert!(store.ready().await);
    assert_eq!(store.count().await.unwrap(), 0);

    create_then_get(&*store, &clock).await;
    touch_false_does_not_extend(&*store, &clock).await;
    touch_extends_idle_but_not_absolute(&*store, &clock).await;
    delete_ends_one_session(&*store, &clock).await;
    delete_user_reaches_all_sessions_of_that_user_only(&*store, &clock).await;
    every_login_gets_distinct_ids_and_tokens(&*store, &clock).await;
    unicode_identities_round_trip(&*store, &clock).await;
    unknown_and_malformed_ids_find_nothing(&*store, &clock).await;
    request_lookup_agrees_with_get(&*store, &clock).await;
    concurrent_use(store.clone(), &clock).await;
}

async fn create_then_get(store: &dyn SessionStore, clock: &ManualClock) {
    let now = clock.now_unix();
    let identity = ident("alice", &["admin", "reader"]);
    let (id, session) = store.create(&identity, now).await.unwrap();
    assert_eq!(session.user, "alice");
    assert_eq!(session.roles, vec!["admin", "reader"]);
    assert_eq!(session.created_at, now);
    assert_eq!(session.last_seen, now);
    assert_eq!(session.idle_expires_at, now + IDLE);
    assert_eq!(session.absolute_expires_at, now + ABSOLUTE);
    assert_eq!(session.expires_at(), now + IDLE);
    // 256-bit values, base64url without padding.
    for token in [id.as_cookie_value(), session.csrf_token.as_str()] {
        assert_eq!(token.len(), 43, "{token}");
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }
    assert!(session.csrf_matches(&session.csrf_token));
    assert!(!session.csrf_matches(id.as_cookie_value()));
    assert!(!session.csrf_matches(""));
    // Debug output of ids and sessions never shows secrets.
    assert!(!format!("{id:?}").contains(id.as_cookie_value()));
    assert!(!format!("{session:?}").contains(&session.csrf_token));

    // The cookie value parses back to the same session.
    let parsed = SessionId::parse(id.as_cookie_value()).unwrap();
    let got = store.get(&parsed, now + 1, false).await.unwrap().unwrap();
    assert_eq!(got, session);
    store.delete(&id).await.unwrap();
}

/// `get_for_request` (the proxied request path's lookup) finds the same sessions as `get`, with
/// the same expiry and touch, the identity encoded as the signer sends it, and the same CSRF
/// comparison.
async fn request_lookup_agrees_with_get(store: &dyn SessionStore, clock: &ManualClock) {
    let start = clock.now_unix();
    for identity in [
        ident("erin", &["admin", "reader"]),
        ident("Zoë Ünïcødé 名前", &["a,b", "ü", ",", " "]),
        ident("no-roles", &[]),
        ident("%41:x", &["r:1"]),
    ] {
        let (id, session) = store.create(&identity, start).await.unwrap();
        let found = store
            .get_for_request(&id, start + 1, false)
            .await
            .unwrap()
            .expect("a live session is found");
        assert_eq!(found.identity, EncodedIdentity::new(&identity));
        assert_eq!(found.identity.decode().as_ref(), Some(&identity));
        assert!(!format!("{found:?}").contains(&session.csrf_token));

        let token = session.csrf_token.as_bytes();
        assert!(found.csrf_matches(token));
        assert!(!found.csrf_matches(b""));
        assert!(!found.csrf_matches(&token[..token.len() - 1]));
        assert!(!found.csrf_matches(&[token, b"A"].concat()));
        let mut altered = token.to_vec();
        altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
        assert!(!found.csrf_matches(&altered));
        assert!(!found.csrf_matches(id.as_cookie_value().as_bytes()));

        // touch = false leaves the session as it was; touch = true extends it, as `get` does.
        let later = start + IDLE - 10;
        assert!(store
            .get_for_request(&id, later, false)
            .await
            .unwrap()
            .is_some());
        let seen = store.get(&id, later, false).await.unwrap().unwrap();
        assert_eq!(seen.last_seen, start);
        assert!(store
            .get_for_request(&id, later, true)
            .await
            .unwrap()
            .is_some());
        let seen = store.get(&id, later, false).await.unwrap().unwrap();
        assert_eq!(seen.last_seen, later);
        // Expired for both lookups at the same moment.
        let over = later + IDLE;
        assert!(store.get(&id, over, false).await.unwrap().is_none());
        assert!(store
            .get_for_request(&id, over, true)
            .await
            .unwrap()
            .is_none());
        store.delete(&id).await.unwrap();
        assert!(store
            .get_for_request(&id, start + 1, false)
            .await
            .unwrap()
            .is_none());
    }
    let unknown = SessionId::generate();
    assert!(store
        .get_for_request(&unknown, start, true)
        .await
        .unwrap()
        .is_none());
}

async fn touch_false_does_not_extend(store: &dyn SessionStore, clock: &ManualClock) {
    let start = clock.now_unix();
    let (id, _) = store.create(&ident("bob", &[]), start).await.unwrap();
    for dt in [10, 30, IDLE - 1] {
        let s = store.get(&id, start + dt, false).await.unwrap().unwrap();
        assert_eq!(s.last_seen, start, "touch=false moved last_seen");
        assert_eq!(s.idle_expires_at, start + IDLE);
    }
    // Idle expiry counts from the last touch, which was the login.
    assert!(store.get(&id, start + IDLE, false).await.unwrap().is_none());
    assert!(store.get(&id, start + IDLE, true).await.unwrap().is_none());
    // An expired session cannot be revived by touching it later either.
    assert!(store
        .get(&id, start + IDLE + 1, true)
        .await
        .unwrap()
        .is_none());
}

async fn touch_extends_idle_but_not_absolute(store: &dyn SessionStore, clock: &ManualClock) {
    let start = clock.now_unix();
    let (id, _) = store.create(&ident("carol", &["r"]), start).await.unwrap();
    let mut t = start;
    while t + IDLE - 10 < start + ABSOLUTE {
        t += IDLE - 10;
        clock.set(t);
        let s = store.get(&id, clock.now_unix(), true).await.unwrap();
        let s = s.unwrap_or_else(|| panic!("session gone at +{}", t - start));
        assert_eq!(s.last_seen, t);
        assert_eq!(s.idle_expires_at, t + IDLE);
        assert_eq!(s.absolute_expires_at, start + ABSOLUTE);
        assert_eq!(s.expires_at(), (t + IDLE).min(start + ABSOLUTE));
    }
    // Used all along, yet over at the absolute limit.
    assert!(store
        .get(&id, start + ABSOLUTE - 1, true)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .get(&id, start + ABSOLUTE, true)
        .await
        .unwrap()
        .is_none());
    clock.set(start);
}

async fn delete_ends_one_session(store: &dyn SessionStore, clock: &ManualClock) {
    let now = clock.now_unix();
    let (a, _) = store.create(&ident("dave", &[]), now).await.unwrap();
    let (b, _) = store.create(&ident("dave", &[]), now).await.unwrap();
    store.delete(&a).await.unwrap();
    assert!(store.get(&a, now, false).await.unwrap().is_none());
    assert!(store.get(&b, now, false).await.unwrap().is_some());
    // Deleting again (logout twice) is fine.
    store.delete(&a).await.unwrap();
    store.delete(&b).await.unwrap();
    assert!(store.get(&b, now, false).await.unwrap().is_none());
}

async fn delete_user_reaches_all_sessions_of_that_user_only(
    store: &dyn SessionStore,
    clock: &ManualClock,
) {
    let now = clock.now_unix();
    let before = store.count().await.unwrap();
    let mut erin = Vec::new();
    for roles in [&["a"][..], &["a"], &["b", "c"], &[]] {
        // Different roles (users file changed between logins) are still the same user.
        erin.push(store.create(&ident("erin", roles), now).await.unwrap().0);
    }
    let (frank, _) = store.create(&ident("frank", &["a"]), now).await.unwrap();
    // Names that contain or prefix the other one are other users.
    let (erin2, _) = store.create(&ident("erin2", &[]), now).await.unwrap();
    let (erin_upper, _) = store.create(&ident("Erin", &[]), now).await.unwrap();
    assert_eq!(store.count().await.unwrap(), before + 7);

    // Remove one from the middle of erin's list first.
    store.delete(&erin[1]).await.unwrap();
    assert_eq!(store.delete_user("erin").await.unwrap(), 3);
    for id in &erin {
        assert!(store.get(id, now, false).await.unwrap().is_none());
    }
    for id in [&frank, &erin2, &erin_upper] {
        assert!(store.get(id, now, false).await.unwrap().is_some());
    }
    assert_eq!(store.delete_user("erin").await.unwrap(), 0);
    assert_eq!(store.delete_user("nobody").await.unwrap(), 0);
    assert_eq!(store.count().await.unwrap(), before + 3);
    // A new login after the revocation works.
    let (again, _) = store.create(&ident("erin", &["a"]), now).await.unwrap();
    assert!(store.get(&again, now, false).await.unwrap().is_some());
    for user in ["erin", "frank", "erin2", "Erin"] {
        assert_eq!(store.delete_user(user).await.unwrap(), 1, "{user}");
    }
    assert_eq!(store.count().await.unwrap(), before);
}

async fn every_login_gets_distinct_ids_and_tokens(store: &dyn SessionStore, clock: &ManualClock) {
    let now = clock.now_unix();
    let identity = ident("gina", &["r"]);
    let mut ids = HashSet::new();
    let mut tokens = HashSet::new();
    for _ in 0..200 {
        let (id, session) = store.create(&identity, now).await.unwrap();
        assert!(ids.insert(id.as_cookie_value().to_owned()));
        assert!(tokens.insert(session.csrf_token.clone()));
    }
    assert_eq!(store.delete_user("gina").await.unwrap(), 200);
}

async fn unicode_identities_round_trip(store: &dyn SessionStore, clock: &ManualClock) {
    let now = clock.now_unix();
    let tricky = ident("Zoë:admin,x %41", &["rôle:1", "a,b", ",", " ", "名前"]);
    let plain = ident("Zoë", &["admin"]);
    let (a, _) = store.create(&tricky, now).await.unwrap();
    let (b, _) = store.create(&plain, now).await.unwrap();
    let got = store.get(&a, now, false).await.unwrap().unwrap();
    assert_eq!(got.identity(), tricky);
    assert_eq!(
        store.get(&b, now, false).await.unwrap().unwrap().identity(),
        plain
    );
    assert_eq!(store.delete_user("Zoë").await.unwrap(), 1);
    assert!(store.get(&a, now, false).await.unwrap().is_some());
    assert_eq!(store.delete_user("Zoë:admin,x %41").await.unwrap(), 1);
}

async fn unknown_and_malformed_ids_find_nothing(store: &dyn SessionStore, clock: &ManualClock) {
    let now = clock.now_unix();
    let (id, _) = store.create(&ident("hank", &[]), now).await.unwrap();
    assert!(store
        .get(&SessionId::generate(), now, true)
        .await
        .unwrap()
        .is_none());
    store.delete(&SessionId::generate()).await.unwrap();
    let cookie = id.as_cookie_value();
    // Wrong length, padding, other alphabets, non-canonical trailing bits.
    let mut last_changed = cookie.to_owned();
    let last = last_changed.pop().unwrap();
    last_changed.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [
        "",
        &cookie[..42],
        &format!("{cookie}="),
        &format!("{cookie}A"),
        &cookie.replace(['-', '_'], "+"),
        &format!("{}!", &cookie[..42]),
    ] {
        if bad == cookie {
            continue;
        }
        assert!(SessionId::parse(bad).is_none(), "{bad:?} parsed");
    }
    // A different (valid or not) last character never finds the session.
    if let Some(other) = SessionId::parse(&last_changed) {
        assert!(store.get(&other, now, false).await.unwrap().is_none());
    }
    assert!(store.get(&id, now, false).await.unwrap().is_some());
    store.delete(&id).await.unwrap();
}

async fn concurrent_use(store: Arc<dyn SessionStore>, clock: &ManualClock) {
    let now = clock.now_unix();
    let before = store.count().await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let identity = ident(&format!("user{}", task % 4), &["r"]);
            for i in 0..25u64 {
                let (id, s) = store.create(&identity, now).await.unwrap();
                let got = store.get(&id, now + i % 5, true).await.unwrap().unwrap();
                assert_eq!(got.csrf_token, s.csrf_token);
                if i % 2 == 0 {
                    store.delete(&id).await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(store.count().await.unwrap(), before + 16 * 12);
    let mut removed = 0;
    for u in 0..4 {
        removed += store.delete_user(&format!("user{u}")).await.unwrap();
    }
    assert_eq!(removed, 16 * 12);
    assert_eq!(store.count().await.unwrap(), before);
}

/// A store built with [`suite_timeouts`] and room for exactly `max` sessions: full means an
/// error, and live sessions are never evicted to make room.
pub(crate) async fn capacity_suite(store: Arc<dyn SessionStore>, max: usize, clock: ManualClock) {
    clock.set(T0);
    let mut ids = Vec::new();
    for i in 0..max {
        ids.push(
            store
                .create(&ident(&format!("u{i}"), &[]), T0)
                .await
                .unwrap()
                .0,
        );
    }
    let err = store.create(&ident("late", &[]), T0).await.unwrap_err();
    assert!(err.to_string().contains("session"), "{err}");
    for id in &ids {
        assert!(
            store.get(id, T0 + 1, false).await.unwrap().is_some(),
            "a live session was evicted"
        );
    }
    // Ending one makes room for one.
    store.delete(&ids[0]).await.unwrap();
    store.create(&ident("late", &[]), T0).await.unwrap();
    assert!(store.create(&ident("later", &[]), T0).await.is_err());
    // Once they have expired, their room is reclaimed even before a sweep.
    let later = T0 + IDLE;
    clock.set(later);
    store
        .create(&ident("after-expiry", &[]), later)
        .await
        .unwrap();
}

fn memory_store(max: usize) -> Arc<MemorySessionStore> {
    Arc::new(MemorySessionStore::new(suite_timeouts(), max))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_session_store_suite() {
    session_store_suite(memory_store(10_000), ManualClock::new(T0)).await;
}

#[tokio::test]
async fn memory_store_capacity_limit() {
    capacity_suite(memory_store(8), 8, ManualClock::new(T0)).await;
}

#[tokio::test]
async fn memory_store_sweep_removes_only_expired_sessions() {
    let store = memory_store(1000);
    let (old, _) = store.create(&ident("a", &[]), T0).await.unwrap();
    let (_old2, _) = store.create(&ident("a", &[]), T0).await.unwrap();
    let (kept, _) = store.create(&ident("a", &[]), T0 + 30).await.unwrap();
    let (touched, _) = store.create(&ident("b", &[]), T0).await.unwrap();
    store.get(&touched, T0 + 50, true).await.unwrap().unwrap();
    assert_eq!(store.sweep(T0 + IDLE - 1), 0);
    assert_eq!(store.count().await.unwrap(), 4);
    assert_eq!(store.sweep(T0 + IDLE), 2);
    assert_eq!(store.count().await.unwrap(), 2);
    assert!(store.get(&old, T0, false).await.unwrap().is_none());
    assert!(store.get(&kept, T0 + IDLE, false).await.unwrap().is_some());
    assert!(store
        .get(&touched, T0 + IDLE, false)
        .await
        .unwrap()
        .is_some());
    // The user index follows the sweep: only the remaining session of "a" is left to revoke.
    assert_eq!(store.delete_user("a").await.unwrap(), 1);
    assert_eq!(store.sweep(T0 + 10 * ABSOLUTE), 1);
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test]
async fn memory_store_background_sweeper_removes_expired_sessions() {
    let store = memory_store(1000);
    let clock = ManualClock::new(T0);
    let shared: SharedClock = Arc::new(clock.clone());
    let sweeper = store.spawn_sweeper(Duration::from_millis(20), shared);
    for i in 0..100 {
        store
            .create(&ident(&format!("u{}", i % 7), &[]), T0)
            .await
            .unwrap();
    }
    let (late, _) = store.create(&ident("late", &[]), T0 + IDLE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.count().await.unwrap(), 101, "nothing has expired yet");
    clock.set(T0 + IDLE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.count().await.unwrap() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sweeper did not run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.get(&late, T0 + IDLE, false).await.unwrap().is_some());
    // The sweeper stops once the store is gone.
    drop(store);
    tokio::time::timeout(Duration::from_secs(5), sweeper)
        .await
        .expect("sweeper did not stop")
        .unwrap();
}

/// 1M sessions within the 300 MiB budget. Slow in debug builds: run with
/// `cargo test --release --all-features --test session_store -- --ignored`.
#[tokio::test]
#[ignore]
async fn one_million_sessions_fit_in_300_mib() {
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let before = rss_kib();
    let store = memory_store(1_000_000);
    let mut sample = Vec::new();
    for i in 0..1_000_000u32 {
        // Distinct users: the worst case for per-user sharing.
        let identity = Identity::new(format!("user{i}"), ["reader"]);
        let (id, _) = store.create(&identity, T0).await.unwrap();
        if i % 1000 == 0 {
            sample.push(id);
        }
    }
    let grown_mib = (rss_kib() - before) / 1024;
    let total_mib = rss_kib() / 1024;
    println!("1M sessions: +{grown_mib} MiB, process RSS {total_mib} MiB");
    // The hot path: a touching lookup among 1M sessions.
    let start = std::time::Instant::now();
    for round in 0..100 {
        for id in &sample {
            assert!(store.get(id, T0 + round, true).await.unwrap().is_some());
        }
    }
    println!(
        "get(touch): {:?} per call",
        start.elapsed() / (100 * sample.len() as u32)
    );
    assert!(total_mib <= 300, "RSS {total_mib} MiB");
    // Sweeping when nothing is due costs nothing; when everything is, it removes everything.
    let start = std::time::Instant::now();
    assert_eq!(store.sweep(T0 + IDLE - 1), 0);
    println!("sweep, nothing due: {:?}", start.elapsed());
    let start = std::time::Instant::now();
    // The sampled sessions were last touched at T0 + 99: all are expired by T0 + IDLE + 100.
    assert_eq!(store.sweep(T0 + IDLE + 100), 1_000_000);
    println!("sweep, 1M due: {:?}", start.elapsed());
    assert_eq!(store.count().await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// Login throttle
// ---------------------------------------------------------------------------------------------

fn throttle(per_ip: u32, per_user: u32, window_secs: u64, max_keys: usize) -> MemoryLoginThrottle {
    let config = ThrottleConfig {
        max_failures_per_ip: per_ip,
        max_failures_per_user: per_user,
        window: Duration::from_secs(window_secs),
        max_tracked_keys: max_keys,
    };
    MemoryLoginThrottle::new(config, max_keys)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn throttle_counts_failures_per_user_case_insensitively() {
    let t = throttle(100, 3, 60, 1000);
    for i in 0..3 {
        assert_eq!(t.check(ip("10.0.0.1"), "alice", T0).await.unwrap(), None);
        // From different addresses: only the user count can trip.
        t.record_failure(ip(&format!("10.0.1.{i}")), "alice", T0)
            .await
            .unwrap();
    }
    // Names are lower-cased: ALICE is alice.
    assert_eq!(
        t.check(ip("10.9.9.9"), "ALICE", T0 + 10).await.unwrap(),
        Some(50)
    );
    // Other users are not affected.
    assert_eq!(t.check(ip("10.0.0.1"), "bob", T0 + 10).await.unwrap(), None);
}

#[tokio::test]
async fn throttle_counts_failures_per_ip() {
    let t = throttle(4, 100, 60, 1000);
    for i in 0..4 {
        t.record_failure(ip("192.0.2.7"), &format!("user{i}"), T0)
            .await
            .unwrap();
    }
    assert_eq!(
        t.check(ip("192.0.2.7"), "someone", T0 + 1).await.unwrap(),
        Some(59)
    );
    assert_eq!(
        t.check(ip("192.0.2.8"), "someone", T0 + 1).await.unwrap(),
        None
    );
    // IPv4-mapped IPv6 is the same client.
    assert_eq!(
        t.check(ip("::ffff:192.0.2.7"), "x", T0 + 1).await.unwrap(),
        Some(59)
    );
}

#[tokio::test]
async fn throttle_counts_ipv6_by_slash_64() {
    let t = throttle(2, 100, 60, 1000);
    t.record_failure(ip("2001:db8:1:2::1"), "a", T0)
        .await
        .unwrap();
    t.record_failure(ip("2001:db8:1:2:ffff::9"), "b", T0)
        .await
        .unwrap();
    assert!(t
        .check(ip("2001:db8:1:2::77"), "c", T0)
        .await
        .unwrap()
        .is_some());
    assert!(t
        .check(ip("2001:db8:1:3::1"), "c", T0)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn throttle_window_resets_and_retry_after_counts_down() {
    let t = throttle(100, 2, 60, 1000);
    t.record_failure(ip("10.0.0.1"), "carol", T0).await.unwrap();
    t.record_failure(ip("10.0.0.1"), "carol", T0 + 20)
        .await
        .unwrap();
    // Fixed window from the first failure: ends at T0 + 60.
    assert_eq!(
        t.check(ip("10.0.0.1"), "carol", T0 + 20).await.unwrap(),
        Some(40)
    );
    assert_eq!(
        t.check(ip("10.0.0.1"), "carol", T0 + 59).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        t.check(ip("10.0.0.1"), "carol", T0 + 60).await.unwrap(),
        None
    );
    // A failure after the window starts a new count.
    t.record_failure(ip("10.0.0.1"), "carol", T0 + 61)
        .await
        .unwrap();
    assert_eq!(
        t.check(ip("10.0.0.1"), "carol", T0 + 62).await.unwrap(),
        None
    );
    t.record_failure(ip("10.0.0.1"), "carol", T0 + 62)
        .await
        .unwrap();
    assert_eq!(
        t.check(ip("10.0.0.1"), "carol", T0 + 62).await.unwrap(),
        Some(59)
    );
}

#[tokio::test]
async fn throttle_success_clears_the_user_but_not_the_address() {
    let t = throttle(3, 2, 60, 1000);
    t.record_failure(ip("10.0.0.1"), "dave", T0).await.unwrap();
    t.record_failure(ip("10.0.0.1"), "dave", T0).await.unwrap();
    assert!(t.check(ip("10.0.0.2"), "dave", T0).await.unwrap().is_some());
    // Spelled otherwise than every counted attempt: perhaps another account of the users
    // file sharing the case-folded counter, so its success clears nothing.
    t.record_success(ip("10.0.0.2"), "Dave").await.unwrap();
    assert!(t.check(ip("10.0.0.2"), "dave", T0).await.unwrap().is_some());
    t.record_success(ip("10.0.0.2"), "dave").await.unwrap();
    assert!(t.check(ip("10.0.0.2"), "dave", T0).await.unwrap().is_none());
    t.record_failure(ip("10.0.0.1"), "erin", T0).await.unwrap();
    // The address count (3) was not reset by dave's success.
    assert!(t
        .check(ip("10.0.0.1"), "frank", T0)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn throttle_memory_is_bounded_and_fails_closed_when_full() {
    let t = throttle(100, 100, 60, 4);
    t.record_failure(ip("10.0.0.1"), "a", T0).await.unwrap();
    t.record_failure(ip("10.0.0.2"), "b", T0).await.unwrap();
    assert_eq!(t.tracked_keys(), 4);
    // Known keys keep working; new ones cannot be tracked -> refused, not unthrottled.
    assert!(t.check(ip("10.0.0.1"), "a", T0).await.unwrap().is_none());
    assert!(t.check(ip("10.0.0.3"), "c", T0).await.is_err());
    assert!(t.record_failure(ip("10.0.0.3"), "c", T0).await.is_err());
    assert_eq!(t.tracked_keys(), 4);
    // After the window, stale keys are dropped to make room.
    assert!(t
        .check(ip("10.0.0.3"), "c", T0 + 60)
        .await
        .unwrap()
        .is_none());
    t.record_failure(ip("10.0.0.3"), "c", T0 + 60)
        .await
        .unwrap();
    assert_eq!(t.tracked_keys(), 2);
}

/// Creates, lookups, deletes, revocations and sweeps racing on all shards keep the store
/// consistent: the count matches the sessions that can still be found, and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_stays_consistent_under_concurrent_mixed_use() {
    let store = memory_store(5_000);
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for i in 0..300u64 {
                let now = T0 + i / 10;
                let user = format!("user{}", (task + i) % 5);
                let (id, _) = store.create(&ident(&user, &["r"]), now).await.unwrap();
                match i % 4 {
                    0 => store.delete(&id).await.unwrap(),
                    1 => {
                        store.get(&id, now, true).await.unwrap();
                        kept.push(id);
                    }
                    2 if i % 40 == 2 => {
                        store.delete_user(&user).await.unwrap();
                    }
                    _ => kept.push(id),
                }
                if i % 50 == 0 {
                    store.sweep(now);
                }
            }
            kept
        }));
    }
    let mut kept = Vec::new();
    for task in tasks {
        kept.extend(task.await.unwrap());
    }
    // Nothing has expired (the clock never passed T0 + 30 < T0 + IDLE): every session not
    // deleted or revoked is found, and the count is exactly those.
    let now = T0 + 30;
    let mut found = 0;
    for id in &kept {
        if store.get(id, now, false).await.unwrap().is_some() {
            found += 1;
        }
    }
    assert_eq!(store.count().await.unwrap(), found);
    let mut revoked = 0;
    for u in 0..5 {
        revoked += store.delete_user(&format!("user{u}")).await.unwrap();
    }
    assert_eq!(revoked, found);
    assert_eq!(store.count().await.unwrap(), 0);
    assert_eq!(store.sweep(T0 + 10 * ABSOLUTE), 0);
}

/// `admit` checks and counts under one lock: of attempts racing on many threads, exactly the
/// limit is admitted.
#[test]
fn throttle_admits_racing_attempts_exactly_up_to_the_limit() {
    let t = Arc::new(throttle(1000, 5, 60, 1000));
    let admitted: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let t = t.clone();
                scope.spawn(move || {
                    (0..10)
                        .filter(|i| {
                            let client = ip(&format!("10.4.{w}.{i}"));
                            futures_ready(t.admit(client, "gina", T0))
                                .unwrap()
                                .is_none()
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(admitted, 5);
}

/// A released attempt is taken back from both counters, only in the window it was counted
/// in; a refused admission counts nothing.
#[tokio::test]
async fn throttle_release_takes_back_one_attempt_of_its_window() {
    let t = throttle(2, 2, 60, 1000);
    let client = ip("10.5.0.1");
    assert_eq!(t.admit(client, "hal", T0).await.unwrap(), None);
    assert_eq!(t.admit(client, "hal", T0).await.unwrap(), None);
    assert_eq!(t.admit(client, "hal", T0 + 1).await.unwrap(), Some(59));
    assert_eq!(t.admit(client, "hal", T0 + 2).await.unwrap(), Some(58));
    t.release(client, "hal", T0).await.unwrap();
    assert_eq!(t.admit(client, "hal", T0 + 3).await.unwrap(), None);
    assert!(t.check(client, "hal", T0 + 3).await.unwrap().is_some());
    // A new window (from T0 + 60) did not hold an attempt admitted at T0: nothing taken back.
    assert_eq!(t.admit(client, "hal", T0 + 60).await.unwrap(), None);
    assert_eq!(t.admit(client, "hal", T0 + 60).await.unwrap(), None);
    t.release(client, "hal", T0).await.unwrap();
    assert!(t.check(client, "hal", T0 + 61).await.unwrap().is_some());
}

/// The memory throttle's futures are ready at once: polled without a runtime.
fn futures_ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("the memory throttle never waits"),
    }
}

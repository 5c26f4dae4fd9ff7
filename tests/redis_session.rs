//! `RedisSessionStore` against a real `redis-server`: what only a shared store can show (two
//! store instances = two proxies), its key layout and TTLs, the touch write policy, limits, and
//! failing closed then recovering. The behaviour it shares with the memory store is checked by
//! the common suite (tests/redis_session_suite.rs).
#![cfg(feature = "proxy")]

mod support_logs;
mod support_redis;

use std::time::{Duration, Instant};

use countersign::proxy::session::{SessionId, SessionStore, SessionTimeouts};
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::RedisConnection;
use countersign::Identity;
use support_redis::RedisServer;

const T0: u64 = 1_000_000;
const IDLE: u64 = 30 * 60;
const ABSOLUTE: u64 = 12 * 3600;

fn timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: Duration::from_secs(IDLE),
        absolute: Duration::from_secs(ABSOLUTE),
    }
}

/// A connection whose deadlines no stall of a loaded machine reaches
/// (`support_redis::patient_options`).
fn connection(server: &RedisServer) -> RedisConnection {
    RedisConnection::with_options(&server.url(), support_redis::patient_options()).unwrap()
}

/// A store as one proxy process would have it: its own connection.
fn proxy_store(server: &RedisServer) -> RedisSessionStore {
    RedisSessionStore::new(connection(server), "cs:", timeouts(), 1000)
}

fn alice() -> Identity {
    Identity::new("alice", ["admin", "ops"])
}

fn session_key(id: &SessionId) -> String {
    let hash: String = id.store_key().iter().map(|b| format!("{b:02x}")).collect();
    format!("cs:session:{hash}")
}

fn stored_field(server: &RedisServer, id: &SessionId, field: &str) -> serde_json::Value {
    let raw = server.cli(&["GET", &session_key(id)]);
    let value: serde_json::Value = serde_json::from_str(&raw).unwrap();
    value[field].clone()
}

fn ttl_secs(server: &RedisServer, key: &str) -> i64 {
    server.cli(&["TTL", key]).parse().unwrap()
}

#[tokio::test]
async fn a_session_made_on_one_proxy_works_and_ends_on_another() {
    let server = RedisServer::start();
    let proxy_a = proxy_store(&server);
    let proxy_b = proxy_store(&server);

    let (id, created) = proxy_a.create(&alice(), T0).await.unwrap();
    // The browser sends the cookie to proxy B.
    let cookie = SessionId::parse(id.as_cookie_value()).unwrap();
    let seen = proxy_b.get(&cookie, T0 + 10, true).await.unwrap().unwrap();
    assert_eq!(seen.user, "alice");
    assert_eq!(seen.roles, ["admin", "ops"]);
    assert_eq!(seen.csrf_token, created.csrf_token);
    assert_eq!(seen.created_at, T0);
    assert_eq!(seen.absolute_expires_at, T0 + ABSOLUTE);

    // Logout on B; A no longer knows the session.
    proxy_b.delete(&cookie).await.unwrap();
    assert_eq!(proxy_a.get(&id, T0 + 11, true).await.unwrap(), None);
    assert_eq!(server.cli(&["EXISTS", &session_key(&id)]), "0");
    // A touch after the delete does not bring it back.
    assert_eq!(proxy_a.get(&id, T0 + 100, true).await.unwrap(), None);
    assert_eq!(server.cli(&["EXISTS", &session_key(&id)]), "0");
}

#[tokio::test]
async fn revoking_a_user_on_one_proxy_ends_their_sessions_on_all() {
    let server = RedisServer::start();
    let proxy_a = proxy_store(&server);
    let proxy_b = proxy_store(&server);
    let (a1, _) = proxy_a.create(&alice(), T0).await.unwrap();
    let (a2, _) = proxy_b.create(&alice(), T0 + 1).await.unwrap();
    let (a3, _) = proxy_a.create(&alice(), T0 + 2).await.unwrap();
    let (bob, _) = proxy_b
        .create(&Identity::new("bob", Vec::<String>::new()), T0)
        .await
        .unwrap();
    // A name that differs only in case is another user.
    let (upper, _) = proxy_b
        .create(&Identity::new("Alice", Vec::<String>::new()), T0)
        .await
        .unwrap();
    assert_eq!(proxy_a.count().await.unwrap(), 5);

    assert_eq!(proxy_b.delete_user("alice").await.unwrap(), 3);
    for id in [&a1, &a2, &a3] {
        assert_eq!(proxy_a.get(id, T0 + 5, false).await.unwrap(), None);
        assert_eq!(proxy_b.get(id, T0 + 5, false).await.unwrap(), None);
    }
    assert!(proxy_a.get(&bob, T0 + 5, false).await.unwrap().is_some());
    assert!(proxy_a.get(&upper, T0 + 5, false).await.unwrap().is_some());
    assert_eq!(proxy_a.count().await.unwrap(), 2);
    // Again: nothing left to end.
    assert_eq!(proxy_a.delete_user("alice").await.unwrap(), 0);
    assert_eq!(proxy_a.delete_user("nobody").await.unwrap(), 0);
}

#[tokio::test]
async fn a_dump_of_redis_holds_no_session_id() {
    let server = RedisServer::start();
    let store = proxy_store(&server);
    let (id, session) = store.create(&alice(), T0).await.unwrap();
    let keys = server.cli(&["KEYS", "*"]);
    let value = server.cli(&["GET", &session_key(&id)]);
    assert!(!keys.contains(id.as_cookie_value()));
    assert!(!value.contains(id.as_cookie_value()));
    // What is stored is what the store needs: the record is keyed by SHA-256(id).
    assert_eq!(stored_field(&server, &id, "u"), "alice");
    assert_eq!(stored_field(&server, &id, "c"), session.csrf_token.as_str());
    let mut listed: Vec<String> = keys.lines().map(str::to_owned).collect();
    listed.sort_unstable();
    let user_key = listed
        .iter()
        .find(|k| k.starts_with("cs:user:"))
        .expect("a user index key")
        .clone();
    // `cs:session_seq`: the login counter (`max_sessions_per_user` orders logins by it).
    let mut expected = vec![
        session_key(&id),
        "cs:sessions".to_owned(),
        "cs:session_seq".to_owned(),
        user_key,
    ];
    expected.sort_unstable();
    assert_eq!(listed, expected, "every key is under the prefix");
}

#[tokio::test]
async fn redis_ttls_follow_the_earlier_of_idle_and_absolute_expiry() {
    let server = RedisServer::start();
    let store = proxy_store(&server).touch_interval(Duration::ZERO);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    let ttl = ttl_secs(&server, &session_key(&id));
    assert!((IDLE as i64 - 2..=IDLE as i64).contains(&ttl), "ttl {ttl}");
    let user_keys = server.cli(&["KEYS", "cs:user:*"]);
    let user_ttl = ttl_secs(&server, user_keys.trim());
    assert!(
        (ABSOLUTE as i64 - 2..=ABSOLUTE as i64).contains(&user_ttl),
        "user index ttl {user_ttl}"
    );

    // Close to the absolute end, a touch sets the TTL to what is left of the absolute time.
    let near_end = T0 + ABSOLUTE - 100;
    // Keep it alive up to there with touches inside the idle window.
    let mut t = T0;
    while t + IDLE - 60 < near_end {
        t += IDLE - 60;
        assert!(store.get(&id, t, true).await.unwrap().is_some());
    }
    let session = store.get(&id, near_end, true).await.unwrap().unwrap();
    assert_eq!(session.expires_at(), T0 + ABSOLUTE);
    let ttl = ttl_secs(&server, &session_key(&id));
    assert!((98..=100).contains(&ttl), "ttl {ttl}");
    assert_eq!(store.get(&id, T0 + ABSOLUTE, true).await.unwrap(), None);
}

/// The user's index (what revoke and logout-all walk) must outlive every record in it. Its
/// TTL was set at login only, to the absolute timeout of that moment: a session whose lifetime
/// a reload raised outlived it, and after the old absolute timeout `revoke` answered
/// `{"revoked":0}` while the session went on working. Found by a QA read.
#[tokio::test]
async fn the_user_index_outlives_every_record_in_it_so_revoke_reaches_them() {
    let server = RedisServer::start();
    let store = proxy_store(&server).touch_interval(Duration::ZERO);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    let user_key = server.cli(&["KEYS", "cs:user:*"]).trim().to_owned();
    assert!(user_key.starts_with("cs:user:"), "{user_key}");
    // A reload raises both timeouts to four days; the next touch gives the record that life.
    let four_days = Duration::from_secs(4 * 24 * 3600);
    assert!(store.set_timeouts(SessionTimeouts {
        idle: four_days,
        absolute: four_days,
    }));
    assert!(store.get(&id, T0 + 60, true).await.unwrap().is_some());
    let record_ttl = ttl_secs(&server, &session_key(&id));
    assert!(record_ttl > ABSOLUTE as i64, "record ttl {record_ttl}");
    let index_ttl = ttl_secs(&server, &user_key);
    assert!(
        index_ttl >= record_ttl,
        "index {index_ttl} < record {record_ttl}"
    );
    // An index already gone (expired before this fix) is put back by the next touch.
    server.cli(&["DEL", &user_key]);
    assert!(store.get(&id, T0 + 120, true).await.unwrap().is_some());
    let (record_ttl, index_ttl) = (
        ttl_secs(&server, &session_key(&id)),
        ttl_secs(&server, &user_key),
    );
    assert!(
        index_ttl >= record_ttl,
        "index {index_ttl} < record {record_ttl}"
    );
    // A login on a proxy still on the shorter lifetime does not shorten the index.
    let not_reloaded = proxy_store(&server);
    let (other, _) = not_reloaded.create(&alice(), T0 + 180).await.unwrap();
    let index_ttl = ttl_secs(&server, &user_key);
    assert!(
        index_ttl >= record_ttl - 2,
        "index {index_ttl} < record {record_ttl}"
    );
    // So revoke reaches both.
    assert_eq!(not_reloaded.delete_user("alice").await.unwrap(), 2);
    assert_eq!(store.get(&id, T0 + 200, false).await.unwrap(), None);
    assert_eq!(store.get(&other, T0 + 200, false).await.unwrap(), None);
}

/// A review's repro of the same promise, below a second: the touch compared the index's `TTL`,
/// which Redis rounds to whole seconds, with the record's new lifetime, so an index with about
/// 1.5 s left read as 2 s, was "not shorter" than a record just given 2 s, and expired up to
/// half a second before it. A revoke then answered 0, and the session, still live, went on (its
/// next touch even made a new index). Here the lifetimes are 2 s, a reload raises the absolute
/// one, the session is touched 450 ms on, and the revoke comes in the record's last 400 ms.
#[tokio::test]
async fn a_revoke_in_a_records_last_moments_still_finds_it() {
    let server = RedisServer::start();
    let two_seconds = Duration::from_secs(2);
    let store = RedisSessionStore::new(
        connection(&server),
        "cs:",
        SessionTimeouts {
            idle: two_seconds,
            absolute: two_seconds,
        },
        1000,
    )
    .touch_interval(Duration::ZERO);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    assert!(store.set_timeouts(SessionTimeouts {
        idle: two_seconds,
        absolute: Duration::from_secs(3600),
    }));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(store.get(&id, T0 + 1, true).await.unwrap().is_some());
    let pttl = |key: &str| -> i64 { server.cli(&["PTTL", key]).trim().parse().unwrap() };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pttl(&session_key(&id)) > 400 {
        assert!(Instant::now() < deadline, "the record did not run down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pttl(&session_key(&id)) > 0,
        "the record expired before the revoke (timing)"
    );
    assert_eq!(
        store.delete_user("alice").await.unwrap(),
        1,
        "the revoke found no session: the user's index expired before the record"
    );
    assert_eq!(store.get(&id, T0 + 1, true).await.unwrap(), None);
}

#[tokio::test]
async fn touch_writes_at_most_once_per_interval() {
    let server = RedisServer::start();
    let store = proxy_store(&server).touch_interval(Duration::from_secs(5));
    let (id, _) = store.create(&alice(), T0).await.unwrap();

    // Within the interval: no write; the stored and returned last-seen stay at T0.
    let session = store.get(&id, T0 + 4, true).await.unwrap().unwrap();
    assert_eq!(session.last_seen, T0);
    assert_eq!(stored_field(&server, &id, "ls"), T0);

    // At the interval: written.
    let session = store.get(&id, T0 + 5, true).await.unwrap().unwrap();
    assert_eq!(session.last_seen, T0 + 5);
    assert_eq!(session.idle_expires_at, T0 + 5 + IDLE);
    assert_eq!(stored_field(&server, &id, "ls"), T0 + 5);

    // touch = false never writes, however old last-seen is.
    let session = store.get(&id, T0 + 600, false).await.unwrap().unwrap();
    assert_eq!(session.last_seen, T0 + 5);
    assert_eq!(stored_field(&server, &id, "ls"), T0 + 5);

    // A clock behind the stored last-seen (another proxy ahead) never moves it back.
    let session = store.get(&id, T0 + 2, true).await.unwrap().unwrap();
    assert_eq!(session.last_seen, T0 + 5);
    assert_eq!(stored_field(&server, &id, "ls"), T0 + 5);
}

#[tokio::test]
async fn idle_expiry_counts_from_the_last_written_touch() {
    let server = RedisServer::start();
    let store = proxy_store(&server).touch_interval(Duration::from_secs(5));
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    // Touched at T0+3: not written (younger than the interval), so the session still ends
    // at T0 + IDLE: the documented cost of fewer writes is at most `touch_interval`.
    assert!(store.get(&id, T0 + 3, true).await.unwrap().is_some());
    assert!(store
        .get(&id, T0 + IDLE - 1, false)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.get(&id, T0 + IDLE, false).await.unwrap(), None);
}

#[tokio::test]
async fn the_session_limit_is_fleet_wide_and_frees_up_on_delete_and_expiry() {
    let server = RedisServer::start();
    let proxy_a = RedisSessionStore::new(connection(&server), "cs:", timeouts(), 2);
    let proxy_b = RedisSessionStore::new(connection(&server), "cs:", timeouts(), 2);
    let (first, _) = proxy_a.create(&alice(), T0).await.unwrap();
    proxy_b.create(&alice(), T0 + 1).await.unwrap();
    let error = proxy_a.create(&alice(), T0 + 2).await.unwrap_err();
    assert!(error.to_string().contains("session limit"), "{error}");
    assert_eq!(proxy_b.count().await.unwrap(), 2);

    proxy_b.delete(&first).await.unwrap();
    assert_eq!(proxy_a.count().await.unwrap(), 1);
    proxy_a.create(&alice(), T0 + 3).await.unwrap();
    assert!(proxy_b.create(&alice(), T0 + 4).await.is_err());

    // Once both have expired (by the proxies' clock), logins succeed again.
    let later = T0 + IDLE + 10;
    proxy_b.create(&alice(), later).await.unwrap();
    assert_eq!(proxy_a.count().await.unwrap(), 1);
}

#[tokio::test]
async fn prune_drops_expired_entries_from_the_count() {
    let server = RedisServer::start();
    let store = proxy_store(&server);
    store.create(&alice(), T0).await.unwrap();
    store.create(&alice(), T0 + 100).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    assert_eq!(store.prune(T0 + IDLE).await.unwrap(), 1);
    assert_eq!(store.count().await.unwrap(), 1);
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_no_session() {
    let server = RedisServer::start();
    let store = proxy_store(&server);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    server.cli(&["SET", &session_key(&id), "{not json"]);
    assert_eq!(store.get(&id, T0 + 1, true).await.unwrap(), None);
}

/// A record with a string where a number belongs (another writer's, a newer version's) is no
/// session, and the warning says where it failed without quoting what it found: serde_json's
/// own message quotes the value ("invalid type: string \"…\""), which in a session record can
/// be a CSRF token or a user name.
#[tokio::test]
async fn an_undecodable_record_is_logged_without_its_values() {
    let server = RedisServer::start();
    let store = proxy_store(&server);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    let secret = "csrf-token-that-must-not-be-logged";
    let record = format!("{{\"u\":\"alice\",\"ca\":\"{secret}\"}}");
    server.cli(&["SET", &session_key(&id), &record]);
    let (captured, _guard) = support_logs::capture();
    assert_eq!(store.get(&id, T0 + 1, true).await.unwrap(), None);
    let log = captured.text();
    assert!(
        log.contains("undecodable session record in redis; ignored"),
        "{log}"
    );
    assert!(
        !log.contains(secret),
        "a value of the record was logged: {log}"
    );
    assert!(log.contains("fault=Data"), "{log}");
}

#[tokio::test]
async fn sessions_survive_a_proxy_restart() {
    let server = RedisServer::start();
    let (id, created) = {
        let before_restart = proxy_store(&server);
        before_restart.create(&alice(), T0).await.unwrap()
    };
    // A new process: a new connection and store, same Redis.
    let after_restart = proxy_store(&server);
    let session = after_restart
        .get(&id, T0 + 60, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.csrf_token, created.csrf_token);
}

#[tokio::test]
async fn redis_down_fails_closed_and_the_same_store_recovers() {
    let mut server = RedisServer::start();
    let store = proxy_store(&server);
    let (id, _) = store.create(&alice(), T0).await.unwrap();
    assert!(store.ready().await);

    server.stop();
    let started = Instant::now();
    assert!(store.get(&id, T0 + 1, true).await.is_err());
    assert!(store.get(&id, T0 + 1, false).await.is_err());
    assert!(store.create(&alice(), T0 + 1).await.is_err());
    assert!(store.delete(&id).await.is_err());
    assert!(store.delete_user("alice").await.is_err());
    assert!(store.count().await.is_err());
    assert!(!store.ready().await);
    let error = store.get(&id, T0 + 1, true).await.unwrap_err();
    assert!(error.message().starts_with("redis "), "{error}");
    // Refused at once: well within one 10 s connect deadline, let alone eight.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "every failing call is bounded by its deadline: {:?}",
        started.elapsed()
    );

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if store.count().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "store did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.ready().await);
    // The test server has no persistence: the old session is gone, new ones work.
    assert_eq!(store.get(&id, T0 + 2, true).await.unwrap(), None);
    let (new_id, _) = store.create(&alice(), T0 + 2).await.unwrap();
    assert!(store.get(&new_id, T0 + 3, true).await.unwrap().is_some());
}

#[tokio::test]
async fn a_hung_redis_is_an_error_within_the_deadline() {
    let server = RedisServer::start();
    // The session is made by another proxy (a call that must succeed, on a busy machine too);
    // the store under test has 300 ms deadlines and is connected before the freeze.
    let (id, _) = proxy_store(&server).create(&alice(), T0).await.unwrap();
    let fast = RedisConnection::with_options(&server.url(), support_redis::fast_options()).unwrap();
    support_redis::wait_connected(&fast, Duration::from_secs(10)).await;
    let store = RedisSessionStore::new(fast, "cs:", timeouts(), 1000);
    server.pause();
    let started = Instant::now();
    let result = store.get(&id, T0 + 1, true).await;
    let elapsed = started.elapsed();
    server.resume();
    assert!(result.is_err());
    // A hang would last until the resume (never, for this call); 5 s is many times the
    // 300 ms deadline, the rest slack for a busy machine.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

/// The least-privilege ACL user from docs/DEPLOYMENT.md is enough for every store.
#[tokio::test]
async fn the_documented_acl_user_can_run_every_store() {
    use countersign::proxy::config::ThrottleConfig;
    use countersign::proxy::throttle::LoginThrottle;
    use countersign::proxy::throttle_redis::RedisLoginThrottle;
    use countersign::replay::{RedisReplayCache, ReplayCache, ReplayOutcome};

    let (_server, url) = RedisServer::start_with_documented_acl();
    let connection = RedisConnection::with_options(&url, support_redis::patient_options()).unwrap();
    let sessions = RedisSessionStore::new(connection.clone(), "countersign:", timeouts(), 100);
    assert!(sessions.ready().await);
    let (id, _) = sessions.create(&alice(), T0).await.unwrap();
    assert!(sessions.get(&id, T0 + 60, true).await.unwrap().is_some());
    assert_eq!(sessions.count().await.unwrap(), 1);
    sessions.delete(&id).await.unwrap();
    sessions.create(&alice(), T0).await.unwrap();
    assert_eq!(sessions.delete_user("alice").await.unwrap(), 1);
    sessions.prune(T0).await.unwrap();

    let throttle = RedisLoginThrottle::new(
        connection.clone(),
        "countersign:",
        ThrottleConfig::default(),
    );
    let ip = "10.0.0.1".parse().unwrap();
    throttle.record_failure(ip, "alice", T0).await.unwrap();
    assert_eq!(throttle.check(ip, "alice", T0).await.unwrap(), None);
    // What a login runs: admit (a script), release and clear.
    assert_eq!(throttle.admit(ip, "alice", T0).await.unwrap(), None);
    throttle.release(ip, "alice", T0).await.unwrap();
    throttle.record_success(ip, "alice").await.unwrap();

    let replay = RedisReplayCache::new(connection, "countersign:nonce:");
    assert_eq!(
        replay.check_and_record("n", T0 + 10, T0).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(replay.ready().await);

    // Outside the prefix the user has no access: the ACL really is in force.
    let outside = RedisReplayCache::new(
        RedisConnection::with_options(&url, support_redis::patient_options()).unwrap(),
        "other:",
    );
    assert!(outside.check_and_record("n", T0 + 10, T0).await.is_err());
}

/// Touches racing a logout on another proxy never bring the session back: a touch only
/// rewrites a record that still exists (`SET .. XX`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn touches_racing_a_logout_never_resurrect_the_session() {
    let server = RedisServer::start();
    let proxy_a = std::sync::Arc::new(proxy_store(&server).touch_interval(Duration::ZERO));
    let proxy_b = proxy_store(&server);
    for round in 0..20u64 {
        let (id, _) = proxy_a.create(&alice(), T0).await.unwrap();
        let cookie = id.as_cookie_value().to_owned();
        let mut touches = Vec::new();
        for task in 0..4u64 {
            let store = proxy_a.clone();
            let id = SessionId::parse(&cookie).unwrap();
            touches.push(tokio::spawn(async move {
                for step in 1..=25u64 {
                    let _ = store.get(&id, T0 + task * 100 + step, true).await.unwrap();
                }
            }));
        }
        tokio::task::yield_now().await;
        proxy_b.delete(&id).await.unwrap();
        for touch in touches {
            touch.await.unwrap();
        }
        assert_eq!(
            server.cli(&["EXISTS", &session_key(&id)]),
            "0",
            "round {round}: the session came back"
        );
        assert_eq!(proxy_b.get(&id, T0 + 1000, false).await.unwrap(), None);
    }
    assert_eq!(proxy_b.count().await.unwrap(), 0);
}

/// Creates, touches, deletes and revocations from two proxies at once leave the store
/// consistent: every surviving session is found, the count is exactly those, and revoking
/// every user removes exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_use_from_two_proxies_stays_consistent() {
    let server = RedisServer::start();
    let proxies = [
        std::sync::Arc::new(proxy_store(&server).touch_interval(Duration::ZERO)),
        std::sync::Arc::new(proxy_store(&server).touch_interval(Duration::ZERO)),
    ];
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let store = proxies[(task % 2) as usize].clone();
        let other = proxies[((task + 1) % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for i in 0..60u64 {
                let now = T0 + i / 10;
                let user = format!("user{}", (task + i) % 5);
                let (id, _) = store
                    .create(&Identity::new(user.as_str(), ["r"]), now)
                    .await
                    .unwrap();
                match i % 4 {
                    0 => other.delete(&id).await.unwrap(),
                    1 => {
                        other.get(&id, now + 1, true).await.unwrap();
                        kept.push(id);
                    }
                    2 if i % 20 == 2 => {
                        other.delete_user(&user).await.unwrap();
                    }
                    _ => kept.push(id),
                }
            }
            kept
        }));
    }
    let mut kept = Vec::new();
    for task in tasks {
        kept.extend(task.await.unwrap());
    }
    let now = T0 + 30;
    let mut found = 0;
    for id in &kept {
        if proxies[0].get(id, now, false).await.unwrap().is_some() {
            found += 1;
        }
    }
    assert!(found > 0);
    assert_eq!(proxies[1].count().await.unwrap(), found);
    let mut revoked = 0;
    for u in 0..5 {
        revoked += proxies[0].delete_user(&format!("user{u}")).await.unwrap();
    }
    assert_eq!(revoked, found);
    assert_eq!(proxies[1].count().await.unwrap(), 0);
    assert_eq!(server.cli(&["KEYS", "cs:session:*"]), "");
}

/// docs/DEPLOYMENT.md: `P user:<hex SHA-256(user)>` holds "the live ones and those ended since
/// the user's last login". So after 50 login/logout pairs and one live login it holds that one
/// session. (A QA pass found it kept every ended session, its TTL renewed by each login: for a
/// user logging in at least once per absolute timeout it grew for ever, and revoke, a script
/// looping over every member, blocked Redis in proportion.)
#[tokio::test]
async fn the_user_index_drops_ended_sessions_at_login() {
    let server = RedisServer::start();
    let store = proxy_store(&server);
    // 50 logins, each followed by a logout (or by its expiry: the same for the index).
    for i in 0..50 {
        let (id, _) = store.create(&alice(), T0 + i * 60).await.unwrap();
        store.delete(&id).await.unwrap();
    }
    let (live, _) = store.create(&alice(), T0 + 50 * 60).await.unwrap();
    let keys = server.cli(&["KEYS", "cs:user:*"]);
    let index: Vec<&str> = keys.lines().collect();
    assert_eq!(index.len(), 1, "{index:?}");
    let live_hash = session_key(&live)
        .trim_start_matches("cs:session:")
        .to_owned();
    assert_eq!(server.cli(&["SMEMBERS", index[0]]), live_hash);
    // Revoke still ends the live one.
    assert_eq!(store.delete_user("alice").await.unwrap(), 1);
}

/// A session used every second outlives `idle_timeout = "5s"` with the default touch interval
/// (5s), as it does in the memory store: the store touches at most every half idle timeout.
/// (A QA pass found the Redis store never rewrote the idle expiry in time, so such a session
/// ended 5 s after login.)
#[tokio::test]
async fn a_session_in_constant_use_outlives_a_short_idle_timeout() {
    use countersign::proxy::session::MemorySessionStore;
    use countersign::proxy::session_redis::DEFAULT_TOUCH_INTERVAL;
    let server = RedisServer::start();
    let timeouts = SessionTimeouts {
        idle: Duration::from_secs(5),
        absolute: Duration::from_secs(3600),
    };
    // As `stores_from_config` builds it for `idle_timeout = "5s"` and no touch interval set.
    let store = RedisSessionStore::new(connection(&server), "cs:", timeouts, 1000)
        .touch_interval(DEFAULT_TOUCH_INTERVAL);
    let memory = MemorySessionStore::new(timeouts, 1000);
    let (redis_id, _) = store.create(&alice(), T0).await.unwrap();
    let (memory_id, _) = memory.create(&alice(), T0).await.unwrap();
    for t in 1..=8 {
        assert!(memory
            .get(&memory_id, T0 + t, true)
            .await
            .unwrap()
            .is_some());
        assert!(
            store.get(&redis_id, T0 + t, true).await.unwrap().is_some(),
            "a session used every second ended at +{t}s (idle 5s, touch interval 5s)"
        );
    }
    // Unused for the idle timeout, it ends in both.
    assert!(memory
        .get(&memory_id, T0 + 14, true)
        .await
        .unwrap()
        .is_none());
    assert!(store.get(&redis_id, T0 + 14, true).await.unwrap().is_none());
}

//! Adversarial checks of the browser-facing authentication: the failed-login throttle (memory
//! and Redis) against accounts whose names differ only by case, on the in-process proxy with
//! real sockets and, for Redis, a real `redis-server`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;

use std::sync::Arc;
use std::time::Duration;

use countersign::clock::{ManualClock, SharedClock};
use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use countersign::proxy::session::{MemorySessionStore, SessionTimeouts};
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::proxy::throttle_redis::RedisLoginThrottle;
use countersign::proxy::users::{HashLimits, UserDb, UserRecord, UsersHandle};
use countersign::replay::{RedisConnection, RedisOptions};
use http::StatusCode;
use support::{
    cheap_hash, login_at, route, settings, start_upstream, test_keyring, ABSOLUTE, IDLE, T0,
};
use support_redis::RedisServer;

const VICTIM_PASSWORD: &str = "victim-password";
const ATTACKER_PASSWORD: &str = "attacker-password";
const PER_USER: u32 = 5;

/// The throttle limits of these tests: 5 failures per name, many per address (so only the
/// per-name limit is under test).
fn limits() -> ThrottleConfig {
    ThrottleConfig {
        max_failures_per_ip: 1000,
        max_failures_per_user: PER_USER,
        window: Duration::from_secs(900),
        max_tracked_keys: 10_000,
    }
}

/// A proxy whose users file holds `victim` and `attacker`: two distinct accounts (names are
/// exact and case-sensitive) whose names are equal once lower-cased, as the throttle compares
/// them.
async fn start(victim: &str, attacker: &str, throttle: Arc<dyn LoginThrottle>) -> ProxyServer {
    let users = UserDb::from_records(vec![
        UserRecord {
            name: victim.into(),
            password_hash: cheap_hash(VICTIM_PASSWORD),
            roles: vec![],
        },
        UserRecord {
            name: attacker.into(),
            password_hash: cheap_hash(ATTACKER_PASSWORD),
            roles: vec![],
        },
    ])
    .unwrap();
    start_with(users, throttle, |_| {}).await
}

/// A proxy with these users and throttle, its settings adjusted by `tweak`.
async fn start_with(
    users: UserDb,
    throttle: Arc<dyn LoginThrottle>,
    tweak: impl FnOnce(&mut ProxySettings),
) -> ProxyServer {
    let clock: SharedClock = Arc::new(ManualClock::new(T0));
    let keyring = test_keyring();
    let upstream = start_upstream(keyring.clone(), clock.clone()).await;
    let deps = ProxyDeps {
        clock,
        sessions: Arc::new(MemorySessionStore::new(
            SessionTimeouts {
                idle: IDLE,
                absolute: ABSOLUTE,
            },
            1000,
        )),
        throttle,
        users: Some(UsersHandle::new(users)),
        keyring,
    };
    let mut settings = settings(vec![route("api", "/api/", &upstream.url())]);
    tweak(&mut settings);
    // The upstream task keeps running with the test's runtime.
    std::mem::forget(upstream);
    ProxyServer::start(settings, deps).await.unwrap()
}

/// The attack: guesses against `victim`, and between them a successful login to the attacker's
/// own account whose name lower-cases to the same text. The victim's failures must still add
/// up to the per-name limit (the success of another account must not clear them), while the
/// victim's own success still clears the victim's failures (docs/CONFIG.md, "[auth.throttle]").
async fn own_account_cannot_reset_the_victims_count(
    proxy: &ProxyServer,
    victim: &str,
    attacker: &str,
) {
    let addr = proxy.local_addr();
    for guess in 0..PER_USER - 1 {
        let r = login_at(addr, victim, &format!("guess-{guess}")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "guess {guess}");
    }
    // The attacker's own account: a success, which must not forget the victim's 4 failures.
    let own = login_at(addr, attacker, ATTACKER_PASSWORD).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());
    let last = login_at(addr, victim, "guess-last").await;
    assert_eq!(last.status, StatusCode::UNAUTHORIZED, "the 5th failure");
    // 5 failures against the victim: even the right password now waits for the window.
    let after = login_at(addr, victim, VICTIM_PASSWORD).await;
    assert_eq!(
        after.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{victim:?}'s count was cleared by a login to {attacker:?}: {}",
        after.text()
    );
    assert_eq!(after.error_code(), "too_many_attempts");
}

/// The victim's own success (the same spelling as the failures) still clears the name's count,
/// as documented: a user who mistyped a few times and then logged in starts afresh.
async fn own_success_still_clears(proxy: &ProxyServer, victim: &str) {
    let addr = proxy.local_addr();
    for guess in 0..PER_USER - 1 {
        let r = login_at(addr, victim, &format!("typo-{guess}")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "typo {guess}");
    }
    let ok = login_at(addr, victim, VICTIM_PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    for typo in 0..PER_USER {
        let r = login_at(addr, victim, &format!("later-{typo}")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "later typo {typo}");
    }
    let r = login_at(addr, victim, "one-too-many").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

/// Memory throttle: `alice` and `ALICE` are distinct accounts, one throttle counter; a login
/// to `ALICE` cleared the failures against `alice`, so its owner could guess `alice`'s
/// password without limit (4 guesses, 1 own login, repeat; only the per-address limit held).
#[tokio::test]
async fn memory_throttle_a_case_twin_account_cannot_reset_the_victims_count() {
    let throttle = Arc::new(MemoryLoginThrottle::new(limits(), 10_000));
    let proxy = start("alice", "ALICE", throttle).await;
    own_account_cannot_reset_the_victims_count(&proxy, "alice", "ALICE").await;
}

/// Guard: with the memory throttle, a user's own success still clears their failures.
#[tokio::test]
async fn memory_throttle_own_success_clears_the_count() {
    let throttle = Arc::new(MemoryLoginThrottle::new(limits(), 10_000));
    let proxy = start("alice", "ALICE", throttle).await;
    own_success_still_clears(&proxy, "alice").await;
}

fn redis_throttle(server: &RedisServer) -> Arc<RedisLoginThrottle> {
    let connection = RedisConnection::with_options(
        &server.url(),
        RedisOptions {
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(1000),
            ping_timeout: Duration::from_millis(500),
        },
    )
    .unwrap();
    Arc::new(RedisLoginThrottle::new(connection, "qa:", limits()))
}

/// Redis throttle, with a Unicode twin: `\u{212A}aren` (KELVIN SIGN, which looks like `K`)
/// lower-cases to `karen`, so it shared `karen`'s counter and its owner's logins cleared it.
#[tokio::test]
async fn redis_throttle_a_unicode_case_twin_account_cannot_reset_the_victims_count() {
    let server = RedisServer::start();
    let proxy = start("karen", "\u{212A}aren", redis_throttle(&server)).await;
    own_account_cannot_reset_the_victims_count(&proxy, "karen", "\u{212A}aren").await;
    // Every throttle key expires (none is left behind without a TTL), each counter's window
    // with its counter, and the ids of the releases (one per login not counted) after a window.
    let all = server.cli(&["KEYS", "qa:throttle:*"]);
    let all: Vec<&str> = all.lines().filter(|k| !k.is_empty()).collect();
    let pttl = |key: &str| -> i64 { server.cli(&["PTTL", key]).parse().unwrap() };
    for key in &all {
        assert!((1..=900_000).contains(&pttl(key)), "{key}: {}", pttl(key));
    }
    let keys: Vec<&str> = all
        .iter()
        .copied()
        .filter(|k| !k.starts_with("qa:throttle:release:"))
        .collect();
    assert_eq!(keys.len(), 4, "two counters and their windows: {keys:?}");
    for kind in ["ip:", "user:"] {
        let counter = format!("qa:throttle:{kind}");
        let window = format!("qa:throttle:window:{kind}");
        let counter = keys.iter().find(|k| k.starts_with(&counter)).unwrap();
        let window = keys.iter().find(|k| k.starts_with(&window)).unwrap();
        assert!(
            (pttl(counter) - pttl(window)).abs() < 1000,
            "{counter} / {window}"
        );
    }
}

/// Guard: with the Redis throttle, a user's own success still clears their failures.
#[tokio::test]
async fn redis_throttle_own_success_clears_the_count() {
    let server = RedisServer::start();
    let proxy = start("karen", "\u{212A}aren", redis_throttle(&server)).await;
    own_success_still_clears(&proxy, "karen").await;
}

/// Five failed attempts spelled with white space around the name (as typed in a form, or
/// sent by a guesser) or in compatibility characters (fullwidth letters) against one name: a
/// `verify_url` API that trims or NFKC-normalises names (or compares them padded, as SQL
/// `PAD SPACE` collations do) takes them all for the same account, so they must add up to one
/// per-name limit; counted as typed, each spelling got the whole limit again.
async fn padded_spellings_share_one_count(throttle: &dyn LoginThrottle) {
    let client = "10.9.0.1".parse().unwrap();
    let spellings = [
        "alice",
        " alice ",
        "alice\t",
        "\u{3000}ALICE\u{a0}",
        "\u{FF41}lice",
    ];
    for name in spellings {
        assert_eq!(
            throttle.admit(client, name, T0).await.unwrap(),
            None,
            "{name:?} admitted"
        );
    }
    for name in [
        "alice  ",
        "alice",
        "\u{FF21}\u{FF2C}\u{FF29}\u{FF23}\u{FF25}",
    ] {
        assert!(
            throttle.admit(client, name, T0).await.unwrap().is_some(),
            "{name:?} after 5 failures of padded spellings"
        );
    }
    // Another name is not concerned.
    assert_eq!(throttle.admit(client, "alicea", T0).await.unwrap(), None);
}

#[tokio::test]
async fn memory_throttle_counts_padded_spellings_as_one_name() {
    padded_spellings_share_one_count(&MemoryLoginThrottle::new(limits(), 10_000)).await;
}

#[tokio::test]
async fn redis_throttle_counts_padded_spellings_as_one_name() {
    let server = RedisServer::start();
    padded_spellings_share_one_count(&*redis_throttle(&server)).await;
}

/// The login body is one JSON object with a string `username` and `password`, nothing else
/// taking its place: each malformed body below answers 400 `bad_request` before the throttle
/// (five of them for one name do not throttle it) and sets no cookie. Failed on the old code
/// for the array `["alice","alice-password"]`, which serde's derived struct accepts (fields in
/// order) and which logged alice in: a body a filter looking for the `username` key does not
/// see. The others are guards (duplicate keys, where two readers could pick different names;
/// non-UTF-8; a lone surrogate escape; a byte-order mark; trailing data; wrong types).
#[tokio::test]
async fn login_body_must_be_one_object_of_two_strings() {
    let h = support::Harness::start().await;
    let bodies: [&[u8]; 9] = [
        br#"["alice","alice-password"]"#,
        br#" [ "alice" , "alice-password" ] "#,
        br#"{"username":"bob","username":"alice","password":"alice-password"}"#,
        br#"{"username":"alice","password":"x","password":"alice-password"}"#,
        b"{\"username\":\"al\xffice\",\"password\":\"alice-password\"}",
        br#"{"username":"alice\ud800","password":"alice-password"}"#,
        b"\xef\xbb\xbf{\"username\":\"alice\",\"password\":\"alice-password\"}",
        br#"{"username":"alice","password":"alice-password"} {}"#,
        br#"{"username":["alice"],"password":"alice-password"}"#,
    ];
    for body in bodies {
        let r = support::send(
            h.addr,
            http::Method::POST,
            "/auth/login",
            &[
                ("content-type", "application/json"),
                ("origin", support::ORIGIN),
            ],
            bytes::Bytes::copy_from_slice(body),
        )
        .await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{shown}: {}", r.text());
        assert_eq!(r.error_code(), "bad_request", "{shown}");
        assert!(r.set_cookie().is_none(), "{shown}");
    }
    // None of them was counted against alice (5 per name): she still logs in, and an object
    // with white space around it is still a login.
    let r = support::send(
        h.addr,
        http::Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", support::ORIGIN),
        ],
        "\r\n\t {\"password\":\"alice-password\",\"username\":\"alice\"} \n",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// An attempt admitted in one window whose check ends after that window (a slow `verify_url`
/// answer that errors, or a success queued behind `max_concurrent_password_checks`) is
/// released: its count must not come off the *next* window's failures, which it never was in
/// (`LoginThrottle::release`: "a count whose window has since ended is left alone"). The Redis
/// throttle took one back from whatever counter had the name, so failures of the new window
/// were forgotten (here: the name at its limit was let through again); the memory throttle
/// (a guard here) compares the window's start with the admission.
async fn a_late_release_leaves_the_next_window_alone(throttle: &dyn LoginThrottle) {
    let client = "10.7.0.1".parse().unwrap();
    // Attempt A, admitted in the first window (1 s long) and still being checked.
    assert_eq!(throttle.admit(client, "zed", T0).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The next window: two failures, the name's limit.
    for _ in 0..2 {
        assert_eq!(throttle.admit(client, "zed", T0 + 2).await.unwrap(), None);
    }
    assert!(throttle
        .check(client, "zed", T0 + 2)
        .await
        .unwrap()
        .is_some());
    // A turns out not to be a failure: released, as admitted at T0.
    throttle.release(client, "zed", T0).await.unwrap();
    assert!(
        throttle
            .check(client, "zed", T0 + 2)
            .await
            .unwrap()
            .is_some(),
        "a release from the ended window took a failure off the new one"
    );
    // A release of an attempt of the new window still takes its count back.
    throttle.release(client, "zed", T0 + 2).await.unwrap();
    assert_eq!(throttle.check(client, "zed", T0 + 2).await.unwrap(), None);
}

fn one_second_window() -> ThrottleConfig {
    ThrottleConfig {
        max_failures_per_user: 2,
        window: Duration::from_secs(1),
        ..limits()
    }
}

#[tokio::test]
async fn memory_throttle_a_late_release_leaves_the_next_window_alone() {
    let throttle = MemoryLoginThrottle::new(one_second_window(), 100);
    a_late_release_leaves_the_next_window_alone(&throttle).await;
}

#[tokio::test]
async fn redis_throttle_a_late_release_leaves_the_next_window_alone() {
    let server = RedisServer::start();
    let connection = RedisConnection::open(&server.url()).unwrap();
    let throttle = RedisLoginThrottle::new(connection, "qa:", one_second_window());
    a_late_release_leaves_the_next_window_alone(&throttle).await;
}

/// Defect: the password check capped user names at 1024 bytes (the password's bound) whatever
/// `auth.max_username_bytes` allowed, so with that key above 1024 a user whose name was longer
/// could never log in: the right password got 401, and counted as a failure against the name
/// and the address. Now the name's only bound is `auth.max_username_bytes`, checked before.
#[tokio::test]
async fn a_user_name_longer_than_1024_bytes_logs_in_when_max_username_bytes_allows_it() {
    let long = "u".repeat(1500);
    let users_file = format!(
        "[[users]]\nname = \"{long}\"\npassword = \"{}\"\n",
        cheap_hash(VICTIM_PASSWORD)
    );
    let users = UserDb::parse_with_name_limit(
        &users_file,
        std::path::Path::new("users.toml"),
        &HashLimits::default(),
        2048,
    )
    .unwrap();
    let throttle = Arc::new(MemoryLoginThrottle::new(limits(), 10_000));
    let proxy = start_with(users, throttle, |s| s.max_username_bytes = 2048).await;
    let addr = proxy.local_addr();
    let ok = login_at(addr, &long, VICTIM_PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let wrong = login_at(addr, &long, "wrong").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    // One byte over the configured bound is still refused before any check.
    let over = login_at(addr, &"u".repeat(2049), VICTIM_PASSWORD).await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
}

/// Defect: after a backward clock step an attempt was counted in the window dated before the
/// step, and its release (a right password) skipped that window as "later" than the attempt:
/// every correct login after the step counted as a failure against the address and the name,
/// until the client was throttled for logging in. Now the window's date goes back with the
/// attempt and the release takes the count back.
async fn a_release_after_a_backward_step_takes_its_count_back(throttle: &dyn LoginThrottle) {
    let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
    assert_eq!(throttle.admit(ip, "alice", T0).await.unwrap(), None);
    let stepped = T0 - 60;
    for login in 0..2 * PER_USER {
        let admitted = throttle.admit(ip, "alice", stepped).await.unwrap();
        assert_eq!(admitted, None, "correct login {login} after the step");
        throttle.release(ip, "alice", stepped).await.unwrap();
    }
    // One failure kept before the step, four after: the fifth, and only it, is the limit.
    for failure in 1..PER_USER {
        let admitted = throttle.admit(ip, "alice", stepped).await.unwrap();
        assert_eq!(admitted, None, "failure {failure}");
    }
    assert!(throttle
        .admit(ip, "alice", stepped)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn memory_throttle_a_release_after_a_backward_step_takes_its_count_back() {
    let throttle = MemoryLoginThrottle::new(limits(), 100);
    a_release_after_a_backward_step_takes_its_count_back(&throttle).await;
}

#[tokio::test]
async fn redis_throttle_a_release_after_a_backward_step_takes_its_count_back() {
    let server = RedisServer::start();
    a_release_after_a_backward_step_takes_its_count_back(&*redis_throttle(&server)).await;
}

//! Review of the login throttle's windows (`src/proxy/throttle.rs`, `throttle_redis.rs`):
//! defects found by reading the code, each shown against the public API (the Redis throttle
//! with a real `redis-server`).
#![cfg(feature = "proxy")]

mod support_redis;

use std::net::IpAddr;
use std::time::Duration;

use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::proxy::throttle_redis::RedisLoginThrottle;
use countersign::replay::RedisConnection;
use support_redis::{patient_options, RedisServer};

const T: u64 = 1_000_000;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 9, 0, last])
}

/// A memory throttle that tracks 4 keys (two attempts' address and name) with a 60 s window.
fn small_table() -> MemoryLoginThrottle {
    let limits = ThrottleConfig {
        max_failures_per_ip: 100,
        max_failures_per_user: 100,
        window: Duration::from_secs(60),
        ..ThrottleConfig::default()
    };
    MemoryLoginThrottle::new(limits, 4)
}

/// Ended windows are dropped when the table is full, at most once a second. That second was
/// compared with `now > last_prune`: after the clock stepped back (NTP) past a prune made
/// while it was ahead, no prune ran until the clock caught up, and a table full of ended
/// windows refused every new address and name (503 `session_store_unavailable` at login) for
/// as long as the step, although the configured table had room. The session store's reclaim
/// had this fix already.
#[tokio::test]
async fn a_full_table_is_pruned_after_the_clock_steps_back() {
    let throttle = small_table();
    // Two failures fill the table (an address and a name each).
    for (last, name) in [(2, "a"), (3, "b")] {
        assert_eq!(throttle.admit(ip(last), name, T).await.unwrap(), None);
    }
    // An hour ahead: the table is full of ended windows, pruned, the attempt counted.
    assert_eq!(throttle.admit(ip(4), "c", T + 3600).await.unwrap(), None);
    // The clock steps back; one more failure fills the table again.
    assert_eq!(throttle.admit(ip(5), "d", T + 100).await.unwrap(), None);
    // Its window (T+100..T+160) has ended at T+200: pruning it makes room.
    assert_eq!(
        throttle.admit(ip(6), "e", T + 200).await.ok(),
        Some(None),
        "a new address and name were refused although the table holds ended windows"
    );
    // Live windows are never dropped to make room: c's (until T+3660) and e's fill it.
    assert!(throttle.admit(ip(7), "f", T + 201).await.is_err());
}

/// Every attempt is counted when admitted, before its password is checked, and taken back
/// when it turns out not to be a failure. The window stayed, dated by that attempt: a
/// successful login (or a cancelled check) from an address started the address's window, and
/// failures near its end were limited only until it ended ("Retry-After: 10"), where the
/// configuration says the window starts at the first failure. A window with no failure left
/// is now dropped, so the next failure starts a full one.
#[tokio::test]
async fn a_window_left_without_failures_does_not_date_the_next_one() {
    let limits = ThrottleConfig {
        max_failures_per_ip: 3,
        max_failures_per_user: 100,
        window: Duration::from_secs(900),
        ..ThrottleConfig::default()
    };
    let throttle = MemoryLoginThrottle::new(limits, 1000);
    let client = ip(1);
    // A successful login at T: admitted, then taken back.
    assert_eq!(throttle.admit(client, "own", T).await.unwrap(), None);
    throttle.release(client, "own", T).await.unwrap();
    // Three failures at T+890, then the limit: the window is the failures', 900 s long.
    for _ in 0..3 {
        assert_eq!(
            throttle.admit(client, "victim", T + 890).await.unwrap(),
            None
        );
    }
    let wait = throttle.admit(client, "victim", T + 890).await.unwrap();
    assert_eq!(
        wait,
        Some(900),
        "the window started at the success, not the first failure"
    );
    // A release that leaves failures in the window keeps it (and its end).
    let throttle = MemoryLoginThrottle::new(limits, 1000);
    for _ in 0..3 {
        assert_eq!(throttle.admit(client, "victim", T).await.unwrap(), None);
    }
    throttle.release(client, "victim", T).await.unwrap();
    assert_eq!(
        throttle.admit(client, "victim", T + 10).await.unwrap(),
        None
    );
    assert_eq!(
        throttle.admit(client, "victim", T + 10).await.unwrap(),
        Some(890)
    );

    // The same on Redis, whose windows run on its own clock: a success, then three failures
    // 3 s later must get a full window (before: the success's, 3 s shorter).
    let server = RedisServer::start();
    let connection = RedisConnection::with_options(&server.url(), patient_options()).unwrap();
    let throttle = RedisLoginThrottle::new(connection, "window-review:", limits);
    assert_eq!(throttle.admit(client, "own", T).await.unwrap(), None);
    throttle.release(client, "own", T).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..3 {
        assert_eq!(throttle.admit(client, "victim", T + 3).await.unwrap(), None);
    }
    let wait = throttle.admit(client, "victim", T + 3).await.unwrap();
    // Whole seconds left, rounded up: at least 898 unless 3 s passed since the first failure
    // (room for a stalled machine); dated by the success, at least 3 s earlier: at most 897.
    assert!(
        wait.is_some_and(|wait| wait >= 898),
        "Retry-After {wait:?}: the window started at the success, not the first failure"
    );
}

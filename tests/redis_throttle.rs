//! `RedisLoginThrottle` against a real `redis-server`: counters shared by two throttle
//! instances (two proxies), per-address and per-name limits, address grouping, the fixed
//! window, and failing closed.
#![cfg(feature = "proxy")]

mod support_redis;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::throttle::LoginThrottle;
use countersign::proxy::throttle_redis::RedisLoginThrottle;
use countersign::replay::RedisConnection;
use support_redis::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const NOW: u64 = 1_000_000;

fn config(per_ip: u32, per_user: u32, window: Duration) -> ThrottleConfig {
    ThrottleConfig {
        max_failures_per_ip: per_ip,
        max_failures_per_user: per_user,
        window,
        ..ThrottleConfig::default()
    }
}

/// A throttle on a new connection whose deadlines no stall of a loaded machine reaches
/// (`support_redis::patient_options`): its calls fail only when Redis is gone.
fn throttle(server: &RedisServer, config: ThrottleConfig) -> RedisLoginThrottle {
    let connection =
        RedisConnection::with_options(&server.url(), support_redis::patient_options()).unwrap();
    RedisLoginThrottle::new(connection, "cs:", config)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn failures_on_two_proxies_count_toward_one_user_limit() {
    let server = RedisServer::start();
    let window = Duration::from_secs(900);
    let proxy_a = throttle(&server, config(100, 5, window));
    let proxy_b = throttle(&server, config(100, 5, window));
    for attempt in 0..5u8 {
        let proxy = if attempt % 2 == 0 { &proxy_a } else { &proxy_b };
        assert_eq!(
            proxy
                .check(ip(&format!("10.0.0.{attempt}")), "alice", NOW)
                .await
                .unwrap(),
            None,
            "attempt {attempt} is allowed"
        );
        proxy
            .record_failure(ip(&format!("10.0.0.{attempt}")), "alice", NOW)
            .await
            .unwrap();
    }
    for proxy in [&proxy_a, &proxy_b] {
        let wait = proxy
            .check(ip("10.9.9.9"), "alice", NOW)
            .await
            .unwrap()
            .expect("alice is throttled on both proxies");
        assert!((899..=900).contains(&wait), "retry after {wait}");
        // The name is compared case-insensitively.
        assert!(proxy
            .check(ip("10.9.9.9"), "ALICE", NOW)
            .await
            .unwrap()
            .is_some());
        // Someone else from another address is not affected.
        assert_eq!(proxy.check(ip("10.9.9.9"), "bob", NOW).await.unwrap(), None);
    }
}

#[tokio::test]
async fn an_address_is_throttled_across_user_names() {
    let server = RedisServer::start();
    let throttle = throttle(&server, config(3, 100, Duration::from_secs(900)));
    for n in 0..3 {
        throttle
            .record_failure(ip("192.0.2.7"), &format!("user{n}"), NOW)
            .await
            .unwrap();
    }
    assert!(throttle
        .check(ip("192.0.2.7"), "fresh-name", NOW)
        .await
        .unwrap()
        .is_some());
    // The same address written as IPv4-mapped IPv6 is the same client.
    assert!(throttle
        .check(ip("::ffff:192.0.2.7"), "fresh-name", NOW)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        throttle
            .check(ip("192.0.2.8"), "fresh-name", NOW)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn ipv6_addresses_are_grouped_by_64_bit_prefix() {
    let server = RedisServer::start();
    let throttle = throttle(&server, config(2, 100, Duration::from_secs(900)));
    throttle
        .record_failure(ip("2001:db8:1:2::1"), "a", NOW)
        .await
        .unwrap();
    throttle
        .record_failure(ip("2001:db8:1:2:ffff::9"), "b", NOW)
        .await
        .unwrap();
    assert!(throttle
        .check(ip("2001:db8:1:2:abcd::1"), "c", NOW)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        throttle
            .check(ip("2001:db8:1:3::1"), "c", NOW)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        server.cli(&["GET", "cs:throttle:ip:2001:db8:1:2::/64"]),
        "2"
    );
}

#[tokio::test]
async fn success_clears_the_user_counter_but_not_the_address_counter() {
    let server = RedisServer::start();
    let throttle = throttle(&server, config(3, 2, Duration::from_secs(900)));
    let client = ip("198.51.100.1");
    throttle.record_failure(client, "alice", NOW).await.unwrap();
    throttle.record_failure(client, "alice", NOW).await.unwrap();
    assert!(throttle
        .check(client, "alice", NOW)
        .await
        .unwrap()
        .is_some());
    throttle.record_success(client, "alice").await.unwrap();
    assert_eq!(throttle.check(client, "alice", NOW).await.unwrap(), None);
    // The address still has two failures; one more reaches its limit of three.
    throttle
        .record_failure(client, "mallory", NOW)
        .await
        .unwrap();
    assert!(throttle
        .check(client, "someone", NOW)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn the_window_is_fixed_from_the_first_failure() {
    let server = RedisServer::start();
    // A 6 s window and a second failure half-way: the check below must still fall within the
    // first window, which leaves 3 s of slack for a busy machine.
    let throttle = throttle(&server, config(100, 2, Duration::from_secs(6)));
    let client = ip("203.0.113.5");
    throttle.record_failure(client, "carol", NOW).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // A later failure does not extend the window (EXPIRE NX).
    throttle.record_failure(client, "carol", NOW).await.unwrap();
    let wait = throttle
        .check(client, "carol", NOW)
        .await
        .unwrap()
        .expect("throttled");
    // An extended window would say 6 s.
    assert!(
        wait <= 3,
        "retry after {wait} s; at most 3 s of the window is left"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(throttle.check(client, "carol", NOW).await.unwrap(), None);
    // The window ended: counting starts over.
    throttle.record_failure(client, "carol", NOW).await.unwrap();
    assert_eq!(throttle.check(client, "carol", NOW).await.unwrap(), None);
}

#[tokio::test]
async fn redis_down_refuses_instead_of_letting_logins_through() {
    let mut server = RedisServer::start();
    let throttle = throttle(&server, config(20, 5, Duration::from_secs(900)));
    let client = ip("10.1.1.1");
    throttle.record_failure(client, "dave", NOW).await.unwrap();
    server.stop();
    assert!(throttle.check(client, "dave", NOW).await.is_err());
    assert!(throttle.record_failure(client, "dave", NOW).await.is_err());
    assert!(throttle.record_success(client, "dave").await.is_err());
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while throttle.check(client, "dave", NOW).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `admit` checks and counts in one step on the server: attempts of two proxies in flight at
/// once are admitted exactly up to the limit, however they interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_on_two_proxies_stop_exactly_at_the_limit() {
    let server = RedisServer::start();
    let config = config(1000, 5, Duration::from_secs(900));
    let proxies = [
        std::sync::Arc::new(throttle(&server, config)),
        std::sync::Arc::new(throttle(&server, config)),
    ];
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let proxy = proxies[i % 2].clone();
            tokio::spawn(async move {
                proxy
                    .admit(ip(&format!("10.2.0.{i}")), "erin", NOW)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for attempt in attempts {
        if attempt.await.unwrap().is_none() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "admitted past the per-user limit of 5");
    // A refused admission counted nothing: the user's counter is at the limit, not beyond.
    assert_eq!(server.cli(&["GET", &only_user_key(&server)]), "5");
}

/// An admitted attempt that was not a failure is taken back from both counters (the window's
/// TTL kept); a counter whose window ended is left alone.
#[tokio::test]
async fn release_takes_back_one_admitted_attempt() {
    let server = RedisServer::start();
    let throttle = throttle(&server, config(2, 2, Duration::from_secs(900)));
    let client = ip("10.3.0.1");
    assert_eq!(throttle.admit(client, "frank", NOW).await.unwrap(), None);
    assert_eq!(throttle.admit(client, "frank", NOW).await.unwrap(), None);
    // Both counters at 2: the next is refused, and counts nothing.
    assert!(throttle
        .admit(client, "frank", NOW)
        .await
        .unwrap()
        .is_some());
    throttle.release(client, "frank", NOW).await.unwrap();
    // One back on each: one more is admitted, then the limit holds again.
    assert_eq!(throttle.admit(client, "frank", NOW).await.unwrap(), None);
    assert!(throttle
        .admit(client, "frank", NOW)
        .await
        .unwrap()
        .is_some());
    let ttl: i64 = server
        .cli(&["TTL", "cs:throttle:ip:10.3.0.1"])
        .parse()
        .unwrap();
    assert!((1..=900).contains(&ttl), "TTL {ttl}");
    // Gone counters are not brought back (no key without a TTL).
    server.cli(&["DEL", "cs:throttle:ip:10.3.0.1"]);
    throttle.release(client, "frank", NOW).await.unwrap();
    assert_eq!(server.cli(&["EXISTS", "cs:throttle:ip:10.3.0.1"]), "0");
}

/// The one user counter's key (the prefix and the hex SHA-256 of the lower-cased name), found
/// by listing: the test does not restate the hashing.
fn only_user_key(server: &RedisServer) -> String {
    let keys = server.cli(&["KEYS", "cs:throttle:user:*"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].to_owned()
}

/// A TCP relay to `server` that, once, passes on a call containing `marker` but drops its reply
/// with the connection: the call ran, and the client never hears of it (finds its connection
/// dead). The flag is cleared when that happened.
async fn reply_dropping_relay(
    server: SocketAddr,
    marker: &'static [u8],
) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let armed_relay = Arc::clone(&armed);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = TcpStream::connect(server).await else {
                continue;
            };
            let armed = Arc::clone(&armed_relay);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let swallow = Arc::new(AtomicBool::new(false));
                let swallow_up = Arc::clone(&swallow);
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if buf[..n].windows(marker.len()).any(|w| w == marker)
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            // Set before the call reaches the server, so before its reply.
                            swallow_up.store(true, Ordering::SeqCst);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if swallow.load(Ordering::SeqCst) {
                        break;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Both directions closed: the client's connection is dead.
                up.abort();
            });
        }
    });
    (addr, armed)
}

#[tokio::test]
async fn a_release_repeated_after_its_reply_was_lost_takes_back_one_count() {
    let server = RedisServer::start();
    // The release script's text, in no other call.
    let (relay, armed) = reply_dropping_relay(server.addr(), b"local admitted = tonumber(").await;
    let connection = RedisConnection::with_options(
        &format!("redis://{relay}"),
        support_redis::patient_options(),
    )
    .unwrap();
    let throttle =
        RedisLoginThrottle::new(connection, "cs:", config(2, 2, Duration::from_secs(900)));
    let client = ip("10.4.0.1");
    assert_eq!(throttle.admit(client, "grace", NOW).await.unwrap(), None);
    assert_eq!(throttle.admit(client, "grace", NOW).await.unwrap(), None);
    // The release runs, its reply is lost with the connection, and the connection layer runs
    // it again on a new one (as after any dead connection): one count back all the same.
    throttle.release(client, "grace", NOW).await.unwrap();
    assert!(
        !armed.load(Ordering::SeqCst),
        "the release's reply was dropped"
    );
    assert_eq!(server.cli(&["GET", "cs:throttle:ip:10.4.0.1"]), "1");
    let user_key = only_user_key(&server);
    assert_eq!(server.cli(&["GET", &user_key]), "1");
    // So one more attempt is admitted, and the one after it is refused.
    assert_eq!(throttle.admit(client, "grace", NOW).await.unwrap(), None);
    assert!(throttle
        .admit(client, "grace", NOW)
        .await
        .unwrap()
        .is_some());
    // The release's id expires with the window.
    let ids = server.cli(&["KEYS", "cs:throttle:release:*"]);
    let ids: Vec<&str> = ids.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let ttl: i64 = server.cli(&["TTL", ids[0]]).parse().unwrap();
    assert!((1..=900).contains(&ttl), "TTL {ttl}");
}

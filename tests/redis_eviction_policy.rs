//! A Redis that may evict countersign's keys is refused: every connection (the first, each
//! reconnection, a new primary found through Sentinel) reads the server's `maxmemory_policy`
//! with `INFO memory`, and anything but `noeviction` fails the connection (fail closed, like a
//! Redis that is down): the replay cache records nothing and answers an error naming the
//! server, the policy and the fix; the proxy answers 503 `session_store_unavailable` and
//! `/readyz` is not ready; `verify --replay-redis` reports it. The readiness check reads the
//! policy too, so one changed at runtime (`CONFIG SET`) is caught at the next readiness check
//! (or reconnection), and a fixed one is accepted at the next call. A user whose ACL refuses
//! `INFO` (or a server with `INFO` renamed away) is used, with one warning per connection.
//! Run: `cargo test --all-features --test redis_eviction_policy`.
#![cfg(feature = "redis")]

#[cfg(feature = "proxy")]
mod support;
#[cfg(feature = "proxy")]
mod support_cli;
#[cfg(feature = "proxy")]
mod support_logs;
mod support_redis;
#[cfg(feature = "proxy")]
use support_logs as logs;

use std::time::Duration;

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome, SentinelOptions,
};
use support_redis::{
    assert_fresh_then_replayed, redis_test_options, RedisServer, SentinelServer, SENTINEL_MASTER,
};

const NOW: u64 = 1_000_000;
const PREFIX: &str = "evict:";

fn options() -> RedisOptions {
    redis_test_options(Duration::from_secs(2))
}

fn cache_for(url: &str) -> RedisReplayCache {
    RedisReplayCache::new(
        RedisConnection::with_options(url, options()).unwrap(),
        PREFIX,
    )
}

/// The error of a refused check: it names the server, the policy and the fix.
fn assert_names_policy(detail: &str, server: &RedisServer, policy: &str) {
    let address = format!("127.0.0.1:{}", server.addr().port());
    assert!(detail.contains(&address), "names the server: {detail}");
    assert!(
        detail.contains(&format!("maxmemory-policy {policy}")),
        "names the policy: {detail}"
    );
    assert!(
        detail.contains("maxmemory-policy noeviction"),
        "names the fix: {detail}"
    );
}

/// `allkeys-lru` and `volatile-lru` (ElastiCache's default: every countersign key has a time
/// to live, so it evicts them too): no nonce is recorded, every check is an error naming the
/// policy, readiness is false; `noeviction` works.
#[tokio::test]
async fn an_evicting_policy_is_refused_and_noeviction_works() {
    for policy in ["allkeys-lru", "volatile-lru"] {
        let server = RedisServer::start_with(&["--maxmemory-policy", policy]);
        let cache = cache_for(&server.url());
        for attempt in 0..2 {
            let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
                panic!("{policy}: attempt {attempt} was accepted");
            };
            assert_names_policy(error.detail(), &server, policy);
        }
        assert!(!cache.ready().await, "{policy}: ready");
        assert!(!cache.connection().last_call_succeeded());
        assert_eq!(server.cli(&["DBSIZE"]), "0", "{policy}: a key was written");
    }
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let cache = cache_for(&server.url());
    assert_fresh_then_replayed(&cache, "n1", NOW + 60, NOW).await;
    assert!(cache.ready().await);
}

/// Fixed at runtime: a refused connection is not kept, so the next call connects anew, checks
/// again and works.
#[tokio::test]
async fn a_policy_fixed_at_runtime_is_accepted_at_the_next_call() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let cache = cache_for(&server.url());
    assert!(cache.check_and_record("n1", NOW + 60, NOW).await.is_err());
    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(cache.ready().await);
}

/// Changed at runtime to an evicting policy: the live connection is not re-checked per call
/// (that would cost a round trip per request), but the readiness check reads the policy, drops
/// the connection and reports not-ready, and from then on calls are refused (the reconnection
/// checks again) until the policy is fixed.
#[tokio::test]
async fn a_policy_broken_at_runtime_is_caught_by_the_readiness_check() {
    let server = RedisServer::start();
    let cache = cache_for(&server.url());
    assert_eq!(
        cache.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(cache.ready().await);
    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]),
        "OK"
    );
    // Not covered between readiness checks: the open connection is still used.
    assert_eq!(
        cache.check_and_record("between", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(!cache.ready().await, "ready with volatile-lru");
    let Err(error) = cache.check_and_record("after", NOW + 60, NOW).await else {
        panic!("accepted after the readiness check saw volatile-lru");
    };
    assert_names_policy(error.detail(), &server, "volatile-lru");
    assert_eq!(server.cli(&["EXISTS", "evict:after"]), "0");

    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert!(cache.ready().await, "ready again once fixed");
    assert_eq!(
        cache.check_and_record("after", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

/// A reconnection (here: the server closed every client connection) checks again.
#[tokio::test]
async fn a_reconnection_checks_again() {
    let server = RedisServer::start();
    let cache = cache_for(&server.url());
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        server.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]),
        "OK"
    );
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let Err(error) = cache.check_and_record("n2", NOW + 60, NOW).await else {
        panic!("accepted on a reconnection to an allkeys-random server");
    };
    assert_names_policy(error.detail(), &server, "allkeys-random");
    assert_eq!(server.cli(&["EXISTS", "evict:n2"]), "0");
}

/// The primary found through Sentinel is checked the same way, and named in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_found_through_sentinel_is_checked() {
    let primary = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lfu"]);
    let sentinel = SentinelServer::start(primary.addr());
    let connection = RedisConnection::sentinel(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        &SentinelOptions::default(),
        options(),
    )
    .unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
        panic!("accepted an allkeys-lfu primary through sentinel");
    };
    assert_names_policy(error.detail(), &primary, "allkeys-lfu");
    assert!(!cache.ready().await);
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
    assert_eq!(
        primary.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
}

/// An ACL user without `INFO` (least privilege): the policy cannot be known, so the connection
/// is used (even on an `allkeys-lru` server: it cannot be told apart), with one warning per
/// connection naming the risk and the fix; the readiness checks do not send `INFO` again (each
/// refusal would be an entry in the server's ACL LOG).
#[cfg(feature = "proxy")]
#[tokio::test]
async fn a_user_without_info_works_with_one_warning_per_connection() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    assert_eq!(
        server.cli(&[
            "ACL",
            "SETUSER",
            "countersign",
            "on",
            ">pw",
            "~evict:*",
            "+set",
            "+ping",
            "+hello",
        ]),
        "OK"
    );
    let port = server.addr().port();
    let (captured, _guard) = logs::capture();
    let cache = cache_for(&format!("redis://countersign:pw@127.0.0.1:{port}/0"));
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    for _ in 0..3 {
        assert!(cache.ready().await);
    }
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    let text = captured.text();
    assert_eq!(
        text.matches("eviction policy unknown").count(),
        1,
        "one warning for one connection: {text}"
    );
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("NOPERM"), "names the refusal: {text}");
    assert!(text.contains("+info"), "names the fix: {text}");
    assert!(!text.contains("pw@"), "the password was logged: {text}");
    let acl_log = server.cli(&["ACL", "LOG"]);
    assert_eq!(
        acl_log.matches("\ninfo\n").count(),
        1,
        "INFO sent once, not per readiness check: {acl_log}"
    );

    // A new connection warns again.
    server.cli(&["CLIENT", "KILL", "USER", "countersign"]);
    assert_eq!(
        cache.check_and_record("n2", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        captured.text().matches("eviction policy unknown").count(),
        2
    );
}

/// `INFO` renamed away (`rename-command INFO ""`): unknown as well, used with a warning.
#[cfg(feature = "proxy")]
#[tokio::test]
async fn a_server_without_info_works_with_a_warning() {
    let server = RedisServer::start_with(&["--rename-command", "INFO", ""]);
    let (captured, _guard) = logs::capture();
    let cache = cache_for(&server.url());
    assert_eq!(
        cache.check_and_record("n1", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(cache.ready().await);
    let text = captured.text();
    assert_eq!(text.matches("eviction policy unknown").count(), 1, "{text}");
    assert!(text.contains("unknown command"), "{text}");
}

/// The refusal is logged once per outage (as every Redis failure is), not once per request,
/// with the policy and the fix.
#[cfg(feature = "proxy")]
#[tokio::test]
async fn the_refusal_is_logged_once_with_the_fix() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let (captured, _guard) = logs::capture();
    let cache = cache_for(&server.url());
    for _ in 0..3 {
        assert!(cache.check_and_record("n1", NOW + 60, NOW).await.is_err());
    }
    assert!(!cache.ready().await);
    let text = captured.text();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].contains("maxmemory-policy allkeys-lru"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("maxmemory-policy noeviction"),
        "{}",
        errors[0]
    );
}

/// The proxy with a Redis session store: a logged-in browser gets 503
/// `session_store_unavailable` and `/readyz` is not ready once the policy is found to evict
/// (by the readiness check, or by a reconnection); both come back once it is fixed. Logging
/// in to a proxy whose Redis evicts from the start is 503 too.
#[cfg(feature = "proxy")]
mod proxy {
    use std::sync::Arc;

    use countersign::proxy::session::SessionTimeouts;
    use countersign::proxy::session_redis::RedisSessionStore;
    use http::{Method, StatusCode};

    use super::support::{self, get, Harness, HarnessOptions, ALICE_PASSWORD};
    use super::support_redis::RedisServer;
    use super::{options, RedisConnection};

    async fn proxy_on(server: &RedisServer) -> Harness {
        let connection = RedisConnection::with_options(&server.url(), options()).unwrap();
        let store = RedisSessionStore::new(
            connection,
            "evict:",
            SessionTimeouts {
                idle: support::IDLE,
                absolute: support::ABSOLUTE,
            },
            1000,
        );
        Harness::start_with(HarnessOptions {
            sessions: Some(Arc::new(store)),
            ..HarnessOptions::default()
        })
        .await
    }

    async fn readyz(h: &Harness) -> StatusCode {
        support::send(h.admin, Method::GET, "/readyz", &[], bytes::Bytes::new())
            .await
            .status
    }

    /// `/readyz` caches its answer for a moment (`admin.readiness_cache`, 2 s): poll until `want`.
    async fn wait_readyz(h: &Harness, want: StatusCode) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = readyz(h).await;
            if status == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz stayed {status}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_logged_in_request_is_503_and_not_ready_then_recovers() {
        let server = RedisServer::start();
        let h = proxy_on(&server).await;
        let alice = h.login("alice", ALICE_PASSWORD).await;
        assert_eq!(
            get(h.addr, "/auth/session", &alice).await.status,
            StatusCode::OK
        );
        wait_readyz(&h, StatusCode::OK).await;

        for (policy, how) in [("volatile-lru", "readiness"), ("allkeys-lru", "reconnect")] {
            assert_eq!(
                server.cli(&["CONFIG", "SET", "maxmemory-policy", policy]),
                "OK"
            );
            match how {
                "readiness" => wait_readyz(&h, StatusCode::SERVICE_UNAVAILABLE).await,
                _ => {
                    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
                }
            }
            let r = get(h.addr, "/auth/session", &alice).await;
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{policy}: {}",
                r.text()
            );
            assert_eq!(r.error_code(), "session_store_unavailable", "{policy}");
            let r = h.login_raw("alice", ALICE_PASSWORD).await;
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{policy}: {}",
                r.text()
            );
            wait_readyz(&h, StatusCode::SERVICE_UNAVAILABLE).await;

            assert_eq!(
                server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
                "OK"
            );
            wait_readyz(&h, StatusCode::OK).await;
            let r = get(h.addr, "/auth/session", &alice).await;
            assert_eq!(r.status, StatusCode::OK, "{policy}: {}", r.text());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logging_in_on_an_evicting_redis_is_503() {
        let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
        let h = proxy_on(&server).await;
        let r = h.login_raw("alice", ALICE_PASSWORD).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.error_code(), "session_store_unavailable");
        assert!(r.set_cookie().is_none());
        assert_eq!(readyz(&h).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(server.cli(&["DBSIZE"]), "0");
    }
}

/// `countersign verify --replay-redis` against an evicting Redis: `replay_cache_unavailable`
/// (exit 1), stderr naming the policy and the fix; nothing recorded.
#[cfg(feature = "proxy")]
#[test]
fn verify_replay_redis_reports_the_policy() {
    use support_cli::run_countersign;

    const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const CREATED: u64 = 1_700_000_000;
    const REQUEST: &[u8] = b"GET /orders HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let dir = support::temp_dir("evict-cli");
    let keyring = dir.join("keys.toml");
    std::fs::write(
        &keyring,
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let keyring = keyring.display().to_string();
    let created = CREATED.to_string();
    let signed = run_countersign(
        [
            "sign",
            "--keyring",
            &keyring,
            "--created",
            &created,
            "--nonce",
            "evict-cli-nonce-00000001",
        ],
        REQUEST,
    );
    assert!(signed.status.success());
    let now = (CREATED + 2).to_string();
    let out = run_countersign(
        [
            "verify",
            "--keyring",
            &keyring,
            "--now",
            &now,
            "--replay-redis",
            &server.url(),
        ],
        &signed.stdout,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    assert!(stdout.contains("replay_cache_unavailable"), "{stdout}");
    assert!(stderr.contains("maxmemory-policy allkeys-lru"), "{stderr}");
    assert!(stderr.contains("maxmemory-policy noeviction"), "{stderr}");
    assert_eq!(server.cli(&["DBSIZE"]), "0");
}

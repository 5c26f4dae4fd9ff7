//! Real Redis servers older than 7.0 behind the replay cache: Redis 5.0.6, which refuses
//! `HELLO` (an unknown command before 6.0; 6.0 and 6.1 refuse it without arguments), and
//! Redis 6.2.14, which answers it. Both answer `PING` and refuse the cache's `SET .. NX GET`
//! as a syntax error. Readiness must say not ready naming the server's version: read from
//! `HELLO` where it answers, from `INFO server` where it refuses `HELLO` (before, such a
//! server was judged by `PING` alone, so a process was ready while answering every signed
//! request 503). The same on a Redis Cluster of 5.0.6 nodes, each asked on its own route.
//! tests/proxy_preflight.rs covers the operator's view on Redis 5.0: `check-config --online`,
//! and `run`'s startup check, `/readyz` and a login.
//!
//! The servers are built by `scripts/old-redis.sh` (scripts/test.sh runs it first); without
//! them these tests fail, naming the script.
//! Run: `scripts/old-redis.sh && cargo test --all-features --test redis_old_versions`.
#![cfg(feature = "redis")]

mod support_redis;

use countersign::replay::{RedisConnection, RedisReplayCache, ReplayCache};
use support_redis::{old_redis_server, patient_options, RedisCluster, RedisServer};

const NOW: u64 = 1_000_000;

/// A replay cache on a real Redis of `version`: its first check is refused naming the version
/// countersign needs, readiness fails naming the server's own version, and nothing was written.
async fn old_server_is_refused_and_named(version: &str, named: &str) {
    let server = RedisServer::start_program(&old_redis_server(version), &[]);
    let info = server.cli(&["INFO", "server"]);
    assert!(
        info.contains(&format!("redis_version:{version}")),
        "the server runs Redis {version}: {info}"
    );
    let connection =
        RedisConnection::with_options(&format!("{}/0", server.url()), patient_options()).unwrap();
    let cache = RedisReplayCache::new(connection, "old:");

    let error = cache
        .check_and_record("n-1", NOW + 10, NOW)
        .await
        .unwrap_err();
    assert_eq!(error.reason().as_str(), "replay_cache_unavailable");
    assert!(
        error.detail().contains("syntax error")
            && error
                .detail()
                .contains("redis refused SET .. NX GET; the replay cache needs Redis 7.0 or later"),
        "Redis {version}: {error}"
    );

    assert!(!cache.ready().await, "ready on Redis {version}");
    let why = cache
        .connection()
        .readiness()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        why.contains(&format!("it runs Redis {named}")) && why.contains("7.0 or later"),
        "Redis {version}: {why}"
    );
    assert_eq!(
        server.cli(&["DBSIZE"]),
        "0",
        "nothing written on Redis {version}"
    );
}

/// Redis 5.0 refuses `HELLO`: its version comes from `INFO server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_5_0_which_refuses_hello_is_named_by_readiness() {
    old_server_is_refused_and_named("5.0.6", "5.0").await;
}

/// Redis 6.2 answers `HELLO` with its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_6_2_is_named_by_readiness() {
    old_server_is_refused_and_named("6.2.14", "6.2").await;
}

/// The same readiness on the current Redis passes: the old servers fail for their version,
/// not for something every server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_redis_is_ready() {
    let server = RedisServer::start();
    let connection =
        RedisConnection::with_options(&format!("{}/0", server.url()), patient_options()).unwrap();
    connection.readiness().await.unwrap();
    let cache = RedisReplayCache::new(connection, "new:");
    assert!(cache.check_and_record("n-1", NOW + 10, NOW).await.is_ok());
}

/// A Redis Cluster of real Redis 5.0.6 nodes: each primary refuses `HELLO`, so its version
/// comes from `INFO server`, routed to that node. Readiness fails naming every primary with its
/// address and version; a new connection (the check a process makes before its first call) is
/// refused the same way, and its first call fails closed writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_redis_5_0_primaries_is_named_by_readiness() {
    let cluster = RedisCluster::start_program(&old_redis_server("5.0.6"), 3, &[]);
    let connection = RedisConnection::cluster(&cluster.node_urls(), patient_options()).unwrap();
    let why = connection.readiness().await.unwrap_err().to_string();
    for node in &cluster.nodes {
        assert!(
            why.contains(&format!("primary {}: it runs Redis 5.0", node.addr())),
            "names {}: {why}",
            node.addr()
        );
    }
    assert!(why.contains("7.0 or later"), "{why}");

    let cache = RedisReplayCache::new(
        RedisConnection::cluster(&cluster.node_urls(), patient_options()).unwrap(),
        "cluster:nonce:",
    );
    let error = cache
        .check_and_record("n-1", NOW + 10, NOW)
        .await
        .unwrap_err();
    assert_eq!(error.reason().as_str(), "replay_cache_unavailable");
    assert!(error.detail().contains("it runs Redis 5.0"), "{error}");
    for node in &cluster.nodes {
        assert_eq!(
            node.cli(&["DBSIZE"]),
            "0",
            "nothing written on {}",
            node.addr()
        );
    }
}

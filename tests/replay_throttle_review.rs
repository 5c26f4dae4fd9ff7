//! Review of the Redis replay cache's connection settings and of the login throttle: defects
//! found by reading `src/replay/redis.rs` and `src/proxy/throttle.rs`, each shown here against
//! the public API (the throttles with a real `redis-server` where Redis is concerned).
#![cfg(feature = "proxy")]

mod support_redis;

use std::net::IpAddr;
use std::time::Duration;

use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::proxy::throttle_redis::RedisLoginThrottle;
use countersign::replay::{RedisConnection, RedisReplayCache, ReplayCache, SentinelOptions};
use support_redis::{fast_options, patient_options, refusing_addr, RedisServer};
use tokio::io::AsyncReadExt as _;

const NOW: u64 = 1_000_000;

/// 5 failures per name, many per address: only the per-name limit is in play.
fn limits() -> ThrottleConfig {
    ThrottleConfig {
        max_failures_per_ip: 1000,
        max_failures_per_user: 5,
        window: Duration::from_secs(900),
        ..ThrottleConfig::default()
    }
}

/// Names and spellings of them that a case-insensitive comparison takes for the same name,
/// although lower-casing alone keeps them apart:
/// - `ß` is `ss` in Unicode case folding (upper case `SS`, and `ẞ` is its capital), as
///   LDAP's `caseIgnoreMatch` (RFC 4518) and ICU collations compare;
/// - `σ` and the final `ς` are one letter in two forms (`Σ` in upper case): Java's
///   `equalsIgnoreCase`, .NET's `OrdinalIgnoreCase`, case folding all take them as equal;
/// - Java's `equalsIgnoreCase` takes `ı` (dotless) and `İ` (dotted capital) for `i`.
///
/// A credential API behind `auth.verify_url` comparing names so would get the whole per-name
/// limit once per spelling: `strauss` 5 guesses, `strauß` 5 more, `STRAUẞ`...
const RESPELLINGS: [(&str, &[&str]); 3] = [
    ("strauss", &["stRAUß", "STRAUẞ", "strauß"]),
    (
        "\u{3BF}\u{3B4}\u{3C5}\u{3C3}\u{3C3}\u{3B5}\u{3C5}\u{3C2}", // οδυσσευς
        &[
            "\u{3BF}\u{3B4}\u{3C5}\u{3C3}\u{3C3}\u{3B5}\u{3C5}\u{3C3}", // οδυσσευσ
            "\u{3BF}\u{3B4}\u{3C5}\u{3C2}\u{3C2}\u{3B5}\u{3C5}\u{3C2}", // οδυςςευς
        ],
    ),
    ("alice", &["al\u{130}ce", "AL\u{130}CE", "al\u{131}ce"]),
];

async fn respellings_share_one_count(throttle: &dyn LoginThrottle) {
    let client: IpAddr = "10.7.0.1".parse().unwrap();
    for (name, respellings) in RESPELLINGS {
        for attempt in 0..5 {
            assert_eq!(
                throttle.admit(client, name, NOW).await.unwrap(),
                None,
                "{name:?}: attempt {attempt} admitted"
            );
        }
        // The name is at its limit: so is every spelling of it.
        for respelled in respellings {
            assert!(
                throttle
                    .admit(client, respelled, NOW)
                    .await
                    .unwrap()
                    .is_some(),
                "{respelled:?} was admitted after 5 failures of {name:?}: a fresh per-name \
                 limit for a respelling that a case-insensitive check takes for the same name"
            );
        }
    }
    // Names that are not spellings of those are not concerned.
    for other in [
        "straus",
        "alce",
        "\u{3BF}\u{3B4}\u{3C5}\u{3C3}\u{3B5}\u{3C5}\u{3C2}",
    ] {
        assert_eq!(
            throttle.admit(client, other, NOW).await.unwrap(),
            None,
            "{other:?}"
        );
    }
}

#[tokio::test]
async fn memory_throttle_counts_case_insensitive_respellings_as_one_name() {
    respellings_share_one_count(&MemoryLoginThrottle::new(limits(), 10_000)).await;
}

#[tokio::test]
async fn redis_throttle_counts_case_insensitive_respellings_as_one_name() {
    let server = RedisServer::start();
    let connection = RedisConnection::with_options(&server.url(), patient_options()).unwrap();
    let throttle = RedisLoginThrottle::new(connection, "review:", limits());
    respellings_share_one_count(&throttle).await;
}

/// Redis Cluster seed nodes whose URLs mix `redis://` and `rediss://`: the `redis` crate takes
/// the first node's TLS mode for every node (and checks the others only when the first has
/// TLS), so a `rediss://` node after a `redis://` one was connected to in clear, its password
/// sent unencrypted. A `rediss://` node must never see a byte that is not TLS: the node list
/// is refused (naming the problem, not the password), or the node gets a TLS handshake.
#[tokio::test]
async fn a_rediss_cluster_node_is_never_reached_in_clear() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_port = listener.local_addr().unwrap().port();
    let (_closed, closed) = refusing_addr();
    let closed_port = closed.port();
    let nodes = [
        format!("redis://:hunter2@127.0.0.1:{closed_port}"),
        format!("rediss://:hunter2@127.0.0.1:{tls_port}"),
    ];
    let connection = match RedisConnection::cluster(&nodes, fast_options()) {
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains("hunter2"), "{message}");
            assert!(message.contains("rediss://"), "{message}");
            return;
        }
        Ok(connection) => connection,
    };
    let first_bytes = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = vec![0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await;
        buffer.truncate(read.ok().and_then(Result::ok).unwrap_or(0));
        buffer
    });
    let cache = RedisReplayCache::new(connection, "{review}:nonce:");
    let outcome = cache
        .check_and_record("review-nonce-aaaaaaaaaaaaaaaaaa", NOW + 12, NOW)
        .await;
    assert!(outcome.is_err(), "no Redis answers here: {outcome:?}");
    let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(3), first_bytes).await else {
        // The node was never connected to: nothing was sent in clear.
        return;
    };
    // A TLS connection starts with a handshake record (content type 22).
    assert!(
        bytes.is_empty() || bytes[0] == 0x16,
        "the rediss:// node was sent plain text: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

/// A query in a Redis URL: the `redis` crate reads `protocol` from it and silently ignores
/// anything else, so `redis://host/0?ssl=true` (TLS as other clients spell it) connected in
/// clear, `?db=3` used database 0, `?password=...` sent no password. None of them is part of
/// the accepted forms (docs/CONFIG.md: `redis://[user:password@]host[:port][/db]`): refused
/// when given, for one server, a cluster node and a sentinel alike, without the password.
#[test]
fn a_url_query_the_client_would_ignore_is_refused() {
    for url in [
        "redis://:hunter2@127.0.0.1:6379/0?ssl=true",
        "redis://127.0.0.1:6379/?tls=true",
        "rediss://127.0.0.1:6380/0?insecure=true",
        "redis://127.0.0.1:6379/?db=3",
        "redis://127.0.0.1:6379?password=hunter2",
        "redis://127.0.0.1:6379/0?protocol=resp3&ssl=true",
    ] {
        let message = RedisConnection::open(url).unwrap_err().to_string();
        assert!(message.contains("query"), "{url}: {message}");
        assert!(!message.contains("hunter2"), "{url}: {message}");
        let message = RedisConnection::cluster(&[url], fast_options())
            .unwrap_err()
            .to_string();
        assert!(message.contains("query"), "{url}: {message}");
        assert!(!message.contains("hunter2"), "{url}: {message}");
        let message = RedisConnection::sentinel(
            &[url],
            "mymaster",
            &SentinelOptions::default(),
            fast_options(),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("query"), "{url}: {message}");
        assert!(!message.contains("hunter2"), "{url}: {message}");
    }
    // `protocol` is read by the client (RESP3): still taken, as is a URL without a query.
    for url in [
        "redis://127.0.0.1:6379/?protocol=resp3",
        "redis://127.0.0.1:6379/0?protocol=2",
        "redis://127.0.0.1:6379/0",
    ] {
        assert!(RedisConnection::open(url).is_ok(), "{url}");
        assert!(
            RedisConnection::cluster(&[url.replace("/0", "/")], fast_options()).is_ok(),
            "{url}"
        );
    }
}

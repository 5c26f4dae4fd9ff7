//! TLS to the primary found through Redis Sentinel (`rediss://` with `redis_sentinels`), on real
//! processes: a primary listening with TLS (certificate from a test CA made here) and a
//! sentinel monitoring its TLS port (`tls-replication yes`), which therefore names that port.
//! Without the CA the primary is refused, and the error says it is its certificate (not "no
//! usable primary"); with the CA given to `RedisConnection::sentinel_with_tls_root_cert` it is
//! used; a certificate that is not valid for the address the sentinel announces is refused even
//! with the CA.
//! Run: `cargo test --all-features --test redis_sentinel_tls`.
#![cfg(feature = "redis")]

mod support_redis;

use std::time::Duration;

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, SentinelOptions,
};
use support_redis::{
    assert_fresh_then_replayed, redis_test_options, RedisServer, SentinelServer, TlsFiles,
    SENTINEL_MASTER,
};

const NOW: u64 = 1_000_000;
const PREFIX: &str = "stls:";

fn options() -> RedisOptions {
    redis_test_options(Duration::from_secs(3))
}

fn tls_node() -> SentinelOptions {
    SentinelOptions {
        tls: true,
        ..SentinelOptions::default()
    }
}

/// A TLS primary whose certificate names `names`, and a sentinel monitoring its TLS port.
fn tls_primary_and_sentinel(names: &[&str]) -> (RedisServer, u16, TlsFiles, SentinelServer) {
    let (primary, tls_port, files) = RedisServer::start_tls_files(names);
    let lines = files.sentinel_lines();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let tls_addr = std::net::SocketAddr::from(([127, 0, 0, 1], tls_port));
    let sentinel = SentinelServer::start_with(tls_addr, &lines, None);
    // The sentinel reaches the primary over TLS (or it would report it down).
    support_redis::wait_until(
        "the sentinel to see the TLS primary up",
        Duration::from_secs(10),
        || {
            let masters = sentinel.cli(&["SENTINEL", "MASTERS"]);
            masters.contains(&tls_port.to_string())
                && masters.lines().any(|l| l == "master")
                && !masters.contains("s_down")
        },
    );
    (primary, tls_port, files, sentinel)
}

/// A replay cache on the primary `sentinel` names, reached over TLS trusting `files`' CA.
fn cache_trusting_the_ca(sentinel: &SentinelServer, files: &TlsFiles) -> RedisReplayCache {
    let connection = RedisConnection::sentinel_with_tls_root_cert(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        &tls_node(),
        options(),
        files.ca_pem.as_bytes(),
    )
    .unwrap();
    RedisReplayCache::new(connection, PREFIX)
}

/// The sentinel names the primary's TLS port, whose certificate is from a private CA: without
/// the CA (public web roots) the primary is refused, nothing is written, not ready, and the
/// error names the primary and its certificate problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_primary_is_refused_without_the_ca_with_a_tls_error() {
    let (primary, tls_port, _files, sentinel) = tls_primary_and_sentinel(&["127.0.0.1"]);
    let connection = RedisConnection::sentinel(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        &tls_node(),
        options(),
    )
    .unwrap();
    assert!(connection.endpoint().starts_with("rediss+sentinel://"));
    let cache = RedisReplayCache::new(connection, PREFIX);
    let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
        panic!("a primary with a private-CA certificate was trusted");
    };
    let detail = error.detail();
    assert!(
        detail.contains(&format!("rediss://127.0.0.1:{tls_port}")),
        "names the primary: {detail}"
    );
    assert!(
        detail.contains("certificate"),
        "says it is the certificate: {detail}"
    );
    assert!(!cache.ready().await);
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
}

/// With the CA the primary is used: nonces are recorded there and replays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_private_ca_the_primary_is_used() {
    let (primary, tls_port, files, sentinel) = tls_primary_and_sentinel(&["127.0.0.1"]);
    // The sentinel names the TLS port, which speaks only TLS: what works below went over TLS.
    assert_eq!(sentinel.primary_port(), Some(tls_port));
    let cache = cache_trusting_the_ca(&sentinel, &files);
    assert!(cache.ready().await, "ready over TLS through the sentinel");
    assert_fresh_then_replayed(&cache, "n1", NOW + 60, NOW).await;
    assert_eq!(primary.cli(&["EXISTS", "stls:n1"]), "1");
}

/// The certificate must be valid for the address the sentinel announces (here 127.0.0.1): one
/// issued for `localhost` only is refused, CA or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_even_with_the_ca() {
    let (primary, tls_port, files, sentinel) = tls_primary_and_sentinel(&["localhost"]);
    let cache = cache_trusting_the_ca(&sentinel, &files);
    let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
        panic!("a certificate for localhost was accepted for 127.0.0.1");
    };
    let detail = error.detail();
    assert!(
        detail.contains(&format!("rediss://127.0.0.1:{tls_port}")),
        "{detail}"
    );
    assert!(detail.contains("certificate"), "{detail}");
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
}

/// The root certificate needs TLS to the primary and a PEM certificate; a malformed one is
/// refused when the connection is made, not at the first call.
#[test]
fn the_root_certificate_is_checked_up_front() {
    let (_primary, _tls_port, files) = RedisServer::start_tls_files(&["127.0.0.1"]);
    let build = |node: &SentinelOptions, pem: &[u8]| {
        RedisConnection::sentinel_with_tls_root_cert(
            &["127.0.0.1:26379"],
            SENTINEL_MASTER,
            node,
            options(),
            pem,
        )
    };
    assert!(build(&tls_node(), files.ca_pem.as_bytes()).is_ok());
    let Err(error) = build(&SentinelOptions::default(), files.ca_pem.as_bytes()) else {
        panic!("a root certificate without TLS was accepted");
    };
    assert!(error.to_string().contains("TLS"), "{error}");
    let Err(error) = build(&tls_node(), b"not a certificate") else {
        panic!("a file without a certificate was accepted");
    };
    assert!(error.to_string().contains("no PEM certificate"), "{error}");
    let Err(error) = build(
        &tls_node(),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ) else {
        panic!("a malformed certificate was accepted");
    };
    assert!(
        error.to_string().contains("unusable TLS root certificate"),
        "{error}"
    );
}

/// The proxy's config: `redis_ca_file` with `redis_sentinels` and a `rediss://` URL is accepted
/// (it was refused before), and the session store built from it (as `run` builds it) reaches the
/// private-CA primary the sentinel names; without the CA file the same config is not ready and
/// writes nothing; a CA file without a certificate is refused naming its key.
#[cfg(feature = "proxy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_config_takes_a_private_ca_with_sentinels() {
    use countersign::proxy::config::{ProxyConfig, StoreKind};
    use countersign::proxy::session::{SessionStore, SessionTimeouts};
    use countersign::proxy::session_redis::{redis_connection, RedisSessionStore};

    let (primary, _tls_port, files, sentinel) = tls_primary_and_sentinel(&["127.0.0.1"]);
    let dir = support_redis::TestDir::new("stls-config");
    std::fs::write(dir.join("keys.toml"), support_redis::TEST_KEYRING).unwrap();
    std::fs::write(dir.join("users.toml"), support_redis::TEST_USERS).unwrap();
    std::fs::write(dir.join("ca.pem"), &files.ca_pem).unwrap();
    std::fs::write(dir.join("empty.pem"), "no certificate here\n").unwrap();
    let write_config = |ca_line: &str| {
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"http://app.test\"\n\n\
                 [session]\nstore = \"redis\"\nredis_url = \"rediss:///0\"\n\
                 redis_sentinels = [\"{}\"]\nredis_sentinel_master = \"{SENTINEL_MASTER}\"\n\
                 redis_key_prefix = \"{PREFIX}\"\n{ca_line}\n\n\
                 [auth]\nusers_file = \"users.toml\"\n\n[signing]\nkeyring = \"keys.toml\"\n\n\
                 [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n",
                sentinel.addr()
            ),
        )
        .unwrap();
        path
    };
    let timeouts = SessionTimeouts {
        idle: Duration::from_secs(1800),
        absolute: Duration::from_secs(43200),
    };
    let store_from = |config: &ProxyConfig| {
        let StoreKind::Redis { url, .. } = &config.session.store else {
            panic!("a redis store");
        };
        redis_connection(config, url).map(|c| RedisSessionStore::new(c, PREFIX, timeouts, 1000))
    };
    let alice = countersign::Identity::new("alice", ["admin"]);

    // Without the CA: the primary's certificate is refused; not ready, nothing written.
    let config = ProxyConfig::load(&write_config("")).unwrap();
    let store = store_from(&config).unwrap();
    assert!(!store.ready().await, "a private-CA primary without the CA");
    assert!(store.create(&alice, NOW).await.is_err());
    assert_eq!(primary.cli(&["DBSIZE"]), "0");

    // With it: the session lives on the TLS primary.
    let config = ProxyConfig::load(&write_config("redis_ca_file = \"ca.pem\"")).unwrap();
    let store = store_from(&config).unwrap();
    assert!(store.ready().await, "ready over TLS with the private CA");
    let (id, _) = store.create(&alice, NOW).await.unwrap();
    assert!(store.get(&id, NOW + 1, false).await.unwrap().is_some());
    assert_ne!(primary.cli(&["DBSIZE"]), "0");

    // A CA file without a certificate: refused when the connection is built, naming the key.
    let config = ProxyConfig::load(&write_config("redis_ca_file = \"empty.pem\"")).unwrap();
    let Err(error) = store_from(&config) else {
        panic!("a CA file without a certificate was accepted");
    };
    let text = error.to_string();
    assert!(text.contains("session.redis_ca_file"), "{text}");
    assert!(text.contains("no PEM certificate"), "{text}");
}

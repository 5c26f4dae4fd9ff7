//! The `[session] redis_*` keys of `proxy.toml`: defaults, parsing, the errors (naming file and
//! key), and building the proxy's stores from them (lazily: no Redis needed to start).
#![cfg(feature = "proxy")]

mod support_tmp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::SystemClock;
use countersign::proxy::config::{ProxyConfig, RedisTuning, StoreKind};
use countersign::proxy::server::ProxyDeps;
use support_tmp::TestDir;

const KEYS: &str = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\"\n";
const USERS: &str = "[[users]]\nname = \"alice\"\npassword = \"$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNo\"\nroles = []\n";

/// Writes keys, users and a proxy.toml whose `[session]` table is `session`; the directory
/// goes away with the returned guard.
fn setup(session: &str) -> (TestDir, PathBuf) {
    let dir = TestDir::new("redis-config");
    std::fs::write(dir.join("keys.toml"), KEYS).unwrap();
    std::fs::write(dir.join("users.toml"), USERS).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
public_origin = "http://app.test"

[session]
{session}

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://127.0.0.1:3000"
"#
        ),
    )
    .unwrap();
    (dir, path)
}

fn expect_error(session: &str, key: &str, needle: &str) {
    let (_dir, path) = setup(session);
    let error = ProxyConfig::load(&path).expect_err("config should be rejected");
    let text = error.to_string();
    assert!(
        text.starts_with(&path.display().to_string()),
        "names the file: {text}"
    );
    assert!(text.contains(&format!(": {key}: ")), "names {key}: {text}");
    assert!(text.contains(needle), "mentions {needle:?}: {text}");
    assert!(!text.contains("hunter2"), "no password: {text}");
}

#[test]
fn redis_keys_default_and_parse() {
    let (_dir, path) = setup("store = \"redis\"\nredis_url = \"redis://127.0.0.1:6379/2\"");
    let config = ProxyConfig::load(&path).unwrap();
    assert!(matches!(config.session.store, StoreKind::Redis { .. }));
    assert_eq!(config.session.redis, RedisTuning::default());
    assert_eq!(config.session.redis.op_timeout, Duration::from_millis(500));
    assert_eq!(config.session.redis.connect_timeout, Duration::from_secs(2));
    assert_eq!(config.session.redis.touch_interval, Duration::from_secs(5));

    let (_dir, path) = setup(
        "store = \"redis\"\nredis_url = \"rediss://:hunter2@redis.internal:6380/0\"\n\
         redis_timeout = \"250ms\"\nredis_connect_timeout = \"1s\"\n\
         redis_touch_interval = \"10s\"\nredis_ca_file = \"tls/ca.pem\"",
    );
    let config = ProxyConfig::load(&path).unwrap();
    let tuning = &config.session.redis;
    assert_eq!(tuning.op_timeout, Duration::from_millis(250));
    assert_eq!(tuning.connect_timeout, Duration::from_secs(1));
    assert_eq!(tuning.touch_interval, Duration::from_secs(10));
    assert_eq!(
        tuning.ca_file.as_deref(),
        Some(path.parent().unwrap().join("tls/ca.pem").as_path())
    );
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn redis_keys_are_errors_with_the_memory_store() {
    for key in [
        "redis_timeout = \"1s\"",
        "redis_connect_timeout = \"1s\"",
        "redis_touch_interval = \"1s\"",
        "redis_ca_file = \"ca.pem\"",
        "redis_sentinel_tls = true",
    ] {
        let name = key.split_whitespace().next().unwrap();
        expect_error(
            &format!("store = \"memory\"\n{key}"),
            &format!("session.{name}"),
            "only used with store = \"redis\"",
        );
    }
}

#[test]
fn bad_redis_values_name_their_key() {
    let base = "store = \"redis\"\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"";
    expect_error(
        &format!("{base}\nredis_timeout = \"soon\""),
        "session.redis_timeout",
        "soon",
    );
    expect_error(
        &format!("{base}\nredis_connect_timeout = \"0s\""),
        "session.redis_connect_timeout",
        "",
    );
    expect_error(
        &format!("{base}\nredis_touch_interval = \"5x\""),
        "session.redis_touch_interval",
        "5x",
    );
    expect_error(
        &format!("{base}\nredis_ca_file = \"ca.pem\""),
        "session.redis_ca_file",
        "rediss://",
    );
}

/// `redis_sentinel_tls`: off by default; with it, `redis_ca_file` is taken for the sentinels
/// even when the primary is reached without TLS; refused without `redis_sentinels`, with a
/// value that is not a boolean, and a `rediss://` sentinel entry points to it.
#[test]
fn redis_sentinel_tls_parses_and_is_checked() {
    let sentinels = "store = \"redis\"\nredis_url = \"redis://:hunter2@/0\"\n\
                     redis_sentinels = [\"10.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\"";
    let (_dir, path) = setup(sentinels);
    let config = ProxyConfig::load(&path).unwrap();
    let sentinel = config.session.redis.sentinel.as_ref().unwrap();
    assert!(!sentinel.tls, "off by default");
    let (_dir, path) = setup(&format!(
        "{sentinels}\nredis_sentinel_tls = true\nredis_ca_file = \"ca.pem\""
    ));
    let config = ProxyConfig::load(&path).unwrap();
    assert!(config.session.redis.sentinel.as_ref().unwrap().tls);
    assert!(config.session.redis.ca_file.is_some());
    assert!(format!("{config:?}").contains("tls: true"));
    expect_error(
        "store = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_sentinel_tls = true",
        "session.redis_sentinel_tls",
        "only used with session.redis_sentinels",
    );
    expect_error(
        &format!("{sentinels}\nredis_sentinel_tls = \"yes\""),
        "session.redis_sentinel_tls",
        "",
    );
    expect_error(
        &format!("{sentinels}\nredis_sentinel_tls = false\nredis_ca_file = \"ca.pem\""),
        "session.redis_ca_file",
        "session.redis_sentinel_tls = true",
    );
    expect_error(
        &sentinels.replace("10.0.0.1:26379", "rediss://:hunter2@10.0.0.1:26379"),
        "session.redis_sentinels",
        "session.redis_sentinel_tls = true",
    );
}

/// A sentinel or cluster node listed twice is refused however it is written: the host in
/// another case, the default port left out or written (26379 for sentinels, 6379 for nodes),
/// a port with a leading zero. Config only: no Redis is reached.
/// `rediss://host/#insecure` is the `redis` crate's TLS without a certificate check, which
/// this build does not have: every call would fail. Refused at load, naming the key, with
/// what to do instead, the password redacted.
#[test]
fn a_redis_url_with_a_fragment_is_refused() {
    for url in [
        "rediss://:hunter2@127.0.0.1:6380/0#insecure",
        "redis://:hunter2@127.0.0.1:6379/0#x",
    ] {
        expect_error(
            &format!("store = \"redis\"\nredis_url = \"{url}\""),
            "session.redis_url",
            "has a fragment (`#...`), which is not part of a Redis URL: `#insecure`",
        );
    }
}

#[test]
fn the_same_redis_server_listed_twice_is_refused() {
    let sentinels = |list: &str| {
        format!(
            "store = \"redis\"\nredis_url = \"redis://:hunter2@/0\"\n\
             redis_sentinels = [{list}]\nredis_sentinel_master = \"mymaster\""
        )
    };
    let nodes = |list: &str| {
        format!(
            "store = \"redis\"\nredis_url = \"redis://:hunter2@\"\n\
             redis_key_prefix = \"{{cs}}:\"\nredis_cluster_nodes = [{list}]"
        )
    };
    for (session, key, twice) in [
        (
            sentinels("\"redis-a:26379\", \"REDIS-A:26379\""),
            "session.redis_sentinels",
            "entry 2 (\"REDIS-A:26379\") is listed twice: entry 1 (\"redis-a:26379\")",
        ),
        (
            sentinels("\"10.0.0.1:26379\", \"10.0.0.2\", \"10.0.0.1\""),
            "session.redis_sentinels",
            "entry 3 (\"10.0.0.1\") is listed twice: entry 1",
        ),
        (
            sentinels("\"[::1]\", \"[::1]:026379\""),
            "session.redis_sentinels",
            "entry 2 (\"[::1]:026379\") is listed twice",
        ),
        (
            nodes("\"Node-1:7000\", \"node-1:7000\""),
            "session.redis_cluster_nodes",
            "entry 2 (\"node-1:7000\") is listed twice: entry 1 (\"Node-1:7000\")",
        ),
        (
            nodes("\"10.0.0.1:6379\", \"10.0.0.2:6379\", \"10.0.0.1\""),
            "session.redis_cluster_nodes",
            "entry 3 (\"10.0.0.1\") is listed twice: entry 1",
        ),
    ] {
        expect_error(&session, key, twice);
    }
    // Other ports, or other hosts, are other servers.
    for session in [
        sentinels("\"redis-a:26379\", \"redis-a:26380\", \"redis-b\""),
        nodes("\"redis-a\", \"redis-a:7000\", \"REDIS-B\""),
    ] {
        let (_dir, path) = setup(&session);
        assert!(ProxyConfig::load(&path).is_ok(), "{session}");
    }
}

#[tokio::test]
async fn the_proxy_builds_redis_stores_without_redis_running() {
    // Nothing listens on port 1: the stores are made anyway (connections are lazy) and report
    // not ready; requests would answer 503 until Redis answers.
    let (_dir, path) = setup(
        "store = \"redis\"\nredis_url = \"redis://127.0.0.1:1/0\"\nredis_timeout = \"200ms\"\n\
         redis_connect_timeout = \"200ms\"",
    );
    let config = ProxyConfig::load(&path).unwrap();
    let deps = ProxyDeps::from_config(&config, Arc::new(SystemClock)).unwrap();
    assert!(!deps.sessions.ready().await);
    let started = std::time::Instant::now();
    assert!(deps.sessions.count().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(deps
        .throttle
        .check("10.0.0.1".parse().unwrap(), "alice", 0)
        .await
        .is_err());
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_proxy_at_startup() {
    let (_dir, path) = setup(
        "store = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380/0\"\nredis_ca_file = \"missing.pem\"",
    );
    let config = ProxyConfig::load(&path).unwrap();
    let error =
        ProxyDeps::from_config(&config, Arc::new(SystemClock)).expect_err("startup should fail");
    assert!(error.contains("session.redis_ca_file"), "{error}");
    assert!(error.contains("missing.pem"), "{error}");
    assert!(error.starts_with(&path.display().to_string()), "{error}");

    // A file that is not a certificate is refused too.
    let dir: &Path = path.parent().unwrap();
    std::fs::write(dir.join("missing.pem"), "not a certificate").unwrap();
    let error =
        ProxyDeps::from_config(&config, Arc::new(SystemClock)).expect_err("startup should fail");
    assert!(error.contains("session.redis_ca_file"), "{error}");
    assert!(error.contains("no PEM certificate"), "{error}");
}

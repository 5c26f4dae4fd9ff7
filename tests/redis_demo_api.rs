//! `countersign demo-api --replay-redis URL`: two API instances share the nonce history in a
//! real `redis-server`, so a signed request accepted by one is `replayed` at the other; with
//! Redis stopped they fail closed (503 `replay_cache_unavailable`).
#![cfg(feature = "proxy")]

mod support_cli;
mod support_redis;

use support_cli::{http_exchange, signed_whoami, DemoApi};
use support_redis::{RedisServer, TestDir};

const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

#[test]
fn a_request_replayed_to_another_api_instance_is_rejected() {
    let redis = RedisServer::start();
    let dir = TestDir::new("demo-api-redis");
    let keyring = dir.join("keys.toml");
    std::fs::write(
        &keyring,
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let api_a = DemoApi::start(&keyring, &["--replay-redis", &redis.url()]);
    let api_b = DemoApi::start(&keyring, &["--replay-redis", &redis.url()]);

    let request = signed_whoami(&keyring, &[]);
    let (status, body) = http_exchange(api_a.addr, &request);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice"), "{body}");

    // The same bytes at the other instance: the shared cache has seen the nonce.
    let (status, body) = http_exchange(api_b.addr, &request);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"replayed\""), "{body}");

    // A fresh request is fine at B.
    let (status, _) = http_exchange(api_b.addr, &signed_whoami(&keyring, &[]));
    assert_eq!(status, 200);

    // Redis gone: fail closed, never let a request through unchecked.
    let mut redis = redis;
    redis.stop();
    let (status, body) = http_exchange(api_a.addr, &signed_whoami(&keyring, &[]));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("replay_cache_unavailable"), "{body}");
}

//! The replay cache's `SET NX` retried after its connection was lost: the first try may have
//! reached Redis and recorded the nonce with only its reply lost, so the retry's "already
//! recorded" may be the request's own first write. Such a nonce is refused as unavailable
//! (503 `replay_cache_unavailable`), never as a replay (401 `replayed`): a legitimate first
//! request is not called an attack.
//!
//! Between the client and a real `redis-server` sits a forwarder that, once armed, forwards
//! the next `SET` to Redis, then closes the client's connection instead of relaying the reply,
//! as a network or proxy cut at that instant would. Later connections are forwarded as usual.
//! Run: `cargo test --all-features --test replay_redis_retry`.
#![cfg(feature = "redis")]

mod support_redis;

use std::time::Duration;

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
};
use countersign::VerifyError;
use support_redis::forwarder::ReplyCutter;
use support_redis::RedisServer;

const NOW: u64 = 1_000_000;
const PREFIX: &str = "lost-reply:";

/// A `SET` command as the client sends it (RESP): the command name as a 3-byte bulk string.
const SET_COMMAND: &[u8] = b"$3\r\nSET\r\n";

fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ping_timeout: Duration::from_secs(1),
    }
}

/// A real Redis, a reply cutter in front of it, and a replay cache that reaches Redis through
/// the cutter.
async fn cache_behind_cutter() -> (RedisServer, ReplyCutter, RedisReplayCache) {
    let server = RedisServer::start();
    let cutter = ReplyCutter::start(server.addr(), SET_COMMAND).await;
    let url = format!("redis://{}/0", cutter.forwarder.addr);
    let connection = RedisConnection::with_options(&url, options()).unwrap();
    (server, cutter, RedisReplayCache::new(connection, PREFIX))
}

/// The first use of a nonce whose `SET NX` reached Redis but whose reply was lost: the retry
/// on a new connection finds it recorded (by that first try), and the request is refused as
/// 503 `replay_cache_unavailable`, not 401 `replayed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_use_whose_reply_was_lost_is_unavailable_not_replayed() {
    let (server, cutter, cache) = cache_behind_cutter().await;
    // The connection is made (and its check passed) by a first nonce.
    assert_eq!(
        cache.check_and_record("warm-up", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(cutter.connections(), 1);

    cutter.arm();
    let outcome = cache.check_and_record("first-use", NOW + 10, NOW).await;
    // The first try reached Redis: the nonce is recorded there, by this request alone.
    assert_eq!(server.cli(&["EXISTS", "lost-reply:first-use"]).trim(), "1");
    // And the call was retried on a new connection (which found the key).
    assert_eq!(cutter.connections(), 2, "{outcome:?}");
    let error = match outcome {
        Err(error) => error,
        Ok(outcome) => panic!(
            "a first use whose reply was lost must be an error (503 \
             replay_cache_unavailable), not {outcome:?}"
        ),
    };
    assert_eq!(error.reason().as_str(), "replay_cache_unavailable");
    let refusal = VerifyError::from(error.clone());
    assert_eq!(refusal.reason().as_str(), "replay_cache_unavailable");
    assert!(error.detail().contains("lost"), "{error}");
    assert!(
        error.detail().contains("cannot be told from a replay"),
        "{error}"
    );

    // The new connection is kept and answers as before: the nonce is a replay from now on,
    // and a new one is fresh.
    assert_eq!(
        cache.check_and_record("first-use", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert_eq!(
        cache.check_and_record("next", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(cutter.connections(), 2);
}

/// A real replay whose reply is lost the same way is refused the same way (503): the two
/// cannot be told apart, and the cut never makes a replay `Fresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_reply_was_lost_is_refused_as_unavailable_too() {
    let (_server, cutter, cache) = cache_behind_cutter().await;
    assert_eq!(
        cache.check_and_record("used", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    cutter.arm();
    let error = cache
        .check_and_record("used", NOW + 10, NOW)
        .await
        .unwrap_err();
    assert_eq!(error.reason().as_str(), "replay_cache_unavailable");
    assert_eq!(cutter.connections(), 2);
}

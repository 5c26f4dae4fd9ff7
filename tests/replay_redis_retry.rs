//! The replay cache's `SET NX GET` retried after its connection was lost: the first try may
//! have reached Redis and recorded the nonce with only its reply lost, so the retry's "already
//! recorded" may be the request's own first write. The value written is the check's own
//! random token, so the retry tells its own first try (`Fresh`) from another request's use
//! (`Replayed`): a legitimate first request is neither refused nor called an attack.
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

/// The first use of a nonce whose `SET NX GET` reached Redis but whose reply was lost: the
/// retry on a new connection finds the token its own first try wrote, and the nonce is
/// `Fresh`, once. Before the token, that retry's "already recorded" could not be told from a
/// replay: the request was refused (503, and on a Redis Cluster, whose client repeats the call
/// itself, 401 `replayed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_use_whose_reply_was_lost_is_fresh_once() {
    let (server, cutter, cache) = cache_behind_cutter().await;
    // The connection is made (and its check passed) by a first nonce.
    assert_eq!(
        cache.check_and_record("warm-up", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(cutter.connections(), 1);

    cutter.arm();
    let outcome = cache.check_and_record("first-use", NOW + 10, NOW).await;
    // The first try reached Redis: the nonce is recorded there, with this check's token (16
    // random bytes).
    assert_eq!(server.cli(&["EXISTS", "lost-reply:first-use"]).trim(), "1");
    assert_eq!(server.cli(&["STRLEN", "lost-reply:first-use"]).trim(), "16");
    // And the call was retried on a new connection, which found that token.
    assert_eq!(cutter.connections(), 2, "{outcome:?}");
    assert_eq!(outcome, Ok(ReplayOutcome::Fresh));

    // The new connection is kept and answers as before: the nonce is a replay from now on
    // (another check, another token), and a new one is fresh.
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

/// A real replay whose reply is lost the same way is still a replay: the retry finds the first
/// use's token, not its own, so the cut never makes a replay `Fresh`. A nonce recorded by an
/// earlier countersign (value `1`, before the token) is a replay too, so a fleet can be
/// upgraded one process at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_reply_was_lost_is_still_a_replay() {
    let (server, cutter, cache) = cache_behind_cutter().await;
    assert_eq!(
        cache.check_and_record("used", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    cutter.arm();
    assert_eq!(
        cache.check_and_record("used", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert_eq!(cutter.connections(), 2);
    assert_eq!(
        server
            .cli(&[
                "SET",
                "lost-reply:by-an-earlier-version",
                "1",
                "PX",
                "10000"
            ])
            .trim(),
        "OK"
    );
    assert_eq!(
        cache
            .check_and_record("by-an-earlier-version", NOW + 10, NOW)
            .await,
        Ok(ReplayOutcome::Replayed)
    );
}

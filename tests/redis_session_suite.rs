//! The common `SessionStore` suite (defined once, in tests/session_store.rs, where it runs
//! against the memory store) run unchanged against `RedisSessionStore` on a real
//! `redis-server`, so the two implementations cannot drift apart.
//!
//! tests/session_store.rs is included whole, so its memory-store tests also run in this binary;
//! the point is that the suite itself has one definition.
#![cfg(feature = "proxy")]

mod support_redis;

#[path = "session_store.rs"]
mod session_store;

use std::sync::Arc;

use countersign::clock::ManualClock;
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::RedisConnection;
use support_redis::RedisServer;

fn redis_store(server: &RedisServer, max_sessions: usize) -> Arc<RedisSessionStore> {
    let connection = RedisConnection::open(&server.url()).unwrap();
    Arc::new(RedisSessionStore::new(
        connection,
        "suite:",
        session_store::suite_timeouts(),
        max_sessions,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_session_store_suite() {
    let server = RedisServer::start();
    session_store::session_store_suite(
        redis_store(&server, 10_000),
        ManualClock::new(session_store::T0),
    )
    .await;
}

#[tokio::test]
async fn redis_store_capacity_limit() {
    let server = RedisServer::start();
    session_store::capacity_suite(
        redis_store(&server, 8),
        8,
        ManualClock::new(session_store::T0),
    )
    .await;
}

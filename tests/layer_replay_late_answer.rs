//! VerifyLayer with a replay cache that answers late: a real `redis-server` on a free loopback
//! port, a `RedisReplayCache` whose calls may wait 4 s, the layer on a manual clock.
//!
//! The layer records a nonce only until `replay_until`, the end of the signature's window, and
//! a Redis key lives that long from when Redis writes it. A `SET NX` that Redis runs only after
//! the window closed (Redis paused or slow, `op_timeout` longer than what is left of the window)
//! no longer finds the first copy's key, which has expired: it answers `Fresh`, and the layer
//! accepted the replayed copy. An answer that arrives once the window has closed is refused
//! `expired`, as a body completed after the window is (tests/layer_slow_body.rs).
//!
//! Deterministic without waiting out a real window: the first copy is sent in the window's last
//! second (its key lives 2 s), Redis then holds every write for 3 s (`CLIENT PAUSE 3000
//! WRITE`), and the manual clock is moved past the window while the copy's write waits.
//!
//! Run: `cargo test --all-features --test layer_replay_late_answer`
#![cfg(feature = "redis")]

mod support_redis;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::layer::VerifyLayer;
use countersign::replay::{RedisConnection, RedisOptions, RedisReplayCache};
use countersign::{Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support_redis::RedisServer;
use tower::{Service as _, ServiceBuilder, ServiceExt as _};

const CREATED: u64 = 1_700_000_000;
/// `Policy::default()` (window 10 s, skew 2 s) and `SignerConfig::default()` (`expires =
/// created + 10`): `replay_until = created + 10 + 2 + 1` (docs/PROTOCOL.md §6, step 16).
const REPLAY_UNTIL: u64 = CREATED + 13;
const NONCE: &str = "late-answer-nonce-0123456789";
const PREFIX: &str = "late-answer:";
/// How long Redis holds writes: past the 2 s the first copy's key lives, within `op_timeout`.
const PAUSE_MS: u64 = 3000;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![9; 32]).unwrap())
        .unwrap()
        .into()
}

/// One signed, bodiless request: the same bytes every time (a captured request).
fn captured() -> Request<Full<Bytes>> {
    let (mut parts, ()) = Request::get("http://api.internal/transfer?to=mallory")
        .header("host", "api.internal")
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, b"", None, CREATED, &Nonce::new(NONCE).unwrap())
        .unwrap();
    Request::from_parts(parts, Full::new(Bytes::new()))
}

#[tokio::test]
async fn a_replay_answer_after_the_window_closed_is_refused() {
    let server = RedisServer::start();
    // Calls may wait 4 s: longer than the second left of the window when the copy arrives.
    let options = RedisOptions {
        op_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(500),
    };
    let connection = RedisConnection::with_options(&server.url(), options).unwrap();
    let replay = Arc::new(RedisReplayCache::new(connection, PREFIX));
    // The window's last second: the signature is still acceptable.
    let clock = ManualClock::new(REPLAY_UNTIL - 1);
    let layer = VerifyLayer::new(Verifier::new(keyring(), Policy::default()), replay)
        .clock(Arc::new(clock.clone()));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let api =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |_request: Request<Full<Bytes>>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
            });

    // The first copy: Redis answers at once, within the window. Its key lives the 1 s left of
    // the window plus 1 s (src/replay/redis.rs).
    let first = api.clone().oneshot(captured()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let key = format!("{PREFIX}{NONCE}");
    let ttl: i64 = server.cli(&["PTTL", &key]).parse().unwrap();
    assert!(
        (1..=2000).contains(&ttl),
        "the first copy's key lives {ttl} ms"
    );

    // Redis holds every write for 3 s, so the copy's `SET NX` runs after that key expired.
    assert_eq!(
        server.cli(&["CLIENT", "PAUSE", &PAUSE_MS.to_string(), "WRITE"]),
        "OK"
    );
    let started = Instant::now();
    let mut copy_api = api.clone();
    tower::ServiceExt::<Request<Full<Bytes>>>::ready(&mut copy_api)
        .await
        .unwrap();
    // A bodiless request is checked inside `call`, at the clock's time (still in the window);
    // the nonce's write is sent once the future is polled, and Redis answers it only after the
    // pause. The clock the layer reads when the answer arrives is the time of that answer:
    // the window has closed by then. (The layer reads its clock nowhere in between, so setting
    // it before the first poll is the same as setting it while the write waits.)
    let copy = copy_api.call(captured());
    clock.set(REPLAY_UNTIL + 2);
    let copy = copy.await.unwrap();
    let waited = started.elapsed();
    let status = copy.status();
    let body = copy.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);

    // It was once accepted (200: the handler ran twice for one signed request).
    assert_eq!(
        (status, body.as_ref(), calls.load(Ordering::SeqCst)),
        (StatusCode::UNAUTHORIZED, r#"{"error":"expired"}"#, 1),
        "the copy answered after {waited:?}"
    );
    // The answer did wait for the pause (the first copy's key had expired by then).
    assert!(waited >= Duration::from_millis(2000), "waited {waited:?}");
}

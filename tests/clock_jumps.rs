//! Wall-clock jumps (NTP steps, VM resume, an operator fixing the date) against the replay
//! property, the time checks' boundaries, sessions and login throttling. The verify layer and
//! the stores take their time from a [`ManualClock`] driven by hand here.
//!
//! Run: `cargo test --all-features --test clock_jumps` (the Redis replay cache's tests start
//! their own `redis-server`, and fail without one).

#![cfg(feature = "proxy")]
mod support;
mod support_logs;
#[cfg(feature = "redis")]
mod support_redis;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::layer::VerifyLayer;
use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::session::{MemorySessionStore, SessionStore, SessionTimeouts};
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::replay::{MemoryReplayCache, ReplayCache, ReplayOutcome};
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Reason, Secret, Signer, SignerConfig, Verifier,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tower::{Layer as _, Service as _, ServiceExt};

/// 2023-11-14T22:13:20Z.
const T: u64 = 1_700_000_000;
/// The default policy's window and skew.
const WINDOW: u64 = 10;
const SKEW: u64 = 2;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![7; 32]).unwrap())
        .unwrap()
        .into()
}

/// The headers of a bodiless GET signed at `created` (the proxy's clock) with a fresh nonce:
/// a capture an attacker can send again, byte for byte.
fn signed_at(created: u64) -> HeaderMap {
    let (mut parts, ()) = Request::builder()
        .method(Method::GET)
        .uri("http://api.test/orders")
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, b"", None, created, &Nonce::random())
        .unwrap();
    parts.headers
}

/// A verify layer in front of an always-200 handler, on `clock` and `cache`.
struct Api {
    clock: ManualClock,
    cache: Arc<MemoryReplayCache>,
    layer: VerifyLayer,
}

impl Api {
    fn new(now: u64) -> Self {
        Self::on(now, Arc::new(MemoryReplayCache::new(10_000)))
    }

    /// The same on a cache of the test's choosing (one shard: every nonce shares its clock).
    fn on(now: u64, cache: Arc<MemoryReplayCache>) -> Self {
        let clock = ManualClock::new(now);
        let layer = verify_layer(&clock, cache.clone());
        Api {
            clock,
            cache,
            layer,
        }
    }

    /// Sends the captured request; the status and the reason code (empty when accepted).
    async fn send(&self, headers: &HeaderMap) -> (StatusCode, String) {
        send(&self.layer, headers).await
    }
}

/// The default policy's verify layer on `clock` and `replay`.
fn verify_layer(clock: &ManualClock, replay: Arc<dyn ReplayCache>) -> VerifyLayer {
    let shared: SharedClock = Arc::new(clock.clone());
    VerifyLayer::new(Verifier::new(keyring(), Policy::default()), replay).clock(shared)
}

/// Sends the captured request through `layer`; the status and the reason code (empty when
/// accepted).
async fn send(layer: &VerifyLayer, headers: &HeaderMap) -> (StatusCode, String) {
    let mut service = layer.layer(tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = "http://api.test/orders".parse().unwrap();
    *request.headers_mut() = headers.clone();
    let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut service)
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let reason = if status == StatusCode::OK {
        String::new()
    } else {
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        json["error"].as_str().unwrap_or_default().to_owned()
    };
    (status, reason)
}

// ---------------------------------------------------------------------------------------------
// Replay across jumps (memory replay cache)
// ---------------------------------------------------------------------------------------------

/// A forward step (+1 h) lets the cache count out every entry; when the clock is stepped back,
/// a request captured before the jump has its `created` within the window again. It must not
/// be accepted a second time. (Before the fix it was: the shard's clock stayed an hour ahead,
/// so the nonce's slot looked expired and the capture was recorded afresh.)
#[tokio::test]
async fn capture_is_not_accepted_again_after_a_forward_then_backward_step() {
    let api = Api::new(T);
    let capture = signed_at(T);
    assert_eq!(api.send(&capture).await, (StatusCode::OK, String::new()));

    // +1 h: the proxy's clock stepped too, so traffic goes on and reaches every shard.
    api.clock.set(T + 3600);
    for _ in 0..16 {
        assert_eq!(api.send(&signed_at(T + 3600)).await.0, StatusCode::OK);
    }
    // Traffic touches every shard sooner or later; make it sooner (64 shards, random nonces).
    api.cache.purge_expired(T + 3600);
    assert_eq!(api.cache.len(), 16);
    // Stepped back to (nearly) where it was: the capture is within the window again.
    api.clock.set(T + 5);
    let (status, reason) = api.send(&capture).await;
    assert_ne!(
        status,
        StatusCode::OK,
        "replay accepted after the clock stepped back"
    );
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "replay_cache_unavailable")
    );
}

/// Without any forward jump: a nonce counted out in the normal course of time becomes
/// acceptable again when the clock steps back more than the signature's age. Refused too.
#[tokio::test]
async fn purged_nonce_is_not_accepted_again_after_a_backward_step() {
    let api = Api::new(T);
    let capture = signed_at(T);
    assert_eq!(api.send(&capture).await.0, StatusCode::OK);
    // Time passes; the entry expires (at T + 13) and later traffic counts it out everywhere.
    api.clock.set(T + 30);
    api.cache.purge_expired(T + 30);
    assert_eq!(api.cache.len(), 0);
    // A 25-second step back: the capture's `created` is again within [now - 12, now + 2].
    api.clock.set(T + 5);
    assert_eq!(
        api.send(&capture).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "replay_cache_unavailable".to_owned()
        )
    );
}

/// The refusal lasts only while the clock is behind what the cache saw: fresh requests signed
/// after a small step still pass (their expiry is beyond anything forgotten), and once the
/// clock is past the cache's again everything flows; captures from before the step stay
/// refused or replayed, never accepted twice.
#[tokio::test]
async fn after_a_backward_step_fresh_requests_flow_and_captures_stay_refused() {
    let api = Api::new(T);
    let captures: Vec<HeaderMap> = (0..5).map(|i| signed_at(T + i)).collect();
    for (i, capture) in captures.iter().enumerate() {
        api.clock.set(T + i as u64);
        assert_eq!(api.send(capture).await.0, StatusCode::OK);
    }
    // A 3-second NTP step back at T + 4 (both hosts).
    api.clock.set(T + 1);
    let fresh = signed_at(T + 1);
    assert_eq!(api.send(&fresh).await.0, StatusCode::OK);
    assert_eq!(api.send(&fresh).await.1, "replayed");
    for capture in &captures[..4] {
        assert_eq!(api.send(capture).await.1, "replayed");
    }
    // Signed at T + 4, the last one is from the future of the stepped-back clock.
    assert_eq!(api.send(&captures[4]).await.1, "not_yet_valid");
    // Later, every capture of the whole sequence, at every second until it expires.
    for now in T + 1..T + 40 {
        api.clock.set(now);
        for capture in captures.iter().chain([&fresh]) {
            assert_ne!(api.send(capture).await.0, StatusCode::OK, "at {now}");
        }
    }
}

/// A large step back (an operator correcting a date an hour ahead, on every host): requests
/// whose expiry the cache already passed (in their shard) are refused, 503, until the clock
/// catches up; then service resumes by itself. This is the cost of failing closed; docs/OPERATIONS.md says so.
#[tokio::test]
async fn after_a_large_backward_step_service_resumes_once_the_clock_catches_up() {
    let api = Api::new(T + 3600);
    assert_eq!(api.send(&signed_at(T + 3600)).await.0, StatusCode::OK);
    // Every shard has seen T + 3600 (traffic gets there; this gets there at once).
    api.cache.purge_expired(T + 3600);
    api.clock.set(T);
    assert_eq!(
        api.send(&signed_at(T)).await.1,
        "replay_cache_unavailable",
        "the cache cannot vouch for nonces expiring before T + 3600"
    );
    // A signature whose expiry (created + 13) is past what the cache saw is fine again.
    api.clock.set(T + 3600 - 12);
    assert_eq!(api.send(&signed_at(T + 3600 - 12)).await.0, StatusCode::OK);
}

/// docs/OPERATIONS.md, Clocks: "a step of up to N s with the defaults refuses nothing signed
/// after it". Checked at N itself (every shard has seen the time before the step, so nothing
/// is left to chance): a request signed right after a step back of N seconds is accepted; one
/// second more and the first second after the step is refused (503), as the same paragraph's
/// "D seconds minus the window and skew" says. The claim read 13 s, where 13 already refuses
/// the requests signed in the first second after the step (their expiry, created + 13, is the
/// second the cache last saw).
#[tokio::test]
async fn the_documented_backward_step_that_refuses_nothing_refuses_nothing() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let claim = "a step of up to ";
    let at = doc
        .find(claim)
        .expect("OPERATIONS.md states the step that refuses nothing");
    let rest = &doc[at + claim.len()..];
    assert!(
        rest.contains(" s with the defaults refuses nothing signed after it"),
        "{rest:.80}"
    );
    let step: u64 = rest.split(' ').next().unwrap().parse().unwrap();
    for (step, accepted) in [(step, true), (step + 1, false)] {
        let api = Api::new(T);
        assert_eq!(api.send(&signed_at(T)).await.0, StatusCode::OK);
        api.cache.purge_expired(T);
        api.clock.set(T - step);
        let (status, reason) = api.send(&signed_at(T - step)).await;
        if accepted {
            assert_eq!(
                (status, reason.as_str()),
                (StatusCode::OK, ""),
                "signed right after a step back of {step} s"
            );
        } else {
            assert_eq!(
                (status, reason.as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "replay_cache_unavailable"),
                "signed right after a step back of {step} s"
            );
        }
    }
}

/// A forward step alone loses nothing: captured requests are expired by the new time.
#[tokio::test]
async fn forward_step_alone_leaves_captures_expired() {
    let api = Api::new(T);
    let capture = signed_at(T);
    assert_eq!(api.send(&capture).await.0, StatusCode::OK);
    api.clock.set(T + 3600);
    assert_eq!(api.send(&capture).await.1, "expired");
}

/// The memory cache itself, at the call level: a caller whose clock went back asking about a
/// nonce whose expiry second the cache passed gets an error, never `Fresh`; one that sees the
/// expiry as passed itself is still recorded for the current second (the documented contract).
#[test]
fn memory_cache_refuses_nonces_it_may_have_forgotten() {
    let cache = MemoryReplayCache::with_shards(100, 1);
    assert_eq!(
        cache.check_and_record_now("captured-nonce", T + 13, T),
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(cache.purge_expired(T + 3600), 1);
    let refused = cache.check_and_record_now("captured-nonce", T + 13, T + 1);
    assert!(refused.is_err(), "{refused:?}");
    assert!(refused.unwrap_err().detail().contains("clock went back"));
    // Expiry beyond the cache's clock: an exact answer, as before.
    assert_eq!(
        cache.check_and_record_now("later-nonce", T + 3601, T + 1),
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record_now("later-nonce", T + 3601, T + 1),
        Ok(ReplayOutcome::Replayed)
    );
    // An expiry the caller itself sees as passed: kept for the current second.
    assert_eq!(
        cache.check_and_record_now("stale", T + 3000, T + 3600),
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record_now("stale", T + 3000, T + 3600),
        Ok(ReplayOutcome::Replayed)
    );
}

/// A request checked in the last second of its window just after a request of the next second
/// was recorded in its shard: under load another thread reads the clock a moment later, sees
/// the next second, and takes the shard's lock first. No clock moved, but the shard's clock is
/// now the second the first request's window closes at. Here the two reads come in sequence (the
/// first request read at T + 13, the second at T + 12) on a cache of one shard, so they share
/// it. The request cannot be vouched for and is refused, but as what it is: `401 expired` (its
/// window has closed by the time it is answered), not `503 replay_cache_unavailable` with a
/// warning that the clock went back. A clock really behind the shard's by more than that second
/// is still refused 503 with the warning.
#[tokio::test]
async fn a_last_second_request_after_one_of_the_next_second_is_expired_not_a_clock_step() {
    let (logs, _guard) = support_logs::capture();
    let api = Api::on(T + 13, Arc::new(MemoryReplayCache::with_shards(100, 1)));
    // Signed at T: its window closes at T + 13, T + 12 is its last second.
    let last_second = signed_at(T);
    assert_eq!(api.send(&signed_at(T + 13)).await.0, StatusCode::OK);
    api.clock.set(T + 12);
    assert_eq!(
        api.send(&last_second).await,
        (StatusCode::UNAUTHORIZED, "expired".to_owned())
    );
    assert!(
        !logs.text().contains("clock went back"),
        "a false clock warning: {}",
        logs.text()
    );
    // Two seconds behind the shard's clock: a step back, refused as one.
    api.clock.set(T + 11);
    assert_eq!(
        api.send(&signed_at(T - 1)).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "replay_cache_unavailable".to_owned()
        )
    );
    assert!(
        logs.text().contains("the clock went back"),
        "{}",
        logs.text()
    );
}

/// The same at the call level: the caller's `now` one second behind the shard's clock, and
/// the nonce's expiry that second, is an `expired` error (nothing recorded); a `now` further
/// behind is the clock going back.
#[test]
fn memory_cache_answers_a_nonce_expiring_at_its_clock_one_second_behind_as_expired() {
    let cache = MemoryReplayCache::with_shards(100, 1);
    assert_eq!(
        cache.check_and_record_now("next-second", T + 26, T + 13),
        Ok(ReplayOutcome::Fresh)
    );
    let Err(expired) = cache.check_and_record_now("last-second", T + 13, T + 12) else {
        panic!("a nonce whose expiry the cache saw was recorded");
    };
    assert_eq!(expired.reason(), Reason::Expired, "{expired}");
    assert!(!expired.detail().contains("clock went back"), "{expired}");
    assert_eq!(cache.len(), 1);
    for (expires_at, now) in [(T + 13, T + 11), (T + 12, T + 11), (T + 2, T)] {
        let Err(refused) = cache.check_and_record_now("stepped-back", expires_at, now) else {
            panic!("a nonce whose expiry the cache saw was recorded");
        };
        assert_eq!(
            refused.reason(),
            Reason::ReplayCacheUnavailable,
            "{refused}"
        );
        assert!(
            refused.detail().contains("the clock went back"),
            "{refused}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Replay across jumps (Redis replay cache, against a real redis-server)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "redis")]
mod redis_cache {
    use std::time::{Duration, Instant};

    use countersign::replay::{
        RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
    };

    use super::support_redis::RedisServer;
    use super::{send, signed_at, support_logs, verify_layer, T};
    use super::{Arc, ManualClock, Reason, StatusCode};

    fn cache(server: &RedisServer, prefix: &str) -> RedisReplayCache {
        let options = RedisOptions {
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(1000),
            ping_timeout: Duration::from_millis(250),
        };
        let connection = RedisConnection::with_options(&server.url(), options).unwrap();
        RedisReplayCache::new(connection, prefix)
    }

    /// Waits until Redis has expired `key` on its own (its TTL counts down in Redis' time,
    /// whatever the caller's clock does).
    fn wait_until_redis_expired(server: &RedisServer, key: &str) {
        let started = Instant::now();
        while server.cli(&["EXISTS", key]) != "0" {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "redis did not expire {key}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Redis counterpart of `capture_is_not_accepted_again_after_a_forward_then_backward_step`:
    /// a nonce recorded at T with a one-second validity (a two-second TTL), traffic after a forward step, Redis expires
    /// the key on schedule, the clock steps back: the capture is acceptable again by its times,
    /// and Redis no longer holds its key. It must be refused, not recorded as new. (Before the
    /// fix it was `Fresh`: accepted a second time.) The mark is shared by clones, as the layers
    /// and threads of one API process share the cache.
    #[tokio::test]
    async fn redis_cache_refuses_a_nonce_it_expired_before_a_backward_step() {
        let server = RedisServer::start();
        let api = cache(&server, "jump:");
        let other_layer = api.clone();
        assert_eq!(
            api.check_and_record("captured", T + 1, T).await,
            Ok(ReplayOutcome::Fresh)
        );
        // +1 h, with traffic through another clone of the cache.
        assert_eq!(
            other_layer
                .check_and_record("after-the-jump", T + 3600 + 13, T + 3600)
                .await,
            Ok(ReplayOutcome::Fresh)
        );
        wait_until_redis_expired(&server, "jump:captured");
        // Stepped back to T: "captured" expires at T + 1, after the caller's now.
        let refused = api.check_and_record("captured", T + 1, T).await;
        assert!(
            refused.is_err(),
            "a nonce Redis already expired was accepted again after the clock stepped back: \
             {refused:?}"
        );
        let detail = refused.unwrap_err().detail().to_owned();
        assert!(detail.contains("clock went back"), "{detail}");
        assert!(detail.contains("docs/OPERATIONS.md, Clocks"), "{detail}");
        // Refused again, by every clone, and nothing was written for it.
        assert!(other_layer
            .check_and_record("captured", T + 1, T)
            .await
            .is_err());
        assert_eq!(server.cli(&["EXISTS", "jump:captured"]), "0");
        // An expiry the caller itself sees as passed is not a clock step: kept for a second (and
        // the extra one), as before (the verifier refuses such a signature long before it gets here).
        assert_eq!(
            api.check_and_record("stale", T + 3000, T + 3600).await,
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            api.check_and_record("stale", T + 3000, T + 3600).await,
            Ok(ReplayOutcome::Replayed)
        );
    }

    /// The Redis counterpart of
    /// `a_last_second_request_after_one_of_the_next_second_is_expired_not_a_clock_step`: the
    /// mark is one per process, so any request of the next second recorded first (here through
    /// another layer on a clone of the cache) makes a request in the last second of its window
    /// a refusal. It is `401 expired`, not `503 replay_cache_unavailable` with a warning that the
    /// clock went back; nothing is written for it. Two seconds behind the mark is a step back.
    #[tokio::test]
    async fn redis_cache_a_last_second_request_after_one_of_the_next_second_is_expired() {
        let server = RedisServer::start();
        let (logs, _guard) = support_logs::capture();
        let cache = cache(&server, "edge:");
        let clock = ManualClock::new(T + 13);
        let layer = verify_layer(&clock, Arc::new(cache.clone()));
        let other_layer = verify_layer(&clock, Arc::new(cache.clone()));
        // Signed at T: its window closes at T + 13, T + 12 is its last second.
        let last_second = signed_at(T);
        assert_eq!(
            send(&other_layer, &signed_at(T + 13)).await.0,
            StatusCode::OK
        );
        clock.set(T + 12);
        assert_eq!(
            send(&layer, &last_second).await,
            (StatusCode::UNAUTHORIZED, "expired".to_owned())
        );
        assert!(
            !logs.text().contains("clock went back"),
            "a false clock warning: {}",
            logs.text()
        );
        assert_eq!(server.cli(&["DBSIZE"]), "1");
        // The call itself: an `expired` error, before Redis is asked.
        let Err(expired) = cache.check_and_record("last-second", T + 13, T + 12).await else {
            panic!("a nonce whose expiry the mark passed was recorded");
        };
        assert_eq!(expired.reason(), Reason::Expired, "{expired}");
        assert!(!expired.detail().contains("clock went back"), "{expired}");
        assert_eq!(server.cli(&["EXISTS", "edge:last-second"]), "0");
        // Two seconds behind the mark: a step back, refused as one.
        clock.set(T + 11);
        assert_eq!(
            send(&layer, &signed_at(T - 1)).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "replay_cache_unavailable".to_owned()
            )
        );
        assert!(
            logs.text().contains("the clock went back"),
            "{}",
            logs.text()
        );
        let Err(refused) = cache.check_and_record("stepped-back", T + 12, T + 11).await else {
            panic!("a nonce whose expiry the mark passed was recorded");
        };
        assert_eq!(
            refused.reason(),
            Reason::ReplayCacheUnavailable,
            "{refused}"
        );
        assert_eq!(server.cli(&["DBSIZE"]), "1");
    }

    /// A small step back (3 s at T + 4): fresh nonces, whose expiry is beyond anything the cache
    /// saw, are recorded and replays of them caught; captures from before the step are still
    /// held by Redis and answered `Replayed`. Only what may have been forgotten is refused, and
    /// once the clock passes the mark again (a large step back: T + 3600 to T), everything
    /// flows again.
    #[tokio::test]
    async fn redis_cache_after_a_backward_step_fresh_nonces_flow_and_service_resumes() {
        let server = RedisServer::start();
        let api = cache(&server, "small-step:");
        for i in 0..5 {
            let nonce = format!("capture-{i}");
            assert_eq!(
                api.check_and_record(&nonce, T + i + 13, T + i).await,
                Ok(ReplayOutcome::Fresh)
            );
        }
        // 3 s back.
        assert_eq!(
            api.check_and_record("fresh", T + 1 + 13, T + 1).await,
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            api.check_and_record("fresh", T + 1 + 13, T + 1).await,
            Ok(ReplayOutcome::Replayed)
        );
        for i in 0..5 {
            let nonce = format!("capture-{i}");
            assert_eq!(
                api.check_and_record(&nonce, T + i + 13, T + 1).await,
                Ok(ReplayOutcome::Replayed)
            );
        }

        // A large step: an hour ahead, then corrected back to T. Nonces expiring within the
        // hour the cache saw are refused; service resumes as the clock catches up.
        let ahead = T + 3600;
        assert_eq!(
            api.check_and_record("ahead", ahead + 13, ahead).await,
            Ok(ReplayOutcome::Fresh)
        );
        assert!(api.check_and_record("back", T + 13, T).await.is_err());
        assert!(api
            .check_and_record("still-behind", ahead, ahead - 13)
            .await
            .is_err());
        assert_eq!(
            api.check_and_record("caught-up", ahead + 1, ahead - 12)
                .await,
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            api.check_and_record("past-the-mark", ahead + 14, ahead + 1)
                .await,
            Ok(ReplayOutcome::Fresh)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The time checks' boundaries (a skewed API clock: which reason, exactly where)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn created_boundaries_name_the_direction_of_the_skew() {
    let api = Api::new(T);
    // Oldest accepted: now - window - skew; one second older is expired.
    assert_eq!(
        api.send(&signed_at(T - WINDOW - SKEW)).await,
        (StatusCode::OK, String::new())
    );
    assert_eq!(
        api.send(&signed_at(T - WINDOW - SKEW - 1)).await,
        (StatusCode::UNAUTHORIZED, "expired".to_owned())
    );
    // Newest accepted: now + skew; one second later is not yet valid.
    assert_eq!(
        api.send(&signed_at(T + SKEW)).await,
        (StatusCode::OK, String::new())
    );
    assert_eq!(
        api.send(&signed_at(T + SKEW + 1)).await,
        (StatusCode::UNAUTHORIZED, "not_yet_valid".to_owned())
    );
    // An API clock an hour ahead of the proxy: expired; an hour behind: not yet valid.
    assert_eq!(api.send(&signed_at(T - 3600)).await.1, "expired");
    assert_eq!(api.send(&signed_at(T + 3600)).await.1, "not_yet_valid");
}

/// `created` at the ends of the integer range: refused with the right reason, nothing
/// recorded, no overflow (the replay expiry saturates rather than wraps).
#[tokio::test]
async fn created_far_in_the_past_or_future_is_refused_cleanly() {
    let api = Api::new(T);
    assert_eq!(api.send(&signed_at(0)).await.1, "expired");
    assert_eq!(
        api.send(&signed_at(999_999_999_999_989)).await.1,
        "not_yet_valid"
    );
    assert_eq!(api.cache.len(), 0);
    // An API clock beyond 2106 (the memory cache's 32-bit seconds): refused, not forgotten.
    let late = u64::from(u32::MAX) + 100;
    api.clock.set(late);
    let capture = signed_at(late);
    for _ in 0..2 {
        assert_eq!(api.send(&capture).await.1, "replay_cache_unavailable");
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions and login throttling (wall clock, passed in as `now`)
// ---------------------------------------------------------------------------------------------

fn sessions() -> MemorySessionStore {
    MemorySessionStore::new(
        SessionTimeouts {
            idle: Duration::from_secs(1800),
            absolute: Duration::from_secs(12 * 3600),
        },
        100,
    )
}

/// Session times are wall-clock seconds. A backward step of D keeps a session alive at most D
/// longer in real time (its absolute expiry is a fixed wall-clock second, and touching it
/// with an earlier clock never moves `last_seen` back); a forward step ends sessions early.
#[tokio::test]
async fn backward_step_extends_a_session_by_at_most_the_step() {
    let store = sessions();
    let identity = Identity::new("alice", ["user"]);
    let (id, session) = store.create(&identity, T).await.unwrap();
    let absolute_end = session.absolute_expires_at;
    assert_eq!(absolute_end, T + 12 * 3600);

    // Used until just before its end, then the clock steps back an hour, and use goes on.
    let mut now = T;
    while now + 1000 < absolute_end {
        now += 1000;
        assert!(store.get(&id, now, true).await.unwrap().is_some());
    }
    let step = 3600;
    let stepped = now - step;
    let touched = store.get(&id, stepped, true).await.unwrap().unwrap();
    // The touch under the earlier clock did not move last_seen back nor the end out.
    assert_eq!(touched.last_seen, now);
    assert_eq!(touched.absolute_expires_at, absolute_end);
    // Real time passes; the wall clock is `step` behind. The session ends when the wall clock
    // reaches its absolute end: `step` seconds of real time later than without the jump.
    let mut wall = stepped;
    while store.get(&id, wall, true).await.unwrap().is_some() {
        wall += 100;
    }
    assert!(wall >= absolute_end && wall < absolute_end + 100, "{wall}");

    // A forward step ends a session early (acceptable: the user logs in again).
    let (short, _) = store.create(&identity, T).await.unwrap();
    assert!(store.get(&short, T + 1, true).await.unwrap().is_some());
    assert!(store
        .get(&short, T + 1 + 1800, false)
        .await
        .unwrap()
        .is_none());
}

/// A backward step must not reset a throttle window (which would give a guesser a new batch
/// of attempts): the window started at a later second stays in force, and it even lasts
/// longer in real time. A forward step ends windows early: at most one more batch per step.
#[tokio::test]
async fn backward_step_does_not_reset_login_throttle_windows() {
    let config = ThrottleConfig {
        max_failures_per_ip: 20,
        max_failures_per_user: 5,
        window: Duration::from_secs(900),
        max_tracked_keys: 1000,
    };
    let throttle = MemoryLoginThrottle::new(config, 1000);
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    for _ in 0..5 {
        assert_eq!(throttle.admit(ip, "alice", T).await.unwrap(), None);
    }
    assert!(throttle.admit(ip, "alice", T).await.unwrap().is_some());
    // One hour back: still throttled, the wait counted to the window's end.
    let stepped = T - 3600;
    let wait = throttle.admit(ip, "alice", stepped).await.unwrap();
    assert_eq!(wait, Some(3600 + 900));
    assert!(throttle
        .check(ip, "alice", stepped)
        .await
        .unwrap()
        .is_some());
    // Failures recorded under the earlier clock still count in the same window.
    throttle.record_failure(ip, "bob", stepped).await.unwrap();
    assert!(throttle
        .admit(ip, "alice", T + 899)
        .await
        .unwrap()
        .is_some());
    assert_eq!(throttle.admit(ip, "alice", T + 900).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// The proxy: a session that ends while a request's body arrives
// ---------------------------------------------------------------------------------------------

mod slow_body {
    use std::time::Duration;

    use http::StatusCode;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::support::{get, Harness, Login, ABSOLUTE, ALICE_PASSWORD, IDLE, ORIGIN, T0};

    /// The JSON body the tests send, in two pieces.
    const FIRST: &str = r#"{"order":"#;
    const REST: &str = r#""late"}"#;

    /// How long a test waits for any one answer from the proxy.
    const ANSWER_LIMIT: Duration = Duration::from_secs(10);

    /// The answer to a POST to `/api/orders` whose body arrives in two pieces, with the
    /// manual clock set to `jump_to` in between: the status and the whole answer as text.
    ///
    /// Deterministic, not timed: the request asks `Expect: 100-continue`, and hyper answers
    /// `100 Continue` only when the proxy first reads the body, which it does after the
    /// session check and the CSRF check (steps ii, iii of `proxy_request`). So once the
    /// `100` is here, the session was found live at the old time, and the proxy is waiting
    /// for the body: the first piece is sent, the clock jumps, then the rest.
    async fn post_with_a_jump_mid_body(h: &Harness, login: &Login, jump_to: u64) -> String {
        let mut stream = TcpStream::connect(h.addr).await.expect("connect");
        let head = format!(
            "POST /api/orders HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nX-CSRF-Token: {}\r\n\
             Origin: {ORIGIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n",
            login.cookie,
            login.csrf,
            FIRST.len() + REST.len(),
        );
        stream.write_all(head.as_bytes()).await.expect("head sent");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let continued = tokio::time::timeout(ANSWER_LIMIT, async {
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before 100 Continue");
                answer.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(continued.is_ok(), "no 100 Continue");
        let interim = String::from_utf8_lossy(&answer).into_owned();
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "the session check already refused the request: {interim}"
        );
        stream
            .write_all(FIRST.as_bytes())
            .await
            .expect("first piece");
        stream.flush().await.expect("flush");
        h.clock.set(jump_to);
        stream.write_all(REST.as_bytes()).await.expect("rest");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(ANSWER_LIMIT, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "no answer within {ANSWER_LIMIT:?}");
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// The status line's code and the JSON `error` of an answer read off the wire.
    fn status_and_reason(answer: &str) -> (u16, String) {
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {answer}"));
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let reason = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|json| json["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, reason)
    }

    /// A session kept in use (so its idle timer never runs out) until a second before its
    /// absolute end; a POST starts then, and the end passes while its body arrives. The
    /// proxy re-checks the session once it has the body (step iv): that check must be made
    /// at the time it runs, so the request is refused, 401 `unauthenticated`, and nothing
    /// reaches the upstream. (Before the fix the re-check used the time read when the request
    /// began, when the session was still live: the request went upstream, signed as alice
    /// with an ended session.)
    #[tokio::test]
    async fn session_reaching_its_absolute_end_while_the_body_arrives_is_not_forwarded() {
        let h = Harness::start().await;
        let login = h.login("alice", ALICE_PASSWORD).await;
        let absolute_end = T0 + ABSOLUTE.as_secs();
        // Used every 500 s (idle timeout 600 s) until a second before the end.
        let mut now = T0;
        while now + 500 < absolute_end - 1 {
            now += 500;
            h.clock.set(now);
            assert_eq!(
                get(h.addr, "/api/keepalive", &login).await.status,
                StatusCode::OK
            );
        }
        h.clock.set(absolute_end - 1);
        let seen_before = h.upstream.raw_count();

        let answer = post_with_a_jump_mid_body(&h, &login, absolute_end + 1).await;

        assert_eq!(
            status_and_reason(&answer),
            (401, "unauthenticated".to_owned()),
            "{answer}"
        );
        assert_eq!(
            h.upstream.raw_count(),
            seen_before,
            "a request whose session ended while its body arrived reached the upstream"
        );
        // And the session is over for good (the refused request did not extend it).
        assert_eq!(
            get(h.addr, "/api/after", &login).await.status,
            StatusCode::UNAUTHORIZED
        );
    }

    /// The same with the idle timeout: a session last used at T0 starts a POST a second
    /// before it goes idle, and goes idle while the body arrives.
    #[tokio::test]
    async fn session_going_idle_while_the_body_arrives_is_not_forwarded() {
        let h = Harness::start().await;
        let login = h.login("alice", ALICE_PASSWORD).await;
        let idle_end = T0 + IDLE.as_secs();
        h.clock.set(idle_end - 1);
        let seen_before = h.upstream.raw_count();

        let answer = post_with_a_jump_mid_body(&h, &login, idle_end + 1).await;

        assert_eq!(
            status_and_reason(&answer),
            (401, "unauthenticated".to_owned()),
            "{answer}"
        );
        assert_eq!(h.upstream.raw_count(), seen_before);
    }

    /// A live session's slow body: the request is forwarded, signed at the time it is sent
    /// (its `created` is the clock after the body, not when the request began). Dated from
    /// the start, a body that took longer than the verifier's window (10 s + 2 s skew) would
    /// reach the upstream already expired.
    #[tokio::test]
    async fn a_slow_body_is_signed_at_the_time_it_is_sent() {
        let h = Harness::start().await;
        let login = h.login("alice", ALICE_PASSWORD).await;
        let sent_at = T0 + 30;

        let answer = post_with_a_jump_mid_body(&h, &login, sent_at).await;

        assert_eq!(status_and_reason(&answer).0, 200, "{answer}");
        let raw = h.upstream.last_raw();
        let input = raw
            .headers
            .get("signature-input")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            input.contains(&format!(";created={sent_at};")),
            "signed at the request's start, not when sent: {input}"
        );
        let verified = h.upstream.last_verified();
        assert_eq!(verified.uri, "/api/orders");
        assert_eq!(verified.body, format!("{FIRST}{REST}"));
    }
}

//! Adversarial review of the verify layer (src/layer/verify.rs, response.rs, axum.rs) and the
//! in-memory replay cache: each test pins a defect found in the review (or a property checked
//! sound along the way), driving the real `VerifyLayer` through tower's `oneshot` or a real
//! hyper server on 127.0.0.1:0.
//!
//! Run: `cargo test --all-features --test layer_review`

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::{MemoryReplayCache, ReplayCache};
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::mpsc;
use tower::{Layer as _, ServiceExt as _};

const NOW: u64 = 1_700_000_000;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![9; 32]).unwrap())
        .unwrap()
        .into()
}

/// A body whose frames arrive through a channel: pending until the test sends them.
struct Channel(mpsc::UnboundedReceiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// An inner service that counts its calls and echoes the user it was handed.
#[derive(Clone, Default)]
struct Handler {
    calls: Arc<AtomicUsize>,
}

impl tower::Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let user = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|identity| identity.user.clone())
            .unwrap_or_default();
        std::future::ready(Ok(Response::new(Full::new(Bytes::copy_from_slice(
            user.as_bytes(),
        )))))
    }
}

async fn text<B>(response: Response<B>) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The head of a POST of `body`, signed at `created` by a signer whose window is `window`.
fn signed_parts(body: &[u8], created: u64, window: Duration) -> http::request::Parts {
    let (mut parts, ()) = Request::post("http://api.test/transfer")
        .body(())
        .unwrap()
        .into_parts();
    let config = SignerConfig {
        window,
        ..SignerConfig::default()
    };
    Signer::new(keyring(), config)
        .sign(
            &mut parts,
            body,
            Some(&Identity::new("alice", ["user"])),
            created,
            &Nonce::random(),
        )
        .unwrap();
    parts
}

/// A `VerifyLayer` with the default policy over a [`Handler`], on a manual clock at `NOW` and
/// a memory replay cache of 100 entries: the clock, the cache, the handler and the service.
fn verifying_service() -> (
    ManualClock,
    Arc<MemoryReplayCache>,
    Handler,
    countersign::layer::VerifyService<Handler>,
) {
    let clock = ManualClock::new(NOW);
    let cache = Arc::new(MemoryReplayCache::new(100));
    let handler = Handler::default();
    let service = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        cache.clone() as Arc<dyn ReplayCache>,
    )
    .clock(Arc::new(clock.clone()))
    .layer(handler.clone());
    (clock, cache, handler, service)
}

/// A signer may date its signature's end before the verifier's window closes (`expires =
/// created + 3` here, against the verifier's 10 s + 2 s skew). The headers are checked when they
/// arrive and then pass; a body that completes after `expires` + skew must not be accepted,
/// since the same head arriving then would be refused `expired` (docs/PROTOCOL.md §6 step 6).
/// The layer re-checks `replay_until`, which was `created + window + skew + 1` whatever the
/// signer's `expires`, so the signer's own end was not enforced for a body that made the
/// request wait; it is now `min(created + window, expires) + skew + 1` (PROTOCOL.md §6 step 16).
#[tokio::test]
async fn a_body_completed_after_the_signers_expires_is_refused() {
    let (clock, _cache, handler, service) = verifying_service();

    let body = Bytes::from_static(b"{\"to\":\"bob\",\"cents\":100}");
    // The same head, checked at `created + 8`, is refused `expired` (expires + skew = +5).
    let parts = signed_parts(&body, NOW, Duration::from_secs(3));
    clock.set(NOW + 8);
    let request = Request::from_parts(parts.clone(), Full::new(body.clone()));
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(text(response).await, "{\"error\":\"expired\"}");

    // Checked at `created`, its body completing at `created + 8`.
    clock.set(NOW);
    let (sender, receiver) = mpsc::unbounded_channel();
    let request = Request::from_parts(parts, Channel(receiver));
    let pending = tokio::spawn(service.clone().oneshot(request));
    tokio::time::sleep(Duration::from_millis(50)).await;
    clock.set(NOW + 8);
    sender.send(body).unwrap();
    drop(sender);
    let response = pending.await.unwrap().unwrap();
    let status = response.status();
    assert_eq!(
        (status, text(response).await),
        (
            StatusCode::UNAUTHORIZED,
            "{\"error\":\"expired\"}".to_owned()
        )
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
}

/// The memory cache against a model, through growth, shrinking, slot reuse and probes past full
/// buckets: a nonce recorded until `e` is `replayed` at every `now < e` and `fresh` from `e` on,
/// whatever happened in the table meanwhile (no live entry is ever lost: a lost one would
/// re-open a replay). One shard, so every nonce shares one table.
#[test]
fn memory_cache_never_forgets_a_live_nonce() {
    use std::collections::HashMap;

    // A small deterministic generator (xorshift): reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    for shards in [1, 4] {
        let cache = MemoryReplayCache::with_shards(50_000, shards);
        let mut model: HashMap<String, u64> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut now = 1_000_000u64;
        for round in 0..400 {
            now += next(3);
            // Bursts (growth) and quiet rounds (shrinking after the burst expires).
            let inserts = if round % 50 < 5 { 600 } else { next(20) };
            for _ in 0..inserts {
                let name = format!("n{}", names.len());
                let expires = now + 1 + next(15);
                let outcome = cache.check_and_record_now(&name, expires, now).unwrap();
                assert_eq!(outcome, countersign::replay::ReplayOutcome::Fresh);
                model.insert(name.clone(), expires);
                names.push(name);
            }
            for _ in 0..200 {
                let name = &names[next(names.len() as u64) as usize];
                let expires = model[name];
                let outcome = cache.check_and_record_now(name, now + 5, now).unwrap();
                if now < expires {
                    assert_eq!(
                        outcome,
                        countersign::replay::ReplayOutcome::Replayed,
                        "{name} (until {expires}) forgotten at {now}, round {round}"
                    );
                } else {
                    assert_eq!(outcome, countersign::replay::ReplayOutcome::Fresh);
                    model.insert(name.clone(), now + 5);
                }
            }
        }
    }
}

/// A body sent in frames over HTTP/2, one after another, then trailers.
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn frames(body: &[u8], chunk: usize, trailers: bool) -> Frames {
    let mut frames: std::collections::VecDeque<Frame<Bytes>> = body
        .chunks(chunk)
        .map(|c| Frame::data(Bytes::copy_from_slice(c)))
        .collect();
    if trailers {
        let mut map = http::HeaderMap::new();
        map.insert("x-trailer", http::HeaderValue::from_static("1"));
        frames.push_back(Frame::trailers(map));
    }
    Frames(frames)
}

/// An HTTP/2 server (prior knowledge) on 127.0.0.1:0 behind `layer`, echoing the user and body
/// it was handed; returns its address and the handler's call count.
async fn serve_h2(layer: VerifyLayer) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = tower::ServiceBuilder::new().layer(layer).service_fn(
        move |request: Request<Full<Bytes>>| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let user = request
                    .extensions()
                    .get::<VerifiedIdentity>()
                    .and_then(|identity| identity.user.clone())
                    .unwrap_or_default();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let mut answer = user.as_bytes().to_vec();
                answer.push(b':');
                answer.extend_from_slice(&body);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (addr, calls)
}

/// Sends `request` over a fresh HTTP/2 connection: (status, body).
async fn send_h2(addr: std::net::SocketAddr, request: Request<Frames>) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (status, text(response).await)
}

/// Over HTTP/2, a body in several DATA frames followed by trailers is read whole (trailers
/// dropped) and accepted once; a copy is `replayed`; a body over the limit without a
/// `content-length` is 413 and burns no nonce, so the same signed request within the limit is
/// still accepted on a server with a larger limit sharing the cache.
#[tokio::test]
async fn http2_frames_trailers_and_limit() {
    let clock = ManualClock::new(NOW);
    let cache = Arc::new(MemoryReplayCache::new(100));
    let layer = |limit: usize| {
        VerifyLayer::new(
            Verifier::new(keyring(), Policy::default()),
            cache.clone() as Arc<dyn ReplayCache>,
        )
        .clock(Arc::new(clock.clone()))
        .body_limit(limit)
    };
    let (small, small_calls) = serve_h2(layer(16)).await;
    let (large, large_calls) = serve_h2(layer(1024)).await;
    let body = b"0123456789abcdefghij";

    let sign = |addr: std::net::SocketAddr| {
        let (mut parts, ()) = Request::post(format!("http://{addr}/h2"))
            .body(())
            .unwrap()
            .into_parts();
        parts.version = http::Version::HTTP_2;
        Signer::new(keyring(), SignerConfig::default())
            .sign(
                &mut parts,
                body,
                Some(&Identity::new("alice", ["user"])),
                NOW,
                &Nonce::new("h2-review-nonce-0123456789").unwrap(),
            )
            .unwrap();
        parts
    };
    // Over the small server's limit, no content-length: refused while reading, nothing kept.
    let parts = sign(small);
    let answer = send_h2(small, Request::from_parts(parts, frames(body, 3, true))).await;
    assert_eq!(answer, (413, "{\"error\":\"body_too_large\"}".to_owned()));
    assert_eq!((small_calls.load(Ordering::SeqCst), cache.len()), (0, 0));

    let parts = sign(large);
    let first = send_h2(
        large,
        Request::from_parts(parts.clone(), frames(body, 3, true)),
    )
    .await;
    assert_eq!(first, (200, "alice:0123456789abcdefghij".to_owned()));
    let again = send_h2(large, Request::from_parts(parts, frames(body, 7, false))).await;
    assert_eq!(again, (401, "{\"error\":\"replayed\"}".to_owned()));
    assert_eq!((large_calls.load(Ordering::SeqCst), cache.len()), (1, 1));
}

/// `ReplayCache::ready` is the cache's readiness for `/readyz`. A memory cache filled by a burst
/// answers not ready (right: it cannot record); once its entries have expired it must answer
/// ready again, even when no request has touched it since. It did not: it counted the expired
/// entries until the next record, and a `/readyz` wired to it takes the instance out of the
/// load balancer, so that next record never came and the instance stayed unready until a
/// restart (a whole fleet filled by the same burst, for good).
#[tokio::test]
async fn a_full_memory_cache_is_ready_again_once_its_entries_expire_without_traffic() {
    let cache = MemoryReplayCache::new(3);
    for i in 0..3 {
        let nonce = format!("burst-nonce-{i}-0123456789");
        // Signed at NOW - 10: kept until NOW + 3.
        let outcome = cache.check_and_record(&nonce, NOW + 3, NOW).await;
        assert_eq!(outcome, Ok(countersign::replay::ReplayOutcome::Fresh));
    }
    assert!(!cache.ready().await, "full: cannot record");
    // No request for three seconds: the three entries expired at NOW + 3.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert!(cache.ready().await, "entries expired, yet not ready");
    // Readiness changed nothing: the cache still records and refuses by the callers' clock.
    assert_eq!(cache.len(), 3);
    let outcome = cache.check_and_record("after-the-burst-0123456789", NOW + 15, NOW + 3);
    assert_eq!(outcome.await, Ok(countersign::replay::ReplayOutcome::Fresh));
}

/// A body limit in front of the layer (`tower_http::limit::RequestBodyLimitLayer`, or any
/// `http_body_util::Limited`) fails a chunked body past its limit with `LengthLimitError`. That
/// is a body too large, not a body that "cannot be read at all": the answer must be 413
/// `body_too_large` (as axum answers the same error), not 400 `body_read_failed`, whose
/// documented meaning is broken framing or a dropped connection (docs/PROTOCOL.md §7).
#[tokio::test]
async fn a_limit_in_front_of_the_layer_is_413_not_400() {
    let (_clock, cache, handler, service) = verifying_service();

    let body = b"0123456789abcdefghij";
    let parts = signed_parts(body, NOW, Duration::from_secs(10));
    // Chunked (no length announced), limited to 8 bytes in front of the layer.
    let limited = http_body_util::Limited::new(frames(body, 4, false), 8);
    let response = service
        .clone()
        .oneshot(Request::from_parts(parts.clone(), limited))
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        (status, text(response).await),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "{\"error\":\"body_too_large\"}".to_owned()
        )
    );
    assert_eq!((handler.calls.load(Ordering::SeqCst), cache.len()), (0, 0));
    // Within the outer limit the same signed request goes through (no nonce was burnt).
    let limited = http_body_util::Limited::new(frames(body, 4, false), 64);
    let response = service
        .oneshot(Request::from_parts(parts, limited))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Over HTTP/2 the signed `@authority` is `:authority`. A `host` field added beside it (h2
/// passes it on; axum-extra's `Host` extractor prefers it) naming another authority was
/// ignored by the verifier, so the handler could be steered to another virtual host or tenant
/// by a field no signature covers. Now refused `malformed_signature`, with no nonce kept and
/// the handler never called; the same authority spelled another way still passes.
#[tokio::test]
async fn an_http2_host_field_naming_another_authority_is_refused() {
    let clock = ManualClock::new(NOW);
    let cache = Arc::new(MemoryReplayCache::new(100));
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        cache.clone() as Arc<dyn ReplayCache>,
    )
    .clock(Arc::new(clock.clone()));
    let (addr, calls) = serve_h2(layer).await;
    let body = b"{}";
    let sign = |nonce: &str| {
        let (mut parts, ()) = Request::post("http://api.test/tenant/orders")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = http::Version::HTTP_2;
        Signer::new(keyring(), SignerConfig::default())
            .sign(
                &mut parts,
                body,
                Some(&Identity::new("alice", ["user"])),
                NOW,
                &Nonce::new(nonce).unwrap(),
            )
            .unwrap();
        parts
    };
    let mut parts = sign("h2-host-review-nonce-000001");
    parts
        .headers
        .insert(http::header::HOST, "admin.internal".parse().unwrap());
    let answer = send_h2(addr, Request::from_parts(parts, frames(body, 2, false))).await;
    assert_eq!(
        answer,
        (401, "{\"error\":\"malformed_signature\"}".to_owned())
    );
    assert_eq!((calls.load(Ordering::SeqCst), cache.len()), (0, 0));

    let mut parts = sign("h2-host-review-nonce-000002");
    parts
        .headers
        .insert(http::header::HOST, "API.test:80".parse().unwrap());
    let answer = send_h2(addr, Request::from_parts(parts, frames(body, 2, false))).await;
    assert_eq!(answer, (200, "alice:{}".to_owned()));
    assert_eq!((calls.load(Ordering::SeqCst), cache.len()), (1, 1));
}

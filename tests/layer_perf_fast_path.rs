//! The VerifyLayer's fast path, pinned: a bodiless request with a cache that answers at once
//! (`MemoryReplayCache`) is verified, recorded and handed to the inner service inside `call`
//! itself, with nothing left to wait for; a request with a body, or a cache that only answers
//! asynchronously, takes the waiting path. Performance is the reason (no boxed future, no await
//! per request on the common path), so these tests call the tower service directly, where the
//! order of `call` and `poll` can be observed; the loopback tests in `layer_verify.rs` cover the
//! same requests end to end.
//!
//! Run: `cargo test --all-features --test layer_perf_fast_path`

mod support_replay;

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use countersign::layer::{VerifiedIdentity, VerifyLayer, VerifyService};
use countersign::replay::{MemoryReplayCache, ReplayCache};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support_replay::AsyncOnlyCache;
use tower::{Layer as _, Service, ServiceExt};

const NOW: u64 = 1_700_000_000;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![7; 32]).unwrap())
        .unwrap()
        .into()
}

fn signed(method: Method, body: &'static [u8]) -> Request<Full<Bytes>> {
    let (mut parts, ()) = Request::builder()
        .method(method)
        .uri("http://api.test/items?x=1")
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(
            &mut parts,
            body,
            Some(&Identity::new("alice", ["user"])),
            NOW,
            &Nonce::random(),
        )
        .unwrap();
    Request::from_parts(parts, Full::new(Bytes::from_static(body)))
}

/// An inner service counting its calls (the moment the layer hands a request on).
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for Counting {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let user = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|id| id.user.as_ref().map(|user| user.to_string()))
            .unwrap_or_default();
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(user)))))
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

fn layer(cache: Arc<dyn ReplayCache>) -> VerifyLayer {
    VerifyLayer::new(Verifier::new(keyring(), Policy::default()), cache)
        .clock(Arc::new(ManualClock::new(NOW)))
}

async fn body_text<B>(response: Response<B>) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// `call` once the service is ready: the future, not yet polled (what `call` itself did is
/// observable before it is).
async fn call_when_ready<S, B>(service: &mut S, request: Request<B>) -> S::Future
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    ServiceExt::<Request<B>>::ready(service).await.unwrap();
    service.call(request)
}

/// One poll, with a waker that does nothing: whether the future had anything left to wait for.
fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let waker = Waker::from(Arc::new(NoopWake));
    future.poll(&mut Context::from_waker(&waker))
}

/// The same signed request twice (same nonce).
fn twice(request: Request<Full<Bytes>>) -> [Request<Full<Bytes>>; 2] {
    let copy = || {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        copy
    };
    [copy(), copy()]
}

#[tokio::test]
async fn bodiless_request_with_memory_cache_is_handed_on_inside_call() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let inner = Counting::default();
    let mut service = layer(cache.clone()).layer(inner.clone());
    let future = call_when_ready(&mut service, signed(Method::GET, b"")).await;
    // Verified, recorded and handed on before the future is polled at all.
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.len(), 1);
    // ...and the future is ready on its first poll.
    let mut future = pin!(future);
    let Poll::Ready(Ok(response)) = poll_once(future.as_mut()) else {
        panic!("the fast path left something to wait for");
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "alice");
}

#[tokio::test]
async fn a_rejection_needs_no_waiting() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let inner = Counting::default();
    let mut service = layer(cache.clone()).layer(inner.clone());
    let request = signed(Method::GET, b"");
    let (mut parts, body) = request.into_parts();
    parts.uri = "http://api.test/other".parse().unwrap();
    let future = call_when_ready(&mut service, Request::from_parts(parts, body)).await;
    let mut future = pin!(future);
    let Poll::Ready(Ok(response)) = poll_once(future.as_mut()) else {
        panic!("a rejection left something to wait for");
    };
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body_text(response).await, "{\"error\":\"bad_signature\"}");
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    assert!(cache.is_empty());
}

#[tokio::test]
async fn a_body_is_read_by_the_future_before_anything_is_recorded() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let inner = Counting::default();
    let mut service = layer(cache.clone()).layer(inner.clone());
    let future = call_when_ready(&mut service, signed(Method::POST, b"{\"n\":1}")).await;
    // Headers and MAC are checked in `call`; the body, digest and nonce wait for the future.
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    assert!(cache.is_empty());
    let response = future.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn an_asynchronous_cache_is_awaited_before_the_request_is_handed_on() {
    let cache = AsyncOnlyCache::new(false);
    let inner = Counting::default();
    let mut service = layer(cache.clone()).layer(inner.clone());
    let future = call_when_ready(&mut service, signed(Method::GET, b"")).await;
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    let response = future.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.memory.len(), 1);
    // The same request twice: the second is replayed, and never reaches the inner service.
    let [first, again] = twice(signed(Method::GET, b""));
    assert_eq!(
        call_when_ready(&mut service, first)
            .await
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let response = call_when_ready(&mut service, again).await.await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body_text(response).await, "{\"error\":\"replayed\"}");
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.memory.len(), 2);
}

/// A clock counting its readings, at a settable time.
#[derive(Debug, Default)]
struct CountingClock {
    now: std::sync::atomic::AtomicU64,
    readings: AtomicUsize,
}

impl countersign::clock::Clock for CountingClock {
    fn now_unix(&self) -> u64 {
        self.readings.fetch_add(1, Ordering::SeqCst);
        self.now.load(Ordering::SeqCst)
    }
}

/// A body that is not there at the first poll: its one chunk arrives when `arrived` is set.
struct LateBody {
    chunk: Option<Bytes>,
    arrived: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for LateBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if !self.arrived.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Poll::Ready(self.chunk.take().map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// The layer over `cache`, reading `clock`.
fn clocked_service(
    cache: &Arc<MemoryReplayCache>,
    clock: &Arc<CountingClock>,
) -> VerifyService<Counting> {
    VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        cache.clone() as Arc<dyn ReplayCache>,
    )
    .clock(clock.clone())
    .layer(Counting::default())
}

/// The clock is read once for a body that is already there (no time passed), and read again
/// after a body that made the request wait: the nonce is then recorded at the second reading
/// (here 12 s later, the last second of the window; a body later still is `expired`,
/// tests/layer_slow_body.rs).
#[tokio::test]
async fn the_clock_is_read_again_only_when_the_body_made_the_request_wait() {
    let clock = Arc::new(CountingClock::default());
    clock.now.store(NOW, Ordering::SeqCst);
    let cache = Arc::new(MemoryReplayCache::new(100));
    let mut service = clocked_service(&cache, &clock);

    // A body already there: one reading, ready at the first poll.
    let mut future = pin!(call_when_ready(&mut service, signed(Method::POST, b"{\"n\":1}")).await);
    let Poll::Ready(Ok(response)) = poll_once(future.as_mut()) else {
        panic!("a body that was there left something to wait for");
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(clock.readings.load(Ordering::SeqCst), 1);

    // A late body: pending first; meanwhile 12 s pass.
    let body = b"{\"n\":2}";
    let (parts, _) = signed(Method::POST, body).into_parts();
    let arrived = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late = Request::from_parts(
        parts,
        LateBody {
            chunk: Some(Bytes::from_static(body)),
            arrived: arrived.clone(),
        },
    );
    let mut service = clocked_service(&cache, &clock);
    let mut future = pin!(call_when_ready(&mut service, late).await);
    assert!(poll_once(future.as_mut()).is_pending());
    assert_eq!(clock.readings.load(Ordering::SeqCst), 2);
    clock.now.store(NOW + 12, Ordering::SeqCst);
    arrived.store(true, Ordering::SeqCst);
    let Poll::Ready(Ok(response)) = poll_once(future.as_mut()) else {
        panic!("the body has arrived");
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(clock.readings.load(Ordering::SeqCst), 3);
    // Both nonces are held: each until the end of its signature's window.
    cache.purge_expired(NOW + 12);
    assert_eq!(cache.len(), 2);
}

//! What `VerifyLayer` costs per request in-process, beside the same handler without it: the
//! figure behind the issue's "an API with the VerifyLayer ≥ 0.85× its throughput without",
//! free of the load loop's scheduling (the end-to-end run is `bench/verify-api.sh`).
//!
//! Per workload (a GET, and a POST with 1 KiB), two functions over the same signed requests:
//! - `handler_only`: the handler called with the request as the layer would hand it on (the
//!   body collected into `Full<Bytes>`), without checking anything;
//! - `verify_layer`: the same handler behind the real `VerifyLayer`, with a
//!   `MemoryReplayCache` in the steady state of ~100k requests/s: the clock moves one second
//!   every 100,000 requests, so ~1.2 million nonces are live (the 10-second window and the
//!   2-second skew), and as many expire as are recorded. The record's bucket is a cache miss,
//!   as under load, and the table neither grows nor shrinks while measured.
//!
//! `verify_layer − handler_only` is the layer's cost per request. Every request is signed with
//! a fresh nonce in the untimed setup, at the clock's time.
//!
//! Run: `cargo bench --all-features --bench layer -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower_layer::Layer as _;
use tower_service::Service;

use countersign::clock::{Clock as _, ManualClock};
use countersign::core::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig,
    Verifier,
};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;

const START: u64 = 1_700_000_000;
/// Requests per simulated second.
const RATE: u64 = 100_000;

/// A handler as an API would write one: reads the verified user (when there is one) and
/// answers a small JSON body.
#[derive(Clone)]
struct Handler;

impl Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let named = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|identity| identity.user.as_deref())
            .is_some_and(|user| user == "alice@example.com");
        let body: &'static [u8] = if named {
            br#"{"ok":true,"user":"alice@example.com"}"#
        } else {
            br#"{"ok":true,"user":null}"#
        };
        ready(Ok(Response::new(Full::new(Bytes::from_static(body)))))
    }
}

/// Polls a future that the bench's services complete without waiting.
fn complete<F: Future>(future: F) -> F::Output {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the bench's services never wait"),
    }
}

fn layer(c: &mut Criterion) {
    bench_workload(c, "GET", http::Method::GET, 0);
    bench_workload(c, "POST_1KiB", http::Method::POST, 1024);
}

fn bench_workload(c: &mut Criterion, label: &str, method: http::Method, size: usize) {
    let handle =
        KeyringHandle::new(Keyring::single("k1", Secret::new(vec![0x42; 32]).unwrap()).unwrap());
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let identity = EncodedIdentity::new(&Identity::new("alice@example.com", ["admin", "billing"]));
    let body = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let clock = ManualClock::new(START);
    let mut signed_count = 0u64;
    let mut signed = || -> Request<Full<Bytes>> {
        signed_count += 1;
        if signed_count % RATE == 0 {
            clock.advance(1);
        }
        let now = clock.now_unix();
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri("/api/v1/orders?customer=1842")
            .header("host", "api.internal.example.com")
            .header("content-type", "application/json")
            .header("content-length", size)
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        signer
            .sign_encoded(&mut parts, &body, Some(&identity), now, &Nonce::random())
            .unwrap();
        request = Request::from_parts(parts, ());
        request.map(|()| Full::new(body.clone()))
    };

    // Start in the steady state: the nonces of the last 12 seconds, each expiring when a
    // request of its second would (`replay_until` = created + window + skew).
    let policy = Policy::default();
    let live_for = policy.window.as_secs() + policy.skew.as_secs();
    let cache = Arc::new(MemoryReplayCache::new(
        4 * RATE as usize * live_for as usize,
    ));
    for i in 0..RATE * live_for {
        let nonce = format!("live-{i:016x}");
        let expires = START + i / RATE + 1;
        cache.check_and_record_now(&nonce, expires, START).unwrap();
    }
    let verifier = Verifier::new(handle, policy);
    let mut verifying = VerifyLayer::new(verifier, cache)
        .clock(Arc::new(clock.clone()))
        .layer(Handler);
    let mut handler = Handler;

    // The layer must accept what the setup signs (a rejection would be a cheaper path).
    let accepted = complete(verifying.call(signed())).unwrap();
    assert_eq!(accepted.status(), http::StatusCode::OK);
    let mut group = c.benchmark_group(format!("verify_layer_steady/{label}"));
    group.bench_function("handler_only", |b| {
        b.iter_batched(
            &mut signed,
            |request| black_box(complete(handler.call(request))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("verify_layer", |b| {
        b.iter_batched(
            &mut signed,
            |request| {
                let response = complete(verifying.call(request)).unwrap();
                assert_eq!(response.status(), http::StatusCode::OK);
                response
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);

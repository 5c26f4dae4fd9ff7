//! How many heap allocations `VerifyLayer` makes per accepted request, counted by a global
//! allocator that counts: a guard against a change that quietly adds allocations to the
//! verify path (each costs ~20-40 ns with glibc's malloc and free, and the layer's whole cost
//! is ~1.3 µs per GET: docs/BENCHMARKS.md, "The VerifyLayer in-process").
//!
//! What they are today (GET; a POST adds one box for the body read's state), found with a
//! backtrace per allocation:
//! - the signature base, built into one `String` (~700 bytes) before the MAC = 1;
//! - the owned `Verified` the core returns, moved into `VerifiedIdentity`: the roles `Vec` = 1
//!   (the user name, each role, the key id and the nonce are `CompactString`s, held inline up
//!   to 24 bytes: until the thirteenth round they were one `String` each, 5 more here);
//! - the request extension: `http::Extensions`' map box, its table, the boxed value = 3.
//!
//! The user name here, `alice@example.com`, is sent percent-encoded (`alice%40example.com`):
//! its decoding goes through a stack buffer, not a `Vec` (one allocation more until then).
//!
//! Run: `cargo test --all-features --test layer_allocations -- --nocapture`

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig,
    Verifier,
};
use countersign::layer::VerifyLayer;
use countersign::replay::MemoryReplayCache;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower_layer::Layer as _;
use tower_service::Service;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A handler that allocates nothing.
#[derive(Clone)]
struct Handler;

impl Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    }
}

fn complete<F: Future>(future: F) -> F::Output {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("nothing here waits"),
    }
}

/// Allocations per accepted request, averaged over 1000. The replay cache's tables grow (double)
/// now and then as nonces accumulate: ~0.1 per request here, hence the half allocation of slack
/// in the bounds below.
fn allocations_per_request(method: &str, body_size: usize) -> f64 {
    const NOW: u64 = 1_700_000_000;
    let handle =
        KeyringHandle::new(Keyring::single("k1", Secret::new(vec![0x42; 32]).unwrap()).unwrap());
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let identity = EncodedIdentity::new(&Identity::new("alice@example.com", ["admin", "billing"]));
    let cache = Arc::new(MemoryReplayCache::new(1_000_000));
    let mut service = VerifyLayer::new(Verifier::new(handle, Policy::default()), cache)
        .clock(Arc::new(ManualClock::new(NOW)))
        .layer(Handler);
    let body = Bytes::from(vec![7u8; body_size]);
    let signed = || {
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri("/api/v1/orders?customer=1842")
            .header("host", "api.internal.example.com")
            .header("content-type", "application/json")
            .header("content-length", body_size)
            .body(())
            .unwrap()
            .into_parts();
        signer
            .sign_encoded(&mut parts, &body, Some(&identity), NOW, &Nonce::random())
            .unwrap();
        Request::from_parts(parts, Full::new(body.clone()))
    };
    let mut counted = 0;
    const REQUESTS: usize = 1000;
    for round in 0..REQUESTS + 100 {
        let request = signed();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let response = complete(service.call(request)).unwrap();
        let after = ALLOCATIONS.load(Ordering::Relaxed);
        assert_eq!(response.status(), StatusCode::OK);
        // The first 100 warm the cache's tables up.
        if round >= 100 {
            counted += after - before;
        }
    }
    counted as f64 / REQUESTS as f64
}

#[test]
fn the_layer_allocates_at_most_five_times_per_get_and_six_per_post() {
    let get = allocations_per_request("GET", 0);
    let post = allocations_per_request("POST", 1024);
    eprintln!("allocations per accepted request: GET {get:.2}, POST 1 KiB {post:.2}");
    assert!(get <= 5.5, "GET: {get} allocations per request (was 5)");
    assert!(post <= 6.5, "POST: {post} allocations per request (was 6)");
}

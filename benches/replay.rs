//! What the verify layer does per signed request once it is in memory (a GET, and a POST with
//! 1 KiB): the headers and MAC, the body's digest, and the nonce's record in a `MemoryReplayCache` that already
//! holds a million live nonces (a 10-second window at ~100k requests/s), so the record's
//! bucket is a cache miss, as under load.
//!
//! - `plain`: `Verifier::verify_headers`, `check_body`, `check_and_record_now`.
//! - `hinted`: the same with `verify_headers_hinting` and `ReplayCache::prefetch` (what
//!   `VerifyLayer` does): the bucket's load overlaps the MAC and the digest.
//!
//! Run: `cargo bench --all-features --bench replay -- --warm-up-time 1 --measurement-time 3`

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::request::Parts;

use countersign::core::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use countersign::replay::{MemoryReplayCache, ReplayCache, ReplayOutcome};

const NOW: u64 = 1_700_000_000;
const LIVE: usize = 1_000_000;

fn verify_and_record(c: &mut Criterion) {
    bench_request(c, "GET_0B", http::Method::GET, 0);
    bench_request(c, "POST_1KiB", http::Method::POST, 1024);
}

fn bench_request(c: &mut Criterion, label: &str, method: http::Method, size: usize) {
    let handle =
        KeyringHandle::new(Keyring::single("k1", Secret::new(vec![0x42; 32]).unwrap()).unwrap());
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let verifier = Verifier::new(handle, Policy::default());
    let identity = Identity::new("alice@example.com", ["admin", "billing"]);
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let signed = || -> Parts {
        let mut parts = http::Request::builder()
            .method(method.clone())
            .uri("/api/v1/orders?customer=1842")
            .header("host", "api.internal.example.com")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        signer
            .sign(&mut parts, &body, Some(&identity), NOW, &Nonce::random())
            .unwrap();
        parts
    };
    // Room for the live million and every nonce the measurement records.
    let cache = MemoryReplayCache::new(64 * LIVE);
    for i in 0..LIVE {
        let nonce = format!("live-{i:016x}");
        cache.check_and_record_now(&nonce, NOW + 10, NOW).unwrap();
    }

    let mut group = c.benchmark_group(format!("verify_and_record_1M_live/{label}"));
    for hinted in [false, true] {
        group.bench_function(if hinted { "hinted" } else { "plain" }, |b| {
            b.iter_batched(
                signed,
                |parts| {
                    let headers = if hinted {
                        verifier.verify_headers_hinting(&parts, NOW, |nonce| cache.prefetch(nonce))
                    } else {
                        verifier.verify_headers(&parts, NOW)
                    };
                    let verified = headers.unwrap().check_body(black_box(&body)).unwrap();
                    let nonce = verified.nonce.as_deref().unwrap();
                    let outcome = cache.check_and_record_now(nonce, verified.replay_until, NOW);
                    assert_eq!(outcome, Ok(ReplayOutcome::Fresh));
                    parts
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, verify_and_record);
criterion_main!(benches);

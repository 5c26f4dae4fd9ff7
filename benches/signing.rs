//! Signing and verification cost beside a raw HMAC-SHA256 over the same request bytes.
//!
//! One group per body size (0 B, 1 KiB, 64 KiB). In each group:
//! - `raw_hmac`: HMAC-SHA256 over the request head (request line and header fields as sent
//!   before signing) followed by the body, as one buffer: the floor for "MAC the request".
//! - `sign`: `Signer::sign` (Content-Digest, identity fields, base, MAC, fresh random nonce).
//! - `verify`: `Verifier::verify` on a signed request (headers, MAC, digest; no replay cache).
//! - `sign_verify`: both, the figure the target (≤ 3× raw HMAC at 1 KiB) is about.
//! - `crypto_floor`: only the hashing that sign+verify cannot avoid, with the same `sha2`: the
//!   body's SHA-256 twice (the signer's `Content-Digest`, the verifier's check of it) and an
//!   HMAC over this request's real signature base twice, from a keyed state computed once (as
//!   the keyring does). `sign_verify` minus this is everything else both sides do.
//!
//! Run: `cargo bench --bench signing -- --warm-up-time 1 --measurement-time 3`
//!
//! On a shared, loaded machine wall-clock figures swing by 2x between runs; instruction counts
//! do not. Count one benchmark's instructions with callgrind (valgrind does not expose SHA-NI,
//! so the SHA-256 compression runs in software there: subtract `sha2::sha256::soft::compress`
//! to get the non-crypto cost):
//! `valgrind --tool=callgrind target/release/deps/signing-<hash> --bench --profile-time 3
//! --exact body_1KiB/verify`

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::request::Parts;
use sha2::{Digest as _, Sha256};

use countersign::core::{
    signature_base_for, Identity, Keyring, KeyringHandle, Nonce, Policy, RequestView, Secret,
    Signer, SignerConfig, Verifier, LABEL,
};

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [0x42; 32];

fn request() -> Parts {
    http::Request::builder()
        .method("POST")
        .uri("/api/v1/orders?customer=1842&expand=items")
        .header("host", "api.internal.example.com")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("user-agent", "countersign-bench/1")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// The request as bytes on the wire (head, then body).
fn wire_bytes(parts: &Parts, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.to_string().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn bench_size(c: &mut Criterion, label: &str, size: usize) {
    let handle =
        KeyringHandle::new(Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap()).unwrap());
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let verifier = Verifier::new(handle, Policy::default());
    let identity = Identity::new("alice@example.com", ["admin", "billing"]);
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let unsigned = request();
    let wire = wire_bytes(&unsigned, &body);

    let mut signed = unsigned.clone();
    signer
        .sign(&mut signed, &body, Some(&identity), NOW, &Nonce::random())
        .unwrap();
    verifier.verify(&signed, &body, NOW).unwrap();

    let base = {
        let input = signed.headers["signature-input"].to_str().unwrap();
        let member = input.strip_prefix(&format!("{LABEL}=")).unwrap();
        signature_base_for(&RequestView::from_parts(&signed), member)
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let keyed = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();

    let mut group = c.benchmark_group(format!("body_{label}"));
    group.throughput(Throughput::Bytes(wire.len() as u64));

    group.bench_function("raw_hmac", |b| {
        b.iter(|| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
            mac.update(black_box(&wire));
            black_box(mac.finalize().into_bytes())
        })
    });

    group.bench_function("sign", |b| {
        b.iter_batched(
            || unsigned.clone(),
            |mut parts| {
                signer
                    .sign(
                        &mut parts,
                        black_box(&body),
                        Some(&identity),
                        NOW,
                        &Nonce::random(),
                    )
                    .unwrap();
                parts
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("verify", |b| {
        b.iter(|| {
            black_box(
                verifier
                    .verify(black_box(&signed), black_box(&body), NOW)
                    .unwrap(),
            )
        })
    });

    group.bench_function("sign_verify", |b| {
        b.iter_batched(
            || unsigned.clone(),
            |mut parts| {
                signer
                    .sign(
                        &mut parts,
                        black_box(&body),
                        Some(&identity),
                        NOW,
                        &Nonce::random(),
                    )
                    .unwrap();
                black_box(verifier.verify(&parts, &body, NOW).unwrap());
                parts
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("crypto_floor", |b| {
        b.iter(|| {
            for _ in 0..2 {
                if !body.is_empty() {
                    black_box(Sha256::digest(black_box(&body)));
                }
                let mut mac = keyed.clone();
                mac.update(black_box(&base));
                black_box(mac.finalize().into_bytes());
            }
        })
    });

    group.finish();
}

fn signing(c: &mut Criterion) {
    bench_size(c, "0B", 0);
    bench_size(c, "1KiB", 1024);
    bench_size(c, "64KiB", 64 * 1024);
}

criterion_group!(benches, signing);
criterion_main!(benches);

//! What the proxy does per proxied GET between the session cookie and the signed upstream
//! request, in memory: the session lookup in a `MemorySessionStore` holding 100,000 sessions,
//! the identity handed to the signer, and `Signer` over the upstream request's fields.
//!
//! - `decoded`: `SessionStore::get` (the full `Session`: user and roles decoded, the CSRF token
//!   encoded as text), an `Identity` made from it, `Signer::sign` (which encodes it again), and
//!   the user name cloned for the access log: the request path before `get_for_request`.
//! - `encoded`: `SessionStore::get_for_request` (the identity as stored, shared; the CSRF token
//!   raw), `Signer::sign_encoded`, and the `EncodedIdentity` cloned for the access log: the
//!   request path now.
//!
//! Both in one binary and one process, so the comparison does not depend on the machine's
//! load between two runs; unlike callgrind's instruction counts it includes what instructions
//! do not show (atomic reference counts, allocator locality, SHA-NI).
//!
//! Run: `cargo bench --all-features --bench session_sign -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::request::Parts;

use countersign::core::{Identity, Keyring, KeyringHandle, Nonce, Secret, Signer, SignerConfig};
use countersign::proxy::session::{MemorySessionStore, SessionId, SessionStore, SessionTimeouts};

const NOW: u64 = 1_700_000_000;
const SESSIONS: usize = 100_000;

/// The memory store answers at once; its futures are ready on the first poll.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the memory store's future was not ready"),
    }
}

fn upstream_request() -> Parts {
    http::Request::builder()
        .method(http::Method::GET)
        .uri("/api/v1/orders?customer=1842")
        .header("host", "127.0.0.1:8080")
        .header("accept", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn session_sign(c: &mut Criterion) {
    let handle =
        KeyringHandle::new(Keyring::single("k1", Secret::new(vec![0x42; 32]).unwrap()).unwrap());
    let signer = Signer::new(handle, SignerConfig::default());
    let store = MemorySessionStore::new(
        SessionTimeouts {
            idle: Duration::from_secs(1800),
            absolute: Duration::from_secs(12 * 3600),
        },
        2 * SESSIONS,
    );
    let mut ids: Vec<SessionId> = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let identity = Identity::new(format!("user{i}@example.com"), ["reader", "billing"]);
        ids.push(ready(store.create(&identity, NOW)).unwrap().0);
    }
    let mut next = 0usize;
    let mut id = move || {
        next = (next + 7919) % SESSIONS;
        next
    };

    let mut group = c.benchmark_group("session_lookup_and_sign_GET");
    group.bench_function("decoded", |b| {
        b.iter_batched(
            upstream_request,
            |mut parts| {
                let session = ready(store.get(&ids[id()], NOW + 1, true))
                    .unwrap()
                    .unwrap();
                let log_user = session.user.clone();
                let identity = Identity {
                    user: session.user,
                    roles: session.roles,
                };
                signer
                    .sign(&mut parts, b"", Some(&identity), NOW + 1, &Nonce::random())
                    .unwrap();
                black_box((parts, log_user))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("encoded", |b| {
        b.iter_batched(
            upstream_request,
            |mut parts| {
                let session = ready(store.get_for_request(&ids[id()], NOW + 1, true))
                    .unwrap()
                    .unwrap();
                let log_user = session.identity.clone();
                let identity = session.into_identity();
                signer
                    .sign_encoded(&mut parts, b"", Some(&identity), NOW + 1, &Nonce::random())
                    .unwrap();
                black_box((parts, log_user))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, session_sign);
criterion_main!(benches);

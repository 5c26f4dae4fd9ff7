//! Regression tests for the panic sites found by a static read of the code (the dynamic
//! passes are tests/hostile_input.rs, tests/core_fastpath.rs and tests/core_limits.rs). Each
//! test drives one site through the public API with the input that reached it; before the fix
//! each one panicked.
//!
//! Run: `cargo test --all-features --test panic_audit`

mod support_ports;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::layer::VerifyLayer;
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use tower::{ServiceBuilder, ServiceExt as _};

const NOW: u64 = 1_700_000_000;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![7; 32]).unwrap())
        .unwrap()
        .into()
}

/// A body that announces nothing until its first frame is out, then a lower bound of
/// `u64::MAX` (a valid `SizeHint`: no upper bound is set). `VerifyLayer` refuses a large hint
/// up front, but read it again once a second frame has arrived, to size its buffer.
struct HintGrowsBody {
    frames: VecDeque<Bytes>,
    sent: usize,
}

impl Body for HintGrowsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = self.frames.pop_front();
        self.sent += usize::from(frame.is_some());
        Poll::Ready(frame.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        if self.sent > 0 {
            hint.set_lower(u64::MAX);
        }
        hint
    }
}

/// Site: `ReadBody::poll` (src/layer/verify.rs), `*received + hint` when a second frame
/// arrives. With the body's lower bound at `u64::MAX` the sum overflowed: a panic in a debug
/// build (the whole connection task), a wrapped capacity in release.
#[tokio::test]
async fn verify_layer_survives_a_size_hint_that_grows_after_the_first_frame() {
    let body = b"ab";
    let (mut parts, ()) = Request::post("http://api.test/upload")
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, body, None, NOW, &Nonce::random())
        .unwrap();
    let request = Request::from_parts(
        parts,
        HintGrowsBody {
            frames: VecDeque::from([Bytes::from_static(b"a"), Bytes::from_static(b"b")]),
            sent: 0,
        },
    );

    let received = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&received);
    let service = ServiceBuilder::new()
        .layer(
            VerifyLayer::new(
                Verifier::new(keyring(), Policy::default()),
                Arc::new(MemoryReplayCache::new(16)),
            )
            .clock(Arc::new(ManualClock::new(NOW))),
        )
        .service_fn(move |request: Request<Full<Bytes>>| {
            let seen = Arc::clone(&seen);
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                *seen.lock().unwrap() = Some(body);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        });

    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        received.lock().unwrap().as_deref(),
        Some(&b"ab"[..]),
        "the inner service got the whole body"
    );
}

#[cfg(feature = "redis")]
mod redis_timeouts {
    use std::time::Duration;

    use countersign::replay::{RedisConnection, RedisOptions, RedisReplayCache, ReplayCache};

    /// A Redis URL whose connection attempts are refused at once, for as long as the returned
    /// socket lives.
    fn refused_url() -> (tokio::net::TcpSocket, String) {
        let (socket, addr) = crate::support_ports::refusing_addr();
        (socket, format!("redis://{addr}"))
    }

    /// Site: `RedisConnection::connection` (src/replay/redis.rs), `Instant::now() +
    /// connect_timeout`. `RedisOptions` is a public struct with public fields and
    /// `with_options` took any value: `Duration::MAX` ("no limit") panicked on the first
    /// call, on the request path of every verified request (the replay check) and of
    /// `/readyz` (the ping).
    #[tokio::test]
    async fn redis_replay_cache_with_an_unbounded_connect_timeout_fails_closed_without_panicking() {
        let options = RedisOptions {
            connect_timeout: Duration::MAX,
            ..RedisOptions::default()
        };
        let (_refusing, url) = refused_url();
        let connection = RedisConnection::with_options(&url, options).unwrap();
        let cache = RedisReplayCache::new(connection, "panic-audit:");
        let outcome = cache
            .check_and_record("nonce-0123456789abcdef", super::NOW + 60, super::NOW)
            .await;
        assert!(
            outcome.is_err(),
            "refused connection fails closed: {outcome:?}"
        );
        assert!(!cache.ready().await);
    }
}

//! VerifyLayer and a body that is still arriving when the signature's window closes: a real
//! hyper server on 127.0.0.1:0, raw TCP clients that send the head, then the body later.
//!
//! The headers are checked when they arrive, the nonce is recorded once the body is complete.
//! The replay cache remembers a nonce until `replay_until` (the end of the signature's
//! acceptance window), so a nonce recorded after that would be forgotten at once: two copies of
//! one signed request, both started within the window and both finished after it, were both
//! accepted. A request whose signature window closed before its body was complete is refused
//! `expired`.
//!
//! Run: `cargo test --all-features --test layer_slow_body`

mod support_layer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::ManualClock;
use countersign::layer::VerifyLayer;
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier};
use http::Request;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const NOW: u64 = 1_700_000_000;

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![5; 32]).unwrap())
        .unwrap()
        .into()
}

/// A server behind the layer (clock `clock`, nonces in memory) whose handler counts its calls.
async fn start(clock: &ManualClock) -> (SocketAddr, Arc<AtomicUsize>) {
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(100)),
    )
    .clock(Arc::new(clock.clone()));
    support_layer::serve_counting(layer).await
}

/// The head of a POST of `body` to `addr`, signed at `created` with one fixed nonce: the same
/// bytes every time (a captured request).
fn signed_head(addr: SocketAddr, body: &[u8], created: u64) -> String {
    let (mut parts, ()) = Request::post("/transfer")
        .header("host", addr.to_string())
        .header("content-length", body.len())
        .body(())
        .unwrap()
        .into_parts();
    let nonce = Nonce::new("slow-body-nonce-0123456789").unwrap();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, body, None, created, &nonce)
        .unwrap();
    let mut head = "POST /transfer HTTP/1.1\r\n".to_owned();
    for (name, value) in &parts.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("connection: close\r\n\r\n");
    head
}

/// A connection that has sent the head and the first byte of the body, and waits.
async fn begin(addr: SocketAddr, head: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..1]).await.unwrap();
    stream
}

/// Sends the rest of the body and reads the answer: (status, body).
async fn finish(mut stream: TcpStream, body: &[u8]) -> (u16, String) {
    stream.write_all(&body[1..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// Lets the server read the heads that were sent (and check them at the clock's time).
async fn let_the_server_read() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn two_copies_whose_bodies_end_after_the_window_are_not_both_accepted() {
    let clock = ManualClock::new(NOW);
    let (addr, calls) = start(&clock).await;
    let body = b"{\"to\":\"mallory\",\"cents\":100000}";
    let head = signed_head(addr, body, NOW);

    // Both copies start within the window: their headers check out now.
    let first = begin(addr, &head, body).await;
    let second = begin(addr, &head, body).await;
    let_the_server_read().await;

    // The bodies end after the window (10 s + 2 s skew) has closed.
    clock.set(NOW + 60);
    let first = finish(first, body).await;
    clock.set(NOW + 62);
    let second = finish(second, body).await;

    // Both were once accepted (200, 200: the handler ran twice).
    let expired = (401, "{\"error\":\"expired\"}".to_owned());
    let handled = calls.load(Ordering::SeqCst);
    assert_eq!((first, second, handled), (expired.clone(), expired, 0));
}

#[tokio::test]
async fn a_body_that_ends_within_the_window_is_accepted_once() {
    let clock = ManualClock::new(NOW);
    let (addr, calls) = start(&clock).await;
    let body = b"slow but in time";
    let head = signed_head(addr, body, NOW);

    let first = begin(addr, &head, body).await;
    let second = begin(addr, &head, body).await;
    let_the_server_read().await;

    // The last second the signature is accepted in: created + window + skew.
    clock.set(NOW + 12);
    let first = finish(first, body).await;
    let second = finish(second, body).await;
    assert_eq!(first, (200, "slow but in time".to_owned()));
    assert_eq!(second, (401, "{\"error\":\"replayed\"}".to_owned()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// An inner service whose readiness is a reservation (tower's `ConcurrencyLimit` of 1, as an
/// API that bounds its handlers would mount it inside the layer): a client sending its body
/// slowly does not hold the reservation while the body arrives, so a signed GET on another
/// connection is answered meanwhile, and the slow request is answered once its body is
/// complete. Before, the layer kept the instance `poll_ready` had readied through the whole
/// body read, and the GET waited for the slow body.
#[tokio::test]
async fn a_slow_body_does_not_hold_the_inner_services_reservation() {
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceBuilder;

    let clock = ManualClock::new(NOW);
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(100)),
    )
    .clock(Arc::new(clock.clone()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service_fn(|request: Request<Full<bytes::Bytes>>| async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let body = b"slow upload";
    let slow = begin(addr, &signed_head(addr, body, NOW), body).await;
    let_the_server_read().await;

    let (mut get, ()) = Request::get("/status")
        .header("host", addr.to_string())
        .body(())
        .unwrap()
        .into_parts();
    let nonce = Nonce::new("slow-body-get-nonce-0123456789").unwrap();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut get, b"", None, NOW, &nonce)
        .unwrap();
    let mut head = "GET /status HTTP/1.1\r\n".to_owned();
    for (name, value) in &get.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("connection: close\r\n\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
        .await
        .expect("the GET waited for the slow body's reservation")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    assert_eq!(finish(slow, body).await, (200, "slow upload".to_owned()));
}

//! VerifyLayer with a large body limit and a body that announces more than it sends: a real
//! hyper server on 127.0.0.1:0, a raw TCP client.
//!
//! `Content-Length` is not covered by the signature, so whoever holds a signed request can
//! announce any length with it. The layer read such a body into a buffer sized up front from
//! what the body announced (up to the limit): with a large limit one signed request made the
//! server allocate that much before the bytes arrived, and with `body_limit(usize::MAX)` the
//! allocation overflowed and panicked the connection's task. The buffer now grows with the
//! bytes that arrive.
//!
//! Run: `cargo test --all-features --test layer_body_limit`

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
    Keyring::single("k1", Secret::new(vec![6; 32]).unwrap())
        .unwrap()
        .into()
}

/// A server behind a layer with `limit`; the handler counts its calls.
async fn start(limit: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(100)),
    )
    .body_limit(limit)
    .clock(Arc::new(ManualClock::new(NOW)));
    support_layer::serve_counting(layer).await
}

/// The signed head of a POST of `body`, announcing `content_length` instead of its length.
fn signed_head(addr: SocketAddr, body: &[u8], content_length: u64) -> String {
    let (mut parts, ()) = Request::post("/upload")
        .header("host", addr.to_string())
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, body, None, NOW, &Nonce::random())
        .unwrap();
    let mut head = "POST /upload HTTP/1.1\r\n".to_owned();
    for (name, value) in &parts.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str(&format!("content-length: {content_length}\r\n\r\n"));
    head
}

/// Sends the head and `body` in two pieces, then ends the connection's sending side: the
/// body is short of what was announced. Returns the answer (empty when the connection was
/// dropped without one).
async fn send_short(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (first, second) = body.split_at(body.len() / 2);
    stream.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(second).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_unlimited_layer_survives_a_body_announcing_more_than_it_sends() {
    let (addr, calls) = start(usize::MAX).await;
    let body = b"0123456789";
    let head = signed_head(addr, body, u64::MAX / 2);
    let answer = send_short(addr, &head, body).await;
    // The body broke off: 400 `body_read_failed` (before: no answer, the task had panicked).
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(
        answer.ends_with("{\"error\":\"body_read_failed\"}"),
        "{answer:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The server still answers, and a body that is what it announces gets through.
    let head = signed_head(addr, body, body.len() as u64);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..4]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&body[4..]).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("0123456789"), "{answer:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

//! `VerifyLayer::max_body_memory`: one cap on the memory all the bodies the layer holds take
//! at once, on a real hyper server on 127.0.0.1:0 driven by raw TCP clients (a body that
//! arrives in parts, or never).
//!
//! Before the cap, each request's body was bounded by `body_limit` and nothing bounded their
//! sum: a client with many streams, or many connections, that announced large bodies and sent
//! them slowly made the server hold `streams × body_limit`. Now a declared `Content-Length`
//! is reserved whole once the signature headers check out, and refused on the head (503
//! `body_memory_limit`, `Retry-After: 1`, before any byte of it is read) when it does not fit
//! beside the bodies held; a body without one is counted frame by frame and refused mid-way.
//! What a request took is given back when its answer is complete; a refused request records
//! nothing, so the same signed request passes once memory is free.
//!
//! Run: `cargo test --all-features --test verify_body_memory`

mod support_layer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::ManualClock;
use countersign::layer::{VerifyLayer, DEFAULT_MAX_BODY_MEMORY};
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier};
use http::Request;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const NOW: u64 = 1_700_000_000;

const REFUSED: &str = "{\"error\":\"body_memory_limit\"}";

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![9; 32]).unwrap())
        .unwrap()
        .into()
}

/// A server behind a layer with `body_limit` and `max_body_memory` (`None`: the default);
/// the handler echoes the body and counts its calls.
async fn start(
    body_limit: usize,
    max_body_memory: Option<usize>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let mut layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(100)),
    )
    .body_limit(body_limit)
    .clock(Arc::new(ManualClock::new(NOW)));
    if let Some(bytes) = max_body_memory {
        layer = layer.max_body_memory(bytes);
    }
    support_layer::serve_counting(layer).await
}

/// How a body is framed on the wire.
#[derive(Clone, Copy)]
enum Framing {
    /// `Content-Length: n` (which no signature covers: it may say more than is sent).
    Length(u64),
    /// `Transfer-Encoding: chunked`: no length up front.
    Chunked,
}

/// The head of a POST of `body` signed with `nonce` (the same bytes every time for one nonce:
/// a request sent again), framed as `framing`, with `connection: close`.
fn signed_head(addr: SocketAddr, body: &[u8], nonce: &str, framing: Framing) -> String {
    let (mut parts, ()) = Request::post("/upload")
        .header("host", addr.to_string())
        .body(())
        .unwrap()
        .into_parts();
    let nonce = Nonce::new(&format!("body-memory-{nonce}-0123456789")).unwrap();
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut parts, body, None, NOW, &nonce)
        .unwrap();
    let mut head = "POST /upload HTTP/1.1\r\n".to_owned();
    for (name, value) in &parts.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    match framing {
        Framing::Length(length) => head.push_str(&format!("content-length: {length}\r\n")),
        Framing::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
    }
    head.push_str("connection: close\r\n\r\n");
    head
}

/// One HTTP/1 chunk of `data`.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// A connection that has sent `bytes` (a head, maybe part of a body) and waits, once the
/// server has had the time to read them (and the layer to check the head).
async fn open(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream
}

/// The answer on `stream`, whole (the server closes after it): (status, its headers, body).
async fn answer(stream: &mut TcpStream) -> (u16, String, String) {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.len() > 12, "{answer:?}");
    let status = answer[9..12].parse().unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Sends the rest of a request and reads its answer.
async fn finish(mut stream: TcpStream, rest: &[u8]) -> (u16, String, String) {
    stream.write_all(rest).await.unwrap();
    answer(&mut stream).await
}

/// A whole request in one write, and its answer.
async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, String) {
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    finish(open(addr, &request).await, b"").await
}

/// A 503 `body_memory_limit` with `Retry-After: 1`.
fn assert_refused(answer: &(u16, String, String)) {
    let (status, head, body) = answer;
    assert_eq!((*status, body.as_str()), (503, REFUSED), "{head}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
}

/// While one request's declared body holds most of the cap (its head and part of its body
/// sent, the rest not yet), a second declaring more than is left is refused on its head: 503
/// `body_memory_limit`, `Retry-After: 1`, though not a byte of its body was sent, and the
/// handler never runs. Its nonce is not recorded: once the first has finished, the very same
/// signed request passes.
#[tokio::test]
async fn a_declared_body_that_does_not_fit_is_refused_on_its_head_and_may_be_sent_again() {
    // Cap 150: the first body (100) leaves 50.
    let (addr, calls) = start(100, Some(150)).await;
    let held = [b'a'; 100];
    let head = signed_head(addr, &held, "holder", Framing::Length(100));
    let holder = open(addr, &[head.as_bytes(), &held[..10]].concat()).await;

    let body = [b'b'; 60];
    let refused_head = signed_head(addr, &body, "refused", Framing::Length(60));
    let mut refused = open(addr, refused_head.as_bytes()).await;
    assert_refused(&answer(&mut refused).await);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // A body that fits beside it (50 = what is left) is read, and answered.
    let small = [b'c'; 50];
    let small_head = signed_head(addr, &small, "small", Framing::Length(50));
    let (status, _, echoed) = send(addr, &small_head, &small).await;
    assert_eq!((status, echoed.as_bytes()), (200, &small[..]));

    let (status, _, echoed) = finish(holder, &held[10..]).await;
    assert_eq!((status, echoed.as_bytes()), (200, &held[..]));

    // The refused request again, byte for byte (same signature, same nonce): it passes.
    let (status, _, echoed) = send(addr, &refused_head, &body).await;
    assert_eq!((status, echoed.as_bytes()), (200, &body[..]));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A chunked body (no length up front) is counted as its chunks arrive: the chunk that takes
/// the bodies held past the cap is refused (503 `body_memory_limit`), before the body is
/// complete. What it had taken is given back, and so is the holder's once it has finished:
/// afterwards the whole cap can be taken again (one body of 100 held, one of 50 beside it).
#[tokio::test]
async fn a_chunked_body_is_refused_mid_way_and_everything_is_given_back() {
    let (addr, calls) = start(100, Some(150)).await;
    let held = [b'a'; 100];
    let head = signed_head(addr, &held, "holder", Framing::Length(100));
    let holder = open(addr, &[head.as_bytes(), &held[..10]].concat()).await;

    // 30 of the 50 left: taken, and the body goes on being read (no answer yet).
    let body = [b'b'; 60];
    let chunked_head = signed_head(addr, &body, "chunked", Framing::Chunked);
    let mut chunked = open(
        addr,
        &[chunked_head.as_bytes(), &chunk(&body[..30])].concat(),
    )
    .await;
    let mut byte = [0; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), chunked.read(&mut byte)).await;
    assert!(early.is_err(), "answered before the body went past the cap");
    // 30 more: 160 > 150, refused without waiting for the rest.
    chunked.write_all(&chunk(&body[30..])).await.unwrap();
    assert_refused(&answer(&mut chunked).await);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let (status, _, _) = finish(holder, &held[10..]).await;
    assert_eq!(status, 200);

    // Nothing is left held: 100 + 50 fit exactly again.
    let head = signed_head(addr, &held, "holder-2", Framing::Length(100));
    let holder = open(addr, &[head.as_bytes(), &held[..10]].concat()).await;
    let small = [b'c'; 50];
    let small_head = signed_head(addr, &small, "small", Framing::Length(50));
    let (status, _, echoed) = send(addr, &small_head, &small).await;
    assert_eq!((status, echoed.as_bytes()), (200, &small[..]));
    assert_eq!(finish(holder, &held[10..]).await.0, 200);

    // The refused chunked request, sent again whole: it passes (its nonce was not recorded).
    let mut rest = chunk(&body);
    rest.extend_from_slice(b"0\r\n\r\n");
    let (status, _, echoed) = send(addr, &chunked_head, &rest).await;
    assert_eq!((status, echoed.as_bytes()), (200, &body[..]));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// Memory is given back when a request is answered: with a cap of one body (a
/// `max_body_memory` below `body_limit` is raised to it), maximal bodies pass one after
/// another; one held unfinished takes it all, so that a one-byte body is refused meanwhile,
/// and after that refusal the cap is whole again.
#[tokio::test]
async fn memory_is_given_back_after_each_answer_and_the_cap_is_never_below_the_body_limit() {
    let (addr, calls) = start(100, Some(0)).await;
    let full = [b'f'; 100];
    for round in 0..3 {
        let head = signed_head(addr, &full, &format!("full-{round}"), Framing::Length(100));
        let (status, _, echoed) = send(addr, &head, &full).await;
        assert_eq!(
            (status, echoed.as_bytes()),
            (200, &full[..]),
            "round {round}"
        );
    }

    let head = signed_head(addr, &full, "holder", Framing::Length(100));
    let holder = open(addr, &[head.as_bytes(), &full[..1]].concat()).await;
    let one_head = signed_head(addr, b"1", "one", Framing::Length(1));
    assert_refused(&send(addr, &one_head, b"1").await);
    assert_eq!(finish(holder, &full[1..]).await.0, 200);

    let head = signed_head(addr, &full, "after-refusal", Framing::Length(100));
    let (status, _, echoed) = send(addr, &head, &full).await;
    assert_eq!((status, echoed.as_bytes()), (200, &full[..]));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

/// The default cap is 64 MiB, raised to `body_limit` when that is larger, so one body of the
/// largest size accepted can always be read: with `body_limit` 80 MiB, a head declaring 70
/// MiB is not refused (its body is read: it breaks off short, 400 `body_read_failed`), and
/// while it is held a second declaring 10 MiB + 1 byte is refused (80 MiB is the cap) and one
/// declaring 10 MiB is read. Only heads and a few bytes are sent.
#[tokio::test]
async fn the_default_cap_is_raised_to_a_larger_body_limit() {
    const MIB: u64 = 1024 * 1024;
    assert_eq!(DEFAULT_MAX_BODY_MEMORY as u64, 64 * MIB);
    let (addr, calls) = start(80 * MIB as usize, None).await;

    let head = signed_head(addr, b"", "large", Framing::Length(70 * MIB));
    let mut large = open(addr, &[head.as_bytes(), b"0123456789"].concat()).await;

    let head = signed_head(addr, b"", "over", Framing::Length(10 * MIB + 1));
    let mut over = open(addr, head.as_bytes()).await;
    assert_refused(&answer(&mut over).await);

    let head = signed_head(addr, b"", "fits", Framing::Length(10 * MIB));
    let mut fits = open(addr, &[head.as_bytes(), b"0123456789"].concat()).await;
    for stream in [&mut fits, &mut large] {
        stream.shutdown().await.unwrap();
        let (status, _, body) = answer(stream).await;
        assert_eq!(
            (status, body.as_str()),
            (400, "{\"error\":\"body_read_failed\"}")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// `VerifyLayer::body_memory_usage`, read from a clone of the layer kept beside the server (a
/// backend's metrics): the bytes a held body takes while it is held, the cap, a refusal
/// counted, and everything given back once the held request is answered.
#[tokio::test]
async fn a_clone_of_the_layer_reports_what_its_bodies_hold() {
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(100)),
    )
    .body_limit(100)
    .max_body_memory(150)
    .clock(Arc::new(ManualClock::new(NOW)));
    let observed = layer.clone();
    let usage = || {
        let usage = observed.body_memory_usage();
        (usage.held, usage.limit, usage.refused)
    };
    let (addr, _calls) = support_layer::serve_counting(layer).await;
    assert_eq!(usage(), (0, 150, 0));

    let held = [b'a'; 100];
    let head = signed_head(addr, &held, "holder", Framing::Length(100));
    let holder = open(addr, &[head.as_bytes(), &held[..10]].concat()).await;
    assert_eq!(usage(), (100, 150, 0));

    let body = [b'b'; 60];
    let head = signed_head(addr, &body, "refused", Framing::Length(60));
    assert_refused(&send(addr, &head, &body).await);
    assert_eq!(usage(), (100, 150, 1));

    assert_eq!(finish(holder, &held[10..]).await.0, 200);
    assert_eq!(usage(), (0, 150, 1));
}

//! `ProxyServer::shutdown` leaves no connection of its server open once it returns: an HTTP/2
//! client that never answers the GOAWAY's PING is dropped like an idle one (after the GOAWAY
//! grace, `header_read_timeout`), and whatever is still open at the end of `shutdown_grace`
//! (an HTTP/1 or HTTP/2 request still waiting for its upstream) is closed then, not left
//! running in the library caller's runtime. Run:
//! `cargo test --all-features --test proxy_shutdown_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::time::{Duration, Instant};

use http::Request;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, sections 3.4 and 6.5).
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Generous bound on a shutdown expected to end in about a second (a loaded machine).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(20);
/// Generous bound for a socket the server has closed to read as closed on this side.
const CLOSED_BOUND: Duration = Duration::from_secs(5);
/// Far longer than any bound above: what only the fix can cut short.
const LONG: Duration = Duration::from_secs(120);

async fn proxy(shutdown_grace: Duration, header_read_timeout: Duration) -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.shutdown_grace = shutdown_grace;
            // Also the time an HTTP/2 client gets to close after the GOAWAY.
            s.header_read_timeout = header_read_timeout;
            s.http2_idle_timeout = LONG;
            s.request_timeout = LONG;
            for route in &mut s.routes {
                route.timeout = LONG;
            }
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// A raw HTTP/2 client that sends the preface and an empty SETTINGS frame, then nothing ever
/// (no SETTINGS ACK, no PING ACK); returned once the server has answered with its SETTINGS,
/// so the connection is being served as HTTP/2.
async fn silent_h2_client(h: &Harness) -> TcpStream {
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(CLOSED_BOUND, stream.read_exact(&mut head))
        .await
        .expect("the server's SETTINGS in time")
        .expect("the server's SETTINGS");
    assert_eq!(head[3], support_h2::SETTINGS, "{head:?}");
    let mut payload = vec![0u8; frame_length(&head)];
    stream.read_exact(&mut payload).await.unwrap();
    stream
}

fn frame_length(head: &[u8]) -> usize {
    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])
}

/// The types of the whole frames in `bytes`.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        types.push(bytes[3]);
        bytes = &bytes[(9 + frame_length(bytes)).min(bytes.len())..];
    }
    types
}

/// Reads (and discards) until the server closes the socket; panics if it is still open after
/// `within`. Returns the bytes read.
async fn read_until_closed(stream: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(within, read_all).await.is_err() {
        panic!("{what}: connection still open {within:?} after shutdown() returned");
    }
    seen
}

async fn wait_for_upstream(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.upstream.raw_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn shut_down(mut h: Harness) -> Harness {
    let proxy = h.proxy.take().unwrap();
    tokio::time::timeout(SHUTDOWN_BOUND, proxy.shutdown())
        .await
        .unwrap_or_else(|_| panic!("shutdown() still running after {SHUTDOWN_BOUND:?}"));
    h
}

/// With a grace far longer than the bounds here, an idle HTTP/2 client that never ACKs the
/// shutdown's PING is dropped after the GOAWAY grace (`header_read_timeout`, 1 s), like an
/// idle close: the shutdown does not wait the whole `shutdown_grace` for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_client_is_dropped_after_the_goaway_grace_not_at_the_shutdown_grace() {
    let h = proxy(LONG, Duration::from_secs(1)).await;
    let mut stream = silent_h2_client(&h).await;
    let h = shut_down(h).await;
    let frames = read_until_closed(&mut stream, CLOSED_BOUND, "silent HTTP/2 client").await;
    let types = frame_types(&frames);
    assert!(
        types.contains(&support_h2::GOAWAY),
        "closed after a GOAWAY: {types:?}"
    );
    drop(h);
}

/// With a short grace and a long GOAWAY grace, the silent HTTP/2 client's connection is
/// still open when the grace ends: it is closed then, before `shutdown()` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_client_is_closed_when_shutdown_returns() {
    let h = proxy(Duration::from_secs(1), LONG).await;
    let mut stream = silent_h2_client(&h).await;
    let h = shut_down(h).await;
    read_until_closed(&mut stream, CLOSED_BOUND, "silent HTTP/2 client").await;
    drop(h);
}

/// An HTTP/1 request still waiting for its upstream at the end of the grace: its connection
/// is closed (no answer) when `shutdown()` returns, not left waiting for the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_in_flight_at_the_grace_end_is_closed_when_shutdown_returns() {
    let h = proxy(Duration::from_secs(1), Duration::from_secs(5)).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let request = format!(
        "GET /api/slow?ms={} HTTP/1.1\r\nhost: {}\r\ncookie: {}\r\n\r\n",
        LONG.as_millis(),
        h.addr,
        login.cookie
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    wait_for_upstream(&h).await;
    let h = shut_down(h).await;
    let seen = read_until_closed(&mut stream, CLOSED_BOUND, "HTTP/1 request in flight").await;
    assert!(
        seen.is_empty(),
        "dropped, not answered: {:?}",
        String::from_utf8_lossy(&seen)
    );
    drop(h);
}

/// The same over HTTP/2 (hyper runs each stream as a task of its own): the client's
/// connection ends when `shutdown()` returns and the request gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_in_flight_at_the_grace_end_is_closed_when_shutdown_returns() {
    let h = proxy(Duration::from_secs(1), Duration::from_secs(5)).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, connection) =
        support_h2::client::<http_body_util::Empty<bytes::Bytes>, _>(stream).await;
    let request = Request::builder()
        .uri(format!(
            "http://{}/api/slow?ms={}",
            h.addr,
            LONG.as_millis()
        ))
        .header("cookie", &login.cookie)
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });
    wait_for_upstream(&h).await;
    let h = shut_down(h).await;
    tokio::time::timeout(CLOSED_BOUND, connection)
        .await
        .unwrap_or_else(|_| {
            panic!("HTTP/2 request in flight: connection still open {CLOSED_BOUND:?} later")
        })
        .unwrap()
        .ok();
    let answer = tokio::time::timeout(CLOSED_BOUND, response)
        .await
        .expect("the request ends with its connection")
        .unwrap();
    assert!(answer.is_err(), "dropped, not answered: {answer:?}");
    drop(h);
}

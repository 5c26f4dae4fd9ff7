//! Review of the upstream pool (`proxy::upstream_pool`), driven directly against raw, scripted
//! HTTP/1.1 upstreams on loopback (a tokio `TcpListener` writing exactly the bytes each test
//! chooses): what happens to a connection the pool lets go of while hyper is still writing a
//! request body the upstream has stopped taking, with the limit of the start and with one a
//! reload set.
//! Run: `cargo test --all-features --test proxy_pool_review`.
#![cfg(feature = "proxy")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use countersign::proxy::forward::{
    upstream_connector, LiveRouteLimits, RouteLimits, UpstreamConnect,
};
use countersign::proxy::upstream_pool::{PoolSettings, UpstreamPool};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A pool to `addr` with the defaults of an `[[upstream]]` entry, but `body_idle_timeout`
/// and the route's live limits (as a proxy's route pool has them; None as the baseline's).
fn pool_to(
    addr: SocketAddr,
    body_idle_timeout: Duration,
    live_limits: Option<LiveRouteLimits>,
) -> UpstreamPool {
    let connect = UpstreamConnect::default();
    UpstreamPool::new(
        PoolSettings {
            upstream: format!("http://{addr}/").parse().unwrap(),
            max_idle: 8,
            idle_timeout: Duration::from_secs(60),
            max_lifetime: None,
            body_idle_timeout,
            max_response_header_count: connect.max_response_header_count,
            max_response_header_bytes: connect.max_response_header_bytes,
            stale_after: None,
            whole_connect_timeout: None,
            live_limits,
        },
        upstream_connector(&connect, &[]).unwrap(),
    )
}

/// Reads `stream` until a request head has arrived; returns how many bytes were read.
async fn read_head(stream: &mut TcpStream) -> usize {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed before its request head");
        head.extend_from_slice(&buf[..n]);
    }
    head.len()
}

/// What is left of the connection after a pause: reads it until it ends or stays silent for
/// `quiet`. Returns the bytes read and whether it ended (EOF or reset) rather than went quiet.
async fn drain(stream: &mut TcpStream, quiet: Duration) -> (usize, bool) {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Err(_) => return (total, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
        }
    }
}

/// An upstream that answers a large upload as soon as its head has arrived, then neither reads
/// the rest nor closes (an API that rejects uploads early and then hangs, or a hostile one).
/// The answer ends at once, so nothing of the exchange is left for the pool to time: before,
/// the proxy's side of that connection (its driver task, its socket and up to `max_body` of
/// request body held in memory) lived as long as the upstream kept it open, that is forever,
/// one more per such request. A write to the upstream blocked for `body_idle_timeout` now
/// fails, like a quiet answer: the connection closes and its body is let go of.
#[tokio::test]
async fn a_request_body_the_upstream_stopped_taking_does_not_hold_its_connection_forever() {
    assert_a_blocked_write_is_let_go_after(LIMIT, |addr| pool_to(addr, LIMIT, None)).await;
}

/// The write limit follows a reload of the route's `body_idle_timeout` for the connections
/// made after it, as `connect_timeout` does: the pool was made with a 10-minute one, the route
/// now says 1 s. Before, a pool kept the limit of the start until the proxy restarted.
#[tokio::test]
async fn a_reloaded_body_idle_timeout_limits_the_writes_of_new_connections() {
    let start = RouteLimits {
        timeout: Duration::from_secs(30),
        max_body: usize::MAX,
        body_idle_timeout: Duration::from_secs(600),
        connect_timeout: Duration::from_secs(5),
    };
    let live = LiveRouteLimits::new(start);
    live.set(RouteLimits {
        body_idle_timeout: LIMIT,
        ..start
    });
    assert_a_blocked_write_is_let_go_after(LIMIT, |addr| {
        pool_to(addr, start.body_idle_timeout, Some(live.clone()))
    })
    .await;
}

/// The write limit the tests expect.
const LIMIT: Duration = Duration::from_secs(1);

/// The scenario above, with the pool `make` gives for the upstream's address: the connection
/// must have ended well after `limit`.
async fn assert_a_blocked_write_is_let_go_after(
    limit: Duration,
    make: impl FnOnce(SocketAddr) -> UpstreamPool,
) {
    // Far more than the loopback socket buffers hold: the write blocks with most of it unsent.
    const BODY: usize = 64 * 1024 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        stream
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
            .await
            .unwrap();
        (stream, head)
    });
    let pool = make(addr);
    let request = Request::post("/upload")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(vec![b'u'; BODY])))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), pool.send(request, |_| None))
        .await
        .expect("the early answer is passed on")
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"no");
    let (mut stream, _) = upstream.await.unwrap();
    // Well past the limit, the upstream reads again: the proxy must have given up by now.
    tokio::time::sleep(limit * 4).await;
    let (received, ended) = drain(&mut stream, Duration::from_secs(3)).await;
    assert!(
        ended && received < BODY,
        "the proxy kept the connection whose write the upstream left blocked: {received} of \
         {BODY} body bytes delivered after the pause, connection ended: {ended}"
    );
    drop(pool);
}

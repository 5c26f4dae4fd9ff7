//! Adversarial checks of the `verify_url` client's connection attempts, on the in-process proxy
//! with real loopback sockets: a credential API that accepts TCP and then never speaks TLS
//! (never sends its ServerHello) must not hold a connection attempt, its task or its socket,
//! past the client's connect timeout, whether it is the only connection or a second one made
//! while the first is busy.
#![cfg(feature = "proxy")]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use support::{login_at, loopback_tls_acceptor, Harness, HarnessOptions, Reply};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// How long past the connect timeout the proxy may take to close a stalled attempt's socket:
/// generous (a loaded machine), and still well short of forever, or of `VERIFY_TIMEOUT`.
const SLACK: Duration = Duration::from_secs(5);

/// The credential check's own limit in these tests: longer than the connect timeout plus
/// [`SLACK`], so that only the connect timeout can end a stalled attempt in time.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads (and drops: the proxy's ClientHello) from `stream` until the peer closes it (EOF or
/// a reset); Err when it is still open after `within`.
async fn closed_by_the_peer(mut stream: TcpStream, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut received = 0usize;
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    };
    match tokio::time::timeout(within, reading).await {
        Ok(()) => Ok(()),
        Err(_) => Err(format!(
            "the proxy still holds the stalled connection after {:?} ({received} bytes \
             received: its ClientHello)",
            started.elapsed()
        )),
    }
}

/// A proxy whose `verify_url` is `https://{addr}/verify` (trusting `root`, if any), with the
/// `verify_url` client's connect timeout `connect_timeout`.
async fn proxy_verifying_at(
    addr: std::net::SocketAddr,
    root: Option<rustls::pki_types::CertificateDer<'static>>,
    connect_timeout: Duration,
) -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.verify_url = Some(format!("https://{addr}/verify").parse().unwrap());
            s.verify_roots = root.into_iter().collect();
            s.verify_timeout = VERIFY_TIMEOUT;
            s.connect_timeout = connect_timeout;
        }),
        ..HarnessOptions::default()
    })
    .await
}

async fn login(addr: std::net::SocketAddr) -> Reply {
    login_at(addr, "alice", "pw").await
}

/// A login waiting on a connection attempt whose TLS handshake never completes gets its
/// answer at the connect timeout (502 `bad_gateway`, as for an unreachable `verify_url`), not
/// at `verify_timeout`, and the stalled socket is closed then.
#[tokio::test]
async fn a_verify_url_that_stalls_tls_fails_the_login_at_the_connect_timeout() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Held, never written to: a TLS server that never sends its ServerHello.
            let _ = accepted_tx.send((stream, Instant::now()));
        }
    });
    let h = proxy_verifying_at(addr, None, CONNECT_TIMEOUT).await;

    let proxy_addr = h.addr;
    let started = Instant::now();
    let login = tokio::spawn(async move {
        let reply = login(proxy_addr).await;
        (reply, started.elapsed())
    });
    let (stream, at) = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the proxy connects to verify_url")
        .unwrap();
    closed_by_the_peer(
        stream,
        (CONNECT_TIMEOUT + SLACK).saturating_sub(at.elapsed()),
    )
    .await
    .unwrap();

    let (reply, took) = login.await.unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.error_code(), "bad_gateway");
    assert!(reply.set_cookie().is_none());
    assert!(
        took < CONNECT_TIMEOUT + SLACK,
        "answered after {took:?}: the connect timeout is {CONNECT_TIMEOUT:?}, verify_timeout \
         {VERIFY_TIMEOUT:?}"
    );
}

/// A connection attempt belongs to the login waiting for it. While the only connection is
/// busy, a second login's check connects anew; when the credential API accepts that TCP
/// connection but never speaks TLS on it, the login answers 502 `bad_gateway` at the connect
/// timeout and the socket is closed then: nothing goes on connecting in the background (with
/// hyper-util's client, which raced its attempts against the pool, such an attempt once had no
/// limit at all: one task and one socket held forever per attempt). The first connection,
/// handed back, serves the next login.
#[tokio::test]
async fn a_second_connection_stalled_in_tls_fails_its_login_at_the_connect_timeout() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    let (acceptor, root) = loopback_tls_acceptor();
    let root = root.der().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The first connection is served (TLS, HTTP/1.1; its first answer held until `release`);
    // every later one is accepted and never spoken to.
    let (first_request_tx, mut first_request) = mpsc::unbounded_channel::<()>();
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release)));
    let (stalled_tx, mut stalled) = mpsc::unbounded_channel();
    let served = Arc::new(AtomicUsize::new(0));
    let served_by_server = served.clone();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((stream, _)) = listener.accept().await {
            connections += 1;
            if connections > 1 {
                let _ = stalled_tx.send((stream, Instant::now()));
                continue;
            }
            let acceptor = acceptor.clone();
            let first_request_tx = first_request_tx.clone();
            let release = release.clone();
            let served = served_by_server.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let first_request_tx = first_request_tx.clone();
                        let release = release.lock().take();
                        let served = served.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            if let Some(release) = release {
                                let _ = first_request_tx.send(());
                                let _ = release.await;
                            }
                            served.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(
                                        b"{\"user\":\"alice\",\"roles\":[]}",
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let h = proxy_verifying_at(addr, Some(root), CONNECT_TIMEOUT).await;
    let proxy_addr = h.addr;

    // Login A holds the only connection (its answer is held)...
    let first = tokio::spawn(login(proxy_addr));
    tokio::time::timeout(Duration::from_secs(10), first_request.recv())
        .await
        .expect("login A reaches the credential API")
        .unwrap();
    // ... so login B's check starts a second connection, which stalls in its handshake...
    let second = tokio::spawn(login(proxy_addr));
    let (stream, at) = tokio::time::timeout(Duration::from_secs(10), stalled.recv())
        .await
        .expect("login B's check connects anew")
        .unwrap();
    // ... which fails at the connect timeout, its socket closed, while A still waits.
    closed_by_the_peer(
        stream,
        (CONNECT_TIMEOUT + SLACK).saturating_sub(at.elapsed()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("login B is answered")
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::BAD_GATEWAY,
        "login B: {}",
        reply.text()
    );
    assert_eq!(reply.error_code(), "bad_gateway");
    assert!(reply.set_cookie().is_none());

    // A's answer hands the first connection back: A is served, and so is C, on it.
    release_tx.send(()).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("login A is answered")
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "login A: {}", reply.text());
    let reply = login(proxy_addr).await;
    assert_eq!(reply.status, StatusCode::OK, "login C: {}", reply.text());
    assert_eq!(
        served.load(Ordering::SeqCst),
        2,
        "A's and C's checks were served on the first connection"
    );
    assert!(
        stalled.try_recv().is_err(),
        "C's check connected anew instead of taking the pooled connection"
    );
}

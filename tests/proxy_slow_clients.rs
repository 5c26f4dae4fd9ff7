//! Clients that connect and send nothing (or only a piece of the HTTP/2 preface) are closed
//! after `header_read_timeout`, on the public listener (cleartext and TLS) and the admin
//! listener, so they cannot hold the connection slots (`max_connections`) forever; clients
//! that do send still work, including an h2c preface that arrives in pieces.
//! Run: `cargo test --all-features --test proxy_slow_clients`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Long enough that the checks made while silent connections hold the slots (connecting and
/// handshaking a second client, then a probe) are done before it ends, also on a loaded machine.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a test waits for the server to close a silent connection: the timeout plus slack
/// for a loaded machine.
const CLOSE_WITHIN: Duration = Duration::from_secs(7);

/// A proxy with 2 connection slots on each listener and a 2 s header read timeout.
async fn small_proxy() -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.max_connections = 2;
            s.admin_max_connections = 2;
            s.header_read_timeout = HEADER_READ_TIMEOUT;
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// Reads until the server closes `stream` (EOF or reset); returns how long that took. Panics
/// if it is still open after [`CLOSE_WITHIN`] or if the server sent anything.
async fn closed_by_server<S: AsyncRead + Unpin>(stream: &mut S, since: Instant) -> Duration {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(CLOSE_WITHIN, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {CLOSE_WITHIN:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => since.elapsed(),
        Ok(Ok(n)) => panic!(
            "server answered a silent connection: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// True when a request on a new connection gets no HTTP answer (the server closed it at once
/// because every slot is taken).
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return true;
    };
    let _ = stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut out)).await;
    !String::from_utf8_lossy(&out).starts_with("HTTP/1.1")
}

/// Opens two connections that send nothing, checks that they fill both slots, that the server
/// closes them after the header read timeout (not at once), and that a new client is then
/// served: `request` is answered with a status line starting `expected`. The probe needs no
/// pause first: the listener accepts in arrival order, so the two silent connections have their
/// slots before the probe is accepted.
async fn silent_pair_is_closed_then_slots_free(addr: SocketAddr, request: &[u8], expected: &str) {
    let opened = Instant::now();
    let mut a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    assert!(
        refused(addr).await,
        "the two silent connections hold both slots"
    );
    let closed_a = closed_by_server(&mut a, opened).await;
    let closed_b = closed_by_server(&mut b, opened).await;
    for closed in [closed_a, closed_b] {
        assert!(
            closed >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
            "closed after {closed:?}: by the timeout, not at once"
        );
    }
    let answer = answered_once_a_slot_is_free(addr, request).await;
    assert!(
        answer.starts_with(expected),
        "a new client is served: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_on_the_public_listener_are_closed_after_header_read_timeout() {
    let h = small_proxy().await;
    // Unauthenticated session probe: answered (401) means served.
    silent_pair_is_closed_then_slots_free(
        h.addr,
        b"GET /auth/session HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        "HTTP/1.1 401",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_on_the_admin_listener_are_closed_and_healthz_answers_again() {
    let h = small_proxy().await;
    silent_pair_is_closed_then_slots_free(
        h.admin,
        b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        "HTTP/1.1 200",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_of_the_http2_preface_then_silence_is_closed_too() {
    let h = small_proxy().await;
    for piece in [&b"P"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n"] {
        // Timed from before the connect: the server's timer starts at its accept, which may
        // come before the piece is written.
        let opened = Instant::now();
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream.write_all(piece).await.unwrap();
        let closed = closed_by_server(&mut stream, opened).await;
        assert!(closed >= HEADER_READ_TIMEOUT - Duration::from_millis(100));
    }
}

/// A piece of the HTTP/2 preface followed by a half-close (the client shuts down its sending
/// side): no more bytes can come, so the connection is handed on and closed at once, and the
/// proxy serves on. Before, the preface sniffer spun on the socket's lasting readiness: a
/// worker thread at 100% for good, which neither `header_read_timeout` nor SIGTERM ended (found
/// by the admin listener's fuzz corpus), on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_of_the_http2_preface_then_a_half_close_is_closed_at_once() {
    let h = small_proxy().await;
    for addr in [h.addr, h.admin] {
        for piece in [&b"P"[..], b"PR", b"PRI * HTTP/2.0\r\n\r\nSM\r\n"] {
            let opened = Instant::now();
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(piece).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut out = Vec::new();
            let read = tokio::time::timeout(CLOSE_WITHIN, stream.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "{piece:?}: still open after {CLOSE_WITHIN:?}");
            assert!(
                opened.elapsed() < HEADER_READ_TIMEOUT,
                "{piece:?}: closed after {:?}, by the timeout, not at once",
                opened.elapsed()
            );
        }
        // Both workers are free: the proxy answers (a spinning sniffer held one for good).
        let probe: &[u8] = if addr == h.admin {
            b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
        } else {
            b"GET /auth/session HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        };
        let answer = answered_once_a_slot_is_free(addr, probe).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer:?}");
    }
}

/// An IO whose first write sends only `first` bytes, and whose next write waits `pause`:
/// an HTTP/2 client whose preface reaches the server in two pieces.
struct SplitFirstWrite {
    inner: TcpStream,
    first: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    state: u8,
}

impl AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match this.state {
            0 => {
                let n = buf.len().min(this.first);
                let written =
                    std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
                this.state = 1;
                Poll::Ready(Ok(written))
            }
            1 => {
                if let Some(pause) = this.pause.as_mut() {
                    std::task::ready!(pause.as_mut().poll(cx));
                }
                this.state = 2;
                Pin::new(&mut this.inner).poll_write(cx, buf)
            }
            _ => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future as _;

async fn h2c_status<IO>(io: IO, addr: SocketAddr) -> StatusCode
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, _) = support_h2::client(io).await;
    let request = Request::builder()
        .uri(format!("http://{addr}/auth/session"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    response.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served_also_when_its_preface_comes_in_pieces() {
    // The header read timeout without the 2-slot cap: the connections follow one another, and
    // each one's slot is given back only once the server has seen the client leave, which a
    // loaded machine may delay past the next connect.
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.header_read_timeout = HEADER_READ_TIMEOUT),
        ..HarnessOptions::default()
    })
    .await;
    // In one piece.
    let stream = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(h2c_status(stream, h.addr).await, StatusCode::UNAUTHORIZED);
    // 5 bytes ("PRI *"), a pause well within the timeout, then the rest: still HTTP/2. The
    // server must notice the rest arriving while it waits for it (bytes it already peeked stay
    // unread); had it missed them, the timeout would close the connection and the h2
    // handshake or request would fail here.
    for ms in [0, 1, 10, 50, 400] {
        let pause = Duration::from_millis(ms);
        let io = SplitFirstWrite {
            inner: TcpStream::connect(h.addr).await.unwrap(),
            first: 5,
            pause: Some(Box::pin(tokio::time::sleep(pause))),
            state: 0,
        };
        assert_eq!(h2c_status(io, h.addr).await, StatusCode::UNAUTHORIZED);
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

type TlsProxy = TlsHarness;

async fn small_tls_proxy() -> TlsProxy {
    start_tls("slow-tls", |s| {
        s.max_connections = 2;
        s.header_read_timeout = HEADER_READ_TIMEOUT;
    })
    .await
}

/// One TLS connection with a finished handshake; an error when the server closed it first
/// (which it does at once when every slot is taken).
async fn try_tls_connect(
    tls: &TlsProxy,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = support::tls_connector(tls.roots.clone(), alpn);
    let tcp = TcpStream::connect(tls.h.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// [`try_tls_connect`], tried again for up to 10 s while the server closes the connection
/// during the handshake: right after the server closed the connections holding the slots, a
/// new client may connect a moment before those slots are given back.
async fn tls_connect(tls: &TlsProxy, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_tls_connect(tls, alpn).await {
            Ok(stream) => return stream,
            Err(e) if Instant::now() >= deadline => panic!("TLS handshake: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// True when a new TLS client is closed before its handshake ends (every slot is taken). A
/// plain-text probe would not tell: a TLS listener never answers it with HTTP.
async fn tls_refused(tls: &TlsProxy) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), try_tls_connect(tls, &[])).await {
        Ok(Ok(_served)) => false,
        Ok(Err(_)) => true,
        Err(_) => panic!("the TLS handshake neither ended nor failed within 5 s"),
    }
}

/// Over TLS, HTTP/2 is chosen by ALPN only (RFC 9113 §3.2; CONFIG.md `tls_cert`): the HTTP/2
/// preface sent under ALPN `http/1.1` (or none) is not served as HTTP/2. It was, through
/// hyper-util's version detection, and without the proxy's HTTP/2 limits (no idle close, no
/// count of reset streams: 400 rapid resets on one connection all reached the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http2_preface_under_http1_alpn_is_not_served_as_http2() {
    let tls = small_tls_proxy().await;
    let alpns: [&[&[u8]]; 2] = [&[b"http/1.1"], &[]];
    for alpn in alpns {
        let mut stream = tls_connect(&tls, alpn).await;
        // The preface, then an empty SETTINGS frame.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        stream.flush().await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
        // Closed, with or without an HTTP/1 error answer: either way not an HTTP/2 server's
        // SETTINGS frame (9-byte header, type 4 on stream 0).
        let _ = read
            .await
            .expect("the connection was neither answered nor closed");
        let http2_settings = answer.len() >= 9 && answer[3] == 0x04 && answer[5..9] == [0; 4];
        assert!(
            !http2_settings,
            "{alpn:?}: served as HTTP/2: {:?}",
            String::from_utf8_lossy(&answer)
        );
        if !answer.is_empty() {
            assert!(answer.starts_with(b"HTTP/1.1 "), "{alpn:?}: {answer:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_that_never_send_a_request_are_closed_after_header_read_timeout() {
    let tls = small_tls_proxy().await;

    // No ClientHello at all.
    let opened = Instant::now();
    let mut tcp = TcpStream::connect(tls.h.addr).await.unwrap();
    let closed = closed_by_server(&mut tcp, opened).await;
    assert!(closed >= HEADER_READ_TIMEOUT - Duration::from_millis(100));

    // A finished handshake (HTTP/2 or HTTP/1.1 by ALPN, or no ALPN), then no request; and
    // only a piece of the HTTP/2 preface, whatever the ALPN. Two at a time, filling both
    // slots. Under HTTP/1 ALPN a piece of the preface was held for ever: hyper-util's version
    // detection, which the auto builder runs whatever it is set to, read on with no timer.
    let alpns: [&[&[u8]]; 3] = [&[b"h2"], &[b"http/1.1"], &[]];
    for alpn in alpns {
        // Timed from before the first connect: the timeout covers the handshakes too (it runs
        // from the server's accept), so the time after them would be short of it by as much as
        // two handshakes took.
        let opened = Instant::now();
        let mut a = tls_connect(&tls, alpn).await;
        let mut b = tls_connect(&tls, alpn).await;
        let piece: &[u8] = if alpn == [b"h2"] {
            b"PRI * HTTP/2.0\r\n"
        } else {
            b"P"
        };
        b.write_all(piece).await.unwrap();
        b.flush().await.unwrap();
        assert!(tls_refused(&tls).await, "{alpn:?}: both slots taken");
        for stream in [&mut a, &mut b] {
            let closed = closed_by_server(stream, opened).await;
            assert!(
                closed >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
                "{alpn:?}: closed after {closed:?}"
            );
        }
    }

    // The slots are free again: a client that sends its request is served, over either
    // protocol.
    let (mut sender, _) = support_h2::client(tls_connect(&tls, &[b"h2"]).await).await;
    let response = sender
        .send_request(
            Request::builder()
                .uri("https://localhost/auth/session")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    drop(sender);
    let stream = tls_connect(&tls, &[]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::builder()
                .uri("/auth/session")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

//! `server.http2_idle_timeout`: an HTTP/2 client connection with no stream open that long is
//! closed (GOAWAY, then the socket), so a client that completes the preface and then waits
//! cannot hold a `max_connections` slot forever; a stream still in progress (a request body
//! arriving slowly) keeps its connection, and the clock restarts when it ends.
//! Run: `cargo test --all-features --test proxy_http2_idle`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::proxy::config::{ProxyConfig, DEFAULT_HTTP2_IDLE_TIMEOUT};
use countersign::proxy::server::ProxySettings;
use http::{Method, Request, StatusCode};
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Long enough for what a test does within it (a probe while a connection holds the only slot;
/// the next request right after a stream ended) on a loaded machine.
const IDLE: Duration = Duration::from_secs(2);
/// Slack for a loaded machine on top of the timeout, for "closed by then".
const SLACK: Duration = Duration::from_secs(4);
/// Timers may fire a little early against `Instant` (millisecond granularity).
const EARLY: Duration = Duration::from_millis(50);

/// The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, sections 3.4 and 6.5).
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const FRAME_GOAWAY: u8 = 0x7;

async fn proxy(max_connections: usize) -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.http2_idle_timeout = IDLE;
            // Also the time a client gets to close after the GOAWAY.
            s.header_read_timeout = IDLE;
            s.max_connections = max_connections;
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// Reads HTTP/2 frames until the server closes the connection; returns the frame types seen
/// and when the socket closed. Panics if it stays open past `deadline`.
async fn frames_until_closed(stream: &mut TcpStream, deadline: Duration) -> (Vec<u8>, Instant) {
    let mut bytes = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(deadline, read_all)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {deadline:?}"));
    let mut types = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    (types, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_stream_is_closed_after_the_idle_timeout_and_frees_its_slot() {
    let h = proxy(1).await;
    // Timed from before the connect: the server's clock starts once it has the preface, which
    // may be before this task gets to run again after writing it.
    let opened = Instant::now();
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(PREFACE_AND_SETTINGS).await.unwrap();

    // It holds the only slot meanwhile: an HTTP/1 client is not served. (No pause first: the
    // listener accepts in arrival order, so the slot is taken before this client is accepted.)
    let mut other = TcpStream::connect(h.addr).await.unwrap();
    other
        .write_all(b"GET /auth/session HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), other.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1"),
        "the idle HTTP/2 connection holds the only slot"
    );

    let (frames, closed) = frames_until_closed(&mut stream, IDLE * 2 + SLACK).await;
    let after = closed - opened;
    assert!(
        after >= IDLE - EARLY,
        "closed after {after:?}: by the timeout, not at once"
    );
    assert_eq!(
        frames.first(),
        Some(&0x4),
        "the server's SETTINGS first: {frames:?}"
    );
    assert!(
        frames.contains(&FRAME_GOAWAY),
        "closed with GOAWAY: {frames:?}"
    );

    // The slot is free again: once the server has ended the connection, which it does just
    // after closing the socket (a client that saw the close may connect a moment before).
    let answer = answered_once_a_slot_is_free(
        h.addr,
        b"GET /auth/session HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
}

/// A request body sent piece by piece through a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_keeps_the_connection_and_the_clock_starts_when_it_ends() {
    let h = proxy(100).await;
    let (mut sender, conn) = support_h2::client(TcpStream::connect(h.addr).await.unwrap()).await;

    // A login whose body arrives over 3 idle timeouts: the stream is open all along.
    let (chunks, body) = mpsc::channel(4);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/auth/login", h.addr))
        .header("content-type", "application/json")
        .header("origin", ORIGIN)
        .body(ChannelBody(body))
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    chunks
        .send(Bytes::from_static(b"{\"username\":"))
        .await
        .unwrap();
    tokio::time::sleep(IDLE * 3).await;
    assert!(!conn.is_finished(), "closed while a stream was open");
    chunks
        .send(Bytes::from_static(b"\"alice\",\"password\":\"wrong\"}"))
        .await
        .unwrap();
    drop(chunks);
    let response = response
        .await
        .unwrap()
        .expect("the slow request is answered");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    drop(response);

    // The connection still serves right after it (a body-less request: a closed channel).
    // Timed from before this last request: its stream ends on the server (and the idle clock
    // starts) before the answer reaches this task.
    let last_stream_started = Instant::now();
    sender.ready().await.expect("still open");
    let request = Request::builder()
        .uri(format!("http://{}/auth/session", h.addr))
        .body(ChannelBody(mpsc::channel(1).1))
        .unwrap();
    let reply = sender.send_request(request).await.expect("served");
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    drop(reply);

    // Now no stream is open: the connection is closed one idle timeout later.
    tokio::time::timeout(IDLE + SLACK, conn)
        .await
        .expect("an idle connection is closed")
        .unwrap()
        .ok();
    let after = last_stream_started.elapsed();
    assert!(
        after >= IDLE - EARLY,
        "closed {after:?} after the last stream began"
    );
}

// ---------------------------------------------------------------------------------------------
// Slow downloads: an answer still being sent keeps its connection
// ---------------------------------------------------------------------------------------------

/// Size of each slow download: read at 16 KiB per [`READ_PAUSE`], it takes at least
/// 96 x 60 ms = 5.8 s, well past the idle timeout plus the GOAWAY grace (4 s).
const DOWNLOAD_BYTES: usize = 1536 * 1024;
const READ_PAUSE: Duration = Duration::from_millis(60);

/// A proxy with a 2 s `http2_idle_timeout`, GOAWAY grace and `send_timeout`, serving a
/// `DOWNLOAD_BYTES` static file at `/big.bin` (answered as one frame of the whole file).
async fn proxy_with_a_big_static_file() -> Harness {
    let dir = temp_dir("h2-slow-download");
    let root = dir.join("dist");
    write(&root.join("index.html"), "<!doctype html>");
    std::fs::write(root.join("big.bin"), vec![7u8; DOWNLOAD_BYTES]).unwrap();
    let site = countersign::proxy::static_files::Site::Dir(
        countersign::proxy::static_files::StaticDir::new(&root).unwrap(),
    );
    Harness::start_with(HarnessOptions {
        site: Some(site),
        files: Some(dir),
        tweak: Box::new(|s, _| {
            s.http2_idle_timeout = IDLE;
            s.header_read_timeout = IDLE;
            s.send_timeout = IDLE;
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// An h2c connection of a slow but steady client: 64 KiB stream windows (no adaptive growth)
/// and `connection_window`; hyper's client gives credit back as a body is read.
async fn slow_h2_client(
    addr: std::net::SocketAddr,
    connection_window: u32,
) -> hyper::client::conn::http2::SendRequest<ChannelBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(connection_window)
        .adaptive_window(false)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// A body-less GET of `path`.
fn get_request(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> Request<ChannelBody> {
    let mut request = Request::builder().uri(format!("http://{addr}{path}"));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.body(ChannelBody(mpsc::channel(1).1)).unwrap()
}

/// Reads an answer at a steady 16 KiB per [`READ_PAUSE`] (a pause after each frame for its
/// size: frames cut short by the window, as h2 fills whatever credit it has, cost no more time
/// than their size). Returns the bytes received, or how the download ended early.
async fn read_slowly(response: http::Response<hyper::body::Incoming>) -> Result<usize, String> {
    use http_body_util::BodyExt as _;
    if response.status() != StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("cut off after {received} bytes: {e}"))?;
        if let Some(data) = frame.data_ref() {
            assert!(
                data.iter().all(|&b| b == data[0]),
                "one byte value per answer"
            );
            received += data.len();
            let pause = READ_PAUSE.as_micros() * data.len() as u128 / 16_384;
            tokio::time::sleep(Duration::from_micros(pause as u64)).await;
        }
    }
    Ok(received)
}

/// Downloads `path` over its own connection (64 KiB windows) with [`read_slowly`].
async fn slow_h2_download(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> Result<usize, String> {
    let mut sender = slow_h2_client(addr, 65_535).await;
    let response = sender
        .send_request(get_request(addr, path, cookie))
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    read_slowly(response).await
}

/// docs/CONFIG.md `http2_idle_timeout`, `send_timeout`: a client reading a large answer slowly
/// but steadily (taking far longer than `http2_idle_timeout` plus the GOAWAY grace) gets every
/// byte, whether the answer is a static file (which hyper hands to h2 as one frame, all of it
/// still waiting for the client's credit once the body has ended) or streamed from an upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http2_downloads_outlive_the_idle_timeout_and_arrive_whole() {
    let h = proxy_with_a_big_static_file().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let started = Instant::now();
    let proxied = format!("/api/big?bytes={DOWNLOAD_BYTES}");
    let (from_file, from_upstream) = tokio::join!(
        slow_h2_download(h.addr, "/big.bin", None),
        slow_h2_download(h.addr, &proxied, Some(&login.cookie)),
    );
    assert_eq!(from_file, Ok(DOWNLOAD_BYTES), "the static file");
    assert_eq!(from_upstream, Ok(DOWNLOAD_BYTES), "the proxied answer");
    // Paced by the client, so past the idle timeout and the grace: the timers were exercised.
    assert!(started.elapsed() > IDLE * 2, "{:?}", started.elapsed());
}

/// docs/CONFIG.md `send_timeout`, per stream: a client keeping one download trickling cannot
/// hold the other streams of its connection (each could hold an upstream request and its
/// answer) without ever giving them credit. The connection is closed once one stream has
/// waited `send_timeout` (2 s here), long before the steady download would have ended (5.8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_without_credit_is_cut_even_while_another_one_moves() {
    let h = proxy_with_a_big_static_file().await;
    // A connection window large enough that the 64 KiB the stalled stream never reads do not
    // hold the moving one back.
    let mut sender = slow_h2_client(h.addr, 16 << 20).await;
    // Before the stalled stream's last progress (the server hands over what the window takes
    // before this task sees the answer).
    let started = Instant::now();
    let never_read = sender
        .send_request(get_request(h.addr, "/big.bin", None))
        .await
        .expect("answered");
    let moving = sender
        .send_request(get_request(h.addr, "/big.bin", None))
        .await
        .expect("answered");
    let outcome = read_slowly(moving).await;
    let after = started.elapsed();
    assert!(
        outcome.is_err(),
        "the steady download kept a stalled stream for {after:?}: {outcome:?}"
    );
    // Not before `send_timeout`; by 1.25 times it, plus slack.
    assert!(
        after >= IDLE - EARLY && after < IDLE * 2 + SLACK,
        "{after:?}"
    );
    drop(never_read);
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
     [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
     [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n";

fn with_server_line(line: &str) -> String {
    BASE.replace(
        "public_origin = \"http://localhost:8080\"\n",
        &format!("public_origin = \"http://localhost:8080\"\n{line}\n"),
    )
}

fn parse(text: &str) -> Result<ProxyConfig, countersign::proxy::config::ConfigError> {
    ProxyConfig::parse(text, Path::new("/etc/countersign/proxy.toml"))
}

#[test]
fn the_key_defaults_to_60s_and_reaches_the_settings() {
    assert_eq!(DEFAULT_HTTP2_IDLE_TIMEOUT, Duration::from_secs(60));
    let config = parse(BASE).unwrap();
    assert_eq!(config.server.http2_idle_timeout, Duration::from_secs(60));
    let config = parse(&with_server_line("http2_idle_timeout = \"5m\"")).unwrap();
    assert_eq!(config.server.http2_idle_timeout, Duration::from_secs(300));
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.http2_idle_timeout, Duration::from_secs(300));
}

#[test]
fn bad_values_name_the_file_the_key_and_the_problem() {
    for value in ["\"0s\"", "\"soon\"", "60"] {
        let error = parse(&with_server_line(&format!("http2_idle_timeout = {value}")))
            .expect_err(value)
            .to_string();
        assert!(
            error.contains("/etc/countersign/proxy.toml") && error.contains("http2_idle_timeout"),
            "{value}: {error}"
        );
    }
}

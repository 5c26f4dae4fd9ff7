//! `server.http2_idle_timeout`: an HTTP/2 client connection with no stream open that long is
//! closed (GOAWAY, then the socket), so a client that completes the preface and then waits
//! cannot hold a `max_connections` slot forever; a stream still in progress (a request body
//! arriving slowly) keeps its connection, and the clock restarts when it ends.
//! Run: `cargo test --all-features --test proxy_http2_idle`.
#![cfg(feature = "proxy")]

mod support;

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
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);

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

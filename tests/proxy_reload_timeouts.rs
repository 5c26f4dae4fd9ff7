//! The server's timeouts and each upstream's `connect_timeout` are live keys of `proxy.toml`:
//! a reload (SIGHUP) applies `server.request_timeout` to the requests that start after it,
//! `server.header_read_timeout`, `send_timeout` and `http2_idle_timeout` to the connections
//! accepted after it (those open keep the values they started with), `server.shutdown_grace`
//! to the shutdown that starts after it, and `upstream[i].connect_timeout` to the upstream
//! connections made after it. Against the real binary with `--workers 2` (two event loops).
//!
//! Run: `cargo test --all-features --test proxy_reload_timeouts`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::SystemClock;
use http::{Method, StatusCode};
use support::*;
use support_run::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `proxy.toml`: [`config_text`] with `server` in place of its `shutdown_grace` line and
/// `upstream` added to its `[[upstream]]`.
fn config(listen: SocketAddr, upstream_url: &str, server: &str, upstream: &str) -> String {
    config_text(&listen.to_string(), None, upstream_url)
        .replace("shutdown_grace = \"2s\"\n", &format!("{server}\n"))
        + upstream
        + "\n"
}

struct Running {
    proxy: RunningProxy,
    addr: SocketAddr,
    dir: TestDir,
    upstream_url: String,
    upstream_extra: String,
}

impl Running {
    /// Rewrites `proxy.toml` with `server` (its `[server]` extras) and sends SIGHUP; waits for
    /// the info line naming `key` as applied.
    fn reload(&self, server: &str, key: &str) -> String {
        let staged = self.dir.join(".proxy.toml.new");
        write(
            &staged,
            &config(self.addr, &self.upstream_url, server, &self.upstream_extra),
        );
        std::fs::rename(&staged, self.dir.join("proxy.toml")).unwrap();
        self.proxy.signal("HUP");
        let applied =
            self.proxy
                .wait_json_messages("INFO", &["SIGHUP:", "proxy.toml: applied", key], 1);
        assert!(
            self.proxy.json_messages("WARN", &["restart"]).is_empty(),
            "{}",
            self.proxy.log()
        );
        applied[0].clone()
    }
}

/// `countersign run --workers 2` with `server` in `[server]` and `upstream` in its
/// `[[upstream]]` (at `upstream_url`: the test's upstream when None).
async fn start(
    tag: &str,
    server: &str,
    upstream_url: Option<String>,
    upstream: &str,
) -> (Running, Option<Upstream>) {
    let dir = temp_dir(tag);
    let (served, url) = match upstream_url {
        Some(url) => (None, url),
        None => {
            let served = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
            let url = served.url();
            (Some(served), url)
        }
    };
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let file = dir.join("proxy.toml");
        write(&file, &config(addr, &url, server, upstream));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    (
        Running {
            proxy,
            addr,
            dir,
            upstream_url: url,
            upstream_extra: upstream.to_owned(),
        },
        served,
    )
}

/// The head of a public POST announcing a 10-byte body, with `extra` field lines.
fn post_head(extra: &str) -> String {
    format!(
        "POST /api/x HTTP/1.1\r\nHost: app.test\r\nOrigin: {ORIGIN}\r\n\
         Content-Type: text/plain\r\nContent-Length: 10\r\n{extra}\r\n"
    )
}

/// A public POST whose body (10 bytes announced) stops after 5: it waits on
/// `request_timeout` (or a shutdown).
async fn stalled_post(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("{}hello", post_head("")).as_bytes())
        .await
        .unwrap();
    stream
}

/// [`stalled_post`], returned once the proxy holds it: the head asks `Expect: 100-continue`,
/// and hyper answers `100 Continue` only when the proxy first reads the body; then the 5
/// bytes follow (and the body stalls there).
async fn stalled_post_in_flight(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(post_head("Expect: 100-continue\r\n").as_bytes())
        .await
        .unwrap();
    let interim = read_answer(&mut stream, "\r\n\r\n", Duration::from_secs(10)).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "not read by the proxy: {interim}"
    );
    stream.write_all(b"hello").await.unwrap();
    stream
}

/// What `stream` gets until the peer closes it (or `limit` passes: panics), and when it
/// closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Instant) {
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
    let closed = tokio::time::timeout(limit, read_all)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {limit:?}"));
    (bytes, closed)
}

/// The answer head and body `stream` gets within `limit` (read until it holds `until`).
async fn read_answer(stream: &mut TcpStream, until: &str, limit: Duration) -> String {
    let mut bytes = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&bytes).contains(until) {
                return;
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("no answer within {limit:?}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `request_timeout` lowered by a reload: the next request whose body stalls is answered
/// 408 `request_timeout` after the new value, on either event loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_request_timeout_applies_to_the_next_request() {
    let (running, _upstream) = start(
        "reload-request-timeout",
        "shutdown_grace = \"2s\"\nrequest_timeout = \"6s\"",
        None,
        "auth = \"none\"",
    )
    .await;
    let applied = running.reload(
        "shutdown_grace = \"2s\"\nrequest_timeout = \"1s\"",
        "server.request_timeout",
    );
    assert!(
        applied.contains("applied 1 key: server.request_timeout (from now on)"),
        "{applied}"
    );
    // Several connections: `SO_REUSEPORT` spreads them over both event loops.
    let answers = (0..4).map(|_| async {
        let mut stream = stalled_post(running.addr).await;
        let started = Instant::now();
        let answer = read_answer(&mut stream, "}", Duration::from_secs(10)).await;
        (answer, started.elapsed())
    });
    for (answer, took) in futures_util::future::join_all(answers).await {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains(r#"{"error":"request_timeout"}"#),
            "{answer}"
        );
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(4),
            "answered after {took:?}, not after the reloaded 1 s"
        );
    }
}

/// `header_read_timeout` lowered by a reload: a connection accepted after it that sends half
/// a request head is closed after the new value; one accepted before keeps the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_header_read_timeout_applies_to_connections_accepted_after_it() {
    const HALF_A_HEAD: &[u8] = b"GET /api/x HTTP/1.1\r\nHost: app.test\r\n";
    let (running, _upstream) = start(
        "reload-header-read-timeout",
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"7s\"",
        None,
        "",
    )
    .await;
    let mut before = TcpStream::connect(running.addr).await.unwrap();
    before.write_all(HALF_A_HEAD).await.unwrap();
    let before_opened = Instant::now();
    let applied = running.reload(
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"1s\"",
        "server.header_read_timeout",
    );
    assert!(
        applied.contains(
            "applied 1 key: server.header_read_timeout (applies to connections accepted from \
             now on; connections already open keep the values they started with)"
        ),
        "{applied}"
    );

    let mut after = TcpStream::connect(running.addr).await.unwrap();
    after.write_all(HALF_A_HEAD).await.unwrap();
    let after_opened = Instant::now();
    let (_, closed) = read_until_closed(&mut after, Duration::from_secs(6)).await;
    let took = closed - after_opened;
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "the new connection closed after {took:?}, not after the reloaded 1 s"
    );

    // The connection opened before the reload is still open, and closes after the old 7 s.
    let (_, closed) = read_until_closed(&mut before, Duration::from_secs(12)).await;
    let took = closed - before_opened;
    assert!(
        took >= Duration::from_millis(6500),
        "the connection opened before the reload closed after {took:?}, not the old 7 s"
    );
}

/// `http2_idle_timeout` lowered by a reload: an HTTP/2 connection accepted after it with no
/// stream gets its GOAWAY after the new value; one accepted before does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_http2_idle_timeout_applies_to_connections_accepted_after_it() {
    const PREFACE_AND_SETTINGS: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (running, _upstream) = start(
        "reload-http2-idle-timeout",
        "shutdown_grace = \"2s\"\nhttp2_idle_timeout = \"60s\"\nheader_read_timeout = \"1s\"",
        None,
        "",
    )
    .await;
    let mut before = TcpStream::connect(running.addr).await.unwrap();
    before.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let applied = running.reload(
        "shutdown_grace = \"2s\"\nhttp2_idle_timeout = \"1s\"\nheader_read_timeout = \"1s\"",
        "server.http2_idle_timeout",
    );
    assert!(
        applied.contains("server.http2_idle_timeout (applies to connections accepted from now on"),
        "{applied}"
    );

    let mut after = TcpStream::connect(running.addr).await.unwrap();
    after.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let after_opened = Instant::now();
    // GOAWAY after the idle timeout; closed once the client had `header_read_timeout` to
    // close it itself.
    let (frames, closed) = read_until_closed(&mut after, Duration::from_secs(8)).await;
    let took = closed - after_opened;
    assert!(
        frame_types(&frames).contains(&0x7),
        "no GOAWAY: {:?}",
        frame_types(&frames)
    );
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "the new connection closed after {took:?}, not after the reloaded 1 s (+ 1 s)"
    );

    // The connection accepted before the reload keeps 60 s: no GOAWAY, still open.
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    let waited = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match before.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "the connection opened before the reload closed"
    );
    assert!(
        !frame_types(&seen).contains(&0x7),
        "GOAWAY on the connection opened before the reload: {:?}",
        frame_types(&seen)
    );
}

/// The HTTP/2 frame types in `bytes` (a server's frames, from the start).
fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    types
}

/// A GET of a 1 GiB answer, sent and then not read: once the socket buffers are full the
/// proxy's writes block, which `send_timeout` bounds.
async fn unread_download(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /api/big?bytes={} HTTP/1.1\r\nHost: app.test\r\n\r\n",
                1u64 << 30
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// Reads `stream` until the proxy closes it or `cap` bytes came (the download still
/// flowing): whether it was closed.
async fn closed_within(stream: &mut TcpStream, cap: usize, limit: Duration) -> bool {
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => total += n,
            }
            if total >= cap {
                return false;
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("neither closed nor {cap} bytes within {limit:?}"))
}

/// `send_timeout` lowered by a reload: a connection accepted after it whose client stops
/// reading a large answer is closed once its writes have been blocked for the new value; one
/// accepted before keeps the old 60 s and its download flows again when read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_send_timeout_applies_to_connections_accepted_after_it() {
    const CAP: usize = 64 << 20;
    let (running, _upstream) = start(
        "reload-send-timeout",
        "shutdown_grace = \"2s\"\nsend_timeout = \"60s\"",
        None,
        "auth = \"none\"",
    )
    .await;
    let mut before = unread_download(running.addr).await;
    let applied = running.reload(
        "shutdown_grace = \"2s\"\nsend_timeout = \"1s\"",
        "server.send_timeout",
    );
    assert!(
        applied.contains(
            "applied 1 key: server.send_timeout (applies to connections accepted from now on; \
             connections already open keep the values they started with)"
        ),
        "{applied}"
    );
    let mut after = unread_download(running.addr).await;
    // Well past the new 1 s (detected within 1.25 times it) once the buffers filled.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        closed_within(&mut after, CAP, Duration::from_secs(20)).await,
        "the connection accepted after the reload still streams after 4 s unread"
    );
    assert!(
        !closed_within(&mut before, CAP, Duration::from_secs(20)).await,
        "the connection accepted before the reload was closed: it keeps the old 60 s"
    );
}

/// `shutdown_grace` lowered by a reload: a SIGTERM with a request in flight ends the process
/// after the new grace, not the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_grace_bounds_the_next_shutdown() {
    let (mut running, _upstream) = start(
        "reload-shutdown-grace",
        "shutdown_grace = \"30s\"",
        None,
        "auth = \"none\"",
    )
    .await;
    let applied = running.reload("shutdown_grace = \"1s\"", "server.shutdown_grace");
    assert!(
        applied.contains("applied 1 key: server.shutdown_grace (from now on)"),
        "{applied}"
    );
    // In flight (the proxy is reading it): its body stalls (request_timeout is 60 s by
    // default), so the shutdown waits for it until the end of the grace.
    let _stalled = stalled_post_in_flight(running.addr).await;
    // Before the signal: the grace starts after this, however late the test runs.
    let stopping = Instant::now();
    running.proxy.signal("TERM");
    let exited = running.proxy.wait_exit(Duration::from_secs(20));
    let took = stopping.elapsed();
    assert!(exited.is_some(), "still running 20 s after SIGTERM");
    // Not at once (the request was waited for), and far from the old 30 s.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "stopped after {took:?}, not after the reloaded 1 s grace"
    );
}

/// A loopback address whose connects hang (as in tests/proxy_settings.rs): a listener with a
/// backlog of 0 that never accepts, its queue filled first, so Linux drops further SYNs.
/// Returns the listener and the fillers (both must stay alive).
async fn hanging_address() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            // The queue is full: this connect hangs, as the proxy's will.
            Err(_) => return (listener, fillers, addr),
            Ok(Err(e)) => panic!("filler connect failed: {e}"),
        }
    }
    panic!("the accept queue never filled; connects to {addr} do not hang on this machine");
}

/// `upstream[0].connect_timeout` lowered by a reload: a request to an upstream whose connects
/// hang gets the connect timeout's answer (502 `bad_gateway`, as before the reload) after the
/// new value, not the old one, on either event loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_connect_timeout_applies_to_the_next_upstream_connection() {
    let (_listener, _fillers, hanging) = hanging_address().await;
    let upstream = |connect_timeout: &str| {
        format!("auth = \"none\"\ntimeout = \"20s\"\nconnect_timeout = \"{connect_timeout}\"")
    };
    let (mut running, _) = start(
        "reload-connect-timeout",
        "shutdown_grace = \"2s\"",
        Some(format!("http://{hanging}")),
        &upstream("10s"),
    )
    .await;
    running.upstream_extra = upstream("300ms");
    let applied = running.reload("shutdown_grace = \"2s\"", "upstream[0].connect_timeout");
    assert!(
        applied.contains(
            "applied 1 key: upstream[0].connect_timeout (applies to upstream connections made \
             from now on; pooled connections are unaffected)"
        ),
        "{applied}"
    );
    let answers = (0..4).map(|_| async {
        let started = Instant::now();
        let reply = send(running.addr, Method::GET, "/api/x", &[], Bytes::new()).await;
        (reply, started.elapsed())
    });
    for (reply, took) in futures_util::future::join_all(answers).await {
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.error_code(), "bad_gateway");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(4),
            "answered after {took:?}, not after the reloaded 300 ms"
        );
    }
}

/// A reload whose new value is invalid applies nothing (the key and the problem named), as
/// for every other key: the running timeout stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reloaded_timeout_applies_nothing() {
    let (running, _upstream) = start(
        "reload-request-timeout-invalid",
        "shutdown_grace = \"2s\"\nrequest_timeout = \"1s\"",
        None,
        "auth = \"none\"",
    )
    .await;
    write(
        &running.dir.join("proxy.toml"),
        &config(
            running.addr,
            &running.upstream_url,
            "shutdown_grace = \"2s\"\nrequest_timeout = \"soon\"\nheader_read_timeout = \"9s\"",
            &running.upstream_extra,
        ),
    );
    running.proxy.signal("HUP");
    let refused = running
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert!(refused[0].contains("server.request_timeout"), "{refused:?}");
    let mut stream = stalled_post(running.addr).await;
    let started = Instant::now();
    let answer = read_answer(&mut stream, "}", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(running.proxy.json_messages("INFO", &["applied"]).is_empty());
}

//! HTTP/2 abuse against the public listener of the real binary (`countersign run`), with a
//! real upstream behind the `VerifyLayer`, over h2c prior knowledge and hand-written frames:
//! rapid reset (CVE-2023-44487) before and just after the server accepts each stream,
//! HPACK-decoded header lists far past `server.max_header_bytes`, SETTINGS and PING floods
//! from a client that never reads, a client that never opens its flow-control window, and
//! streams past `server.http2_max_concurrent_streams`. Both rapid resets again over TLS
//! (HTTP/2 negotiated by ALPN), against the in-process proxy serving HTTPS (`start_tls`): the
//! TLS listener's connections have the same bounds. Each test asserts a bound (requests
//! reaching the upstream, the connection closed, the proxy's resident memory), never a speed.
//!
//! Run: `cargo test --all-features --test proxy_http2_abuse`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::clock::SystemClock;
use http::{Method, StatusCode};
use support::*;
use support_h2::raw::{Client, Seen};
use support_h2::{
    h2_frame, hpack_int, ACK, CANCEL, CONTINUATION, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM,
    HEADERS, INITIAL_WINDOW_SIZE, PING, PREFACE, REFUSED_STREAM, RST_STREAM, SETTINGS,
    WINDOW_UPDATE,
};
use support_run::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------------------------

/// `server.send_timeout` of the proxies here: how long a stalled client (a full socket, or
/// no flow-control credit) may hold its connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// `server.http2_max_concurrent_streams` of the proxies here.
const MAX_STREAMS: u32 = 8;
/// Longest any bounded outcome may take here on a loaded machine (a connection closed after
/// `SEND_TIMEOUT`, a flood answered).
const LIMIT: Duration = Duration::from_secs(20);

struct Proxy {
    process: RunningProxy,
    addr: SocketAddr,
    /// Its admin listener (`/metrics`).
    admin: SocketAddr,
    upstream: Upstream,
    login: Login,
    _dir: TestDir,
}

impl Proxy {
    /// `countersign run` (one event loop) in front of a verifying upstream, with
    /// [`SEND_TIMEOUT`], [`MAX_STREAMS`] and `extra` in `[server]`; alice logged in.
    async fn start(tag: &str, extra: &str) -> Proxy {
        let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
        let url = upstream.url();
        let dir = temp_dir(tag);
        write(&dir.join("keys.toml"), &keyring_file_text("k1"));
        write(&dir.join("users.toml"), &users_file_text());
        let server = format!(
            "shutdown_grace = \"2s\"\nsend_timeout = \"{}s\"\n\
             http2_max_concurrent_streams = {MAX_STREAMS}\n{extra}",
            SEND_TIMEOUT.as_secs()
        );
        let (mut process, addr, admin) = start_on_free_ports(|addr, admin| {
            let file = dir.join("proxy.toml");
            let text = config_text(&addr.to_string(), Some(&admin.to_string()), &url)
                .replace("shutdown_grace = \"2s\"\n", &server);
            write(&file, &text);
            RunningProxy::spawn(&file, &["--workers", "1"])
        });
        process.wait_listening(addr);
        let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD });
        let reply = send(
            addr,
            Method::POST,
            "/auth/login",
            &[("content-type", "application/json"), ("origin", ORIGIN)],
            body.to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "login: {}", reply.text());
        let login = reply.login();
        Proxy {
            process,
            addr,
            admin,
            upstream,
            login,
            _dir: dir,
        }
    }

    /// The proxy process's resident set, in KiB.
    fn rss_kib(&self) -> u64 {
        rss_kib_of(self.process.child.id())
    }

    /// The proxy still serves a signed request over HTTP/1.1 (the upstream verified it).
    async fn still_serving(&self) {
        let before = self.upstream.verified.lock().len();
        let reply = get(self.addr, "/api/after", &self.login).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["user"], "alice");
        assert_eq!(self.upstream.verified.lock().len(), before + 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written HTTP/2 frames (RFC 9113) and HPACK (RFC 7541)
// ---------------------------------------------------------------------------------------------

/// A literal field with a new name, no Huffman; `indexed`: added to the dynamic table.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str, indexed: bool) {
    out.push(if indexed { 0x40 } else { 0x00 });
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The `:scheme` and `:authority` of a client's requests: the public origin of the proxy it
/// talks to.
#[derive(Debug, Clone, Copy)]
struct Origin {
    scheme: &'static str,
    authority: &'static str,
}

/// The h2c proxies' origin ([`Proxy`]).
const H2C: Origin = Origin {
    scheme: "http",
    authority: "app.test",
};

/// The TLS proxies' origin ([`TlsProxy`]).
const HTTPS: Origin = Origin {
    scheme: "https",
    authority: "localhost",
};

/// The header block of a GET of `path` with `cookie`, to the h2c proxies.
fn get_block(path: &str, cookie: &str) -> Vec<u8> {
    get_block_to(H2C, path, cookie)
}

/// The header block of a GET of `path` with `cookie`, to `origin`.
fn get_block_to(origin: Origin, path: &str, cookie: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", origin.scheme),
        (":authority", origin.authority),
        (":path", path),
        ("cookie", cookie),
    ] {
        hpack_literal(&mut out, name, value, false);
    }
    out
}

/// A complete GET (HEADERS with END_STREAM) on stream `id`, to the h2c proxies.
fn get_frame(id: u32, path: &str, cookie: &str) -> Vec<u8> {
    get_frame_to(H2C, id, path, cookie)
}

/// A complete GET (HEADERS with END_STREAM) on stream `id`, to `origin`.
fn get_frame_to(origin: Origin, id: u32, path: &str, cookie: &str) -> Vec<u8> {
    h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        id,
        &get_block_to(origin, path, cookie),
    )
}

fn rst(id: u32) -> Vec<u8> {
    h2_frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes())
}

fn ping(n: u64) -> Vec<u8> {
    h2_frame(PING, 0, 0, &n.to_be_bytes())
}

/// Opens stream `2 * i + 1` for each `i` of `indexes` in turn on `client`, a GET of `path` to
/// `origin`, and resets it (CANCEL) once a PING round trip shows the server has read it:
/// accepted and forwarding. Stops early when the connection closes or, with `until_goaway`,
/// once a GOAWAY has come. Returns how many streams it reset.
async fn reset_after_acceptance(
    client: &Client,
    origin: Origin,
    indexes: std::ops::Range<u32>,
    path: &str,
    cookie: &str,
    until_goaway: bool,
) -> u32 {
    let mut reset = 0;
    for i in indexes {
        if until_goaway && !client.seen.lock().goaways.is_empty() {
            break;
        }
        let id = 2 * i + 1;
        client.send(get_frame_to(origin, id, path, cookie));
        if !client.round_trip(u64::from(i), LIMIT).await {
            break;
        }
        client.send(rst(id));
        reset += 1;
    }
    reset
}

/// The requests the upstream has seen, once that count has not moved for `quiet` (at most
/// [`LIMIT`]).
async fn upstream_settles(upstream: &Upstream, quiet: Duration) -> usize {
    // Requests the proxy had sent before the client's reset may still be arriving: wait
    // until the count has not moved for `quiet`.
    let mut last = upstream.raw_count();
    let mut since = Instant::now();
    let deadline = Instant::now() + LIMIT;
    while since.elapsed() < quiet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = upstream.raw_count();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

// ---------------------------------------------------------------------------------------------
// 1. Rapid reset (CVE-2023-44487)
// ---------------------------------------------------------------------------------------------

/// Streams opened and reset in one burst, before the server could accept them: h2 counts a
/// reset of a stream not yet accepted and answers the 21st such with GOAWAY
/// ENHANCE_YOUR_CALM (`max_pending_accept_reset_streams`: h2's default 20, now set explicitly
/// by the proxy); the upstream sees at most a few of the 5000 signed requests. (A guard: it
/// passed before this round's change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_before_they_are_accepted_end_the_connection() {
    let p = Proxy::start("h2-abuse-rapid-reset", "").await;
    let client = Client::connect(p.addr).await;
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        burst.extend(get_frame(id, "/api/rapid", &p.login.cookie));
        burst.extend(rst(id));
    }
    client.send(burst);
    assert!(
        client.wait(LIMIT, |seen| seen.closed).await,
        "still open after {LIMIT:?}: {:?}",
        client.seen.lock().goaways
    );
    assert_eq!(client.seen.lock().goaways, [ENHANCE_YOUR_CALM]);
    let forwarded = upstream_settles(&p.upstream, Duration::from_millis(500)).await;
    assert!(
        forwarded <= 64,
        "{forwarded} of 5000 reset requests reached the upstream"
    );
    p.still_serving().await;
}

/// Each stream reset just after the server accepted it (a PING round trip between the
/// request and its reset: the server has read the request, accepted the stream and started
/// forwarding it). A reset stream no longer counts against `http2_max_concurrent_streams`,
/// and h2's limit on resets only counts streams not yet accepted, so without a limit of the
/// proxy's own, one connection turned into an unbounded series of signed upstream requests at
/// no cost to the client (it never waits for an answer): before the proxy counted them, 974
/// of 1000 reached the upstream and the connection stayed open. Now: a GOAWAY after
/// `server.http2_max_reset_streams` (default 100) such resets, and the connection is dropped
/// at twice that if the client goes on (this one never answers the GOAWAY's PING, so the
/// GOAWAY never becomes final).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_just_after_they_are_accepted_end_the_connection() {
    let p = Proxy::start("h2-abuse-accepted-reset", "").await;
    let client = Client::connect(p.addr).await;
    // Far more than the proxy's bound: the upstream's /api/slow answers after 200 ms, so
    // every request forwarded is still in flight when its stream is reset.
    let sent = reset_after_acceptance(
        &client,
        H2C,
        0..1000,
        "/api/slow?ms=200",
        &p.login.cookie,
        false,
    )
    .await;
    let closed = client.wait(LIMIT, |seen| seen.closed).await;
    let forwarded = upstream_settles(&p.upstream, Duration::from_millis(500)).await;
    assert!(
        closed,
        "still open after {sent} streams reset just after their acceptance \
         ({forwarded} requests reached the upstream)"
    );
    assert!(
        !client.seen.lock().goaways.is_empty(),
        "closed without GOAWAY"
    );
    // 200 (twice the limit) and the few raced in meanwhile.
    assert!(sent <= 210, "{sent} streams reset before the close");
    assert!(
        forwarded <= 210,
        "{forwarded} requests reached the upstream for {sent} resets"
    );
    p.still_serving().await;
}

/// The other side of that limit: a client that resets many streams before their answer (a
/// browser aborting fetches) but answers the GOAWAY's PING gets a graceful close: a GOAWAY
/// (NO_ERROR) once it has reset `server.http2_max_reset_streams` (30 here), and its stream in
/// flight then still gets its whole answer before the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_many_streams_is_closed_gracefully_and_keeps_its_answer() {
    let p = Proxy::start("h2-abuse-graceful-reset", "http2_max_reset_streams = 30\n").await;
    let client = Client::connect_with(p.addr, &h2_frame(SETTINGS, 0, 0, &[]), true).await;
    client.send(get_frame(1, "/api/slow?ms=1500", &p.login.cookie));
    let reset = reset_after_acceptance(
        &client,
        H2C,
        1..300,
        "/api/slow?ms=1500",
        &p.login.cookie,
        true,
    )
    .await;
    assert!(
        client.wait(LIMIT, |seen| seen.closed).await,
        "still open after {reset} resets (GOAWAYs: {:?})",
        client.seen.lock().goaways
    );
    {
        let seen = client.seen.lock();
        assert_eq!(seen.goaways.first(), Some(&0), "{seen:?}");
        assert!(
            (30..=40).contains(&reset),
            "the GOAWAY came after {reset} resets"
        );
        assert!(seen.answered.contains(&1), "{seen:?}");
        assert!(
            seen.ended.contains(&1),
            "stream 1's answer cut short: {seen:?}"
        );
    }
    // Counted for the operator, on the listener it happened on.
    let metric = "countersign_connections_reset_limit_total";
    let server = gauge(p.admin, &format!("{metric}{{listener=\"server\"}}")).await;
    let admin = gauge(p.admin, &format!("{metric}{{listener=\"admin\"}}")).await;
    assert_eq!((server, admin), (1, 0));
}

// ---------------------------------------------------------------------------------------------
// 2. Header lists: CONTINUATION flood, HPACK-decoded size
// ---------------------------------------------------------------------------------------------

/// A HEADERS frame followed by CONTINUATION frames that never set END_HEADERS, each adding a
/// 1000-byte field (4 MB in all, `max_header_bytes` is 16 KiB): h2 counts the CONTINUATION
/// frames against what `max_header_list_size` (set from `max_header_bytes`) can need and ends
/// the connection with GOAWAY ENHANCE_YOUR_CALM long before; nothing reaches the upstream and
/// the proxy's memory does not grow by the flood. (A guard: hyper/h2 already bound it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_ends_the_connection_without_growing_memory() {
    let p = Proxy::start("h2-abuse-continuation", "").await;
    let before = p.rss_kib();
    let client = Client::connect(p.addr).await;
    let mut flood = h2_frame(HEADERS, 0, 1, &get_block("/api/flood", &p.login.cookie));
    let mut filler = Vec::new();
    hpack_literal(&mut filler, "x-filler", &"a".repeat(1000), false);
    for _ in 0..4000 {
        flood.extend(h2_frame(CONTINUATION, 0, 1, &filler));
    }
    client.send(flood);
    assert!(client.wait(LIMIT, |seen| seen.closed).await, "still open");
    assert_eq!(client.seen.lock().goaways, [ENHANCE_YOUR_CALM]);
    assert_eq!(
        upstream_settles(&p.upstream, Duration::from_millis(300)).await,
        0
    );
    let grown = p.rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "the proxy grew by {grown} KiB");
    p.still_serving().await;
}

/// A header block of 8 KB that HPACK decodes to 16 MB: one 4000-byte field added to the
/// dynamic table, then referenced 4000 times by a one-byte index. h2 stops keeping fields
/// once the decoded list passes `max_header_list_size` (`max_header_bytes`) and ends the
/// connection (GOAWAY ENHANCE_YOUR_CALM) past a multiple of it; the request never reaches the
/// upstream, and 50 such connections leave the proxy's memory where it was. (A guard.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_decoding_far_past_max_header_bytes_is_refused_and_bounded() {
    let p = Proxy::start("h2-abuse-hpack-bomb", "").await;
    let mut block = get_block("/api/bomb", &p.login.cookie);
    hpack_literal(&mut block, "x-bomb", &"b".repeat(4000), true);
    // Index 62: the newest dynamic table entry.
    block.extend(std::iter::repeat_n(0x80 | 62, 4000));
    let before = p.rss_kib();
    for _ in 0..50 {
        let client = Client::connect(p.addr).await;
        client.send(h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        assert!(
            client.wait(LIMIT, |seen| seen.closed).await,
            "still open: {:?}",
            client.seen.lock()
        );
        let seen = client.seen.lock();
        assert_eq!(seen.goaways, [ENHANCE_YOUR_CALM], "{seen:?}");
        assert!(seen.answered.is_empty(), "{seen:?}");
    }
    assert_eq!(
        upstream_settles(&p.upstream, Duration::from_millis(300)).await,
        0
    );
    let grown = p.rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "the proxy grew by {grown} KiB");
    p.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Control-frame floods; a client that never gives flow-control credit
// ---------------------------------------------------------------------------------------------

/// SETTINGS, PING and WINDOW_UPDATE frames (1.2 million in all, each asking for an answer
/// or costing a little work) from a client that never reads: h2 keeps one answer of each
/// kind pending and stops reading until it is written, so the answers fill the socket, the
/// proxy's writes block and `send_timeout` drops the connection; the proxy's memory does not
/// grow with the flood. (A guard: h2 and the proxy's write-stall limit already bound it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_flood_from_a_client_that_never_reads_is_dropped() {
    let p = Proxy::start("h2-abuse-control-flood", "").await;
    let before = p.rss_kib();
    // A small receive buffer, so that what the kernel holds of the answers is far below
    // what the flood asks for (7.8 MB of SETTINGS and PING acknowledgements) on any machine.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(p.addr).await.unwrap();
    let mut chunk = Vec::new();
    for i in 0..1000u64 {
        chunk.extend(h2_frame(
            SETTINGS,
            0,
            0,
            &[0, INITIAL_WINDOW_SIZE as u8, 0, 0, 0xff, 0xff],
        ));
        chunk.extend(ping(i));
        chunk.extend(h2_frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()));
        chunk.extend(h2_frame(SETTINGS, ACK, 0, &[]));
    }
    // The writes block once the proxy stops reading: the flood ends when the proxy drops the
    // connection (a write error) or after 1.2 million frames.
    let flood = async {
        stream.write_all(PREFACE).await?;
        for _ in 0..300 {
            stream.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let flooded = tokio::time::timeout(LIMIT, flood).await;
    let grown = p.rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "the proxy grew by {grown} KiB");
    // Dropped by now (send_timeout), or soon: reading drains what the kernel holds, then EOF
    // (or a reset). A connection still open would block the read once drained.
    tokio::time::sleep(SEND_TIMEOUT * 2).await;
    let drained = async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let closed = tokio::time::timeout(SEND_TIMEOUT * 2, drained).await;
    assert!(
        closed.is_ok(),
        "the flooding connection is still open (flood ended: {flooded:?})"
    );
    p.still_serving().await;
}

/// A client that sets its streams' window to 0 (SETTINGS_INITIAL_WINDOW_SIZE) and asks for
/// 256 MiB on each of `MAX_STREAMS` streams, reading the socket all along (no write ever
/// blocks): hyper asks the upstream body for more only as the client gives credit, so the
/// proxy holds at most a frame per stream, and `send_timeout` drops the connection once a
/// stream has waited that long for credit. (A guard: `http2_idle.rs`'s stall watch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_gives_credit_for_large_answers_is_dropped_with_bounded_memory() {
    let p = Proxy::start("h2-abuse-zero-window", "").await;
    let before = p.rss_kib();
    let zero_window = h2_frame(SETTINGS, 0, 0, &[0, INITIAL_WINDOW_SIZE as u8, 0, 0, 0, 0]);
    let client = Client::connect_with(p.addr, &zero_window, false).await;
    let mut requests = Vec::new();
    for i in 0..MAX_STREAMS {
        requests.extend(get_frame(
            2 * i + 1,
            "/api/big?bytes=268435456",
            &p.login.cookie,
        ));
    }
    client.send(requests);
    let streams = usize::try_from(MAX_STREAMS).unwrap();
    assert!(
        client
            .wait(LIMIT, |seen| seen.answered.len() == streams)
            .await,
        "{:?}",
        client.seen.lock()
    );
    let started = Instant::now();
    assert!(
        client.wait(LIMIT, |seen| seen.closed).await,
        "still open after {LIMIT:?}"
    );
    assert!(
        started.elapsed() >= SEND_TIMEOUT.mul_f32(0.9),
        "dropped before send_timeout"
    );
    let data_bytes = client.seen.lock().data_bytes;
    assert_eq!(data_bytes, 0, "data sent without credit");
    let grown = p.rss_kib().saturating_sub(before);
    assert!(grown < 16 * 1024, "the proxy grew by {grown} KiB");
    p.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Streams over `http2_max_concurrent_streams`
// ---------------------------------------------------------------------------------------------

/// Streams opened past `http2_max_concurrent_streams` (8 here) while 8 slow ones are in
/// flight: each is refused (RST_STREAM REFUSED_STREAM) without reaching the upstream, and a
/// client that goes on opening them is closed with GOAWAY ENHANCE_YOUR_CALM after h2's limit
/// of locally reset streams (`max_local_error_reset_streams`, 1024). (A guard.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_concurrency_limit_are_refused_and_a_flood_of_them_ends_the_connection() {
    let p = Proxy::start("h2-abuse-concurrency", "").await;
    let client = Client::connect(p.addr).await;
    let mut first = Vec::new();
    for i in 0..MAX_STREAMS + 40 {
        first.extend(get_frame(2 * i + 1, "/api/slow?ms=15000", &p.login.cookie));
    }
    client.send(first);
    assert!(client.round_trip(0, LIMIT).await);
    let refused = |seen: &Seen| {
        seen.resets
            .iter()
            .filter(|(_, code)| *code == REFUSED_STREAM)
            .count()
    };
    assert!(
        client.wait(LIMIT, |seen| refused(seen) >= 40).await,
        "{:?}",
        client.seen.lock()
    );
    let max_streams = usize::try_from(MAX_STREAMS).unwrap();
    assert_eq!(
        upstream_settles(&p.upstream, Duration::from_millis(500)).await,
        max_streams
    );
    // Keep opening streams while the first 8 are in flight.
    let mut next = MAX_STREAMS + 40;
    while next < 4000 && !client.closed() {
        let mut burst = Vec::new();
        for _ in 0..100 {
            burst.extend(get_frame(
                2 * next + 1,
                "/api/slow?ms=15000",
                &p.login.cookie,
            ));
            next += 1;
        }
        client.send(burst);
        let _ = client.round_trip(u64::from(next), LIMIT).await;
    }
    assert!(
        client.wait(LIMIT, |seen| seen.closed).await,
        "still open after {next} streams"
    );
    let (goaways, refused) = {
        let seen = client.seen.lock();
        (seen.goaways.clone(), refused(&seen))
    };
    assert_eq!(goaways, [ENHANCE_YOUR_CALM]);
    assert!(refused <= 1100, "{refused} refused before the close");
    assert_eq!(p.upstream.raw_count(), max_streams);
    p.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Rapid reset over TLS (HTTP/2 by ALPN)
// ---------------------------------------------------------------------------------------------

/// An in-process proxy serving HTTPS ([`start_tls`]: a self-signed `localhost` certificate,
/// ALPN h2 and http/1.1) with [`SEND_TIMEOUT`] and [`MAX_STREAMS`] like [`Proxy`]; alice
/// logged in over TLS.
struct TlsProxy {
    tls: TlsHarness,
    login: Login,
}

impl TlsProxy {
    async fn start(tag: &str) -> TlsProxy {
        let tls = start_tls(tag, |s| {
            s.send_timeout = SEND_TIMEOUT;
            s.http2_max_concurrent_streams = MAX_STREAMS;
            s.shutdown_grace = Duration::from_secs(2);
        })
        .await;
        let mut p = TlsProxy {
            tls,
            login: Login {
                cookie: String::new(),
                csrf: String::new(),
            },
        };
        let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD });
        let login = http::Request::post("https://localhost/auth/login")
            .header("origin", "https://localhost")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let (status, headers, answer) = p.request(login).await;
        assert_eq!(status, StatusCode::OK, "login: {answer}");
        let set_cookie = headers["set-cookie"].to_str().unwrap();
        p.login = Login {
            cookie: set_cookie.split(';').next().unwrap().to_owned(),
            csrf: answer["csrf_token"].as_str().unwrap().to_owned(),
        };
        p
    }

    /// A TLS connection offering h2 and http/1.1 by ALPN, checked to have negotiated h2.
    async fn connect_h2(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connector = support::tls_connector(self.tls.roots.clone(), &[b"h2", b"http/1.1"]);
        let tcp = TcpStream::connect(self.tls.h.addr).await.unwrap();
        // As in `Client::connect_with`: each TLS record out at once.
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await.expect("TLS handshake");
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN did not negotiate h2"
        );
        stream
    }

    /// A hand-written HTTP/2 client ([`Client`]) over a TLS connection that negotiated h2; its
    /// requests go to [`HTTPS`].
    async fn client(&self) -> Client {
        let stream = self.connect_h2().await;
        Client::over(stream, &h2_frame(SETTINGS, 0, 0, &[]), false)
    }

    /// `request` on a new h2-over-TLS connection (hyper's client); status, headers, JSON body.
    async fn request(
        &self,
        request: http::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        use http_body_util::BodyExt as _;
        let (mut sender, _) = support_h2::client(self.connect_h2().await).await;
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        });
        (parts.status, parts.headers, json)
    }

    /// The proxy still serves a signed request over h2 on TLS (the upstream verified it).
    async fn still_serving(&self) {
        let upstream = &self.tls.h.upstream;
        let before = upstream.verified.lock().len();
        let request = http::Request::get("https://localhost/api/after")
            .header("cookie", &self.login.cookie)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (status, _, answer) = self.request(request).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["user"], "alice");
        assert_eq!(upstream.verified.lock().len(), before + 1);
    }

    /// `countersign_connections_reset_limit_total` of the public and the admin listener.
    async fn reset_limit_closes(&self) -> (u64, u64) {
        let metric = "countersign_connections_reset_limit_total";
        let admin = self.tls.h.admin;
        (
            gauge(admin, &format!("{metric}{{listener=\"server\"}}")).await,
            gauge(admin, &format!("{metric}{{listener=\"admin\"}}")).await,
        )
    }
}

/// [`streams_reset_before_they_are_accepted_end_the_connection`] over TLS with ALPN h2: the
/// TLS listener's connections get the same h2 limit on streams reset before acceptance
/// (GOAWAY ENHANCE_YOUR_CALM), at most a few of the 5000 signed requests reach the upstream,
/// and the proxy still serves over TLS. Not a close of the proxy's own reset count: the
/// counter stays at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_streams_reset_before_they_are_accepted_end_the_connection() {
    let p = TlsProxy::start("h2-abuse-tls-rapid-reset").await;
    let client = p.client().await;
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        burst.extend(get_frame_to(HTTPS, id, "/api/rapid", &p.login.cookie));
        burst.extend(rst(id));
    }
    client.send(burst);
    assert!(
        client.wait(LIMIT, |seen| seen.closed).await,
        "still open after {LIMIT:?}: {:?}",
        client.seen.lock().goaways
    );
    assert_eq!(client.seen.lock().goaways, [ENHANCE_YOUR_CALM]);
    let forwarded = upstream_settles(&p.tls.h.upstream, Duration::from_millis(500)).await;
    assert!(
        forwarded <= 64,
        "{forwarded} of 5000 reset requests reached the upstream"
    );
    p.still_serving().await;
}

/// [`streams_reset_just_after_they_are_accepted_end_the_connection`] over TLS with ALPN h2:
/// each stream reset once a PING round trip shows the proxy read it. The TLS listener's
/// connections count those resets too (`server.http2_max_reset_streams`, default 100): a
/// GOAWAY at the limit, the connection dropped at about twice it (the client never answers the
/// GOAWAY's PING), a bounded number of requests at the upstream, and the close counted in
/// `countersign_connections_reset_limit_total` on the public listener, not the admin one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_streams_reset_just_after_they_are_accepted_end_the_connection() {
    let p = TlsProxy::start("h2-abuse-tls-accepted-reset").await;
    assert_eq!(p.reset_limit_closes().await, (0, 0));
    let client = p.client().await;
    // One short of the limit: the connection is open and no GOAWAY has come.
    let below = reset_after_acceptance(
        &client,
        HTTPS,
        0..99,
        "/api/slow?ms=200",
        &p.login.cookie,
        false,
    )
    .await;
    assert!(
        client.round_trip(u64::MAX, LIMIT).await,
        "{:?}",
        client.seen.lock()
    );
    assert_eq!((below, client.seen.lock().goaways.len()), (99, 0));
    let sent = below
        + reset_after_acceptance(
            &client,
            HTTPS,
            99..1000,
            "/api/slow?ms=200",
            &p.login.cookie,
            false,
        )
        .await;
    let closed = client.wait(LIMIT, |seen| seen.closed).await;
    let forwarded = upstream_settles(&p.tls.h.upstream, Duration::from_millis(500)).await;
    assert!(
        closed,
        "still open after {sent} streams reset just after their acceptance \
         ({forwarded} requests reached the upstream)"
    );
    assert_eq!(
        client.seen.lock().goaways.first(),
        Some(&0),
        "closed without a graceful GOAWAY: {:?}",
        client.seen.lock()
    );
    // Dropped at 200 resets (twice the limit) and the few raced in meanwhile; or earlier, at
    // the limit and `header_read_timeout` after the GOAWAY, should the proxy find no stream
    // open then (a client this slow).
    assert!(
        (100..=210).contains(&sent),
        "{sent} streams reset before the close"
    );
    assert!(
        forwarded <= 210,
        "{forwarded} requests reached the upstream for {sent} resets"
    );
    assert_eq!(p.reset_limit_closes().await, (1, 0));
    p.still_serving().await;
}

//! Adversarial cases against the WebSocket relay's frame checks (src/proxy/websocket/
//! frames.rs, splice.rs), beyond tests/proxy_websocket_frames.rs: garbage after a Close
//! (discarded: nothing after a side's Close is relayed; more such cases in
//! tests/proxy_websocket_frames_more.rs), the longest header in 14 one-byte writes, a
//! 2^62-byte frame cut short, the proxy's own Close
//! (idle timeout, logout) while a header is held back, a connection ending inside a header,
//! a malformed third frame pipelined in one write, a malformed header right after the frame
//! the proxy's close was finishing, and the ways an API's `101` can spell the extensions it
//! negotiated. On the relay before the frame checks (ea92f01^), 7 of the first 8 fail (all but
//! the 2^62-byte frame cut short, whose behaviour is older).
//!
//! Against real servers on loopback: the proxy (the test harness), an upstream behind the
//! real `VerifyLayer` that takes the upgrade and hands the raw connection to the test, and a
//! browser that is raw bytes over TCP.
//!
//! Run: `cargo test --all-features --test proxy_websocket_frames_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_ws;

use std::net::SocketAddr;
use std::time::Duration;

use countersign::proxy::forward::WebSocketRoute;
use http::StatusCode;
use support::*;
use support_ws::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The `Sec-WebSocket-Extensions` lines of the upstream's `101` on `/ws/ext<i>`.
const EXTENSION_LINES: &[&[&str]] = &[
    &[],
    // Mixed case, a parameter without a value: permessage-deflate.
    &["Permessage-Deflate; client_max_window_bits"],
    // permessage-deflate on two lines (each with parameters).
    &[
        "permessage-deflate; server_no_context_takeover",
        "PERMESSAGE-DEFLATE; client_max_window_bits=10",
    ],
    // An extension the proxy does not know beside it, on a line of its own...
    &["permessage-deflate", "x-unknown-ext; a=1"],
    // ...or in the same line.
    &["permessage-deflate; client_no_context_takeover, x-unknown-ext"],
];

/// The `101`'s extension lines for `path`: those of [`EXTENSION_LINES`] its path names
/// (`/ws/ext<i>`), none elsewhere.
fn extension_lines(path: &str) -> Vec<&'static str> {
    path.strip_prefix("/ws/ext")
        .and_then(|i| i.parse::<usize>().ok())
        .map(|i| EXTENSION_LINES[i].to_vec())
        .unwrap_or_default()
}

struct Setup {
    h: Harness,
    raw: mpsc::UnboundedReceiver<RawUpstream>,
}

/// The proxy with `/ws/` routed to the upstream, with these WebSocket limits.
async fn start(limits: WebSocketRoute) -> Setup {
    let (addr, raw) = raw_ws_upstream(extension_lines).await;
    let h = harness_with_ws_route(addr, limits).await;
    Setup { h, raw }
}

fn default_limits() -> WebSocketRoute {
    WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100)
}

/// A browser's handshake: the connection, read up to the end of the answer's head (a 101),
/// and that head.
async fn handshake(addr: SocketAddr, path: &str, login: &Login) -> (TcpStream, String) {
    let (stream, head) = browser_handshake(addr, path, &login.cookie, ORIGIN).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (stream, head)
}

/// A browser and the API's raw end of one WebSocket on `path`.
async fn open(s: &mut Setup, path: &str) -> (TcpStream, RawUpstream) {
    let login = s.h.login("alice", ALICE_PASSWORD).await;
    let (browser, _) = handshake(s.h.addr, path, &login).await;
    let api = within(s.raw.recv()).await.expect("the raw upstream");
    (browser, api)
}

/// The longest header: FIN + binary, masked, a 64-bit length of `len` (at least 65536, its
/// minimal encoding), the masking key.
fn max_header(len: u64) -> Vec<u8> {
    let mut out = vec![0x82, 0xff];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&KEY);
    out
}

/// Nothing arrives within `wait` (and the connection is still open).
async fn nothing_within<S: AsyncRead + Unpin + ?Sized>(s: &mut S, wait: Duration, what: &str) {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, s.read(&mut byte)).await {
        Err(_) => {}
        Ok(read) => panic!("{what}: expected nothing yet, got {read:?} {byte:x?}"),
    }
}

async fn open_count(h: &Harness) -> u64 {
    gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await
}

/// The WebSocket is counted as open no longer (within 10 s).
async fn ended(h: &Harness) {
    let started = Instant::now();
    while open_count(h).await != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "still open");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A Close then garbage (a reserved opcode) from the browser, in one write or two. Sending
/// anything after a Close is not allowed (RFC 6455 §5.5.1), and the proxy relays nothing a
/// side sends after its own Close (it is discarded, not checked): the API gets the browser's
/// Close intact and no byte of the garbage; the browser gets no 1002, but the API's answering
/// Close, and both end; no panic, no hang. (Before the proxy discarded it, the garbage got
/// the browser a 1002 `protocol_error`, and a valid frame after a Close was relayed.)
#[tokio::test]
async fn garbage_after_a_close_is_discarded_not_refused() {
    let mut s = start(default_limits()).await;
    let garbage = vec![0x8B, 0x80 | 3, 1, 2, 3, 4, 5, 6, 7];
    let late = frame(0x81, Some(KEY), b"late");
    for (after, split) in [(&garbage, false), (&garbage, true), (&late, false)] {
        let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
        let close = frame(0x88, Some(KEY), &1000u16.to_be_bytes());
        if split {
            browser.write_all(&close).await.unwrap();
            let got = read_frame(&mut api).await;
            assert_eq!(got.close().0, 1000);
            browser.write_all(after).await.unwrap();
        } else {
            let mut both = close.clone();
            both.extend_from_slice(after);
            browser.write_all(&both).await.unwrap();
            let got = read_frame(&mut api).await;
            assert_eq!(got.close().0, 1000);
        }
        // The API answers the browser's Close and ends its connection (RFC 6455 §7.1.1).
        let reply = frame(0x88, None, &1000u16.to_be_bytes());
        api.write_all(&reply).await.unwrap();
        api.shutdown().await.unwrap();
        let mut got = vec![0u8; reply.len()];
        within(browser.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, reply, "split {split}");
        browser.shutdown().await.unwrap();
        assert_eq!(rest_of(&mut browser).await, b"", "split {split}");
        assert_eq!(
            rest_of(&mut api).await,
            b"",
            "split {split}: nothing after the Close"
        );
        ended(&s.h).await;
    }
}

/// The longest header (64-bit length and masking key, 14 bytes) in 14 writes of one byte:
/// none of it reaches the API before its last byte, then all of it and the payload, intact.
/// The API's longest (10 bytes, unmasked) likewise.
#[tokio::test]
async fn the_longest_header_in_fourteen_one_byte_writes() {
    let mut s = start(default_limits()).await;
    let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
    // The smallest payload a 64-bit length may declare (its minimal encoding).
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i * 7) as u8).collect();
    let mut sent = max_header(payload.len() as u64);
    sent.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    for (i, byte) in sent[..14].iter().enumerate() {
        browser.write_all(&[*byte]).await.unwrap();
        browser.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        if i == 12 {
            nothing_within(&mut api, Duration::from_millis(150), "13 bytes of 14").await;
        }
    }
    browser.write_all(&sent[14..]).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
    // The API's: 10 bytes, one at a time.
    let mut sent = vec![0x82, 0x7f];
    sent.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    sent.extend_from_slice(&payload);
    for (i, byte) in sent[..10].iter().enumerate() {
        api.write_all(&[*byte]).await.unwrap();
        api.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        if i == 8 {
            nothing_within(&mut browser, Duration::from_millis(150), "9 bytes of 10").await;
        }
    }
    api.write_all(&sent[10..]).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(browser.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
}

/// A valid frame declaring 2^62 bytes, of which 1000 come before the sender's connection
/// closes (no Close): the other side gets the header and those bytes, then its connection is
/// closed without a Close (there is no frame boundary to put one at: docs/OPERATIONS.md),
/// and the WebSocket ends. Each way.
#[tokio::test]
async fn a_huge_frame_cut_short_ends_without_a_close_each_way() {
    let mut s = start(default_limits()).await;
    for from_browser in [true, false] {
        let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
        let mut sent = if from_browser {
            max_header(1 << 62)
        } else {
            let mut h = vec![0x82, 0x7f];
            h.extend_from_slice(&(1u64 << 62).to_be_bytes());
            h
        };
        sent.extend(std::iter::repeat_n(0x5A, 1000));
        let (sender, receiver): (&mut dyn Io, &mut dyn Io) = if from_browser {
            (&mut browser, &mut api)
        } else {
            (&mut api, &mut browser)
        };
        sender.write_all(&sent).await.unwrap();
        sender.shutdown().await.unwrap();
        let got = rest_of(receiver).await;
        assert!(
            got == sent,
            "from_browser {from_browser}: {} bytes",
            got.len()
        );
        // The sender's connection stays until the other side has ended its own (as a close
        // waits for the answer to its Close): here, at once.
        receiver.shutdown().await.unwrap();
        rest_of(sender).await;
        ended(&s.h).await;
    }
}

/// Both halves of a connection, as one trait object.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The idle timeout while 5 bytes of a header are held back: the bytes held count as
/// activity (a header sent a byte at a time keeps the WebSocket open, as a payload sent so
/// would), and once the browser stops, the API gets a clean 1001 `idle_timeout` right after
/// the last whole frame, never the header's first bytes; the browser gets the same Close,
/// finishes its frame and answers with its Close, none of which reaches the API.
#[tokio::test]
async fn the_idle_close_never_carries_a_header_held_back() {
    let limits = WebSocketRoute::new(Duration::from_millis(1000), Duration::from_secs(30), 100);
    let mut s = start(limits).await;
    let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
    let hello = frame(0x81, Some(KEY), b"hello");
    browser.write_all(&hello).await.unwrap();
    let mut got = vec![0u8; hello.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    let header = max_header(65_536);
    // One byte each 250 ms, for 1.25 s in all: longer than the idle timeout, not closed.
    for byte in &header[..5] {
        tokio::time::sleep(Duration::from_millis(250)).await;
        browser.write_all(&[*byte]).await.unwrap();
    }
    let last_byte = Instant::now();
    let to_api = read_frame(&mut api).await;
    let waited = last_byte.elapsed();
    assert!(to_api.masked, "{to_api:?}");
    assert_eq!(to_api.close(), (1001, "idle_timeout".into()));
    assert!(
        waited >= Duration::from_millis(800),
        "idle from the last byte read: {waited:?}"
    );
    let to_browser = read_frame(&mut browser).await;
    assert_eq!(to_browser.close(), (1001, "idle_timeout".into()));
    // The browser finishes the frame it had begun, then answers the Close.
    let mut rest = header[5..].to_vec();
    rest.extend((0..65_536).map(|i| 3 ^ KEY[i % 4]));
    rest.extend(frame(0x88, Some(KEY), &1001u16.to_be_bytes()));
    browser.write_all(&rest).await.unwrap();
    api.write_all(&frame(0x88, None, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(rest_of(&mut api).await, b"", "nothing after the Close");
    assert_eq!(rest_of(&mut browser).await, b"");
    ended(&s.h).await;
}

/// A logout found by the session check while the API's connection holds 2 bytes of a header
/// back: the browser gets 1008 `session_ended` right after the last whole frame, never those
/// bytes. Also, the session check goes on while a header is held back.
#[tokio::test]
async fn the_session_close_never_carries_a_header_held_back() {
    let limits = WebSocketRoute::new(Duration::from_secs(30), Duration::from_millis(150), 100);
    let mut s = start(limits).await;
    let login = s.h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, _) = handshake(s.h.addr, "/ws/raw", &login).await;
    let mut api = within(s.raw.recv()).await.expect("the raw upstream");
    let mut sent = frame(0x82, None, &[7u8; 200]);
    sent.extend_from_slice(&[0x82, 0x7e]); // a 16-bit length to come
    api.write_all(&sent).await.unwrap();
    let got = read_frame(&mut browser).await;
    assert_eq!(got.payload, vec![7u8; 200]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        logout(s.h.addr, &login).await.status,
        StatusCode::NO_CONTENT
    );
    let to_browser = read_frame(&mut browser).await;
    assert_eq!(to_browser.close(), (1008, "session_ended".into()));
    let to_api = read_frame(&mut api).await;
    assert_eq!(to_api.close(), (1008, "session_ended".into()));
    browser
        .write_all(&frame(0x88, Some(KEY), &1000u16.to_be_bytes()))
        .await
        .unwrap();
    api.write_all(&[0, 126]).await.unwrap(); // the header's end (126: its minimal encoding)
    api.write_all(&[9u8; 126]).await.unwrap(); // its payload
    api.write_all(&frame(0x88, None, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(rest_of(&mut browser).await, b"", "nothing after the Close");
    assert_eq!(rest_of(&mut api).await, b"");
    ended(&s.h).await;
}

/// The API's connection ends (no Close) with 3 bytes of a header held back: the browser
/// gets the frame before, then 1011 `upstream_failed` (a header cut short leaves a frame
/// boundary), never those 3 bytes.
#[tokio::test]
async fn a_connection_ending_inside_a_header_leaves_a_boundary() {
    let mut s = start(default_limits()).await;
    let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
    let mut sent = frame(0x81, None, b"last words");
    sent.extend_from_slice(&[0x82, 0x7f, 0]);
    api.write_all(&sent).await.unwrap();
    api.shutdown().await.unwrap();
    let got = read_frame(&mut browser).await;
    assert_eq!(got.payload, b"last words");
    let to_browser = read_frame(&mut browser).await;
    assert_eq!(to_browser.close(), (1011, "upstream_failed".into()));
    browser
        .write_all(&frame(0x88, Some(KEY), &1011u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(rest_of(&mut browser).await, b"");
    ended(&s.h).await;
}

/// Three frames in one write, the third malformed (an RSV2 bit): the first two (a 16-bit
/// and a 64-bit length) arrive intact, then the Close 1002, no byte of the third. Each way.
#[tokio::test]
async fn a_malformed_third_frame_in_one_write() {
    let mut s = start(default_limits()).await;
    for from_browser in [true, false] {
        let (mut browser, mut api) = open(&mut s, "/ws/raw").await;
        let key = from_browser.then_some(KEY);
        let first = frame(0x82, key, &[1u8; 300]);
        let second = frame(0x82, key, &[2u8; 70_000]);
        let third = frame(0xA2, key, b"bad");
        let mut all = first.clone();
        all.extend_from_slice(&second);
        all.extend_from_slice(&third);
        let (sender, receiver): (&mut dyn Io, &mut dyn Io) = if from_browser {
            (&mut browser, &mut api)
        } else {
            (&mut api, &mut browser)
        };
        sender.write_all(&all).await.unwrap();
        let mut got = vec![0u8; first.len() + second.len()];
        within(receiver.read_exact(&mut got)).await.unwrap();
        assert!(got == all[..got.len()], "from_browser {from_browser}");
        let close = read_frame(receiver).await;
        assert_eq!(close.masked, from_browser);
        assert_eq!(close.close(), (1002, "protocol_error".into()));
        let close = read_frame(sender).await;
        assert_eq!(close.close(), (1002, "protocol_error".into()));
        let reply = frame(0x88, (!from_browser).then_some(KEY), &1002u16.to_be_bytes());
        receiver.write_all(&reply).await.unwrap();
        assert_eq!(rest_of(receiver).await, b"", "from_browser {from_browser}");
        rest_of(sender).await;
        ended(&s.h).await;
    }
}

/// How the API's `101` spells the extensions: passed on to the browser as sent; mixed case
/// and parameters, two lines of permessage-deflate: RSV1 on a message's first frame passes
/// and RSV2 is refused; with an extension the proxy does not know (on its own line or in the
/// same one), every RSV bit passes.
#[tokio::test]
async fn extensions_however_the_101_spells_them() {
    let mut s = start(default_limits()).await;
    for (i, lines) in EXTENSION_LINES.iter().enumerate() {
        let login = s.h.login("alice", ALICE_PASSWORD).await;
        let path = format!("/ws/ext{i}");
        let (mut browser, head) = handshake(s.h.addr, &path, &login).await;
        let mut api = within(s.raw.recv()).await.expect("the raw upstream");
        let passed: Vec<&str> = head
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-extensions")
                    .then(|| value.trim())
            })
            .collect();
        assert_eq!(&passed, lines, "{head}");
        let unknown = lines.iter().any(|l| l.contains("x-unknown"));
        let deflate = !lines.is_empty();
        // RSV1 on a first frame, each way.
        let rsv1 = frame(0xC1, Some(KEY), b"compressed");
        browser.write_all(&rsv1).await.unwrap();
        if deflate {
            let mut got = vec![0u8; rsv1.len()];
            within(api.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, rsv1, "{path}");
        } else {
            assert_eq!(
                read_frame(&mut api).await.close(),
                (1002, "protocol_error".into())
            );
            continue;
        }
        // RSV2 (and RSV3) on the API's frame: only an unknown extension lets it through.
        let rsv2 = frame(0xB2, None, b"rsv2+rsv3");
        api.write_all(&rsv2).await.unwrap();
        if unknown {
            let mut got = vec![0u8; rsv2.len()];
            within(browser.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, rsv2, "{path}");
        } else {
            assert_eq!(
                read_frame(&mut browser).await.close(),
                (1002, "protocol_error".into()),
                "{path}"
            );
        }
    }
}

/// A malformed header right after the end of the frame in flight when the proxy's own close
/// began (a logout): the frame is finished, then the API gets the 1008 Close, never a byte of
/// what came after the frame (only followed, to find the browser's Close); both end.
#[tokio::test]
async fn a_malformed_header_while_the_frame_in_flight_is_finished() {
    let limits = WebSocketRoute::new(Duration::from_secs(30), Duration::from_millis(100), 100);
    let mut s = start(limits).await;
    let login = s.h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, _) = handshake(s.h.addr, "/ws/raw", &login).await;
    let mut api = within(s.raw.recv()).await.expect("the raw upstream");
    let big = frame(0x82, Some(KEY), &[3u8; 100_000]);
    browser.write_all(&big[..10_000]).await.unwrap();
    let mut got = vec![0u8; 10_000];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(
        logout(s.h.addr, &login).await.status,
        StatusCode::NO_CONTENT
    );
    let to_browser = read_frame(&mut browser).await;
    assert_eq!(to_browser.close(), (1008, "session_ended".into()));
    // The rest of the frame, then an unmasked frame (malformed from a browser), then a Close.
    let mut rest = big[10_000..].to_vec();
    rest.extend(frame(0x81, None, b"unmasked"));
    rest.extend(frame(0x88, Some(KEY), &1000u16.to_be_bytes()));
    browser.write_all(&rest).await.unwrap();
    let mut got = vec![0u8; big.len() - 10_000];
    within(api.read_exact(&mut got)).await.unwrap();
    assert!(got == big[10_000..], "the frame in flight, intact");
    let to_api = read_frame(&mut api).await;
    assert!(to_api.masked);
    assert_eq!(to_api.close(), (1008, "session_ended".into()));
    api.write_all(&frame(0x88, None, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(rest_of(&mut api).await, b"", "nothing after the Close");
    assert_eq!(rest_of(&mut browser).await, b"");
    ended(&s.h).await;
}

/// Frames sent in the same write as the handshake, before its `101` (a client must wait for
/// it, RFC 6455 §4.1; an attacker need not): they go through the same checks once the
/// WebSocket is spliced. A valid one reaches the API intact; a malformed one never does, and
/// both sides get 1002.
#[tokio::test]
async fn frames_sent_with_the_handshake_are_checked_too() {
    let mut s = start(default_limits()).await;
    for valid in [true, false] {
        let login = s.h.login("alice", ALICE_PASSWORD).await;
        let mut browser = TcpStream::connect(s.h.addr).await.unwrap();
        let mut request = format!(
            "GET /ws/raw HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nCookie: {}\r\nOrigin: {ORIGIN}\r\n\r\n",
            login.cookie
        )
        .into_bytes();
        let early = if valid {
            frame(0x81, Some(KEY), b"early")
        } else {
            frame(0x81, None, b"early, unmasked")
        };
        request.extend_from_slice(&early);
        browser.write_all(&request).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(within(browser.read_u8()).await.expect("answer head"));
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
        let mut api = within(s.raw.recv()).await.expect("the raw upstream");
        if valid {
            let mut got = vec![0u8; early.len()];
            within(api.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, early);
            continue;
        }
        let to_api = read_frame(&mut api).await;
        assert_eq!(to_api.close(), (1002, "protocol_error".into()));
        let to_browser = read_frame(&mut browser).await;
        assert_eq!(to_browser.close(), (1002, "protocol_error".into()));
        api.write_all(&frame(0x88, None, &1002u16.to_be_bytes()))
            .await
            .unwrap();
        assert_eq!(rest_of(&mut api).await, b"");
        rest_of(&mut browser).await;
        ended(&s.h).await;
    }
}

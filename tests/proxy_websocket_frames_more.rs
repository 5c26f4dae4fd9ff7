//! More of the WebSocket relay's frame rules (src/proxy/websocket/frames.rs, splice.rs), each
//! way and across reads:
//! - a length not in its minimal encoding (RFC 6455 §5.2: a 16-bit length under 126, a
//!   64-bit one under 65536) is a malformed header: 1002 `protocol_error`, no byte of it
//!   relayed;
//! - nothing a side sends after its own Close is relayed (§5.5.1, §1.4): it is discarded, and
//!   the close handshake completes as before (the other side's Close still comes back);
//! - the `101`'s `Sec-WebSocket-Extensions` is read with its quoted parameters (RFC 6455
//!   §9.1, RFC 7230 quoted-string): a comma inside quotes does not make the extensions unknown.
//!
//! On the code before these rules all three tests failed: a non-minimal length was relayed,
//! bytes after a Close were relayed (or, garbage, refused with 1002 to the side that sent
//! its Close), and a quoted comma made the extensions unknown, letting RSV2 through. (The
//! last test's cases of a real second extension and of an unbalanced quote pin what was so
//! already.)
//!
//! Against real servers on loopback: the proxy (the test harness), an upstream behind the
//! real `VerifyLayer` that takes the upgrade and hands the raw connection to the test, and a
//! browser that is raw bytes over TCP.
//!
//! Run: `cargo test --all-features --test proxy_websocket_frames_more`.
#![cfg(feature = "proxy")]

mod support;
mod support_ws;

use std::time::Duration;

use countersign::proxy::forward::WebSocketRoute;
use support::*;
use support_ws::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The `Sec-WebSocket-Extensions` line of the upstream's `101` on `/ws/ext<i>`, and whether
/// the proxy must read it as permessage-deflate alone (else as an extension it does not know).
const EXTENSION_LINES: &[(&str, bool)] = &[
    // A quoted parameter with a comma inside.
    (r#"permessage-deflate; x="a,b""#, true),
    // An escaped quote and a comma inside, a second quoted parameter, a semicolon inside.
    (r#"permessage-deflate; x="a\",b"; y="c;d,e""#, true),
    // After a quoted comma, a real second extension: unknown.
    (r#"permessage-deflate; x="a,b", x-unknown-ext"#, false),
    // An unbalanced quote: not parsed, so counted as an extension the proxy does not know.
    (r#"permessage-deflate; x="a,b"#, false),
];

/// The `101`'s extension line for `path`: [`EXTENSION_LINES`]' line its path names
/// (`/ws/ext<i>`), none elsewhere.
fn extension_lines(path: &str) -> Vec<&'static str> {
    path.strip_prefix("/ws/ext")
        .and_then(|i| i.parse::<usize>().ok())
        .map(|i| vec![EXTENSION_LINES[i].0])
        .unwrap_or_default()
}

struct Setup {
    h: Harness,
    raw: mpsc::UnboundedReceiver<RawUpstream>,
}

async fn start() -> Setup {
    let (addr, raw) = raw_ws_upstream(extension_lines).await;
    let limits = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    let h = harness_with_ws_route(addr, limits).await;
    Setup { h, raw }
}

/// A browser and the API's raw end of one WebSocket on `path`, and the `101`'s head.
async fn open(s: &mut Setup, path: &str) -> (TcpStream, RawUpstream, String) {
    let login = s.h.login("alice", ALICE_PASSWORD).await;
    let (browser, head) = browser_handshake(s.h.addr, path, &login.cookie, ORIGIN).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let api = within(s.raw.recv()).await.expect("the raw upstream");
    (browser, api, head)
}

/// The WebSocket is counted as open no longer (within 10 s).
async fn ended(h: &Harness) {
    let started = Instant::now();
    while gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "still open");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Both halves of a connection, as one trait object.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Writes `bytes` in the pieces `cuts` makes of it (offsets), pausing between them so that
/// each is a read of its own at the proxy.
async fn write_in_pieces(to: &mut dyn Io, bytes: &[u8], cuts: &[usize]) {
    let mut from = 0;
    for &cut in cuts.iter().chain([&bytes.len()]) {
        to.write_all(&bytes[from..cut]).await.unwrap();
        to.flush().await.unwrap();
        from = cut;
        if from < bytes.len() {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

/// A frame's bytes with its length in the 16-bit (`wide` false) or 64-bit field whatever it
/// is: the non-minimal encodings when the payload is short.
fn frame_wide(first: u8, key: Option<[u8; 4]>, payload: &[u8], wide: bool) -> Vec<u8> {
    let m = if key.is_some() { 0x80 } else { 0 };
    let mut out = vec![first];
    if wide {
        out.push(m | 127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    } else {
        out.push(m | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    match key {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// `from_browser` (else the API) sends a valid text frame, then `bad` in the pieces `cuts`
/// makes of it: the other side gets the text frame, then a Close 1002 `protocol_error`
/// (never a byte of `bad`); the sender gets the same Close; once the other side answers its
/// Close, both connections end with nothing more.
async fn refused(s: &mut Setup, from_browser: bool, bad: &[u8], cuts: &[usize]) {
    // The header and a little of the payload: nothing after a refused header is read.
    let bad = &bad[..bad.len().min(40)];
    let what = format!("from_browser {from_browser} bad {bad:02x?} cuts {cuts:?}");
    let (mut browser, mut api, _) = open(s, "/ws/raw").await;
    let (sender, receiver): (&mut dyn Io, &mut dyn Io) = if from_browser {
        (&mut browser, &mut api)
    } else {
        (&mut api, &mut browser)
    };
    let key = from_browser.then_some(KEY);
    sender.write_all(&frame(0x81, key, b"ok")).await.unwrap();
    let ok = read_frame(receiver).await;
    assert_eq!(
        (ok.first, ok.payload.as_slice()),
        (0x81, &b"ok"[..]),
        "{what}"
    );
    write_in_pieces(sender, bad, cuts).await;
    let to_receiver = read_frame(receiver).await;
    assert_eq!(to_receiver.masked, from_browser, "{what}");
    assert_eq!(
        to_receiver.close(),
        (1002, "protocol_error".into()),
        "{what}"
    );
    let to_sender = read_frame(sender).await;
    assert_eq!(to_sender.close(), (1002, "protocol_error".into()), "{what}");
    let reply = frame(0x88, (!from_browser).then_some(KEY), &1002u16.to_be_bytes());
    receiver.write_all(&reply).await.unwrap();
    assert_eq!(
        rest_of(receiver).await,
        b"",
        "{what}: nothing after the Close"
    );
    rest_of(sender).await;
    ended(&s.h).await;
}

/// A 16-bit length under 126 and a 64-bit length under 65536 (RFC 6455 §5.2: "the minimal
/// number of bytes MUST be used") are refused each way, whole or with the header split
/// across reads (after its second byte, inside its length); the smallest lengths each field
/// may hold pass, each way, byte for byte.
#[tokio::test]
async fn non_minimal_lengths_are_refused() {
    let mut s = start().await;
    for from_browser in [true, false] {
        let key = from_browser.then_some(KEY);
        for (payload_len, wide) in [(0, false), (125, false), (5, true), (65_535, true)] {
            let bad = frame_wide(0x82, key, &vec![6u8; payload_len], wide);
            refused(&mut s, from_browser, &bad, &[]).await;
            refused(&mut s, from_browser, &bad, &[2]).await;
            refused(&mut s, from_browser, &bad, &[1, 3]).await;
        }
        // The smallest each field may hold: relayed intact.
        let (mut browser, mut api, _) = open(&mut s, "/ws/raw").await;
        let (sender, receiver): (&mut dyn Io, &mut dyn Io) = if from_browser {
            (&mut browser, &mut api)
        } else {
            (&mut api, &mut browser)
        };
        let mut sent = frame_wide(0x82, key, &[1u8; 126], false);
        sent.extend(frame_wide(0x82, key, &vec![2u8; 65_536], true));
        write_in_pieces(sender, &sent, &[3, 130 + 5]).await;
        let mut got = vec![0u8; sent.len()];
        within(receiver.read_exact(&mut got)).await.unwrap();
        assert!(got == sent, "from_browser {from_browser}");
    }
}

/// What a side sends after its own Close (a valid frame, garbage, the start of a header) is
/// not relayed, each way, however the reads fall: in the Close's write, after a pause, with
/// the Close's end and the next bytes in one read, a header's first bytes in the Close's
/// read. The other side gets the Close intact and nothing more; its answering Close still
/// reaches the sender, and both connections end as a close handshake ends them.
#[tokio::test]
async fn nothing_after_a_sides_close_is_relayed() {
    let mut s = start().await;
    for from_browser in [true, false] {
        let key = from_browser.then_some(KEY);
        let close = frame(0x88, key, b"\x03\xe8bye");
        let afters: [(&str, Vec<u8>); 3] = [
            ("a valid frame", frame(0x81, key, b"late")),
            ("garbage", vec![0x8B, 0x83, 1, 2, 3, 4, 5, 6, 7]),
            (
                "a header's start",
                frame(0x82, key, &[9u8; 300])[..3].to_vec(),
            ),
        ];
        for (what, after) in &afters {
            let mut sent = close.clone();
            sent.extend_from_slice(after);
            let at_close_end = close.len();
            // One write; the Close then a pause; the Close's last byte with what follows;
            // the Close with a byte of what follows, then the rest.
            for cuts in [
                vec![],
                vec![at_close_end],
                vec![at_close_end - 1],
                vec![at_close_end + 1],
            ] {
                let (mut browser, mut api, _) = open(&mut s, "/ws/raw").await;
                let (sender, receiver): (&mut dyn Io, &mut dyn Io) = if from_browser {
                    (&mut browser, &mut api)
                } else {
                    (&mut api, &mut browser)
                };
                let case = format!("from_browser {from_browser}, {what}, cuts {cuts:?}");
                write_in_pieces(sender, &sent, &cuts).await;
                let mut got = vec![0u8; close.len()];
                within(receiver.read_exact(&mut got)).await.unwrap();
                assert_eq!(got, close, "{case}");
                // The other side answers; the sender gets that Close, not a 1002.
                let reply = frame(0x88, (!from_browser).then_some(KEY), b"\x03\xe8ok");
                receiver.write_all(&reply).await.unwrap();
                let back = read_frame(sender).await;
                assert_eq!(back.close(), (1000, "ok".into()), "{case}");
                // The API ends the TCP connection first (RFC 6455 §7.1.1), then the browser.
                let (server, client): (&mut dyn Io, &mut dyn Io) = if from_browser {
                    (receiver, sender)
                } else {
                    (sender, receiver)
                };
                server.shutdown().await.unwrap();
                assert_eq!(rest_of(client).await, b"", "{case}");
                client.shutdown().await.unwrap();
                let rest = rest_of(server).await;
                if from_browser {
                    assert_eq!(rest, b"", "{case}: nothing after the browser's Close");
                }
                ended(&s.h).await;
            }
        }
    }
}

/// Quoted extension parameters (RFC 6455 §9.1's `quoted-string`, RFC 7230 §3.2.6 with its
/// backslash escapes): a comma or semicolon inside quotes is part of the value, so
/// permessage-deflate with such a parameter is still permessage-deflate alone: RSV1 on a
/// first frame passes, RSV2 is refused. A real second extension after it, or an unbalanced
/// quote (documented: counted as an extension the proxy does not know), lets RSV2 through.
/// The `101`'s line reaches the browser as the API sent it.
#[tokio::test]
async fn quoted_extension_parameters() {
    let mut s = start().await;
    for (i, (line, deflate)) in EXTENSION_LINES.iter().enumerate() {
        let path = format!("/ws/ext{i}");
        let (mut browser, mut api, head) = open(&mut s, &path).await;
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("sec-websocket-extensions: {line}"))),
            "{head}"
        );
        let rsv1 = frame(0xC1, Some(KEY), b"compressed");
        browser.write_all(&rsv1).await.unwrap();
        let mut got = vec![0u8; rsv1.len()];
        within(api.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, rsv1, "{line}");
        let rsv2 = frame(0xA2, None, b"rsv2");
        api.write_all(&rsv2).await.unwrap();
        if *deflate {
            assert_eq!(
                read_frame(&mut browser).await.close(),
                (1002, "protocol_error".into()),
                "{line}"
            );
        } else {
            let mut got = vec![0u8; rsv2.len()];
            within(browser.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, rsv2, "{line}");
        }
    }
}

//! The proxy's WebSocket relay checks every frame header (RFC 6455 §5; src/proxy/websocket/
//! frames.rs): a browser's frames masked and the API's not, no reserved opcode, control frames
//! final and at most 125 bytes, RSV bits only as the extension the API's `101` negotiated
//! defines them (permessage-deflate: RSV1 on a message's first frame), continuations only
//! inside a fragmented message. A malformed header gets the sender a Close 1002
//! `protocol_error` and the other side the same Close, after the frames before it, intact. A
//! header not yet whole at the end of a read is held back, so none of a malformed one reaches
//! the other side even when it arrives in pieces.
//!
//! Against real servers on loopback: the proxy (the test harness), an upstream behind the
//! real `VerifyLayer` that takes the upgrade and either speaks WebSocket with
//! tokio-tungstenite (`…/tung`) or hands the raw connection to the test (`…/raw…`), and a
//! browser that is raw bytes over TCP.
//!
//! Run: `cargo test --all-features --test proxy_websocket_frames`.
#![cfg(feature = "proxy")]

mod support;
mod support_ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{Policy, Verifier};
use countersign::layer::VerifyLayer;
use countersign::proxy::forward::WebSocketRoute;
use countersign::replay::MemoryReplayCache;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Request;
use http_body_util::Full;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use support::*;
use support_ws::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower::Layer as _;

type RawUpstream = TokioIo<Upgraded>;

/// The WebSocket upstream: `…/tung` speaks WebSocket (tokio-tungstenite, server role),
/// echoes text and logs the Close it gets (`close <code> <reason>`); `…/raw…` hands the
/// upgraded connection to the test. Its `101` negotiates permessage-deflate on paths ending
/// in `/deflate`, an extension the proxy does not know on `/unknown`, none elsewhere.
struct WsUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    raw: mpsc::UnboundedReceiver<RawUpstream>,
}

async fn start_ws_upstream() -> WsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (raw_tx, raw) = mpsc::unbounded_channel();
    let layer = VerifyLayer::new(
        Verifier::new(test_keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(10_000)),
    )
    .clock(Arc::new(ManualClock::new(T0)));
    let app_log = log.clone();
    let app = tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let log = app_log.clone();
        let raw_tx = raw_tx.clone();
        async move {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .map(|k| derive_accept_key(k.as_bytes()))
                .unwrap_or_default();
            let path = req.uri().path().to_owned();
            let upgrade = hyper::upgrade::on(&mut req);
            let tung = path.ends_with("/tung");
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let io = TokioIo::new(upgraded);
                if !tung {
                    let _ = raw_tx.send(io);
                    return;
                }
                let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => {
                            if ws.send(Message::Text(text)).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let entry = match frame {
                                Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
                                None => "close".into(),
                            };
                            log.lock().push(entry);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            log.lock().push(format!("error {e}"));
                            return;
                        }
                        None => {
                            log.lock().push("ended".into());
                            return;
                        }
                    }
                }
            });
            let mut switching = switching_protocols(&key);
            let h = switching.headers_mut();
            if path.ends_with("/deflate") {
                let deflate = "permessage-deflate; server_no_context_takeover";
                h.insert("sec-websocket-extensions", deflate.parse().unwrap());
            } else if path.ends_with("/unknown") {
                h.insert("sec-websocket-extensions", "x-test-ext".parse().unwrap());
            }
            Ok::<_, Infallible>(switching)
        }
    });
    serve_with_upgrades(listener, layer.layer(app));
    WsUpstream { addr, log, raw }
}

/// The proxy with `/ws/` routed to the WebSocket upstream.
async fn start() -> (Harness, WsUpstream) {
    let upstream = start_ws_upstream().await;
    let limits = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    (harness_with_ws_route(upstream.addr, limits).await, upstream)
}

/// A browser's handshake: the connection, nothing read past the answer's head, which must
/// be a 101.
async fn handshake(addr: SocketAddr, path: &str, login: &Login) -> TcpStream {
    let (stream, head) = browser_handshake(addr, path, &login.cookie, ORIGIN).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

async fn raw_upstream(upstream: &mut WsUpstream) -> RawUpstream {
    within(upstream.raw.recv()).await.expect("the raw upstream")
}

/// The key a side masks with: the browser's frames are masked, the API's not.
fn key_of(browser: bool) -> Option<[u8; 4]> {
    browser.then_some(KEY)
}

/// How a malformed header is sent.
#[derive(Clone, Copy, PartialEq)]
enum Send {
    /// With the frames before it, in one write.
    Whole,
    /// The frames before it, then its first byte alone, then (after a pause) the rest:
    /// separate reads at the proxy.
    Split,
}

/// A WebSocket on `path` where `from_browser` (else the API) sends a valid text frame, the
/// valid frames `before`, then `bad`: the other side gets the text frame and `before` intact,
/// then a Close 1002 `protocol_error` (never a byte of `bad`); the sender gets the same
/// Close; once the other side answers its Close, both connections end, with nothing more.
async fn refused(
    h: &Harness,
    upstream: &mut WsUpstream,
    path: &str,
    from_browser: bool,
    before: &[Vec<u8>],
    bad: &[u8],
    send: Send,
) {
    let what = format!("{path} from_browser {from_browser} bad {bad:02x?}");
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut browser = handshake(h.addr, path, &login).await;
    let mut api = raw_upstream(upstream).await;
    let (sender, receiver): (&mut dyn AsyncWriteRead, &mut dyn AsyncWriteRead) = if from_browser {
        (&mut browser, &mut api)
    } else {
        (&mut api, &mut browser)
    };
    let key = key_of(from_browser);
    let valid = frame(0x81, key, b"ok");
    let mut first = valid.clone();
    first.extend(before.iter().flatten());
    match send {
        Send::Whole => {
            first.extend_from_slice(bad);
            sender.write_all(&first).await.unwrap();
        }
        Send::Split => {
            sender.write_all(&first).await.unwrap();
            sender.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender.write_all(&bad[..1]).await.unwrap();
            sender.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            sender.write_all(&bad[1..]).await.unwrap();
        }
    }
    // What was valid arrives intact, as it was sent (the API's frames byte for byte; the
    // browser's unmasked).
    let ok = read_frame(receiver).await;
    assert_eq!(
        (ok.first, ok.masked, ok.payload.as_slice()),
        (0x81, from_browser, &b"ok"[..]),
        "{what}"
    );
    for sent in before {
        let got = read_frame(receiver).await;
        let mut want = &sent[..];
        let expected = read_frame(&mut want).await;
        assert_eq!(got, expected, "{what}");
    }
    // Then the Close, with no byte of the malformed header before it.
    let to_receiver = read_frame(receiver).await;
    assert_eq!(to_receiver.masked, from_browser, "{what}: {to_receiver:?}");
    assert_eq!(
        to_receiver.close(),
        (1002, "protocol_error".into()),
        "{what}"
    );
    let to_sender = read_frame(sender).await;
    assert_eq!(to_sender.masked, !from_browser, "{what}: {to_sender:?}");
    assert_eq!(to_sender.close(), (1002, "protocol_error".into()), "{what}");
    // The side that sent garbage is not waited for; the other answers.
    let reply = frame(0x88, key_of(!from_browser), &1002u16.to_be_bytes());
    receiver.write_all(&reply).await.unwrap();
    assert_eq!(
        rest_of(receiver).await,
        b"",
        "{what}: nothing after the Close"
    );
    rest_of(sender).await;
}

/// Both halves of a connection, as one trait object.
trait AsyncWriteRead: AsyncRead + AsyncWrite + Unpin + std::marker::Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + std::marker::Send> AsyncWriteRead for T {}

/// A browser's frame must be masked (§5.1): an unmasked one is refused. Against the real
/// WebSocket server (tungstenite), which gets the 1002 Close after the valid message.
#[tokio::test]
async fn an_unmasked_browser_frame_is_refused_and_the_api_gets_1002() {
    let (h, upstream) = start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut browser = handshake(h.addr, "/ws/tung", &login).await;
    let valid = frame(0x81, Some(KEY), b"echo me");
    browser.write_all(&valid).await.unwrap();
    let echo = read_frame(&mut browser).await;
    assert_eq!(
        (echo.first, echo.payload.as_slice()),
        (0x81, &b"echo me"[..])
    );
    browser
        .write_all(&frame(0x81, None, b"unmasked"))
        .await
        .unwrap();
    let close = read_frame(&mut browser).await;
    assert!(!close.masked);
    assert_eq!(close.close(), (1002, "protocol_error".into()));
    for _ in 0..100 {
        if upstream
            .log
            .lock()
            .iter()
            .any(|e| e == "close 1002 protocol_error")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        upstream
            .log
            .lock()
            .iter()
            .any(|e| e == "close 1002 protocol_error"),
        "{:?}",
        upstream.log.lock()
    );
    assert_eq!(rest_of(&mut browser).await, b"");
}

#[tokio::test]
async fn masking_direction_is_checked_both_ways() {
    let (h, mut up) = start().await;
    // The browser's frame unmasked, the API's masked.
    refused(
        &h,
        &mut up,
        "/ws/raw",
        true,
        &[],
        &frame(0x82, None, b"x"),
        Send::Whole,
    )
    .await;
    let masked = frame(0x82, Some(KEY), b"x");
    refused(&h, &mut up, "/ws/raw", false, &[], &masked, Send::Whole).await;
}

#[tokio::test]
async fn reserved_opcodes_are_refused() {
    let (h, mut up) = start().await;
    refused(
        &h,
        &mut up,
        "/ws/raw",
        true,
        &[],
        &frame(0x83, Some(KEY), b"x"),
        Send::Whole,
    )
    .await;
    refused(
        &h,
        &mut up,
        "/ws/raw",
        false,
        &[],
        &frame(0x8B, None, b"x"),
        Send::Whole,
    )
    .await;
}

#[tokio::test]
async fn control_frames_must_be_final_and_short() {
    let (h, mut up) = start().await;
    // A fragmented ping.
    let ping = frame(0x09, Some(KEY), b"p");
    refused(&h, &mut up, "/ws/raw", true, &[], &ping, Send::Whole).await;
    // A 126-byte ping (and a 125-byte one before it is fine).
    let fine = vec![frame(0x89, None, &[7u8; 125])];
    let long = frame(0x89, None, &[7u8; 126]);
    refused(&h, &mut up, "/ws/raw", false, &fine, &long, Send::Whole).await;
}

#[tokio::test]
async fn rsv1_needs_permessage_deflate_from_the_api() {
    let (h, mut up) = start().await;
    // No extension negotiated: RSV1 is refused.
    let rsv1 = frame(0xC1, None, b"x");
    refused(&h, &mut up, "/ws/raw", false, &[], &rsv1, Send::Whole).await;
    let rsv1 = frame(0xC2, Some(KEY), b"x");
    refused(&h, &mut up, "/ws/raw", true, &[], &rsv1, Send::Whole).await;
    // permessage-deflate negotiated: RSV1 on a message's first frame passes both ways (the
    // "compressed" bytes untouched)...
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut browser = handshake(h.addr, "/ws/raw/deflate", &login).await;
    let mut api = raw_upstream(&mut up).await;
    let compressed: Vec<u8> = (0..300u32).map(|i| (i * 31 % 256) as u8).collect();
    let mut sent = frame(0x41, Some(KEY), &compressed[..100]); // RSV1, text, not final
    sent.extend(frame(0x80, Some(KEY), &compressed[100..])); // its continuation
    browser.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
    let sent = frame(0xC2, None, &compressed);
    api.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(browser.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
    drop((browser, api));
    // ...but not RSV1 on a continuation, nor RSV2.
    let open = vec![frame(0x41, None, b"a")];
    let continued = frame(0xC0, None, b"b");
    refused(
        &h,
        &mut up,
        "/ws/raw/deflate",
        false,
        &open,
        &continued,
        Send::Whole,
    )
    .await;
    let rsv2 = frame(0xA1, Some(KEY), b"x");
    refused(
        &h,
        &mut up,
        "/ws/raw/deflate",
        true,
        &[],
        &rsv2,
        Send::Whole,
    )
    .await;
    // An extension the proxy does not know: its RSV bits pass.
    let mut browser = handshake(h.addr, "/ws/raw/unknown", &login).await;
    let mut api = raw_upstream(&mut up).await;
    let sent = frame(0xB1, Some(KEY), b"rsv1+rsv3");
    browser.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn continuations_need_a_fragmented_message() {
    let (h, mut up) = start().await;
    // A stray continuation: no message in progress.
    let stray = frame(0x80, Some(KEY), b"x");
    refused(&h, &mut up, "/ws/raw", true, &[], &stray, Send::Whole).await;
    // After a fragmented message ended (with a ping between its fragments).
    let message = vec![
        frame(0x01, None, b"a"),
        frame(0x89, None, b""),
        frame(0x80, None, b"b"),
    ];
    let stray = frame(0x80, None, b"c");
    refused(&h, &mut up, "/ws/raw", false, &message, &stray, Send::Whole).await;
    // A new message while one is in progress.
    let open = vec![frame(0x02, Some(KEY), b"a")];
    let new = frame(0x81, Some(KEY), b"b");
    refused(&h, &mut up, "/ws/raw", true, &open, &new, Send::Whole).await;
}

#[tokio::test]
async fn a_64_bit_length_with_its_top_bit_is_refused() {
    let (h, mut up) = start().await;
    let mut bad = vec![0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 1];
    refused(&h, &mut up, "/ws/raw", false, &[], &bad, Send::Whole).await;
    bad[1] |= 0x80;
    bad.extend_from_slice(&KEY);
    refused(&h, &mut up, "/ws/raw", true, &[], &bad, Send::Whole).await;
}

/// A malformed header whose first byte arrives in one read and the rest in a later one: the
/// other side gets no byte of it, and a proper Close. On the code before, that first byte
/// was relayed, and the other side's connection was then cut without a Close.
#[tokio::test]
async fn a_malformed_header_split_across_reads_is_never_relayed_in_part() {
    let (h, mut up) = start().await;
    let mut top_bit = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1];
    top_bit.extend_from_slice(&KEY);
    refused(&h, &mut up, "/ws/raw", true, &[], &top_bit, Send::Split).await;
    let top_bit = [0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 1];
    refused(&h, &mut up, "/ws/raw", false, &[], &top_bit, Send::Split).await;
    // The checks of the second byte: masking, a control frame's length.
    let unmasked = frame(0x82, None, b"x");
    refused(&h, &mut up, "/ws/raw", true, &[], &unmasked, Send::Split).await;
    let long = frame(0x8A, None, &[1u8; 126]);
    refused(&h, &mut up, "/ws/raw", false, &[], &long, Send::Split).await;
}

/// A valid header split across reads (each byte in a write of its own) still arrives whole
/// and in order, its bytes held back only until it is whole.
#[tokio::test]
async fn a_valid_header_in_pieces_arrives_whole() {
    let (h, mut up) = start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut browser = handshake(h.addr, "/ws/raw", &login).await;
    let mut api = raw_upstream(&mut up).await;
    let sent = frame(0x82, Some(KEY), &[9u8; 300]);
    for byte in &sent[..8] {
        browser.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    browser.write_all(&sent[8..]).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, sent);
}

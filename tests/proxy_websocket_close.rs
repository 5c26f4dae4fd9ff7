//! How the proxy ends a WebSocket itself (src/proxy/websocket.rs, websocket/frames.rs,
//! websocket/splice.rs): a Close frame to each side (the browser's unmasked, the upstream's
//! masked), never inside a frame, then each side's Close awaited within
//! `websocket_close_timeout`; on logout (1008 `session_ended`), idleness (1001
//! `idle_timeout`), shutdown (1001 `shutting_down`, and the shutdown waits for them) and a
//! malformed frame header (1002 `protocol_error`). Plus the proxy-wide
//! `server.websocket_max_open` and the new config keys.
//!
//! Against real servers on loopback: the proxy (the test harness, as
//! tests/proxy_websocket.rs starts it), an upstream behind the real `VerifyLayer` that takes
//! the upgrade and either speaks WebSocket with tokio-tungstenite or hands the raw
//! connection to the test, and a browser that is a tokio-tungstenite client or raw bytes.
//!
//! Run: `cargo test --all-features --test proxy_websocket_close`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;
mod support_run;
mod support_ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{Policy, Verifier};
use countersign::layer::VerifyLayer;
use countersign::proxy::forward::WebSocketRoute;
use countersign::replay::MemoryReplayCache;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, StatusCode};
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

/// The WebSocket upstream: `…/tung` speaks WebSocket (tokio-tungstenite, server role: it
/// refuses unmasked frames), greets with the text `hello`, echoes text, and logs what it
/// receives (`close <code> <reason>`, `ended`, `error …`); `…/raw` hands the upgraded
/// connection to the test.
struct WsUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    raw: mpsc::UnboundedReceiver<RawUpstream>,
}

async fn start_ws_upstream() -> WsUpstream {
    start_ws_upstream_with(test_keyring(), Arc::new(ManualClock::new(T0))).await
}

/// [`start_ws_upstream`] verifying with `keyring` on `clock`.
async fn start_ws_upstream_with(
    keyring: countersign::core::KeyringHandle,
    clock: countersign::clock::SharedClock,
) -> WsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (raw_tx, raw) = mpsc::unbounded_channel();
    let layer = VerifyLayer::new(
        Verifier::new(keyring, Policy::default()),
        Arc::new(MemoryReplayCache::new(10_000)),
    )
    .clock(clock);
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
            let extensions = req.headers().get("sec-websocket-extensions").cloned();
            let tung = req.uri().path().ends_with("/tung");
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let io = TokioIo::new(upgraded);
                if !tung {
                    let _ = raw_tx.send(io);
                    return;
                }
                let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                if ws.send(Message::text("hello")).await.is_err() {
                    return;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => {
                            if ws.send(Message::Text(text)).await.is_err() {
                                log.lock().push("error sending".into());
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
            if let Some(extensions) = extensions {
                h.insert("sec-websocket-extensions", extensions);
            }
            Ok::<_, Infallible>(switching)
        }
    });
    serve_with_upgrades(listener, layer.layer(app));
    WsUpstream { addr, log, raw }
}

/// The proxy with `/ws/` (and `/ws2/`) routed to the WebSocket upstream with `settings`.
async fn start(settings: WebSocketRoute, tweak: Tweak) -> (Harness, WsUpstream) {
    let upstream = start_ws_upstream().await;
    let url = format!("http://{}", upstream.addr);
    let mut ws = route("ws", "/ws/", &url);
    ws.websocket = Some(settings.clone());
    let mut ws2 = route("ws2", "/ws2/", &url);
    let limits = settings.limits();
    ws2.websocket = Some(WebSocketRoute::new(
        limits.idle_timeout,
        limits.session_check,
        limits.max_open,
    ));
    let harness = Harness::start_with(HarnessOptions {
        extra_routes: vec![ws, ws2],
        tweak,
        ..Default::default()
    })
    .await;
    (harness, upstream)
}

fn no_tweak() -> Tweak {
    Box::new(|_, _| {})
}

/// A browser's handshake: the connection (nothing read past the head), the status and the
/// body of a refusal.
async fn handshake(addr: SocketAddr, path: &str, login: &Login) -> (TcpStream, u16, String) {
    let (mut stream, head) = browser_handshake(addr, path, &login.cookie, ORIGIN).await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = String::new();
    if status != 101 {
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            })
            .unwrap_or(0);
        let mut bytes = vec![0u8; length];
        within(stream.read_exact(&mut bytes)).await.unwrap();
        body = String::from_utf8_lossy(&bytes).into_owned();
    }
    (stream, status, body)
}

async fn tung_browser(stream: TcpStream) -> WebSocketStream<TcpStream> {
    WebSocketStream::from_raw_socket(stream, Role::Client, None).await
}

/// After its Close, the browser's WebSocket ends (tungstenite answers the Close meanwhile).
async fn ends<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within(async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

async fn upstream_logged(log: &Mutex<Vec<String>>, want: &str) {
    for _ in 0..100 {
        if log.lock().iter().any(|entry| entry == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream never logged {want:?}: {:?}", log.lock());
}

/// A browser's reply to a Close (masked) and a server's (not).
fn close_reply(key: Option<[u8; 4]>, code: u16) -> Vec<u8> {
    frame(0x88, key, &code.to_be_bytes())
}

async fn raw_upstream(upstream: &mut WsUpstream) -> RawUpstream {
    within(upstream.raw.recv()).await.expect("the raw upstream")
}

/// Whether a connection is closed (EOF or reset) within `limit`, discarding what comes.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn open_count(h: &Harness, route: &str) -> u64 {
    gauge(
        h.admin,
        &format!("countersign_websockets_open{{upstream=\"{route}\"}}"),
    )
    .await
}

async fn open_count_falls_to(h: &Harness, route: &str, want: u64, limit: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let now = open_count(h, route).await;
        if now == want || started.elapsed() > limit {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_logout_sends_1008_session_ended_to_both_sides() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_millis(200), 100);
    let (h, upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (stream, status, _) = handshake(h.addr, "/ws/tung", &login).await;
    assert_eq!(status, 101);
    let mut ws = tung_browser(stream).await;
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("hello")
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("still here")
    );
    assert_eq!(logout(h.addr, &login).await.status, StatusCode::NO_CONTENT);
    let closed = Instant::now();
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(3)).await,
        (1008, "session_ended".to_owned())
    );
    ends(&mut ws).await;
    // The upstream (tungstenite refuses unmasked frames from a client) got its own Close.
    upstream_logged(&upstream.log, "close 1008 session_ended").await;
    // Both sides answered: over well before `websocket_close_timeout` (5 s).
    assert_eq!(
        open_count_falls_to(&h, "ws", 0, Duration::from_secs(10)).await,
        0
    );
    assert!(
        closed.elapsed() < Duration::from_secs(4),
        "{:?}",
        closed.elapsed()
    );
}

#[tokio::test]
async fn an_idle_websocket_gets_1001_idle_timeout() {
    let settings = WebSocketRoute::new(Duration::from_millis(600), Duration::from_secs(30), 100);
    let (h, upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (stream, status, _) = handshake(h.addr, "/ws/tung", &login).await;
    assert_eq!(status, 101);
    let mut ws = tung_browser(stream).await;
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("hello")
    );
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(5)).await,
        (1001, "idle_timeout".to_owned())
    );
    ends(&mut ws).await;
    upstream_logged(&upstream.log, "close 1001 idle_timeout").await;
}

#[tokio::test]
async fn a_shutdown_closes_websockets_with_1001_and_waits_for_them() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    // A grace far longer than the close takes: the shutdown must end once the WebSockets
    // are closed, not at the end of the grace.
    let (mut h, mut upstream) = start(
        settings,
        Box::new(|s, _| s.shutdown_grace = Duration::from_secs(20)),
    )
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (stream, status, _) = handshake(h.addr, "/ws/raw", &login).await;
    assert_eq!(status, 101);
    let mut api = raw_upstream(&mut upstream).await;
    let mut ws = tung_browser(stream).await;
    api.write_all(&frame(0x81, None, b"hi")).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("hi")
    );
    let proxy = h.proxy.take().unwrap();
    let started = Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(5)).await,
        (1001, "shutting_down".to_owned())
    );
    // The upstream gets a masked Close (the proxy is the client there) and answers it.
    let close = read_frame(&mut api).await;
    assert!(close.masked, "{close:?}");
    assert_eq!(close.close(), (1001, "shutting_down".to_owned()));
    api.write_all(&close_reply(None, 1001)).await.unwrap();
    ends(&mut ws).await;
    within(stopping).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the shutdown ends when its WebSockets are closed: {:?}",
        started.elapsed()
    );
    assert!(closed_within(&mut api, Duration::from_secs(5)).await);
    assert!(
        refused_within(h.addr, Duration::from_secs(5)).await,
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_shutdown_drops_websockets_that_do_not_answer_at_the_end_of_the_grace() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100)
        .with_close_timeout(Duration::from_secs(30));
    let (mut h, mut upstream) = start(
        settings,
        Box::new(|s, _| s.shutdown_grace = Duration::from_millis(800)),
    )
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, status, _) = handshake(h.addr, "/ws/raw", &login).await;
    assert_eq!(status, 101);
    let mut api = raw_upstream(&mut upstream).await;
    let started = Instant::now();
    within(h.proxy.take().unwrap().shutdown()).await;
    // Neither side answered its Close: dropped at the end of the grace, not of the close
    // timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        read_frame(&mut browser).await.close(),
        (1001, "shutting_down".into())
    );
    assert_eq!(
        read_frame(&mut api).await.close(),
        (1001, "shutting_down".into())
    );
    assert!(closed_within(&mut browser, Duration::from_secs(5)).await);
    assert!(closed_within(&mut api, Duration::from_secs(5)).await);
}

/// A 1 MiB message each way is in flight (sent in pieces) when the logout is found: each
/// arrives whole, and the Close after it.
#[tokio::test]
async fn a_large_message_in_flight_arrives_whole_before_the_close() {
    const SIZE: usize = 1024 * 1024;
    const PIECES: usize = 8;
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_millis(100), 100);
    let (h, mut upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (browser, status, _) = handshake(h.addr, "/ws/raw", &login).await;
    assert_eq!(status, 101);
    let api = raw_upstream(&mut upstream).await;
    let message: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 251) as u8).collect();
    let down = frame(0x82, None, &message);
    let up = frame(0x82, Some(KEY), &message);
    let (mut browser_read, mut browser_write) = browser.into_split();
    let (mut api_read, mut api_write) = tokio::io::split(api);
    // The first piece each way, then the logout, then the rest once the close is due.
    let piece = up.len().div_ceil(PIECES);
    browser_write.write_all(&up[..piece]).await.unwrap();
    api_write.write_all(&down[..piece]).await.unwrap();
    assert_eq!(logout(h.addr, &login).await.status, StatusCode::NO_CONTENT);
    // Several session checks: the close is due by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rest_up = tokio::spawn(async move {
        for chunk in up[piece..].chunks(piece) {
            browser_write.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        browser_write
    });
    let rest_down = tokio::spawn(async move {
        for chunk in down[piece..].chunks(piece) {
            api_write.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        api_write
    });
    let got_down = read_frame(&mut browser_read).await;
    assert_eq!((got_down.first, got_down.masked), (0x82, false));
    assert!(got_down.payload == message, "the browser's copy is intact");
    let close = read_frame(&mut browser_read).await;
    assert!(!close.masked);
    assert_eq!(close.close(), (1008, "session_ended".into()));
    let got_up = read_frame(&mut api_read).await;
    assert_eq!((got_up.first, got_up.masked), (0x82, true));
    assert!(got_up.payload == message, "the upstream's copy is intact");
    let close = read_frame(&mut api_read).await;
    assert!(close.masked);
    assert_eq!(close.close(), (1008, "session_ended".into()));
    let mut browser_write = within(rest_up).await.unwrap();
    let mut api_write = within(rest_down).await.unwrap();
    browser_write
        .write_all(&close_reply(Some(KEY), 1008))
        .await
        .unwrap();
    api_write.write_all(&close_reply(None, 1008)).await.unwrap();
    assert!(closed_within(&mut browser_read, Duration::from_secs(5)).await);
    assert!(closed_within(&mut api_read, Duration::from_secs(5)).await);
}

/// A frame header the framing cannot carry (a 64-bit length with its top bit set), from
/// either side: 1002 `protocol_error` to both, and none of its bytes passed on.
#[tokio::test]
async fn a_malformed_frame_header_closes_both_sides_with_1002() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    let (h, mut upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let bad_length = [0x80u8, 0, 0, 0, 0, 0, 0, 1];
    for from_browser in [false, true] {
        let (mut browser, status, _) = handshake(h.addr, "/ws/raw", &login).await;
        assert_eq!(status, 101);
        let mut api = raw_upstream(&mut upstream).await;
        if from_browser {
            let mut bytes = frame(0x81, Some(KEY), b"ok");
            bytes.extend_from_slice(&[0x82, 0xff]);
            bytes.extend_from_slice(&bad_length);
            bytes.extend_from_slice(&KEY);
            browser.write_all(&bytes).await.unwrap();
            let ok = read_frame(&mut api).await;
            assert_eq!((ok.first, ok.payload.as_slice()), (0x81, &b"ok"[..]));
        } else {
            let mut bytes = frame(0x81, None, b"ok");
            bytes.extend_from_slice(&[0x82, 0x7f]);
            bytes.extend_from_slice(&bad_length);
            api.write_all(&bytes).await.unwrap();
            let ok = read_frame(&mut browser).await;
            assert_eq!((ok.first, ok.payload.as_slice()), (0x81, &b"ok"[..]));
        }
        let to_browser = read_frame(&mut browser).await;
        assert!(!to_browser.masked);
        assert_eq!(
            to_browser.close(),
            (1002, "protocol_error".into()),
            "from_browser {from_browser}"
        );
        let to_api = read_frame(&mut api).await;
        assert!(to_api.masked);
        assert_eq!(
            to_api.close(),
            (1002, "protocol_error".into()),
            "from_browser {from_browser}"
        );
        // The side that sent garbage is not waited for; the other answers.
        if from_browser {
            api.write_all(&close_reply(None, 1002)).await.unwrap();
        } else {
            browser
                .write_all(&close_reply(Some(KEY), 1002))
                .await
                .unwrap();
        }
        assert!(closed_within(&mut browser, Duration::from_secs(5)).await);
        assert!(closed_within(&mut api, Duration::from_secs(5)).await);
    }
    assert_eq!(
        open_count_falls_to(&h, "ws", 0, Duration::from_secs(10)).await,
        0
    );
}

/// Frames with RSV1 set (permessage-deflate, negotiated end to end), a message in fragments
/// with a ping between them: passed on byte for byte both ways; then the idle close comes
/// after them, at a frame boundary.
#[tokio::test]
async fn rsv1_frames_and_fragments_pass_unchanged_then_close_at_a_boundary() {
    let settings = WebSocketRoute::new(Duration::from_millis(800), Duration::from_secs(30), 100);
    let (h, mut upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, status, _) = handshake(h.addr, "/ws/raw", &login).await;
    assert_eq!(status, 101);
    let mut api = raw_upstream(&mut upstream).await;
    // "Compressed" bytes: to the proxy, payload it must not look at.
    let deflated: Vec<u8> = (0..700u32).map(|i| (i * 31 % 256) as u8).collect();
    let mut up = frame(0x41, Some(KEY), &deflated[..300]); // RSV1, text, not final
    up.extend(frame(0x89, Some(KEY), b"ping")); // a control frame between fragments
    up.extend(frame(0x80, Some(KEY), &deflated[300..])); // final continuation
    let mut down = frame(0xc2, None, &deflated); // FIN, RSV1, binary
    down.extend(frame(0xc1, None, &deflated[..3])); // FIN, RSV1, text
                                                    // In small writes, headers split across them.
    for chunk in up.chunks(7) {
        browser.write_all(chunk).await.unwrap();
    }
    for chunk in down.chunks(5) {
        api.write_all(chunk).await.unwrap();
    }
    let mut got = vec![0u8; up.len()];
    within(api.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, up, "the browser's frames reach the upstream unchanged");
    let mut got = vec![0u8; down.len()];
    within(browser.read_exact(&mut got)).await.unwrap();
    assert_eq!(
        got, down,
        "the upstream's frames reach the browser unchanged"
    );
    let close = read_frame(&mut browser).await;
    assert!(!close.masked);
    assert_eq!(close.close(), (1001, "idle_timeout".into()));
    let close = read_frame(&mut api).await;
    assert!(close.masked);
    assert_eq!(close.close(), (1001, "idle_timeout".into()));
    let _ = h;
}

#[tokio::test]
async fn the_proxy_wide_limit_refuses_with_503_while_the_routes_allow() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 10);
    let (h, _upstream) = start(settings, Box::new(|s, _| s.websocket_max_open = 2)).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (first, status, _) = handshake(h.addr, "/ws/tung", &login).await;
    assert_eq!(status, 101);
    let (_second, status, _) = handshake(h.addr, "/ws2/tung", &login).await;
    assert_eq!(status, 101);
    for path in ["/ws/tung", "/ws2/tung"] {
        let (_, status, body) = handshake(h.addr, path, &login).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("websocket_limit"), "{path}: {body}");
    }
    // A refusal by the proxy-wide limit leaves the routes' counts (the gauge) as they were.
    assert_eq!(open_count(&h, "ws").await, 1);
    assert_eq!(open_count(&h, "ws2").await, 1);
    drop(first);
    assert_eq!(
        open_count_falls_to(&h, "ws", 0, Duration::from_secs(10)).await,
        0
    );
    let (_third, status, body) = handshake(h.addr, "/ws2/tung", &login).await;
    assert_eq!(status, 101, "a slot is free again: {body}");
    assert_eq!(open_count(&h, "ws2").await, 2);
}

/// `server.websocket_max_open_per_user`: a user's WebSockets count together on every route
/// and in every session of theirs; beyond the limit a handshake answers 429
/// `websocket_user_limit` and takes no route place; another user is not held back; a closed
/// WebSocket frees its place. Before the limit existed, the third handshake was a 101 (one
/// account could take every place of `websocket_max_open`).
#[tokio::test]
async fn the_per_user_limit_refuses_with_429_while_other_users_open() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 10);
    let (h, _upstream) = start(settings, Box::new(|s, _| s.websocket_max_open_per_user = 2)).await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let alice_again = h.login("alice", ALICE_PASSWORD).await;
    let (first, status, _) = handshake(h.addr, "/ws/tung", &alice).await;
    assert_eq!(status, 101);
    let (_second, status, _) = handshake(h.addr, "/ws2/tung", &alice_again).await;
    assert_eq!(status, 101);
    for (path, login) in [("/ws/tung", &alice), ("/ws2/tung", &alice_again)] {
        let (_, status, body) = handshake(h.addr, path, login).await;
        assert_eq!(status, 429, "{path}: {body}");
        assert!(body.contains("websocket_user_limit"), "{path}: {body}");
    }
    assert_eq!(open_count(&h, "ws").await, 1, "a refusal takes no place");
    assert_eq!(open_count(&h, "ws2").await, 1);
    let bob = h.login("bob", BOB_PASSWORD).await;
    let (_bobs, status, body) = handshake(h.addr, "/ws/tung", &bob).await;
    assert_eq!(status, 101, "another user: {body}");
    drop(first);
    assert_eq!(
        open_count_falls_to(&h, "ws", 1, Duration::from_secs(10)).await,
        1
    );
    let (_third, status, body) = handshake(h.addr, "/ws/tung", &alice).await;
    assert_eq!(status, 101, "alice's place is free again: {body}");
}

/// `upstream[].websocket_close_timeout` and `server.websocket_max_open`: defaults, values,
/// and each refusal naming the file and the key.
#[test]
fn the_new_keys_in_proxy_toml() {
    use countersign::proxy::config::ProxyConfig;
    let dir = temp_dir("ws-close-config");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let path = dir.join("proxy.toml");
    let text = |server_extra: &str, upstream_extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"http://app.test\"\n\
             {server_extra}\
             [session]\nstore = \"memory\"\n[auth]\nusers_file = \"users.toml\"\n\
             [signing]\nkeyring = \"keys.toml\"\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n\
             {upstream_extra}"
        )
    };
    let default = ProxyConfig::parse(&text("", "websocket = true\n"), &path).unwrap();
    let ws = default.upstreams[0].websocket.clone().unwrap().limits();
    assert_eq!(ws.close_timeout, Duration::from_secs(5));
    assert_eq!(default.server.websocket_max_open, 10_000);
    assert_eq!(default.server.websocket_max_open_per_user, 64);
    let set = ProxyConfig::parse(
        &text(
            "websocket_max_open = 3\nwebsocket_max_open_per_user = 2\n",
            "websocket = true\nwebsocket_close_timeout = \"750ms\"\n",
        ),
        &path,
    )
    .unwrap();
    let ws = set.upstreams[0].websocket.clone().unwrap().limits();
    assert_eq!(ws.close_timeout, Duration::from_millis(750));
    assert_eq!(set.server.websocket_max_open, 3);
    assert_eq!(set.server.websocket_max_open_per_user, 2);
    for (server, upstream, key, problem) in [
        (
            "",
            "websocket_close_timeout = \"5s\"\n",
            "upstream[0].websocket_close_timeout",
            "only used with websocket = true",
        ),
        (
            "",
            "websocket = true\nwebsocket_close_timeout = \"0s\"\n",
            "upstream[0].websocket_close_timeout",
            "",
        ),
        (
            "",
            "websocket = true\nwebsocket_close_timeout = \"soon\"\n",
            "upstream[0].websocket_close_timeout",
            "",
        ),
        (
            "websocket_max_open = 0\n",
            "",
            "server.websocket_max_open",
            "greater than zero",
        ),
        ("websocket_max_open = -1\n", "", "websocket_max_open", ""),
        (
            "websocket_max_open_per_user = 0\n",
            "",
            "server.websocket_max_open_per_user",
            "greater than zero",
        ),
    ] {
        let error = ProxyConfig::parse(&text(server, upstream), &path)
            .expect_err(upstream)
            .to_string();
        assert!(error.contains("proxy.toml"), "{server}{upstream}: {error}");
        assert!(error.contains(key), "{server}{upstream}: {error}");
        assert!(error.contains(problem), "{server}{upstream}: {error}");
    }
}

/// The binary (`countersign run --workers 2`: two event loops, each with WebSockets of its
/// own): SIGTERM sends every open WebSocket, whichever loop runs it, 1001 `shutting_down`
/// both ways, and the process exits within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_closes_the_websockets_of_every_event_loop_on_sigterm() {
    use support_run::*;
    const OPEN: usize = 8;
    let upstream = start_ws_upstream_with(
        both_keys_keyring(),
        Arc::new(countersign::clock::SystemClock),
    )
    .await;
    let dir = temp_dir("ws-close-run");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, _) = start_on_free_ports(|listen, admin| {
        let file = dir.join("proxy.toml");
        let text = config_text(
            &listen.to_string(),
            Some(&admin.to_string()),
            &format!("http://{}", upstream.addr),
        ) + "websocket = true\n";
        write(&file, &text);
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    let login = login_alice_at(addr).await;
    let mut sockets = Vec::new();
    for _ in 0..OPEN {
        let (stream, status, body) = handshake(addr, "/api/tung", &login).await;
        assert_eq!(status, 101, "{body}\n{}", proxy.log());
        let mut ws = tung_browser(stream).await;
        assert_eq!(
            within(ws.next()).await.unwrap().unwrap(),
            Message::text("hello")
        );
        sockets.push(ws);
    }
    proxy.signal("TERM");
    for ws in &mut sockets {
        assert_eq!(
            next_close(ws, Duration::from_secs(5)).await,
            (1001, "shutting_down".to_owned()),
            "{}",
            proxy.log()
        );
        ends(ws).await;
    }
    for _ in 0..100 {
        let closes = upstream
            .log
            .lock()
            .iter()
            .filter(|e| *e == "close 1001 shutting_down")
            .count();
        if closes == OPEN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = upstream.log.lock().clone();
    assert_eq!(
        log.iter()
            .filter(|e| *e == "close 1001 shutting_down")
            .count(),
        OPEN,
        "{log:?}"
    );
    let exited = tokio::task::spawn_blocking(move || {
        let exited = proxy.wait_exit(Duration::from_secs(8));
        (exited, proxy.log())
    })
    .await
    .unwrap();
    assert!(exited.0.is_some(), "SIGTERM stops the proxy: {}", exited.1);
}

/// The binary (`--workers 2`) with one WebSocket route, `/api/` (`websocket = true` and
/// `route_extra`), and `server_extra` in `[server]`; [`WsBinary::reload`] rewrites the file
/// and sends SIGHUP.
struct WsBinary {
    proxy: support_run::RunningProxy,
    addr: SocketAddr,
    file: std::path::PathBuf,
    listen: String,
    admin: String,
    /// `[session]`'s store lines (the memory store when empty).
    store: String,
    upstream: WsUpstream,
    _dir: TestDir,
}

fn ws_binary_config(
    (listen, admin): (&str, &str),
    upstream: SocketAddr,
    store: &str,
    server_extra: &str,
    route_extra: &str,
) -> String {
    let mut text = support_run::config_text(listen, Some(admin), &format!("http://{upstream}"))
        .replace(
            "shutdown_grace = \"2s\"\n",
            &format!("shutdown_grace = \"2s\"\n{server_extra}"),
        );
    if !store.is_empty() {
        text = text.replace("store = \"memory\"\n", store);
    }
    text + route_extra
}

impl WsBinary {
    async fn start(tag: &str, server_extra: &str, route_extra: &str) -> WsBinary {
        WsBinary::start_with_store(tag, "", server_extra, route_extra).await
    }

    /// [`WsBinary::start`] with `store` as `[session]`'s store lines.
    async fn start_with_store(
        tag: &str,
        store: &str,
        server_extra: &str,
        route_extra: &str,
    ) -> WsBinary {
        use support_run::*;
        let upstream = start_ws_upstream_with(
            both_keys_keyring(),
            Arc::new(countersign::clock::SystemClock),
        )
        .await;
        let dir = temp_dir(tag);
        write(&dir.join("keys.toml"), &keyring_file_text("k1"));
        write(&dir.join("users.toml"), &users_file_text());
        let file = dir.join("proxy.toml");
        let (mut proxy, addr, admin) = start_on_free_ports(|listen, admin| {
            let text = ws_binary_config(
                (&listen.to_string(), &admin.to_string()),
                upstream.addr,
                store,
                server_extra,
                route_extra,
            );
            write(&file, &text);
            RunningProxy::spawn(&file, &["--workers", "2"])
        });
        proxy.wait_listening(addr);
        WsBinary {
            proxy,
            addr,
            file,
            listen: addr.to_string(),
            admin: admin.to_string(),
            store: store.to_owned(),
            upstream,
            _dir: dir,
        }
    }

    /// Rewrites `proxy.toml` (a new file renamed over it), sends SIGHUP and waits for the
    /// `count`th info line applying `applied`.
    fn reload(&self, server_extra: &str, route_extra: &str, applied: &str, count: usize) {
        self.rewrite_and_signal(server_extra, route_extra);
        self.proxy
            .wait_json_messages("INFO", &["SIGHUP:", applied], count);
    }

    /// Rewrites `proxy.toml` (a new file renamed over it) and sends SIGHUP.
    fn rewrite_and_signal(&self, server_extra: &str, route_extra: &str) {
        let staged = self.file.with_extension("new");
        let text = ws_binary_config(
            (&self.listen, &self.admin),
            self.upstream.addr,
            &self.store,
            server_extra,
            route_extra,
        );
        write(&staged, &text);
        std::fs::rename(&staged, &self.file).unwrap();
        self.proxy.signal("HUP");
    }

    /// A WebSocket on `/api/tung` with `login`'s session, past the upstream's greeting.
    async fn open(&self, login: &Login) -> WebSocketStream<TcpStream> {
        let (stream, status, body) = handshake(self.addr, "/api/tung", login).await;
        assert_eq!(status, 101, "{body}\n{}", self.proxy.log());
        let mut ws = tung_browser(stream).await;
        assert_eq!(
            within(ws.next()).await.unwrap().unwrap(),
            Message::text("hello")
        );
        ws
    }

    /// A handshake refused: its status and error code.
    async fn refused(&self, login: &Login) -> (u16, String) {
        let (_, status, body) = handshake(self.addr, "/api/tung", login).await;
        let code = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        (status, code)
    }
}

/// Text sent on `ws` comes back from the upstream's echo: the WebSocket is open and relayed.
async fn echoes<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text(text)
    );
}

/// `upstream[].websocket_max_open` and `server.websocket_max_open` lowered and raised by
/// SIGHUP: handshakes after the reload count against the new limits (the WebSockets already
/// open count, and stay open). On the code before these keys were live, the warning named
/// them as waiting for a restart and the second handshake passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_limits_follow_a_reload_for_new_handshakes() {
    let run = WsBinary::start("ws-reload-max-open", "", "websocket = true\n").await;
    let login = login_alice_at(run.addr).await;
    let mut first = run.open(&login).await;

    run.reload(
        "",
        "websocket = true\nwebsocket_max_open = 1\n",
        "applied 1 key: upstream[0].websocket_max_open",
        1,
    );
    for _ in 0..4 {
        assert_eq!(
            run.refused(&login).await,
            (503, "websocket_limit".to_owned()),
            "{}",
            run.proxy.log()
        );
    }
    echoes(&mut first, "still open").await;

    // The route allows 3 again; the proxy-wide limit now 2.
    run.reload(
        "websocket_max_open = 2\n",
        "websocket = true\nwebsocket_max_open = 3\n",
        "applied 2 keys: server.websocket_max_open, upstream[0].websocket_max_open",
        1,
    );
    let mut second = run.open(&login).await;
    assert_eq!(
        run.refused(&login).await,
        (503, "websocket_limit".to_owned()),
        "the proxy-wide limit: {}",
        run.proxy.log()
    );
    echoes(&mut first, "first").await;
    echoes(&mut second, "second").await;

    // alice's own limit lowered to the two she has open (the proxy-wide one raised).
    run.reload(
        "websocket_max_open = 10\nwebsocket_max_open_per_user = 2\n",
        "websocket = true\nwebsocket_max_open = 3\n",
        "applied 2 keys: server.websocket_max_open, server.websocket_max_open_per_user",
        1,
    );
    assert_eq!(
        run.refused(&login).await,
        (429, "websocket_user_limit".to_owned()),
        "the per-user limit: {}",
        run.proxy.log()
    );
    echoes(&mut first, "first again").await;
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
}

/// `websocket_idle_timeout` lowered by SIGHUP: the WebSockets opened after the reload (on
/// either event loop) are closed 1001 `idle_timeout` after the new time, and so is one opened
/// before (it follows the reload too: tests/proxy_websocket_reload.rs). On the code before
/// these keys were live, the new ones stayed open; before open WebSockets followed a reload,
/// the old one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_websocket_idle_timeout_closes_the_websockets_open_and_opened_after_it() {
    let run = WsBinary::start("ws-reload-idle", "", "websocket = true\n").await;
    let login = login_alice_at(run.addr).await;
    let mut before = run.open(&login).await;

    run.reload(
        "",
        "websocket = true\nwebsocket_idle_timeout = \"700ms\"\n",
        "applied 1 key: upstream[0].websocket_idle_timeout",
        1,
    );
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(run.open(&login).await);
    }
    let quiet = Instant::now();
    for ws in &mut after {
        assert_eq!(
            next_close(ws, Duration::from_secs(5)).await,
            (1001, "idle_timeout".to_owned()),
            "{}",
            run.proxy.log()
        );
    }
    assert!(
        quiet.elapsed() >= Duration::from_millis(500),
        "{:?}",
        quiet.elapsed()
    );
    // Opened with the default 300 s, idle since: closed by the new 700 ms as well.
    assert_eq!(
        next_close(&mut before, Duration::from_secs(5)).await,
        (1001, "idle_timeout".to_owned()),
        "{}",
        run.proxy.log()
    );
}

/// The WebSocket limits of an upstream that turns `websocket` on wait for the restart with
/// it: the handshake is still refused, and the warning names both keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_limits_wait_while_websocket_is_turned_on() {
    let run = WsBinary::start("ws-reload-turned-on", "", "").await;
    let login = login_alice_at(run.addr).await;
    run.rewrite_and_signal("", "websocket = true\nwebsocket_max_open = 5\n");
    let waiting = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml changed"], 1);
    assert!(
        waiting[0].contains("2 keys: upstream[0].websocket, upstream[0].websocket_max_open"),
        "{waiting:?}"
    );
    assert!(run.proxy.json_messages("INFO", &["applied"]).is_empty());
    assert_eq!(run.refused(&login).await.0, 501, "{}", run.proxy.log());
}

/// With Redis sessions, a session check that hangs (redis-server stopped with SIGSTOP) does
/// not hold the relay back: messages keep going both ways while the lookup waits out
/// `redis_timeout`; then the WebSocket is closed 1011 `session_unverifiable`. On the code
/// before, the relay paused for each lookup, so no echo came back during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_session_check_does_not_hold_the_messages_back() {
    let redis = support_redis::RedisServer::start();
    let store = format!(
        "store = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"8s\"\n",
        redis.url()
    );
    let run = WsBinary::start_with_store(
        "ws-check-beside-relay",
        &store,
        "",
        "websocket = true\nwebsocket_session_check = \"300ms\"\n",
    )
    .await;
    let login = login_alice_at(run.addr).await;
    let mut ws = run.open(&login).await;
    redis.pause();
    // The first check after the pause starts within 300 ms and hangs for 8 s: every echo
    // during that time comes back at once. (8 s and 2 s per echo leave room for a busy
    // machine; on the old code the echoes sent from 500 ms on waited for the lookup's end,
    // some 8 s after the pause, and the first of them was missing after 2 s.)
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let text = format!("during the lookup {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
        assert!(
            matches!(&echo, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text),
            "message {i}: {echo:?}"
        );
    }
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(15)).await,
        (1011, "session_unverifiable".to_owned()),
        "{}",
        run.proxy.log()
    );
    redis.resume();
}

/// A WebSocket upstream on a bare socket (so that the test can reset it): answers any
/// handshake with 101 and hands the TCP connection to the test.
async fn start_bare_ws_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let Ok(byte) = stream.read_u8().await else {
                    break;
                };
                head.push(byte);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let key = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| derive_accept_key(value.trim().as_bytes()))
                })
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {key}\r\n\r\n"
            );
            if stream.write_all(answer.as_bytes()).await.is_ok() {
                let _ = tx.send(stream);
            }
        }
    });
    (addr, rx)
}

/// Resets a connection (RST, not FIN): what a crashed peer or a dropped network path does.
fn reset(stream: TcpStream) {
    // Deprecated for lingering that blocks the dropping thread; a zero linger never blocks:
    // the close sends RST at once.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
}

/// The API's connection reset, or closed without its Close (as a crashed process's is),
/// while relaying: the browser gets the message relayed before it, then 1011
/// `upstream_failed` (a code the page reconnects on), not a dropped connection (1006). On
/// the code before, the browser's connection was dropped without a Close.
#[tokio::test]
async fn an_upstream_reset_closes_the_browser_side_with_1011_upstream_failed() {
    let (upstream, mut apis) = start_bare_ws_upstream().await;
    let mut bare = route("bare", "/bare/", &format!("http://{upstream}"));
    bare.websocket = Some(WebSocketRoute::new(
        Duration::from_secs(30),
        Duration::from_secs(30),
        100,
    ));
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![bare],
        ..Default::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    for with_reset in [true, false] {
        let (stream, status, body) = handshake(h.addr, "/bare/feed", &login).await;
        assert_eq!(status, 101, "{body}");
        let mut ws = tung_browser(stream).await;
        let mut api = within(apis.recv()).await.unwrap();
        api.write_all(&frame(0x81, None, b"before")).await.unwrap();
        assert_eq!(
            within(ws.next()).await.unwrap().unwrap(),
            Message::text("before")
        );
        if with_reset {
            reset(api);
        } else {
            drop(api);
        }
        assert_eq!(
            next_close(&mut ws, Duration::from_secs(5)).await,
            (1011, "upstream_failed".to_owned()),
            "reset: {with_reset}"
        );
        ends(&mut ws).await;
    }
    assert_eq!(
        open_count_falls_to(&h, "bare", 0, Duration::from_secs(10)).await,
        0
    );
}

/// The browser's connection reset while relaying: the API gets 1001 `client_gone`, as from
/// a browser that went away, and its Close reply ends the WebSocket. On the code before,
/// the API's connection was dropped without a Close.
#[tokio::test]
async fn a_browser_reset_closes_the_upstream_side_with_1001_client_gone() {
    let settings = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    let (h, upstream) = start(settings, no_tweak()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, status, _) = handshake(h.addr, "/ws/tung", &login).await;
    assert_eq!(status, 101);
    let hello = read_frame(&mut browser).await;
    assert_eq!(
        (hello.first, hello.payload.as_slice()),
        (0x81, &b"hello"[..])
    );
    reset(browser);
    upstream_logged(&upstream.log, "close 1001 client_gone").await;
    assert_eq!(
        open_count_falls_to(&h, "ws", 0, Duration::from_secs(10)).await,
        0
    );
}

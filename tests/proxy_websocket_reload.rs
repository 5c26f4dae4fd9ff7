//! A reload's WebSocket timeouts reach the WebSockets already open (src/proxy/websocket.rs,
//! `WebSocketRoute::set_limits` in src/proxy/forward.rs): `websocket_idle_timeout` (the idle
//! deadline becomes the last byte + the new value), `websocket_session_check` (the next check
//! the last one + the new interval) and `websocket_close_timeout` (for the closes that start
//! after the reload, and for a close in progress: its start + the new value). On the code
//! before, an open WebSocket kept the three it started with.
//!
//! Against real servers on loopback: the proxy (the test harness, its route's limits changed
//! through the route it shares, as a reload does; and the real binary reloaded by SIGHUP), an
//! upstream behind the real `VerifyLayer` that speaks WebSocket with tokio-tungstenite or
//! hands the raw connection to the test, and a tokio-tungstenite browser.
//!
//! Run: `cargo test --all-features --test proxy_websocket_reload`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::core::{KeyringHandle, Policy, Verifier};
use countersign::layer::VerifyLayer;
use countersign::proxy::forward::{WebSocketLimits, WebSocketRoute};
use countersign::replay::MemoryReplayCache;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
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

/// The WebSocket upstream: `…/tung` greets with the text `hello` and echoes text; `…/raw`
/// hands the upgraded connection to the test (and never answers a Close by itself);
/// `…/refuse` refuses the handshake with 403 and a body of 2 KiB.
struct WsUpstream {
    addr: SocketAddr,
    raw: mpsc::UnboundedReceiver<RawUpstream>,
}

async fn start_ws_upstream(keyring: KeyringHandle, clock: SharedClock) -> WsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (raw_tx, raw) = mpsc::unbounded_channel();
    let layer = VerifyLayer::new(
        Verifier::new(keyring, Policy::default()),
        Arc::new(MemoryReplayCache::new(10_000)),
    )
    .clock(clock);
    let app = tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let raw_tx = raw_tx.clone();
        async move {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .map(|k| derive_accept_key(k.as_bytes()))
                .unwrap_or_default();
            if req.uri().path().ends_with("/refuse") {
                let mut refused = http::Response::new(Full::new(Bytes::from(vec![b'r'; 2048])));
                *refused.status_mut() = StatusCode::FORBIDDEN;
                return Ok::<_, Infallible>(refused);
            }
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
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = message {
                        if ws.send(Message::Text(text)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            let switching = switching_protocols(&key);
            Ok::<_, Infallible>(switching)
        }
    });
    serve_with_upgrades(listener, layer.layer(app));
    WsUpstream { addr, raw }
}

/// The harness with `/ws/` routed to the WebSocket upstream with `settings` (a clone: the
/// test changes the limits through `settings`, as a reload does).
async fn start(settings: &WebSocketRoute) -> (Harness, WsUpstream) {
    let upstream = start_ws_upstream(test_keyring(), Arc::new(ManualClock::new(T0))).await;
    (
        harness_with_ws_route(upstream.addr, settings.clone()).await,
        upstream,
    )
}

/// A browser's handshake on `path` with `login`'s session: the connection and the answer's
/// head (nothing after it read).
async fn handshake(addr: SocketAddr, path: &str, login: &Login) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Cookie: {}\r\nOrigin: {ORIGIN}\r\n\r\n",
        login.cookie
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte, so that nothing after the head is consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within(stream.read_u8()).await.expect("answer head"));
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// A browser's handshake on `path` with `login`'s session, switched to WebSocket.
async fn open(addr: SocketAddr, path: &str, login: &Login) -> WebSocketStream<TcpStream> {
    let (stream, head) = handshake(addr, path, login).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    WebSocketStream::from_raw_socket(stream, Role::Client, None).await
}

/// [`open`] on an upstream path that greets: past the greeting.
async fn open_greeted(addr: SocketAddr, path: &str, login: &Login) -> WebSocketStream<TcpStream> {
    let mut ws = open(addr, path, login).await;
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("hello")
    );
    ws
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

/// The route's limits with `change` applied, set as a reload sets them.
fn reload(route: &WebSocketRoute, change: impl FnOnce(&mut WebSocketLimits)) {
    let mut limits = route.limits();
    change(&mut limits);
    route.set_limits(limits);
}

/// `countersign run --workers 2` with `/api/` routed to a WebSocket upstream of its own
/// (`websocket = true` and one limit line), for the SIGHUP tests.
struct WsRun {
    proxy: support_run::RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    file: std::path::PathBuf,
    _dir: TestDir,
}

impl WsRun {
    async fn start(tag: &str, limit_line: &str) -> WsRun {
        let upstream = start_ws_upstream(
            both_keys_keyring(),
            Arc::new(countersign::clock::SystemClock),
        )
        .await;
        let dir = temp_dir(tag);
        write(&dir.join("keys.toml"), &keyring_file_text("k1"));
        write(&dir.join("users.toml"), &users_file_text());
        let file = dir.join("proxy.toml");
        let (mut proxy, addr, admin) = support_run::start_on_free_ports(|listen, admin| {
            write(&file, &Self::text(upstream.addr, listen, admin, limit_line));
            support_run::RunningProxy::spawn(&file, &["--workers", "2"])
        });
        proxy.wait_listening(addr);
        WsRun {
            proxy,
            addr,
            admin,
            upstream: upstream.addr,
            file,
            _dir: dir,
        }
    }

    fn text(
        upstream: SocketAddr,
        listen: SocketAddr,
        admin: SocketAddr,
        limit_line: &str,
    ) -> String {
        support_run::config_text(
            &listen.to_string(),
            Some(&admin.to_string()),
            &format!("http://{upstream}"),
        ) + &format!("websocket = true\n{limit_line}\n")
    }

    /// Replaces `proxy.toml` (atomically) with the same file and `limit_line`.
    fn rewrite(&self, limit_line: &str) {
        let staged = self.file.with_extension("new");
        write(
            &staged,
            &Self::text(self.upstream, self.addr, self.admin, limit_line),
        );
        std::fs::rename(&staged, &self.file).unwrap();
    }
}

/// Two WebSockets open with a 3 s idle timeout, raised to 30 s while they are idle: still
/// open (and relaying) well past their old deadline. On the code before, they were closed
/// 1001 `idle_timeout` at 3 s. Lowered again (to 4 s) below the time the other one has been
/// idle (4.5 s and more): that one is closed at once, its deadline being its last byte + the
/// new value, not the reload + the new value (4 s after the reload).
#[tokio::test]
async fn a_raised_idle_timeout_keeps_an_open_websocket_past_its_old_deadline() {
    let settings = WebSocketRoute::new(Duration::from_secs(3), Duration::from_secs(30), 100);
    let (h, _upstream) = start(&settings).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut ws = open_greeted(h.addr, "/ws/tung", &login).await;
    // Idle from its greeting on (before `opened`).
    let mut idle = open_greeted(h.addr, "/ws/tung", &login).await;
    let opened = Instant::now();
    reload(&settings, |l| l.idle_timeout = Duration::from_secs(30));
    // Idle past the old deadline (3 s after the greeting) by a margin.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert!(opened.elapsed() > Duration::from_secs(4));
    echoes(&mut ws, "still open").await;
    // Lowered below the time `idle` has now been idle (4.5 s or more, however late this
    // runs): closed at once. Were the deadline counted from the reload, it would come 4 s
    // after it, past the bound (a margin of 3 s for a stalled machine).
    reload(&settings, |l| l.idle_timeout = Duration::from_secs(4));
    let reloaded = Instant::now();
    assert_eq!(
        next_close(&mut idle, Duration::from_secs(10)).await,
        (1001, "idle_timeout".to_owned())
    );
    assert!(
        reloaded.elapsed() < Duration::from_secs(3),
        "{:?}",
        reloaded.elapsed()
    );
}

/// A WebSocket opened with a 60 s session check, shortened to 300 ms: a logout then closes
/// it 1008 `session_ended` within the new interval. On the code before, the next check was
/// 60 s away.
#[tokio::test]
async fn a_shortened_session_check_closes_an_open_websocket_on_logout() {
    let settings = WebSocketRoute::new(Duration::from_secs(120), Duration::from_secs(60), 100);
    let (h, _upstream) = start(&settings).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut ws = open_greeted(h.addr, "/ws/tung", &login).await;
    echoes(&mut ws, "open").await;
    reload(&settings, |l| l.session_check = Duration::from_millis(300));
    // The session is still there: the checks the reload brought forward keep it open.
    tokio::time::sleep(Duration::from_millis(800)).await;
    echoes(&mut ws, "checked and open").await;
    assert_eq!(logout(h.addr, &login).await.status, StatusCode::NO_CONTENT);
    let logged_out = Instant::now();
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(15)).await,
        (1008, "session_ended".to_owned())
    );
    // Within a few of the new 300 ms checks (a margin for a stalled machine); the old
    // interval would take up to 60 s.
    assert!(
        logged_out.elapsed() < Duration::from_secs(10),
        "{:?}",
        logged_out.elapsed()
    );
}

/// `websocket_close_timeout` lowered from 5 s to 400 ms while a WebSocket is open: the close
/// that starts after it (a malformed frame header from the upstream, 1002) drops an upstream
/// that never answers its Close after 400 ms, not 5 s. On the code before, the open
/// WebSocket kept its 5 s.
#[tokio::test]
async fn a_reloaded_close_timeout_applies_to_the_closes_that_start_after_it() {
    let settings = WebSocketRoute::new(Duration::from_secs(120), Duration::from_secs(30), 100);
    assert_eq!(settings.limits().close_timeout, Duration::from_secs(5));
    let (h, mut upstream) = start(&settings).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut ws = open(h.addr, "/ws/raw", &login).await;
    let mut raw = within(upstream.raw.recv()).await.expect("the raw upstream");
    reload(&settings, |l| l.close_timeout = Duration::from_millis(400));
    // Let the WebSocket take the reload in before its close starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Before the close starts (the proxy starts it on reading the frame below): the old 5 s
    // would drop the upstream 5 s or more after this, however late the test runs.
    let closing = Instant::now();
    // A reserved opcode (3): the proxy closes both sides; the browser (tungstenite) answers,
    // the upstream never does, so the close ends when its timeout does.
    raw.write_all(&frame(0x83, None, b"")).await.unwrap();
    assert_eq!(
        next_close(&mut ws, Duration::from_secs(5)).await,
        (1002, "protocol_error".to_owned())
    );
    let mut buf = [0u8; 1024];
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "the upstream connection was never dropped");
    assert!(
        closing.elapsed() < Duration::from_secs(4),
        "dropped after {:?}: the close kept the old 5 s",
        closing.elapsed()
    );
}

/// `websocket_close_timeout` lowered from 5 s to 400 ms while a close is in progress (a
/// malformed frame header from the upstream, 1002; the upstream never answers its Close):
/// the close follows the new value, counted from its start, and drops the upstream about
/// 400 ms after it began, not 5 s. Lowered to less than the close has taken already, it ends
/// at once. On the code before, a close in progress kept its 5 s.
#[tokio::test]
async fn a_lowered_close_timeout_reaches_a_close_in_progress() {
    for (wait_before, lowered) in [(100, 400), (700, 300)] {
        let settings = WebSocketRoute::new(Duration::from_secs(120), Duration::from_secs(30), 100);
        let (h, mut upstream) = start(&settings).await;
        let login = h.login("alice", ALICE_PASSWORD).await;
        let mut ws = open(h.addr, "/ws/raw", &login).await;
        let mut raw = within(upstream.raw.recv()).await.expect("the raw upstream");
        // Before the close starts (the proxy starts it on reading the frame below): the drop
        // comes at least the new deadline after this, and the old 5 s at least 5 s after it.
        let closing = Instant::now();
        // A reserved opcode (3): the proxy closes both sides with the 5 s it has now.
        raw.write_all(&frame(0x83, None, b"")).await.unwrap();
        assert_eq!(
            next_close(&mut ws, Duration::from_secs(5)).await,
            (1002, "protocol_error".to_owned())
        );
        // The Close to the upstream: the close is in progress, awaiting the upstream's.
        let to_upstream = read_frame(&mut raw).await;
        assert_eq!(to_upstream.close(), (1002, "protocol_error".into()));
        tokio::time::sleep(Duration::from_millis(wait_before)).await;
        reload(&settings, |l| {
            l.close_timeout = Duration::from_millis(lowered)
        });
        let reloaded = Instant::now();
        let mut buf = [0u8; 1024];
        let dropped = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(dropped.is_ok(), "the upstream connection was never dropped");
        let (took, after_reload) = (closing.elapsed(), reloaded.elapsed());
        assert!(
            took < Duration::from_secs(4),
            "dropped {took:?} after the close began: it kept the old 5 s"
        );
        // Not before the new deadline (the close began after `closing`; the reload came
        // `wait_before` after the Close reached the upstream).
        assert!(
            took >= Duration::from_millis(lowered.max(wait_before)),
            "dropped too early: {took:?}"
        );
        // Lowered below what the close had taken already: at once (the old 5 s would come
        // more than 4 s after the reload).
        if wait_before > lowered {
            assert!(after_reload < Duration::from_secs(3), "{after_reload:?}");
        }
    }
}

/// The binary (`--workers 2`) with `websocket_idle_timeout = "60s"`: four WebSockets open
/// (on either event loop) and idle for 1.5 s, then SIGHUP lowers it to 1 s: each gets 1001
/// `idle_timeout` within moments of the reload. On the code before, they stayed open (the
/// 60 s they started with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_idle_timeout_closes_the_open_idle_websockets_on_sighup() {
    let run = WsRun::start("ws-live-reload-idle", "websocket_idle_timeout = \"60s\"").await;
    let (proxy, addr) = (&run.proxy, run.addr);
    let login = login_alice_at(addr).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(open_greeted(addr, "/api/tung", &login).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    run.rewrite("websocket_idle_timeout = \"1s\"");
    let signalled = Instant::now();
    proxy.signal("HUP");
    proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 1 key: upstream[0].websocket_idle_timeout",
        ],
        1,
    );
    // Each within moments; the bound below leaves a margin for a stalled machine, the old
    // 60 s would be far past it.
    for ws in &mut open {
        assert_eq!(
            next_close(ws, Duration::from_secs(15)).await,
            (1001, "idle_timeout".to_owned()),
            "{}",
            proxy.log()
        );
    }
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "closed {:?} after the SIGHUP",
        signalled.elapsed()
    );
}

/// The status of a browser's handshake on `path` (the upstream's answer, or the proxy's).
async fn handshake_status(addr: SocketAddr, path: &str, login: &Login) -> String {
    let (_, head) = handshake(addr, path, login).await;
    head.split(' ').nth(1).unwrap_or_default().to_owned()
}

/// `websocket_max_refusal_body` is live: at 1 KiB the upstream's 2 KiB refusal answers 502;
/// SIGHUP raises it to 4 KiB and the next handshake gets the refusal itself (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_refusal_body_limit_applies_to_the_next_handshake_on_sighup() {
    let run = WsRun::start(
        "ws-live-reload-refusal",
        "websocket_max_refusal_body = \"1KiB\"",
    )
    .await;
    let addr = run.addr;
    let login = login_alice_at(addr).await;
    assert_eq!(handshake_status(addr, "/api/refuse", &login).await, "502");

    run.rewrite("websocket_max_refusal_body = \"4KiB\"");
    run.proxy.signal("HUP");
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 1 key: upstream[0].websocket_max_refusal_body",
        ],
        1,
    );
    // Every event loop: more handshakes than loops.
    for _ in 0..4 {
        assert_eq!(handshake_status(addr, "/api/refuse", &login).await, "403");
    }
}

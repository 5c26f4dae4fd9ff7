//! WebSockets through the proxy (`[[upstream]] websocket = true`): the handshake is checked
//! (session, `Origin`, the route's limit) and signed like any request, and verified by a real
//! `VerifyLayer` in front of a hyper server that takes the upgrade; then bytes flow both ways.
//! A logout, an idle WebSocket and a full route close or refuse it; a route without the
//! setting still answers 501.
//!
//! Run: `cargo test --all-features --test proxy_websocket`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::core::{Policy, Verifier};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::proxy::forward::WebSocketRoute;
use countersign::replay::MemoryReplayCache;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use support::*;
use support_ws::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tower::Layer as _;

/// What the WebSocket upstream saw of each handshake that reached its handler (verified).
#[derive(Debug, Clone)]
struct Seen {
    user: Option<String>,
    path: String,
    spoofed: Option<String>,
}

/// A hyper server behind the real `VerifyLayer`: `/ws/echo` takes the upgrade, sends the
/// text frame `hello <user>\n`, then echoes every frame (unmasked, as a server's are: the
/// proxy checks the frame headers); `/ws/refuse` answers 403 with a body and its own
/// `X-Frame-Options: SAMEORIGIN`; `/ws/refuse-big?n=N` answers 403 with N bytes of body.
async fn start_ws_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    start_ws_upstream_with(test_keyring(), Arc::new(ManualClock::new(T0))).await
}

/// [`start_ws_upstream`] verifying with `keyring` on `clock`.
async fn start_ws_upstream_with(
    keyring: countersign::core::KeyringHandle,
    clock: SharedClock,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = VerifyLayer::new(
        Verifier::new(keyring, Policy::default()),
        Arc::new(MemoryReplayCache::new(10_000)),
    )
    .clock(clock);
    let log = seen.clone();
    let app = tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let log = log.clone();
        async move {
            let identity = req.extensions().get::<VerifiedIdentity>().cloned();
            let user = identity.and_then(|id| id.user.map(|u| u.to_string()));
            log.lock().push(Seen {
                user: user.clone(),
                path: req.uri().path().to_owned(),
                spoofed: req
                    .headers()
                    .get("x-spoofed")
                    .map(|v| v.to_str().unwrap().to_owned()),
            });
            if req.uri().path() == "/ws/refuse-big" {
                let n: usize = (req.uri().query().and_then(|q| q.strip_prefix("n=")))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut refused = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
                *refused.status_mut() = StatusCode::FORBIDDEN;
                return Ok::<_, Infallible>(refused);
            }
            if req.uri().path() == "/ws/refuse" {
                let mut refused = Response::new(Full::new(Bytes::from_static(b"{\"no\":1}")));
                *refused.status_mut() = StatusCode::FORBIDDEN;
                // Its own framing policy, which the proxy's default must not overwrite.
                refused.headers_mut().insert(
                    "x-frame-options",
                    http::HeaderValue::from_static("SAMEORIGIN"),
                );
                return Ok::<_, Infallible>(refused);
            }
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                if io
                    .write_all(&greeting(user.as_deref().unwrap_or("-")))
                    .await
                    .is_err()
                {
                    return;
                }
                // Each frame read (masked, a browser's) goes back unmasked.
                loop {
                    let mut head = [0u8; 2];
                    if io.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = match head[1] & 0x7f {
                        126 => io.read_u16().await.map(usize::from),
                        127 => io.read_u64().await.map(|n| n as usize),
                        n => Ok(usize::from(n)),
                    };
                    let (Ok(len), mut key) = (len, [0u8; 4]) else {
                        return;
                    };
                    if head[1] & 0x80 != 0 && io.read_exact(&mut key).await.is_err() {
                        return;
                    }
                    let mut payload = vec![0u8; len];
                    if io.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    payload
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b ^= key[i % 4]);
                    if io.write_all(&frame(head[0], None, &payload)).await.is_err() {
                        return;
                    }
                }
            });
            let switching = switching_protocols("from-upstream");
            Ok(switching)
        }
    });
    serve_with_upgrades(listener, layer.layer(app));
    (addr, seen)
}

/// The proxy with a `/ws/` route to the WebSocket upstream (`settings`), beside the default
/// `/api/` route (no WebSockets).
async fn start(settings: WebSocketRoute) -> (Harness, Arc<Mutex<Vec<Seen>>>) {
    let (ws, seen) = start_ws_upstream().await;
    let mut ws_route = route("ws", "/ws/", &format!("http://{ws}"));
    ws_route.websocket = Some(settings);
    let harness = Harness::start_with(HarnessOptions {
        extra_routes: vec![ws_route],
        ..Default::default()
    })
    .await;
    (harness, seen)
}

/// The raw browsers here do not answer the proxy's Close, so a close by the proxy waits out
/// `websocket_close_timeout` (kept short) and drops both sides
/// (tests/proxy_websocket_close.rs has the close handshake).
fn settings() -> WebSocketRoute {
    WebSocketRoute::new(Duration::from_secs(30), Duration::from_millis(200), 100)
        .with_close_timeout(Duration::from_millis(500))
}

/// A browser's handshake with `extra` header lines (each ending in `\r\n`).
fn handshake(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn browser_lines(login: &Login) -> String {
    format!("Cookie: {}\r\nOrigin: {ORIGIN}\r\n", login.cookie)
}

/// Sends `request` on a new connection; returns the connection and the answer's head (and any
/// bytes read after it).
async fn open(addr: SocketAddr, request: &str) -> (TcpStream, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answer head within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let mut rest = got[end..].to_vec();
    // An ordinary answer: its whole body (by Content-Length).
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    if let Some(length) = length {
        while rest.len() < length {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("answer body within 10 s")
                .unwrap();
            assert!(n > 0, "closed before the body");
            rest.extend_from_slice(&buf[..n]);
        }
    }
    (stream, head, rest)
}

/// Reads until `want` bytes arrived (after `already`), within 10 s.
async fn read_exact_within(stream: &mut TcpStream, already: Vec<u8>, want: usize) -> Vec<u8> {
    let mut got = already;
    let mut buf = [0u8; 1024];
    while got.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("bytes within 10 s")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Waits for the connection to be closed by the proxy (EOF or reset), failing after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The upstream's greeting frame to `user`.
fn greeting(user: &str) -> Vec<u8> {
    frame(0x81, None, format!("hello {user}\n").as_bytes())
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_websocket_is_signed_verified_and_carries_bytes_both_ways() {
    let (h, seen) = start(settings()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // A spoofed identity field and signature from the browser must not reach the upstream
    // (and would fail its check if they did).
    let extra = format!(
        "{}X-Auth-User: mallory\r\nSignature: x=:AAAA:\r\nX-Spoofed: kept\r\n",
        browser_lines(&login)
    );
    let (mut stream, head, rest) = open(h.addr, &handshake("/ws/echo", &extra)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: from-upstream"),
        "{head}"
    );
    // The `101` is the upstream's answer: the proxy's security headers (on by default for its
    // own answers) are not added to it.
    assert!(!lower.contains("x-content-type-options"), "{head}");
    assert!(!lower.contains("x-frame-options"), "{head}");
    let hello = read_exact_within(&mut stream, rest, greeting("alice").len()).await;
    assert_eq!(hello, greeting("alice"));
    for message in [&b"ping"[..], &[0u8, 255, 10, 13][..], &[7u8; 3000][..]] {
        stream
            .write_all(&frame(0x82, Some(KEY), message))
            .await
            .unwrap();
        let want = frame(0x82, None, message);
        let echoed = read_exact_within(&mut stream, Vec::new(), want.len()).await;
        assert_eq!(echoed, want);
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].user.as_deref(), Some("alice"));
    assert_eq!(seen[0].path, "/ws/echo");
    assert_eq!(seen[0].spoofed.as_deref(), Some("kept"));
}

#[tokio::test]
async fn a_logout_closes_the_websocket() {
    let (h, _) = start(settings()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut stream, head, rest) =
        open(h.addr, &handshake("/ws/echo", &browser_lines(&login))).await;
    assert_eq!(status_of(&head), 101, "{head}");
    read_exact_within(&mut stream, rest, greeting("alice").len()).await;
    // Still open past a few session checks while the session lives.
    assert!(!closed_within(&mut stream, Duration::from_millis(700)).await);
    assert_eq!(logout(h.addr, &login).await.status, StatusCode::NO_CONTENT);
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the WebSocket must close once its session is gone"
    );
}

#[tokio::test]
async fn an_idle_websocket_is_closed() {
    let (h, _) = start(
        WebSocketRoute::new(Duration::from_millis(600), Duration::from_secs(30), 100)
            .with_close_timeout(Duration::from_millis(500)),
    )
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut stream, head, rest) =
        open(h.addr, &handshake("/ws/echo", &browser_lines(&login))).await;
    assert_eq!(status_of(&head), 101, "{head}");
    read_exact_within(&mut stream, rest, greeting("alice").len()).await;
    // Traffic keeps it open past the idle limit...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream
            .write_all(&frame(0x81, Some(KEY), b"x"))
            .await
            .unwrap();
        let want = frame(0x81, None, b"x");
        assert_eq!(
            read_exact_within(&mut stream, Vec::new(), want.len()).await,
            want
        );
    }
    // ...and silence closes it.
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_full_route_refuses_with_503_until_one_closes() {
    let (h, _) = start(WebSocketRoute::new(
        Duration::from_secs(30),
        Duration::from_secs(30),
        1,
    ))
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let request = handshake("/ws/echo", &browser_lines(&login));
    let (first, head, _) = open(h.addr, &request).await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(
        gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await,
        1
    );
    let (_, head, body) = open(h.addr, &request).await;
    assert_eq!(status_of(&head), 503, "{head}");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains("websocket_limit"), "{body}");
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        let (stream, head, _) = open(h.addr, &request).await;
        if status_of(&head) == 101 {
            reopened = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "a closed WebSocket frees its slot");
    assert_eq!(
        gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await,
        1
    );
    drop(reopened);
    let mut open_now = 1;
    for _ in 0..100 {
        open_now = gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await;
        if open_now == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open_now, 0,
        "the gauge falls back to 0 once the browser leaves"
    );
}

#[tokio::test]
async fn handshakes_that_must_not_pass_are_refused_before_the_upstream() {
    let (h, seen) = start(settings()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let cookie = format!("Cookie: {}\r\n", login.cookie);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("no Origin", handshake("/ws/echo", &cookie), 403, "csrf"),
        (
            "another site's Origin",
            handshake("/ws/echo", &format!("{cookie}Origin: http://evil.test\r\n")),
            403,
            "csrf",
        ),
        (
            "no session",
            handshake("/ws/echo", &format!("Origin: {ORIGIN}\r\n")),
            401,
            "unauthenticated",
        ),
        (
            "a route without websocket = true",
            handshake("/api/x", &browser_lines(&login)),
            501,
            "websocket_unsupported",
        ),
        (
            "an upgrade to another protocol",
            handshake("/ws/echo", &browser_lines(&login)).replace("websocket", "irc"),
            501,
            "websocket_unsupported",
        ),
        (
            "a handshake by POST",
            handshake("/ws/echo", &browser_lines(&login)).replacen("GET", "POST", 1),
            501,
            "websocket_unsupported",
        ),
        (
            // Malformed, on a route that does proxy WebSockets: not "no WebSockets here".
            "a handshake with a body",
            handshake(
                "/ws/echo",
                &format!("{}Content-Length: 1\r\n", browser_lines(&login)),
            ) + "x",
            400,
            "bad_request",
        ),
    ];
    for (what, request, status, reason) in cases {
        let (_, head, body) = open(h.addr, &request).await;
        assert_eq!(status_of(&head), status, "{what}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains(reason), "{what}: {body}");
    }
    assert!(seen.lock().is_empty(), "nothing reached the upstream");
}

/// `/auth/` is the proxy's own for upgrades too: with a WebSocket route at `/` (which any path
/// falls under), a handshake to `/auth/session` or `/auth/login` is refused 501 as an upgrade
/// no route proxies, never signed and sent to the upstream (it was, with alice's identity);
/// in another spelling (`/%61uth/…`, `/;/auth/…`) it is 400, handshake or plain GET (both were
/// signed and sent there). Another path under `/` still opens.
#[tokio::test]
async fn a_handshake_under_auth_is_not_sent_to_a_websocket_route_at_the_root() {
    let (ws, seen) = start_ws_upstream().await;
    let mut root = route("root", "/", &format!("http://{ws}"));
    root.websocket = Some(settings());
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![root],
        ..Default::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    for path in ["/auth/session", "/auth/login", "/auth/logout"] {
        let (_, head, body) = open(h.addr, &handshake(path, &browser_lines(&login))).await;
        assert_eq!(status_of(&head), 501, "{path}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains("websocket_unsupported"), "{path}: {body}");
    }
    // In another spelling, which an upstream that decodes escapes or drops `;` parameters
    // serves as `/auth/…`: refused as malformed (400), handshake or plain request.
    for path in [
        "/%61uth/session",
        "/;/auth/login",
        "/auth;x/logout",
        "/AUTH/session",
    ] {
        let (_, head, body) = open(h.addr, &handshake(path, &browser_lines(&login))).await;
        assert_eq!(status_of(&head), 400, "{path}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains("bad_request"), "{path}: {body}");
        let plain = format!(
            "GET {path} HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nConnection: close\r\n\r\n",
            login.cookie
        );
        let (_, head, _) = open(h.addr, &plain).await;
        assert_eq!(status_of(&head), 400, "GET {path}: {head}");
    }
    assert!(seen.lock().is_empty(), "nothing reached the upstream");
    let (_stream, head, _) = open(h.addr, &handshake("/chat", &browser_lines(&login))).await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(seen.lock().len(), 1);
    assert_eq!(seen.lock()[0].path, "/chat");
}

/// RFC 6455 §4.1/§4.2.1/§4.4: a handshake is version 13 (the only framing the proxy follows)
/// with a `Sec-WebSocket-Key` of 16 bytes in base64. Another version (or none) is answered 426
/// naming 13, so a client that speaks several can retry; a handshake the proxy cannot read is
/// 400. Both before it is signed and sent upstream, even to an upstream lax enough to answer
/// 101 to it (as this test's is: it ignores both fields).
#[tokio::test]
async fn handshakes_that_are_not_rfc_6455_version_13_are_refused_before_the_upstream() {
    let (h, seen) = start(settings()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    const VERSION: &str = "Sec-WebSocket-Version: 13\r\n";
    let good = handshake("/ws/echo", &browser_lines(&login));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "no Sec-WebSocket-Version",
            good.replace(VERSION, ""),
            426,
            "websocket_version",
        ),
        (
            "version 8",
            good.replace(VERSION, "Sec-WebSocket-Version: 8\r\n"),
            426,
            "websocket_version",
        ),
        (
            "two versions",
            good.replace(
                VERSION,
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 8\r\n",
            ),
            400,
            "bad_request",
        ),
        (
            "no Sec-WebSocket-Key",
            good.replace(KEY, ""),
            400,
            "bad_request",
        ),
        (
            "a key of 15 bytes",
            good.replace(KEY, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n"),
            400,
            "bad_request",
        ),
        (
            "a key of 17 bytes",
            good.replace(KEY, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSE=\r\n"),
            400,
            "bad_request",
        ),
        (
            "a key that is not base64",
            good.replace(KEY, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==\r\n"),
            400,
            "bad_request",
        ),
        (
            "two keys",
            good.replace(KEY, &format!("{KEY}{KEY}")),
            400,
            "bad_request",
        ),
    ];
    for (what, request, status, reason) in cases {
        assert_ne!(request, good, "{what}: the case changes the handshake");
        let (_, head, body) = open(h.addr, &request).await;
        assert_eq!(status_of(&head), status, "{what}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains(reason), "{what}: {body}");
        let lower = head.to_ascii_lowercase();
        if status == 426 {
            assert!(
                lower.contains("\r\nsec-websocket-version: 13\r\n"),
                "{what}: {head}"
            );
            assert!(
                lower.contains("\r\nupgrade: websocket\r\n"),
                "{what}: {head}"
            );
        } else {
            assert!(!lower.contains("sec-websocket-version"), "{what}: {head}");
        }
    }
    assert!(seen.lock().is_empty(), "nothing reached the upstream");
    // A version mismatch on a route without `websocket = true` is that route's 501.
    let elsewhere = handshake("/api/x", &browser_lines(&login))
        .replace(VERSION, "Sec-WebSocket-Version: 8\r\n");
    let (_, head, _) = open(h.addr, &elsewhere).await;
    assert_eq!(status_of(&head), 501, "{head}");
    // The same handshake with both fields right is proxied.
    let (_, head, _) = open(h.addr, &good).await;
    assert_eq!(status_of(&head), 101, "{head}");
}

#[tokio::test]
async fn an_upstream_refusal_is_passed_on_and_nothing_is_spliced() {
    let (h, seen) = start(settings()).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (_, head, body) = open(h.addr, &handshake("/ws/refuse", &browser_lines(&login))).await;
    assert_eq!(status_of(&head), 403, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("upgrade: websocket"), "{head}");
    // Passed on as the upstream sent it: its own `X-Frame-Options` kept, not replaced by the
    // proxy's default `DENY`, and none of the proxy's other security headers added.
    assert!(lower.contains("x-frame-options: sameorigin"), "{head}");
    assert!(!lower.contains("deny"), "{head}");
    assert!(!lower.contains("x-content-type-options"), "{head}");
    assert!(!lower.contains("referrer-policy"), "{head}");
    assert_eq!(
        seen.lock().first().and_then(|s| s.user.clone()).as_deref(),
        Some("alice")
    );
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains("{\"no\":1}") || body.is_empty(), "{body}");
}

/// `websocket_max_refusal_body` bounds the refusal body passed on: at a limit of 100 bytes, a
/// refusal of 100 is passed on whole and one of 101 answers 502 `bad_gateway`; the default
/// (64KiB) passes 64KiB and refuses one byte more.
#[tokio::test]
async fn a_refusal_body_over_the_routes_limit_answers_502() {
    for (settings, limit) in [
        (settings().with_max_refusal_body(100), 100),
        (settings(), 64 * 1024),
    ] {
        assert_eq!(settings.limits().max_refusal_body, limit);
        let (h, _) = start(settings).await;
        let login = h.login("alice", ALICE_PASSWORD).await;
        let path = |n: usize| format!("/ws/refuse-big?n={n}");
        let (_, head, body) = open(h.addr, &handshake(&path(limit), &browser_lines(&login))).await;
        assert_eq!(status_of(&head), 403, "{limit}: {head}");
        assert_eq!(
            body,
            vec![b'x'; limit],
            "{limit}: the refusal's body, whole"
        );
        let (_, head, body) =
            open(h.addr, &handshake(&path(limit + 1), &browser_lines(&login))).await;
        assert_eq!(status_of(&head), 502, "{limit}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains("\"bad_gateway\""), "{limit}: {body}");
    }
}

/// The config keys: defaults, values, and each refusal naming the file and key.
#[test]
fn websocket_keys_in_proxy_toml() {
    use countersign::proxy::config::ProxyConfig;
    let dir = temp_dir("ws-config");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let path = dir.join("proxy.toml");
    let text = |upstream_extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"http://app.test\"\n\
             [session]\nstore = \"memory\"\n[auth]\nusers_file = \"users.toml\"\n\
             [signing]\nkeyring = \"keys.toml\"\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n\
             {upstream_extra}"
        )
    };
    let off = ProxyConfig::parse(&text(""), &path).unwrap();
    assert!(off.upstreams[0].websocket.is_none(), "off unless asked for");
    let on = ProxyConfig::parse(&text("websocket = true\n"), &path).unwrap();
    let ws = on.upstreams[0].websocket.clone().unwrap().limits();
    assert_eq!(
        (ws.idle_timeout, ws.session_check, ws.max_open),
        (Duration::from_secs(300), Duration::from_secs(30), 10_000)
    );
    assert_eq!(ws.max_refusal_body, 64 * 1024);
    let set = ProxyConfig::parse(
        &text(
            "websocket = true\nwebsocket_idle_timeout = \"90s\"\n\
             websocket_session_check = \"5s\"\nwebsocket_max_open = 7\n\
             websocket_max_refusal_body = \"1KiB\"\n",
        ),
        &path,
    )
    .unwrap();
    let ws = set.upstreams[0].websocket.clone().unwrap().limits();
    assert_eq!(
        (ws.idle_timeout, ws.session_check, ws.max_open),
        (Duration::from_secs(90), Duration::from_secs(5), 7)
    );
    assert_eq!(ws.max_refusal_body, 1024);
    for (extra, key, problem) in [
        (
            "websocket_idle_timeout = \"1m\"\n",
            "upstream[0].websocket_idle_timeout",
            "only used with websocket = true",
        ),
        (
            "websocket_max_open = 5\n",
            "upstream[0].websocket_max_open",
            "only used with websocket = true",
        ),
        (
            "websocket = true\nwebsocket_max_open = 0\n",
            "upstream[0].websocket_max_open",
            "at least 1",
        ),
        (
            "websocket_max_refusal_body = \"1KiB\"\n",
            "upstream[0].websocket_max_refusal_body",
            "only used with websocket = true",
        ),
        (
            "websocket = true\nwebsocket_max_refusal_body = \"17MiB\"\n",
            "upstream[0].websocket_max_refusal_body",
            "must be at most 16MiB",
        ),
        (
            "websocket = true\nwebsocket_session_check = \"0s\"\n",
            "upstream[0].websocket_session_check",
            "must be greater than zero",
        ),
        (
            "websocket = true\nwebsocket_idle_timeout = \"soon\"\n",
            "upstream[0].websocket_idle_timeout",
            "invalid duration \"soon\"",
        ),
        ("websocket = \"yes\"\n", "websocket", "expected a boolean"),
    ] {
        let error = ProxyConfig::parse(&text(extra), &path)
            .expect_err(extra)
            .to_string();
        assert!(error.contains("proxy.toml"), "{extra}: {error}");
        assert!(error.contains(key), "{extra}: {error}");
        assert!(error.contains(problem), "{extra}: {error}");
    }
}

/// The binary (`countersign run`) with `websocket = true` in `proxy.toml`: a browser's
/// WebSocket works end to end, and SIGTERM with it open still stops the proxy within its
/// shutdown grace, closing it.
#[tokio::test]
async fn the_binary_proxies_a_websocket_and_stops_with_one_open() {
    use support_run::*;
    let (ws, seen) = start_ws_upstream_with(
        both_keys_keyring(),
        Arc::new(countersign::clock::SystemClock),
    )
    .await;
    let dir = temp_dir("ws-run");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, _) = start_on_free_ports(|listen, admin| {
        let file = dir.join("proxy.toml");
        let text = config_text(
            &listen.to_string(),
            Some(&admin.to_string()),
            &format!("http://{ws}"),
        ) + "websocket = true\nwebsocket_session_check = \"1s\"\n";
        write(&file, &text);
        RunningProxy::spawn(&file, &[])
    });
    let login = login_alice_at(addr).await;
    let (mut stream, head, rest) =
        open(addr, &handshake("/api/chat", &browser_lines(&login))).await;
    assert_eq!(status_of(&head), 101, "{head}\n{}", proxy.log());
    assert_eq!(
        read_exact_within(&mut stream, rest, greeting("alice").len()).await,
        greeting("alice")
    );
    let message = frame(0x81, Some(KEY), b"over the binary");
    stream.write_all(&message).await.unwrap();
    let want = frame(0x81, None, b"over the binary");
    assert_eq!(
        read_exact_within(&mut stream, Vec::new(), want.len()).await,
        want
    );
    assert_eq!(seen.lock().len(), 1);
    let stopping = std::time::Instant::now();
    proxy.signal("TERM");
    let exited = proxy.wait_exit(Duration::from_secs(8));
    assert!(exited.is_some(), "SIGTERM stops the proxy: {}", proxy.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "within the 2 s grace (and some): {:?}",
        stopping.elapsed()
    );
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
}

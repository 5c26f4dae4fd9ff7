//! What an SPA developer relies on at the proxy's edge, each test from a defect a QA pass found
//! against the documented contract (docs/FRONTEND.md, docs/CONFIG.md): login attempts in
//! flight at once are admitted only up to the throttle's limit; browser-sent `X-Forwarded-*`,
//! `Signature*`, other proxies' identity fields and method overrides never reach the upstream;
//! HEAD over HTTP/2 gets no body; raw non-ASCII request targets are 400 and change no state;
//! an upstream cannot set the session cookie, nor make the browser open its own login dialog.
//! Run: `cargo test --all-features --test proxy_browser_hardening`.
#![cfg(feature = "proxy")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `expires_at` of the session as `GET /auth/session?touch=false` reports it.
async fn expires_at(h: &Harness, login: &Login) -> u64 {
    let r = get(h.addr, "/auth/session?touch=false", login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["expires_at"].as_u64().expect("expires_at")
}

// ---------------------------------------------------------------------------------------------
// Login throttling: concurrent attempts
// ---------------------------------------------------------------------------------------------

/// docs/CONFIG.md `[auth.throttle]`: "`max_failures_per_user` ... Failed logins per user name
/// per window. While a limit is reached, logins answer 429". Each attempt is counted in the same
/// step as the limit check, before its password is checked, so of 40 concurrent guesses for one
/// user with `max_failures_per_user = 5` exactly 5 are checked (401) and 35 throttled (429).
/// Before the fix, the limit was checked before the password and counted after it, so all 40
/// were checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_logins_cannot_exceed_the_per_user_limit() {
    let h = Harness::start_with(HarnessOptions {
        max_failures_per_user: 5,
        ..HarnessOptions::default()
    })
    .await;
    let addr = h.addr;
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let body =
                    serde_json::json!({ "username": "alice", "password": format!("guess-{i}") })
                        .to_string();
                send(
                    addr,
                    Method::POST,
                    "/auth/login",
                    &[("content-type", "application/json"), ("origin", ORIGIN)],
                    body,
                )
                .await
                .status
            })
        })
        .collect();
    let mut checked = 0;
    let mut throttled = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => throttled += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (checked, throttled),
        (5, 35),
        "password guesses checked for one user (limit 5), and throttled"
    );
}

// ---------------------------------------------------------------------------------------------
// Header hygiene: `X-Forwarded-*` and `Signature*` from the browser
// ---------------------------------------------------------------------------------------------

/// docs/FRONTEND.md: "What the API never sees from the browser: ... any `Signature*`,
/// `Content-Digest` or identity header, and the fields that say who the client is or which
/// path it asked for (`Forwarded`, `X-Forwarded-*`, ...): the proxy removes them and sets its
/// own (`X-Forwarded-For/-Proto/-Host`, ...)". Every browser-sent `X-Forwarded-*` field —
/// also `X-Forwarded-User` (oauth2-proxy's identity header), `X-Forwarded-Ssl` /
/// `X-Forwarded-Scheme` (Rack reads them as the scheme), `X-Forwarded-Uri` (Traefik's original
/// path) and `X-Forwarded-Server` — is removed, and so are `Signature-Agent` / `Signature-Key`,
/// other proxies' identity fields and method overrides. Before the fix, only five listed
/// `X-Forwarded-*` names were removed and the rest reached the upstream as the browser wrote them.
#[tokio::test]
async fn browser_x_forwarded_and_signature_fields_never_reach_the_upstream() {
    let h = Harness::start().await;
    let login = h.login("bob", BOB_PASSWORD).await;
    let spoofed = [
        ("x-forwarded-user", "alice"),
        ("x-forwarded-email", "alice@example.com"),
        ("x-forwarded-groups", "admin"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-uri", "/api/admin"),
        ("x-forwarded-server", "internal.example"),
        ("signature-agent", "\"https://bot.example\""),
        ("signature-key", "countersign=:AAAA:"),
        ("x-auth-request-user", "alice"),
        ("x-auth-request-groups", "admin"),
        ("remote-user", "alice"),
        ("x-remote-user", "alice"),
        ("cf-connecting-ip", "10.0.0.1"),
        ("x-original-uri", "/api/admin"),
        ("x-http-method-override", "DELETE"),
        ("x-method-override", "DELETE"),
    ];
    let mut headers = vec![("cookie", login.cookie.as_str())];
    headers.extend(spoofed);
    let r = send(h.addr, Method::GET, "/api/items", &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let raw = h.upstream.last_raw();
    let arrived: Vec<&str> = spoofed
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| raw.headers.contains_key(*name))
        .collect();
    assert!(
        arrived.is_empty(),
        "browser-supplied fields reached the upstream: {arrived:?}"
    );
    // The proxy's own X-Forwarded-* are still there.
    assert_eq!(raw.headers["x-forwarded-proto"], "http");
    assert_eq!(raw.headers["x-forwarded-host"], "app.test");
    assert_eq!(raw.headers["x-forwarded-for"], "127.0.0.1");
}

// ---------------------------------------------------------------------------------------------
// HEAD over HTTP/2
// ---------------------------------------------------------------------------------------------

/// An HPACK "literal header field without indexing, new name" (no Huffman), enough for a
/// request head.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One request on stream 1 of a fresh h2c (prior knowledge) connection; returns the frames
/// (type, flags, payload) received on stream 1 until it ends (END_STREAM or RST_STREAM).
async fn h2c_frames_of_one_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> Vec<(u8, u8, Vec<u8>)> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", method);
    hpack_literal(&mut block, ":scheme", "http");
    hpack_literal(&mut block, ":authority", "app.test");
    hpack_literal(&mut block, ":path", path);
    for (name, value) in fields {
        hpack_literal(&mut block, name, value);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(h2_frame(0x1, 0x4 | 0x1, 1, &block)); // HEADERS, END_HEADERS | END_STREAM
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&out).await.unwrap();
    let mut frames = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | head[2] as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                break;
            }
            if kind == 0x4 && flags & 0x1 == 0 {
                // Acknowledge the server's SETTINGS.
                let _ = stream.write_all(&h2_frame(0x4, 0x1, 0, &[])).await;
            }
            if id == 1 {
                let ended = kind == 0x3 || flags & 0x1 != 0;
                frames.push((kind, flags, payload));
                if ended {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("stream 1 ended");
    frames
}

/// RFC 9110 §9.3.2: "The server SHOULD send the same header fields in response to a HEAD
/// request as it would have sent if the request method had been GET. However, a server MUST
/// NOT send content in the response to HEAD" — and an HTTP/2 client treats DATA on a HEAD
/// response as a protocol error (curl: "HTTP/2 stream 1 was not closed cleanly:
/// PROTOCOL_ERROR"; Chrome: net::ERR_HTTP2_PROTOCOL_ERROR, so `fetch` rejects instead of
/// resolving with the 401). So an answer the proxy makes itself (`{"error":...}` JSON, the
/// `/auth/session` JSON) to a HEAD over HTTP/2 carries no DATA and no stream reset. Before the
/// fix, only HTTP/1 dropped the body (hyper does it itself); over HTTP/2 it was sent as DATA.
#[tokio::test]
async fn head_over_http2_gets_no_body_from_the_proxy() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Fields, &str); 3] = [
        ("/api/items", vec![], ":status 401 (no session)"),
        ("/nothing-here", vec![], ":status 404"),
        (
            "/auth/session",
            vec![("cookie", login.cookie.as_str())],
            ":status 200 (session JSON)",
        ),
    ];
    for (path, fields, what) in cases {
        let frames = h2c_frames_of_one_request(h.addr, "HEAD", path, &fields).await;
        assert!(
            frames.iter().all(|(kind, _, _)| *kind != 0x3),
            "HEAD {path} ({what}): stream reset: {frames:?}"
        );
        let data: usize = frames
            .iter()
            .filter(|(kind, _, _)| *kind == 0x0)
            .map(|(_, _, payload)| payload.len())
            .sum();
        assert_eq!(
            data,
            0,
            "HEAD {path} ({what}) over HTTP/2 got {data} bytes of DATA: {:?}",
            frames
                .iter()
                .filter(|(kind, _, _)| *kind == 0x0)
                .map(|(_, _, p)| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Non-ASCII request targets
// ---------------------------------------------------------------------------------------------

/// A request target with raw (not percent-encoded) UTF-8 bytes in its path or query is a
/// malformed request: 400 `bad_request`, nothing reaches the upstream, and the session's idle
/// expiry is not extended. Before the fix, such a target was routed, its session extended, and
/// only then refused by the signer as 500 `internal_error` (docs/FRONTEND.md: "the proxy
/// failed").
#[tokio::test]
async fn raw_non_ascii_target_is_bad_request_and_does_not_extend_the_session() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let before = expires_at(&h, &login).await;
    for target in [&b"/api/caf\xc3\xa9"[..], &b"/api/items?q=caf\xc3\xa9"[..]] {
        h.clock.advance(100);
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(
            format!(
                " HTTP/1.1\r\nhost: app.test\r\ncookie: {}\r\nconnection: close\r\n\r\n",
                login.cookie
            )
            .as_bytes(),
        );
        let answer = raw_exchange(h.addr, &request).await;
        let shown = String::from_utf8_lossy(target);
        assert!(answer.starts_with("HTTP/1.1 400"), "GET {shown}: {answer}");
        assert!(
            answer.contains(r#"{"error":"bad_request"}"#),
            "GET {shown}: {answer}"
        );
    }
    assert_eq!(h.upstream.raw_count(), 0);
    assert_eq!(
        expires_at(&h, &login).await,
        before,
        "a refused request extended the session's idle expiry"
    );
}

// ---------------------------------------------------------------------------------------------
// Set-Cookie from an upstream naming the session cookie
// ---------------------------------------------------------------------------------------------

/// A bare HTTP/1.1 upstream answering every request with `answer` (no verification).
async fn fixed_answer_upstream(answer: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The session cookie is the proxy's alone: an upstream never sees it (even with
/// `forward_cookies`), and no upstream — also a public `auth = "none"` route — can set it: an
/// upstream `Set-Cookie: countersign_session=...` is removed, while its other cookies pass.
/// This keeps login's "a new id at every login (no fixation)". Before the fix, such a
/// `Set-Cookie` reached the browser and replaced the user's session cookie (logging them out,
/// or fixating them into a session whose id the upstream chose).
#[tokio::test]
async fn upstream_cannot_set_the_session_cookie() {
    let evil = fixed_answer_upstream(
        "HTTP/1.1 200 OK\r\nset-cookie: countersign_session=chosen-by-the-upstream; Path=/\r\n\
         set-cookie: theme=dark; Path=/\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let mut public = route("pub", "/pub/", &format!("http://{evil}"));
    public.auth_required = false;
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![public],
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = get(h.addr, "/pub/banner", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let planted: Vec<&str> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.trim_start().starts_with("countersign_session="))
        .collect();
    assert!(
        planted.is_empty(),
        "the upstream set the proxy's session cookie: {planted:?}"
    );
    // Its other cookies pass.
    assert!(
        r.headers
            .get_all("set-cookie")
            .iter()
            .any(|v| v == "theme=dark; Path=/"),
        "{:?}",
        r.headers
    );
}

/// An upstream's `WWW-Authenticate: Basic` (or Digest, NTLM, Negotiate) would make the browser
/// open its own login dialog on a `fetch`, for credentials the proxy would strip anyway: the
/// challenge is removed and the 401 reaches the SPA as it is. A `Bearer` challenge passes.
#[tokio::test]
async fn upstream_login_dialog_challenges_never_reach_the_browser() {
    let basic = fixed_answer_upstream(
        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"api\"\r\n\
         www-authenticate: Bearer error=\"invalid_token\"\r\ncontent-length: 2\r\n\r\nno",
    )
    .await;
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("legacy", "/legacy/", &format!("http://{basic}"))],
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = get(h.addr, "/legacy/report", &login).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let challenges: Vec<&str> = r
        .headers
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(challenges, ["Bearer error=\"invalid_token\""]);
    assert_eq!(r.text(), "no");
}

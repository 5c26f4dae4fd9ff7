//! Findings of a review of the request half of forwarding, each against a real proxy and an
//! upstream on loopback:
//! - a path segment holding only `;` parameters (`/;/api/x`, `/%3b/api/x`, `/;x/api/x`) got
//!   past the `auth` of `/api/` under a public `/` route: the router's reading dropped the
//!   parameters but kept the empty segment (`//api/x`, which matched only `/`), while Tomcat
//!   drops them and merges the `//`, serving `/api/x`;
//! - an absolute-form target with a fragment and no path (`GET http://app.test#x`) went
//!   upstream as `GET  HTTP/1.1` (an empty request-target), signed over `@path` `/`;
//! - a body framed by a transfer coding other than plain `chunked` (`gzip, chunked`) was
//!   de-chunked by hyper and forwarded still gzipped, as the content, signed.
//!
//! Run: `cargo test --all-features --test proxy_forward_paths`.
#![cfg(feature = "proxy")]

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use parking_lot::Mutex;
use support::*;

/// The review's repro: routes `/` (public) and `/api/` (auth required). A segment holding only
/// parameters, raw or encoded, is 400 `bad_request` with or without a session, and nothing is
/// forwarded; it was forwarded to `/` unauthenticated, and a Tomcat behind it served
/// `/api/users`. Parameters that leave the path under its own route still pass.
#[tokio::test]
async fn parameter_only_segments_do_not_skip_a_routes_auth() {
    let h = Harness::start_with_public_route("site", "/").await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let refused = [
        "/;/api/users",
        "/%3b/api/users",
        "/%3B/api/users",
        "/;x/api/users",
        "/;jsessionid=1/api/users",
        "/;/;/api/users",
        "/;/api",
        "/;/%61pi/users",
    ];
    assert_refused_before_the_upstream(&h, &login, &refused).await;
    // As `/api;x/users` always was.
    let r = send(h.addr, Method::GET, "/api;x/users", &[], Bytes::new()).await;
    assert_eq!(r.error_code(), "bad_request");
    assert_eq!(h.upstream.raw_count(), 0, "nothing refused was forwarded");

    // Parameter-only segments that name no other route: forwarded as sent.
    for (path, session) in [
        ("/docs/;/x", None),
        ("/;/docs", None),
        ("/api/;/users", Some(&login)),
        ("/api/users;v=1", Some(&login)),
    ] {
        let r = get_with(&h, path, session).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(h.upstream.last_raw().uri, path, "{path}");
    }
}

/// The static site reads paths as the router's check does: `/;/api/users` is the API's, so
/// it is never answered with the SPA's `index.html` (it was: read as `//api/users`, no
/// route's) nor with a file the `/api/` route shadows.
#[tokio::test]
async fn parameter_only_segments_of_a_routed_prefix_never_reach_the_static_files() {
    const INDEX: &str = "<!doctype html><title>spa</title>";
    let base = temp_dir("forward-paths");
    let root = base.join("dist");
    write(&root.join("index.html"), INDEX);
    write(&root.join("api/mock.json"), "{\"mock\":true}");
    let h = start_static(base, &root).await;
    for path in [
        "/;/api/users",
        "/%3b/api/users",
        "/;x/api/mock.json",
        "/;/auth/session",
    ] {
        let r = fetch(&h, path).await;
        assert!(
            r.status == StatusCode::NOT_FOUND || r.status == StatusCode::BAD_REQUEST,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert_ne!(r.text(), INDEX, "{path}");
        assert!(!r.text().contains("mock"), "{path}");
    }
    assert_eq!(h.upstream.raw_count(), 0);
    // A client route with a parameter-only segment still gets the app.
    assert_eq!(fetch(&h, "/notes/;/42").await.text(), INDEX);
}

/// An upstream that records each request head as it arrived on the wire and answers 200.
async fn recording_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let addr = serve_each(move |mut stream| {
        let seen = seen.clone();
        async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            seen.lock()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    (addr, heads)
}

/// The review's repro: a route `/`, `GET http://app.test#x HTTP/1.1`. The http crate cuts the
/// fragment and keeps an empty path-and-query, routed as `/`; the proxy reused it and hyper's
/// client wrote `GET  HTTP/1.1` upstream, a request line no server parses, while the
/// signature covered `@path` `/`. Now the upstream reads `GET / HTTP/1.1`, and a verifying
/// upstream accepts the signature. The spellings with a path are unchanged.
#[tokio::test]
async fn a_fragment_only_absolute_target_goes_upstream_as_slash() {
    let (raw_addr, heads) = recording_upstream().await;
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            let mut public = route("site", "/", &format!("http://{raw_addr}"));
            public.auth_required = false;
            s.routes.push(public);
        }),
        ..HarnessOptions::default()
    })
    .await;
    for (target, line) in [
        ("http://app.test#x", "GET / HTTP/1.1"),
        ("http://app.test#", "GET / HTTP/1.1"),
        ("http://app.test", "GET / HTTP/1.1"),
        ("http://app.test?q=1#x", "GET /?q=1 HTTP/1.1"),
        ("http://app.test/p#x", "GET /p HTTP/1.1"),
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
        let answer = raw_exchange(h.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        let head = heads
            .lock()
            .last()
            .cloned()
            .expect("the upstream got a request");
        assert_eq!(head.lines().next(), Some(line), "{target}: {head}");
    }

    // Signed over what is sent: an upstream behind the VerifyLayer takes it.
    let h = Harness::start_with_public_route("site", "/").await;
    let answer = raw_exchange(
        h.addr,
        b"GET http://app.test#x HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(h.upstream.last_raw().uri, "/");
    assert_eq!(h.upstream.last_verified().uri, "/");
}

/// `expires_at` of the session as `GET /auth/session?touch=false` reports it.
async fn expires_at(h: &Harness, login: &Login) -> u64 {
    let r = get(h.addr, "/auth/session?touch=false", login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["expires_at"].as_u64().expect("expires_at")
}

/// A raw HTTP/1.1 `POST path` with `fields` (whole lines) and the chunked body `{}`.
fn chunked_post(path: &str, fields: &[String]) -> Vec<u8> {
    let mut request = format!("POST {path} HTTP/1.1\r\nhost: app.test\r\n");
    for field in fields {
        request.push_str(field);
        request.push_str("\r\n");
    }
    request.push_str("connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
    request.into_bytes()
}

/// The review's repro: `POST /api/items` as the SPA sends it (cookie, CSRF token, origin) with
/// `Transfer-Encoding: gzip, chunked` (or `gzip` then `chunked` on two lines, or
/// `chunked, chunked`): hyper's server decodes the chunks (it looks at the last coding only),
/// and the proxy forwarded the still-encoded bytes as the content, signed. Now 400
/// `bad_request` before the session is looked up: nothing forwarded, the session's idle timer
/// not moved. Plain `chunked` (any case, with an empty element before it) is forwarded.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused_before_the_session() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let untouched = expires_at(&h, &login).await;
    h.clock.advance(100);
    let spa = vec![
        format!("cookie: {}", login.cookie),
        format!("x-csrf-token: {}", login.csrf),
        format!("origin: {ORIGIN}"),
        "content-type: application/json".to_owned(),
    ];
    for codings in [
        &["transfer-encoding: gzip, chunked"][..],
        &["transfer-encoding: gzip", "transfer-encoding: chunked"],
        &["transfer-encoding: chunked, chunked"],
        &["transfer-encoding: chunked", "transfer-encoding: chunked"],
        &["transfer-encoding: identity, chunked"],
    ] {
        let mut fields = spa.clone();
        fields.extend(codings.iter().map(|c| (*c).to_owned()));
        let answer = raw_exchange(h.addr, &chunked_post("/api/items", &fields)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{codings:?}: {answer}");
        assert!(
            answer.contains(r#"{"error":"bad_request"}"#),
            "{codings:?}: {answer}"
        );
    }
    assert_eq!(h.upstream.raw_count(), 0, "nothing refused was forwarded");
    assert_eq!(
        expires_at(&h, &login).await,
        untouched,
        "a refused request does not extend the session"
    );

    for coding in ["chunked", "Chunked", ", chunked"] {
        let mut fields = spa.clone();
        fields.push(format!("transfer-encoding: {coding}"));
        let answer = raw_exchange(h.addr, &chunked_post("/api/items", &fields)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{coding}: {answer}");
        assert_eq!(h.upstream.last_verified().body, Bytes::from_static(b"{}"));
    }
    assert_eq!(h.upstream.raw_count(), 3);
    assert_eq!(expires_at(&h, &login).await, untouched + 100);
}

/// The login reads its body too: a body framed `gzip, chunked` is refused, 400 `bad_request`,
/// and no session is made (the credentials were read still "encoded" and accepted). Plain
/// `chunked` logs in.
#[tokio::test]
async fn a_login_with_a_transfer_coding_other_than_chunked_is_refused() {
    let h = Harness::start().await;
    let body = format!(r#"{{"username":"alice","password":"{ALICE_PASSWORD}"}}"#);
    let login = |coding: &str| {
        format!(
            "POST /auth/login HTTP/1.1\r\nhost: app.test\r\norigin: {ORIGIN}\r\n\
             content-type: application/json\r\ntransfer-encoding: {coding}\r\n\
             connection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    for coding in ["gzip, chunked", "chunked, chunked"] {
        let answer = raw_exchange(h.addr, login(coding).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{coding}: {answer}");
        assert!(answer.contains(r#"{"error":"bad_request"}"#), "{coding}");
        assert!(
            !answer.to_ascii_lowercase().contains("set-cookie"),
            "{coding}: {answer}"
        );
    }
    let answer = raw_exchange(h.addr, login("chunked").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("set-cookie"),
        "{answer}"
    );
}

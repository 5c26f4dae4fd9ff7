//! Findings of a review of `src/proxy/forward.rs`, each against a real proxy and a recording
//! upstream on loopback:
//! - the `_` spellings of the fields the proxy removes or sets (`X_Forwarded_For`,
//!   `X_Auth_User`, ...) and `Client-IP` reached the upstream, where a CGI-style server (PHP,
//!   Puma before 6.4.2: CVE-2024-45614) reads them as the proxy's own;
//! - a dot segment whose `;` is percent-encoded (`/docs/..%3b/api/x`) passed both path checks;
//! - an HTTP/2 request with ~24,570 distinct field names (`max_header_bytes` of 1 MiB) made
//!   the forwarder panic (`HeaderMap::reserve`) instead of answering.
//!
//! Run: `cargo test --all-features --test proxy_forward_review`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full};
use support::*;

/// What the browser sends beside its session: `_` spellings of fields the proxy removes or
/// sets (client address, identity, signature, CSRF token, request id, hop-by-hop),
/// `Client-IP`, and one ordinary `_` name that must still arrive.
const SPOOFED: &[(&str, &str)] = &[
    ("X_Forwarded_For", "10.9.8.7"),
    ("X_Forwarded_Host", "evil.test"),
    ("X_Auth_User", "mallory"),
    ("X_Auth_Roles", "admin"),
    ("X_Real_IP", "10.9.8.7"),
    ("Client-IP", "10.9.8.7"),
    ("Client_IP", "10.9.8.7"),
    ("True_Client_IP", "10.9.8.7"),
    ("Signature_Input", "countersign=();created=1"),
    ("Content_Digest", "sha-256=:AAAA:"),
    ("X_CSRF_Token", "token"),
    ("X_Request_Id", "spoofed-id"),
    ("Remote_User", "mallory"),
    ("Keep_Alive", "timeout=5"),
    ("X_Trace_Id", "trace-1"),
];

/// The upstream got none of [`SPOOFED`]'s names but `x_trace_id`, and the proxy's own values
/// for the fields it sets.
fn assert_only_the_proxys_fields(seen: &HeaderMap) {
    for (name, _) in SPOOFED {
        let name = name.to_ascii_lowercase();
        if name == "x_trace_id" {
            continue;
        }
        assert!(
            !seen.contains_key(name.as_str()),
            "{name} arrived: {seen:?}"
        );
    }
    assert_eq!(
        seen["x_trace_id"], "trace-1",
        "an ordinary `_` name is forwarded"
    );
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], "app.test");
    assert_eq!(seen["x-auth-user"], "alice");
    assert_ne!(seen["x-request-id"], "spoofed-id");
}

/// Over HTTP/1.1 and over h2c: the upstream sees no `_` spelling of a field the proxy removes
/// or sets, nor `Client-IP`; `X_Trace_Id` still arrives; the signed identity is the session's.
/// Before the fix every one of them was forwarded.
#[tokio::test]
async fn underscore_spellings_of_stripped_fields_never_reach_the_upstream() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;

    let mut headers = vec![("cookie", login.cookie.as_str())];
    headers.extend_from_slice(SPOOFED);
    let r = send(h.addr, Method::GET, "/api/items", &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_only_the_proxys_fields(&h.upstream.last_raw().headers);
    assert_eq!(
        h.upstream.last_verified().identity.user.as_deref(),
        Some("alice")
    );

    let mut sender = support_h2::h2c(h.addr).await;
    let mut request = Request::builder()
        .uri(format!("http://{}/api/items", h.addr))
        .header("cookie", &login.cookie);
    for (name, value) in SPOOFED {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_only_the_proxys_fields(&h.upstream.last_raw().headers);
    assert_eq!(h.upstream.raw_count(), 2);
}

/// A public `/` route above the protected `/api/`, one upstream: a dot segment whose `;` is
/// percent-encoded (`%3b`) matched `/` as received, and an upstream that decodes escapes,
/// drops `;` parameters and resolves dots served it as `/api/x` without a session. Now 400
/// `bad_request`, never forwarded, as `..;x` always was. Segments that are not dot segments
/// once their parameters are dropped still pass.
#[tokio::test]
async fn dot_segments_with_an_encoded_semicolon_are_400_and_never_forwarded() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            let mut public = route("site", "/", &up.url());
            public.auth_required = false;
            s.routes.push(public);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    for path in [
        "/docs/%2e%2e%3b/api/x",
        "/docs/..%3bx/api/x",
        "/docs/..%3B/api/x",
        "/docs/.%3b/x",
        "/docs/%2e%3bv=1/api/x",
        "/api/..%3b/x",
    ] {
        for session in [None, Some(&login)] {
            let r = match session {
                Some(login) => get(h.addr, path, login).await,
                None => send(h.addr, Method::GET, path, &[], Bytes::new()).await,
            };
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
            assert_eq!(r.error_code(), "bad_request", "{path}");
        }
    }
    assert_eq!(h.upstream.raw_count(), 0, "nothing refused was forwarded");
    // An encoded `;` in a segment that is no dot segment: forwarded as sent.
    for (path, session) in [
        ("/api/a%3bb", Some(&login)),
        ("/api/..x%3b/y", Some(&login)),
        ("/docs/a%3bb", None),
        ("/docs/x%3b../y", None),
    ] {
        let r = match session {
            Some(login) => get(h.addr, path, login).await,
            None => send(h.addr, Method::GET, path, &[], Bytes::new()).await,
        };
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(h.upstream.last_raw().uri, path, "{path}");
    }
}

/// Distinct field names in the request below: past the 24,566 a `HeaderMap` holds with room
/// for the proxy's ten more, within the 24,576 h2 decodes into one.
const NAMES: usize = 24_570;

/// One h2c request with [`NAMES`] distinct short names to a public route, the proxy's
/// `max_header_bytes` at 1 MiB (`server.max_header_bytes = "1MiB"`; h2 then accepts the
/// list, ~39 bytes a field by its count): answered 400 `bad_request`, nothing forwarded, and
/// the proxy serves the next request. Before the fix `HeaderMap::reserve` panicked ("size
/// overflows MAX_SIZE") and the stream was reset without an answer.
#[tokio::test]
async fn an_h2_request_with_too_many_field_names_is_400_not_a_panic() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            s.max_header_bytes = 1024 * 1024;
            let mut public = route("site", "/", &up.url());
            public.auth_required = false;
            s.routes.push(public);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let mut sender = support_h2::h2c(h.addr).await;
    let mut request = Request::builder().uri(format!("http://{}/docs/x", h.addr));
    let headers = request.headers_mut().expect("a valid request so far");
    for n in 0..NAMES {
        let name = http::HeaderName::from_bytes(format!("h{n}").as_bytes()).unwrap();
        headers.insert(name, http::HeaderValue::from_static("v"));
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("an answer, not a reset stream");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body, r#"{"error":"bad_request"}"#);
    assert_eq!(h.upstream.raw_count(), 0);
    // The proxy serves on, over HTTP/2 and HTTP/1.1.
    let request = Request::builder()
        .uri(format!("http://{}/docs/after", h.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut sender = support_h2::h2c(h.addr).await;
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.status(), StatusCode::OK);
    let r = send(h.addr, Method::GET, "/docs/after", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.raw_count(), 2);
}

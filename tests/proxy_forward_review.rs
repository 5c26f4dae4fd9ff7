//! Findings of a review of `src/proxy/forward.rs`, each against a real proxy and a recording
//! upstream on loopback:
//! - the `_` spellings of the fields the proxy removes or sets (`X_Forwarded_For`,
//!   `X_Auth_User`, ...) and `Client-IP` reached the upstream, where a CGI-style server (PHP,
//!   Puma before 6.4.2: CVE-2024-45614) reads them as the proxy's own;
//! - a dot segment whose `;` is percent-encoded (`/docs/..%3b/api/x`) passed both path checks;
//! - an HTTP/2 request with ~24,570 distinct field names (`max_header_bytes` of 1 MiB) made
//!   the forwarder panic (`HeaderMap::reserve`) instead of answering;
//! - one with a body whose names filled that map exactly once the proxy had added its own
//!   made hyper's HTTP/1 client panic (`HeaderMap::entry`): a 502. HTTP/2 requests now have
//!   `server.max_header_count` too, counted in distinct names (`cookie` crumbs are one).
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
    let h = Harness::start_with_public_route("site", "/").await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let refused = [
        "/docs/%2e%2e%3b/api/x",
        "/docs/..%3bx/api/x",
        "/docs/..%3B/api/x",
        "/docs/.%3b/x",
        "/docs/%2e%3bv=1/api/x",
        "/api/..%3b/x",
    ];
    assert_refused_before_the_upstream(&h, &login, &refused).await;
    // An encoded `;` in a segment that is no dot segment: forwarded as sent.
    for (path, session) in [
        ("/api/a%3bb", Some(&login)),
        ("/api/..x%3b/y", Some(&login)),
        ("/docs/a%3bb", None),
        ("/docs/x%3b../y", None),
    ] {
        let r = get_with(&h, path, session).await;
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
/// overflows MAX_SIZE") and the stream was reset without an answer. Since HTTP/2 requests are
/// held to `server.max_header_count` (10,000 at most), this one is refused at the entry,
/// with the same answer, and no request reaches the forwarder's `try_reserve` with more names
/// than that: its failure is no longer reachable.
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

/// An h2c request to `path` with `names` distinct field names `h0`, `h1`, ... (value `v`)
/// besides `extra` (appended in order: a name may repeat), and `body`.
async fn h2_with_names(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    names: usize,
    extra: &[(&str, &str)],
    body: &'static [u8],
) -> (StatusCode, String) {
    let mut sender = support_h2::h2c(addr).await;
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    let headers = request.headers_mut().expect("a valid request so far");
    for n in 0..names {
        let name = http::HeaderName::from_bytes(format!("h{n}").as_bytes()).unwrap();
        headers.insert(name, http::HeaderValue::from_static("v"));
    }
    for (name, value) in extra {
        headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    let request = request.body(Full::new(Bytes::from_static(body))).unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("an answer, not a reset stream");
    assert_eq!(response.version(), Version::HTTP_2);
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `server.max_header_count` (default 100) holds for HTTP/2 too, counted in distinct field
/// names: 101 names is 400 `bad_request` before any route or session work (an auth-required
/// route answers 401 below the limit, 400 above it), nothing forwarded; 100 names pass. Over
/// HTTP/1 hyper counts field lines and answers 431 (empty body), as before. Before the fix
/// HTTP/2 had no count at all: the 101-name request got the route's 401.
#[tokio::test]
async fn h2_requests_over_max_header_count_distinct_names_are_refused() {
    let h = Harness::start().await;
    let limit = countersign::proxy::config::DEFAULT_MAX_HEADER_COUNT;

    let (status, body) = h2_with_names(h.addr, Method::GET, "/api/items", limit, &[], b"").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body, r#"{"error":"unauthenticated"}"#);

    let (status, body) =
        h2_with_names(h.addr, Method::GET, "/api/items", limit + 1, &[], b"").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body, r#"{"error":"bad_request"}"#);
    assert_eq!(h.upstream.raw_count(), 0);

    // HTTP/1: hyper's own count of field lines (`Host` is one of them), 431 with no body.
    let names: Vec<String> = (0..limit).map(|n| format!("h{n}")).collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = send(h.addr, Method::GET, "/api/items", &fields, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(r.body.is_empty(), "{}", r.text());
}

/// An HTTP/2 browser sends its cookies as one `cookie` field line per cookie (RFC 9113
/// §8.2.3), hundreds for a site that sets many: they are one name, so 300 crumbs (beside the
/// session's own) stay far below `max_header_count` and the request is served as the
/// session's. A count of field lines (`HeaderMap::len`) would refuse this browser.
#[tokio::test]
async fn h2_cookie_crumbs_do_not_count_against_max_header_count() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let crumbs: Vec<String> = (0..300).map(|n| format!("c{n}=v")).collect();
    let mut extra = vec![("cookie", login.cookie.as_str())];
    extra.extend(crumbs.iter().map(|c| ("cookie", c.as_str())));
    let (status, body) = h2_with_names(h.addr, Method::GET, "/api/items", 10, &extra, b"").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        h.upstream.last_verified().identity.user.as_deref(),
        Some("alice")
    );
}

/// An HTTP/1.1 upstream that takes heads of up to 10,100 field lines (hyper's default is 100)
/// and answers with the number of distinct field names it received.
async fn wide_upstream() -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    serve_each(|stream| async move {
        let service =
            hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let names = req.headers().keys_len();
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    names.to_string(),
                ))))
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .max_headers(10_100)
            .max_buf_size(1024 * 1024)
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// The review's repro: `max_header_bytes` of 1 MiB, `max_header_count` at its largest
/// (10,000), an auth-required route, a user with roles, and an h2c POST with a 1-byte body
/// whose distinct names fill the forwarder's map exactly (24,564 of them left once the proxy
/// has removed `Cookie` and the CSRF token, with `Origin` and `Content-Length`: 24,566, plus
/// the proxy's and the signer's ten). Before the fix the map went to hyper's HTTP/1 client
/// full, whose `headers.entry(TRANSFER_ENCODING)` panicked ("size overflows MAX_SIZE") in the
/// upstream connection's task: a 502 and a panic in the log. Now the request is over
/// `max_header_count` and refused at the entry, 400 `bad_request`, nothing forwarded. The
/// most a request can now bring to the forwarder, 10,000 names and a body, is forwarded whole
/// to an upstream that takes them, and 10,001 are refused.
#[tokio::test]
async fn a_post_filling_the_header_map_is_refused_at_entry_not_a_502() {
    let wide = wide_upstream().await;
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.max_header_bytes = 1024 * 1024;
            s.max_header_count = 10_000;
            s.routes
                .push(route("wide", "/wide/", &format!("http://{wide}")));
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let spa = [
        ("cookie", login.cookie.as_str()),
        ("x-csrf-token", login.csrf.as_str()),
        ("origin", ORIGIN),
    ];

    let (status, body) =
        h2_with_names(h.addr, Method::POST, "/api/items", 24_564, &spa, b"x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body, r#"{"error":"bad_request"}"#);
    assert_eq!(h.upstream.raw_count(), 0);

    // At the limit: 9,996 names, the three above and the client's `Content-Length`.
    let (status, body) = h2_with_names(h.addr, Method::POST, "/wide/x", 9_996, &spa, b"x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let received: usize = body.parse().expect("the upstream's count");
    assert!(received >= 9_996 + 2, "{received} names arrived");
    let (status, body) = h2_with_names(h.addr, Method::POST, "/wide/x", 9_997, &spa, b"x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The proxy serves on.
    let r = post_json(h.addr, "/api/items", &login, "{}").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, and any request with two `Host` lines,
/// are answered 400 `bad_request` (as nginx answers), on a public route and on the proxy's own
/// endpoints alike, and nothing is forwarded. Before, both were served: the proxy sends the
/// upstream its own `Host`, but a front server or log that read the request by its `Host` saw
/// another request than the one served. HTTP/1.0 needs no `Host`; HTTP/2 names the authority
/// in `:authority`.
#[tokio::test]
async fn a_missing_or_repeated_host_is_400_and_never_forwarded() {
    let h = Harness::start_with_public_route("pub", "/pub/").await;
    for request in [
        "GET /pub/x HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /pub/x HTTP/1.1\r\nhost: app.test\r\nhost: other.test\r\nconnection: close\r\n\r\n",
        "GET /pub/x HTTP/1.0\r\nhost: app.test\r\nhost: app.test\r\n\r\n",
        "GET http://app.test/pub/x HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /auth/session HTTP/1.1\r\nconnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(h.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1."), "{request:?}: {answer}");
        assert!(answer.contains(" 400 "), "{request:?}: {answer}");
        assert!(
            answer.contains(r#"{"error":"bad_request"}"#),
            "{request:?}: {answer}"
        );
    }
    assert_eq!(h.upstream.raw_count(), 0);
    // One Host, or HTTP/1.0 without one: served.
    for request in [
        "GET /pub/x HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
        "GET /pub/x HTTP/1.0\r\n\r\n",
    ] {
        let answer = raw_exchange(h.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1."), "{request:?}: {answer}");
        assert!(answer.contains(" 200 "), "{request:?}: {answer}");
    }
    assert_eq!(h.upstream.raw_count(), 2);
}

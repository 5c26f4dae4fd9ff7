//! CSRF and session QA against the real proxy on loopback: which methods count as safe, the
//! `Origin` / `Sec-Fetch-Site` rules, the token comparison, login CSRF, session fixation,
//! logout, the session cookie's attributes, the WebSocket handshake (cross-site WebSocket
//! hijacking) and HTTP/2's `:method`.
//!
//! Regression tests for defects found in this pass (each failed before its fix):
//! - `a_same_origin_write_under_a_no_referrer_policy_is_accepted`: a page under
//!   `Referrer-Policy: no-referrer` (a value `server.response_headers` accepts) sends
//!   `Origin: null` on its own same-origin POSTs (Fetch, "append a request `Origin` header");
//!   every write, login and logout of such an SPA was refused 403 `csrf`.
//! - `a_credentialed_cross_origin_read_never_reaches_the_api`: a same-site page on another
//!   origin (a sibling subdomain, another port: the `SameSite=Strict` cookie is sent) could
//!   `fetch(url, {credentials: "include"})` a session route; the proxy forwarded it signed
//!   with the victim's identity, and whether the page could read the answer was left to the
//!   API's CORS headers, which pass through.
//! - `cookie_names_the_browser_would_refuse_are_refused_at_load`: `session.cookie_name`
//!   `__secure-sid` or `__HOST-sid` was accepted; browsers match the `__Secure-` / `__Host-`
//!   prefixes case-insensitively (RFC 6265bis) and drop such a cookie over http, so every login
//!   "succeeded" without a session.
//!
//! The other tests are guards: attacks the proxy already refused, not tested before.
//!
//! Run: `cargo test --all-features --test proxy_csrf_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_ws;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::forward::WebSocketRoute;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The headers of a write as the SPA sends it, with `extra` after them.
fn write_headers<'a>(login: &'a Login, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        ("cookie", login.cookie.as_str()),
        ("x-csrf-token", login.csrf.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    headers
}

/// A POST to `/api/items` with `headers`; the answer.
async fn post_items(h: &Harness, headers: &[(&str, &str)]) -> Reply {
    send(h.addr, Method::POST, "/api/items", headers, "{}").await
}

fn assert_csrf(r: &Reply, what: &str) {
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.text());
    assert_eq!(r.error_code(), "csrf", "{what}");
}

// ---------------------------------------------------------------------------------------------
// Defect: Origin: null from a same-origin page under Referrer-Policy: no-referrer
// ---------------------------------------------------------------------------------------------

/// Fetch ("append a request `Origin` header", step 3) serializes the origin of a non-CORS
/// request that is neither GET nor HEAD as `null` when the page's referrer policy is
/// `no-referrer`; same-origin requests are non-CORS. Chromium and Firefox do so (the Rails,
/// qBittorrent and better-auth reports of the same breakage). `Sec-Fetch-Site: same-origin`,
/// which no page can set, still says where the request comes from: with it, `null` is the
/// browser declining to name the origin, not a foreign one. The token is still required.
#[tokio::test]
async fn a_same_origin_write_under_a_no_referrer_policy_is_accepted() {
    let h = Harness::start_with(HarnessOptions {
        // The policy the operator chose (accepted at load): the page the proxy serves gets it.
        tweak: Box::new(|s, _| {
            s.response_headers = countersign::proxy::response_headers::ResponseHeaderRules::new()
                .set("Referrer-Policy", "no-referrer", false)
                .expect("no-referrer is a valid Referrer-Policy");
        }),
        ..Default::default()
    })
    .await;
    let no_referrer = [("origin", "null"), ("sec-fetch-site", "same-origin")];

    // Login from that page.
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(&no_referrer);
    let r = send(h.addr, Method::POST, "/auth/login", &headers, body).await;
    assert_eq!(r.status, StatusCode::OK, "login: {}", r.text());
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
    let login = r.login();

    // A write.
    let before = h.upstream.raw_count();
    let r = post_items(&h, &write_headers(&login, &no_referrer)).await;
    assert_eq!(r.status, StatusCode::OK, "write: {}", r.text());
    assert_eq!(h.upstream.raw_count(), before + 1);

    // Still refused: `null` without the browser's same-origin word, or with another; `null`
    // with it but without the token; `null` twice.
    for (what, extra) in [
        ("null alone", vec![("origin", "null")]),
        (
            "null, cross-site",
            vec![("origin", "null"), ("sec-fetch-site", "cross-site")],
        ),
        (
            "null, same-site",
            vec![("origin", "null"), ("sec-fetch-site", "same-site")],
        ),
        (
            "null twice",
            vec![
                ("origin", "null"),
                ("origin", "null"),
                ("sec-fetch-site", "same-origin"),
            ],
        ),
    ] {
        assert_csrf(&post_items(&h, &write_headers(&login, &extra)).await, what);
    }
    let r = post_items(
        &h,
        &[
            ("cookie", &login.cookie),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
        ],
    )
    .await;
    assert_csrf(&r, "null, same-origin, no token");
    assert_eq!(
        h.upstream.raw_count(),
        before + 1,
        "no refused write went up"
    );

    // Logout from that page.
    let mut headers = vec![
        ("cookie", login.cookie.as_str()),
        ("x-csrf-token", login.csrf.as_str()),
    ];
    headers.extend_from_slice(&no_referrer);
    let r = send(h.addr, Method::POST, "/auth/logout", &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "logout: {}", r.text());
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Login from a page with an opaque origin (a sandboxed frame, a `data:` page): `null`
/// without `Sec-Fetch-Site: same-origin` stays refused, so no foreign page logs the browser in.
#[tokio::test]
async fn login_with_origin_null_from_an_opaque_page_is_refused() {
    let h = Harness::start().await;
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    for extra in [
        vec![("origin", "null")],
        vec![("origin", "null"), ("sec-fetch-site", "cross-site")],
    ] {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(&extra);
        let r = send(h.addr, Method::POST, "/auth/login", &headers, body.clone()).await;
        assert_csrf(&r, &format!("{extra:?}"));
        assert!(r.set_cookie().is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// Defect: credentialed cross-origin reads
// ---------------------------------------------------------------------------------------------

/// A page on a sibling origin of the same site (`http://app.test:8081` here; a sibling
/// subdomain in production) gets the `SameSite=Strict` cookie sent with its
/// `fetch(url, {credentials: "include"})`. A GET needs no preflight, so the read went to the
/// API signed as the victim, and only the API's CORS headers (passed through) decided whether
/// the page could read the answer. Browsers send `Origin` on a GET only for a CORS request,
/// i.e. a cross-origin one (never for the SPA's own same-origin reads, nor navigations): a
/// foreign `Origin` on a session route is refused before the session is looked up.
#[tokio::test]
async fn a_credentialed_cross_origin_read_never_reaches_the_api() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let before = h.upstream.raw_count();
    let idle_before = get(h.addr, "/auth/session?touch=false", &login)
        .await
        .json()["expires_at"]
        .as_u64()
        .unwrap();
    h.clock.advance(30);
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        for (what, origin, site) in [
            ("sibling port", "http://app.test:8081", "same-site"),
            ("sibling subdomain", "http://evil.app.test", "same-site"),
            ("other site", "http://evil.test", "cross-site"),
            ("opaque", "null", "cross-site"),
        ] {
            let r = send(
                h.addr,
                method.clone(),
                "/api/items",
                &[
                    ("cookie", &login.cookie),
                    ("origin", origin),
                    ("sec-fetch-site", site),
                    ("sec-fetch-mode", "cors"),
                ],
                Bytes::new(),
            )
            .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {what}");
            assert!(r.headers.get("access-control-allow-origin").is_none());
        }
    }
    assert_eq!(h.upstream.raw_count(), before, "nothing reached the API");
    // The refused reads did not extend the session either.
    let idle_after = get(h.addr, "/auth/session?touch=false", &login)
        .await
        .json()["expires_at"]
        .as_u64()
        .unwrap();
    assert_eq!(idle_after, idle_before);

    // The SPA's own reads: no Origin (what browsers send on a same-origin GET), or its own.
    let r = get(h.addr, "/api/items", &login).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        h.addr,
        Method::GET,
        "/api/items",
        &[
            ("cookie", &login.cookie),
            ("origin", ORIGIN),
            ("sec-fetch-site", "same-origin"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // A navigation from another site (no Origin on a GET navigation) is not refused as CSRF:
    // it has no cookie (SameSite=Strict) and is answered as any request without a session.
    let r = send(
        h.addr,
        Method::GET,
        "/api/items",
        &[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// The same read of `/auth/session` (which carries the CSRF token) is refused too, and does
/// not extend the session; the proxy's answers never carry CORS headers.
#[tokio::test]
async fn a_credentialed_cross_origin_session_read_is_refused() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let idle_before = get(h.addr, "/auth/session?touch=false", &login)
        .await
        .json()["expires_at"]
        .as_u64()
        .unwrap();
    h.clock.advance(30);
    let r = send(
        h.addr,
        Method::GET,
        "/auth/session",
        &[
            ("cookie", &login.cookie),
            ("origin", "http://app.test:8081"),
            ("sec-fetch-site", "same-site"),
        ],
        Bytes::new(),
    )
    .await;
    assert_csrf(&r, "sibling origin reading /auth/session");
    assert!(!r.text().contains(&login.csrf));
    assert!(r.headers.get("access-control-allow-origin").is_none());
    let idle_after = get(h.addr, "/auth/session?touch=false", &login)
        .await
        .json()["expires_at"]
        .as_u64()
        .unwrap();
    assert_eq!(idle_after, idle_before);
}

/// Public routes (`auth = "none"`) carry no identity: a cross-origin read of them is left to
/// the API, as before.
#[tokio::test]
async fn a_cross_origin_read_of_a_public_route_still_passes() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, upstream| {
            let mut public = route("public", "/public/", &upstream.url());
            public.auth_required = false;
            s.routes.push(public);
        }),
        ..Default::default()
    })
    .await;
    let r = send(
        h.addr,
        Method::GET,
        "/public/x",
        &[
            ("origin", "http://evil.test"),
            ("sec-fetch-site", "cross-site"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Defect: cookie names browsers refuse
// ---------------------------------------------------------------------------------------------

const KEYS: &str = r#"
active = "k1"
[[keys]]
id = "k1"
secret = "h59GLzUrs3uWiUgd7VLeMk5ILui23cAztIiaCFYN708="
"#;

fn load_with_cookie_name(name: &str, origin: &str) -> Result<ProxyConfig, String> {
    let dir = temp_dir("csrf-qa-cookie");
    std::fs::write(dir.join("keys.toml"), KEYS).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"{origin}\"\n\n\
         [auth]\nusers_file = \"users.toml\"\n\n[signing]\nkeyring = \"keys.toml\"\n\n\
         [session]\ncookie_name = \"{name}\"\n\n\
         [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n"
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    ProxyConfig::load(&path).map_err(|e| e.to_string())
}

/// RFC 6265bis §5.7: a cookie whose name starts with a case-insensitive match of `__Secure-`
/// or `__Host-` is dropped unless it is `Secure` (and, for `__Host-`, `Path=/` without
/// `Domain`). Over http the proxy's cookie is not `Secure`: `__secure-sid` is never stored and
/// every login looks successful but leaves no session. Over https the proxy adds `__Host-`,
/// which would give `__Host-__HOST-sid`. Such names are refused at load as `__Host-sid` is.
#[test]
fn cookie_names_the_browser_would_refuse_are_refused_at_load() {
    for origin in ["http://localhost:8080", "https://app.example.com"] {
        for name in ["__secure-sid", "__HOST-sid", "__host-sid", "__SECURE-x"] {
            let error = load_with_cookie_name(name, origin).expect_err(name);
            assert!(error.contains("session.cookie_name"), "{name}: {error}");
        }
        // Not a prefix (no trailing dash, or not at the start): fine.
        for name in ["__hostsid", "sid__Host-", "_Host-sid"] {
            let config = load_with_cookie_name(name, origin).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(config.session.cookie_name, name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guards: methods
// ---------------------------------------------------------------------------------------------

/// Only GET, HEAD and OPTIONS are safe. TRACE, WebDAV methods, an unknown extension method
/// and a lower-case `post` (methods are case-sensitive: `post` is not `POST`, and an upstream
/// may still treat it as one) need the token and the origin like any write, and nothing goes
/// upstream without them.
#[tokio::test]
async fn every_method_but_get_head_options_needs_the_token() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let before = h.upstream.raw_count();
    for name in [
        "POST", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND", "MKCOL", "LOCK", "QUERY", "FOO",
        "post", "get", "Get",
    ] {
        let method = Method::from_bytes(name.as_bytes()).unwrap();
        let r = send(
            h.addr,
            method.clone(),
            "/api/items",
            &[("cookie", &login.cookie), ("origin", ORIGIN)],
            Bytes::new(),
        )
        .await;
        assert_csrf(&r, &format!("{name} without a token"));
        let r = send(
            h.addr,
            method,
            "/api/items",
            &[
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("origin", "http://evil.test"),
            ],
            Bytes::new(),
        )
        .await;
        assert_csrf(&r, &format!("{name} from another origin"));
    }
    assert_eq!(h.upstream.raw_count(), before);
    // With both, an extension method goes through (signed as the user).
    let r = send(
        h.addr,
        Method::from_bytes(b"PROPFIND").unwrap(),
        "/api/items",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.raw_count(), before + 1);
}

/// HTTP/2 carries the method in `:method`: a lower-case `post` there is no more safe than
/// over HTTP/1.1.
#[tokio::test]
async fn a_lower_case_method_over_http2_needs_the_token() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut sender = support_h2::h2c(h.addr).await;
    let before = h.upstream.raw_count();
    for name in ["post", "delete", "PATCH"] {
        let request = http::Request::builder()
            .method(Method::from_bytes(name.as_bytes()).unwrap())
            .uri(format!("http://{}/api/items", h.addr))
            .header("cookie", &login.cookie)
            .header("origin", ORIGIN)
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = sender.send_request(request).await.expect("answer");
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "h2 {name}");
    }
    assert_eq!(h.upstream.raw_count(), before);
}

// ---------------------------------------------------------------------------------------------
// Guards: Origin and Sec-Fetch-Site on writes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn origin_variants_on_a_write() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let before = h.upstream.raw_count();
    let refused: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("null", vec![("origin", "null")]),
        (
            "https instead of http",
            vec![("origin", "https://app.test")],
        ),
        ("another port", vec![("origin", "http://app.test:8080")]),
        (
            "explicit default port",
            vec![("origin", "http://app.test:80")],
        ),
        ("trailing slash", vec![("origin", "http://app.test/")]),
        ("with a path", vec![("origin", "http://app.test/spa")]),
        (
            "sibling subdomain",
            vec![("origin", "http://evil.app.test")],
        ),
        ("suffix", vec![("origin", "http://app.test.evil.test")]),
        ("user info", vec![("origin", "http://x@app.test")]),
        ("empty", vec![("origin", "")]),
        ("IDN look-alike", vec![("origin", "http://xn--pp-8ba.test")]),
        (
            "two, first ours",
            vec![("origin", ORIGIN), ("origin", "http://evil.test")],
        ),
        (
            "two, both ours",
            vec![("origin", ORIGIN), ("origin", ORIGIN)],
        ),
        (
            "comma list",
            vec![("origin", "http://app.test, http://evil.test")],
        ),
        (
            "same-site",
            vec![("origin", ORIGIN), ("sec-fetch-site", "same-site")],
        ),
        ("cross-site", vec![("sec-fetch-site", "cross-site")]),
        ("user-initiated", vec![("sec-fetch-site", "none")]),
        (
            "upper-case site word",
            vec![("sec-fetch-site", "Same-Origin")],
        ),
        (
            "two site words",
            vec![
                ("sec-fetch-site", "same-origin"),
                ("sec-fetch-site", "cross-site"),
            ],
        ),
    ];
    for (what, extra) in refused {
        assert_csrf(&post_items(&h, &write_headers(&login, &extra)).await, what);
    }
    assert_eq!(h.upstream.raw_count(), before);
    // Scheme and host compare case-insensitively; no Origin at all (older browsers) is left to
    // the token.
    for extra in [
        vec![("origin", "HTTP://APP.TEST")],
        vec![],
        vec![("sec-fetch-site", "same-origin")],
    ] {
        let r = post_items(&h, &write_headers(&login, &extra)).await;
        assert_eq!(r.status, StatusCode::OK, "{extra:?}: {}", r.text());
    }
}

/// With an https public origin, an `http://` page of the same host is another origin.
#[tokio::test]
async fn an_http_page_cannot_write_to_an_https_origin() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.https = true;
            s.origins = vec!["https://app.test".to_owned()];
        }),
        ..Default::default()
    })
    .await;
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", "http://app.test"),
        ],
        body.clone(),
    )
    .await;
    assert_csrf(&r, "login from http://");
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", "https://app.test"),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let login = r.login();
    let r = post_items(&h, &write_headers(&login, &[("origin", "http://app.test")])).await;
    assert_csrf(&r, "write from http://");
}

// ---------------------------------------------------------------------------------------------
// Guards: the token
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_variants_on_a_write() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let other = h.login("bob", BOB_PASSWORD).await;
    let before = h.upstream.raw_count();
    let with_padding = format!("{}=", login.csrf);
    let truncated = login.csrf[..42].to_owned();
    let comma = format!("{}, {}", login.csrf, login.csrf);
    let upper = login.csrf.to_ascii_uppercase();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("missing", vec![]),
        ("empty", vec![""]),
        ("another session's", vec![other.csrf.as_str()]),
        (
            "the session id",
            vec![login.cookie.split('=').nth(1).unwrap()],
        ),
        ("padded", vec![with_padding.as_str()]),
        ("truncated", vec![truncated.as_str()]),
        ("comma-joined twice", vec![comma.as_str()]),
        (
            "two lines, both right",
            vec![login.csrf.as_str(), login.csrf.as_str()],
        ),
        (
            "two lines, one right",
            vec![other.csrf.as_str(), login.csrf.as_str()],
        ),
        ("upper-cased", vec![upper.as_str()]),
    ];
    for (what, tokens) in cases {
        let mut headers = vec![
            ("cookie", login.cookie.as_str()),
            ("origin", ORIGIN),
            ("content-type", "application/json"),
        ];
        headers.extend(tokens.iter().map(|t| ("x-csrf-token", *t)));
        assert_csrf(&post_items(&h, &headers).await, what);
    }
    assert_eq!(h.upstream.raw_count(), before);
    // The right one passes, and the API never sees it.
    let r = post_items(&h, &write_headers(&login, &[("origin", ORIGIN)])).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(h.upstream.last_raw().headers.get("x-csrf-token").is_none());
}

/// A login gives a new token: the previous session's no longer works with the new cookie,
/// nor the new one with the old cookie.
#[tokio::test]
async fn a_token_is_bound_to_its_session_across_logins() {
    let h = Harness::start().await;
    let first = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", ORIGIN),
            ("cookie", &first.cookie),
        ],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let second = r.login();
    assert_ne!(second.csrf, first.csrf);
    let mixed = Login {
        cookie: second.cookie.clone(),
        csrf: first.csrf.clone(),
    };
    assert_csrf(
        &post_items(&h, &write_headers(&mixed, &[("origin", ORIGIN)])).await,
        "old token, new cookie",
    );
    let r = post_items(&h, &write_headers(&first, &[("origin", ORIGIN)])).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "old cookie");
}

// ---------------------------------------------------------------------------------------------
// Guards: login CSRF and session fixation
// ---------------------------------------------------------------------------------------------

/// A cross-site form cannot log the victim into the attacker's account: a form cannot send
/// JSON (415, nothing read), and a `fetch` that can is refused on its origin.
#[tokio::test]
async fn login_csrf_is_refused() {
    let h = Harness::start().await;
    let body = serde_json::json!({ "username": "bob", "password": BOB_PASSWORD }).to_string();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, StatusCode);
    let cases: Vec<Case> = vec![
        (
            "text/plain form",
            vec![
                ("content-type", "text/plain"),
                ("origin", "http://evil.test"),
            ],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "urlencoded form",
            vec![("content-type", "application/x-www-form-urlencoded")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "multipart form",
            vec![("content-type", "multipart/form-data; boundary=x")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "text/plain claiming json in a parameter",
            vec![("content-type", "text/plain; application/json")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "json from a sibling",
            vec![
                ("content-type", "application/json"),
                ("origin", "http://evil.app.test"),
                ("sec-fetch-site", "same-site"),
            ],
            StatusCode::FORBIDDEN,
        ),
        (
            "json, cross-site, no Origin",
            vec![
                ("content-type", "application/json"),
                ("sec-fetch-site", "cross-site"),
            ],
            StatusCode::FORBIDDEN,
        ),
    ];
    for (what, headers, status) in cases {
        let r = send(h.addr, Method::POST, "/auth/login", &headers, body.clone()).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(r.set_cookie().is_none(), "{what}");
    }
    // The proxy grants no CORS preflight on its own endpoints.
    let r = send(
        h.addr,
        Method::OPTIONS,
        "/auth/login",
        &[
            ("origin", "http://evil.test"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers.get("access-control-allow-origin").is_none());
}

/// Session fixation: an id planted in the browser (over plain http a sibling can toss one) is
/// never adopted: the login issues a fresh one, the planted one stays unknown, and a session
/// the browser had before the login ends (for the API and for WebSockets).
#[tokio::test]
async fn login_never_adopts_a_planted_id_and_ends_the_previous_session() {
    let planted = "A".repeat(42) + "A";
    let h = Harness::start().await;
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", ORIGIN),
            ("cookie", &format!("countersign_session={planted}")),
        ],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let login = r.login();
    assert_ne!(login.cookie, format!("countersign_session={planted}"));
    let fixed = Login {
        cookie: format!("countersign_session={planted}"),
        csrf: login.csrf.clone(),
    };
    assert_eq!(
        get(h.addr, "/auth/session", &fixed).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/api/items", &fixed).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A failed login keeps the browser's session (nothing was replaced).
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", ORIGIN),
            ("cookie", &login.cookie),
        ],
        serde_json::json!({ "username": "alice", "password": "wrong" }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.set_cookie().is_none());
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Guards: logout and the cookie's attributes
// ---------------------------------------------------------------------------------------------

fn attributes(set_cookie: &str) -> Vec<String> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect()
}

/// Over https: `__Host-` name, `Secure`, `Path=/`, no `Domain`, `HttpOnly`, `SameSite=Strict`,
/// `Max-Age` the absolute timeout; the logout's clearing cookie has the same name and
/// attributes (a browser only replaces a cookie of the same name, path and domain, and
/// refuses a `__Host-` one without `Secure`), with `Max-Age=0`.
#[tokio::test]
async fn the_https_cookie_and_its_clearing_have_the_same_attributes() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.https = true;
            s.origins = vec!["https://app.test".to_owned()];
        }),
        ..Default::default()
    })
    .await;
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", "https://app.test"),
        ],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let set = r.set_cookie().unwrap();
    assert!(set.starts_with("__Host-countersign_session="), "{set}");
    let login = r.login();
    let mut attrs = attributes(&set);
    attrs.sort();
    let max_age = format!("max-age={}", ABSOLUTE.as_secs());
    let mut wanted = vec![
        "httponly".to_owned(),
        max_age,
        "path=/".to_owned(),
        "samesite=strict".to_owned(),
        "secure".to_owned(),
    ];
    wanted.sort();
    assert_eq!(attrs, wanted, "{set}");

    let r = send(
        h.addr,
        Method::POST,
        "/auth/logout",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", "https://app.test"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let cleared = r.set_cookie().unwrap();
    assert!(
        cleared.starts_with("__Host-countersign_session=;"),
        "{cleared}"
    );
    let mut attrs = attributes(&cleared);
    attrs.sort();
    let mut wanted = vec![
        "httponly".to_owned(),
        "max-age=0".to_owned(),
        "path=/".to_owned(),
        "samesite=strict".to_owned(),
        "secure".to_owned(),
    ];
    wanted.sort();
    assert_eq!(attrs, wanted, "{cleared}");
    // The old cookie is dead server-side, whatever the browser does with the clearing.
    assert_eq!(
        get(h.addr, "/api/items", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Logout is a write: GET is 405; a cross-site form (no token), a sibling origin, and
/// `Sec-Fetch-Site: cross-site` are refused and end nothing.
#[tokio::test]
async fn forged_logouts_end_nothing() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::GET,
        "/auth/logout",
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    for (what, extra) in [
        (
            "form, no token",
            vec![
                ("origin", "http://evil.test"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        ),
        (
            "sibling with the token",
            vec![
                ("origin", "http://evil.app.test"),
                ("x-csrf-token", login.csrf.as_str()),
            ],
        ),
        (
            "cross-site with the token",
            vec![
                ("sec-fetch-site", "cross-site"),
                ("x-csrf-token", login.csrf.as_str()),
            ],
        ),
        ("same origin, no token", vec![("origin", ORIGIN)]),
        (
            "same origin, empty token",
            vec![("origin", ORIGIN), ("x-csrf-token", "")],
        ),
    ] {
        let mut headers = vec![("cookie", login.cookie.as_str())];
        headers.extend_from_slice(&extra);
        let r = send(
            h.addr,
            Method::POST,
            "/auth/logout?all=true",
            &headers,
            Bytes::new(),
        )
        .await;
        assert_csrf(&r, what);
        assert!(r.set_cookie().is_none(), "{what}");
    }
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Guards: the WebSocket handshake (cross-site WebSocket hijacking)
// ---------------------------------------------------------------------------------------------

/// A handshake with `extra` header lines on a new connection; the status and the body.
async fn handshake(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Refusals are short answers with a length; read until the head and that many bytes.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                if head.starts_with("HTTP/1.1 101") {
                    return;
                }
                let length = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                });
                if length.is_some_and(|len| body.len() >= len) {
                    return;
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn cross_site_websocket_hijacking_is_refused() {
    let (upstream, mut upgraded) = support_ws::raw_ws_upstream(|_| vec![]).await;
    let limits = WebSocketRoute::new(Duration::from_secs(30), Duration::from_secs(30), 100);
    let h = support_ws::harness_with_ws_route(upstream, limits).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let cookie = format!("Cookie: {}\r\n", login.cookie);
    let cases: Vec<(&str, String)> = vec![
        ("no Origin", cookie.clone()),
        ("Origin null", format!("{cookie}Origin: null\r\n")),
        (
            "Origin null, same-origin",
            format!("{cookie}Origin: null\r\nSec-Fetch-Site: same-origin\r\n"),
        ),
        (
            "sibling subdomain (cookie sent)",
            format!("{cookie}Origin: http://evil.app.test\r\n"),
        ),
        (
            "sibling port (cookie sent)",
            format!("{cookie}Origin: http://app.test:8081\r\n"),
        ),
        (
            "https page",
            format!("{cookie}Origin: https://app.test\r\n"),
        ),
        (
            "two Origins",
            format!("{cookie}Origin: {ORIGIN}\r\nOrigin: http://evil.test\r\n"),
        ),
        (
            "right Origin, cross-site",
            format!("{cookie}Origin: {ORIGIN}\r\nSec-Fetch-Site: cross-site\r\n"),
        ),
    ];
    for (what, extra) in cases {
        let (status, text) = handshake(h.addr, "/ws/x", &extra).await;
        assert_eq!(status, 403, "{what}: {text}");
        assert!(text.contains("\"csrf\""), "{what}: {text}");
    }
    // No session: 401, and the old cookie after a logout too.
    let (status, _) = handshake(h.addr, "/ws/x", &format!("Origin: {ORIGIN}\r\n")).await;
    assert_eq!(status, 401);
    assert!(upgraded.try_recv().is_err(), "nothing was upgraded");

    // The page's own handshake needs no token (browsers cannot add one): 101.
    let (status, text) = handshake(
        h.addr,
        "/ws/x",
        &format!("{cookie}Origin: {ORIGIN}\r\nSec-Fetch-Site: same-origin\r\n"),
    )
    .await;
    assert_eq!(status, 101, "{text}");

    assert_eq!(logout(h.addr, &login).await.status, StatusCode::NO_CONTENT);
    let (status, _) = handshake(h.addr, "/ws/x", &format!("{cookie}Origin: {ORIGIN}\r\n")).await;
    assert_eq!(status, 401, "the logged-out cookie opens no WebSocket");
}

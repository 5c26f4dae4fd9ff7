//! Sign-and-forward: identity, header hygiene, CSRF, limits, upstream failures, streaming.
//! Run: `cargo test --all-features --test proxy_forward`.
#![cfg(feature = "proxy")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;
use support::*;

#[tokio::test]
async fn upstream_gets_a_valid_signature_with_the_session_identity() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = get(h.addr, "/api/items?x=1", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The upstream's VerifyLayer accepted the signature and extracted this identity.
    let seen = h.upstream.last_verified();
    assert_eq!(seen.identity.user.as_deref(), Some("alice"));
    assert_eq!(
        seen.identity.roles,
        vec!["admin".to_owned(), "ops team".to_owned()]
    );
    assert_eq!(seen.identity.keyid, "k1");
    assert_eq!(seen.uri, "/api/items?x=1");
    let raw = h.upstream.last_raw();
    assert_eq!(raw.headers["host"], h.upstream.addr.to_string().as_str());
    assert_eq!(raw.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(raw.headers["x-forwarded-proto"], "http");
    assert_eq!(raw.headers["x-forwarded-host"], "app.test");
    assert!(raw.headers.contains_key("signature") && raw.headers.contains_key("signature-input"));
    // The request id reached the upstream and came back to the client.
    assert_eq!(raw.headers["x-request-id"], r.headers["x-request-id"]);
    let metrics = h.proxy().state().metrics().render(None, &[]);
    assert!(
        metrics.contains("countersign_signatures_issued_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn spoofed_identity_signature_and_cookies_never_arrive() {
    let h = Harness::start().await;
    let login = h.login("bob", BOB_PASSWORD).await;
    let cookie = format!("theme=dark; {}; other=1", login.cookie);
    let r = send(
        h.addr,
        Method::GET,
        "/api/items",
        &[
            ("cookie", &cookie),
            ("x-auth-user", "alice"),
            ("x-auth-roles", "admin"),
            ("signature", "countersign=:AAAA:"),
            ("signature-input", "countersign=();created=1"),
            ("content-digest", "sha-256=:AAAA:"),
            ("x-csrf-token", &login.csrf),
            ("x-forwarded-for", "10.9.8.7"),
            ("forwarded", "for=10.9.8.7"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("authorization", "Bearer browser-chosen"),
            ("x-real-ip", "10.9.8.7"),
            ("true-client-ip", "10.9.8.7"),
            ("x-forwarded-port", "8443"),
            ("x-original-url", "/api/admin"),
            ("x-rewrite-url", "/api/admin"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = h.upstream.last_verified();
    assert_eq!(
        seen.identity.user.as_deref(),
        Some("bob"),
        "the session decides, not the browser"
    );
    assert!(seen.identity.roles.is_empty());
    let raw = h.upstream.last_raw();
    assert_eq!(raw.headers["x-auth-user"], "bob");
    assert!(
        raw.headers.get("x-auth-roles").is_none(),
        "bob has no roles"
    );
    assert!(
        raw.headers.get("cookie").is_none(),
        "cookies are not forwarded by default"
    );
    assert!(raw.headers.get("x-csrf-token").is_none());
    assert!(raw.headers.get("forwarded").is_none());
    for name in [
        "proxy-authorization",
        "authorization",
        "x-real-ip",
        "true-client-ip",
        "x-forwarded-port",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(raw.headers.get(name).is_none(), "{name} arrived");
    }
    assert_eq!(raw.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(raw.headers.get_all("signature").iter().count(), 1);
    assert!(!raw.headers["signature"].to_str().unwrap().contains("AAAA"));
    // Nothing of the session id anywhere in what the upstream saw.
    let session_id = login.cookie.split_once('=').unwrap().1;
    for (name, value) in &raw.headers {
        assert!(
            !value.to_str().unwrap_or("").contains(session_id),
            "{name} carries the session id"
        );
    }
}

#[tokio::test]
async fn forward_cookies_keeps_other_cookies_byte_for_byte_but_never_the_session() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.routes[0].forward_cookies = true),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let cookie = format!("theme=dark; {}; lang=en", login.cookie);
    let r = send(
        h.addr,
        Method::GET,
        "/api/x",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        h.upstream.last_raw().headers["cookie"],
        "theme=dark; lang=en"
    );
    // Another application's cookie with a UTF-8 value (browsers send such values as they
    // were set) neither hides the session cookie nor gets lost: byte for byte upstream.
    let cookie = format!("theme=café; {}; lang=en", login.cookie);
    let r = send(
        h.addr,
        Method::GET,
        "/api/x",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        h.upstream.last_verified().identity.user.as_deref(),
        Some("alice")
    );
    assert_eq!(
        h.upstream.last_raw().headers["cookie"].as_bytes(),
        "theme=café; lang=en".as_bytes()
    );
}

#[tokio::test]
async fn required_route_without_session_is_401_and_never_forwarded() {
    let h = Harness::start().await;
    let r = send(h.addr, Method::GET, "/api/x", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.text(), r#"{"error":"unauthenticated"}"#);
    assert!(r.headers.get("location").is_none(), "never a redirect");
    assert_eq!(h.upstream.raw_count(), 0);
}

#[tokio::test]
async fn public_route_is_signed_without_identity() {
    let h = Harness::start_with_public_route("public", "/public/").await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = get(h.addr, "/public/info", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = h.upstream.last_verified();
    assert_eq!(seen.identity.user, None);
    let anonymous = send(
        h.addr,
        Method::POST,
        "/public/info",
        &[("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::OK, "{}", anonymous.text());
    assert_eq!(h.upstream.last_verified().body, Bytes::from_static(b"{}"));
}

#[tokio::test]
async fn every_csrf_rejection_is_403_and_the_upstream_sees_nothing() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let other = h.login("bob", BOB_PASSWORD).await;
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no token", vec![("cookie", &login.cookie)]),
        (
            "wrong token",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", "x".repeat(43).leak()),
            ],
        ),
        (
            "another session's token",
            vec![("cookie", &login.cookie), ("x-csrf-token", &other.csrf)],
        ),
        (
            "two tokens",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("x-csrf-token", &login.csrf),
            ],
        ),
        (
            "foreign origin",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("origin", "http://evil.test"),
            ],
        ),
        (
            "null origin",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("origin", "null"),
            ],
        ),
        (
            "cross-site fetch",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("sec-fetch-site", "cross-site"),
            ],
        ),
        (
            "same-site fetch",
            vec![
                ("cookie", &login.cookie),
                ("x-csrf-token", &login.csrf),
                ("sec-fetch-site", "same-site"),
            ],
        ),
        // A cross-site form: SameSite=Strict means no cookie arrives; still a CSRF refusal.
        (
            "cross-site form without cookie",
            vec![("origin", "http://evil.test")],
        ),
    ];
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        for (what, headers) in &cases {
            let r = send(
                h.addr,
                method.clone(),
                "/api/notes",
                headers,
                "{\"text\":\"x\"}",
            )
            .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {what}");
            assert_eq!(r.text(), r#"{"error":"csrf"}"#, "{method} {what}");
        }
    }
    assert_eq!(
        h.upstream.raw_count(),
        0,
        "no refused request reached the upstream"
    );
    // The session was not extended by the refused requests, and still works.
    let r = get(h.addr, "/auth/session?touch=false", &login).await;
    assert_eq!(r.json()["expires_at"], T0 + IDLE.as_secs());

    // The same request done right goes through, with the body signed and verified.
    let ok = send(
        h.addr,
        Method::POST,
        "/api/notes",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
            ("sec-fetch-site", "same-origin"),
        ],
        "{\"text\":\"x\"}",
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(h.upstream.raw_count(), 1);
    assert_eq!(
        h.upstream.last_verified().body,
        Bytes::from_static(b"{\"text\":\"x\"}")
    );
    // Safe methods need no token.
    assert_eq!(
        get(h.addr, "/api/notes", &login).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413_before_any_upstream_contact() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let big = vec![b'a'; 64 * 1024 + 1];
    // Declared length over the limit.
    let r = post_json(
        h.addr,
        "/api/upload",
        &login,
        std::str::from_utf8(&big).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.text(), r#"{"error":"body_too_large"}"#);
    // Chunked, no declared length: stopped while reading.
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: x\r\ncookie: {}\r\nx-csrf-token: {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        login.cookie, login.csrf
    );
    let mut request = head.into_bytes();
    for _ in 0..80 {
        request.extend_from_slice(b"400\r\n");
        request.extend_from_slice(&[b'b'; 0x400]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(h.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#"{"error":"body_too_large"}"#), "{answer}");
    assert_eq!(h.upstream.raw_count(), 0);
    // Exactly at the limit is fine.
    let ok = post_json(
        h.addr,
        "/api/upload",
        &login,
        std::str::from_utf8(&big[1..]).unwrap(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(h.upstream.last_verified().body.len(), 64 * 1024);
}

#[tokio::test]
async fn refused_upstream_is_502() {
    let (_refusing, dead) = refusing_addr();
    let dead = format!("http://{dead}");
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("dead", "/dead/", &dead)],
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = get(h.addr, "/dead/x", &login).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.text(), r#"{"error":"bad_gateway"}"#);
    let metrics = h.proxy().state().metrics().render(None, &[]);
    assert!(
        metrics.contains("countersign_upstream_errors_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"upstream/dead\",status=\"502\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.routes[0].timeout = Duration::from_millis(300)),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let started = std::time::Instant::now();
    // The upstream would answer after 20 s: only the 300 ms route timeout answers within the
    // bound below (the rest of which is slack for a loaded machine).
    let r = get(h.addr, "/api/slow?ms=20000", &login).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.text(), r#"{"error":"gateway_timeout"}"#);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test]
async fn request_ids_are_kept_when_well_formed_and_replaced_otherwise() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::GET,
        "/api/x",
        &[("cookie", &login.cookie), ("x-request-id", "trace-123.A_b")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "trace-123.A_b");
    assert_eq!(
        h.upstream.last_raw().headers["x-request-id"],
        "trace-123.A_b"
    );
    let long = "a".repeat(129);
    for bad in ["has space", "semi;colon", long.as_str()] {
        let r = send(
            h.addr,
            Method::GET,
            "/api/x",
            &[("cookie", &login.cookie), ("x-request-id", bad)],
            Bytes::new(),
        )
        .await;
        let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, bad);
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        );
        assert_eq!(h.upstream.last_raw().headers["x-request-id"], id.as_str());
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::GET,
        "/api/hop",
        &[
            ("cookie", &login.cookie),
            ("connection", "x-client-hop, keep-alive"),
            ("x-client-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-client-kept", "1"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let raw = h.upstream.last_raw();
    assert!(raw.headers.get("x-client-hop").is_none());
    assert!(raw.headers.get("te").is_none());
    assert!(raw.headers.get("keep-alive").is_none());
    assert_eq!(raw.headers["x-client-kept"], "1");
    assert!(r.headers.get("x-upstream-hop").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("proxy-authenticate").is_none());
    assert_eq!(r.headers["x-upstream-kept"], "1");
}

#[tokio::test]
async fn longest_prefix_wins_and_strip_prefix_rewrites() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            let mut admin = route("admin", "/api/admin/", &format!("{}/v2", up.url()));
            admin.strip_prefix = true;
            s.routes.push(admin);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(
        get(h.addr, "/api/admin/users?id=3", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(h.upstream.last_verified().uri, "/v2/users?id=3");
    assert_eq!(
        get(h.addr, "/api/other", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(h.upstream.last_verified().uri, "/api/other");
    let metrics = h.proxy().state().metrics().render(None, &[]);
    assert!(
        metrics.contains("route=\"upstream/admin\",status=\"200\"} 1"),
        "{metrics}"
    );
    // No route, no static site: 404.
    let r = get(h.addr, "/elsewhere", &login).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "not_found");
}

#[tokio::test]
async fn websocket_upgrades_are_refused_with_501() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::GET,
        "/api/ws",
        &[
            ("cookie", &login.cookie),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(r.text(), r#"{"error":"websocket_unsupported"}"#);
    assert_eq!(h.upstream.raw_count(), 0);
    // An h2c upgrade offer (curl --http2 over http://) is declined by answering in HTTP/1.1.
    let r = send(
        h.addr,
        Method::GET,
        "/api/x",
        &[
            ("cookie", &login.cookie),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let raw = h.upstream.last_raw();
    assert!(raw.headers.get("upgrade").is_none() && raw.headers.get("http2-settings").is_none());
}

/// RFC 9110 §7.8: `Upgrade` asks for a protocol switch only beside `Connection: upgrade`, and a
/// server ignores it in an HTTP/1.0 request. Such a request is an ordinary one: forwarded
/// (without the hop-by-hop field) and answered, not refused as an upgrade; the connection then
/// serves the next request.
#[tokio::test]
async fn an_upgrade_field_without_connection_upgrade_or_over_http_1_0_is_ignored() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = send(
        h.addr,
        Method::GET,
        "/api/stray",
        &[("cookie", &login.cookie), ("upgrade", "websocket")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.raw_count(), 1);
    let raw = h.upstream.last_raw();
    assert!(raw.headers.get("upgrade").is_none(), "{:?}", raw.headers);
    // HTTP/1.0, `Connection: upgrade` or not, and then a second request on the connection.
    let request = format!(
        "GET /api/old HTTP/1.0\r\nHost: app.test\r\nCookie: {cookie}\r\n\
         Connection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n\
         GET /api/next HTTP/1.1\r\nHost: app.test\r\nCookie: {cookie}\r\n\
         Connection: close\r\n\r\n",
        cookie = login.cookie
    );
    let answer = raw_exchange(h.addr, request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert_eq!(answer.matches(" 200 OK\r\n").count(), 2, "{answer}");
    assert!(!answer.contains("websocket_unsupported"), "{answer}");
    assert_eq!(h.upstream.raw_count(), 3);
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let h = Harness::start().await;
    let huge = "v".repeat(64 * 1024);
    let request =
        format!("GET /api/x HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\nconnection: close\r\n\r\n");
    let answer = raw_exchange(h.addr, request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(h.upstream.raw_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_response_streams_with_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // Warm up the connection pools and allocator.
    let warm = get(h.addr, &format!("/api/big?bytes={}", 1024 * 1024), &login).await;
    assert_eq!(warm.body.len(), 1024 * 1024);

    let before = rss_kib();
    let response = send_streaming(
        h.addr,
        Method::GET,
        &format!("/api/big?bytes={SIZE}"),
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received: u64 = 0;
    let mut peak = before;
    let mut frames = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            received += data.len() as u64;
        }
        frames += 1;
        if frames % 64 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(received, SIZE);
    let growth_mib = peak.saturating_sub(before) / 1024;
    // Upstream, proxy and client share this process; buffering the body anywhere would add
    // at least 100 MiB.
    assert!(
        growth_mib < 32,
        "RSS grew by {growth_mib} MiB while streaming 100 MiB"
    );
}

/// Paths an upstream could read differently from the router are refused before any route or
/// auth decision: `/public/../api/x` would take the public (no session) route here and reach
/// `/api/x` at an upstream that normalises.
#[tokio::test]
async fn paths_not_in_normal_form_are_400_and_never_forwarded() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            let mut public = route("public", "/public/", &up.url());
            public.auth_required = false;
            public.strip_prefix = true;
            s.routes.push(public);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let refused = [
        "/public/../api/x",
        "/public/%2e%2e/api/x",
        "/public/.%2E/api/x",
        "/public/./x",
        "/public//api/x",
        "/api//x",
        "/api/a%2fb",
        "/api/a%5Cb",
        "/api/a%00b",
        "/public/..;/api/x",
        "/api/%2e%2e;x/y",
        "/auth/../api/x",
    ];
    assert_refused_before_the_upstream(&h, &login, &refused).await;
    // Dots inside names, `...`, a trailing slash and an encoded space are normal paths.
    for path in [
        "/api/v1.2/file.json",
        "/api/.../x",
        "/api/x/",
        "/api/a%20b",
        "/public/x",
    ] {
        let r = get(h.addr, path, &login).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    }
}

/// A public route above a protected one (`/` with no session, `/api/` with one), both to the
/// same upstream: `/%61pi/x` and `/api;x/x` match `/` here as received, and an upstream that
/// decodes escapes (Go's `ServeMux`) or drops `;` parameters (Tomcat, Jetty) serves them as
/// `/api/x`, without the session `/api/` demands. They were forwarded; now they are refused
/// before any upstream is asked. Spellings that read as the route they match still pass.
/// Found by a QA read.
#[tokio::test]
async fn another_routes_path_in_another_spelling_is_400_and_never_forwarded() {
    let h = Harness::start_with_public_route("site", "/").await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let refused = [
        "/%61pi/x",
        "/%61%70%69/x",
        "/api;x/x",
        "/api;/x",
        "/ap%69;v=1/x",
        "/api%3bx/x",
        // Express and ASP.NET Core route without regard to letter case.
        "/API/x",
        "/Api/x",
        "/API",
        "/%41pi/x",
    ];
    assert_refused_before_the_upstream(&h, &login, &refused).await;
    // Escapes, parameters and capitals that keep the request on its route: forwarded as sent.
    for (path, session) in [
        ("/docs/a%20b", None),
        ("/docs;v=1/page", None),
        ("/api/a%20b", Some(&login)),
        ("/api/users;jsessionid=1", Some(&login)),
        ("/%61pi-docs/x", None),
        ("/Docs/Page", None),
        ("/APIdocs/x", None),
        ("/api/Users/ABC", Some(&login)),
    ] {
        let r = get_with(&h, path, session).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(h.upstream.last_raw().uri, path, "{path}");
    }
    // Without a session the protected route itself still says so.
    let r = send(h.addr, Method::GET, "/api/x", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
}

/// A review's repro: a protected route configured with capitals (`/Reports/`) beside a public
/// `/`, and no lower-case twin. `/reports/q3`, all lower case, matches only `/` as sent, and
/// an upstream that routes without regard to case (Express, ASP.NET Core) serves it as
/// `/Reports/q3`. The case reading ran only for a path holding a capital, so this one was
/// forwarded without a session, signed with no user. Now any capital in a prefix makes every
/// path read that way: refused 400 `bad_request`, with or without a session, never forwarded.
#[tokio::test]
async fn a_lower_case_spelling_of_a_capitalised_protected_prefix_is_refused() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            let mut public = route("site", "/", &up.url());
            public.auth_required = false;
            s.routes.push(public);
            s.routes.push(route("reports", "/Reports/", &up.url()));
        }),
        ..HarnessOptions::default()
    })
    .await;
    let r = send(h.addr, Method::GET, "/Reports/q3", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let login = h.login("alice", ALICE_PASSWORD).await;
    let forwarded = h.upstream.raw_count();
    for session in [None, Some(&login)] {
        for path in ["/reports/q3", "/REPORTS/q3", "/rePorts/"] {
            let r = get_with(&h, path, session).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
            assert_eq!(r.error_code(), "bad_request", "{path}");
        }
    }
    assert_eq!(
        h.upstream.raw_count(),
        forwarded,
        "a refused path was forwarded"
    );
    // The public route's own lower-case paths that name no other route still pass, and the
    // protected route takes its own spelling with a session.
    for (path, session) in [
        ("/report", None),
        ("/other/x", None),
        ("/Reports/q3", Some(&login)),
    ] {
        let r = get_with(&h, path, session).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(h.upstream.last_raw().uri, path, "{path}");
    }
}

/// A route configured with capitals still takes its own paths (the letter-case reading must
/// not send them to another route), and a route told from another by case alone keeps its
/// requests too: `/Reports/` and `/reports/` beside a public `/`.
#[tokio::test]
async fn routes_with_capitals_keep_their_paths() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            let mut public = route("site", "/", &up.url());
            public.auth_required = false;
            s.routes.push(public);
            s.routes.push(route("upper", "/Reports/", &up.url()));
            s.routes.push(route("lower", "/reports/", &up.url()));
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    for path in ["/Reports/x", "/reports/x", "/Reports", "/reports/Q3"] {
        let r = get_with(&h, path, Some(&login)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(h.upstream.last_raw().uri, path, "{path}");
    }
    // A third spelling names a protected route while matching only the public `/`.
    let forwarded = h.upstream.raw_count();
    let r = get_with(&h, "/REPORTS/x", Some(&login)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.error_code(), "bad_request");
    assert_eq!(
        h.upstream.raw_count(),
        forwarded,
        "the refused path was forwarded"
    );
}

//! Adversarial review of the admin listener (`/healthz`, `/readyz`, `/metrics`, revoke): what
//! a web page in a browser that can reach it gets, revoke names with special characters, and
//! HEAD. A real proxy on loopback (the in-process harness).
//! Run: `cargo test --all-features --test proxy_admin_review`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

/// The Fetch Metadata a browser sends with a request a page's script makes to its own origin
/// (`fetch`, or a window it opened) when that origin is potentially trustworthy. Under a
/// rebound DNS name over plain http a browser sends none of it, and the `Host` check refuses
/// that name (tests/proxy_admin_rebinding.rs); here the request names the listener by its
/// address (`send`'s `Host`), so what is tested is the `Sec-Fetch-Site` refusal on its own.
fn rebinding_headers(_admin: std::net::SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("sec-fetch-site", "same-origin".to_owned()),
        ("sec-fetch-mode", "cors".to_owned()),
        ("sec-fetch-dest", "empty".to_owned()),
    ]
}

/// DNS rebinding: a page on any site the operator's browser opens can rebind its own host name
/// to the admin listener's private address and then read `/metrics` and `/readyz` as its own
/// origin (no CORS needed): upstream names, session counts, the TLS certificate's expiry, which
/// upstreams are down. The revoke endpoint refuses requests made by pages (`Origin` or
/// `Sec-Fetch-Site`); the read endpoints answered them. A request the browser marks as the
/// page's own origin (`Sec-Fetch-Site: same-origin`: the listener serves no page, so no
/// legitimate request carries it) is refused 403 `csrf`, whatever name it came under (the
/// rebound name itself is refused by the `Host` check); what an operator types into the address
/// bar (`none`), follows from a link (`cross-site`, `same-site`: unreadable to the page that
/// linked), and scripts, probes and Prometheus (no such header) are served as before.
#[tokio::test]
async fn a_page_cannot_read_the_admin_endpoints_after_dns_rebinding() {
    let h = Harness::start().await;
    let rebinding = rebinding_headers(h.admin);
    let rebinding: Vec<(&str, &str)> = rebinding.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for path in ["/metrics", "/readyz", "/healthz"] {
        for method in [Method::GET, Method::HEAD] {
            let r = send(h.admin, method.clone(), path, &rebinding, Bytes::new()).await;
            assert_eq!(
                r.status,
                StatusCode::FORBIDDEN,
                "{method} {path} answered a page after DNS rebinding: {}",
                r.text()
            );
            assert!(!r.text().contains("countersign_"), "{}", r.text());
        }
        let r = send(h.admin, Method::GET, path, &rebinding, Bytes::new()).await;
        assert_eq!(r.error_code(), "csrf", "{path}");
    }
    // Served: scripts and probes (no Fetch Metadata), an address typed in the browser (`none`),
    // a link followed from another site (Prometheus' targets page, a dashboard: the page that
    // linked cannot read the answer), and clients that send `Sec-Fetch-Mode` alone (Node's
    // fetch, scripts/e2e.sh).
    for headers in [
        vec![],
        vec![("sec-fetch-site", "none"), ("sec-fetch-mode", "navigate")],
        vec![
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ],
        vec![
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "navigate"),
        ],
        vec![("sec-fetch-mode", "cors")],
    ] {
        for path in ["/metrics", "/readyz", "/healthz"] {
            let r = send(h.admin, Method::GET, path, &headers, Bytes::new()).await;
            assert_eq!(r.status, StatusCode::OK, "{path} {headers:?}: {}", r.text());
        }
    }
}

/// Revoke names are percent-decoded whole (`%2F` is a `/` in the name, not a path separator),
/// a name that is not UTF-8 or empty is a 400, and a long one is just a name nobody has.
#[tokio::test]
async fn revoke_decodes_names_and_refuses_bad_ones() {
    let h = Harness::start().await;
    for (raw, decoded) in [
        ("a%2Fb", "a/b"),
        ("a/b", "a/b"),
        ("caf%C3%A9", "café"),
        ("a+b%20c", "a+b c"),
        ("%22%5C%0A", "\"\\\n"),
        ("100%", "100%"),
    ] {
        let r = admin_revoke(h.admin, raw).await;
        assert_eq!(r.status, StatusCode::OK, "{raw}: {}", r.text());
        assert_eq!(r.json()["user"], decoded, "{raw}");
        assert_eq!(r.json()["revoked"], 0, "{raw}");
    }
    for raw in ["", "%FF", "%C3"] {
        let r = admin_revoke(h.admin, raw).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw:?}: {}", r.text());
        assert_eq!(r.error_code(), "bad_request", "{raw:?}");
    }
    let long = "x".repeat(8 * 1024);
    let r = admin_revoke(h.admin, &long).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["revoked"], 0);
    // Revoke is POST only (HEAD too is refused, with its Allow), and the session stays.
    let login = h.login("alice", ALICE_PASSWORD).await;
    for method in [Method::GET, Method::HEAD, Method::PUT] {
        let r = send(
            h.admin,
            method.clone(),
            "/admin/users/alice/revoke",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(r.headers["allow"], "POST", "{method}");
    }
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::OK
    );
}

/// HEAD is GET without the body: the same status and headers, `Content-Length` the body's.
#[tokio::test]
async fn head_is_get_without_the_body() {
    let h = Harness::start().await;
    for path in ["/healthz", "/readyz"] {
        let get = send(h.admin, Method::GET, path, &[], Bytes::new()).await;
        let head = send(h.admin, Method::HEAD, path, &[], Bytes::new()).await;
        assert_eq!(get.status, head.status, "{path}");
        assert!(head.body.is_empty(), "{path}");
        assert_eq!(
            head.headers["content-length"],
            get.body.len().to_string(),
            "{path}"
        );
        assert_eq!(
            head.headers["content-type"], get.headers["content-type"],
            "{path}"
        );
    }
    let head = send(h.admin, Method::HEAD, "/metrics", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
}

/// `[server.response_headers]` replaces headers of the same name on every answer the proxy
/// makes, so the names the proxy sets per answer are refused (`Content-Range`, `Allow`, ...).
/// Some were missing: `Accept-Ranges` (static files say `bytes`, which Safari needs to play
/// media, and answer ranges with 206: a configured `none` contradicted both), the WebSocket
/// handshake fields (`Sec-WebSocket-Version` names the versions on the proxy's own 426
/// `websocket_version`, replaced by a configured value; with `response_headers_on_upstream`
/// a configured `Sec-WebSocket-Protocol` or `-Extensions` was added to an upstream's 101 that
/// did not choose one, which the browser fails), and `Proxy-Authenticate` (a per-answer
/// challenge, removed from upstream answers: a configured one reached the browser on every
/// answer instead).
#[test]
fn names_the_proxy_sets_per_answer_cannot_be_configured() {
    use countersign::proxy::config::ResponseHeaderRules;
    for name in [
        "Accept-Ranges",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Accept",
        "Proxy-Authenticate",
    ] {
        let refused = ResponseHeaderRules::new().set(name, "x", true);
        assert!(refused.is_err(), "{name} can be configured");
        let problem = refused.unwrap_err();
        assert!(problem.contains("cannot be set here"), "{name}: {problem}");
    }
    // Still allowed: what a site sets for itself.
    for name in [
        "Content-Security-Policy",
        "Permissions-Policy",
        "Cross-Origin-Opener-Policy",
        "X-Custom",
    ] {
        assert!(
            ResponseHeaderRules::new().set(name, "x", true).is_ok(),
            "{name}"
        );
    }
}

//! `upstream[].cross_origin_redirects`: an upstream's redirect (301, 302, 303, 307, 308) to
//! another origin, answering a write that carried `X-CSRF-Token`, is refused with 502
//! `bad_gateway` by default (a browser would follow it with the token: `XMLHttpRequest`, so
//! Angular's `HttpClient`, cannot refuse to), and passed on with `"pass"`; redirects within the
//! public origin, redirects of reads, and writes without the token pass unchanged. Against the
//! in-process proxy and a real upstream on loopback; the config key through `ProxyConfig`.
//! Run: `cargo test --all-features --test proxy_redirect_guard`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use countersign::proxy::config::{CrossOriginRedirects, ProxyConfig};
use http::{Method, StatusCode};
use support::*;

/// `/api/redirect` answering `status` with `Location: to`.
fn redirect_path(status: u16, to: &str) -> String {
    let to: String = form_urlencoded::byte_serialize(to.as_bytes()).collect();
    format!("/api/redirect?status={status}&to={to}")
}

/// A logged-in write (`method`, with the session's CSRF token unless `token` is false) and a
/// read of `path`.
async fn write(h: &Harness, login: &Login, method: Method, path: &str, token: bool) -> Reply {
    let cookie = login.cookie.as_str();
    let mut headers = vec![("cookie", cookie), ("origin", ORIGIN)];
    if token {
        headers.push(("x-csrf-token", login.csrf.as_str()));
    }
    send(h.addr, method, path, &headers, Bytes::from_static(b"{}")).await
}

#[tokio::test]
async fn a_writes_redirect_to_another_origin_is_refused_by_default() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    for status in [301, 302, 303, 307, 308] {
        for to in [
            "https://evil.example/collect",
            "//evil.example/collect",
            "/\\evil.example/collect",
            "http://localhost:1/",
        ] {
            for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
                let r = write(&h, &login, method.clone(), &redirect_path(status, to), true).await;
                let what = format!("{method} answered {status} to {to:?}");
                assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{what}: {}", r.text());
                assert_eq!(r.error_code(), "bad_gateway", "{what}");
                assert!(r.headers.get("location").is_none(), "{what}");
            }
        }
    }
    // Nothing of the refused answer reached the client, but the upstream did get the request
    // (it is the upstream's answer that is refused, not the write).
    assert!(h.upstream.last_raw().uri.contains("/api/redirect"));
}

#[tokio::test]
async fn redirects_that_stay_or_carry_no_token_pass_unchanged() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // Within the public origin, however written.
    for to in [
        "/api/next",
        "next",
        "?page=2",
        &format!("{ORIGIN}/api/next"),
    ] {
        let r = write(&h, &login, Method::POST, &redirect_path(303, to), true).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{to}: {}", r.text());
        assert_eq!(r.headers["location"], to, "{to}");
    }
    // A read carries no token: its redirect passes wherever it leads.
    let cookie = login.cookie.as_str();
    let r = send(
        h.addr,
        Method::GET,
        &redirect_path(302, "https://cdn.example/file"),
        &[("cookie", cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(r.headers["location"], "https://cdn.example/file");
    // Not a redirect a browser follows on its own.
    for status in [300, 304] {
        let r = write(
            &h,
            &login,
            Method::POST,
            &redirect_path(status, "https://evil.example/"),
            true,
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
    }
}

/// On a public route a write needs no session, but the SPA's client sends its token with every
/// write to its own origin: the redirect is refused there too. Without the token it passes.
#[tokio::test]
async fn a_public_routes_redirect_is_refused_only_when_the_write_carried_the_token() {
    let h = Harness::start_with_public_route("public", "/pub/").await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let path = redirect_path(307, "https://evil.example/").replace("/api/", "/pub/");
    let r = write(&h, &login, Method::POST, &path, true).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let r = send(
        h.addr,
        Method::POST,
        &path,
        &[("origin", ORIGIN)],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT, "{}", r.text());
    assert_eq!(r.headers["location"], "https://evil.example/");
}

#[tokio::test]
async fn pass_lets_a_routes_cross_origin_redirects_through() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            for route in &mut s.routes {
                route.cross_origin_redirects = CrossOriginRedirects::Pass;
            }
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let r = write(
        &h,
        &login,
        Method::POST,
        &redirect_path(303, "https://storage.example/upload"),
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
    assert_eq!(r.headers["location"], "https://storage.example/upload");
}

#[test]
fn the_key_is_parsed_and_bad_values_name_it() {
    let config = |line: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
             [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n\
             {line}\n"
        )
    };
    let parse = |line: &str| {
        ProxyConfig::parse(
            &config(line),
            std::path::Path::new("/etc/countersign/proxy.toml"),
        )
    };
    let upstream = |line: &str| parse(line).unwrap().upstreams[0].cross_origin_redirects;
    assert_eq!(upstream(""), CrossOriginRedirects::Refuse);
    assert_eq!(
        upstream("cross_origin_redirects = \"refuse\""),
        CrossOriginRedirects::Refuse
    );
    assert_eq!(
        upstream("cross_origin_redirects = \"pass\""),
        CrossOriginRedirects::Pass
    );
    let e = parse("cross_origin_redirects = \"allow\"").unwrap_err();
    assert_eq!(e.key(), "upstream[0].cross_origin_redirects");
    assert!(e.problem().contains("\"refuse\" or \"pass\""), "{e}");
    assert!(
        e.to_string().starts_with("/etc/countersign/proxy.toml"),
        "{e}"
    );
}

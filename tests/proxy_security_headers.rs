//! Browser security headers (`server.response_headers`): the defaults on every answer the proxy
//! makes itself (static files 200/304/404, `/auth/*`, error answers), HSTS only with an https
//! public origin, overrides, removals and a CSP from the config, proxied API answers left as
//! the upstream sent them (unless `response_headers_on_upstream`), config errors naming the key,
//! and `countersign dev` with the defaults.
//! Run: `cargo test --all-features --test proxy_security_headers`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use countersign::proxy::config::{ProxyConfig, ResponseHeaderRules};
use countersign::proxy::response_headers::ResponseHeaders;
use countersign::proxy::server::ProxySettings;
use countersign::proxy::static_files::{Site, StaticDir};
use http::{HeaderMap, Method, StatusCode};
use support::*;

/// The defaults over http (no HSTS: browsers ignore it there, and it is keyed on the public
/// origin).
const DEFAULTS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
];

/// A static site in `dist` of a fresh directory: the directory (removed when dropped) and
/// `dist`.
fn spa_dir(tag: &str) -> (TestDir, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let root = dir.join("dist");
    write(
        &root.join("index.html"),
        "<!doctype html><title>spa</title>",
    );
    write(&root.join("app.js"), "console.log('app')");
    (dir, root)
}

async fn spa_with(tag: &str, tweak: Tweak) -> Harness {
    let (dir, root) = spa_dir(tag);
    let site = Site::Dir(StaticDir::new(&root).unwrap());
    Harness::start_with(HarnessOptions {
        site: Some(site),
        files: Some(dir),
        tweak,
        ..HarnessOptions::default()
    })
    .await
}

async fn spa(tag: &str) -> Harness {
    spa_with(tag, Box::new(|_, _| {})).await
}

#[track_caller]
fn assert_defaults(headers: &HeaderMap, what: &str) {
    for (name, value) in DEFAULTS {
        let got: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(got.len(), 1, "{what}: {name} {got:?}");
        assert_eq!(got[0], value, "{what}: {name}");
    }
    assert!(
        headers.get("strict-transport-security").is_none(),
        "{what}: HSTS over an http public origin"
    );
    assert!(
        headers.get("content-security-policy").is_none(),
        "{what}: no CSP by default"
    );
}

async fn fetch(h: &Harness, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(h.addr, method, path, headers, Bytes::new()).await
}

#[tokio::test]
async fn static_files_carry_the_defaults_on_200_304_404_and_head() {
    let h = spa("sec-static").await;
    for path in ["/", "/index.html", "/app.js", "/some/client/route"] {
        let r = fetch(&h, Method::GET, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_defaults(&r.headers, path);
        let etag = r.headers["etag"].to_str().unwrap().to_owned();
        let r = fetch(&h, Method::GET, path, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{path}");
        assert_defaults(&r.headers, &format!("304 {path}"));
        let r = fetch(&h, Method::HEAD, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "HEAD {path}");
        assert_defaults(&r.headers, &format!("HEAD {path}"));
    }
    // The static handler's own refusals: a missing file, a hidden file, a traversal, a method.
    for (method, path, status) in [
        (Method::GET, "/missing.js", StatusCode::NOT_FOUND),
        (Method::GET, "/.env", StatusCode::NOT_FOUND),
        (Method::GET, "/a/%2e%2e/x", StatusCode::BAD_REQUEST),
        (Method::POST, "/index.html", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let r = fetch(&h, method.clone(), path, &[]).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_defaults(&r.headers, &format!("{method} {path}"));
    }
}

#[tokio::test]
async fn the_proxys_own_endpoints_and_errors_carry_the_defaults() {
    let h = spa("sec-auth").await;
    let login = h.login_raw("alice", ALICE_PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK);
    assert_defaults(&login.headers, "login");
    let cookie = login.session_cookie().unwrap();
    let csrf = login.json()["csrf_token"].as_str().unwrap().to_owned();
    let session = fetch(&h, Method::GET, "/auth/session", &[("cookie", &cookie)]).await;
    assert_eq!(session.status, StatusCode::OK);
    assert_defaults(&session.headers, "session");
    let logout = fetch(
        &h,
        Method::POST,
        "/auth/logout",
        &[
            ("cookie", &cookie),
            ("origin", ORIGIN),
            ("x-csrf-token", &csrf),
        ],
    )
    .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    assert_defaults(&logout.headers, "logout");

    // Error answers: of /auth/*, of an API route (the proxy's refusal, not the upstream's),
    // of the router.
    let wrong = h.login_raw("alice", "wrong").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_defaults(&wrong.headers, "invalid_credentials");
    for (method, path, headers, status) in [
        (
            Method::GET,
            "/auth/session",
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::GET,
            "/auth/login",
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/auth/nothing", vec![], StatusCode::NOT_FOUND),
        (Method::GET, "/api/x", vec![], StatusCode::UNAUTHORIZED),
        (
            Method::POST,
            "/api/x",
            vec![("origin", "https://evil.example")],
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/app.js",
            vec![("connection", "upgrade"), ("upgrade", "websocket")],
            StatusCode::NOT_IMPLEMENTED,
        ),
    ] {
        let r = fetch(&h, method.clone(), path, &headers).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_defaults(&r.headers, &format!("{method} {path}"));
    }
}

#[tokio::test]
async fn without_a_static_dir_the_404_still_carries_the_defaults() {
    let h = Harness::start().await;
    let r = fetch(&h, Method::GET, "/nothing-here", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_defaults(&r.headers, "404 without static_dir");
}

// ---------------------------------------------------------------------------------------------
// HSTS: only with an https public origin
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 GET over TLS to the [`TlsHarness`]; the answer's status and headers.
async fn https_get(tls: &TlsHarness, path: &str) -> (StatusCode, HeaderMap) {
    use hyper_util::rt::TokioIo;
    let connector = support::tls_connector(tls.roots.clone(), &[]);
    let tcp = tokio::net::TcpStream::connect(tls.h.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn hsts_is_sent_with_an_https_public_origin() {
    let (_dir, root) = spa_dir("sec-hsts");
    let tls = start_tls("sec-hsts-tls", move |s| {
        s.site = Some(Site::Dir(StaticDir::new(&root).unwrap()));
    })
    .await;
    for (path, status) in [
        ("/", StatusCode::OK),
        ("/app.js", StatusCode::OK),
        ("/missing.js", StatusCode::NOT_FOUND),
        ("/auth/session", StatusCode::UNAUTHORIZED),
    ] {
        let (got, headers) = https_get(&tls, path).await;
        assert_eq!(got, status, "{path}");
        assert_eq!(
            headers["strict-transport-security"], "max-age=31536000",
            "{path}: one year, this host only (no includeSubDomains, no preload)"
        );
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(
            headers["referrer-policy"], "strict-origin-when-cross-origin",
            "{path}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The config: overrides, removals, a CSP
// ---------------------------------------------------------------------------------------------

const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
     [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
     [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n";

const CONFIG_PATH: &str = "/etc/countersign/proxy.toml";

fn parse(text: &str) -> Result<ProxyConfig, countersign::proxy::config::ConfigError> {
    ProxyConfig::parse(text, std::path::Path::new(CONFIG_PATH))
}

/// `BASE` with `server_lines` added at the end of `[server]` (a table there: after its keys).
fn with_server(server_lines: &str) -> String {
    BASE.replace(
        "public_origin = \"http://localhost:8080\"\n",
        &format!("public_origin = \"http://localhost:8080\"\n{server_lines}"),
    )
}

/// The settings' `response_headers` from a config with `server_lines`.
fn rules_from(server_lines: &str) -> ResponseHeaderRules {
    let config = parse(&with_server(server_lines)).unwrap();
    ProxySettings::from_config(&config)
        .unwrap()
        .response_headers
}

const CSP: &str = "default-src 'self'; script-src 'self'; frame-ancestors 'none'";

#[tokio::test]
async fn overrides_removals_and_a_csp_from_the_config_reach_the_documents() {
    let rules = rules_from(&format!(
        "[server.response_headers]\n\
         Content-Security-Policy = \"{CSP}\"\n\
         \"x-frame-options\" = \"SAMEORIGIN\"\n\
         Referrer-Policy = \"\"\n\
         Permissions-Policy = \"camera=(), microphone=()\"\n"
    ));
    let h = spa_with(
        "sec-config",
        Box::new(move |s, _| s.response_headers = rules),
    )
    .await;
    for (method, path, status) in [
        (Method::GET, "/", StatusCode::OK),
        (Method::GET, "/client/route", StatusCode::OK),
        (Method::GET, "/app.js", StatusCode::OK),
        (Method::HEAD, "/index.html", StatusCode::OK),
        (Method::GET, "/missing.js", StatusCode::NOT_FOUND),
        (Method::GET, "/auth/session", StatusCode::UNAUTHORIZED),
    ] {
        let r = fetch(&h, method.clone(), path, &[]).await;
        assert_eq!(r.status, status, "{method} {path}");
        let what = format!("{method} {path}");
        assert_eq!(r.headers["content-security-policy"], CSP, "{what}");
        assert_eq!(
            r.headers.get_all("x-frame-options").iter().count(),
            1,
            "{what}: replaced, not added"
        );
        assert_eq!(r.headers["x-frame-options"], "SAMEORIGIN", "{what}");
        assert!(
            r.headers.get("referrer-policy").is_none(),
            "{what}: removed"
        );
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(
            r.headers["permissions-policy"], "camera=(), microphone=()",
            "{what}"
        );
    }
    // The 304 of a document carries the CSP too.
    let etag = fetch(&h, Method::GET, "/", &[]).await.headers["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = fetch(&h, Method::GET, "/", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers["content-security-policy"], CSP);
}

/// `server.max_response_header_value_bytes` bounds each configured value: a 5000-byte CSP is
/// refused by default (naming the key that raises it) and, with the key at 5000, reaches the
/// answers whole.
#[tokio::test]
async fn max_response_header_value_bytes_sets_the_longest_value_sent() {
    let long_csp = format!("default-src 'self'; script-src 'self' {}", "a".repeat(4962));
    assert_eq!(long_csp.len(), 5000);
    let table = format!("[server.response_headers]\nContent-Security-Policy = \"{long_csp}\"\n");
    let e = parse(&with_server(&table)).unwrap_err();
    assert_eq!(e.key(), "server.response_headers.Content-Security-Policy");
    assert!(
        e.problem().contains("5000 bytes, more than 4096")
            && e.problem()
                .contains("server.max_response_header_value_bytes"),
        "{e}"
    );
    let e = parse(&with_server(&format!(
        "max_response_header_value_bytes = 4999\n{table}"
    )))
    .unwrap_err();
    assert!(e.problem().contains("5000 bytes, more than 4999"), "{e}");

    let rules = rules_from(&format!("max_response_header_value_bytes = 5000\n{table}"));
    let h = spa_with(
        "sec-long-value",
        Box::new(move |s, _| s.response_headers = rules),
    )
    .await;
    for path in ["/", "/auth/session"] {
        let r = fetch(&h, Method::GET, path, &[]).await;
        assert_eq!(
            r.headers["content-security-policy"],
            long_csp.as_str(),
            "{path}"
        );
    }
}

#[tokio::test]
async fn every_default_can_be_removed() {
    let rules = rules_from(
        "[server.response_headers]\nX-Content-Type-Options = \"\"\nX-Frame-Options = \"\"\n\
         Referrer-Policy = \"\"\nStrict-Transport-Security = \"\"\n",
    );
    let h = spa_with(
        "sec-removed",
        Box::new(move |s, _| s.response_headers = rules),
    )
    .await;
    let r = fetch(&h, Method::GET, "/app.js", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    for (name, _) in DEFAULTS {
        assert!(r.headers.get(name).is_none(), "{name} not removed");
    }
}

// ---------------------------------------------------------------------------------------------
// Proxied API answers
// ---------------------------------------------------------------------------------------------

/// The headers of every answer of [`start_fixed_upstream`] (a fixed `Date`, so that the HTTP
/// layer adds none and two answers can be compared exactly).
const UPSTREAM_HEADERS: [(&str, &str); 5] = [
    ("content-type", "application/json"),
    ("cache-control", "private, max-age=5"),
    ("x-upstream", "yes"),
    ("x-frame-options", "SAMEORIGIN"),
    ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
];

/// An upstream (no signature check: the route is public) answering every request with
/// [`UPSTREAM_HEADERS`] and `{"ok":true}`.
async fn start_fixed_upstream() -> std::net::SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    serve_each(|stream| async move {
        let service = hyper::service::service_fn(|_req| async {
            let mut response = http::Response::new(http_body_util::Full::new(Bytes::from_static(
                b"{\"ok\":true}",
            )));
            for (name, value) in UPSTREAM_HEADERS {
                response
                    .headers_mut()
                    .insert(name, http::HeaderValue::from_static(value));
            }
            Ok::<_, std::convert::Infallible>(response)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// A harness whose `/raw/` route (public) leads to [`start_fixed_upstream`].
async fn with_fixed_upstream(tag: &str, rules: ResponseHeaderRules) -> (Harness, Reply) {
    let upstream = start_fixed_upstream().await;
    let mut raw_route = route("raw", "/raw/", &format!("http://{upstream}"));
    raw_route.auth_required = false;
    let (dir, root) = spa_dir(tag);
    let site = Site::Dir(StaticDir::new(&root).unwrap());
    let h = Harness::start_with(HarnessOptions {
        site: Some(site),
        files: Some(dir),
        extra_routes: vec![raw_route],
        tweak: Box::new(move |s, _| s.response_headers = rules),
        ..HarnessOptions::default()
    })
    .await;
    let direct = send(upstream, Method::GET, "/raw/x", &[], Bytes::new()).await;
    (h, direct)
}

/// The headers as (name, value) text pairs, in order.
fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn proxied_answers_are_unchanged_by_default() {
    let rules = rules_from(&format!(
        "[server.response_headers]\nContent-Security-Policy = \"{CSP}\"\n"
    ));
    let (h, direct) = with_fixed_upstream("sec-upstream", rules).await;
    let through = fetch(&h, Method::GET, "/raw/x", &[]).await;
    assert_eq!(through.status, StatusCode::OK);
    assert_eq!(through.body, direct.body);
    // Exactly the upstream's fields, plus the request id the proxy always adds.
    let mut expected = pairs(&direct.headers);
    expected.push((
        "x-request-id".to_owned(),
        through.headers["x-request-id"].to_str().unwrap().to_owned(),
    ));
    let mut got = pairs(&through.headers);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert!(got.iter().all(|(n, _)| n != "content-security-policy"));
    // The same proxy's own answers have them.
    let own = fetch(&h, Method::GET, "/", &[]).await;
    assert_eq!(own.headers["content-security-policy"], CSP);
}

#[tokio::test]
async fn on_upstream_adds_only_what_the_upstream_did_not_send() {
    let rules = rules_from(&format!(
        "response_headers_on_upstream = true\n\
         [server.response_headers]\nContent-Security-Policy = \"{CSP}\"\n"
    ));
    let (h, direct) = with_fixed_upstream("sec-upstream-on", rules).await;
    let through = fetch(&h, Method::GET, "/raw/x", &[]).await;
    assert_eq!(through.status, StatusCode::OK);
    // The upstream's own X-Frame-Options wins; the others are added once.
    assert_eq!(direct.headers["x-frame-options"], "SAMEORIGIN");
    assert_eq!(through.headers.get_all("x-frame-options").iter().count(), 1);
    assert_eq!(through.headers["x-frame-options"], "SAMEORIGIN");
    assert_eq!(through.headers["content-security-policy"], CSP);
    assert_eq!(through.headers["x-content-type-options"], "nosniff");
    assert_eq!(
        through.headers["referrer-policy"],
        "strict-origin-when-cross-origin"
    );
    for (name, value) in UPSTREAM_HEADERS {
        assert_eq!(through.headers[name], value, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Config errors
// ---------------------------------------------------------------------------------------------

#[test]
fn the_defaults_need_no_config_and_on_upstream_is_off() {
    let config = parse(BASE).unwrap();
    let built = ResponseHeaders::build(&config.server.response_headers, false);
    let sent: Vec<(String, String)> = built
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    let expected: Vec<(String, String)> = DEFAULTS
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(sent, expected);
}

#[test]
fn bad_names_values_and_forbidden_names_name_the_key() {
    let https = |text: String| {
        text.replace(
            "public_origin = \"http://localhost:8080\"",
            "public_origin = \"https://app.example.com\"",
        )
    };
    let table = |entry: &str| with_server(&format!("[server.response_headers]\n{entry}\n"));
    let cases: Vec<(String, &str, &str)> = vec![
        (
            table("\"X Frame\" = \"DENY\""),
            "server.response_headers.\"X Frame\"",
            "not a valid header name",
        ),
        (
            table("X-Custom = \"caf\u{e9}\""),
            "server.response_headers.X-Custom",
            "visible ASCII",
        ),
        (
            table("X-Custom = \"a\\nInjected: yes\""),
            "server.response_headers.X-Custom",
            "visible ASCII",
        ),
        (
            table("Set-Cookie = \"a=b\""),
            "server.response_headers.Set-Cookie",
            "session",
        ),
        (
            table("Clear-Site-Data = \"\\\"cookies\\\"\""),
            "server.response_headers.Clear-Site-Data",
            "session cookie",
        ),
        (
            table("Content-Length = \"0\""),
            "server.response_headers.Content-Length",
            "per answer",
        ),
        (
            table("Connection = \"close\""),
            "server.response_headers.Connection",
            "hop-by-hop",
        ),
        (
            table("Transfer-Encoding = \"chunked\""),
            "server.response_headers.Transfer-Encoding",
            "hop-by-hop",
        ),
        (
            table("Cache-Control = \"public\""),
            "server.response_headers.Cache-Control",
            "no-store",
        ),
        (
            table("Access-Control-Allow-Origin = \"*\""),
            "server.response_headers.Access-Control-Allow-Origin",
            "CORS",
        ),
        (
            table("X-Request-Id = \"1\""),
            "server.response_headers.X-Request-Id",
            "per answer",
        ),
        (
            table("X-Frame-Option = \"\""),
            "server.response_headers.X-Frame-Option",
            "removes a default header",
        ),
        (
            table("X-Frame-Options = \"ALLOW-FROM https://a.example\""),
            "server.response_headers.X-Frame-Options",
            "DENY or SAMEORIGIN",
        ),
        (
            table("Strict-Transport-Security = \"max-age=60\""),
            "server.response_headers.Strict-Transport-Security",
            "over http",
        ),
        (
            https(table("Strict-Transport-Security = \"includeSubDomains\"")),
            "server.response_headers.Strict-Transport-Security",
            "max-age",
        ),
        (
            table("X-Custom = \"a\"\nx-custom = \"b\""),
            "server.response_headers.",
            "set twice",
        ),
        (
            table("static_dir = \"dist\""),
            "server.response_headers.static_dir",
            "not \"_\"",
        ),
        (
            table("X-Custom = true"),
            "server.response_headers.X-Custom",
            "",
        ),
        (
            with_server("response_headers_on_upstream = \"yes\"\n"),
            "server.response_headers_on_upstream",
            "",
        ),
        (
            with_server("max_response_header_value_bytes = 0\n"),
            "server.max_response_header_value_bytes",
            "must be between 1 and 65536",
        ),
        (
            with_server("max_response_header_value_bytes = 65537\n"),
            "server.max_response_header_value_bytes",
            "must be between 1 and 65536",
        ),
    ];
    for (text, key, problem) in cases {
        let e = parse(&text).expect_err(&text);
        assert_eq!(e.file(), std::path::Path::new(CONFIG_PATH));
        assert!(e.key().starts_with(key), "{key}: {e}");
        assert!(e.problem().contains(problem), "{key}: {e}");
        assert!(e.to_string().starts_with(CONFIG_PATH), "{e}");
    }
    // With an https origin, HSTS can be tuned (and over http, removing it is no error).
    let tuned = https(table(
        "Strict-Transport-Security = \"max-age=63072000; includeSubDomains\"",
    ));
    parse(&tuned).unwrap();
    parse(&table("Strict-Transport-Security = \"\"")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The admin listener: the same headers, without HSTS (it is plain http)
// ---------------------------------------------------------------------------------------------

/// Every kind of admin answer (probes, metrics, revoke, HEAD, 404, 405): what a browser pointed
/// at the admin port would get.
const ADMIN_REQUESTS: [(Method, &str, StatusCode); 7] = [
    (Method::GET, "/healthz", StatusCode::OK),
    (Method::HEAD, "/healthz", StatusCode::OK),
    (Method::GET, "/readyz", StatusCode::OK),
    (Method::GET, "/metrics", StatusCode::OK),
    (Method::POST, "/admin/users/nobody/revoke", StatusCode::OK),
    (Method::GET, "/nope", StatusCode::NOT_FOUND),
    (Method::POST, "/healthz", StatusCode::METHOD_NOT_ALLOWED),
];

const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The defaults on every admin answer (nosniff keeps a JSON or metrics text from being sniffed
/// into a document; DENY keeps it out of frames), no HSTS; `/metrics` keeps its type.
#[tokio::test]
async fn admin_answers_carry_the_defaults_and_metrics_keeps_its_type() {
    let h = Harness::start().await;
    for (method, path, status) in ADMIN_REQUESTS {
        let r = send(h.admin, method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(r.status, status, "admin {method} {path}");
        assert_defaults(&r.headers, &format!("admin {method} {path}"));
    }
    let metrics = send(h.admin, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(metrics.headers["content-type"], METRICS_TYPE);
    assert!(
        metrics.text().contains("countersign_"),
        "{}",
        metrics.text()
    );
    let ready = send(h.admin, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(ready.headers["content-type"], "application/json");
}

/// With an https public origin the main listener sends HSTS, the admin listener (plain http,
/// where browsers ignore it) does not; the rest of the set is the same on both.
#[tokio::test]
async fn admin_answers_get_no_hsts_with_an_https_public_origin() {
    let tls = start_tls("sec-admin-hsts", |_| {}).await;
    let (_, main) = https_get(&tls, "/auth/session").await;
    assert_eq!(main["strict-transport-security"], "max-age=31536000");
    for (method, path, status) in ADMIN_REQUESTS {
        let r = send(tls.h.admin, method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(r.status, status, "admin {method} {path}");
        assert_defaults(&r.headers, &format!("admin {method} {path} (https origin)"));
    }
}

/// The configured set reaches the admin answers too: overrides, removals, a CSP; a configured
/// HSTS does not (plain http); `/metrics` keeps its type.
#[tokio::test]
async fn admin_answers_follow_the_configured_headers() {
    let config = parse(
        &with_server(&format!(
            "[server.response_headers]\n\
             Content-Security-Policy = \"{CSP}\"\n\
             X-Frame-Options = \"SAMEORIGIN\"\n\
             Referrer-Policy = \"\"\n\
             Strict-Transport-Security = \"max-age=600; includeSubDomains\"\n"
        ))
        .replace("http://localhost:8080", "https://localhost:8443"),
    )
    .unwrap();
    let rules = ProxySettings::from_config(&config)
        .unwrap()
        .response_headers;
    let h = spa_with(
        "sec-admin-config",
        Box::new(move |s, _| s.response_headers = rules),
    )
    .await;
    for (method, path, status) in ADMIN_REQUESTS {
        let r = send(h.admin, method.clone(), path, &[], Bytes::new()).await;
        let what = format!("admin {method} {path}");
        assert_eq!(r.status, status, "{what}");
        assert_eq!(r.headers["content-security-policy"], CSP, "{what}");
        assert_eq!(r.headers["x-frame-options"], "SAMEORIGIN", "{what}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{what}");
        assert!(r.headers.get("referrer-policy").is_none(), "{what}");
        assert!(
            r.headers.get("strict-transport-security").is_none(),
            "{what}: HSTS on plain http"
        );
    }
    let metrics = send(h.admin, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(metrics.headers["content-type"], METRICS_TYPE);
}

/// A browser that can reach the admin listener (an operator's, on the private network) could be
/// made by any web page to POST a cross-site form to the revoke endpoint (no CORS preflight for
/// that, and the answer need not be read): logging a user out. Requests a page makes carry
/// `Origin` or `Sec-Fetch-Site`; they are refused 403 `csrf` and nothing is revoked. Scripts
/// (neither header) still revoke.
#[tokio::test]
async fn admin_revoke_refuses_requests_from_web_pages() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let session = get(h.addr, "/auth/session", &login).await;
    assert_eq!(session.status, StatusCode::OK);
    for headers in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ],
        vec![("sec-fetch-site", "same-site")],
    ] {
        let r = send(
            h.admin,
            Method::POST,
            "/admin/users/alice/revoke",
            &headers,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(r.error_code(), "csrf", "{headers:?}");
        assert_defaults(&r.headers, "refused revoke");
        let still = get(h.addr, "/auth/session", &login).await;
        assert_eq!(still.status, StatusCode::OK, "{headers:?}: revoked anyway");
    }
    let r = admin_revoke(h.admin, "alice").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["revoked"], 1);
    let gone = get(h.addr, "/auth/session", &login).await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------------
// countersign dev
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_its_page_with_the_defaults() {
    use countersign::proxy::dev::{self, DevOptions};
    let server = dev::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        password: Some("demo-pass".into()),
        ..DevOptions::default()
    })
    .await
    .unwrap();
    let addr = server.proxy.local_addr();
    let page = send(addr, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("/auth/login"));
    assert_defaults(&page.headers, "dev page");
    let origin = format!("http://127.0.0.1:{}", addr.port());
    let login = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", &origin)],
        r#"{"username":"demo","password":"demo-pass"}"#,
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text());
    assert_defaults(&login.headers, "dev login");
    // The demo API's answer, through the proxy, is the API's own.
    let cookie = login.session_cookie().unwrap();
    let api = send(
        addr,
        Method::GET,
        "/api/whoami",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(api.status, StatusCode::OK, "{}", api.text());
    assert!(api.headers.get("x-frame-options").is_none());
    server.shutdown().await;
}

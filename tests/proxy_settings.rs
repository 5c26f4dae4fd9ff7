//! The configurable limits of the proxy, each driven through a real config file: parsed by
//! `ProxyConfig`, turned into settings and state by `ProxySettings::from_config` /
//! `ProxyDeps::from_config`, and observed on a proxy serving on loopback.
//!
//! `upstream[].connect_timeout`, `upstream[].pool_max_idle_per_host`,
//! `upstream[].pool_idle_timeout`, `upstream[].ca_file`, `auth.max_login_body`,
//! `auth.verify_timeout`, `auth.max_concurrent_password_checks`, `server.max_static_file`,
//! plus the config errors of every new key and the defaults when they are absent.
//! Run: `cargo test --all-features --test proxy_settings`.

#![cfg(feature = "proxy")]

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use http::{Method, StatusCode};
use support::*;

/// A proxy started from `dir/proxy.toml`, the way `countersign run` starts one.
struct ConfiguredProxy {
    proxy: ProxyServer,
    deps: ProxyDeps,
}

impl ConfiguredProxy {
    fn addr(&self) -> std::net::SocketAddr {
        self.proxy.local_addr()
    }
}

/// Writes the keyring (k1/k2, k1 active: what [`test_keyring`] verifies), the users file
/// (alice) and `proxy.toml` = `[server]` on port 0 + `config_tail` into a fresh folder.
fn config_dir(tag: &str, server_extra: &str, config_tail: &str) -> TestDir {
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    write(
        &dir.join("proxy.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"{ORIGIN}\"\n{server_extra}\n\
             [signing]\nkeyring = \"keys.toml\"\n\n{config_tail}\n"
        ),
    );
    dir
}

async fn start_configured(dir: &Path, clock: SharedClock) -> ConfiguredProxy {
    let config = ProxyConfig::load(&dir.join("proxy.toml")).expect("config loads");
    let settings = ProxySettings::from_config(&config).expect("settings");
    let deps = ProxyDeps::from_config(&config, clock).expect("deps");
    let proxy = ProxyServer::start(settings, deps.clone())
        .await
        .expect("proxy starts");
    ConfiguredProxy { proxy, deps }
}

fn upstream_block(url: &str, extra: &str) -> String {
    format!("[[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"{url}\"\n{extra}\n")
}

async fn login_with_body(addr: std::net::SocketAddr, body: &str) -> Reply {
    send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        body.to_owned(),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// auth.max_login_body
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_login_body_over_max_login_body_is_413_and_changes_nothing() {
    let clock = ManualClock::new(T0);
    let upstream = start_upstream(test_keyring(), Arc::new(clock.clone())).await;
    let dir = config_dir(
        "login-body",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\nmax_login_body = \"100\"\n\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    let proxy = start_configured(&dir, Arc::new(clock.clone())).await;

    let credentials = format!("{{\"username\":\"alice\",\"password\":\"{ALICE_PASSWORD}\"");
    // The same valid credentials, padded past 100 bytes with a field the server ignores.
    let padded = format!("{credentials},\"pad\":\"{}\"}}", "x".repeat(80));
    assert!(padded.len() > 100);
    let r = login_with_body(proxy.addr(), &padded).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(r.error_code(), "body_too_large");
    assert!(r.set_cookie().is_none());
    assert_eq!(proxy.deps.sessions.count().await.unwrap(), 0);

    // Within the limit the same credentials log in.
    let exact = format!("{credentials}}}");
    assert!(exact.len() <= 100);
    let r = login_with_body(proxy.addr(), &exact).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.session_cookie().is_some());
    assert_eq!(proxy.deps.sessions.count().await.unwrap(), 1);
}

#[tokio::test]
async fn the_default_max_login_body_is_16_kib() {
    let clock = ManualClock::new(T0);
    let upstream = start_upstream(test_keyring(), Arc::new(clock.clone())).await;
    let dir = config_dir(
        "login-body-default",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    assert_eq!(config.auth.max_login_body, 16 * 1024);
    let proxy = start_configured(&dir, Arc::new(clock.clone())).await;
    let padded = |n: usize| {
        format!(
            "{{\"username\":\"alice\",\"password\":\"{ALICE_PASSWORD}\",\"pad\":\"{}\"}}",
            "x".repeat(n)
        )
    };
    // Sized so the whole body is just under / just over 16 KiB.
    let base = padded(0).len();
    let r = login_with_body(proxy.addr(), &padded(16 * 1024 - base)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = login_with_body(proxy.addr(), &padded(16 * 1024 - base + 1)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
}

// ---------------------------------------------------------------------------------------------
// upstream[].connect_timeout
// ---------------------------------------------------------------------------------------------

/// A loopback address whose connects hang: a listener with a backlog of 0 that never
/// accepts, its queue filled first. Linux then drops further SYNs (the client retransmits and
/// waits), which is what an unreachable or overloaded upstream looks like. Returns the
/// listener and the fillers (both must stay alive).
async fn hanging_address() -> (
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
    std::net::SocketAddr,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => fillers.push(stream),
            // The queue is full: this connect hangs, as the proxy's will.
            Err(_) => return (listener, fillers, addr),
            Ok(Err(e)) => panic!("filler connect failed: {e}"),
        }
    }
    panic!("the accept queue never filled; connects to {addr} do not hang on this machine");
}

#[tokio::test]
async fn connect_timeout_bounds_a_hanging_upstream_connect_with_502() {
    let (_listener, _fillers, addr) = hanging_address().await;
    let dir = config_dir(
        "connect-timeout",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            // Public route: no login needed. The response timeout is far longer than the
            // connect timeout, so only connect_timeout can end the wait early.
            upstream_block(
                &format!("http://{addr}"),
                "auth = \"none\"\ntimeout = \"20s\"\nconnect_timeout = \"300ms\""
            )
        ),
    );
    let proxy = start_configured(&dir, Arc::new(ManualClock::new(T0))).await;
    let started = Instant::now();
    let r = send(proxy.addr(), Method::GET, "/api/x", &[], Bytes::new()).await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn without_connect_timeout_the_route_timeout_answers_504() {
    // The contrast case: with the default connect timeout (5s) the shorter response timeout
    // fires first — so the 502 above really came from connect_timeout.
    let (_listener, _fillers, addr) = hanging_address().await;
    let dir = config_dir(
        "connect-timeout-default",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(
                &format!("http://{addr}"),
                "auth = \"none\"\ntimeout = \"400ms\""
            )
        ),
    );
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    assert_eq!(config.upstreams[0].connect_timeout, Duration::from_secs(5));
    let proxy = start_configured(&dir, Arc::new(ManualClock::new(T0))).await;
    let started = Instant::now();
    let r = send(proxy.addr(), Method::GET, "/api/x", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------------------------------------
// upstream[].ca_file
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ca_file_makes_a_private_ca_upstream_trusted_and_without_it_502() {
    let clock = ManualClock::new(T0);
    let (upstream, certificate) = start_tls_upstream(Arc::new(clock.clone())).await;
    let https_url = format!("https://127.0.0.1:{}", upstream.addr.port());

    let trusting = config_dir(
        "ca-file",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(&https_url, "auth = \"none\"\nca_file = \"upstream-ca.pem\"")
        ),
    );
    write(&trusting.join("upstream-ca.pem"), &certificate.pem());
    let proxy = start_configured(&trusting, Arc::new(clock.clone())).await;
    let r = send(proxy.addr(), Method::GET, "/api/tls", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(upstream.last_verified().uri, "/api/tls");

    let before = upstream.verified.lock().len();
    let untrusting = config_dir(
        "ca-file-absent",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(&https_url, "auth = \"none\"")
        ),
    );
    let proxy = start_configured(&untrusting, Arc::new(clock.clone())).await;
    let r = send(proxy.addr(), Method::GET, "/api/tls", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(upstream.verified.lock().len(), before);
}

#[test]
fn a_bad_ca_file_is_an_error_naming_the_key() {
    let dir = config_dir(
        "ca-file-bad",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block("https://127.0.0.1:1", "ca_file = \"ca.pem\"")
        ),
    );
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    assert_eq!(config.upstreams[0].ca_file, Some(dir.join("ca.pem")));
    // Missing.
    let err = ProxySettings::from_config(&config).unwrap_err();
    assert!(err.contains("upstream[0].ca_file"), "{err}");
    assert!(err.contains("proxy.toml"), "{err}");
    // Not PEM.
    write(&dir.join("ca.pem"), "hello\n");
    let err = ProxySettings::from_config(&config).unwrap_err();
    assert!(err.contains("upstream[0].ca_file"), "{err}");
    assert!(err.contains("no certificate"), "{err}");
    // A PEM block that is not a usable certificate.
    write(
        &dir.join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let err = ProxySettings::from_config(&config).unwrap_err();
    assert!(err.contains("upstream[0].ca_file"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// auth.verify_timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn verify_timeout_bounds_a_silent_verify_url_with_504() {
    // A credential API that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let held_by_task = held.clone();
    let _task = tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            held_by_task.lock().push(stream);
        }
    });
    let clock = ManualClock::new(T0);
    let upstream = start_upstream(test_keyring(), Arc::new(clock.clone())).await;
    let dir = config_dir(
        "verify-timeout",
        "",
        &format!(
            "[auth]\nverify_url = \"http://{silent_addr}/verify\"\nverify_timeout = \"300ms\"\n\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    let proxy = start_configured(&dir, Arc::new(clock.clone())).await;
    let started = Instant::now();
    let r = login_with_body(
        proxy.addr(),
        "{\"username\":\"alice\",\"password\":\"whatever\"}",
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.error_code(), "gateway_timeout");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(
        took < Duration::from_secs(5),
        "{took:?} (the default is 10s)"
    );
    assert_eq!(held.lock().len(), 1, "the proxy did reach the verify_url");
    assert_eq!(proxy.deps.sessions.count().await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// auth.verify_pool_max_lifetime
// ---------------------------------------------------------------------------------------------

/// A credential API that accepts every login as `alice` and counts the connections it was
/// given; answers keep the connection alive.
async fn counting_verify_api() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    verify_api(0, 0).await
}

/// A credential API that accepts every login as `alice`, its answer carrying `extra_fields`
/// header fields (`x-field-<i>: v`) and, when `big_value` > 0, one `x-big` field of that many
/// bytes beside the JSON; it counts the connections it was given.
async fn verify_api(
    extra_fields: usize,
    big_value: usize,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| async move {
                    let mut answer =
                        http::Response::builder().header("content-type", "application/json");
                    if big_value > 0 {
                        answer = answer.header("x-big", "b".repeat(big_value));
                    }
                    for i in 0..extra_fields {
                        answer = answer.header(format!("x-field-{i}"), "v");
                    }
                    Ok::<_, std::convert::Infallible>(
                        answer
                            .body(http_body_util::Full::new(Bytes::from_static(
                                b"{\"user\":\"alice\",\"roles\":[]}",
                            )))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A proxy whose `[auth]` names the credential API at `verify_addr` and adds `auth_lines`,
/// with its upstream and its folder (kept while the proxy runs).
async fn proxy_via_verify_url(
    tag: &str,
    verify_addr: std::net::SocketAddr,
    auth_lines: &str,
) -> (ConfiguredProxy, Upstream, TestDir) {
    let upstream = start_upstream(test_keyring(), Arc::new(ManualClock::new(T0))).await;
    let dir = config_dir(
        tag,
        "",
        &format!(
            "[auth]\nverify_url = \"http://{verify_addr}/verify\"\n{auth_lines}\n\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    let proxy = start_configured(&dir, Arc::new(countersign::clock::SystemClock)).await;
    (proxy, upstream, dir)
}

/// One login through [`proxy_via_verify_url`]: the answer.
async fn login_via(verify_addr: std::net::SocketAddr, auth_lines: &str) -> Reply {
    let (proxy, _upstream, _dir) =
        proxy_via_verify_url("verify-head", verify_addr, auth_lines).await;
    login_with_body(proxy.addr(), "{\"username\":\"alice\",\"password\":\"pw\"}").await
}

/// `auth.max_verify_answer_header_count` and `max_verify_answer_header_bytes` bound the head of
/// the credential API's answer: over either, the login answers 502 `bad_gateway` (nothing of
/// the answer is believed); within both, it logs in. A raised byte limit reads a head over
/// hyper's default (which the default refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_answer_head_limits_bound_the_credential_answer() {
    // About 23 fields and a 12 KiB head.
    let (api, _) = verify_api(20, 12 * 1024).await;
    for (lines, status) in [
        ("", StatusCode::OK),
        (
            "max_verify_answer_header_count = 10",
            StatusCode::BAD_GATEWAY,
        ),
        (
            "max_verify_answer_header_bytes = \"8KiB\"",
            StatusCode::BAD_GATEWAY,
        ),
        (
            "max_verify_answer_header_count = 30\nmax_verify_answer_header_bytes = \"16KiB\"",
            StatusCode::OK,
        ),
    ] {
        let r = login_via(api, lines).await;
        assert_eq!(r.status, status, "{lines:?}: {}", r.text());
        if status == StatusCode::BAD_GATEWAY {
            assert!(
                r.text().contains("\"bad_gateway\""),
                "{lines:?}: {}",
                r.text()
            );
        }
    }
    // A 500 KiB head: over hyper's default (~408 KiB), within a 1 MiB limit.
    let (api, _) = verify_api(0, 500 * 1024).await;
    let r = login_via(api, "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let r = login_via(api, "max_verify_answer_header_bytes = \"1MiB\"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// `auth.max_verify_answer_header_bytes` is exact: an answer head (status line to the blank
/// line, as read off the wire) of exactly the limit is read, one byte over is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_answer_head_bytes_is_an_exact_limit() {
    let (api, _) = verify_api(0, 12 * 1024).await;
    // The head's length, asked of the API the way the proxy asks (its `Date` has a fixed width).
    let mut tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"POST /verify HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let head = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut chunk)
            .await
            .unwrap();
        assert!(n > 0, "the API closed before its head ended");
        raw.extend_from_slice(&chunk[..n]);
    };
    assert!(head > 12 * 1024, "{head}");
    let at = |bytes: usize| format!("max_verify_answer_header_bytes = {bytes}");
    let r = login_via(api, &at(head)).await;
    assert_eq!(r.status, StatusCode::OK, "{head}: {}", r.text());
    let r = login_via(api, &at(head - 1)).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "{}: {}",
        head - 1,
        r.text()
    );
}

/// Logins through a proxy whose `[auth]` names a counting credential API and adds
/// `auth_lines`, one at a time and `pause` apart, while `more(the logins so far)`: how many
/// connections the credential API saw, and when each login (all succeeded) started and ended.
async fn logins_via_verify_url(
    auth_lines: &str,
    pause: Duration,
    mut more: impl FnMut(&RequestSpans) -> bool,
) -> (usize, Vec<(Instant, Instant)>) {
    let (verify_addr, accepted) = counting_verify_api().await;
    let (proxy, _upstream, _dir) =
        proxy_via_verify_url("verify-pool", verify_addr, auth_lines).await;
    let mut logins = Vec::new();
    while more(&logins) {
        let started = Instant::now();
        let r = login_with_body(proxy.addr(), "{\"username\":\"alice\",\"password\":\"pw\"}").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        logins.push((started, Instant::now()));
        tokio::time::sleep(pause).await;
    }
    (accepted.load(Ordering::SeqCst), logins)
}

/// Logins through a proxy configured with `lifetime_line`, 20 ms apart, until there were at
/// least 10 and `more(the logins so far)` is false: how many connections the credential API
/// saw, and the logins' times.
async fn verify_connections_with(
    lifetime_line: &str,
    mut more: impl FnMut(&RequestSpans) -> bool,
) -> (usize, Vec<(Instant, Instant)>) {
    logins_via_verify_url(lifetime_line, Duration::from_millis(20), |logins| {
        logins.len() < 10 || more(logins)
    })
    .await
}

/// Until the logins have gone on for 1.3 s (over 4 lifetimes of 300 ms).
fn for_1300ms(logins: &RequestSpans) -> bool {
    logins
        .first()
        .is_none_or(|&(first, _)| first.elapsed() < Duration::from_millis(1300))
}

/// A connection past its lifetime is never taken again: with logins further apart than the
/// lifetime, each one connects anew (hyper-util's client, used before, served one more login
/// on it first).
#[tokio::test]
async fn a_verify_connection_past_its_lifetime_serves_no_other_login() {
    let (connections, logins) = logins_via_verify_url(
        "verify_pool_max_lifetime = \"50ms\"",
        Duration::from_millis(150),
        |done| done.len() < 5,
    )
    .await;
    assert_eq!(logins.len(), 5);
    assert_eq!(connections, 5, "{connections} connections for 5 logins");
}

#[tokio::test]
async fn verify_pool_max_lifetime_retires_the_credential_apis_connections() {
    // 300 ms: a new connection once a lifetime has passed, none before. Logins until they
    // needed 4 connections at least (timed by the logins themselves, so a stalled machine
    // only makes the run longer): never retired would be 1, a connection per login as many
    // as the logins (10 at least, about 40 unloaded).
    let lifetime = Duration::from_millis(300);
    let (connections, logins) =
        verify_connections_with("verify_pool_max_lifetime = \"300ms\"", |logins| {
            fewest_connections(logins, lifetime) < 4
        })
        .await;
    let fewest = fewest_connections(&logins, lifetime);
    // One more than a lifetime each allows: a margin.
    let most = most_connections(&logins, lifetime) + 1;
    assert!(
        (fewest..=most).contains(&connections) && connections < logins.len(),
        "{connections} connections for {} logins over {:?} ({fewest}..={most} expected)",
        logins.len(),
        logins[logins.len() - 1].1 - logins[0].0
    );
    // "off": one keep-alive connection serves them all.
    let (connections, logins) =
        verify_connections_with("verify_pool_max_lifetime = \"off\"", for_1300ms).await;
    assert_eq!(
        connections,
        1,
        "without a lifetime, one connection for {} logins",
        logins.len()
    );
    // The default (1 h) is not "off" by accident, and is not short either.
    let (connections, _) = verify_connections_with("", for_1300ms).await;
    assert_eq!(
        connections, 1,
        "the 1 h default retired a connection within seconds"
    );
}

#[test]
fn verify_pool_max_lifetime_is_parsed_checked_and_reaches_the_settings() {
    let with_verify = |line: &str| {
        with_upstream("").replace(
            "users_file = \"users.toml\"\n",
            &format!("verify_url = \"http://127.0.0.1:3000/verify\"\n{line}\n"),
        )
    };
    let config = parse(&with_verify("verify_pool_max_lifetime = \"2m\"")).unwrap();
    assert_eq!(
        config.auth.verify_pool_max_lifetime,
        Some(Duration::from_secs(120))
    );
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(
        settings.verify_pool_max_lifetime,
        Some(Duration::from_secs(120))
    );
    let config = parse(&with_verify("verify_pool_max_lifetime = \"off\"")).unwrap();
    assert_eq!(config.auth.verify_pool_max_lifetime, None);
    let config = parse(&with_verify("")).unwrap();
    assert_eq!(
        config.auth.verify_pool_max_lifetime,
        Some(Duration::from_secs(3600))
    );
    for (text, problem) in [
        (
            with_verify("verify_pool_max_lifetime = \"0s\""),
            "greater than zero",
        ),
        (
            with_verify("verify_pool_max_lifetime = \"soon\""),
            "invalid duration",
        ),
        (
            with_upstream("").replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nverify_pool_max_lifetime = \"1h\"\n",
            ),
            "only used with auth.verify_url",
        ),
    ] {
        let err = parse(&text).expect_err(problem).to_string();
        assert!(
            err.contains("auth.verify_pool_max_lifetime") && err.contains(problem),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// auth.max_concurrent_password_checks
// ---------------------------------------------------------------------------------------------

/// An argon2id hash slow enough (tens of ms even in release) that concurrent checks overlap.
fn slow_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(16 * 1024, 4, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// Runs 4 concurrent logins through a proxy configured with `max_checks` and returns the most
/// password checks seen running at once.
async fn peak_concurrent_checks(max_checks: Option<usize>) -> usize {
    let clock = ManualClock::new(T0);
    let upstream = start_upstream(test_keyring(), Arc::new(clock.clone())).await;
    let limit = max_checks
        .map(|n| format!("max_concurrent_password_checks = {n}\n"))
        .unwrap_or_default();
    let dir = config_dir(
        "password-checks",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n{limit}\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    write(
        &dir.join("users.toml"),
        &format!(
            "[[users]]\nname = \"carol\"\npassword = \"{}\"\nroles = []\n",
            slow_hash("carol-password")
        ),
    );
    let proxy = start_configured(&dir, Arc::new(clock.clone())).await;
    let users = proxy.deps.users.clone().expect("users file configured");
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(users.checks_in_progress(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let addr = proxy.addr();
    let logins: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                login_with_body(
                    addr,
                    "{\"username\":\"carol\",\"password\":\"carol-password\"}",
                )
                .await
                .status
            })
        })
        .collect();
    for login in logins {
        assert_eq!(login.await.unwrap(), StatusCode::OK);
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    peak.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_password_checks_from_the_config_is_enforced() {
    assert_eq!(peak_concurrent_checks(Some(1)).await, 1);
    // The contrast: with room for 4 checks, 4 logins do overlap (so the sampler can see it).
    assert!(peak_concurrent_checks(Some(4)).await >= 2);
}

// ---------------------------------------------------------------------------------------------
// server.max_static_file
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_static_file_over_max_static_file_is_a_clear_500_not_a_404() {
    let clock = ManualClock::new(T0);
    let upstream = start_upstream(test_keyring(), Arc::new(clock.clone())).await;
    let dir = config_dir(
        "static-limit",
        "static_dir = \"site\"\nmax_static_file = \"1KiB\"",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(&upstream.url(), "")
        ),
    );
    write(&dir.join("site/index.html"), "<!doctype html><p>app</p>");
    write(&dir.join("site/small.js"), &"s".repeat(1024));
    write(&dir.join("site/big.js"), &"b".repeat(1025));
    // An extension-less file is looked up like a client route: too big must not fall back to
    // index.html either.
    write(&dir.join("site/bigroute"), &"r".repeat(2048));
    let proxy = start_configured(&dir, Arc::new(clock.clone())).await;

    let r = send(proxy.addr(), Method::GET, "/small.js", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 1024);
    for path in ["/big.js", "/bigroute"] {
        let r = send(proxy.addr(), Method::GET, path, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert_eq!(r.error_code(), "internal_error", "{path}");
        assert!(!r.text().contains("bbbb"), "{path}");
    }
    // Client routes still get index.html.
    let r = send(proxy.addr(), Method::GET, "/some/route", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("app"));
}

// ---------------------------------------------------------------------------------------------
// auth.verify_pool_max_idle, auth.verify_pool_idle_timeout
// ---------------------------------------------------------------------------------------------

/// `count` logins, `pause` apart, through a proxy whose `[auth]` adds `pool_lines`: how many
/// connections the credential API saw.
async fn verify_connections_for(pool_lines: &str, count: usize, pause: Duration) -> usize {
    logins_via_verify_url(pool_lines, pause, |logins| logins.len() < count)
        .await
        .0
}

#[tokio::test]
async fn verify_pool_keys_decide_which_credential_connections_are_kept() {
    // The default keeps the connection for the next login.
    let kept = verify_connections_for("", 4, Duration::from_millis(300)).await;
    assert_eq!(
        kept, 1,
        "the default pool made {kept} connections for 4 logins"
    );
    // 0 idle connections: each login makes its own.
    let none =
        verify_connections_for("verify_pool_max_idle = 0", 4, Duration::from_millis(50)).await;
    assert_eq!(
        none, 4,
        "verify_pool_max_idle = 0 made {none} connections for 4 logins"
    );
    // An idle connection older than the idle timeout is not reused.
    let expired = verify_connections_for(
        "verify_pool_idle_timeout = \"100ms\"",
        3,
        Duration::from_millis(400),
    )
    .await;
    assert_eq!(
        expired, 3,
        "a 100 ms idle timeout made {expired} connections for 3 logins 400 ms apart"
    );
}

#[test]
fn verify_pool_and_readiness_keys_are_parsed_checked_and_reach_the_settings() {
    let with_verify = |line: &str| {
        with_upstream("").replace(
            "users_file = \"users.toml\"\n",
            &format!("verify_url = \"http://127.0.0.1:3000/verify\"\n{line}\n"),
        )
    };
    let with_admin = |lines: &str| {
        with_upstream("").replace(
            "[auth]\n",
            &format!("[admin]\nlisten = \"127.0.0.1:9090\"\n{lines}\n[auth]\n"),
        )
    };
    // The defaults: what was built in before the keys existed.
    let config = parse(&with_verify("")).unwrap();
    assert_eq!(config.auth.verify_pool_max_idle, 16);
    assert_eq!(
        config.auth.verify_pool_idle_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(config.admin.readiness.probe_timeout, Duration::from_secs(1));
    assert_eq!(config.admin.readiness.reuse_for, Duration::from_secs(2));
    let config = parse(&with_verify(
        "verify_pool_max_idle = 0\nverify_pool_idle_timeout = \"90s\"",
    ))
    .unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.verify_answer_head.max_bytes, 8192 + 4096 * 100);
    assert_eq!(settings.verify_answer_head.max_fields, 100);
    assert_eq!(settings.verify_pool_max_idle, 0);
    assert_eq!(settings.verify_pool_idle_timeout, Duration::from_secs(90));
    let config = parse(&with_admin(
        "readiness_probe_timeout = \"250ms\"\nreadiness_cache = \"60s\"",
    ))
    .unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.readiness.probe_timeout, Duration::from_millis(250));
    assert_eq!(settings.readiness.reuse_for, Duration::from_secs(60));
    for (text, key, problem) in [
        (
            with_verify("verify_pool_max_idle = 65537"),
            "auth.verify_pool_max_idle",
            "more than 65536",
        ),
        (
            with_verify("verify_pool_max_idle = -1"),
            "auth.verify_pool_max_idle",
            "invalid value",
        ),
        (
            with_upstream("").replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nverify_pool_max_idle = 4\n",
            ),
            "auth.verify_pool_max_idle",
            "only used with auth.verify_url",
        ),
        (
            with_verify("verify_pool_idle_timeout = \"0s\""),
            "auth.verify_pool_idle_timeout",
            "greater than zero",
        ),
        (
            with_upstream("").replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nverify_pool_idle_timeout = \"1m\"\n",
            ),
            "auth.verify_pool_idle_timeout",
            "only used with auth.verify_url",
        ),
        (
            with_verify("max_verify_answer_header_count = 0"),
            "auth.max_verify_answer_header_count",
            "must be between 1 and",
        ),
        (
            with_verify("max_verify_answer_header_bytes = \"4KiB\""),
            "auth.max_verify_answer_header_bytes",
            "must be between 8KiB and 16MiB",
        ),
        (
            with_verify("max_verify_answer_header_bytes = \"17MiB\""),
            "auth.max_verify_answer_header_bytes",
            "must be between 8KiB and 16MiB",
        ),
        (
            with_upstream("").replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_verify_answer_header_count = 50\n",
            ),
            "auth.max_verify_answer_header_count",
            "only used with auth.verify_url",
        ),
        (
            with_upstream("").replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_verify_answer_header_bytes = \"64KiB\"\n",
            ),
            "auth.max_verify_answer_header_bytes",
            "only used with auth.verify_url",
        ),
        (
            with_admin("readiness_probe_timeout = \"0ms\""),
            "admin.readiness_probe_timeout",
            "greater than zero",
        ),
        (
            with_admin("readiness_probe_timeout = \"61s\""),
            "admin.readiness_probe_timeout",
            "longer than 60s",
        ),
        (
            with_admin("readiness_cache = \"2h\""),
            "admin.readiness_cache",
            "longer than 60s",
        ),
        (
            with_admin("readiness_cache = \"often\""),
            "admin.readiness_cache",
            "invalid duration",
        ),
        (
            with_upstream("").replace("[auth]\n", "[admin]\nreadiness_cache = \"5s\"\n[auth]\n"),
            "admin.readiness_cache",
            "only used with admin.listen",
        ),
        (
            with_upstream("").replace(
                "[auth]\n",
                "[admin]\nreadiness_probe_timeout = \"5s\"\n[auth]\n",
            ),
            "admin.readiness_probe_timeout",
            "only used with admin.listen",
        ),
    ] {
        let err = parse(&text).expect_err(key).to_string();
        assert!(err.contains(key) && err.contains(problem), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Defaults and config errors
// ---------------------------------------------------------------------------------------------

const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
                    [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n";

fn with_upstream(extra: &str) -> String {
    format!("{BASE}{}", upstream_block("http://127.0.0.1:3000", extra))
}

fn parse(text: &str) -> Result<ProxyConfig, countersign::proxy::config::ConfigError> {
    ProxyConfig::parse(text, Path::new("/etc/countersign/proxy.toml"))
}

#[test]
fn new_keys_default_to_the_previously_built_in_values() {
    let config = parse(&with_upstream("")).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(upstream.pool_idle_timeout, Duration::from_secs(60));
    assert_eq!(upstream.pool_max_idle_per_host, 1024);
    assert_eq!(upstream.ca_file, None);
    assert_eq!(config.auth.max_login_body, 16 * 1024);
    assert_eq!(config.auth.verify_timeout, Duration::from_secs(10));
    assert_eq!(config.server.max_static_file, 32 * 1024 * 1024);
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.max_login_body, 16 * 1024);
    assert_eq!(settings.verify_timeout, Duration::from_secs(10));
    assert_eq!(
        settings.routes[0].connect.connect_timeout,
        Duration::from_secs(5)
    );
    assert_eq!(settings.routes[0].connect.pool_max_idle_per_host, 1024);
}

#[test]
fn new_keys_are_parsed_and_reach_the_settings() {
    let text = with_upstream(
        "connect_timeout = \"750ms\"\npool_idle_timeout = \"2m\"\npool_max_idle_per_host = 0",
    )
    .replace(
        "users_file = \"users.toml\"\n",
        "verify_url = \"http://127.0.0.1:3000/verify\"\nverify_timeout = \"3s\"\nmax_login_body = \"2KiB\"\n",
    );
    let config = parse(&text).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.connect_timeout, Duration::from_millis(750));
    assert_eq!(upstream.pool_idle_timeout, Duration::from_secs(120));
    assert_eq!(upstream.pool_max_idle_per_host, 0);
    assert_eq!(config.auth.verify_timeout, Duration::from_secs(3));
    assert_eq!(config.auth.max_login_body, 2048);
    let settings = ProxySettings::from_config(&config).unwrap();
    let connect = &settings.routes[0].connect;
    assert_eq!(connect.connect_timeout, Duration::from_millis(750));
    assert_eq!(connect.pool_idle_timeout, Duration::from_secs(120));
    assert_eq!(connect.pool_max_idle_per_host, 0);
    assert_eq!(settings.verify_timeout, Duration::from_secs(3));
    assert_eq!(settings.max_login_body, 2048);
}

#[test]
fn bad_values_of_the_new_keys_name_file_key_and_problem() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            with_upstream("connect_timeout = \"0s\""),
            "upstream[0].connect_timeout",
            "greater than zero",
        ),
        (
            with_upstream("connect_timeout = \"soon\""),
            "upstream[0].connect_timeout",
            "invalid duration",
        ),
        (
            with_upstream("pool_idle_timeout = \"5x\""),
            "upstream[0].pool_idle_timeout",
            "invalid duration",
        ),
        (
            with_upstream("pool_max_idle_per_host = -1"),
            "upstream[0].pool_max_idle_per_host",
            "",
        ),
        (
            with_upstream("ca_file = \"ca.pem\""),
            "upstream[0].ca_file",
            "https",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nverify_timeout = \"5s\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "auth.verify_timeout",
            "only used with auth.verify_url",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "verify_url = \"http://127.0.0.1:3000/v\"\nverify_timeout = \"0s\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "auth.verify_timeout",
            "greater than zero",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_login_body = \"10\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "auth.max_login_body",
            "at least 64 bytes",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_login_body = \"16 KiB\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "auth.max_login_body",
            "invalid size",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_dir = \"dist\"\nmax_static_file = 0\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "server.max_static_file",
            "greater than zero",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nmax_static_file = \"1MiB\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "server.max_static_file",
            "only used with server.static_dir",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_dir = \"dist\"\nmax_static_file = \"lots\"\n",
            ) + &upstream_block("http://127.0.0.1:3000", ""),
            "server.max_static_file",
            "invalid size",
        ),
    ];
    for (text, key, problem) in cases {
        let err = parse(&text).expect_err(key);
        assert_eq!(err.key(), key, "{err}");
        assert!(err.problem().contains(problem), "{key}: {err}");
        assert!(
            err.to_string().starts_with("/etc/countersign/proxy.toml: "),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// upstream[].pool_max_idle_per_host, upstream[].pool_idle_timeout
// ---------------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 upstream answering 200 to anything, counting the TCP connections it
/// accepts (what the proxy's pool settings decide).
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// Upstream connections opened for `requests` sequential requests through a proxy whose
/// route has `pool_keys`, with `pause` between requests.
async fn upstream_connections(pool_keys: &str, requests: usize, pause: Duration) -> usize {
    let (addr, accepted) = counting_upstream().await;
    let dir = config_dir(
        "pool",
        "",
        &format!(
            "[auth]\nusers_file = \"users.toml\"\n\n{}",
            upstream_block(
                &format!("http://{addr}"),
                &format!("auth = \"none\"\n{pool_keys}")
            )
        ),
    );
    let proxy = start_configured(&dir, Arc::new(ManualClock::new(T0))).await;
    for i in 0..requests {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        let r = send(proxy.addr(), Method::GET, "/api/x", &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    accepted.load(Ordering::SeqCst)
}

#[tokio::test]
async fn pool_max_idle_per_host_zero_opens_a_connection_per_request() {
    // Default pool: one kept-alive connection serves all three requests.
    assert_eq!(
        upstream_connections("", 3, Duration::from_millis(50)).await,
        1
    );
    assert_eq!(
        upstream_connections("pool_max_idle_per_host = 0", 3, Duration::from_millis(50)).await,
        3
    );
}

#[tokio::test]
async fn pool_idle_timeout_drops_idle_upstream_connections() {
    // Idle longer than the configured 200ms: the second request needs a new connection;
    // with the default (60s) the same pause reuses the first.
    assert_eq!(
        upstream_connections(
            "pool_idle_timeout = \"200ms\"",
            2,
            Duration::from_millis(700)
        )
        .await,
        2
    );
    assert_eq!(
        upstream_connections("", 2, Duration::from_millis(700)).await,
        1
    );
}

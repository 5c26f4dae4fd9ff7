//! DNS rebinding against the admin listener, as a real browser does it. The listener is plain
//! http, and a rebound origin (`http://rebind.attacker.example:9090`) is not a potentially
//! trustworthy URL, so the browser sends no `Sec-Fetch-*` (Fetch Metadata goes only to
//! trustworthy URLs) and no `Origin` on a GET: the `Sec-Fetch-Site: same-origin` refusal never
//! fires, and the page read `/metrics`. What every such request does carry is the page's own
//! host name in `Host`. The listener now answers only a `Host` that is an IP literal,
//! `localhost`, or a name listed in `admin.allowed_hosts`; anything else (no `Host`, two) is
//! 403 `csrf`.
//! A real proxy on loopback: the in-process harness for the defaults, `countersign run` with a
//! config file for `admin.allowed_hosts`.
//! Run: `cargo test --all-features --test proxy_admin_rebinding`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support::*;
use support_run::*;

/// The read-only endpoints a rebound page would read.
const READ_ENDPOINTS: [&str; 3] = ["/metrics", "/readyz", "/healthz"];

/// One raw HTTP/1.x exchange (`head` is the request line and header lines, without the blank
/// line); the status and the body of the answer.
async fn exchange(addr: SocketAddr, head: &str) -> (u16, String) {
    let answer = raw_exchange(
        addr,
        format!("{head}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?} (request {head:?})"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `GET path` with exactly the one `Host` header `host` (and nothing a browser adds over plain
/// http to a page's own origin: no `Origin`, no `Sec-Fetch-*`).
async fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}")).await
}

/// Asserts a refusal: 403 `{"error":"csrf"}`, nothing of the endpoint's own answer.
fn assert_refused((status, body): &(u16, String), what: &str) {
    assert_eq!(*status, 403, "{what}: answered {status}: {body}");
    assert!(body.contains("\"error\":\"csrf\""), "{what}: {body}");
    assert!(!body.contains("countersign_"), "{what}: {body}");
    assert!(!body.contains("upstreams"), "{what}: {body}");
}

/// The exact requests a browser sends after a page on `http://rebind.attacker.example:PORT`
/// rebound its name to the admin listener's address and `fetch`es `/metrics` (and the others):
/// `Host` is the attacker's name, and there is no `Origin` (a same-origin GET) and no
/// `Sec-Fetch-*` (the origin is not potentially trustworthy). They were answered 200 with the
/// metrics (upstream names, session counts); now 403 `csrf`, HEAD too.
#[tokio::test]
async fn a_rebound_host_name_cannot_read_the_admin_endpoints() {
    let h = Harness::start().await;
    let host = format!("rebind.attacker.example:{}", h.admin.port());
    for path in READ_ENDPOINTS {
        let answer = get_with_host(h.admin, path, &host).await;
        assert_refused(&answer, &format!("GET {path} Host: {host}"));
        let (status, _) = exchange(h.admin, &format!("HEAD {path} HTTP/1.1\r\nHost: {host}")).await;
        assert_eq!(status, 403, "HEAD {path} Host: {host}");
        // The name alone, without the port (a page on port 80 rebound to a listener on 80).
        let answer = get_with_host(h.admin, path, "rebind.attacker.example").await;
        assert_refused(
            &answer,
            &format!("GET {path} Host: rebind.attacker.example"),
        );
    }
    // A browser of a page that is trustworthy after all (https rebound to an http listener is
    // not possible, but a fetch from a secure context would add them) is refused too.
    let (status, _) = exchange(
        h.admin,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: {host}\r\nSec-Fetch-Site: same-origin\r\n\
             Sec-Fetch-Mode: cors"
        ),
    )
    .await;
    assert_eq!(status, 403);
    // Revoke under a rebound name revokes nothing (browsers also send Origin on a POST).
    let login = h.login("alice", ALICE_PASSWORD).await;
    let answer = exchange(
        h.admin,
        &format!("POST /admin/users/alice/revoke HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0"),
    )
    .await;
    assert_refused(&answer, "revoke under a rebound name");
    let r = get(h.addr, "/auth/session?touch=false", &login).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "alice's session is gone: {}",
        r.text()
    );
    // Names that only look local are names: a rebinding can use them.
    for host in [
        "127.0.0.1.nip.io",
        "localhost.attacker.example",
        "attacker-localhost",
        "0x7f000001",
        "127.1",
        "[::1].attacker.example",
        "user@127.0.0.1",
        "127.0.0.1:9090:80",
        "127.0.0.1:65536",
        "127.0.0.1:+80",
        "[::1:9090",
        "::1",
        "",
    ] {
        let answer = get_with_host(h.admin, "/metrics", host).await;
        assert_refused(&answer, &format!("Host: {host:?}"));
    }
}

/// Probes and scrapers that name the listener by address are served: kubelet's `httpGet`
/// probes and Prometheus' pod discovery send the pod IP, scripts and compose health checks
/// `127.0.0.1` or `localhost`. IP literals (IPv4, bracketed IPv6) and `localhost` in any case,
/// with or without a port: no rebinding arrives under an IP literal (it needs a DNS name), and
/// `localhost` is resolved by the browser's own machine.
#[tokio::test]
async fn ip_literals_and_localhost_are_served() {
    let h = Harness::start().await;
    let port = h.admin.port();
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("10.1.2.3:{port}"),
        format!("[::1]:{port}"),
        "[::1]".to_owned(),
        format!("[fd00::7]:{port}"),
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("LocalHost:{port}"),
        "localhost.".to_owned(),
    ] {
        for path in READ_ENDPOINTS {
            let (status, body) = get_with_host(h.admin, path, &host).await;
            assert_eq!(status, 200, "GET {path} Host: {host}: {body}");
        }
    }
    let (status, body) = get_with_host(h.admin, "/metrics", &format!("[::1]:{port}")).await;
    assert_eq!(status, 200);
    assert!(body.contains("countersign_"), "{body}");
    // Revoke from a script naming the listener by address.
    let answer = exchange(
        h.admin,
        &format!(
            "POST /admin/users/nobody/revoke HTTP/1.1\r\nHost: localhost:{port}\r\n\
             Content-Length: 0"
        ),
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
}

/// A request without a `Host` (HTTP/1.0, or HTTP/1.1 breaking RFC 9112), with two, or whose
/// absolute-form target names another host than its `Host`, is refused: what the browser
/// means cannot be told, so nothing is answered.
#[tokio::test]
async fn a_missing_repeated_or_contradicted_host_is_refused() {
    let h = Harness::start().await;
    let port = h.admin.port();
    let cases = [
        "GET /metrics HTTP/1.0".to_owned(),
        "GET /metrics HTTP/1.1".to_owned(),
        format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Host: rebind.attacker.example:{port}"
        ),
        format!(
            "GET /metrics HTTP/1.1\r\nHost: rebind.attacker.example:{port}\r\n\
             Host: 127.0.0.1:{port}"
        ),
        format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: 127.0.0.1:{port}"),
        format!(
            "GET http://rebind.attacker.example:{port}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}"
        ),
    ];
    for head in cases {
        let answer = exchange(h.admin, &head).await;
        assert_refused(&answer, &head);
    }
    // An absolute-form target naming an allowed host is served as the origin-form one.
    let (status, body) = exchange(
        h.admin,
        &format!("GET http://127.0.0.1:{port}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// HTTP/2 (h2c with prior knowledge, which the admin listener speaks) names the host in
/// `:authority`: checked the same way.
#[tokio::test]
async fn http2_authority_is_checked_too() {
    let h = Harness::start().await;
    let port = h.admin.port();
    let mut sender = support_h2::h2c::<Full<Bytes>>(h.admin).await;
    for (authority, expected) in [
        (
            format!("rebind.attacker.example:{port}"),
            StatusCode::FORBIDDEN,
        ),
        (format!("127.0.0.1:{port}"), StatusCode::OK),
        (format!("[::1]:{port}"), StatusCode::OK),
        (format!("localhost:{port}"), StatusCode::OK),
    ] {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{authority}/metrics"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.expect("h2 answer");
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, expected, ":authority {authority}: {body}");
        if expected == StatusCode::FORBIDDEN {
            assert!(body.contains("\"error\":\"csrf\""), "{body}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// admin.allowed_hosts: a running `countersign run`, and the config's checks
// ---------------------------------------------------------------------------------------------

/// The name a Prometheus that scrapes through a Service would send.
const SERVICE_NAME: &str = "countersign-admin.monitoring.svc";

/// A config directory for `countersign run` on `listen`, admin on `admin` with `admin_extra`
/// lines in `[admin]`; its `proxy.toml`.
fn config_with_admin(dir: &Path, listen: SocketAddr, admin: SocketAddr, admin_extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    // No upstream is contacted (its probe fails, which /metrics reports and /healthz ignores).
    let text = config_text(&listen.to_string(), None, "http://127.0.0.1:9").replace(
        "[session]",
        &format!("[admin]\nlisten = \"{admin}\"\n{admin_extra}\n[session]"),
    );
    write(&dir.join("proxy.toml"), &text);
}

/// Operators whose Prometheus scrapes by a DNS name (a Service) list it in
/// `admin.allowed_hosts`: that name is served (any case, with a port, written as a fully
/// qualified name), other names still are not; IP literals and `localhost` still are. The key
/// is live: a SIGHUP with it changed applies it to the next request (the new name served, the
/// old one refused), except when `admin.listen` changed with it (the names are then the new
/// listener's, and wait for the restart with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_names_the_listener_for_scrapers_and_a_reload_changes_them() {
    let dir = temp_dir("admin-allowed-hosts");
    let config_dir = dir.to_path_buf();
    let (mut proxy, _addr, admin) = start_on_free_ports(|addr, admin| {
        config_with_admin(
            &config_dir,
            addr,
            admin,
            &format!("allowed_hosts = [\"{SERVICE_NAME}\"]"),
        );
        RunningProxy::spawn(&config_dir.join("proxy.toml"), &[])
    });
    proxy.wait_listening(admin);
    let port = admin.port();
    for host in [
        format!("{SERVICE_NAME}:{port}"),
        SERVICE_NAME.to_owned(),
        SERVICE_NAME.to_uppercase(),
        format!("{SERVICE_NAME}.:{port}"),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
    ] {
        for path in ["/metrics", "/healthz"] {
            let (status, body) = get_with_host(admin, path, &host).await;
            assert_eq!(status, 200, "GET {path} Host: {host}: {body}");
        }
    }
    for host in [
        format!("rebind.attacker.example:{port}"),
        "monitoring.svc".to_owned(),
        format!("x.{SERVICE_NAME}"),
        format!("{SERVICE_NAME}.attacker.example"),
        "countersign-admin".to_owned(),
    ] {
        let answer = get_with_host(admin, "/metrics", &host).await;
        assert_refused(&answer, &format!("Host: {host}"));
    }
    // The refusal is logged (paced), naming the host and the key that would allow it.
    let log = proxy.wait_for_log("admin.allowed_hosts");
    let line = log
        .lines()
        .find(|line| line.contains("admin.allowed_hosts"))
        .unwrap_or_default();
    assert!(line.contains("\"WARN\""), "{line}");
    assert!(line.contains("rebind.attacker.example"), "{line}");

    // Changed, then SIGHUP: applied, the next request sees the new names.
    let config = config_dir.join("proxy.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let renamed = text.replace(SERVICE_NAME, "other-name.monitoring.svc");
    write(&config, &renamed);
    proxy.signal("HUP");
    let applied = proxy.wait_json_messages("INFO", &["SIGHUP:", "proxy.toml: applied"], 1);
    assert!(applied[0].contains("admin.allowed_hosts"), "{applied:?}");
    assert!(
        proxy
            .json_messages("WARN", &["SIGHUP:", "restart"])
            .is_empty(),
        "{}",
        proxy.log()
    );
    let (status, _) = get_with_host(admin, "/metrics", "other-name.monitoring.svc").await;
    assert_eq!(status, 200);
    let answer = get_with_host(admin, "/metrics", SERVICE_NAME).await;
    assert_refused(&answer, "the name a reload removed");

    // Edited with `admin.listen`: the names are the new listener's, and wait with it.
    let other_port = free_port();
    write(
        &config,
        &renamed
            .replace(
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{other_port}"),
            )
            .replace("other-name.monitoring.svc", "third-name.monitoring.svc"),
    );
    proxy.signal("HUP");
    let waiting = proxy.wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    assert!(waiting[0].contains("admin.allowed_hosts"), "{waiting:?}");
    assert!(waiting[0].contains("admin.listen"), "{waiting:?}");
    let (status, _) = get_with_host(admin, "/metrics", "other-name.monitoring.svc").await;
    assert_eq!(status, 200);
    let answer = get_with_host(admin, "/metrics", "third-name.monitoring.svc").await;
    assert_refused(&answer, "a name edited with admin.listen");
    assert!(proxy.stop().success());
    drop(dir);
}

const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
     [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
     [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n";

fn parse_admin(
    admin: &str,
) -> Result<countersign::proxy::config::ProxyConfig, countersign::proxy::config::ConfigError> {
    countersign::proxy::config::ProxyConfig::parse(
        &format!("{BASE}[admin]\n{admin}\n"),
        Path::new("/etc/countersign/proxy.toml"),
    )
}

/// Each bad entry is an error naming the file, the entry's key and what is wrong with it.
#[test]
fn bad_allowed_hosts_entries_name_the_file_the_key_and_the_problem() {
    let listen = "listen = \"127.0.0.1:9090\"\n";
    let cases: [(&str, &str, &str); 14] = [
        ("\"\"", "admin.allowed_hosts[0]", "empty"),
        ("\"   \"", "admin.allowed_hosts[0]", "not a host name"),
        (
            "\"admin.svc:9090\"",
            "admin.allowed_hosts[0]",
            "without a port",
        ),
        (
            "\"http://admin.svc\"",
            "admin.allowed_hosts[0]",
            "without a scheme",
        ),
        (
            "\"admin.svc/metrics\"",
            "admin.allowed_hosts[0]",
            "without a path",
        ),
        ("\"10.0.0.5\"", "admin.allowed_hosts[0]", "IP address"),
        ("\"[::1]\"", "admin.allowed_hosts[0]", "IP address"),
        ("\"::1\"", "admin.allowed_hosts[0]", "IP address"),
        ("\"*.svc\"", "admin.allowed_hosts[0]", "not a host name"),
        (
            "\"admin..svc\"",
            "admin.allowed_hosts[0]",
            "not a host name",
        ),
        (
            "\"-admin.svc\"",
            "admin.allowed_hosts[0]",
            "not a host name",
        ),
        (
            "\"ok.svc\", \"bad name\"",
            "admin.allowed_hosts[1]",
            "not a host name",
        ),
        (
            "\"user@admin.svc\"",
            "admin.allowed_hosts[0]",
            "not a host name",
        ),
        (
            "\"localhost\", \"a.b\", \"\"",
            "admin.allowed_hosts[2]",
            "empty",
        ),
    ];
    for (entries, key, problem) in cases {
        let error = parse_admin(&format!("{listen}allowed_hosts = [{entries}]"))
            .err()
            .unwrap_or_else(|| panic!("[{entries}] accepted"));
        let text = error.to_string();
        assert!(text.starts_with("/etc/countersign/proxy.toml: "), "{text}");
        assert_eq!(error.key(), key, "[{entries}]: {text}");
        assert!(
            text.contains(problem),
            "[{entries}]: {problem:?} not in {text}"
        );
    }
    let long_label = format!("\"{}.svc\"", "a".repeat(64));
    let error = parse_admin(&format!("{listen}allowed_hosts = [{long_label}]")).unwrap_err();
    assert_eq!(error.key(), "admin.allowed_hosts[0]", "{error}");
    let too_long = format!("\"{}\"", vec!["a".repeat(60); 5].join("."));
    let error = parse_admin(&format!("{listen}allowed_hosts = [{too_long}]")).unwrap_err();
    assert_eq!(error.key(), "admin.allowed_hosts[0]", "{error}");
    // Without an admin listener the key has nothing to apply to.
    let error = parse_admin("allowed_hosts = [\"admin.svc\"]").unwrap_err();
    assert_eq!(error.key(), "admin.allowed_hosts", "{error}");
    assert!(
        error.to_string().contains("only used with admin.listen"),
        "{error}"
    );
    // Not a list: the parser's own message, naming the key.
    let error = parse_admin(&format!("{listen}allowed_hosts = \"admin.svc\"")).unwrap_err();
    assert!(error.to_string().contains("allowed_hosts"), "{error}");
}

/// `countersign check-config` refuses a bad entry the same way (exit 2, file and key).
#[test]
fn check_config_names_a_bad_allowed_hosts_entry() {
    let dir = temp_dir("admin-allowed-hosts-check");
    config_with_admin(
        &dir,
        "127.0.0.1:8080".parse().unwrap(),
        "127.0.0.1:9090".parse().unwrap(),
        "allowed_hosts = [\"countersign-admin:9090\"]",
    );
    let config = dir.join("proxy.toml");
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = format!("{}: admin.allowed_hosts[0]:", config.display());
    assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
    assert!(stderr.contains("without a port"), "{stderr}");
}

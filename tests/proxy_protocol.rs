//! `server.proxy_protocol` against the real `countersign run` and a real upstream behind the
//! `VerifyLayer`: behind a TCP load balancer (AWS NLB, HAProxy `send-proxy`) the balancer's
//! PROXY header names the client. That address is the one the login throttle counts and the
//! API is told in `X-Forwarded-For`; a connection without the header, with a malformed one, or
//! from an address outside `trusted_proxies` is closed before any HTTP is read.
//! Run: `cargo test --all-features --test proxy_protocol`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_run;
mod support_trusted;
mod support_users;

use std::net::SocketAddr;

use support::*;
use support_cli::check_config;
use support_trusted::{lo, raw_from, seen_since, start, who};
use support_users::*;

/// The `[server]` lines of a proxy behind a balancer at 127.0.0.1 (and a second hop at
/// 10.0.0.5, an HTTP balancer behind the TCP one).
const BEHIND_NLB: &str = "trusted_proxies = [\"127.0.0.1\", \"10.0.0.5\"]\nproxy_protocol = true\n";

fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 51234 443\r\n").into_bytes()
}

/// A v2 header: `command` 0 LOCAL, 1 PROXY; `family` 0x11 TCP/IPv4, 0x21 TCP/IPv6.
fn v2(command: u8, family: u8, source: std::net::IpAddr) -> Vec<u8> {
    let mut addresses = Vec::new();
    match source {
        std::net::IpAddr::V4(ip) => {
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&[10, 0, 0, 1]);
        }
        std::net::IpAddr::V6(ip) => {
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    addresses.extend_from_slice(&[0xC8, 0x22, 0x01, 0xBB]);
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20 | command, family]);
    out.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&addresses);
    out
}

/// A v2 PROXY header naming 198.51.100.9 whose addresses and TLVs are `payload` bytes: the
/// IPv4 addresses, then one `PP2_TYPE_NOOP` TLV (type 4) as padding. `payload` ≥ 15.
fn v2_padded(payload: usize) -> Vec<u8> {
    let mut header = v2(1, 0x11, "198.51.100.9".parse().unwrap());
    let pad = payload - (header.len() - 16) - 3;
    header.push(0x04);
    header.extend_from_slice(&u16::try_from(pad).unwrap().to_be_bytes());
    header.resize(16 + payload, 0);
    header[14..16].copy_from_slice(&u16::try_from(payload).unwrap().to_be_bytes());
    header
}

/// `header` then `request`, from 127.0.0.1 (the balancer): the whole answer.
async fn through(addr: SocketAddr, header: &[u8], request: &[u8]) -> String {
    raw_from(lo(1), addr, &[header, request].concat()).await
}

fn login_request(user: &str, password: &str) -> Vec<u8> {
    let body = serde_json::json!({ "username": user, "password": password }).to_string();
    format!(
        "POST /auth/login HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Logs `user` in through the balancer for `client`: the session's `Cookie` value.
async fn login_as(addr: SocketAddr, users: &Users, user: &str, client: &str) -> Login {
    let answer = through(
        addr,
        &v1(client),
        &login_request(user, &users.password(user)),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    Login {
        cookie,
        csrf: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_told_the_client_the_header_names() {
    let p = start("pp-api", BEHIND_NLB, None).await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    for (header, _) in [
        (v1("203.0.113.7"), "v1 TCP4"),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n".to_vec(),
            "v1 TCP6",
        ),
        (v2(1, 0x11, "198.51.100.9".parse().unwrap()), "v2 IPv4"),
        (v2(1, 0x21, "2001:db8::9".parse().unwrap()), "v2 IPv6"),
        // The balancer's own health check (LOCAL) and a v1 UNKNOWN: the connection itself.
        (v2(0, 0x11, "198.51.100.9".parse().unwrap()), "v2 LOCAL"),
        (b"PROXY UNKNOWN\r\n".to_vec(), "v1 UNKNOWN"),
    ] {
        let out = through(p.addr, &header, &who(&session, b"", true)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    assert_eq!(
        seen_since(&p.upstream, before),
        [
            vec!["203.0.113.7".to_owned()],
            vec!["2001:db8::7".to_owned()],
            vec!["198.51.100.9".to_owned()],
            vec!["2001:db8::9".to_owned()],
            vec!["127.0.0.1".to_owned()],
            vec!["127.0.0.1".to_owned()],
        ]
    );
}

/// A client's own `X-Forwarded-For` is not believed: the header's source is not a trusted
/// hop. When it is (an HTTP balancer at 10.0.0.5 behind the TCP one), that hop's header is
/// read as without the PROXY protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_read_only_past_trusted_hops() {
    let p = start("pp-xff", BEHIND_NLB, None).await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    let spoof = b"X-Forwarded-For: 192.0.2.66\r\n";
    let out = through(p.addr, &v1("203.0.113.7"), &who(&session, spoof, true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = through(p.addr, &v1("10.0.0.5"), &who(&session, spoof, true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        seen_since(&p.upstream, before),
        [
            vec!["203.0.113.7".to_owned()],
            vec!["192.0.2.66".to_owned()]
        ]
    );
}

/// A PROXY header that names no client (v1 `UNKNOWN`, haproxy's for a client of a
/// UNIX-socket frontend; v2 `LOCAL`; a v2 UNIX socket): the client is the connection, the
/// balancer, and `X-Forwarded-For` is not read, though the balancer is trusted. A TCP
/// pass-through balancer writes no such header, so one there is the browser's: it was
/// believed, and the browser chose the address the API is told. Found by a review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_naming_no_client_is_the_connection_whatever_x_forwarded_for_says() {
    let p = start("pp-unknown", BEHIND_NLB, None).await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    let spoof = b"X-Forwarded-For: 192.0.2.66\r\n";
    let mut unix = b"\r\n\r\n\0\r\nQUIT\n\x21\x31\x00\xD8".to_vec();
    unix.extend_from_slice(&[0; 216]);
    for header in [
        b"PROXY UNKNOWN\r\n".to_vec(),
        v2(0, 0x11, "198.51.100.9".parse().unwrap()),
        unix,
    ] {
        let out = through(p.addr, &header, &who(&session, spoof, true)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    assert_eq!(
        seen_since(&p.upstream, before),
        [
            vec!["127.0.0.1".to_owned()],
            vec!["127.0.0.1".to_owned()],
            vec!["127.0.0.1".to_owned()],
        ]
    );
}

/// The same with a `client_address_header` of the operator's choosing: not read, and still
/// removed (in its `_` spellings too) before the API, as from any peer that is not trusted
/// (no other rule removes a custom name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_naming_no_client_leaves_a_custom_client_address_header_unread() {
    let p = start(
        "pp-unknown-envoy",
        &format!("{BEHIND_NLB}client_address_header = \"x-envoy-external-address\"\n"),
        None,
    )
    .await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    let spoof = b"x-envoy-external-address: 192.0.2.66\r\nX_Envoy_External_Address: 6.6.6.6\r\n";
    let out = through(p.addr, b"PROXY UNKNOWN\r\n", &who(&session, spoof, true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        seen_since(&p.upstream, before),
        [vec!["127.0.0.1".to_owned()]]
    );
    let seen = p.upstream.raw.lock()[before].headers.clone();
    for name in seen.keys() {
        assert!(
            !name
                .as_str()
                .replace('_', "-")
                .eq("x-envoy-external-address"),
            "{name} reached the API: {seen:?}"
        );
    }
}

/// Failed logins over connections whose header names no client count against the balancer,
/// whatever `X-Forwarded-For` each sends: a browser could otherwise send a new address with
/// each guess and never reach `max_failures_per_ip` (3 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_under_a_header_naming_no_client_count_against_the_connection() {
    let p = start("pp-unknown-throttle", BEHIND_NLB, None).await;
    let attempt = |user: &str, last: u8| {
        let mut request = login_request(user, "wrong");
        let at = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        let spoof = format!("X-Forwarded-For: 192.0.2.{last}\r\n");
        request.splice(at..at, spoof.into_bytes());
        request
    };
    for last in 1..=3 {
        let out = through(p.addr, b"PROXY UNKNOWN\r\n", &attempt("alice", last)).await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }
    let out = through(p.addr, b"PROXY UNKNOWN\r\n", &attempt("bob", 4)).await;
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
}

/// Failed logins count against the client the header names, not the balancer: one client's
/// failures do not lock every other client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_count_against_the_client_the_header_names() {
    let p = start("pp-throttle", BEHIND_NLB, None).await;
    for _ in 0..3 {
        let out = through(
            p.addr,
            &v1("203.0.113.66"),
            &login_request("alice", "wrong"),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }
    let out = through(p.addr, &v1("203.0.113.66"), &login_request("bob", "wrong")).await;
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
    // Another client behind the same balancer logs in.
    login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
}

/// Closed before any HTTP is read: no header, a malformed one, a header cut short by the
/// client's close, and a valid header from an address outside `trusted_proxies` (127.0.0.2:
/// it went around the balancer and could name anyone). The API sees none of them, and the
/// refused address is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_trusted_header_are_closed() {
    let p = start("pp-refused", BEHIND_NLB, None).await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    for header in [
        Vec::new(),
        // Over the default `proxy_protocol_max_bytes` (1KiB of addresses and TLVs).
        v2_padded(1025),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n".to_vec(),
        b"PROXY TCP4 not-an-ip 10.0.0.1 51234 443\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\n".to_vec(),
    ] {
        let out = through(p.addr, &header, &who(&session, b"", true)).await;
        assert_eq!(out, "", "{:?}", String::from_utf8_lossy(&header));
    }
    let out = raw_from(
        lo(2),
        p.addr,
        &[v1("203.0.113.7"), who(&session, b"", true)].concat(),
    )
    .await;
    assert_eq!(out, "", "an untrusted peer's header was read");
    assert_eq!(
        p.upstream.raw_count(),
        before,
        "the API saw a refused connection"
    );
    p.proxy.wait_json_messages(
        "WARN",
        &["server.proxy_protocol", "outside server.trusted_proxies"],
        1,
    );
    let log = p.proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("outside server.trusted_proxies"))
        .unwrap();
    assert!(line.contains("127.0.0.2"), "the address refused: {line}");
    // The admin listener takes no PROXY header.
    let health = raw_from(
        lo(1),
        p.admin,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// `server.proxy_protocol_max_bytes` sets the longest v2 header read: at 2KiB, a header of
/// 1025 and of 2048 bytes of addresses and TLVs names the client (the default refuses the
/// first: `connections_without_a_trusted_header_are_closed`), one of 2049 closes the
/// connection unanswered. The key is refused out of its range and without `proxy_protocol`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_max_bytes_sets_the_longest_v2_header_read() {
    let p = start(
        "pp-max-bytes",
        &format!("{BEHIND_NLB}proxy_protocol_max_bytes = \"2KiB\"\n"),
        None,
    )
    .await;
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    for payload in [1025, 2048] {
        let out = through(p.addr, &v2_padded(payload), &who(&session, b"", true)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{payload}: {out}");
    }
    let out = through(p.addr, &v2_padded(2049), &who(&session, b"", true)).await;
    assert_eq!(out, "", "a header over the limit was read");
    assert_eq!(
        seen_since(&p.upstream, before),
        [
            vec!["198.51.100.9".to_owned()],
            vec!["198.51.100.9".to_owned()]
        ]
    );

    let dir = temp_dir("pp-max-bytes-config");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &Users::five().text());
    let config = dir.join("proxy.toml");
    for (lines, problem) in [
        (
            "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol_max_bytes = \"2KiB\"\n",
            "only used with server.proxy_protocol = true",
        ),
        (
            "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = false\nproxy_protocol_max_bytes = 4096\n",
            "only used with server.proxy_protocol = true",
        ),
        (
            "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\nproxy_protocol_max_bytes = 215\n",
            "must be between 216",
        ),
        (
            "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\nproxy_protocol_max_bytes = \"64KiB\"\n",
            "and 65535 bytes",
        ),
    ] {
        let text = support_run::config_text("127.0.0.1:1", None, "http://127.0.0.1:2")
            .replace("shutdown_grace = \"2s\"\n", &format!("shutdown_grace = \"2s\"\n{lines}"));
        write(&config, &text);
        let out = check_config(&config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{lines}: {stderr}");
        for part in ["proxy.toml", "server.proxy_protocol_max_bytes", problem] {
            assert!(stderr.contains(part), "{lines}: {part:?} missing: {stderr}");
        }
    }
}

/// `proxy_protocol` without `trusted_proxies` does not start (nobody could send the header),
/// and an edit of it waits for a restart (it changes what the listener reads first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_checked_and_waits_for_a_restart() {
    let dir = temp_dir("pp-config");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &Users::five().text());
    let config = dir.join("proxy.toml");
    let text = support_run::config_text("127.0.0.1:1", None, "http://127.0.0.1:2").replace(
        "shutdown_grace = \"2s\"\n",
        "shutdown_grace = \"2s\"\nproxy_protocol = true\n",
    );
    write(&config, &text);
    let out = check_config(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for part in ["server.proxy_protocol", "only with server.trusted_proxies"] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }

    let p = start("pp-reload", "trusted_proxies = [\"127.0.0.1\"]\n", None).await;
    let text = std::fs::read_to_string(&p.config).unwrap();
    write(
        &p.config,
        &text.replace(
            "trusted_proxies = [\"127.0.0.1\"]\n",
            "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\n",
        ),
    );
    p.proxy.signal("HUP");
    let warned = p
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    assert!(warned[0].contains("server.proxy_protocol"), "{warned:?}");
    // Still a plain listener.
    login(p.addr, &p.users, "alice").await;
}

/// The other way, from behind a TCP balancer to behind an HTTP one: `proxy_protocol` off and
/// the balancer off `trusted_proxies`, in one valid file. `proxy_protocol` waits for the
/// restart, and so does the list: applied alone, the listener still reading PROXY headers
/// refused every connection, the balancer's included, as from outside the list (the
/// public listener was down until a restart). Found by a QA read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_proxy_protocol_off_keeps_the_list_until_the_restart() {
    let p = start("pp-off", BEHIND_NLB, None).await;
    let text = std::fs::read_to_string(&p.config).unwrap();
    assert!(text.contains(BEHIND_NLB), "{text}");
    write(&p.config, &text.replace(BEHIND_NLB, ""));
    p.proxy.signal("HUP");
    let warned = p
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    for key in ["server.proxy_protocol", "server.trusted_proxies"] {
        assert!(warned[0].contains(key), "{key}: {warned:?}");
    }
    // The balancer's connections are still served, its PROXY header read as before.
    let session = login_as(p.addr, &p.users, "alice", "203.0.113.7").await;
    let before = p.upstream.raw_count();
    let out = through(p.addr, &v1("203.0.113.8"), &who(&session, b"", true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        seen_since(&p.upstream, before),
        [vec!["203.0.113.8".to_owned()]]
    );
    assert!(
        !p.proxy.log().contains("outside server.trusted_proxies"),
        "{}",
        p.proxy.log()
    );
}

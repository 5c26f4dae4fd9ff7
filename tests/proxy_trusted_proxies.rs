//! `server.trusted_proxies` and `server.client_address_header`, against the real `countersign
//! run`: behind a load balancer every connection comes from the balancer, so before these keys
//! every browser shared the balancer's address. One attacker's failed logins then throttled
//! every user's logins (`auth.throttle.max_failures_per_ip`), and the API's
//! `X-Forwarded-For` named the balancer. Now the address a trusted balancer names is the
//! client's; a client that is not a trusted balancer cannot choose its address by sending the
//! header itself. The access line's `client` names the same address.
//! Run: `cargo test --all-features --test proxy_trusted_proxies`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_trusted;
mod support_users;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use support::*;
use support_run::*;
use support_users::*;

/// A proxy whose `[server]` has the `server` lines (support_trusted).
async fn start(tag: &str, server: &str) -> (RunningProxy, SocketAddr, Upstream, Users) {
    let p = support_trusted::start(tag, server, None).await;
    (p.proxy, p.addr, p.upstream, p.users)
}

/// A login attempt of `user` with `password`, the request carrying `x_forwarded_for` lines.
async fn login_as(addr: SocketAddr, user: &str, password: &str, x_forwarded_for: &[&str]) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(x_forwarded_for.iter().map(|v| ("x-forwarded-for", *v)));
    send(
        addr,
        Method::POST,
        "/auth/login",
        &headers,
        serde_json::json!({ "username": user, "password": password }).to_string(),
    )
    .await
}

/// The `X-Forwarded-For` the API received for a GET by `session` with `x_forwarded_for`.
async fn forwarded_for_seen(
    addr: SocketAddr,
    upstream: &Upstream,
    session: &Login,
    x_forwarded_for: &[&str],
) -> String {
    let mut headers = vec![("cookie", session.cookie.as_str())];
    headers.extend(x_forwarded_for.iter().map(|v| ("x-forwarded-for", *v)));
    let r = send(addr, Method::GET, "/api/who", &headers, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = upstream.last_raw();
    let values: Vec<_> = seen
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(values.len(), 1, "{values:?}");
    values.into_iter().next().unwrap()
}

/// Three failed logins from one browser behind the trusted balancer (the test's own address,
/// 127.0.0.1) throttle that browser, not another browser behind the same balancer, nor the
/// same user from elsewhere: the per-address count is the browser's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_count_against_the_browser_the_balancer_names() {
    let (_proxy, addr, _upstream, users) =
        start("trusted-throttle", "trusted_proxies = [\"127.0.0.1\"]\n").await;
    let attacker = ["203.0.113.66"];
    for user in ["alice", "bob", "carol"] {
        let r = login_as(addr, user, "wrong", &attacker).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    }
    // The fourth from the attacker: throttled, even with the right password.
    let r = login_as(addr, "alice", &users.password("alice"), &attacker).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    // What the attacker writes into the header itself is left of what the balancer appended:
    // it does not make it someone else.
    let r = login_as(
        addr,
        "alice",
        &users.password("alice"),
        &["198.51.100.1, 203.0.113.66"],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    // Another browser behind the same balancer logs in.
    let r = login_as(addr, "alice", &users.password("alice"), &["198.51.100.7"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The balancer itself (no header) is a client of its own.
    let r = login_as(addr, "bob", &users.password("bob"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// Without `trusted_proxies` (the default) the header is the client's own claim: ignored. The
/// same three failures throttle the connection's address, whatever the header says; and the
/// API's `X-Forwarded-For` is the connection's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_the_header_is_ignored() {
    let (_proxy, addr, upstream, users) = start("untrusted-throttle", "").await;
    let session = login(addr, &users, "alice").await;
    assert_eq!(
        forwarded_for_seen(addr, &upstream, &session, &["203.0.113.66"]).await,
        "127.0.0.1"
    );
    for (user, claimed) in [
        ("alice", "203.0.113.1"),
        ("bob", "203.0.113.2"),
        ("carol", "203.0.113.3"),
    ] {
        let r = login_as(addr, user, "wrong", &[claimed]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    }
    let r = login_as(addr, "bob", &users.password("bob"), &["198.51.100.7"]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
}

/// A trusted list that does not hold the connection's address: the header is ignored too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_the_trusted_blocks_cannot_choose_its_address() {
    let (_proxy, addr, upstream, users) = start(
        "other-trusted",
        "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n",
    )
    .await;
    let session = login(addr, &users, "alice").await;
    assert_eq!(
        forwarded_for_seen(addr, &upstream, &session, &["203.0.113.66"]).await,
        "127.0.0.1"
    );
}

/// The API's `X-Forwarded-For` behind a trusted balancer: the browser's address, alone (the
/// header as received is never passed on), read right to left past the trusted hops, over
/// several field lines, with a port, and with a custom `client_address_header`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_told_the_browser_the_balancer_names() {
    let (_proxy, addr, upstream, users) = start(
        "trusted-forward",
        "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n",
    )
    .await;
    let session = login(addr, &users, "alice").await;
    for (lines, expected) in [
        (&["203.0.113.66"][..], "203.0.113.66"),
        (&["198.51.100.1, 203.0.113.66"][..], "203.0.113.66"),
        (
            &["198.51.100.1, 203.0.113.66, 10.1.2.3"][..],
            "203.0.113.66",
        ),
        (
            &["198.51.100.1, 203.0.113.66", "10.1.2.3"][..],
            "203.0.113.66",
        ),
        (&["203.0.113.66:51234"][..], "203.0.113.66"),
        (&["[2001:db8:9::1]:443"][..], "2001:db8:9::1"),
        // Not an address: the last trusted hop read, here none but the balancer.
        (&["198.51.100.1, unknown"][..], "127.0.0.1"),
        (&[][..], "127.0.0.1"),
    ] {
        assert_eq!(
            forwarded_for_seen(addr, &upstream, &session, lines).await,
            expected,
            "{lines:?}"
        );
    }
}

/// `client_address_max_hops` bounds how many addresses of the header are read, right to left:
/// at 2, a chain of two trusted hops stops at the second (the client beyond is not read), and
/// one trusted hop still finds the client. A reload raising it applies to the next
/// connection (the key is live, as `trusted_proxies` is). The default (32) would find the
/// client in both chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_address_max_hops_bounds_the_hops_read_and_a_reload_changes_it() {
    let p = support_trusted::start(
        "trusted-max-hops",
        "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\nclient_address_max_hops = 2\n",
        None,
    )
    .await;
    let session = login(p.addr, &p.users, "alice").await;
    let long = ["198.51.100.1, 10.0.0.2, 10.0.0.3"];
    let short = ["198.51.100.1, 10.0.0.3"];
    assert_eq!(
        forwarded_for_seen(p.addr, &p.upstream, &session, &long).await,
        "10.0.0.2"
    );
    assert_eq!(
        forwarded_for_seen(p.addr, &p.upstream, &session, &short).await,
        "198.51.100.1"
    );

    let text = std::fs::read_to_string(&p.config).unwrap();
    write(
        &p.config,
        &text.replace(
            "client_address_max_hops = 2\n",
            "client_address_max_hops = 3\n",
        ),
    );
    p.proxy.signal("HUP");
    let applied = p.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml", "connections accepted from now on"],
        1,
    );
    assert!(
        applied[0].contains("server.client_address_max_hops"),
        "{applied:?}"
    );
    assert!(
        p.proxy
            .json_messages("WARN", &["SIGHUP:", "restart"])
            .is_empty(),
        "the key waits for a restart: {}",
        p.proxy.log()
    );
    assert_eq!(
        forwarded_for_seen(p.addr, &p.upstream, &session, &long).await,
        "198.51.100.1"
    );
}

/// What the API received for alice's `GET /api/who` with `headers` beside her cookie, through
/// a proxy whose `[server]` has the `server` lines.
async fn who_request_seen(tag: &str, server: &str, headers: &[(&str, &str)]) -> RawSeen {
    let (_proxy, addr, upstream, users) = start(tag, server).await;
    let session = login(addr, &users, "alice").await;
    let mut lines = vec![("cookie", session.cookie.as_str())];
    lines.extend_from_slice(headers);
    let r = send(addr, Method::GET, "/api/who", &lines, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    upstream.last_raw()
}

/// `client_address_header`: the header named is read (here `x-real-ip`, one address), and
/// `X-Forwarded-For` then is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_address_header_is_read_instead() {
    let seen = who_request_seen(
        "trusted-real-ip",
        "trusted_proxies = [\"127.0.0.1\"]\nclient_address_header = \"X-Real-IP\"\n",
        &[
            ("x-real-ip", "203.0.113.66"),
            ("x-forwarded-for", "198.51.100.1"),
        ],
    )
    .await;
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.66");
}

/// A `client_address_header` of the operator's choosing is removed in every spelling a
/// CGI-style upstream reads as the same variable (`X_Envoy_External_Address` is
/// `HTTP_X_ENVOY_EXTERNAL_ADDRESS` there, as the real one): only the exact name was removed, so
/// a browser's `_` spelling reached the API, which found it where it looks for the balancer's.
/// Another field with a `_` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_underscore_spellings_of_a_custom_client_address_header_are_removed() {
    let seen = who_request_seen(
        "trusted-envoy",
        "trusted_proxies = [\"127.0.0.1\"]\nclient_address_header = \"x-envoy-external-address\"\n",
        &[
            ("x-envoy-external-address", "203.0.113.66"),
            ("X_Envoy_External_Address", "6.6.6.6"),
            ("x-envoy_external-address", "6.6.6.7"),
            ("x_trace_id", "kept"),
        ],
    )
    .await;
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.66");
    let names: Vec<&str> = seen.headers.keys().map(|n| n.as_str()).collect();
    for name in &names {
        assert!(
            !name.replace('_', "-").eq("x-envoy-external-address"),
            "{name} reached the API: {names:?}"
        );
    }
    assert_eq!(seen.headers["x_trace_id"], "kept");
}

/// A `GET` of a path no route owns (404) from `from` with the `extra` header lines (raw, each
/// ending in CRLF) and the request id `id`, on a connection of its own.
async fn request_from(from: std::net::IpAddr, addr: SocketAddr, id: &str, extra: &str) {
    let request = format!(
        "GET /nothing/here HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: {id}\r\n{extra}\
         Connection: close\r\n\r\n"
    );
    let answer = support_trusted::raw_from(from, addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 404 "), "{id}: {answer}");
}

/// The `client` of the one access line of request `id` in the JSON `log`.
fn logged_client(log: &str, id: &str) -> String {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| {
            line["target"] == "countersign::access" && line["request_id"] == id
        })
        .collect();
    assert_eq!(lines.len(), 1, "access lines of {id}: {log}");
    lines[0]["client"]
        .as_str()
        .unwrap_or_else(|| panic!("no client in {}", lines[0]))
        .to_owned()
}

/// The access line's `client` is the address the proxy resolved, the one the API and the
/// throttle get: the connection's peer (its IP, no port) for a direct client, whatever
/// header it sends; the address a trusted balancer names in `client_address_header`; the
/// peer itself when a peer that is not trusted sends that header. Before, the line named no
/// client at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_names_the_client_as_resolved() {
    use support_trusted::lo;
    // Nobody trusted (the default): the peer, the header ignored.
    let mut p = support_trusted::start("access-client-default", "", None).await;
    request_from(lo(1), p.addr, "direct", "").await;
    request_from(
        lo(1),
        p.addr,
        "direct-claiming",
        "X-Forwarded-For: 203.0.113.9\r\n",
    )
    .await;
    p.proxy.stop();
    let log = p.proxy.log();
    assert_eq!(logged_client(&log, "direct"), "127.0.0.1");
    assert_eq!(logged_client(&log, "direct-claiming"), "127.0.0.1");

    // 127.0.0.2 is the trusted balancer, naming clients in X-Real-IP; 127.0.0.3 is not.
    let mut p = support_trusted::start(
        "access-client-trusted",
        "trusted_proxies = [\"127.0.0.2\"]\nclient_address_header = \"X-Real-IP\"\n",
        None,
    )
    .await;
    let named = "X-Real-IP: 203.0.113.7\r\n";
    request_from(lo(2), p.addr, "behind-balancer", named).await;
    request_from(lo(2), p.addr, "balancer-itself", "").await;
    request_from(lo(3), p.addr, "untrusted-claiming", named).await;
    request_from(lo(1), p.addr, "direct-trusted-config", "").await;
    p.proxy.stop();
    let log = p.proxy.log();
    assert_eq!(logged_client(&log, "behind-balancer"), "203.0.113.7");
    assert_eq!(logged_client(&log, "balancer-itself"), "127.0.0.2");
    assert_eq!(logged_client(&log, "untrusted-claiming"), "127.0.0.3");
    assert_eq!(logged_client(&log, "direct-trusted-config"), "127.0.0.1");
}

/// Each key's mistakes are refused at the start (exit 2), naming the file, the key (with the
/// list index) and the problem.
#[test]
fn bad_values_are_refused_naming_the_key() {
    let dir = temp_dir("trusted-config");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &Users::five().text());
    for (server, key, problem) in [
        (
            "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]",
            "server.trusted_proxies[1]",
            "is not an IP address or CIDR block",
        ),
        (
            "trusted_proxies = [\"balancer.internal\"]",
            "server.trusted_proxies[0]",
            "is not an IP address or CIDR block",
        ),
        (
            "trusted_proxies = [\"0.0.0.0/0\"]",
            "server.trusted_proxies[0]",
            "trusts every address",
        ),
        (
            "trusted_proxies = [\"::/0\"]",
            "server.trusted_proxies[0]",
            "trusts every address",
        ),
        (
            "client_address_header = \"x-real-ip\"",
            "server.client_address_header",
            "only with server.trusted_proxies",
        ),
        (
            "trusted_proxies = [\"10.0.0.1\"]\nclient_address_header = \"forwarded\"",
            "server.client_address_header",
            "is not read",
        ),
        (
            "trusted_proxies = [\"10.0.0.1\"]\nclient_address_header = \"bad header\"",
            "server.client_address_header",
            "is not a valid header name",
        ),
        (
            "client_address_max_hops = 4",
            "server.client_address_max_hops",
            "only with server.trusted_proxies",
        ),
        (
            "trusted_proxies = [\"10.0.0.1\"]\nclient_address_max_hops = 0",
            "server.client_address_max_hops",
            "must be between 1 and 1024",
        ),
        (
            "trusted_proxies = [\"10.0.0.1\"]\nclient_address_max_hops = 1025",
            "server.client_address_max_hops",
            "not 1025",
        ),
    ] {
        let config = dir.join("proxy.toml");
        let text = config_text("127.0.0.1:0", None, "http://127.0.0.1:9").replace(
            "shutdown_grace = \"2s\"\n",
            &format!("shutdown_grace = \"2s\"\n{server}\n"),
        );
        write(&config, &text);
        for command in ["check-config", "run"] {
            let out = std::process::Command::new(BIN)
                .args([command, "--config"])
                .arg(&config)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {server}: {stderr}");
            for part in ["proxy.toml", key, problem] {
                assert!(
                    stderr.contains(part),
                    "{command} {server}: {part:?} missing: {stderr}"
                );
            }
        }
    }
}

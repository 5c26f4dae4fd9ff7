//! Adversarial checks of `server.trusted_proxies` / `server.client_address_header` against the
//! real `countersign run` and a real upstream behind the `VerifyLayer`: what a client that is
//! not a trusted balancer can do to the address the proxy counts it under and tells the API
//! (raw HTTP/1.1 with pipelining, obs-fold, non-ASCII bytes, many field lines, HTTP/2), the
//! header never passed on as received (also a custom `client_address_header`), IPv4 clients of
//! a listener on `[::]`, IPv4-mapped blocks in the config, and a reload that changes the list
//! (applied to the connections accepted after it).
//! Run: `cargo test --all-features --test proxy_trusted_proxies_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_reload;
mod support_run;
mod support_trusted;
mod support_users;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use support::*;
use support_reload::exchange;
use support_run::*;
use support_trusted::{lo, raw_from, seen_since, start, who};
use support_users::*;

/// A configured `client_address_header` that is not one of the client-address fields the
/// proxy always strips (here `x-client-address`) must not reach the API as the client sent
/// it: not from a peer outside the trusted list (whose header is ignored), nor from a trusted
/// balancer (whose value the proxy has read and turned into its own `X-Forwarded-For`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_client_address_header_is_never_passed_on_as_received() {
    let qa = start(
        "xffqa-custom-header",
        "trusted_proxies = [\"127.0.0.2\"]\nclient_address_header = \"x-client-address\"\n",
        None,
    )
    .await;
    let session = login(qa.addr, &qa.users, "alice").await;
    let before = qa.upstream.raw_count();
    for from in [lo(1), lo(2)] {
        let out = raw_from(
            from,
            qa.addr,
            &who(&session, b"X-Client-Address: 203.0.113.66\r\n", true),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{from}: {out}");
    }
    let raws = qa.upstream.raw.lock()[before..].to_vec();
    assert_eq!(raws.len(), 2);
    for (seen, expected) in raws.iter().zip(["127.0.0.1", "203.0.113.66"]) {
        assert_eq!(
            seen.headers["x-forwarded-for"], expected,
            "{:?}",
            seen.headers
        );
        assert!(
            seen.headers.get("x-client-address").is_none(),
            "the client's own header reached the API: {:?}",
            seen.headers
        );
    }
}

/// One HTTP/1.1 connection from the trusted balancer carrying three pipelined requests: the
/// address is each request's own (the second names nobody: the balancer), nothing leaks from
/// one request to the next. On the same proxy, a connection from another loopback address
/// (not trusted) is its own client whatever it sends, even after the trusted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_on_a_trusted_connection_do_not_share_an_address() {
    let qa = start(
        "xffqa-pipeline",
        "trusted_proxies = [\"127.0.0.2\"]\n",
        None,
    )
    .await;
    let session = login(qa.addr, &qa.users, "alice").await;
    let before = qa.upstream.raw_count();
    let mut pipelined = who(&session, b"X-Forwarded-For: 203.0.113.66\r\n", false);
    pipelined.extend(who(&session, b"", false));
    pipelined.extend(who(&session, b"X-Forwarded-For: 198.51.100.9\r\n", true));
    let out = raw_from(lo(2), qa.addr, &pipelined).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    let out = raw_from(
        lo(1),
        qa.addr,
        &who(&session, b"X-Forwarded-For: 203.0.113.66\r\n", true),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        seen_since(&qa.upstream, before),
        [
            vec!["203.0.113.66".to_owned()],
            vec!["127.0.0.2".to_owned()],
            vec!["198.51.100.9".to_owned()],
            vec!["127.0.0.1".to_owned()],
        ]
    );
}

/// Field lines a trusted balancer passes on that a browser wrote: the header's case, a value
/// with non-ASCII bytes, many field lines, a line longer than any real chain, obs-fold. None
/// yields an address the browser chose: the browser's lines are left of the balancer's, a
/// chain longer than `client_address_max_hops` (32) stops at a trusted hop, bytes that are not
/// text stop at the last trusted hop, and obs-fold is refused before anything is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_browser_writes_through_a_trusted_balancer_does_not_choose_its_address() {
    let qa = start(
        "xffqa-garbage",
        "trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
        None,
    )
    .await;
    let session = login(qa.addr, &qa.users, "alice").await;
    let attacker = "198.51.100.66";
    let trusted_hops: String = (0..40).map(|i| format!("10.0.0.{i}, ")).collect();
    let many_lines: String = (0..90)
        .map(|i| format!("x-forwarded-for: 10.0.1.{}\r\n", i % 250))
        .collect();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Case and duplicates: the balancer's line (last) wins, in any case.
        (
            format!("X-FORWARDED-FOR: {attacker}\r\nx-Forwarded-For: 203.0.113.7\r\n").into_bytes(),
            "203.0.113.7",
        ),
        // A chain of trusted hops longer than client_address_max_hops (32) after the attacker's
        // entry.
        (
            format!("X-Forwarded-For: {attacker}, {trusted_hops}10.0.0.250\r\n").into_bytes(),
            "10.0.0.9",
        ),
        // 90 field lines of trusted hops, the attacker's in the first.
        (
            format!("X-Forwarded-For: {attacker}\r\n{many_lines}").into_bytes(),
            "10.0.1.58",
        ),
        // Non-ASCII bytes (obs-text) in the balancer's line: the balancer itself.
        (
            [
                b"X-Forwarded-For: ".as_slice(),
                attacker.as_bytes(),
                b", 203.0.113.7\xff\r\n",
            ]
            .concat(),
            "127.0.0.1",
        ),
        // ...and in a line left of the balancer's: that line is never reached.
        (
            [
                b"X-Forwarded-For: \xc3\xa9".as_slice(),
                attacker.as_bytes(),
                b"\r\nX-Forwarded-For: 203.0.113.7\r\n",
            ]
            .concat(),
            "203.0.113.7",
        ),
        // A zone id is not an address: the last trusted hop.
        (
            b"X-Forwarded-For: fe80::1%eth0, 10.0.0.5\r\n".to_vec(),
            "10.0.0.5",
        ),
        // IPv4-mapped in the header: the IPv4 address.
        (
            b"X-Forwarded-For: ::ffff:203.0.113.7\r\n".to_vec(),
            "203.0.113.7",
        ),
        // ...and an IPv4-mapped trusted hop is skipped like the IPv4 one.
        (
            format!("X-Forwarded-For: {attacker}, 203.0.113.7, ::ffff:10.0.0.3\r\n").into_bytes(),
            "203.0.113.7",
        ),
        // An 8 KiB line of commas and spaces before the balancer's entry.
        (
            format!(
                "X-Forwarded-For: {attacker}{}203.0.113.7\r\n",
                ", ".repeat(4000)
            )
            .into_bytes(),
            "203.0.113.7",
        ),
    ];
    for (extra, expected) in &cases {
        let before = qa.upstream.raw_count();
        let out = raw_from(lo(1), qa.addr, &who(&session, extra, true)).await;
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "{}: {out}",
            String::from_utf8_lossy(extra)
        );
        assert_eq!(
            seen_since(&qa.upstream, before),
            [vec![expected.to_string()]],
            "{}",
            String::from_utf8_lossy(extra)
        );
    }
    // obs-fold: refused (400), nothing forwarded.
    let before = qa.upstream.raw_count();
    let out = raw_from(
        lo(1),
        qa.addr,
        &who(
            &session,
            b"X-Forwarded-For: 203.0.113.7,\r\n 198.51.100.66\r\n",
            true,
        ),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(qa.upstream.raw_count(), before);
}

/// One request over h2c (prior knowledge) with the given `x-forwarded-for` fields; the status.
async fn h2_get(addr: SocketAddr, session: &Login, xff: &[&str]) -> StatusCode {
    let mut sender = support_h2::h2c(addr).await;
    let mut req = http::Request::builder()
        .method(Method::GET)
        .uri("http://app.test/api/who")
        .header("cookie", &session.cookie);
    for v in xff {
        req = req.header("x-forwarded-for", *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status()
}

/// HTTP/2: the same reading as HTTP/1.1 (several `x-forwarded-for` fields, the last one the
/// balancer's), and the API sees one value, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_read_like_http1() {
    let qa = start("xffqa-h2", "trusted_proxies = [\"127.0.0.1\"]\n", None).await;
    let session = login(qa.addr, &qa.users, "alice").await;
    for (xff, expected) in [
        (&["198.51.100.66", "203.0.113.7"][..], "203.0.113.7"),
        (&["198.51.100.66, 127.0.0.1"][..], "198.51.100.66"),
        (&[][..], "127.0.0.1"),
    ] {
        let before = qa.upstream.raw_count();
        assert_eq!(h2_get(qa.addr, &session, xff).await, StatusCode::OK);
        assert_eq!(
            seen_since(&qa.upstream, before),
            [vec![expected.to_owned()]]
        );
        assert_eq!(qa.upstream.last_verified().uri, "/api/who");
    }
}

/// A listener on `[::]` sees an IPv4 client as `::ffff:127.0.0.1`: a trusted `127.0.0.1`
/// (and a trusted `::ffff:127.0.0.1`) still trusts it, and the API is told the IPv4 form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_listener_on_any_ipv6_address_are_trusted_as_ipv4() {
    for (tag, trusted) in [
        ("xffqa-v6-listen", "127.0.0.1"),
        ("xffqa-v6-listen-mapped", "::ffff:127.0.0.1"),
    ] {
        let qa = start(
            tag,
            &format!("trusted_proxies = [\"{trusted}\"]\n"),
            Some("[::]:{port}"),
        )
        .await;
        let addr = SocketAddr::from(([127, 0, 0, 1], qa.addr.port()));
        let session = login(addr, &qa.users, "alice").await;
        let before = qa.upstream.raw_count();
        let out = raw_from(
            lo(1),
            addr,
            &who(&session, b"X-Forwarded-For: 203.0.113.7\r\n", true),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let before_plain = qa.upstream.raw_count();
        let out = raw_from(lo(1), addr, &who(&session, b"", true)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(
            seen_since(&qa.upstream, before),
            [vec!["203.0.113.7".to_owned()], vec!["127.0.0.1".to_owned()]],
            "{trusted}"
        );
        assert_eq!(before_plain, before + 1);
    }
}

/// `countersign check-config` on a config in a new directory whose `trusted_proxies` list is
/// `nets` (TOML array items): its exit code and stderr.
fn check_trusted_proxies(tag: &str, nets: &str) -> (Option<i32>, String) {
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &Users::five().text());
    let config = dir.join("proxy.toml");
    let text = config_text("127.0.0.1:0", None, "http://127.0.0.1:9").replace(
        "shutdown_grace = \"2s\"\n",
        &format!("shutdown_grace = \"2s\"\ntrusted_proxies = [{nets}]\n"),
    );
    write(&config, &text);
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `::ffff:0:0/96` is every IPv4 address: refused like `0.0.0.0/0` (before, the prefix check
/// ran on the text's length 96 and the proxy trusted every IPv4 client's header).
#[test]
fn an_ipv4_mapped_block_of_every_ipv4_address_is_refused() {
    for net in ["::ffff:0:0/96", "::ffff:0.0.0.0/96", "::ffff:10.0.0.0/96"] {
        let (code, stderr) =
            check_trusted_proxies("xffqa-mapped-all", &format!("\"10.0.0.1\", \"{net}\""));
        assert_eq!(code, Some(2), "{net}: {stderr}");
        for part in ["server.trusted_proxies[1]", "trusts every address"] {
            assert!(stderr.contains(part), "{net}: {part:?} missing: {stderr}");
        }
    }
}

/// Blocks that between them cover every address (`0.0.0.0/1` and `128.0.0.0/1`; an IPv4-mapped
/// half and a plain one) trust every client's header as surely as `0.0.0.0/0`, which is
/// refused: so are they. Blocks that leave addresses out still load.
#[test]
fn blocks_that_together_cover_every_address_are_refused() {
    let check = |nets: &str| check_trusted_proxies("xffqa-union-all", nets);
    for nets in [
        r#""0.0.0.0/1", "128.0.0.0/1""#,
        r#""10.0.0.1", "128.0.0.0/1", "0.0.0.0/2", "64.0.0.0/2""#,
        r#""::/1", "8000::/1""#,
        r#""::ffff:0:0/97", "128.0.0.0/1""#,
    ] {
        let (code, stderr) = check(nets);
        assert_eq!(code, Some(2), "{nets}: {stderr}");
        for part in ["server.trusted_proxies", "together cover every"] {
            assert!(stderr.contains(part), "{nets}: {part:?} missing: {stderr}");
        }
    }
    for nets in [
        r#""0.0.0.0/1", "128.0.0.0/2""#,
        r#""0.0.0.0/1", "8000::/1""#,
    ] {
        let (code, stderr) = check(nets);
        assert_eq!(code, Some(0), "{nets}: {stderr}");
    }
}

/// A reload (SIGHUP) that changes `trusted_proxies` applies it to the connections accepted
/// from then on: a newly listed balancer is believed on its next connection, an address taken
/// off the list is its own client on its next one, and a connection opened before the reload
/// keeps the trust it was accepted with (whether the other end is a balancer is settled when
/// it connects, as the other connection keys are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_list_applies_to_new_connections() {
    let qa = start(
        "xffqa-reload",
        "trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.2\"]\n",
        None,
    )
    .await;
    let session = login(qa.addr, &qa.users, "alice").await;
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n").into_bytes();
    // A connection from 127.0.0.1 (not trusted yet), kept open across the reload.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(lo(1), 0)).unwrap();
    let mut kept = socket.connect(qa.addr).await.unwrap();
    let before = qa.upstream.raw_count();
    let status = exchange(&mut kept, &who(&session, &xff("203.0.113.7"), false)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let out = raw_from(lo(2), qa.addr, &who(&session, &xff("203.0.113.8"), true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        seen_since(&qa.upstream, before),
        [vec!["127.0.0.1".to_owned()], vec!["203.0.113.8".to_owned()]]
    );

    let text = std::fs::read_to_string(&qa.config).unwrap();
    write(
        &qa.config,
        &text.replace(
            "[\"10.0.0.0/8\", \"127.0.0.2\"]",
            "[\"10.0.0.0/8\", \"127.0.0.1\"]",
        ),
    );
    qa.proxy.signal("HUP");
    let applied = qa.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml", "connections accepted from now on"],
        1,
    );
    assert!(applied[0].contains("server.trusted_proxies"), "{applied:?}");
    assert!(
        qa.proxy
            .json_messages("WARN", &["SIGHUP:", "restart"])
            .is_empty(),
        "a key waits for a restart"
    );

    let before = qa.upstream.raw_count();
    // 127.0.0.1 on a new connection: a trusted balancer now.
    let out = raw_from(lo(1), qa.addr, &who(&session, &xff("203.0.113.7"), true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // 127.0.0.2 on a new connection: off the list, its own client.
    let out = raw_from(lo(2), qa.addr, &who(&session, &xff("203.0.113.8"), true)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The connection opened before: as it was accepted, not trusted.
    let status = exchange(&mut kept, &who(&session, &xff("203.0.113.9"), false)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(
        seen_since(&qa.upstream, before),
        [
            vec!["203.0.113.7".to_owned()],
            vec!["127.0.0.2".to_owned()],
            vec!["127.0.0.1".to_owned()],
        ]
    );
}

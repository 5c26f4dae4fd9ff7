//! The listeners' head and connection limits are live keys of `proxy.toml`: a reload
//! (SIGHUP) applies `server.max_header_bytes`, `max_header_count` and
//! `http2_max_concurrent_streams` to the connections accepted after it (those open keep the
//! values they started with), and `server.max_connections` / `admin.max_connections` to the
//! connections accepted after it: a lower limit closes none of those open, new ones are
//! refused (closed at once, as over the limit at start) until fewer than the new limit are
//! open; a higher one admits more at once. Against the real binary with `--workers 2` (two
//! event loops sharing each listener's limit).
//!
//! Also the adversarial checks: a live key edited together with the restart-only key its
//! meaning depends on (a listener's `max_connections` with its `listen`) waits with it,
//! nothing half-applied, and the next reload of the same file applies nothing and says
//! nothing new; the config-file gauge after such reloads; the largest durations the config
//! takes, applied by a reload and used; the TLS listener's slot taken before the handshake.
//!
//! Run: `cargo test --all-features --test proxy_reload_limits`.
#![cfg(feature = "proxy")]

mod support;
mod support_reload;
mod support_run;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use support_reload::*;
use support_run::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `proxy.toml` as [`support_reload::config`] writes it, with no `[[upstream]]` extras.
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream_url: &str,
    server: &str,
    admin_extra: &str,
) -> String {
    support_reload::config(listen, admin, upstream_url, server, admin_extra, "")
}

/// The lines reloads logged about proxy.toml so far: (applied, waiting).
fn applied_and_waiting(running: &Running) -> (Vec<String>, Vec<String>) {
    let FileLines {
        applied, waiting, ..
    } = running.file_lines();
    (applied, waiting)
}

/// `countersign run --workers 2` with `server` as its `[server]` lines (besides `listen` and
/// `public_origin`) and `admin` after `[admin]`'s `listen`.
fn start(tag: &str, server: &str, admin: &str) -> Running {
    // Never connected to: the tests ask the proxy's own endpoints.
    start_with_url(tag, server, admin, "http://127.0.0.1:9")
}

/// [`start`] with its `[[upstream]]` at `url`.
fn start_with_url(tag: &str, server: &str, admin: &str, url: &str) -> Running {
    start_reloadable(tag, server, admin, url, "")
}

/// `GET /auth/session` (401 without a session: the head was read) with `fields` extra
/// fields of `value_bytes` bytes each, keep-alive.
fn session_request(fields: usize, value_bytes: usize) -> Vec<u8> {
    let mut head = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    let value = "x".repeat(value_bytes);
    for i in 0..fields {
        head.push_str(&format!("X-Pad-{i}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A new connection's answer to `request` (its status line, "" when closed without one).
async fn on_a_new_connection(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    exchange(&mut stream, request).await
}

/// A keep-alive connection that has been served one request (so it is accepted and open),
/// retried while the listener is full ([`hold`]).
async fn served_connection(addr: SocketAddr) -> TcpStream {
    hold(addr, SESSION, "HTTP/1.1 401").await
}

const CONNECTION_LINE: &str = "(applies to connections accepted from now on; connections \
                               already open keep the values they started with)";

/// `max_header_bytes` lowered by a reload: a connection accepted after it with a head over
/// the new limit gets 431; one accepted before still takes a head of that size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_max_header_bytes_applies_to_connections_accepted_after_it() {
    let running = start(
        "reload-max-header-bytes",
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_header_bytes = \"64KiB\"",
        "",
    );
    // A 24 KiB head: within 64 KiB, over 8 KiB (hyper's smallest buffer, so the lowest
    // limit that makes a difference).
    let big = session_request(3, 8 * 1024);
    let mut before = served_connection(running.addr).await;
    assert!(on_a_new_connection(running.addr, &big)
        .await
        .starts_with("HTTP/1.1 401"));

    let applied = running.reload(
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_header_bytes = \"8KiB\"",
        "",
        "server.max_header_bytes",
    );
    assert!(
        applied.contains(&format!(
            "applied 1 key: server.max_header_bytes {CONNECTION_LINE}"
        )),
        "{applied}"
    );
    // Several connections: `SO_REUSEPORT` spreads them over both event loops.
    for _ in 0..4 {
        let status = on_a_new_connection(running.addr, &big).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
        let status = on_a_new_connection(running.addr, &session_request(3, 1024)).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    }
    let status = exchange(&mut before, &big).await;
    assert!(
        status.starts_with("HTTP/1.1 401"),
        "the connection accepted before the reload lost the old 64 KiB: {status:?}"
    );
}

/// `max_header_count` lowered by a reload: a connection accepted after it with more fields
/// than the new limit gets 431; one accepted before still takes that many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_max_header_count_applies_to_connections_accepted_after_it() {
    let running = start(
        "reload-max-header-count",
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_header_count = 60",
        "",
    );
    // 41 fields with `Host`.
    let many = session_request(40, 1);
    let mut before = served_connection(running.addr).await;
    assert!(on_a_new_connection(running.addr, &many)
        .await
        .starts_with("HTTP/1.1 401"));

    let applied = running.reload(
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_header_count = 20",
        "",
        "server.max_header_count",
    );
    assert!(
        applied.contains(&format!(
            "applied 1 key: server.max_header_count {CONNECTION_LINE}"
        )),
        "{applied}"
    );
    for _ in 0..4 {
        let status = on_a_new_connection(running.addr, &many).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
        let status = on_a_new_connection(running.addr, &session_request(10, 1)).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    }
    let status = exchange(&mut before, &many).await;
    assert!(
        status.starts_with("HTTP/1.1 401"),
        "the connection accepted before the reload lost the old 60 fields: {status:?}"
    );
}

/// The SETTINGS the proxy sends first on a new h2c (prior knowledge) connection, as
/// (identifier, value) pairs.
async fn first_settings(addr: SocketAddr) -> Vec<(u16, u32)> {
    const PREFACE_AND_SETTINGS: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let mut bytes = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            // A SETTINGS frame (type 4) without ACK (flag 1), whole.
            let mut rest = &bytes[..];
            while rest.len() >= 9 {
                let length =
                    usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                if rest.len() < 9 + length {
                    break;
                }
                if rest[3] == 0x4 && rest[4] & 0x1 == 0 {
                    return rest[9..9 + length]
                        .chunks_exact(6)
                        .map(|s| {
                            (
                                u16::from_be_bytes([s[0], s[1]]),
                                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                            )
                        })
                        .collect::<Vec<_>>();
                }
                rest = &rest[9 + length..];
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => panic!("closed before its SETTINGS: {bytes:?}"),
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no SETTINGS within 10 s")
}

/// `http2_max_concurrent_streams` (and `max_header_bytes`, HTTP/2's header list size)
/// lowered by a reload: the SETTINGS of an h2c connection accepted after it advertise the
/// new values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_http2_max_concurrent_streams_is_advertised_to_new_connections() {
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    let running = start(
        "reload-http2-streams",
        "shutdown_grace = \"2s\"\nhttp2_max_concurrent_streams = 100\nmax_header_bytes = \"32KiB\"",
        "",
    );
    let settings = first_settings(running.addr).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 100)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(MAX_HEADER_LIST_SIZE, 32 * 1024)),
        "{settings:?}"
    );

    let applied = running.reload(
        "shutdown_grace = \"2s\"\nhttp2_max_concurrent_streams = 7\nmax_header_bytes = \"16KiB\"",
        "",
        "server.http2_max_concurrent_streams",
    );
    assert!(
        applied.contains(&format!(
            "applied 2 keys: server.http2_max_concurrent_streams, server.max_header_bytes \
             {CONNECTION_LINE}"
        )),
        "{applied}"
    );
    for _ in 0..4 {
        let settings = first_settings(running.addr).await;
        assert!(
            settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
            "{settings:?}"
        );
        assert!(
            settings.contains(&(MAX_HEADER_LIST_SIZE, 16 * 1024)),
            "{settings:?}"
        );
    }
}

const LIMIT_LINE: &str = "(applies to connections accepted from now on; no open connection \
                          is closed: below a lower limit, new connections are refused until \
                          fewer than the limit are open)";

/// Whether a new connection is refused (closed at once, without an answer).
async fn refused(addr: SocketAddr) -> bool {
    let status = on_a_new_connection(addr, &session_request(0, 0)).await;
    assert!(
        status.is_empty() || status.starts_with("HTTP/1.1 401"),
        "{status:?}"
    );
    status.is_empty()
}

/// `max_connections` lowered from 8 to 2 with 4 idle keep-alive connections open: they stay
/// served, a new one is refused until only 1 of them remains, then admitted; raised from 2
/// to 4, two more are admitted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_max_connections_refuses_until_below_it_and_a_raise_admits_at_once() {
    let server = |n: usize| {
        format!("shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = {n}")
    };
    let running = start("reload-max-connections", &server(8), "");
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(served_connection(running.addr).await);
    }
    let applied = running.reload(&server(2), "", "server.max_connections");
    assert!(
        applied.contains(&format!(
            "applied 1 key: server.max_connections {LIMIT_LINE}"
        )),
        "{applied}"
    );
    // The open ones stay served.
    for stream in &mut open {
        let status = exchange(stream, &session_request(0, 0)).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    }
    // 4, 3, 2 open: refused (each probe on either event loop: the limit is the listener's).
    for _ in 0..3 {
        for _ in 0..4 {
            assert!(
                refused(running.addr).await,
                "admitted with {} open, limit 2",
                open.len()
            );
        }
        let closed = open.pop().unwrap();
        drop(closed);
        // The server sees the close soon; until then a probe is refused as it should be.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 1 open: admitted (once the server has seen the closes).
    let status = answered_once_a_slot_is_free(
        running.addr,
        b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    open.push(served_connection(running.addr).await);
    assert!(refused(running.addr).await, "admitted with 2 open, limit 2");

    let applied = running.reload(&server(4), "", "server.max_connections");
    assert!(
        applied.contains("applied 1 key: server.max_connections"),
        "{applied}"
    );
    // Two more at once.
    open.push(served_connection(running.addr).await);
    open.push(served_connection(running.addr).await);
    for _ in 0..4 {
        assert!(refused(running.addr).await, "admitted with 4 open, limit 4");
    }
    for stream in &mut open {
        let status = exchange(stream, &session_request(0, 0)).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    }
}

/// `admin.max_connections` lowered by a reload: the admin listener's open connections stay,
/// new ones are refused until fewer than the new limit are open; the main listener is not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_admin_max_connections_applies_to_the_admin_listener() {
    let server = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start(
        "reload-admin-max-connections",
        server,
        "max_connections = 8",
    );
    let probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(running.admin).await.unwrap();
        let status = exchange(&mut stream, probe).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
        open.push(stream);
    }
    let applied = running.reload(server, "max_connections = 2", "admin.max_connections");
    assert!(
        applied.contains(&format!(
            "applied 1 key: admin.max_connections {LIMIT_LINE}"
        )),
        "{applied}"
    );
    assert!(on_a_new_connection(running.admin, probe).await.is_empty());
    assert!(
        !refused(running.addr).await,
        "the main listener was limited"
    );
    for stream in &mut open {
        assert!(exchange(stream, probe).await.starts_with("HTTP/1.1 200"));
    }
    open.truncate(1);
    let status = answered_once_a_slot_is_free(
        running.admin,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
}

/// A file with an invalid limit applies nothing (the same check and message as at start):
/// the running limits stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_limit_applies_nothing() {
    let running = start(
        "reload-invalid-limits",
        "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = 1",
        "",
    );
    let staged = running.dir.join(".proxy.toml.new");
    write(
        &staged,
        &config(
            running.addr,
            running.admin,
            &running.upstream_url,
            "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = 5\n\
             max_header_bytes = 512",
            "",
        ),
    );
    std::fs::rename(&staged, running.dir.join("proxy.toml")).unwrap();
    running.proxy.signal("HUP");
    let error = running
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert!(
        error[0].contains("server.max_header_bytes") && error[0].contains("must be at least 8KiB"),
        "{error:?}"
    );
    let _held = served_connection(running.addr).await;
    assert!(
        refused(running.addr).await,
        "max_connections = 5 was applied"
    );
}

const SESSION: &[u8] = b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\n\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// `admin.listen` and `admin.max_connections` edited together: the limit is for the new
/// listener, so it waits for the restart with it (both named as waiting, none applied, the
/// running admin limit unchanged); the same file again applies and says nothing new; once
/// `listen` is back to the one running, the limit applies (the baseline was right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_max_connections_waits_while_admin_listen_changes() {
    let server = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_with_url(
        "qa-admin-listen",
        server,
        "max_connections = 8",
        "http://127.0.0.1:9",
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(hold(running.admin, HEALTHZ, "HTTP/1.1 200").await);
    }
    let (moved, _) = two_free_addrs();
    let edited = config(
        running.addr,
        moved,
        &running.upstream_url,
        server,
        "max_connections = 2",
    );
    for round in 1..=2 {
        running.reload_text(&edited);
        let (applied, waiting) = applied_and_waiting(&running);
        assert!(applied.is_empty(), "round {round}: {applied:?}");
        assert_eq!(waiting.len(), round, "{waiting:?}");
        assert!(
            waiting[round - 1].contains("(2 keys: admin.listen, admin.max_connections)"),
            "{waiting:?}"
        );
        // The running admin listener keeps its limit of 8.
        open.push(hold(running.admin, HEALTHZ, "HTTP/1.1 200").await);
        assert_eq!(
            gauge(running.admin, "countersign_config_file_changed").await,
            1
        );
    }
    // Back to the listener running: the limit applies now, and nothing waits.
    let back = config(
        running.addr,
        running.admin,
        &running.upstream_url,
        server,
        "max_connections = 2",
    );
    running.reload_text(&back);
    let (applied, waiting) = applied_and_waiting(&running);
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert!(
        applied.len() == 1 && applied[0].contains("applied 1 key: admin.max_connections"),
        "{applied:?}"
    );
    let mut stream = TcpStream::connect(running.admin).await.unwrap();
    assert_eq!(exchange(&mut stream, HEALTHZ).await, "", "admitted over 2");
    for stream in &mut open {
        assert!(exchange(stream, HEALTHZ).await.starts_with("HTTP/1.1 200"));
    }
    let metrics = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut stream = open.pop().unwrap();
    stream.write_all(metrics).await.unwrap();
    let mut text = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut text)).await;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("\ncountersign_config_file_changed 0\n"),
        "{text}"
    );
}

/// `server.listen` and `server.max_connections` edited together: as the admin listener's,
/// the limit is for the new listener and waits with it (the running one keeps its limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_connections_waits_while_server_listen_changes() {
    let server = |n: usize| {
        format!("shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = {n}")
    };
    let running = start_with_url("qa-server-listen", &server(8), "", "http://127.0.0.1:9");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(hold(running.addr, SESSION, "HTTP/1.1 401").await);
    }
    let (moved, _) = two_free_addrs();
    let edited = config(moved, running.admin, &running.upstream_url, &server(2), "");
    for round in 1..=2 {
        running.reload_text(&edited);
        let (applied, waiting) = applied_and_waiting(&running);
        assert!(applied.is_empty(), "round {round}: {applied:?}");
        assert_eq!(waiting.len(), round, "{waiting:?}");
        assert!(
            waiting[round - 1].contains("(2 keys: server.listen, server.max_connections)"),
            "{waiting:?}"
        );
        open.push(hold(running.addr, SESSION, "HTTP/1.1 401").await);
    }
    assert_eq!(
        gauge(running.admin, "countersign_config_file_changed").await,
        1
    );
}

/// A live group that does not depend on the listener (the head limits, which both
/// listeners use) applies while `server.listen` waits; the same file again applies nothing
/// more and only repeats the waiting key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_limits_apply_while_server_listen_waits_and_a_second_reload_adds_nothing() {
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_with_url("qa-head-listen", base, "", "http://127.0.0.1:9");
    let (moved, _) = two_free_addrs();
    let edited = config(
        moved,
        running.admin,
        &running.upstream_url,
        &format!("{base}\nmax_header_count = 20"),
        "",
    );
    running.reload_text(&edited);
    let (applied, waiting) = applied_and_waiting(&running);
    assert!(
        applied.len() == 1 && applied[0].contains("applied 1 key: server.max_header_count"),
        "{applied:?}"
    );
    assert!(
        waiting.len() == 1 && waiting[0].contains("(1 key: server.listen)"),
        "{waiting:?}"
    );
    running.reload_text(&edited);
    let (again, waiting) = applied_and_waiting(&running);
    assert_eq!(again, applied, "a second reload applied more");
    assert!(
        waiting.len() == 2 && waiting[1].contains("(1 key: server.listen)"),
        "{waiting:?}"
    );
    let mut many = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-Pad-{i}: x\r\n"));
    }
    many.push_str("\r\n");
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    let status = exchange(&mut stream, many.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
}

/// Every live duration at the config's maximum (365d), applied by a reload, then used: new
/// connections, a request with a body (`request_timeout`), an upstream connection
/// (`connect_timeout`: refused at once, 502), HTTP/2, the admin listener, and a SIGTERM
/// (`shutdown_grace`): no panic, a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_durations_through_a_reload_work() {
    let base = "shutdown_grace = \"2s\"";
    let mut running = start_with_url("qa-longest", base, "", "http://127.0.0.1:9");
    let longest = "shutdown_grace = \"365d\"\nrequest_timeout = \"365d\"\n\
                   header_read_timeout = \"365d\"\nsend_timeout = \"365d\"\n\
                   http2_idle_timeout = \"365d\"";
    let text = config(
        running.addr,
        running.admin,
        &running.upstream_url,
        longest,
        "",
    )
    .replace(
        "url = \"http://127.0.0.1:9\"",
        "url = \"http://127.0.0.1:9\"\nconnect_timeout = \"365d\"\ntimeout = \"365d\"\n\
         body_idle_timeout = \"365d\"",
    );
    running.reload_text(&text);
    let (applied, waiting) = applied_and_waiting(&running);
    assert!(waiting.is_empty(), "{waiting:?}");
    assert!(
        applied
            .iter()
            .any(|l| l.contains("upstream[0].connect_timeout")),
        "{applied:?}"
    );
    let login = login_alice_at(running.addr).await;
    for _ in 0..4 {
        let reply = post_json(running.addr, "/api/x", &login, "{\"a\":1}").await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        let reply = get(running.addr, "/api/x", &login).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
    }
    // h2c with prior knowledge: a SETTINGS frame back.
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 4, "not a SETTINGS frame: {head:?}");
    drop(stream);
    assert_eq!(
        gauge(running.admin, "countersign_config_file_changed").await,
        0
    );
    let log = running.proxy.log();
    assert!(!log.contains("panicked"), "{log}");
    let status = running.proxy.stop();
    assert!(status.success(), "{status}: {}", running.proxy.log());
    assert!(!running.proxy.log().contains("panicked"));
}

/// Whether the proxy closes a new connection to `addr` at once (refused over the limit),
/// rather than waiting for the client's first bytes (admitted: the slot is held, and with TLS
/// the handshake not even started). The admitted connection is returned, to keep its slot.
async fn closed_at_once(addr: SocketAddr) -> (bool, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    // A refused connection is closed as soon as it is accepted; 2 s of silence tells the
    // two apart even when a loaded machine delays that close.
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
    (matches!(read, Ok(Ok(0) | Err(_))), stream)
}

/// On a TLS listener a connection takes its `max_connections` slot when accepted, before
/// its handshake (as the semaphore did): one connected client that sends nothing fills a
/// limit of 1; a reload to 2 admits one more at once; its slot is held before its handshake
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_take_their_slot_before_the_handshake_after_a_reload_too() {
    let dir = temp_dir("qa-tls-slot");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    write(&dir.join("cert.pem"), &certified.cert.pem());
    write(&dir.join("key.pem"), &certified.key_pair.serialize_pem());
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let server = |n: usize| {
        format!(
            "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = {n}\n\
             tls_cert = \"cert.pem\"\ntls_key = \"key.pem\""
        )
    };
    let text = |addr: SocketAddr, admin: SocketAddr, n: usize| {
        config(addr, admin, "http://127.0.0.1:9", &server(n), "")
            .replace("http://app.test", "https://localhost")
    };
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let file = dir.join("proxy.toml");
        write(&file, &text(addr, admin, 1));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    // `wait_listening`'s own probe holds the slot until the proxy has seen it close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        let (refused, stream) = closed_at_once(addr).await;
        if !refused {
            break stream;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first connection was refused for 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..4 {
        assert!(
            closed_at_once(addr).await.0,
            "admitted over 1, before a handshake"
        );
    }
    let running = Running {
        proxy,
        addr,
        admin,
        dir,
        upstream_url: "http://127.0.0.1:9".to_owned(),
        upstream: String::new(),
    };
    running.reload_text(&text(addr, admin, 2));
    let (applied, waiting) = applied_and_waiting(&running);
    assert!(waiting.is_empty(), "{waiting:?}");
    assert!(
        applied.len() == 1 && applied[0].contains("applied 1 key: server.max_connections"),
        "{applied:?}"
    );
    let (refused, _second) = closed_at_once(addr).await;
    assert!(
        !refused,
        "the raised limit did not admit a second connection"
    );
    for _ in 0..4 {
        assert!(
            closed_at_once(addr).await.0,
            "admitted over 2, before a handshake"
        );
    }
    drop(first);
}

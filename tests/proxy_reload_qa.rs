//! Adversarial checks of the live keys of `proxy.toml` against the real binary: a live key
//! edited together with the restart-only key its meaning depends on (a listener's
//! `max_connections` with its `listen`) waits with it, nothing half-applied, and the next
//! reload of the same file applies nothing and says nothing new; the config-file gauge after
//! such reloads; the largest durations the config takes, applied by a reload and used.
//!
//! Run: `cargo test --all-features --test proxy_reload_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use support_run::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `proxy.toml` listening on `listen` and `admin`, with `server` in place of its
/// `shutdown_grace` line and `admin_extra` after `[admin]`'s `listen`.
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream_url: &str,
    server: &str,
    admin_extra: &str,
) -> String {
    let admin_line = format!("listen = \"{admin}\"\n");
    config_text(&listen.to_string(), Some(&admin.to_string()), upstream_url)
        .replace("shutdown_grace = \"2s\"\n", &format!("{server}\n"))
        .replace(&admin_line, &format!("{admin_line}{admin_extra}\n"))
}

struct Running {
    proxy: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    dir: TestDir,
    upstream_url: String,
}

impl Running {
    /// Writes `text` as `proxy.toml` (atomically) and sends SIGHUP; returns once the proxy
    /// has logged one more line about the file (applied or waiting).
    fn reload_text(&self, text: &str) {
        let staged = self.dir.join(".proxy.toml.new");
        write(&staged, text);
        std::fs::rename(&staged, self.dir.join("proxy.toml")).unwrap();
        let lines = self.file_lines();
        self.proxy.signal("HUP");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.file_lines() == lines {
            assert!(
                std::time::Instant::now() < deadline,
                "no line about the file: {}",
                self.proxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every line of one reload is written together; a little slack for the last.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// The lines a reload logs about proxy.toml so far: (applied, waiting).
    fn file_lines(&self) -> (Vec<String>, Vec<String>) {
        (
            self.proxy
                .json_messages("INFO", &["SIGHUP:", "proxy.toml: applied"]),
            self.proxy
                .json_messages("WARN", &["SIGHUP:", "proxy.toml changed since"]),
        )
    }
}

fn start(tag: &str, server: &str, admin: &str, url: &str) -> Running {
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, admin_addr) = start_on_free_ports(|addr, admin_addr| {
        let file = dir.join("proxy.toml");
        write(&file, &config(addr, admin_addr, url, server, admin));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    Running {
        proxy,
        addr,
        admin: admin_addr,
        dir,
        upstream_url: url.to_owned(),
    }
}

/// Sends `request` and reads until the whole answer's head is in or the proxy closes: its
/// status line ("" when closed without an answer).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
    if stream.write_all(request).await.is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if bytes.len() >= end + 4 + length {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer (nor a close) within 10 s");
    String::from_utf8_lossy(&bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

const SESSION: &[u8] = b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\n\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// A keep-alive connection to `addr` that has been answered `expect` to `request`.
async fn served(addr: SocketAddr, request: &[u8], expect: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let status = exchange(&mut stream, request).await;
    assert!(status.starts_with(expect), "{status:?}");
    stream
}

/// `admin.listen` and `admin.max_connections` edited together: the limit is for the new
/// listener, so it waits for the restart with it (both named as waiting, none applied, the
/// running admin limit unchanged); the same file again applies and says nothing new; once
/// `listen` is back to the one running, the limit applies (the baseline was right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_max_connections_waits_while_admin_listen_changes() {
    let server = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start(
        "qa-admin-listen",
        server,
        "max_connections = 8",
        "http://127.0.0.1:9",
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served(running.admin, HEALTHZ, "HTTP/1.1 200").await);
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
        let (applied, waiting) = running.file_lines();
        assert!(applied.is_empty(), "round {round}: {applied:?}");
        assert_eq!(waiting.len(), round, "{waiting:?}");
        assert!(
            waiting[round - 1].contains("(2 keys: admin.listen, admin.max_connections)"),
            "{waiting:?}"
        );
        // The running admin listener keeps its limit of 8.
        open.push(served(running.admin, HEALTHZ, "HTTP/1.1 200").await);
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
    let (applied, waiting) = running.file_lines();
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
    let metrics = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
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
    let running = start("qa-server-listen", &server(8), "", "http://127.0.0.1:9");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served(running.addr, SESSION, "HTTP/1.1 401").await);
    }
    let (moved, _) = two_free_addrs();
    let edited = config(moved, running.admin, &running.upstream_url, &server(2), "");
    for round in 1..=2 {
        running.reload_text(&edited);
        let (applied, waiting) = running.file_lines();
        assert!(applied.is_empty(), "round {round}: {applied:?}");
        assert_eq!(waiting.len(), round, "{waiting:?}");
        assert!(
            waiting[round - 1].contains("(2 keys: server.listen, server.max_connections)"),
            "{waiting:?}"
        );
        open.push(served(running.addr, SESSION, "HTTP/1.1 401").await);
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
    let running = start("qa-head-listen", base, "", "http://127.0.0.1:9");
    let (moved, _) = two_free_addrs();
    let edited = config(
        moved,
        running.admin,
        &running.upstream_url,
        &format!("{base}\nmax_header_count = 20"),
        "",
    );
    running.reload_text(&edited);
    let (applied, waiting) = running.file_lines();
    assert!(
        applied.len() == 1 && applied[0].contains("applied 1 key: server.max_header_count"),
        "{applied:?}"
    );
    assert!(
        waiting.len() == 1 && waiting[0].contains("(1 key: server.listen)"),
        "{waiting:?}"
    );
    running.reload_text(&edited);
    let (again, waiting) = running.file_lines();
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
    let mut running = start("qa-longest", base, "", "http://127.0.0.1:9");
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
    let (applied, waiting) = running.file_lines();
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
    let read = tokio::time::timeout(Duration::from_millis(700), stream.read(&mut byte)).await;
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
    // `wait_listening`'s own probe may still hold the slot for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (refused, first) = closed_at_once(addr).await;
    assert!(!refused, "the first connection was refused");
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
    };
    running.reload_text(&text(addr, admin, 2));
    let (applied, waiting) = running.file_lines();
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

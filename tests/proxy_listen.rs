//! `countersign run` and its public address: it must not share the port with another process
//! (SO_REUSEPORT would let it), it still starts several event loops on a free port, restarts
//! over its own TIME_WAIT connections, and logs the listeners' addresses as addresses.
//! Real processes and sockets on loopback. Run: `cargo test --all-features --test proxy_listen`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use support_run::*;

/// No upstream is contacted by these tests (only `/auth/*` is requested).
const UPSTREAM: &str = "http://127.0.0.1:9";

/// A config directory (removed when dropped) and its `proxy.toml`.
fn config_for(tag: &str, listen: &str, admin: Option<&str>) -> (TestDir, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let config = write_config(
        &dir,
        listen,
        admin,
        UPSTREAM,
        &keyring_file_text("k1"),
        &users_file_text(),
    );
    (dir, config)
}

/// Starts a `run` that must fail; returns its stderr. Panics (showing the log) if it is still
/// running after 30 s, i.e. if it started serving.
fn run_must_fail(config: &std::path::Path, extra: &[&str]) -> String {
    let mut proxy = RunningProxy::spawn(config, extra);
    let Some(status) = proxy.wait_exit(Duration::from_secs(30)) else {
        panic!(
            "the second proxy started although the address is taken: {}",
            proxy.log()
        );
    };
    let log = proxy.log();
    assert_eq!(status.code(), Some(2), "{log}");
    log
}

fn assert_address_in_use(log: &str, addr: SocketAddr) {
    assert!(
        log.contains("server.listen")
            && log.contains(&addr.to_string())
            && log.contains("Address already in use"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("proxy listening"), "{log}");
}

/// A listener in this test process on a fresh loopback port, with SO_REUSEPORT (exactly what
/// the first `run` holds) or without.
fn listener(reuseport: bool) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.set_reuseport(reuseport).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(128).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_address_another_process_listens_on_even_with_so_reuseport() {
    for reuseport in [true, false] {
        let held = listener(reuseport);
        let addr = held.local_addr().unwrap();
        let (_dir, config) = config_for("listen-held", &addr.to_string(), None);
        for workers in ["1", "2"] {
            let log = tokio::task::spawn_blocking({
                let config = config.clone();
                move || run_must_fail(&config, &["--workers", workers])
            })
            .await
            .unwrap();
            assert_address_in_use(&log, addr);
        }
        // The port is still this listener's alone: a new connection reaches it.
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), held.accept())
            .await
            .expect("the original listener gets the connection")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_address_exits_2_and_the_first_keeps_all_connections() {
    let (mut first, addr, _) = start_on_free_ports(|addr, _| {
        let (dir, config) = config_for("listen-twice", &addr.to_string(), None);
        RunningProxy::spawn(&config, &["--workers", "2"]).keep_dir(dir)
    });
    first.wait_listening(addr);
    let (_dir, config) = config_for("listen-twice-again", &addr.to_string(), None);

    let log = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run_must_fail(&config, &["--workers", "2"])
    })
    .await
    .unwrap();
    assert_address_in_use(&log, addr);

    // One session, then many fresh connections: every one reaches the process that holds the
    // session (a second process sharing the port would answer some with 401).
    let cookie = login_alice_at(addr).await.cookie;
    for _ in 0..20 {
        let r = send(
            addr,
            Method::GET,
            "/auth/session",
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(first.stop().success());
}

/// The `proxy listening` line of a JSON log.
fn listening_line(log: &str) -> serde_json::Value {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "proxy listening")
        .unwrap_or_else(|| panic!("no listening line: {log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_a_free_port_serve_and_the_log_names_the_admin_address() {
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let (dir, config) = config_for(
            "listen-workers",
            &addr.to_string(),
            Some(&admin.to_string()),
        );
        RunningProxy::spawn(&config, &["--workers", "2"]).keep_dir(dir)
    });
    proxy.wait_listening(addr);
    // Fresh connections, spread by the kernel over both event loops: all answered.
    for _ in 0..20 {
        let r = send(addr, Method::GET, "/auth/session", &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let healthz = send(admin, Method::GET, "/healthz", &[], Bytes::new()).await;
    assert_eq!(healthz.status, StatusCode::OK);
    let line = listening_line(&proxy.wait_for_log("proxy listening"));
    assert_eq!(line["addr"], addr.to_string(), "{line}");
    // The address, not the Debug text of an Option ("Some(127.0.0.1:...)").
    assert_eq!(line["admin"], admin.to_string(), "{line}");
    assert!(proxy.stop().success());

    // Without an admin listener the field is left out (not "None").
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let (dir, config) = config_for("listen-noadmin", &addr.to_string(), None);
        RunningProxy::spawn(&config, &["--workers", "2"]).keep_dir(dir)
    });
    proxy.wait_listening(addr);
    let line = listening_line(&proxy.wait_for_log("proxy listening"));
    assert!(line.get("admin").is_none(), "{line}");
    assert!(proxy.stop().success());
}

/// Connections in TIME_WAIT whose local port is `port` (from /proc/net/tcp).
fn time_wait_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port && fields[3] == "06"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_restarts_on_its_port_while_its_old_connections_are_in_time_wait() {
    let (mut first, addr, _) = start_on_free_ports(|addr, _| {
        let (dir, config) = config_for("listen-restart", &addr.to_string(), None);
        RunningProxy::spawn(&config, &["--workers", "2"]).keep_dir(dir)
    });
    let port = addr.port();
    let (_dir, config) = config_for("listen-restart-again", &addr.to_string(), None);
    first.wait_listening(addr);
    // `Connection: close`: the proxy closes first, so the TIME_WAIT is on its side, on the
    // listening port.
    for _ in 0..3 {
        let answer = raw_exchange(
            addr,
            b"GET /auth/session HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    assert!(first.stop().success());
    assert!(time_wait_on(port) > 0, "no TIME_WAIT left to test with");

    let mut second = RunningProxy::spawn(&config, &["--workers", "2"]);
    second.wait_listening(addr);
    second.wait_for_log("proxy listening");
    let r = send(addr, Method::GET, "/auth/session", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(second.stop().success());
}

/// Sends `request`, shuts down the sending side (as `nc -N` and many probes do) and reads the
/// answer to its end.
async fn half_closed_exchange(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A client that shuts down its sending side after a complete request still gets the answer,
/// every time, on the public and the admin listener. (With hyper's default the EOF, read while
/// the answer was being made, closed the connection first in ~20 % of attempts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_clients_get_their_answer() {
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let (dir, config) = config_for("listen-half", &addr.to_string(), Some(&admin.to_string()));
        RunningProxy::spawn(&config, &[]).keep_dir(dir)
    });
    proxy.wait_listening(addr);
    let mut missing = Vec::new();
    for attempt in 0..40 {
        let public =
            half_closed_exchange(addr, "GET /auth/session HTTP/1.1\r\nHost: app.test\r\n\r\n")
                .await;
        if !public.starts_with("HTTP/1.1 401") {
            missing.push(format!("public {attempt}: {public:?}"));
        }
        let health =
            half_closed_exchange(admin, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        if !health.starts_with("HTTP/1.1 200") {
            missing.push(format!("admin {attempt}: {health:?}"));
        }
    }
    assert!(proxy.stop().success());
    assert!(missing.is_empty(), "answers missing: {missing:?}");
}

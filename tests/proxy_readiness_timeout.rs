//! The proxy's Redis readiness check (`/readyz`, `run`'s startup check, `check-config
//! --online`) has the configured call deadline, `session.redis_timeout`, as
//! docs/OPERATIONS.md says: a Redis slower than 250 ms but within `redis_timeout` is ready,
//! and a check that gets no answer says it timed out and after how long, not that the server
//! is a replica or evicts. A check that times out still replaces its connection, so readiness
//! comes back by itself after a connection went silent.
//!
//! A real `redis-server`, paused with `CLIENT PAUSE`; and in front of one a forwarder that
//! goes silent (nothing forwarded, nothing closed) on command.
//! Run: `cargo test --all-features --test proxy_readiness_timeout`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_redis;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::proxy::config::{ProxyConfig, StoreKind};
use countersign::proxy::session_redis::redis_connection;
use countersign::replay::RedisConnection;
use support_cli::{run_countersign, Checked};
use support_redis::forwarder::{holds, ChunkFate, TcpForwarder};
use support_redis::{redis_proxy_config, RedisServer, TestDir};

/// A config directory whose `[session]` is a Redis store at `redis_addr` with these
/// `redis_timeout` and `redis_connect_timeout`.
fn setup(redis_addr: SocketAddr, timeout: &str, connect_timeout: &str) -> (TestDir, PathBuf) {
    let session = format!(
        "redis_url = \"redis://{redis_addr}/0\"\nredis_timeout = \"{timeout}\"\n\
         redis_connect_timeout = \"{connect_timeout}\""
    );
    redis_proxy_config("readiness-timeout", "127.0.0.1:0", "", &session, "")
}

/// The stores' connection as `run` makes it from the config at `path`.
fn proxy_connection(path: &Path) -> RedisConnection {
    let config = ProxyConfig::load(path).unwrap();
    let StoreKind::Redis { url, .. } = &config.session.store else {
        panic!("a redis store");
    };
    redis_connection(&config, url).unwrap()
}

/// Forwards loopback connections to `target` until [`Silencer::silence`]: from then on, what
/// clients send on the connections open so far is dropped (nothing forwarded, nothing
/// closed), as on a path that went dead. With `after_ping`, a connection goes silent by
/// itself once it has carried a client's first `PING`.
struct Silencer {
    forwarder: TcpForwarder,
    silent: Arc<AtomicBool>,
}

/// A `PING` as the client sends it (RESP).
const PING_COMMAND: &[u8] = b"*1\r\n$4\r\nPING\r\n";

impl Silencer {
    async fn start(target: SocketAddr, after_ping: bool) -> Silencer {
        let silent = Arc::new(AtomicBool::new(false));
        let quiet = silent.clone();
        let forwarder = TcpForwarder::start(target, move || {
            let quiet = quiet.clone();
            // Only connections accepted before `silence` are silenced by it.
            let before_silence = !quiet.load(Ordering::SeqCst);
            let mut pinged = false;
            move |chunk: &[u8]| {
                if (before_silence && quiet.load(Ordering::SeqCst)) || (after_ping && pinged) {
                    return ChunkFate::Swallow;
                }
                pinged = pinged || holds(chunk, PING_COMMAND);
                ChunkFate::Forward
            }
        })
        .await;
        Silencer { forwarder, silent }
    }

    fn addr(&self) -> SocketAddr {
        self.forwarder.addr
    }

    /// Every connection open so far goes silent for good; later ones forward as usual.
    fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.forwarder.connections()
    }
}

/// A Redis that answers in about 3 s (`CLIENT PAUSE 3000 ALL`), within `redis_timeout =
/// "8s"`: ready. (The check used to give up after 250 ms, whatever `redis_timeout` said.) The
/// pause is long, so that the check still meets it after the test process stalled for a
/// second or two on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_250ms_but_within_redis_timeout_is_ready() {
    let server = RedisServer::start();
    let (_dir, path) = setup(server.addr(), "8s", "8s");
    let connection = proxy_connection(&path);
    // Connected and checked before the pause.
    assert!(connection.ping().await, "ready before the pause");
    let connections_before = total_connections(&server);

    assert_eq!(server.cli(&["CLIENT", "PAUSE", "3000", "ALL"]).trim(), "OK");
    let started = Instant::now();
    let ready = connection.ping().await;
    let took = started.elapsed();
    assert!(
        ready,
        "not ready with a pause of 3 s (gave up after {took:?})"
    );
    assert!(
        took >= Duration::from_millis(400),
        "the check waited for the paused server: {took:?}"
    );
    // And the connection was kept: the next check is answered on it at once (no new
    // connection: the server counted only this test's two redis-cli connections since).
    let started = Instant::now();
    assert!(connection.ping().await);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        total_connections(&server),
        connections_before + 2,
        "the check made a new connection"
    );
    // The check's deadline is `redis_timeout`.
    assert_eq!(connection.options().ping_timeout, Duration::from_secs(8));
}

/// The connections the server has accepted so far (`total_connections_received`), the
/// `redis-cli` that asks included.
fn total_connections(server: &RedisServer) -> u64 {
    let info = server.cli(&["INFO", "stats"]);
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .unwrap_or_else(|| panic!("no total_connections_received in {info}"))
        .trim()
        .parse()
        .unwrap()
}

/// A readiness check on a connection gone silent says it timed out after `redis_timeout`
/// (5 s: the first check, which must pass, does on a busy machine too), not after the 250 ms
/// it once had, nor after `redis_connect_timeout` (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_check_without_answer_says_it_timed_out_after_redis_timeout() {
    let server = RedisServer::start();
    let silencer = Silencer::start(server.addr(), false).await;
    let (_dir, path) = setup(silencer.addr(), "5s", "20s");
    let connection = proxy_connection(&path);
    assert_eq!(connection.readiness().await, Ok(()));
    silencer.silence();
    let started = Instant::now();
    let error = connection.readiness().await.unwrap_err();
    let took = started.elapsed();
    assert!(error.is_timeout(), "{error}");
    assert!(
        error.to_string().contains("timed out after 5000 ms"),
        "{error}"
    );
    // Slack for a busy machine above, well under the connect deadline.
    assert!(
        took >= Duration::from_millis(4950) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
}

/// `check-config --online` against a Redis that answers the connection's check and the
/// `PING`, then not the readiness check: the line says it timed out and after how long (the
/// message `run` logs at startup too: the same check), not that the server is a replica or
/// evicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_says_the_readiness_check_timed_out_and_after_how_long() {
    let server = RedisServer::start();
    let after_ping = Silencer::start(server.addr(), true).await;
    // Deadlines a stall of a busy machine does not reach before the silence.
    let (_dir, path) = setup(after_ping.addr(), "3s", "10s");
    let args = vec![
        "check-config".to_owned(),
        "--online".to_owned(),
        "--config".to_owned(),
        path.display().to_string(),
    ];
    let run = Checked::from(
        tokio::task::spawn_blocking(move || run_countersign(&args, b""))
            .await
            .unwrap(),
    );
    assert_eq!(run.code, Some(1), "{run}");
    let line = run.line("session.redis_url");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("answers PING"), "{line}");
    assert!(line.contains("timed out after 3000 ms"), "{line}");
    assert!(line.contains("session.redis_timeout"), "{line}");
    assert!(!line.contains("replica"), "{line}");
    assert!(!line.contains("eviction"), "{line}");
    assert_eq!(after_ping.connections(), 1, "{run}");
}

/// Why a readiness check that times out still drops its connection: a process that is not
/// ready gets no requests, so the check is the only call that can replace a connection gone
/// silent. The next check connects anew and the process is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_check_timed_out_on_a_silent_connection_the_next_one_connects_anew() {
    let server = RedisServer::start();
    let silencer = Silencer::start(server.addr(), false).await;
    // Deadlines a stall of a busy machine does not reach for the checks that must pass.
    let (_dir, path) = setup(silencer.addr(), "3s", "10s");
    let connection = proxy_connection(&path);
    assert!(connection.ping().await);
    assert_eq!(silencer.connections(), 1);
    silencer.silence();
    assert!(connection.readiness().await.unwrap_err().is_timeout());
    assert_eq!(connection.readiness().await, Ok(()));
    assert_eq!(silencer.connections(), 2, "one new connection");
}

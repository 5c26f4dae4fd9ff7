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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::proxy::config::{ProxyConfig, StoreKind};
use countersign::proxy::session_redis::redis_connection;
use countersign::replay::RedisConnection;
use support_cli::{run_countersign, Checked};
use support_redis::{RedisServer, TestDir};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const KEYS: &str = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\"\n";
const USERS: &str = "[[users]]\nname = \"alice\"\npassword = \"$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNo\"\nroles = []\n";

/// A config directory whose `[session]` is a Redis store at `redis_addr` with these
/// `redis_timeout` and `redis_connect_timeout`.
fn setup(redis_addr: SocketAddr, timeout: &str, connect_timeout: &str) -> (TestDir, PathBuf) {
    let dir = TestDir::new("readiness-timeout");
    std::fs::write(dir.join("keys.toml"), KEYS).unwrap();
    std::fs::write(dir.join("users.toml"), USERS).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"http://app.test\"\n\n\
             [session]\nstore = \"redis\"\nredis_url = \"redis://{redis_addr}/0\"\n\
             redis_timeout = \"{timeout}\"\nredis_connect_timeout = \"{connect_timeout}\"\n\n\
             [auth]\nusers_file = \"users.toml\"\n\n[signing]\nkeyring = \"keys.toml\"\n\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n"
        ),
    )
    .unwrap();
    (dir, path)
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
    addr: SocketAddr,
    silent: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

/// A `PING` as the client sends it (RESP).
const PING_COMMAND: &[u8] = b"*1\r\n$4\r\nPING\r\n";

impl Silencer {
    async fn start(target: SocketAddr, after_ping: bool) -> Silencer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (quiet, count) = (silent.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(client, target, quiet.clone(), after_ping));
            }
        });
        Silencer {
            addr,
            silent,
            accepted,
        }
    }

    /// Every connection open so far goes silent for good; later ones forward as usual.
    fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn forward(client: TcpStream, target: SocketAddr, silent: Arc<AtomicBool>, after_ping: bool) {
    // Only connections accepted before `silence` are silenced by it.
    let before_silence = !silent.load(Ordering::SeqCst);
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut pinged = false;
    let up = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if (before_silence && silent.load(Ordering::SeqCst)) || (after_ping && pinged) {
                continue;
            }
            pinged = pinged || chunk.windows(PING_COMMAND.len()).any(|w| w == PING_COMMAND);
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

/// A Redis that answers in about 600 ms (`CLIENT PAUSE 600 ALL`), within `redis_timeout =
/// "2s"`: ready. (The check used to give up after 250 ms, whatever `redis_timeout` said.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_250ms_but_within_redis_timeout_is_ready() {
    let server = RedisServer::start();
    let (_dir, path) = setup(server.addr(), "2s", "2s");
    let connection = proxy_connection(&path);
    // Connected and checked before the pause.
    assert!(connection.ping().await, "ready before the pause");

    assert_eq!(server.cli(&["CLIENT", "PAUSE", "600", "ALL"]).trim(), "OK");
    let started = Instant::now();
    let ready = connection.ping().await;
    let took = started.elapsed();
    assert!(
        ready,
        "not ready with a pause of 600 ms (gave up after {took:?})"
    );
    assert!(
        took >= Duration::from_millis(400),
        "the check waited for the paused server: {took:?}"
    );
    // And the connection was kept: the next check is answered on it at once.
    let started = Instant::now();
    assert!(connection.ping().await);
    assert!(started.elapsed() < Duration::from_millis(400));
    // The check's deadline is `redis_timeout`.
    assert_eq!(connection.options().ping_timeout, Duration::from_secs(2));
}

/// A readiness check on a connection gone silent says it timed out after `redis_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_check_without_answer_says_it_timed_out_after_redis_timeout() {
    let server = RedisServer::start();
    let silencer = Silencer::start(server.addr(), false).await;
    let (_dir, path) = setup(silencer.addr, "700ms", "2s");
    let connection = proxy_connection(&path);
    assert_eq!(connection.readiness().await, Ok(()));
    silencer.silence();
    let started = Instant::now();
    let error = connection.readiness().await.unwrap_err();
    let took = started.elapsed();
    assert!(error.is_timeout(), "{error}");
    assert!(
        error.to_string().contains("timed out after 700 ms"),
        "{error}"
    );
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(2),
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
    let (_dir, path) = setup(after_ping.addr, "700ms", "2s");
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
    assert!(line.contains("timed out after 700 ms"), "{line}");
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
    let (_dir, path) = setup(silencer.addr, "500ms", "2s");
    let connection = proxy_connection(&path);
    assert!(connection.ping().await);
    assert_eq!(silencer.connections(), 1);
    silencer.silence();
    assert!(connection.readiness().await.unwrap_err().is_timeout());
    assert_eq!(connection.readiness().await, Ok(()));
    assert_eq!(silencer.connections(), 2, "one new connection");
}

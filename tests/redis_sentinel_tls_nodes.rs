//! TLS to the Redis Sentinels themselves (`SentinelOptions::sentinel_tls`, the proxy's
//! `session.redis_sentinel_tls = true`), on real processes: a primary listening with TLS and a
//! sentinel that listens with TLS only (`port 0`, `tls-port`), both with certificates from a
//! test CA made here. Without TLS to the sentinels, their answer (which server is the primary)
//! and their password would cross the network in clear, and a network attacker could name a
//! primary of their choice.
//!
//! Proved here: a TLS sentinel and a TLS primary work end to end (a nonce recorded through the
//! library; a session through the proxy's config, with the sentinel's password sent over TLS;
//! `check-config --online` shows the sentinel as `rediss://`); a client without TLS to the
//! sentinels fails at once with an error that says so (not a hang); a sentinel certificate
//! from another CA is refused with an error saying it is the sentinel's certificate (and
//! nothing is written); the config keys are checked (`tests/redis_config.rs` has the offline
//! cases of the key itself).
//! Run: `cargo test --all-features --test redis_sentinel_tls_nodes`.
#![cfg(feature = "redis")]

mod support_redis;

use std::time::{Duration, Instant};

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, SentinelOptions,
};
use support_redis::{
    assert_fresh_then_replayed, redis_test_options, RedisServer, SentinelServer, TlsFiles,
    SENTINEL_MASTER,
};

const NOW: u64 = 1_000_000;
const PREFIX: &str = "stlsn:";
/// The connect deadline of [`options`]: long, so that a call failing "at once" (in under half
/// of it) is told from one that waited for it on a busy machine too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection through `sentinel` with `node`'s TLS settings, trusting the test CA of
/// `files` (for the sentinel and the primary alike).
fn through_sentinel(
    sentinel: &SentinelServer,
    node: &SentinelOptions,
    files: &TlsFiles,
) -> RedisConnection {
    RedisConnection::sentinel_with_tls_root_cert(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        node,
        options(),
        files.ca_pem.as_bytes(),
    )
    .unwrap()
}

/// [`CONNECT_TIMEOUT`], and 5 s for a call and a readiness check (beyond any stall of a loaded
/// machine: the calls that must succeed do).
fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_secs(5),
        ping_timeout: Duration::from_secs(5),
        ..redis_test_options(CONNECT_TIMEOUT)
    }
}

/// TLS to the primary and to the sentinels.
fn tls_everywhere() -> SentinelOptions {
    SentinelOptions {
        tls: true,
        sentinel_tls: true,
        ..SentinelOptions::default()
    }
}

/// A TLS primary (certificate for 127.0.0.1 from a fresh CA) and a TLS-only sentinel monitoring
/// its TLS port, presenting `own`'s certificate (None: one from the primary's CA), with
/// `password` as its `requirepass`.
fn tls_primary_and_tls_sentinel(
    own: Option<TlsFiles>,
    password: Option<&str>,
) -> (RedisServer, u16, TlsFiles, SentinelServer) {
    let (primary, tls_port, files) = RedisServer::start_tls_files(&["127.0.0.1"]);
    let tls_addr = std::net::SocketAddr::from(([127, 0, 0, 1], tls_port));
    let sentinel = SentinelServer::start_tls_only(tls_addr, &files, own, password);
    support_redis::wait_until(
        "the TLS sentinel to see the TLS primary up",
        Duration::from_secs(10),
        || {
            let masters = sentinel.cli(&["SENTINEL", "MASTERS"]);
            masters.contains(&tls_port.to_string())
                && masters.lines().any(|l| l == "master")
                && !masters.contains("s_down")
        },
    );
    (primary, tls_port, files, sentinel)
}

/// The sentinel listens with TLS only: nothing answers plain TCP on its port.
fn assert_tls_only(sentinel: &SentinelServer) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(sentinel.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert!(
        !reply.starts_with(b"+PONG"),
        "the sentinel answered plain TCP: {reply:?}"
    );
}

/// A TLS-only sentinel and a TLS primary, both trusted through the one private CA: the lookup
/// and the connection go over TLS, nonces are recorded on the primary and replays refused, and
/// the endpoint shows the sentinel as `rediss://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sentinel_names_the_tls_primary_end_to_end() {
    let (primary, tls_port, files, sentinel) = tls_primary_and_tls_sentinel(None, None);
    assert_tls_only(&sentinel);
    assert_eq!(sentinel.primary_port(), Some(tls_port));
    let connection = through_sentinel(&sentinel, &tls_everywhere(), &files);
    assert!(
        connection
            .endpoint()
            .starts_with(&format!("rediss+sentinel://rediss://{}/", sentinel.addr())),
        "{}",
        connection.endpoint()
    );
    let cache = RedisReplayCache::new(connection, PREFIX);
    assert!(cache.ready().await, "ready through the TLS sentinel");
    assert_fresh_then_replayed(&cache, "n1", NOW + 60, NOW).await;
    assert_eq!(primary.cli(&["EXISTS", "stlsn:n1"]), "1");
}

/// Without TLS to the sentinels, a TLS-only sentinel cannot be asked: the call fails well
/// before the connect deadline (no hang), and the error names the sentinel and says TLS is the
/// likely cause. Nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_against_a_tls_only_sentinel_fails_clearly() {
    let (primary, _tls_port, files, sentinel) = tls_primary_and_tls_sentinel(None, None);
    let plain_sentinels = SentinelOptions {
        tls: true,
        ..SentinelOptions::default()
    };
    let connection = through_sentinel(&sentinel, &plain_sentinels, &files);
    assert!(
        !connection.endpoint().contains("rediss://"),
        "{}",
        connection.endpoint()
    );
    let cache = RedisReplayCache::new(connection, PREFIX);
    let started = Instant::now();
    let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
        panic!("a TLS-only sentinel answered plain TCP");
    };
    let took = started.elapsed();
    let detail = error.detail();
    assert!(
        took < CONNECT_TIMEOUT / 2,
        "took {took:?} (a hang until the deadline?): {detail}"
    );
    assert!(detail.contains("sentinel lookup"), "{detail}");
    assert!(
        detail.contains(&sentinel.addr().to_string()),
        "names the sentinel: {detail}"
    );
    assert!(
        detail.contains("TLS-only port reached without TLS"),
        "says TLS is the likely cause: {detail}"
    );
    assert!(!cache.ready().await);
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
}

/// The reverse mistake: TLS to a sentinel that listens without it. The handshake gets a Redis
/// error or no answer: either way the call fails (within the connect deadline) and the error
/// names the sentinel as `rediss://` and speaks of TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_sentinel_fails_naming_tls() {
    let primary = RedisServer::start();
    let sentinel = SentinelServer::start(primary.addr());
    // The handshake may get no answer: the call then takes this deadline, and 3 times it leaves
    // room for a busy machine (a hang does not end).
    let deadline = Duration::from_secs(2);
    let connection = RedisConnection::sentinel(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        &SentinelOptions {
            sentinel_tls: true,
            ..SentinelOptions::default()
        },
        redis_test_options(deadline),
    )
    .unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    let started = Instant::now();
    let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
        panic!("a plain sentinel answered a TLS client");
    };
    assert!(started.elapsed() < deadline * 3, "{:?}", started.elapsed());
    let detail = error.detail();
    assert!(
        detail.contains(&format!("rediss://{}", sentinel.addr())),
        "{detail}"
    );
    assert!(detail.contains("with TLS"), "{detail}");
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
}

/// A sentinel whose certificate another CA issued is refused, with the primary's CA and with
/// the public web roots alike: the error says it is the sentinel's certificate (not the
/// primary's), names the sentinel, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_certificate_from_another_ca_is_refused() {
    let other_ca = TlsFiles::issue(&["127.0.0.1"]);
    let (primary, _tls_port, files, sentinel) = tls_primary_and_tls_sentinel(Some(other_ca), None);
    let with_the_primarys_ca = through_sentinel(&sentinel, &tls_everywhere(), &files);
    let with_web_roots = RedisConnection::sentinel(
        &[sentinel.addr().to_string()],
        SENTINEL_MASTER,
        &tls_everywhere(),
        options(),
    )
    .unwrap();
    for connection in [with_the_primarys_ca, with_web_roots] {
        let cache = RedisReplayCache::new(connection, PREFIX);
        let Err(error) = cache.check_and_record("n1", NOW + 60, NOW).await else {
            panic!("a sentinel certificate from another CA was trusted");
        };
        let detail = error.detail();
        assert!(
            detail.contains(&format!("rediss://{}", sentinel.addr())),
            "names the sentinel: {detail}"
        );
        assert!(
            detail.contains("the sentinel's TLS certificate was refused"),
            "says it is the sentinel's certificate: {detail}"
        );
        assert!(detail.contains("UnknownIssuer"), "{detail}");
        assert!(
            !detail.contains("primary it names"),
            "not the primary's fault: {detail}"
        );
        assert!(!cache.ready().await);
    }
    assert_eq!(primary.cli(&["DBSIZE"]), "0");
}

/// The library refuses a `redis://` sentinel URL with TLS to the sentinels on, and takes a
/// root certificate for TLS to the sentinels alone (a plain primary).
#[test]
fn the_library_checks_sentinel_tls_up_front() {
    let files = TlsFiles::issue(&["127.0.0.1"]);
    let Err(error) = RedisConnection::sentinel(
        &["127.0.0.1:26379", "redis://10.0.0.2:26379"],
        SENTINEL_MASTER,
        &tls_everywhere(),
        options(),
    ) else {
        panic!("a redis:// sentinel URL was accepted with sentinel_tls");
    };
    let text = error.to_string();
    assert!(text.contains("sentinel 2 (of 2)"), "{text}");
    assert!(text.contains("write rediss://"), "{text}");
    let sentinels_only = SentinelOptions {
        sentinel_tls: true,
        ..SentinelOptions::default()
    };
    let connection = RedisConnection::sentinel_with_tls_root_cert(
        &["127.0.0.1:26379"],
        SENTINEL_MASTER,
        &sentinels_only,
        options(),
        files.ca_pem.as_bytes(),
    )
    .unwrap();
    assert!(
        connection
            .endpoint()
            .starts_with("redis+sentinel://rediss://127.0.0.1:26379/"),
        "{}",
        connection.endpoint()
    );
    assert!(format!("{sentinels_only:?}").contains("sentinel_tls: true"));
}

#[cfg(feature = "proxy")]
mod proxy {
    use super::*;
    use countersign::proxy::config::{ProxyConfig, StoreKind};
    use countersign::proxy::session::{SessionStore, SessionTimeouts};
    use countersign::proxy::session_redis::{redis_connection, RedisSessionStore};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    const BIN: &str = env!("CARGO_BIN_EXE_countersign");
    const SENTINEL_PASSWORD: &str = "Sent-Pw-4kq9Xz";

    /// A directory with keys, users, the CA and a proxy.toml whose `[session]` is `session`.
    struct Setup {
        _dir: crate::support_redis::TestDir,
        path: PathBuf,
    }

    fn setup(name: &str, session: &str, ca_pem: &str) -> Setup {
        let (dir, path) = crate::support_redis::redis_proxy_config(
            &format!("stlsn-{name}"),
            "127.0.0.1:0",
            "",
            session,
            "required_for_ready = false",
        );
        std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
        Setup { _dir: dir, path }
    }

    fn check_config_online(path: &Path) -> Output {
        Command::new(BIN)
            .args([
                "check-config",
                "--online",
                "--config",
                path.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn session_keys(sentinel: &SentinelServer, extra: &str) -> String {
        format!(
            "redis_url = \"rediss:///0\"\nredis_sentinels = [\"{}\"]\n\
             redis_sentinel_master = \"{SENTINEL_MASTER}\"\n\
             redis_sentinel_password = \"{SENTINEL_PASSWORD}\"\n\
             redis_key_prefix = \"{PREFIX}\"\n{extra}",
            sentinel.addr()
        )
    }

    /// The proxy's config with `redis_sentinel_tls = true` and `redis_ca_file`: a session is
    /// created on the TLS primary the password-protected TLS sentinel names; the password is in
    /// no Debug output or check-config line; `check-config --online` passes and shows the
    /// sentinel as `rediss://`. Without the key, the same sentinel cannot be asked: `--online`
    /// fails (exit 1) with the hint, and no password shows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_reaches_a_tls_sentinel_with_redis_sentinel_tls() {
        let (primary, _tls_port, files, sentinel) =
            tls_primary_and_tls_sentinel(None, Some(SENTINEL_PASSWORD));
        let with_tls = setup(
            "on",
            &session_keys(
                &sentinel,
                "redis_sentinel_tls = true\nredis_ca_file = \"ca.pem\"",
            ),
            &files.ca_pem,
        );
        let config = ProxyConfig::load(&with_tls.path).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(SENTINEL_PASSWORD), "{shown}");
        let StoreKind::Redis { url, .. } = &config.session.store else {
            panic!("a redis store");
        };
        let connection = redis_connection(&config, url).unwrap();
        assert!(!format!("{connection:?}").contains(SENTINEL_PASSWORD));
        let timeouts = SessionTimeouts {
            idle: Duration::from_secs(1800),
            absolute: Duration::from_secs(43200),
        };
        let store = RedisSessionStore::new(connection, PREFIX, timeouts, 1000);
        assert!(store.ready().await, "ready through the TLS sentinel");
        let alice = countersign::Identity::new("alice", ["admin"]);
        let (id, _) = store.create(&alice, NOW).await.unwrap();
        assert!(store.get(&id, NOW + 1, false).await.unwrap().is_some());
        assert_ne!(primary.cli(&["DBSIZE"]), "0");

        let out = check_config_online(&with_tls.path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        let line = stdout
            .lines()
            .find(|l| l.contains("session.redis_sentinels"))
            .unwrap_or_else(|| panic!("no Redis line: {stdout}"));
        assert!(line.starts_with("ok "), "{line}");
        assert!(
            line.contains(&format!("rediss+sentinel://rediss://{}/", sentinel.addr())),
            "the sentinel shown with its scheme: {line}"
        );
        assert!(!stdout.contains(SENTINEL_PASSWORD) && !stderr.contains(SENTINEL_PASSWORD));

        // The same sentinel without `redis_sentinel_tls`: refused, saying why, at once.
        let without = setup(
            "off",
            &session_keys(&sentinel, "redis_ca_file = \"ca.pem\""),
            &files.ca_pem,
        );
        let started = Instant::now();
        let out = check_config_online(&without.path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let line = stdout
            .lines()
            .find(|l| l.contains("session.redis_sentinels"))
            .unwrap_or_else(|| panic!("no Redis line: {stdout}"));
        assert!(line.starts_with("FAIL "), "{line}");
        assert!(
            line.contains(&format!("rediss+sentinel://{}/", sentinel.addr())),
            "a plain sentinel shown without a scheme of its own: {line}"
        );
        assert!(line.contains("without TLS"), "{line}");
        assert!(!stdout.contains(SENTINEL_PASSWORD) && !stderr.contains(SENTINEL_PASSWORD));
    }

    /// A sentinel certificate from another CA than `redis_ca_file`'s: the store is not ready,
    /// the error says it is the sentinel's certificate, and nothing is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_refuses_a_sentinel_certificate_from_another_ca() {
        let (primary, _tls_port, files, sentinel) =
            tls_primary_and_tls_sentinel(Some(TlsFiles::issue(&["127.0.0.1"])), None);
        let session = format!(
            "redis_url = \"rediss:///0\"\nredis_sentinels = [\"{}\"]\n\
             redis_sentinel_master = \"{SENTINEL_MASTER}\"\nredis_sentinel_tls = true\n\
             redis_ca_file = \"ca.pem\"",
            sentinel.addr()
        );
        let setup = setup("other-ca", &session, &files.ca_pem);
        let config = ProxyConfig::load(&setup.path).unwrap();
        let StoreKind::Redis { url, .. } = &config.session.store else {
            panic!("a redis store");
        };
        let connection = redis_connection(&config, url).unwrap();
        let error = connection
            .query::<String>(&::redis::cmd("PING"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("the sentinel's TLS certificate was refused"),
            "{error}"
        );
        let store = RedisSessionStore::new(
            connection,
            PREFIX,
            SessionTimeouts {
                idle: Duration::from_secs(1800),
                absolute: Duration::from_secs(43200),
            },
            1000,
        );
        assert!(!store.ready().await);
        let alice = countersign::Identity::new("alice", ["admin"]);
        assert!(store.create(&alice, NOW).await.is_err());
        assert_eq!(primary.cli(&["DBSIZE"]), "0");
    }
}

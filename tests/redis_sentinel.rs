//! Redis Sentinel, on real processes: a primary, its replica and sentinels
//! (`redis-server <conf> --sentinel`). The replay cache and the session store reach the
//! primary the sentinels name; after `SENTINEL FAILOVER` the next calls reach the new primary
//! without a restart (nonces and sessions from before, replicated, live on); a sentinel that
//! is down (refusing or silent) does not delay the lookup while another answers; readiness is
//! false when no sentinel answers; the proxy's `[session] redis_sentinels` keys are checked
//! (key-naming errors) and used by `check-config`, `run` and the stores alike.
//! Run: `cargo test --all-features --test redis_sentinel`.
#![cfg(feature = "redis")]

#[cfg(feature = "proxy")]
mod support_cli;
mod support_redis;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome, SentinelOptions,
};
use support_redis::{
    primary_and_replica, refusing_addr, wait_until, RedisServer, SentinelServer, SENTINEL_MASTER,
};

const NOW: u64 = 1_000_000;
const PREFIX: &str = "sentinel:";

/// Deadlines beyond any stall of a loaded machine (which may not run a process for 2 s): a
/// call and a readiness check 5 s, (re)connecting, the sentinel lookup included, 5 s
/// ([`CONNECT_TIMEOUT`]).
fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_secs(5),
        connect_timeout: CONNECT_TIMEOUT,
        ping_timeout: Duration::from_secs(5),
    }
}

/// The connect deadline of [`options`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `SENTINEL FAILOVER` (retried until the sentinel knows a replica to promote), then waits
/// until every sentinel names `new_primary` and the old primary has been demoted by them
/// (which the sentinels do a few seconds after the promotion, killing its client connections).
fn fail_over(
    sentinels: &[&SentinelServer],
    old_primary: &RedisServer,
    new_primary: &RedisServer,
    cli_auth: &[&str],
) {
    wait_until(
        "SENTINEL FAILOVER to start",
        Duration::from_secs(20),
        || sentinels[0].cli(&["SENTINEL", "FAILOVER", SENTINEL_MASTER]) == "OK",
    );
    let new_port = new_primary.addr().port();
    for sentinel in sentinels {
        wait_until(
            "the sentinels to name the new primary",
            Duration::from_secs(30),
            || sentinel.primary_port() == Some(new_port),
        );
    }
    let role = [cli_auth, &["ROLE"]].concat();
    wait_until(
        "the sentinels to demote the old primary",
        Duration::from_secs(30),
        || old_primary.cli(&role).starts_with("slave"),
    );
}

/// A listener that accepts connections and never answers: a sentinel host that hangs.
fn silent_addr() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// The replay cache and the session store, on one connection through two sentinels: they
/// work, and after a forced failover the next calls reach the new primary without a restart;
/// what was written before (and replicated) is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cache_and_sessions_follow_a_sentinel_failover() {
    let (old_primary, new_primary) = primary_and_replica(&[]);
    let first = SentinelServer::start(old_primary.addr());
    let second = SentinelServer::start(old_primary.addr());
    let connection = RedisConnection::sentinel(
        &[first.addr().to_string(), second.addr().to_string()],
        SENTINEL_MASTER,
        &SentinelOptions::default(),
        options(),
    )
    .unwrap();
    assert!(connection.endpoint().contains("+sentinel://"));
    let cache = RedisReplayCache::new(connection.clone(), PREFIX);
    assert!(cache.ready().await, "ready through the sentinels");
    assert_eq!(
        cache.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(old_primary.cli(&["EXISTS", "sentinel:before"]), "1");
    #[cfg(feature = "proxy")]
    let sessions = sessions::Sessions::new(connection.clone()).await;
    wait_until("the writes to replicate", Duration::from_secs(10), || {
        new_primary.cli(&["DBSIZE"]) == old_primary.cli(&["DBSIZE"])
    });

    fail_over(&[&first, &second], &old_primary, &new_primary, &[]);

    // The old connection was killed by the demotion or is refused with READONLY: either way
    // the call is made once more on a new connection, to the primary the sentinels name now.
    assert_eq!(
        cache.check_and_record("after", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(new_primary.cli(&["EXISTS", "sentinel:after"]), "1");
    assert_eq!(
        cache.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed),
        "a nonce recorded before the failover is still refused after it"
    );
    assert_eq!(
        cache.check_and_record("after", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert!(cache.ready().await, "ready on the new primary");
    #[cfg(feature = "proxy")]
    sessions.still_there(&new_primary).await;
}

#[cfg(feature = "proxy")]
mod sessions {
    use super::*;
    use countersign::proxy::session::{SessionId, SessionStore, SessionTimeouts};
    use countersign::proxy::session_redis::RedisSessionStore;

    /// A session store with one session created before the failover.
    pub struct Sessions {
        store: RedisSessionStore,
        before: SessionId,
    }

    impl Sessions {
        pub async fn new(connection: RedisConnection) -> Sessions {
            let timeouts = SessionTimeouts {
                idle: Duration::from_secs(1800),
                absolute: Duration::from_secs(43200),
            };
            let store = RedisSessionStore::new(connection, PREFIX, timeouts, 1000);
            let alice = countersign::Identity::new("alice", ["admin"]);
            let (before, _) = store.create(&alice, NOW).await.unwrap();
            assert!(store.ready().await);
            Sessions { store, before }
        }

        pub async fn still_there(&self, new_primary: &RedisServer) {
            let bob = countersign::Identity::new("bob", ["user"]);
            let (after, _) = self.store.create(&bob, NOW + 1).await.unwrap();
            assert!(self
                .store
                .get(&after, NOW + 2, false)
                .await
                .unwrap()
                .is_some());
            let before = self.store.get(&self.before, NOW + 2, false).await.unwrap();
            assert_eq!(before.expect("the session from before").user, "alice");
            assert_eq!(self.store.count().await.unwrap(), 2);
            assert!(!new_primary
                .cli(&["KEYS", &format!("{PREFIX}session:*")])
                .is_empty());
        }
    }
}

/// Sentinels that are down cost nothing while one answers (they are asked at once); with none
/// answering, readiness is false and calls fail within the connect deadline, the error naming
/// every sentinel and what happened to it; a wrong master name is reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_are_down_or_wrong() {
    let (primary, _replica) = primary_and_replica(&[]);
    let mut sentinel = SentinelServer::start(primary.addr());
    let (_silent, silent) = silent_addr();
    let (_refusing, refusing) = refusing_addr();
    let connection = RedisConnection::sentinel(
        &[
            silent.to_string(),
            refusing.to_string(),
            sentinel.addr().to_string(),
        ],
        SENTINEL_MASTER,
        &SentinelOptions::default(),
        options(),
    )
    .unwrap();
    let cache = RedisReplayCache::new(connection.clone(), PREFIX);
    let started = Instant::now();
    assert!(cache.ready().await);
    // Waiting for the silent sentinel would take the 5 s connect deadline (and then fail);
    // under 3 s, with room for a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a silent sentinel does not delay the lookup: {:?}",
        started.elapsed()
    );

    // No sentinel answers: a new connection cannot be made (the primary is up, but nobody
    // says which server it is).
    sentinel.stop();
    let dead_sentinel = sentinel.addr();
    let connection = RedisConnection::sentinel(
        &[silent.to_string(), dead_sentinel.to_string()],
        SENTINEL_MASTER,
        &SentinelOptions::default(),
        options(),
    )
    .unwrap();
    let cache = RedisReplayCache::new(connection.clone(), PREFIX);
    assert!(!cache.ready().await, "not ready without a sentinel");
    let started = Instant::now();
    let error = cache
        .check_and_record("n", NOW + 60, NOW)
        .await
        .unwrap_err()
        .to_string();
    // The lookup gets no answer, so the call takes the whole connect deadline: 5 s, and 3 s of
    // slack for a busy machine; a second wait (another lookup, or the 5 s call deadline on
    // top) would make it 10 s.
    assert!(
        started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(3),
        "within connect_timeout: {:?}",
        started.elapsed()
    );
    assert!(error.contains("sentinel lookup"), "{error}");
    assert!(
        error.contains(&format!(
            "{silent}: no answer within {} ms",
            CONNECT_TIMEOUT.as_millis()
        )),
        "{error}"
    );
    assert!(error.contains(&format!("{dead_sentinel}: ")), "{error}");
    assert!(error.contains("refused"), "{error}");

    // A wrong master name: the sentinel answers, but knows no such primary.
    let other = SentinelServer::start(primary.addr());
    let wrong = RedisConnection::sentinel(
        &[other.addr().to_string()],
        "nosuchmaster",
        &SentinelOptions::default(),
        options(),
    )
    .unwrap();
    let error = RedisReplayCache::new(wrong, PREFIX)
        .check_and_record("n", NOW + 60, NOW)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no usable primary"), "{error}");
    assert!(error.contains("\"nosuchmaster\""), "{error}");
}

/// Addresses and names that cannot be used are refused when the connection is built.
#[test]
fn unusable_sentinel_settings_are_refused() {
    let node = SentinelOptions::default();
    let build = |sentinels: &[&str], name: &str| {
        RedisConnection::sentinel(sentinels, name, &node, options()).map(|_| ())
    };
    assert!(build(&[], SENTINEL_MASTER).is_err());
    assert!(build(&["127.0.0.1:26379"], "").is_err());
    assert!(build(&["127.0.0.1:26379"], "my master").is_err());
    for bad in [
        "",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "h:x",
        "[::1",
        "http://h",
    ] {
        let error = build(&["127.0.0.1:26379", bad], SENTINEL_MASTER).unwrap_err();
        assert!(
            error.to_string().contains("sentinel 2 (of 2)"),
            "{bad}: {error}"
        );
    }
    for good in [
        "10.0.0.1",
        "10.0.0.1:26379",
        "[::1]:26379",
        "redis://:pw@h:26379",
    ] {
        build(&[good], SENTINEL_MASTER).expect(good);
    }
    let secret = SentinelOptions {
        password: Some("S3cret".to_owned()),
        sentinel_password: Some("S3ntinel".to_owned()),
        db: 2,
        ..SentinelOptions::default()
    };
    let connection =
        RedisConnection::sentinel(&["redis://:UrlPw@h:1"], SENTINEL_MASTER, &secret, options())
            .unwrap();
    let shown = format!("{connection:?} {} {secret:?}", connection.endpoint());
    for password in ["S3cret", "S3ntinel", "UrlPw"] {
        assert!(!shown.contains(password), "{shown}");
    }
    assert!(connection.endpoint().ends_with("/mymaster/2"), "{shown}");
}

#[cfg(feature = "proxy")]
mod proxy {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    use countersign::proxy::config::{ProxyConfig, StoreKind};
    use countersign::proxy::session::{SessionStore, SessionTimeouts};
    use countersign::proxy::session_redis::{redis_connection, RedisSessionStore};

    use super::*;
    use crate::support_cli::check_config;
    use crate::support_redis::{redis_proxy_config, TestDir};

    const BIN: &str = env!("CARGO_BIN_EXE_countersign");
    fn setup(session: &str) -> (TestDir, PathBuf) {
        setup_listening("127.0.0.1:0", "", session)
    }

    /// [`setup`] with the proxy's `listen` address and extra top-level tables (`[admin]`).
    fn setup_listening(listen: &str, tables: &str, session: &str) -> (TestDir, PathBuf) {
        redis_proxy_config("sentinel-config", listen, tables, session, "")
    }

    /// Broken sentinel settings are refused by loading the config (so by `run` and
    /// `check-config`), naming the key, never quoting a password.
    #[test]
    fn broken_sentinel_configs_name_the_key() {
        let sentinels = "redis_sentinels = [\"127.0.0.1:26379\", \"127.0.0.1:26380\"]";
        let master = "redis_sentinel_master = \"mymaster\"";
        for (session, key, needle) in [
            (
                format!("redis_sentinels = []\n{master}"),
                "session.redis_sentinels",
                "at least one sentinel",
            ),
            (
                format!("redis_sentinels = [\"127.0.0.1:99999\"]\n{master}"),
                "session.redis_sentinels",
                "entry 1",
            ),
            (
                format!("redis_sentinels = [\"10.0.0.1:26379\", \"10.0.0.1:\"]\n{master}"),
                "session.redis_sentinels",
                "entry 2",
            ),
            (
                format!("redis_sentinels = [\"redis://:S3cret@h:26379\"]\n{master}"),
                "session.redis_sentinels",
                "not a URL",
            ),
            (
                format!("redis_sentinels = [\"h:1\", \"h:1\"]\n{master}"),
                "session.redis_sentinels",
                "twice",
            ),
            (
                "redis_sentinels = \"127.0.0.1:26379\"".to_owned(),
                "session.redis_sentinels",
                "",
            ),
            (
                sentinels.to_owned(),
                "session.redis_sentinel_master",
                "required with session.redis_sentinels",
            ),
            (
                format!("{sentinels}\nredis_sentinel_master = \"\""),
                "session.redis_sentinel_master",
                "not a master name",
            ),
            (
                master.to_owned(),
                "session.redis_sentinels",
                "required with session.redis_sentinel_master",
            ),
            (
                "redis_url = \"redis://127.0.0.1:6379\"\nredis_sentinel_password = \"S3cret\""
                    .to_owned(),
                "session.redis_sentinel_password",
                "only used with session.redis_sentinels",
            ),
            (
                format!("{sentinels}\n{master}\nredis_url = \"redis://:S3cret@10.0.0.9:6379/0\""),
                "session.redis_url",
                "names a host",
            ),
            (
                "redis_timeout = \"1s\"".to_owned(),
                "session.redis_url",
                "required when store = \"redis\"",
            ),
            (
                format!(
                    "{sentinels}\n{master}\nredis_url = \"redis://:S3cret@/0\"\n\
                     redis_ca_file = \"ca.pem\""
                ),
                "session.redis_ca_file",
                "needs a rediss://",
            ),
        ] {
            let (_dir, path) = setup(&session);
            let error = ProxyConfig::load(&path).expect_err(&session);
            let text = error.to_string();
            assert!(text.contains(&format!(": {key}: ")), "{session}: {text}");
            assert!(text.contains(needle), "{session}: {text}");
            assert!(!text.contains("S3cret"), "{session}: {text}");
            // check-config says the same, and fails.
            let out = check_config(&path);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{session}");
            assert!(
                stderr.contains(&format!(": {key}: ")),
                "{session}: {stderr}"
            );
            assert!(!stderr.contains("S3cret"), "{session}: {stderr}");
        }
        // In memory mode, the sentinel keys are refused too.
        let (_dir, path) = setup(&format!("{sentinels}\n{master}"));
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("store = \"redis\"", "store = \"memory\"");
        std::fs::write(&path, text).unwrap();
        let error = ProxyConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("only used with store = \"redis\""),
            "{error}"
        );
        // A URL without a host and no sentinels: check-config names the URL.
        let (_dir, path) = setup("redis_url = \"redis://:S3cret@/0\"");
        let out = check_config(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(": session.redis_url: "), "{stderr}");
        assert!(!stderr.contains("S3cret"), "{stderr}");
    }

    /// `check-config` accepts the sentinel forms (it does not connect).
    #[test]
    fn check_config_accepts_sentinel_configs() {
        for session in [
            "redis_sentinels = [\"10.0.0.1:26379\", \"10.0.0.2\", \"[fd00::3]:26379\"]\n\
             redis_sentinel_master = \"mymaster\"",
            "redis_url = \"redis://:pw@/2\"\nredis_sentinels = [\"10.0.0.1:26379\"]\n\
             redis_sentinel_master = \"mymaster\"\nredis_sentinel_password = \"spw\"",
            "redis_url = \"rediss://app:pw@\"\nredis_sentinels = [\"sentinel.internal:26379\"]\n\
             redis_sentinel_master = \"cache-1\"",
            "redis_url = \"redis:///3\"\nredis_sentinels = [\"10.0.0.1:26379\"]\n\
             redis_sentinel_master = \"mymaster\"",
        ] {
            let (_dir, path) = setup(session);
            let out = check_config(&path);
            assert!(
                out.status.success(),
                "{session}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A primary and replica with passwords, sentinels with their own: the config's URL gives
    /// the primary's password and database, `redis_sentinel_password` the sentinels'; the
    /// stores built from the config (as `run` builds them) work, and the binary starts from it
    /// and reads the session count from Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_config_reaches_the_primary_through_password_protected_sentinels() {
        let auth = ["--requirepass", "DataPw", "--masterauth", "DataPw"];
        let (primary, _replica) = primary_and_replica(&auth);
        let sentinel = SentinelServer::start_with(
            primary.addr(),
            &["sentinel auth-pass mymaster DataPw"],
            Some("SentPw"),
        );
        let session = format!(
            "redis_url = \"redis://:DataPw@/3\"\nredis_sentinels = [\"{}\"]\n\
             redis_sentinel_master = \"mymaster\"\nredis_sentinel_password = \"SentPw\"\n\
             redis_key_prefix = \"{PREFIX}\"",
            sentinel.addr()
        );
        let (dir, path) = setup(&session);
        let config = ProxyConfig::load(&path).unwrap();
        assert!(!format!("{config:?}").contains("SentPw"));
        let StoreKind::Redis { url, .. } = &config.session.store else {
            panic!("a redis store");
        };
        let connection = redis_connection(&config, url).unwrap();
        let timeouts = SessionTimeouts {
            idle: Duration::from_secs(1800),
            absolute: Duration::from_secs(43200),
        };
        let store = RedisSessionStore::new(connection, PREFIX, timeouts, 1000);
        assert!(store.ready().await);
        let alice = countersign::Identity::new("alice", ["admin"]);
        let (id, _) = store.create(&alice, NOW).await.unwrap();
        assert!(store.get(&id, NOW + 1, false).await.unwrap().is_some());
        let keys = primary.cli(&[
            "-a",
            "DataPw",
            "--no-auth-warning",
            "-n",
            "3",
            "KEYS",
            &format!("{PREFIX}session:*"),
        ]);
        assert!(
            !keys.is_empty(),
            "the session is in database 3 of the primary"
        );

        // The wrong sentinel password: not ready, the error says why.
        let wrong = session.replace("SentPw", "Nope");
        std::fs::write(
            &path,
            std::fs::read_to_string(&path)
                .unwrap()
                .replace(&session, &wrong),
        )
        .unwrap();
        let config = ProxyConfig::load(&path).unwrap();
        let connection = redis_connection(&config, url).unwrap();
        let error = connection
            .query::<String>(&::redis::cmd("PING"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("sentinel lookup"), "{error}");
        assert!(
            !error.contains("Nope") && !error.contains("DataPw"),
            "{error}"
        );
        drop(dir);

        // The binary: `run` starts from a sentinel config and counts sessions in Redis. Its
        // ports are picked free and then released, so another process may take one first:
        // that start (and only that) is tried again on fresh ports.
        let mut attempts = 0;
        let metrics = loop {
            attempts += 1;
            let (listen, admin) = {
                let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                (a.local_addr().unwrap(), b.local_addr().unwrap())
            };
            let (dir, path) = setup_listening(
                &listen.to_string(),
                &format!("[admin]\nlisten = \"{admin}\"\n"),
                &session,
            );
            let log_path = dir.join("run.log");
            let mut child = Command::new(BIN)
                .args(["run", "--config", path.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap();
            let scraped = scrape_metrics(admin, &mut child);
            let _ = child.kill();
            let _ = child.wait();
            match scraped {
                Ok(metrics) => break metrics,
                Err(status) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    assert!(
                        log.contains("Address already in use") && attempts < 3,
                        "the proxy {status}: {log}"
                    );
                }
            }
        };
        assert!(
            metrics.contains("countersign_active_sessions 1"),
            "the session count comes from Redis through the sentinel: {metrics}"
        );
    }

    /// GET /metrics on the admin listener, retried until the proxy is up (at most 30 s); how
    /// it ended (exited, or never answered) otherwise.
    fn scrape_metrics(
        admin: SocketAddr,
        child: &mut std::process::Child,
    ) -> Result<String, String> {
        use std::io::{Read as _, Write as _};
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited: {status}"));
            }
            if let Ok(mut stream) = std::net::TcpStream::connect(admin) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let request =
                    format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
                let mut reply = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut reply).is_ok()
                    && reply.contains("countersign_active_sessions")
                {
                    return Ok(reply);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("served no /metrics within 30 s".to_string())
    }
}

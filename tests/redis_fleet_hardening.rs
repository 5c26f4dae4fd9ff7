//! A fleet on one Redis, each test from a defect a QA pass found on a real `redis-server`
//! started by the test: the replay cache and the session store recover from a failover behind
//! a stable address; the per-user session index drops ended sessions; a session in constant use
//! outlives its idle timeout with the default touch interval; wrong passwords sent at once to
//! two proxies are checked only up to the per-user limit.
//! Run: `cargo test --all-features --test redis_fleet_hardening`.
#![cfg(feature = "proxy")]

mod support_redis;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::proxy::session::{SessionStore, SessionTimeouts};
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
};
use countersign::Identity;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use support_redis::RedisServer;
use tokio::net::{TcpListener, TcpStream};

const NOW: u64 = 1_000_000;

fn fast_options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(1000),
        ping_timeout: Duration::from_millis(300),
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP forwarder whose target can be switched: what a DNS name or TCP proxy "that follows
// failover" (docs/DEPLOYMENT.md) does. Connections made before the switch stay on the old
// server, as they do behind a DNS name or an L4 proxy.
// ---------------------------------------------------------------------------------------------

struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let current = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *current.lock();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Forwarder { addr, target, task }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// New connections go to `target` from now on.
    fn switch_to(&self, target: SocketAddr) {
        *self.target.lock() = target;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Promotes `new_primary` and demotes `old_primary` to its replica, as a failover does, and
/// waits until the old one refuses writes.
fn fail_over(old_primary: &RedisServer, new_primary: &RedisServer) {
    new_primary.cli(&["REPLICAOF", "NO", "ONE"]);
    let port = new_primary.addr().port().to_string();
    old_primary.cli(&["REPLICAOF", "127.0.0.1", &port]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = old_primary.cli(&["SET", "qa:probe", "1"]);
        if reply.contains("READONLY") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "old primary still accepts writes: {reply}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failover behind a stable address (the old primary demoted to a replica, new
/// connections reaching the new primary), the replay cache resumes by itself, like after any
/// other Redis outage ("Redis comes back | service resumes on the next request, no restart"):
/// a `READONLY` answer drops the live connection and the next one records the nonce on the new
/// primary. Before the fix, `READONLY` was never treated as a dead connection, so the live
/// connection stayed on the demoted server and every signed request was a 503 for good, while
/// the readiness `PING` (which a replica answers) said ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cache_recovers_after_a_failover_behind_a_stable_address() {
    let old_primary = RedisServer::start();
    let new_primary = RedisServer::start();
    let forwarder = Forwarder::start(old_primary.addr()).await;
    let connection = RedisConnection::with_options(&forwarder.url(), fast_options()).unwrap();
    let cache = RedisReplayCache::new(connection, "qa:nonce:");
    assert_eq!(
        cache
            .check_and_record("before-failover", NOW + 15, NOW)
            .await
            .unwrap(),
        ReplayOutcome::Fresh
    );

    fail_over(&old_primary, &new_primary);
    forwarder.switch_to(new_primary.addr());
    // The address already leads to a writable primary: a process connecting now records
    // nonces. The running one's live connection still leads to the demoted server.
    let fresh = RedisReplayCache::new(
        RedisConnection::with_options(&forwarder.url(), fast_options()).unwrap(),
        "qa:nonce:",
    );
    assert_eq!(
        fresh
            .check_and_record("fresh-process", NOW + 15, NOW)
            .await
            .unwrap(),
        ReplayOutcome::Fresh
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last;
    let mut ready_while_failing = false;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let nonce = format!("after-failover-{attempt}");
        match cache.check_and_record(&nonce, NOW + 15, NOW).await {
            Ok(ReplayOutcome::Fresh) => break,
            other => {
                last = format!("{other:?}");
                if cache.ready().await {
                    ready_while_failing = true;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no nonce could be recorded for 10 s after the failover ({attempt} attempts; last: \
             {last}; readiness said ready meanwhile: {ready_while_failing})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        new_primary.cli(&["EXISTS", &format!("qa:nonce:after-failover-{attempt}")]),
        "1",
        "the nonce must be on the new primary"
    );
}

/// The same failover seen by the proxy's session store (it shares the connection code): logins
/// (session writes) succeed again shortly after the failover. Before the fix, they kept failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_store_recovers_after_a_failover_behind_a_stable_address() {
    let old_primary = RedisServer::start();
    let new_primary = RedisServer::start();
    let forwarder = Forwarder::start(old_primary.addr()).await;
    let connection = RedisConnection::with_options(&forwarder.url(), fast_options()).unwrap();
    let store = RedisSessionStore::new(connection, "qa:", timeouts(), 1000);
    let alice = Identity::new("alice", ["admin"]);
    store.create(&alice, NOW).await.unwrap();

    fail_over(&old_primary, &new_primary);
    forwarder.switch_to(new_primary.addr());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.create(&alice, NOW).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "logins still fail 10 s after the failover: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Session store: the per-user index
// ---------------------------------------------------------------------------------------------

fn timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: Duration::from_secs(30 * 60),
        absolute: Duration::from_secs(12 * 3600),
    }
}

fn user_index_key(prefix: &str, user: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(user.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}user:{hex}")
}

/// docs/DEPLOYMENT.md: `P user:<hex SHA-256(user)>` is a set of "hashes of the user's sessions
/// (for logout-all and admin revoke)". Ended sessions are pruned from it, so after 50
/// login/logout pairs and one live login it holds at most 2 members. Before the fix, ended
/// sessions were never removed and every login pushed its TTL out, so for a user who logs in
/// at least once per absolute timeout it grew by one member per login, for ever, and revoke
/// (a Lua script looping over every member) blocked Redis in proportion.
#[tokio::test]
async fn the_user_index_does_not_keep_ended_sessions() {
    let server = RedisServer::start();
    let store = RedisSessionStore::new(
        RedisConnection::with_options(&server.url(), fast_options()).unwrap(),
        "qa:",
        timeouts(),
        1000,
    );
    let alice = Identity::new("alice", ["admin"]);
    // 50 logins, each followed by a logout (or by its idle expiry: the same for the index).
    for i in 0..50 {
        let (id, _) = store.create(&alice, NOW + i * 60).await.unwrap();
        store.delete(&id).await.unwrap();
    }
    // One live session.
    let (_live, _) = store.create(&alice, NOW + 50 * 60).await.unwrap();
    let key = user_index_key("qa:", "alice");
    let members: usize = server.cli(&["SCARD", &key]).parse().unwrap();
    let ttl: i64 = server.cli(&["TTL", &key]).parse().unwrap();
    assert!(
        members <= 2,
        "{key} holds {members} session hashes for 1 live session (TTL {ttl} s, renewed by \
         every login)"
    );
}

/// docs/CONFIG.md: `idle_timeout` = "A session not used for this long ends", and
/// `redis_touch_interval` (default 5s) = "A session's idle expiry is rewritten in Redis at most
/// this often". With `idle_timeout = "5s"` and the default touch interval, a session used
/// every second stays alive in the Redis store as it does in the memory store (the two stores
/// "cannot drift apart", tests/redis_session_suite.rs). Before the fix, the Redis store never
/// rewrote the idle expiry before it passed, so such a session ended `idle_timeout` after login.
#[tokio::test]
async fn a_session_in_constant_use_outlives_its_idle_timeout_with_the_default_touch_interval() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(5);
    let timeouts = SessionTimeouts {
        idle,
        absolute: Duration::from_secs(3600),
    };
    // The store as `stores_from_config` builds it for `idle_timeout = "5s"` and no
    // `redis_touch_interval` (the default, 5s).
    let store = RedisSessionStore::new(
        RedisConnection::with_options(&server.url(), fast_options()).unwrap(),
        "qa:",
        timeouts,
        1000,
    )
    .touch_interval(countersign::proxy::session_redis::DEFAULT_TOUCH_INTERVAL);
    let memory = countersign::proxy::session::MemorySessionStore::new(timeouts, 1000);
    let alice = Identity::new("alice", ["admin"]);
    let (redis_id, _) = store.create(&alice, NOW).await.unwrap();
    let (memory_id, _) = memory.create(&alice, NOW).await.unwrap();
    // Used once a second for 8 s: never idle for more than a second.
    for t in 1..=8 {
        let in_memory = memory.get(&memory_id, NOW + t, true).await.unwrap();
        assert!(in_memory.is_some(), "memory store: ended at +{t}s");
        let in_redis = store.get(&redis_id, NOW + t, true).await.unwrap();
        assert!(
            in_redis.is_some(),
            "redis store: a session used every second ended at +{t}s (idle_timeout 5s, \
             redis_touch_interval 5s); the memory store still has it"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies (separate `countersign run` processes) on one Redis
// ---------------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_countersign");
const ORIGIN: &str = "http://app.test";
const SECRET_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "countersign-qa-fleet-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn two_free_ports() -> (u16, u16) {
    let first = StdListener::bind("127.0.0.1:0").unwrap();
    let second = StdListener::bind("127.0.0.1:0").unwrap();
    (
        first.local_addr().unwrap().port(),
        second.local_addr().unwrap().port(),
    )
}

/// An argon2id hash with small parameters (real ones take about a second unoptimized).
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

struct FleetFiles {
    dir: PathBuf,
}

impl FleetFiles {
    fn new() -> FleetFiles {
        let dir = temp_dir();
        std::fs::write(
            dir.join("keys.toml"),
            format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B64}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("users.toml"),
            format!(
                "[[users]]\nname = \"alice\"\npassword = \"{}\"\nroles = [\"admin\"]\n",
                cheap_hash("alice-password"),
            ),
        )
        .unwrap();
        FleetFiles { dir }
    }

    /// A proxy config with Redis sessions and throttle; `extra` is appended to `[session]`.
    fn proxy_config(&self, name: &str, redis_url: &str, throttle: &str) -> PathBuf {
        let (port, admin_port) = two_free_ports();
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
public_origin = "{ORIGIN}"
shutdown_grace = "1s"

[admin]
listen = "127.0.0.1:{admin_port}"

[session]
store = "redis"
redis_url = "{redis_url}"
redis_key_prefix = "qa:"

[auth]
users_file = "users.toml"

[auth.throttle]
{throttle}

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://127.0.0.1:9"
"#
            ),
        )
        .unwrap();
        path
    }
}

impl Drop for FleetFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct ProxyProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ProxyProcess {
    async fn start(config: &PathBuf) -> ProxyProcess {
        let text = std::fs::read_to_string(config).unwrap();
        let port_of = |key: &str| -> u16 {
            let start = text.find(key).unwrap() + key.len();
            let rest = &text[start..];
            let colon = rest.find(':').unwrap();
            let end = rest.find('"').unwrap();
            rest[colon + 1..end].parse().unwrap()
        };
        let port = port_of("\nlisten = \"");
        let admin_port = port_of("[admin]\nlisten = \"");
        let log = config.with_extension("log");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(config.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let mut process = ProxyProcess { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("proxy exited ({status}): {}", process.logs());
            }
            let url = format!("http://127.0.0.1:{admin_port}/healthz");
            if let Ok((StatusCode::OK, _, _)) = send(Method::GET, &url, &[], "").await {
                return process;
            }
            assert!(Instant::now() < deadline, "proxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn logs(&self) -> String {
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!(
            "{}{err}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Answer = (StatusCode, HeaderMap, String);

async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer, String> {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

async fn login(proxy: &ProxyProcess, user: &str, password: &str) -> Answer {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    send(
        Method::POST,
        &proxy.url("/auth/login"),
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        &body,
    )
    .await
    .unwrap()
}

/// docs/CONFIG.md `[auth.throttle]`: `max_failures_per_user` = "Failed logins per user name
/// per window", and "while a limit is reached, logins answer 429". Each attempt is counted in
/// Redis in the same step as the limit check, before its password is checked, so of 40
/// concurrent wrong passwords spread over two proxies at most 3 are checked (401); the rest are
/// throttled. Before the fix, the failure was counted only after the password check, so all 40
/// were checked and a guesser only had to send in parallel to be unthrottled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_passwords_across_proxies_respect_the_per_user_limit() {
    let redis = RedisServer::start();
    let files = FleetFiles::new();
    let throttle = "max_failures_per_ip = 1000\nmax_failures_per_user = 3\nwindow = \"15m\"";
    let a = ProxyProcess::start(&files.proxy_config("a", &redis.url(), throttle)).await;
    let b = ProxyProcess::start(&files.proxy_config("b", &redis.url(), throttle)).await;
    let (a, b) = (Arc::new(a), Arc::new(b));

    let mut tasks = Vec::new();
    for i in 0..40 {
        let proxy = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            login(&proxy, "alice", &format!("guess-{i}")).await.0
        }));
    }
    let mut checked = 0;
    let mut throttled = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => throttled += 1,
            other => panic!("unexpected {other}: {}", a.logs()),
        }
    }
    let counted = redis.cli(&["KEYS", "qa:throttle:user:*"]);
    let count = redis.cli(&["GET", &counted]);
    assert!(
        checked <= 3,
        "{checked} wrong passwords were checked (401) and {throttled} throttled (429) with \
         max_failures_per_user = 3; the user counter reads {count}"
    );
}

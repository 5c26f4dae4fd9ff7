//! A fleet on one real `redis-server`: separate `countersign run` processes (proxies) sharing
//! sessions and login throttling, and API instances (hyper on loopback behind the real
//! `VerifyLayer`) sharing the replay cache. Redis is stopped and restarted mid-run.
//!
//! Each test starts its own Redis on a free port, writes the proxies' config, keyring and users
//! files into a temporary directory, and kills every process it started when it ends.
#![cfg(feature = "proxy")]

mod support_redis;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::core::{Keyring, KeyringHandle, Policy, Secret, Verifier};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::{RedisConnection, RedisOptions, RedisReplayCache};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use support_redis::RedisServer;
use tower::{Layer as _, ServiceExt as _};

const BIN: &str = env!("CARGO_BIN_EXE_countersign");
/// The origin the browser sees (the load balancer in front of every proxy).
const ORIGIN: &str = "http://app.test";
/// 32 bytes of 7, base64: the keyring shared by proxies and APIs.
const SECRET_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const ALICE_PASSWORD: &str = "alice-password";

// ---------------------------------------------------------------------------------------------
// Files and processes
// ---------------------------------------------------------------------------------------------

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "countersign-fleet-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two distinct free ports (both are held while the second is chosen, so they differ).
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
                "[[users]]\nname = \"alice\"\npassword = \"{}\"\nroles = [\"admin\"]\n\n\
                 [[users]]\nname = \"bob\"\npassword = \"{}\"\nroles = []\n",
                cheap_hash(ALICE_PASSWORD),
                cheap_hash("bob-password")
            ),
        )
        .unwrap();
        FleetFiles { dir }
    }

    /// A proxy config: Redis sessions and throttle, one upstream.
    fn proxy_config(&self, name: &str, redis_url: &str, upstream: SocketAddr) -> ProxyConfigFile {
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
redis_key_prefix = "fleet:"
idle_timeout = "30m"
absolute_timeout = "12h"

[auth]
users_file = "users.toml"

[auth.throttle]
max_failures_per_ip = 100
max_failures_per_user = 3
window = "15m"

[signing]
keyring = "keys.toml"
window = "10s"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://{upstream}"
timeout = "5s"
"#
            ),
        )
        .unwrap();
        ProxyConfigFile {
            path,
            port,
            admin_port,
        }
    }
}

impl Drop for FleetFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone)]
struct ProxyConfigFile {
    path: PathBuf,
    port: u16,
    admin_port: u16,
}

/// One `countersign run` process.
struct ProxyProcess {
    child: Child,
    config: ProxyConfigFile,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts `countersign run` and waits until `/healthz` answers. The free ports in the
    /// config were only free when chosen: if another process took one meanwhile (the proxy
    /// exits with a bind error), the config is rewritten with new ports and started again.
    async fn start(config: &ProxyConfigFile) -> ProxyProcess {
        let mut config = config.clone();
        for _ in 0..3 {
            match Self::try_start(&config).await {
                Ok(process) => return process,
                Err(logs) if logs.contains("in use") || logs.contains("must differ from") => {
                    let text = std::fs::read_to_string(&config.path).unwrap();
                    let (port, admin_port) = two_free_ports();
                    let text = text
                        .replace(
                            &format!("127.0.0.1:{}\"", config.port),
                            &format!("127.0.0.1:{port}\""),
                        )
                        .replace(
                            &format!("127.0.0.1:{}\"", config.admin_port),
                            &format!("127.0.0.1:{admin_port}\""),
                        );
                    std::fs::write(&config.path, text).unwrap();
                    config.port = port;
                    config.admin_port = admin_port;
                }
                Err(logs) => panic!("proxy exited early: {logs}"),
            }
        }
        panic!("proxy could not bind free ports in three attempts");
    }

    async fn try_start(config: &ProxyConfigFile) -> Result<ProxyProcess, String> {
        let log = config.path.with_extension(format!("{}.log", free_port()));
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config.path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let mut process = ProxyProcess {
            child,
            config: config.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(format!("({status}) {}", process.logs()));
            }
            // Its own "proxy listening" line first: the ports were free only when chosen, and
            // a /healthz answer alone could come from another test's proxy that took the admin
            // port while this one was exiting with a bind error.
            let listening = format!("proxy listening addr=127.0.0.1:{}", config.port);
            if process.logs().contains(&listening) {
                if let Ok((status, _, _)) =
                    send(Method::GET, &process.admin_url("/healthz"), &[], "").await
                {
                    if status == StatusCode::OK {
                        return Ok(process);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start: {}",
                process.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.config.port)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.config.admin_port)
    }

    fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the proxy logged, once its log holds `needle` (polled for up to 30 s). Its
    /// log lines are written by a thread of their own after the answers, so a line may be
    /// missing from the file for a while after the request that caused it was answered.
    async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log: {logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the proxy with SIGTERM (which flushes its log) and returns everything it logged.
    async fn stop_and_logs(&mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "SIGTERM did not stop the proxy: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.logs()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

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
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
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

async fn must(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    send(method, url, headers, body).await.unwrap()
}

/// A logged-in browser: the session cookie and the CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
}

async fn login(proxy: &ProxyProcess, user: &str, password: &str) -> Answer {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    must(
        Method::POST,
        &proxy.url("/auth/login"),
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        &body,
    )
    .await
}

async fn login_ok(proxy: &ProxyProcess, user: &str, password: &str) -> Browser {
    let (status, headers, body) = login(proxy, user, password).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", proxy.logs());
    let set_cookie = headers
        .get("set-cookie")
        .expect("set-cookie")
        .to_str()
        .unwrap();
    let cookie = set_cookie.split(';').next().unwrap().trim().to_owned();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    Browser {
        cookie,
        csrf: json["csrf_token"].as_str().unwrap().to_owned(),
    }
}

async fn session_status(proxy: &ProxyProcess, browser: &Browser) -> (StatusCode, String) {
    let (status, _, body) = must(
        Method::GET,
        &proxy.url("/auth/session?touch=false"),
        &[("cookie", &browser.cookie)],
        "",
    )
    .await;
    (status, body)
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<no error code in {body:?}>"))
}

async fn wait_for(what: &str, deadline: Duration, mut probe: impl AsyncProbe) {
    let until = Instant::now() + deadline;
    loop {
        if probe.ok().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "{what} did not happen in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

trait AsyncProbe {
    fn ok(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>>;
}

struct ReadyProbe<'a>(&'a ProxyProcess, StatusCode);

impl AsyncProbe for ReadyProbe<'_> {
    fn ok(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>> {
        Box::pin(async move {
            matches!(
                send(Method::GET, &self.0.admin_url("/readyz"), &[], "").await,
                Ok((status, _, _)) if status == self.1
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// API instances
// ---------------------------------------------------------------------------------------------

/// A request as it reached an API instance (before verification), to replay it elsewhere.
#[derive(Clone)]
struct Captured {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An API instance: hyper on loopback behind the real VerifyLayer with a Redis replay cache
/// on its own connection; answers the verified user as JSON.
struct Api {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn keyring() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap())
}

async fn start_api(redis_url: &str) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connection = RedisConnection::with_options(
        redis_url,
        RedisOptions {
            op_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(500),
            ping_timeout: Duration::from_millis(200),
        },
    )
    .unwrap();
    let replay = Arc::new(RedisReplayCache::new(connection, "fleet:nonce:"));
    let layer = VerifyLayer::new(Verifier::new(keyring(), Policy::default()), replay);
    let app = tower::service_fn(|request: Request<Full<Bytes>>| async move {
        let user = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|identity| identity.user.clone());
        let body = serde_json::json!({ "user": user }).to_string();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let service = layer.layer(app);
    let captured = Arc::new(Mutex::new(Vec::new()));
    let log = captured.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let service = service.clone();
                    let log = log.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        log.lock().push(Captured {
                            method: parts.method.clone(),
                            uri: parts.uri.to_string(),
                            headers: parts.headers.clone(),
                            body: body.clone(),
                        });
                        service
                            .oneshot(Request::from_parts(parts, Full::new(body)))
                            .await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Api {
        addr,
        captured,
        task,
    }
}

/// Sends `captured` unchanged (same Host, signature, nonce) to `addr`.
async fn replay_to(addr: SocketAddr, captured: &Captured) -> Answer {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(captured.method.clone())
        .uri(format!("http://{addr}{}", captured.uri));
    for (name, value) in &captured.headers {
        request = request.header(name, value);
    }
    let response = client
        .request(request.body(Full::new(captured.body.clone())).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_on_one_proxy_use_and_log_out_on_another() {
    let redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy_a = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api.addr)).await;
    let proxy_b = ProxyProcess::start(&files.proxy_config("b", &redis.url(), api.addr)).await;

    let browser = login_ok(&proxy_a, "alice", ALICE_PASSWORD).await;
    // Both proxies count the fleet's sessions (the metric reads the shared count index).
    for proxy in [&proxy_a, &proxy_b] {
        let (_, _, metrics) = must(Method::GET, &proxy.admin_url("/metrics"), &[], "").await;
        assert!(
            metrics.contains("countersign_active_sessions 1\n"),
            "{metrics}"
        );
    }

    // The load balancer sends the next requests to B.
    let (status, body) = session_status(&proxy_b, &browser).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["user"],
        "alice"
    );
    let (status, _, body) = must(
        Method::GET,
        &proxy_b.url("/api/whoami"),
        &[("cookie", &browser.cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["user"],
        "alice",
        "the API verified alice's identity signed by proxy B"
    );

    // Log out on B.
    let (status, _, body) = must(
        Method::POST,
        &proxy_b.url("/auth/logout"),
        &[
            ("cookie", &browser.cookie),
            ("x-csrf-token", &browser.csrf),
            ("origin", ORIGIN),
        ],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    // Rejected on A.
    let (status, body) = session_status(&proxy_a, &browser).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "unauthenticated");
    let (status, _, _) = must(
        Method::GET,
        &proxy_a.url("/api/whoami"),
        &[("cookie", &browser.cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_revoke_on_one_proxy_ends_the_users_sessions_on_all() {
    let redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy_a = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api.addr)).await;
    let proxy_b = ProxyProcess::start(&files.proxy_config("b", &redis.url(), api.addr)).await;

    let on_a = login_ok(&proxy_a, "alice", ALICE_PASSWORD).await;
    let on_b = login_ok(&proxy_b, "alice", ALICE_PASSWORD).await;
    let bob = login_ok(&proxy_b, "bob", "bob-password").await;

    let (status, _, body) = must(
        Method::POST,
        &proxy_a.admin_url("/admin/users/alice/revoke"),
        &[],
        "",
    )
    .await;
    assert!(status.is_success(), "{status} {body}");

    for proxy in [&proxy_a, &proxy_b] {
        for browser in [&on_a, &on_b] {
            assert_eq!(
                session_status(proxy, browser).await.0,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(session_status(proxy, &bob).await.0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_counted_across_proxies() {
    let redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy_a = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api.addr)).await;
    let proxy_b = ProxyProcess::start(&files.proxy_config("b", &redis.url(), api.addr)).await;

    // max_failures_per_user = 3, spread over both proxies.
    for proxy in [&proxy_a, &proxy_b, &proxy_a] {
        let (status, _, body) = login(proxy, "alice", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    for proxy in [&proxy_b, &proxy_a] {
        // Even the right password is refused now, on either proxy.
        let (status, headers, body) = login(proxy, "alice", ALICE_PASSWORD).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(error_code(&body), "too_many_attempts");
        let retry_after: u64 = headers
            .get("retry-after")
            .expect("retry-after")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=900).contains(&retry_after), "{retry_after}");
    }
    // Another user is not affected.
    login_ok(&proxy_b, "bob", "bob-password").await;
}

/// Attempts sent at once are admitted and counted in one step in Redis, before any password
/// is checked: of 40 concurrent wrong passwords spread over two proxies exactly 3
/// (`max_failures_per_user`) are checked, the rest are throttled. (Counted only after the
/// password check, as before a QA pass found it, all 40 were checked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_passwords_across_proxies_stop_at_the_per_user_limit() {
    let redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy_a = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api.addr)).await;
    let proxy_b = ProxyProcess::start(&files.proxy_config("b", &redis.url(), api.addr)).await;
    let (proxy_a, proxy_b) = (Arc::new(proxy_a), Arc::new(proxy_b));
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let proxy = if i % 2 == 0 { &proxy_a } else { &proxy_b }.clone();
            tokio::spawn(async move { login(&proxy, "alice", &format!("guess-{i}")).await.0 })
        })
        .collect();
    let (mut checked, mut throttled) = (0, 0);
    for attempt in attempts {
        match attempt.await.unwrap() {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => throttled += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (checked, throttled),
        (3, 37),
        "checked (401), throttled (429)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_503_and_not_ready_then_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api.addr)).await;
    let browser = login_ok(&proxy, "alice", ALICE_PASSWORD).await;
    wait_for(
        "ready",
        Duration::from_secs(10),
        ReadyProbe(&proxy, StatusCode::OK),
    )
    .await;

    redis.stop();
    let (status, body) = session_status(&proxy, &browser).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "session_store_unavailable");
    let (status, _, body) = must(
        Method::GET,
        &proxy.url("/api/whoami"),
        &[("cookie", &browser.cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "session_store_unavailable");
    let (status, _, body) = login(&proxy, "alice", ALICE_PASSWORD).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    wait_for(
        "not ready",
        Duration::from_secs(10),
        ReadyProbe(&proxy, StatusCode::SERVICE_UNAVAILABLE),
    )
    .await;
    let logs = proxy.wait_for_log("redis unavailable").await;
    assert!(!logs.contains(&browser.cookie), "the cookie was logged");

    redis.restart();
    wait_for(
        "ready again",
        Duration::from_secs(15),
        ReadyProbe(&proxy, StatusCode::OK),
    )
    .await;
    // The test Redis has no persistence: log in again, and everything works.
    let again = login_ok(&proxy, "alice", ALICE_PASSWORD).await;
    let (status, _, body) = must(
        Method::GET,
        &proxy.url("/api/whoami"),
        &[("cookie", &again.cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_proxy_restart() {
    let redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let config = files.proxy_config("a", &redis.url(), api.addr);
    let mut proxy = ProxyProcess::start(&config).await;
    let browser = login_ok(&proxy, "alice", ALICE_PASSWORD).await;
    // The config as started (its ports may have been replaced if they were taken).
    let config = proxy.config.clone();
    proxy.kill();
    drop(proxy);

    let proxy = ProxyProcess::start(&config).await;
    let (status, body) = session_status(&proxy, &browser).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = must(
        Method::GET,
        &proxy.url("/api/whoami"),
        &[("cookie", &browser.cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_replayed_from_one_api_instance_to_another_is_rejected() {
    let mut redis = RedisServer::start();
    let api_one = start_api(&redis.url()).await;
    let api_two = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy = ProxyProcess::start(&files.proxy_config("a", &redis.url(), api_one.addr)).await;
    let browser = login_ok(&proxy, "alice", ALICE_PASSWORD).await;

    let (status, _, body) = must(
        Method::POST,
        &proxy.url("/api/orders"),
        &[
            ("cookie", &browser.cookie),
            ("x-csrf-token", &browser.csrf),
            ("origin", ORIGIN),
            ("content-type", "application/json"),
        ],
        "{\"qty\":1}",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let signed = api_one.captured.lock().last().cloned().unwrap();
    assert!(signed.headers.contains_key("signature"));

    // Captured on the wire and sent to the other instance: rejected there...
    let (status, _, body) = replay_to(api_two.addr, &signed).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "replayed");
    // ...and on the first one.
    let (status, _, body) = replay_to(api_one.addr, &signed).await;
    assert_eq!(error_code(&body), "replayed", "{status}");

    // Redis down: the APIs refuse signed requests rather than accept them unchecked.
    redis.stop();
    // The session store is down too, so go around the proxy: a valid, never-seen signature
    // made by the shared keyring.
    let signer = countersign::core::Signer::new(keyring(), Default::default());
    let mut parts = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/api/direct", api_two.addr))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    signer
        .sign(
            &mut parts,
            b"",
            None,
            now,
            &countersign::core::Nonce::random(),
        )
        .unwrap();
    let mut headers = parts.headers.clone();
    // Signed for API two's authority; sent with that Host to either instance.
    headers.insert("host", api_two.addr.to_string().parse().unwrap());
    let direct = Captured {
        method: parts.method.clone(),
        uri: "/api/direct".into(),
        headers,
        body: Bytes::new(),
    };
    let (status, _, body) = replay_to(api_two.addr, &direct).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "replay_cache_unavailable");

    // Back up: the same instance accepts it (the refused attempt recorded nothing).
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = replay_to(api_two.addr, &direct).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(error_code(&body), "replay_cache_unavailable");
        assert!(Instant::now() < deadline, "API did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, body) = replay_to(api_one.addr, &direct).await;
    assert_eq!(error_code(&body), "replayed", "{status}");
}

// ---------------------------------------------------------------------------------------------
// Refused connections, refused credentials, and metrics while Redis is down
// ---------------------------------------------------------------------------------------------

/// A local address nothing listens on while the returned socket lives (bound, never
/// listening, so nothing else can take it meanwhile).
fn closed_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    support_redis::refusing_addr()
}

async fn scrape(proxy: &ProxyProcess) -> String {
    let (status, _, metrics) = must(Method::GET, &proxy.admin_url("/metrics"), &[], "").await;
    assert_eq!(status, StatusCode::OK, "{metrics}");
    metrics
}

struct MetricsProbe<'a>(&'a ProxyProcess, &'static str);

impl AsyncProbe for MetricsProbe<'_> {
    fn ok(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>> {
        Box::pin(async move {
            matches!(
                send(Method::GET, &self.0.admin_url("/metrics"), &[], "").await,
                Ok((_, _, metrics)) if metrics.contains(self.1)
            )
        })
    }
}

/// The proxies' Redis connect deadline (the default `redis_connect_timeout`). An answer that
/// waited for it takes at least this long, so an answer "at once" is one that takes less: all
/// of it is slack for a loaded machine.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// Three logins in a row on a proxy whose Redis refuses it: each answers 503
/// `session_store_unavailable` without waiting for the connect deadline.
async fn three_logins_unavailable_at_once(proxy: &ProxyProcess) {
    for attempt in 0..3 {
        let started = Instant::now();
        let (status, _, body) = login(proxy, "alice", ALICE_PASSWORD).await;
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(error_code(&body), "session_store_unavailable");
        assert!(
            elapsed < CONNECT_DEADLINE,
            "login {attempt} took {elapsed:?}\n{}",
            proxy.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_is_503_at_once_and_logged_as_the_cause() {
    let redis = RedisServer::start_with(&["--requirepass", "right-pw"]);
    let port = redis.addr().port();
    let files = FleetFiles::new();
    // The default redis_connect_timeout (2 s) is in force.
    let url = format!("redis://countersign:WRONGPW@127.0.0.1:{port}/0");
    let (_no_upstream, upstream) = closed_addr();
    let mut proxy = ProxyProcess::start(&files.proxy_config("wrongpw", &url, upstream)).await;
    three_logins_unavailable_at_once(&proxy).await;
    let (status, _, _) = must(Method::GET, &proxy.admin_url("/readyz"), &[], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // The whole log: its lines are written after the answers, by a thread of the proxy's own.
    let logs = proxy.stop_and_logs().await;
    // One error line for the outage, naming the cause; no password, no "timed out".
    assert_eq!(logs.matches("redis unavailable").count(), 1, "{logs}");
    assert!(logs.contains("authentication failed"), "{logs}");
    assert!(logs.contains("WRONGPASS"), "{logs}");
    assert!(!logs.contains("timed out"), "{logs}");
    assert!(!logs.contains("WRONGPW"), "the password was logged: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_redis_port_is_503_at_once_and_logged_as_refused() {
    let files = FleetFiles::new();
    let (_no_redis, redis) = closed_addr();
    let (_no_upstream, upstream) = closed_addr();
    let url = format!("redis://{redis}/0");
    let mut proxy = ProxyProcess::start(&files.proxy_config("closed", &url, upstream)).await;
    three_logins_unavailable_at_once(&proxy).await;
    // The whole log: its lines are written after the answers, by a thread of the proxy's own.
    let logs = proxy.stop_and_logs().await;
    assert!(logs.contains("Connection refused"), "{logs}");
    assert!(!logs.contains("timed out"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_the_store_is_down_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let api = start_api(&redis.url()).await;
    let files = FleetFiles::new();
    let proxy = ProxyProcess::start(&files.proxy_config("m", &redis.url(), api.addr)).await;
    login_ok(&proxy, "alice", ALICE_PASSWORD).await;
    let metrics = scrape(&proxy).await;
    assert!(
        metrics.contains("\ncountersign_session_store_up 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ncountersign_active_sessions 1\n"),
        "{metrics}"
    );

    redis.stop();
    for _ in 0..2 {
        let started = Instant::now();
        let metrics = scrape(&proxy).await;
        // The scrape does not wait for the connect deadline: the refusal is immediate.
        assert!(
            started.elapsed() < CONNECT_DEADLINE,
            "scrape took {:?}",
            started.elapsed()
        );
        // An explicit signal instead of a silently missing series ...
        assert!(
            metrics.contains("# TYPE countersign_session_store_up gauge\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("\ncountersign_session_store_up 0\n"),
            "{metrics}"
        );
        // ... and no session count that is no longer known.
        assert!(
            !metrics.contains("\ncountersign_active_sessions "),
            "{metrics}"
        );
        assert!(
            !metrics.contains("# TYPE countersign_active_sessions"),
            "{metrics}"
        );
        // The proxy's own metrics are all still there.
        assert!(
            metrics.contains("countersign_logins_total{outcome=\"ok\"} 1\n"),
            "{metrics}"
        );
    }

    redis.restart();
    wait_for(
        "the store up again in /metrics",
        Duration::from_secs(15),
        MetricsProbe(&proxy, "\ncountersign_session_store_up 1\n"),
    )
    .await;
    // The test Redis has no persistence: the count is known again, and is 0.
    let metrics = scrape(&proxy).await;
    assert!(
        metrics.contains("\ncountersign_active_sessions 0\n"),
        "{metrics}"
    );
}

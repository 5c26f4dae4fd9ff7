//! A fleet of real `countersign run` processes for tests, shared by tests/redis_fleet.rs and
//! tests/redis_cluster.rs: a temporary directory with the keyring, the users file and the
//! proxies' configs (removed on drop), the proxy processes (killed on drop), an HTTP client,
//! logins, and API instances (hyper on loopback behind the real `VerifyLayer`, their replay
//! cache on a Redis connection). Include with `mod support; mod support_run; mod support_fleet;`
//! from a file in `tests/` (it uses their temporary directory, password hash and free ports).
#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::core::{Keyring, KeyringHandle, Policy, Secret, Verifier};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::{RedisConnection, RedisReplayCache};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tower::{Layer as _, ServiceExt as _};

use crate::support::{cheap_hash, free_port, temp_dir, TestDir};
use crate::support_run::two_free_addrs;

pub const BIN: &str = env!("CARGO_BIN_EXE_countersign");
/// The origin the browser sees (the load balancer in front of every proxy).
pub const ORIGIN: &str = "http://app.test";
/// 32 bytes of 7, base64: the keyring shared by proxies and APIs (see [`keyring`]).
pub const SECRET_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
pub const ALICE_PASSWORD: &str = "alice-password";

// ---------------------------------------------------------------------------------------------
// Files and processes
// ---------------------------------------------------------------------------------------------

/// Two distinct free ports (both are held while the second is chosen, so they differ).
fn two_free_ports() -> (u16, u16) {
    let (first, second) = two_free_addrs();
    (first.port(), second.port())
}

/// A directory with the keyring, the users file (alice, an admin, and bob) and the proxies'
/// configs; removed on drop.
pub struct FleetFiles {
    dir: TestDir,
}

impl FleetFiles {
    pub fn new() -> FleetFiles {
        let dir = temp_dir("fleet");
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

    /// A proxy config on two free ports, one upstream (`/api/` to `upstream`, a `host:port`),
    /// the login throttle at 3 failures per user, and a `[session]` table whose lines after
    /// `store = "redis"` are `session`.
    pub fn proxy_config(
        &self,
        name: &str,
        session: &str,
        upstream: impl Display,
    ) -> ProxyConfigFile {
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
{session}

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

#[derive(Clone)]
pub struct ProxyConfigFile {
    pub path: PathBuf,
    pub port: u16,
    pub admin_port: u16,
}

/// One `countersign run` process, killed on drop.
pub struct ProxyProcess {
    child: Child,
    /// The config as started (its ports may have been replaced if they were taken).
    pub config: ProxyConfigFile,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts `countersign run` and waits until `/healthz` answers. The free ports in the
    /// config were only free when chosen: if another process took one meanwhile (the proxy
    /// exits with a bind error), the config is rewritten with new ports and started again.
    pub async fn start(config: &ProxyConfigFile) -> ProxyProcess {
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

    /// [`ProxyProcess::start`], then waits (up to 30 s) until `/readyz` answers 200: its
    /// session store checked.
    pub async fn start_ready(config: &ProxyConfigFile) -> ProxyProcess {
        let process = Self::start(config).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((StatusCode::OK, _, _)) =
                send(Method::GET, &process.admin_url("/readyz"), &[], "").await
            {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not get ready: {}",
                process.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.config.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.config.admin_port)
    }

    pub fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the proxy logged, once its log holds `needle` (polled for up to 30 s). Its
    /// log lines are written by a thread of their own after the answers, so a line may be
    /// missing from the file for a while after the request that caused it was answered.
    pub async fn wait_for_log(&self, needle: &str) -> String {
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
    pub async fn stop_and_logs(&mut self) -> String {
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

pub type Answer = (StatusCode, HeaderMap, String);

pub async fn send(
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

pub async fn must(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    send(method, url, headers, body).await.unwrap()
}

/// A logged-in browser: the session cookie and the CSRF token.
pub struct Browser {
    pub cookie: String,
    pub csrf: String,
}

pub async fn login(proxy: &ProxyProcess, user: &str, password: &str) -> Answer {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    must(
        Method::POST,
        &proxy.url("/auth/login"),
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        &body,
    )
    .await
}

/// A login that must succeed (200), with the proxy's log in the message if it does not.
pub async fn login_ok(proxy: &ProxyProcess, user: &str, password: &str) -> Browser {
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

pub fn error_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<no error code in {body:?}>"))
}

// ---------------------------------------------------------------------------------------------
// API instances
// ---------------------------------------------------------------------------------------------

/// A request as it reached an API instance (before verification), to replay it elsewhere.
#[derive(Clone)]
pub struct Captured {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An API instance: hyper on loopback behind the real VerifyLayer with a Redis replay cache
/// (prefix `fleet:nonce:`) on a connection of its own; answers the verified user as JSON.
pub struct Api {
    pub addr: SocketAddr,
    /// Every request it received, in order.
    pub captured: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The keyring of [`SECRET_B64`], for verifiers and signers.
pub fn keyring() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap())
}

/// Starts an API instance whose replay cache uses `connection`.
pub async fn start_api(connection: RedisConnection) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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

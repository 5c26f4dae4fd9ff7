//! The key-rotation runbook of docs/OPERATIONS.md ("Key rotation"), followed step by step with
//! real processes on loopback: two `countersign run` proxies (one with `--workers 2`), two
//! `countersign demo-api` instances behind each of them (the real `VerifyLayer`), a logged-in
//! session on each proxy, and a steady stream of GET and POST requests through every
//! proxy-to-API path during the whole procedure. Every answer is counted: not one may fail.
//! Also automatic rotation (`rotation = "1s"`, the shortest period) across epoch boundaries,
//! turning rotation on, changing its period and turning it off by the same runbook (a new key
//! with its own `[[keys]] rotation`), and the wrong order (the proxies sign with a key the APIs do not know), which must fail
//! loudly: 401 `unknown_key` at the SPA and in the proxy's metrics.
//! Run: `cargo test --all-features --test rotation_runbook`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_run;

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::{
    login_alice_at, raw_exchange, temp_dir, users_file_text, write, Login, TestDir, ORIGIN,
};
use support_cli::run_countersign;
use support_run::{start_on_free_ports, RunningProxy, BIN};

/// `signing.window` of the proxies and `--window` of the APIs: short, so that the runbook's
/// wait for the window (plus the verifier's 2 s skew) keeps the test short.
const WINDOW_SECS: u64 = 2;
/// The verifier's default clock skew allowance (`Policy::default().skew`).
const SKEW_SECS: u64 = 2;
/// Pause between two requests of one client worker: a steady, modest stream (four workers,
/// at most a couple of hundred requests per second in all), not a saturation test.
const REQUEST_PAUSE: Duration = Duration::from_millis(15);
/// Longest wait for anything (a reload, a log line, an answer) on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Secrets of k1 and k2 (32×0x07, 32×0x08, as `support::keyring_file_text`), k3 and k4
/// (32×0x09, 32×0x0a), base64.
fn secret_of(id: &str) -> String {
    use base64::Engine as _;
    let byte = match id {
        "k1" => 7,
        "k2" => 8,
        "k3" => 9,
        "k4" => 10,
        other => panic!("no test secret for {other}"),
    };
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// A keyring file: `active`, `rotation`, and `keys` as (id, retired).
fn keyring_text(active: &str, rotation: &str, keys: &[(&str, bool)]) -> String {
    let mut text = format!("active = \"{active}\"\nrotation = \"{rotation}\"\n");
    for (id, retired) in keys {
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nsecret = \"{}\"\nretired = {retired}\n",
            secret_of(id)
        ));
    }
    text
}

/// A keyring file whose keys may carry their own `rotation` (`[[keys]] rotation`): `keys` as
/// (id, retired, rotation), `None` inheriting the top-level `rotation = "off"`.
fn keyring_with_rotations(active: &str, keys: &[(&str, bool, Option<&str>)]) -> String {
    let mut text = format!("active = \"{active}\"\nrotation = \"off\"\n");
    for (id, retired, rotation) in keys {
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nsecret = \"{}\"\nretired = {retired}\n",
            secret_of(id)
        ));
        if let Some(rotation) = rotation {
            text.push_str(&format!("rotation = \"{rotation}\"\n"));
        }
    }
    text
}

/// Replaces `path` with `text` at once (a new file renamed over it, as the kubelet swaps a
/// Secret volume), so a file-change check never reads it half-written.
fn replace_file(path: &Path, text: &str) {
    let staged = path.with_extension("toml.new");
    write(&staged, text);
    std::fs::rename(&staged, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The APIs: `countersign demo-api`
// ---------------------------------------------------------------------------------------------

/// A running `countersign demo-api --keyring FILE`, its JSON log collected; killed on drop.
struct DemoApi {
    child: Child,
    addr: SocketAddr,
    keyring: PathBuf,
    log: Arc<Mutex<String>>,
}

impl DemoApi {
    /// Two demo APIs in `dir`, each with its own keyring file holding `keyring` (so each can
    /// be reloaded on its own, as instances of a fleet are).
    fn start_pair(dir: &Path, keyring: &str) -> [DemoApi; 2] {
        ["api-a-keys.toml", "api-b-keys.toml"].map(|name| {
            let file = dir.join(name);
            write(&file, keyring);
            DemoApi::start(file)
        })
    }

    fn start(keyring: PathBuf) -> DemoApi {
        let mut child = Command::new(BIN)
            .args([
                "demo-api",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(["--window", &format!("{WINDOW_SECS}s"), "--keyring"])
            .arg(&keyring)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        // Read while it runs, so a long log can never block the child on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        // Its first stdout line names the address; the signal handlers are installed before.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("demo API listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        DemoApi {
            child,
            addr,
            keyring,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Runbook: write the keyring, `kill -HUP`, and confirm by the log line that the reload
    /// took effect (`SIGHUP: reloaded keyring (active key …)`).
    async fn replace_keyring_and_reload(&self, text: &str) {
        const RELOADED: &str = "SIGHUP: reloaded keyring";
        let before = self.count_in_log(RELOADED);
        replace_file(&self.keyring, text);
        signal(self.child.id(), "HUP");
        let deadline = Instant::now() + DEADLINE;
        while self.count_in_log(RELOADED) <= before {
            assert!(
                Instant::now() < deadline,
                "the API did not reload: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DemoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// The proxies: `countersign run`
// ---------------------------------------------------------------------------------------------

/// How the proxies are told their keyring changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    /// `kill -HUP` (`systemctl reload countersign`).
    Signal,
    /// `[server] reload_check_interval = "1s"`: writing the file is enough (Kubernetes).
    FileChange,
}

impl Reload {
    /// The prefix of the proxy's log line for a reload done this way.
    fn trigger(self) -> &'static str {
        match self {
            Reload::Signal => "SIGHUP",
            Reload::FileChange => "file change",
        }
    }
}

/// A proxy: the process, its addresses, its config folder and keyring file.
struct Proxy {
    process: RunningProxy,
    /// Its config, users file and keyring: removed after the process is killed (fields drop
    /// in order).
    _dir: TestDir,
    addr: SocketAddr,
    admin: SocketAddr,
    keyring: PathBuf,
    reload: Reload,
}

/// A proxy.toml with two upstreams: `/api/` to API A and `/b/` (prefix stripped, so
/// `/b/api/whoami` arrives as `/api/whoami`) to API B.
fn proxy_config(
    listen: SocketAddr,
    admin: SocketAddr,
    apis: &[&DemoApi],
    reload: Reload,
) -> String {
    let check = match reload {
        Reload::Signal => "",
        Reload::FileChange => "reload_check_interval = \"1s\"\n",
    };
    let mut text = format!(
        "[server]\nlisten = \"{listen}\"\npublic_origin = \"{ORIGIN}\"\nshutdown_grace = \"2s\"\n\
         {check}\n[admin]\nlisten = \"{admin}\"\n\n[session]\nstore = \"memory\"\n\n\
         [auth]\nusers_file = \"users.toml\"\n\n\
         [signing]\nkeyring = \"keys.toml\"\nwindow = \"{WINDOW_SECS}s\"\n"
    );
    for (i, api) in apis.iter().enumerate() {
        let (name, prefix, strip) = match i {
            0 => ("api", "/api/", false),
            _ => ("api-b", "/b/", true),
        };
        text.push_str(&format!(
            "\n[[upstream]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nurl = \"http://{}\"\n\
             strip_prefix = {strip}\n",
            api.addr
        ));
    }
    text
}

/// Asserts that every proxy counted only 200 answers on its API routes (its metrics).
async fn assert_only_200s_on_api_routes(proxies: &[Proxy]) {
    for proxy in proxies {
        let metrics = proxy.metrics().await;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("countersign_requests_total{route=\"upstream/"))
        {
            assert!(line.contains("status=\"200\""), "{line}\n{metrics}");
        }
    }
}

impl Proxy {
    fn start(tag: &str, keys: &str, apis: &[&DemoApi], reload: Reload, workers: &str) -> Proxy {
        let dir = temp_dir(tag);
        write(&dir.join("keys.toml"), keys);
        write(&dir.join("users.toml"), &users_file_text());
        let config = dir.join("proxy.toml");
        let (mut process, addr, admin) = start_on_free_ports(|listen, admin| {
            write(&config, &proxy_config(listen, admin, apis, reload));
            RunningProxy::spawn(&config, &["--workers", workers])
        });
        process.wait_listening(addr);
        Proxy {
            process,
            keyring: dir.join("keys.toml"),
            _dir: dir,
            addr,
            admin,
            reload,
        }
    }

    /// Every INFO line saying the keyring was reloaded this proxy's way.
    fn keyring_reloads(&self) -> Vec<String> {
        let loaded = format!("{}: reloaded signing.keyring", self.reload.trigger());
        self.process.json_messages("INFO", &[&loaded])
    }

    /// Runbook: write the keyring, reload (SIGHUP, or nothing with `reload_check_interval`),
    /// and confirm the step by the proxy's log line `… reloaded signing.keyring … (active key
    /// <active>)`.
    async fn replace_keyring_and_reload(&self, text: &str, active: &str) {
        let before = self.keyring_reloads().len();
        replace_file(&self.keyring, text);
        if self.reload == Reload::Signal {
            self.process.signal("HUP");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reloads = self.keyring_reloads();
            if reloads.len() > before {
                let last = reloads.last().unwrap();
                assert!(last.contains(&format!("(active key {active})")), "{last}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not reload its keyring: {}",
                self.process.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /metrics` on the admin listener.
    async fn metrics(&self) -> String {
        support::send(self.admin, Method::GET, "/metrics", &[], Bytes::new())
            .await
            .text()
    }
}

// ---------------------------------------------------------------------------------------------
// The client: a steady stream of requests, every answer recorded
// ---------------------------------------------------------------------------------------------

/// One request's fate.
#[derive(Debug, Clone)]
struct Outcome {
    /// The test's phase when the request was sent, and when its answer was complete.
    phase_sent: usize,
    phase_done: usize,
    /// Unix seconds when it was sent and when its answer was complete.
    unix_sent: u64,
    unix_done: u64,
    /// `METHOD path via proxy`.
    what: String,
    /// The HTTP status, or None when the exchange itself failed (`error`).
    status: Option<u16>,
    /// The keyid the API saw (from its answer), on success.
    keyid: Option<String>,
    /// The error code of a JSON error answer, or the transport error.
    error: Option<String>,
}

/// The client workers and what they recorded.
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// Where one worker sends its requests.
#[derive(Clone)]
struct Target {
    proxy: SocketAddr,
    login: Login,
    /// `/api/` (API A) or `/b/api/` (API B).
    api_prefix: &'static str,
    /// Reuse one keep-alive connection (else a new connection per request).
    keep_alive: bool,
}

impl Load {
    /// Starts one worker per target, each alternating `GET {prefix}whoami` and
    /// `POST {prefix}echo` (with the CSRF token, as the SPA sends it).
    fn start(targets: Vec<Target>) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let workers = targets
            .into_iter()
            .map(|target| {
                let (phase, stop, outcomes) = (phase.clone(), stop.clone(), outcomes.clone());
                tokio::spawn(async move {
                    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let phase_sent = phase.load(Ordering::SeqCst);
                        let unix_sent = unix_now();
                        let (what, result) = exchange(&target, &mut connection, n).await;
                        let phase_done = phase.load(Ordering::SeqCst);
                        let unix_done = unix_now();
                        let outcome = match result {
                            Ok((status, body)) => {
                                let json: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let keyid = json["keyid"]
                                    .as_str()
                                    .or(json["identity"]["keyid"].as_str())
                                    .map(str::to_owned);
                                let error = json["error"].as_str().map(str::to_owned);
                                Outcome {
                                    phase_sent,
                                    phase_done,
                                    unix_sent,
                                    unix_done,
                                    what,
                                    status: Some(status),
                                    keyid,
                                    error,
                                }
                            }
                            Err(e) => {
                                connection = None;
                                Outcome {
                                    phase_sent,
                                    phase_done,
                                    unix_sent,
                                    unix_done,
                                    what,
                                    status: None,
                                    keyid: None,
                                    error: Some(e),
                                }
                            }
                        };
                        outcomes.lock().unwrap().push(outcome);
                        tokio::time::sleep(REQUEST_PAUSE).await;
                    }
                })
            })
            .collect();
        Load {
            phase,
            stop,
            outcomes,
            workers,
        }
    }

    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn completed(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Lets the stream run until at least `n` more requests were answered, so that every
    /// step happens under load and is followed by traffic.
    async fn run_for(&self, n: usize) {
        let target = self.completed() + n;
        let deadline = Instant::now() + DEADLINE;
        while self.completed() < target {
            assert!(Instant::now() < deadline, "the client stream stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers (each finishes its request in flight) and returns every outcome.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let outcomes = self.outcomes.lock().unwrap().clone();
        outcomes
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A session on each proxy and a worker for each proxy and API: on the first proxy over
/// keep-alive connections, on the others a new connection per request.
async fn logged_in_targets(proxies: &[Proxy]) -> Vec<Target> {
    let mut targets = Vec::new();
    for (i, proxy) in proxies.iter().enumerate() {
        let login = login_alice_at(proxy.addr).await;
        for api_prefix in ["/api/", "/b/api/"] {
            targets.push(Target {
                proxy: proxy.addr,
                login: login.clone(),
                api_prefix,
                keep_alive: i == 0,
            });
        }
    }
    targets
}

/// One request of a worker: the n-th, GET when odd, POST when even.
async fn exchange(
    target: &Target,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
    n: u64,
) -> (String, Result<(u16, Bytes), String>) {
    let prefix = target.api_prefix;
    let request = Request::builder().header("host", target.proxy.to_string());
    let (what, request) = if n % 2 == 1 {
        let path = format!("{prefix}whoami");
        let request = request
            .method(Method::GET)
            .uri(&path)
            .header("cookie", &target.login.cookie)
            .body(Full::new(Bytes::new()));
        (format!("GET {path}"), request)
    } else {
        let path = format!("{prefix}echo");
        let request = request
            .method(Method::POST)
            .uri(&path)
            .header("cookie", &target.login.cookie)
            .header("x-csrf-token", &target.login.csrf)
            .header("origin", ORIGIN)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("{{\"n\":{n}}}"))));
        (format!("POST {path}"), request)
    };
    let what = format!("{what} via {}", target.proxy);
    let result = tokio::time::timeout(DEADLINE, async {
        if connection.is_none() || !target.keep_alive {
            let stream = tokio::net::TcpStream::connect(target.proxy)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            *connection = Some(sender);
        }
        let sender = connection.as_mut().unwrap();
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = sender
            .send_request(request.unwrap())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err("no answer in time".into()));
    (what, result)
}

/// Every outcome that is not a 200, with the counts by phase and status for the message.
fn failures(outcomes: &[Outcome]) -> (Vec<&Outcome>, String) {
    use std::collections::BTreeMap;
    let mut counts: BTreeMap<(usize, String), usize> = BTreeMap::new();
    for o in outcomes {
        let status = o.status.map_or("error".to_owned(), |s| s.to_string());
        *counts.entry((o.phase_done, status)).or_default() += 1;
    }
    let failed = outcomes.iter().filter(|o| o.status != Some(200)).collect();
    (failed, format!("(phase, status) -> count: {counts:?}"))
}

/// Asserts that every request succeeded and that each of `phases` saw answers complete.
fn assert_no_failures(outcomes: &[Outcome], phases: &[usize]) {
    let (failed, counts) = failures(outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed; {counts}; first failures: {:#?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
    for &phase in phases {
        let during = outcomes.iter().filter(|o| o.phase_done == phase).count();
        assert!(
            during > 0,
            "no request completed in phase {phase}; {counts}"
        );
    }
    eprintln!("{} requests, all 200; {counts}", outcomes.len());
}

/// A raw request to the API signed by `countersign sign` with k1 (a keyring whose active key
/// is k1), as a proxy still on k1, or someone holding k1, would send it.
fn signed_with_k1(dir: &Path) -> Vec<u8> {
    signed_by_key(dir, "k1", "off")
}

/// A raw request signed by `countersign sign` with key `id` under this `rotation`, as
/// [`signed_with_k1`].
fn signed_by_key(dir: &Path, id: &str, rotation: &str) -> Vec<u8> {
    let keyring = dir.join("signer.toml");
    write(&keyring, &keyring_text(id, rotation, &[(id, false)]));
    let out = run_countersign(
        [
            "sign".as_ref(),
            "--keyring".as_ref(),
            keyring.as_os_str(),
            "--user".as_ref(),
            "alice".as_ref(),
        ],
        b"GET /api/whoami HTTP/1.1\r\nHost: api.internal\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The status line and body of a raw exchange.
fn status_and_body(answer: &str) -> (u16, String) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The runbook
// ---------------------------------------------------------------------------------------------

/// Phases of the runbook, as the client records them.
mod phase {
    // 0: k1 everywhere; the APIs know only k1.
    /// Step 1 in progress or done: the APIs accept k1 and k2.
    pub const APIS_ACCEPT_K2: usize = 1;
    /// Step 2 in progress: the proxies are being switched to k2, one after the other.
    pub const SWITCHING_PROXIES: usize = 2;
    /// Step 2 confirmed on every proxy: everything is signed with k2; waiting the window.
    pub const PROXIES_SIGN_K2: usize = 3;
    /// Step 3 in progress: k1 retired everywhere, one process after the other.
    pub const RETIRING_K1: usize = 4;
    /// k1 retired everywhere.
    pub const K1_RETIRED: usize = 5;
    /// k1 removed everywhere.
    pub const K1_REMOVED: usize = 6;
    pub const COUNT: usize = 7;
}

/// Follows docs/OPERATIONS.md "Key rotation" literally under load, reloading the proxies by
/// `reload`, and checks every answer, the keyid switch and that k1 is refused afterwards.
async fn rotate_by_the_runbook(reload: Reload) {
    let tag = format!("runbook-{}", reload.trigger().replace(' ', "-"));
    let dir = temp_dir(&tag);
    let k1_only = keyring_text("k1", "off", &[("k1", false)]);
    let [api_a, api_b] = DemoApi::start_pair(&dir, &k1_only);
    let apis = [&api_a, &api_b];
    let proxies = [
        // The second proxy gets a new connection per request, spread over its two event
        // loops, which must all sign with the reloaded key.
        Proxy::start(&format!("{tag}-p1"), &k1_only, &apis, reload, "1"),
        Proxy::start(&format!("{tag}-p2"), &k1_only, &apis, reload, "2"),
    ];
    let load = Load::start(logged_in_targets(&proxies).await);
    load.run_for(40).await;

    // 1. Add the new key to the APIs' keyring and reload them: they accept both.
    load.set_phase(phase::APIS_ACCEPT_K2);
    let both = keyring_text("k1", "off", &[("k1", false), ("k2", false)]);
    for api in apis {
        api.replace_keyring_and_reload(&both).await;
    }
    load.run_for(40).await;

    // 2. Add it to the proxies' keyring, make it active, reload: new requests are k2.
    load.set_phase(phase::SWITCHING_PROXIES);
    let k2_active = keyring_text("k2", "off", &[("k1", false), ("k2", false)]);
    for proxy in &proxies {
        proxy.replace_keyring_and_reload(&k2_active, "k2").await;
        load.run_for(10).await;
    }
    load.set_phase(phase::PROXIES_SIGN_K2);
    let switched_at = Instant::now();
    // k1 is still accepted during the overlap: a k1 signature in flight verifies.
    let (status, body) = status_and_body(&raw_exchange(api_a.addr, &signed_with_k1(&dir)).await);
    assert_eq!(
        status, 200,
        "k1 is still accepted before retirement: {body}"
    );

    // 3. After the signature window plus clock skew, retire k1 everywhere, then remove it.
    let window = Duration::from_secs(WINDOW_SECS + SKEW_SECS + 1);
    while switched_at.elapsed() < window {
        load.run_for(5).await;
    }
    load.set_phase(phase::RETIRING_K1);
    let retired = keyring_text("k2", "off", &[("k1", true), ("k2", false)]);
    for api in apis {
        api.replace_keyring_and_reload(&retired).await;
        load.run_for(10).await;
    }
    for proxy in &proxies {
        proxy.replace_keyring_and_reload(&retired, "k2").await;
        load.run_for(10).await;
    }
    load.set_phase(phase::K1_RETIRED);
    load.run_for(40).await;
    let (status, body) = status_and_body(&raw_exchange(api_a.addr, &signed_with_k1(&dir)).await);
    assert_eq!(status, 401, "a k1 signature after retirement: {body}");
    assert!(body.contains("\"unknown_key\""), "{body}");

    load.set_phase(phase::K1_REMOVED);
    let k2_only = keyring_text("k2", "off", &[("k2", false)]);
    for api in apis {
        api.replace_keyring_and_reload(&k2_only).await;
    }
    for proxy in &proxies {
        proxy.replace_keyring_and_reload(&k2_only, "k2").await;
    }
    load.run_for(40).await;
    let (status, body) = status_and_body(&raw_exchange(api_b.addr, &signed_with_k1(&dir)).await);
    assert_eq!(status, 401, "a k1 signature after removal: {body}");
    assert!(body.contains("\"unknown_key\""), "{body}");

    let outcomes = load.finish().await;
    assert_no_failures(&outcomes, &(0..phase::COUNT).collect::<Vec<_>>());
    // The keyid the APIs see switches from k1 to k2 at step 2, and only there.
    for o in &outcomes {
        let keyid = o.keyid.as_deref().unwrap_or("none");
        if o.phase_done < phase::SWITCHING_PROXIES {
            assert_eq!(keyid, "k1", "before step 2: {o:?}");
        } else if o.phase_sent >= phase::PROXIES_SIGN_K2 {
            assert_eq!(keyid, "k2", "after step 2 on every proxy: {o:?}");
        } else {
            assert!(keyid == "k1" || keyid == "k2", "during step 2: {o:?}");
        }
    }
    // Both methods, through both proxies to both APIs, were exercised.
    for what in [
        "GET /api/whoami",
        "POST /api/echo",
        "GET /b/api/whoami",
        "POST /b/api/echo",
    ] {
        for proxy in &proxies {
            let via = format!("{what} via {}", proxy.addr);
            assert!(outcomes.iter().any(|o| o.what == via), "no {via}");
        }
    }
    // And the proxies counted no answer other than 200 on the API routes.
    assert_only_200s_on_api_routes(&proxies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_with_sighup_fails_no_request() {
    rotate_by_the_runbook(Reload::Signal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_with_reload_check_interval_fails_no_request() {
    rotate_by_the_runbook(Reload::FileChange).await;
}

// ---------------------------------------------------------------------------------------------
// Automatic rotation
// ---------------------------------------------------------------------------------------------

/// `rotation = "1s"` (the shortest period a keyring accepts) on the proxy and the APIs: under
/// load across several epoch boundaries no request fails and the keyid's epoch follows the
/// clock; then the runbook's steps 1 and 2 (k1 to k2) with rotation on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_crosses_epochs_without_a_failure() {
    let dir = temp_dir("rotation-epochs");
    let k1_only = keyring_text("k1", "1s", &[("k1", false)]);
    let [api_a, api_b] = DemoApi::start_pair(&dir, &k1_only);
    let apis = [&api_a, &api_b];
    let proxies = [Proxy::start(
        "rotation-epochs-p1",
        &k1_only,
        &apis,
        Reload::Signal,
        "2",
    )];
    let started = unix_now();
    let load = Load::start(logged_in_targets(&proxies).await);
    // At least three epoch boundaries (four distinct epochs) under load.
    let deadline = Instant::now() + DEADLINE;
    while unix_now() < started + 4 {
        assert!(Instant::now() < deadline);
        load.run_for(5).await;
    }

    // The runbook with rotation on: the APIs first, then the proxy.
    load.set_phase(1);
    let both = keyring_text("k1", "1s", &[("k1", false), ("k2", false)]);
    for api in apis {
        api.replace_keyring_and_reload(&both).await;
    }
    load.run_for(20).await;
    load.set_phase(2);
    let k2_active = keyring_text("k2", "1s", &[("k1", false), ("k2", false)]);
    proxies[0]
        .replace_keyring_and_reload(&k2_active, "k2")
        .await;
    load.set_phase(3);
    let switched = unix_now();
    while unix_now() < switched + 2 {
        load.run_for(5).await;
    }
    let outcomes = load.finish().await;
    // Phase 2 (the proxy's reload) may pass between two answers.
    assert_no_failures(&outcomes, &[0, 1, 3]);

    let mut epochs = std::collections::BTreeSet::new();
    for o in &outcomes {
        let keyid = o.keyid.as_deref().unwrap_or("none");
        let (id, epoch) = keyid.rsplit_once('.').unwrap_or_else(|| panic!("{o:?}"));
        let epoch: u64 = epoch.parse().unwrap_or_else(|_| panic!("{o:?}"));
        // Period 1s: the epoch is the unix second the proxy signed in.
        assert!(
            (o.unix_sent..=o.unix_done).contains(&epoch),
            "epoch outside the request's time: {o:?}"
        );
        match o.phase_sent {
            0 | 1 if o.phase_done < 2 => assert_eq!(id, "k1", "{o:?}"),
            3 => assert_eq!(id, "k2", "{o:?}"),
            _ => assert!(id == "k1" || id == "k2", "{o:?}"),
        }
        epochs.insert(epoch);
    }
    assert!(epochs.len() >= 4, "epochs seen: {epochs:?}");
}

// ---------------------------------------------------------------------------------------------
// Changing the rotation setting
// ---------------------------------------------------------------------------------------------

/// Whether `keyid` is what key `id` under `rotation` (`"off"` or `"<n>s"`) signs for a request
/// sent and answered within the outcome's unix seconds.
fn keyid_of(keyid: &str, id: &str, rotation: &str, o: &Outcome) -> bool {
    let Some(period) = rotation.strip_suffix('s') else {
        return keyid == id;
    };
    let period: u64 = period.parse().expect("a period in whole seconds");
    keyid.rsplit_once('.').is_some_and(|(kid, epoch)| {
        kid == id
            && epoch
                .parse::<u64>()
                .is_ok_and(|epoch| (o.unix_sent / period..=o.unix_done / period).contains(&epoch))
    })
}

/// docs/OPERATIONS.md "Key rotation", changing the rotation setting: under load, with two
/// proxies (one reloaded by SIGHUP, one by `reload_check_interval`) and two APIs, each change
/// is the ordinary runbook with a new key carrying its own `[[keys]] rotation`: static k1 →
/// k2 rotating every 1 s (rotation on) → k3 every 2 s (a new period) → static k4 (rotation
/// off). Not one request fails, the keyid the APIs see changes form exactly when the proxies
/// switch, the old key verifies during the overlap and is refused once retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_rotation_setting_by_the_runbook_fails_no_request() {
    /// Phases of one change `step` (0-based); phase 0 is k1 everywhere before any change.
    const PHASES_PER_STEP: usize = 5;
    let phase_of = |step: usize, offset: usize| 1 + step * PHASES_PER_STEP + offset;
    // offset 0: the APIs accept the new key; 1: switching the proxies; 2: every proxy signs
    // with the new key, waiting the window; 3: retiring and removing the old key; 4: done.
    let keys = [("k1", "off"), ("k2", "1s"), ("k3", "2s"), ("k4", "off")];
    // The keys the proxies may sign with in `phase`, as indexes into `keys`.
    let signing_in = |phase: usize| -> Vec<usize> {
        if phase == 0 {
            return vec![0];
        }
        let (step, offset) = ((phase - 1) / PHASES_PER_STEP, (phase - 1) % PHASES_PER_STEP);
        match offset {
            0 => vec![step],
            1 => vec![step, step + 1],
            _ => vec![step + 1],
        }
    };

    let dir = temp_dir("rotation-setting");
    // k1 inherits the top-level "off": the keyring every deployment has today.
    let k1_only = keyring_with_rotations("k1", &[("k1", false, None)]);
    let [api_a, api_b] = DemoApi::start_pair(&dir, &k1_only);
    let apis = [&api_a, &api_b];
    let proxies = [
        Proxy::start("rotation-setting-p1", &k1_only, &apis, Reload::Signal, "1"),
        Proxy::start(
            "rotation-setting-p2",
            &k1_only,
            &apis,
            Reload::FileChange,
            "2",
        ),
    ];
    let load = Load::start(logged_in_targets(&proxies).await);
    load.run_for(40).await;

    for (step, pair) in keys.windows(2).enumerate() {
        let ((old, old_rotation), (new, new_rotation)) = (pair[0], pair[1]);
        let old_key = (old, false, Some(old_rotation));
        let new_key = (new, false, Some(new_rotation));
        let context = format!("{old} ({old_rotation}) to {new} ({new_rotation})");

        // 1. The APIs accept the new key, beside the old one, each with its own rotation.
        load.set_phase(phase_of(step, 0));
        let both = keyring_with_rotations(old, &[old_key, new_key]);
        for api in apis {
            api.replace_keyring_and_reload(&both).await;
        }
        load.run_for(40).await;

        // 2. The proxies switch `active` to it.
        load.set_phase(phase_of(step, 1));
        let new_active = keyring_with_rotations(new, &[old_key, new_key]);
        for proxy in &proxies {
            proxy.replace_keyring_and_reload(&new_active, new).await;
            load.run_for(10).await;
        }
        load.set_phase(phase_of(step, 2));
        let switched_at = Instant::now();
        let old_signed = signed_by_key(&dir, old, old_rotation);
        let (status, body) = status_and_body(&raw_exchange(api_a.addr, &old_signed).await);
        assert_eq!(
            status, 200,
            "{context}: the old key verifies before retirement: {body}"
        );

        // 3. After the window plus skew, retire the old key everywhere, then remove it.
        let window = Duration::from_secs(WINDOW_SECS + SKEW_SECS + 1);
        while switched_at.elapsed() < window {
            load.run_for(5).await;
        }
        load.set_phase(phase_of(step, 3));
        let retired = keyring_with_rotations(new, &[(old, true, Some(old_rotation)), new_key]);
        let removed = keyring_with_rotations(new, &[new_key]);
        for text in [&retired, &removed] {
            for api in apis {
                api.replace_keyring_and_reload(text).await;
                load.run_for(10).await;
            }
            for proxy in &proxies {
                proxy.replace_keyring_and_reload(text, new).await;
                load.run_for(10).await;
            }
        }
        load.set_phase(phase_of(step, 4));
        load.run_for(40).await;
        let old_signed = signed_by_key(&dir, old, old_rotation);
        let (status, body) = status_and_body(&raw_exchange(api_b.addr, &old_signed).await);
        assert_eq!(status, 401, "{context}: the old key after removal: {body}");
        assert!(body.contains("\"unknown_key\""), "{context}: {body}");
    }

    let outcomes = load.finish().await;
    let last_phase = phase_of(keys.len() - 2, PHASES_PER_STEP - 1);
    assert_no_failures(&outcomes, &(0..=last_phase).collect::<Vec<_>>());
    // Every answer names a keyid of a key the proxies signed with while it was under way, in
    // that key's form: `k1`, `k2.<second>`, `k3.<second / 2>`, `k4`.
    let mut seen = [0usize; 4];
    for o in &outcomes {
        let keyid = o.keyid.as_deref().unwrap_or("none");
        let allowed: Vec<usize> = (o.phase_sent..=o.phase_done).flat_map(signing_in).collect();
        let signer = allowed
            .iter()
            .copied()
            .find(|&i| keyid_of(keyid, keys[i].0, keys[i].1, o));
        let Some(signer) = signer else {
            panic!("keyid {keyid:?} is none of {allowed:?} of {keys:?}: {o:?}");
        };
        seen[signer] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "answers per key: {seen:?}");
    // And the proxies counted no answer other than 200 on the API routes.
    assert_only_200s_on_api_routes(&proxies).await;
}

/// Why the runbook adds a new key instead: changing only the top-level `rotation` of a keyring
/// (one key, no `[[keys]] rotation`) has no overlap, since that key then verifies in the new form
/// only. An API on the new setting refuses the old keyids and one on the old setting the new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_only_the_top_level_rotation_has_no_overlap() {
    let dir = temp_dir("rotation-top-level");
    let file = dir.join("api-keys.toml");
    write(&file, &keyring_text("k1", "off", &[("k1", false)]));
    let api = DemoApi::start(file);
    for (api_rotation, signer_rotation) in [("off", "1s"), ("1s", "off"), ("1s", "2s")] {
        api.replace_keyring_and_reload(&keyring_text("k1", api_rotation, &[("k1", false)]))
            .await;
        let request = signed_by_key(&dir, "k1", signer_rotation);
        let (status, body) = status_and_body(&raw_exchange(api.addr, &request).await);
        assert_eq!(
            (status, body.contains("\"unknown_key\"")),
            (401, true),
            "API rotation {api_rotation}, signer rotation {signer_rotation}: {body}"
        );
        // The same key with the same setting on both sides verifies.
        let request = signed_by_key(&dir, "k1", api_rotation);
        let (status, body) = status_and_body(&raw_exchange(api.addr, &request).await);
        assert_eq!(status, 200, "{body}");
    }
}

/// Step 3 on an API's own keyring, whose `active` step 1 left on the old key: retiring k1
/// there without moving `active` is refused (the API keeps accepting k1, and its error line
/// says what the edit lacks); with `active = "k2"` in the same edit, as the runbook says, k1
/// is refused (401 `unknown_key`), and so after its removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_3_on_an_api_keyring_moves_its_active_key_too() {
    const KEPT: &str = "SIGHUP: keeping the current keyring";
    let dir = temp_dir("rotation-api-active");
    let file = dir.join("api-keys.toml");
    write(&file, &keyring_text("k1", "off", &[("k1", false)]));
    let api = DemoApi::start(file);
    // Step 1: the new key added, `active` left as it is.
    api.replace_keyring_and_reload(&keyring_text("k1", "off", &[("k1", false), ("k2", false)]))
        .await;

    // Step 3 without moving `active`: refused, the current keys kept.
    replace_file(
        &api.keyring,
        &keyring_text("k1", "off", &[("k1", true), ("k2", false)]),
    );
    signal(api.child.id(), "HUP");
    let deadline = Instant::now() + DEADLINE;
    while api.count_in_log(KEPT) == 0 {
        assert!(Instant::now() < deadline, "no reload error: {}", api.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = api.log();
    let line = log.lines().find(|l| l.contains(KEPT)).unwrap();
    assert!(
        line.contains(r#"active key \"k1\" is retired"#)
            && line.contains("point `active` at a key that is not retired in the same edit"),
        "{line}"
    );
    let (status, body) = status_and_body(&raw_exchange(api.addr, &signed_with_k1(&dir)).await);
    assert_eq!(status, 200, "the API kept k1: {body}");

    // Step 3 as the runbook says: `active` moved to the new key in the same edit.
    api.replace_keyring_and_reload(&keyring_text("k2", "off", &[("k1", true), ("k2", false)]))
        .await;
    let (status, body) = status_and_body(&raw_exchange(api.addr, &signed_with_k1(&dir)).await);
    assert_eq!(
        (status, body.contains("\"unknown_key\"")),
        (401, true),
        "{body}"
    );
    api.replace_keyring_and_reload(&keyring_text("k2", "off", &[("k2", false)]))
        .await;
    let request = signed_by_key(&dir, "k2", "off");
    let (status, body) = status_and_body(&raw_exchange(api.addr, &request).await);
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------------------------
// The wrong order
// ---------------------------------------------------------------------------------------------

/// Step 2 before step 1: the proxy signs with k2 while the API knows only k1. Every request
/// is refused by the API with 401 `unknown_key`, which the SPA receives unchanged (the
/// session stays; it is not `unauthenticated`), and the proxy's metrics count 401s on the
/// API's route. Doing step 1 late recovers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_the_proxy_before_the_apis_fails_loudly() {
    let dir = temp_dir("rotation-wrong-order");
    let k1_only = keyring_text("k1", "off", &[("k1", false)]);
    let [api_a, api_b] = DemoApi::start_pair(&dir, &k1_only);
    let apis = [&api_a, &api_b];
    let proxies = [Proxy::start(
        "rotation-wrong-order-p1",
        &k1_only,
        &apis,
        Reload::Signal,
        "1",
    )];
    let load = Load::start(logged_in_targets(&proxies).await);
    load.run_for(20).await;

    load.set_phase(1);
    let k2_active = keyring_text("k2", "off", &[("k1", false), ("k2", false)]);
    proxies[0]
        .replace_keyring_and_reload(&k2_active, "k2")
        .await;
    load.set_phase(2);
    load.run_for(40).await;

    // What the operator sees on the proxy: 401s counted on the API routes, one access line
    // each with the route and the status.
    let metrics = proxies[0].metrics().await;
    for route in ["upstream/api", "upstream/api-b"] {
        let line = format!("countersign_requests_total{{route=\"{route}\",status=\"401\"}}");
        assert!(metrics.contains(&line), "no {line} in {metrics}");
    }
    let log = proxies[0].process.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"status\":401") && l.contains("upstream/api")),
        "{log}"
    );

    // And at the APIs, at the default log level: the refusal, its reason and the keyid it
    // does not know.
    for api in apis {
        let deadline = Instant::now() + DEADLINE;
        while !api.log().lines().any(|l| {
            l.contains("signed request rejected") && l.contains("unknown_key") && l.contains("k2")
        }) {
            assert!(
                Instant::now() < deadline,
                "the API does not log why it refuses: {}",
                api.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Recovery: step 1 late. The APIs learn k2; requests sent afterwards succeed again, with
    // the same session.
    load.set_phase(3);
    let both = keyring_text("k1", "off", &[("k1", false), ("k2", false)]);
    for api in apis {
        api.replace_keyring_and_reload(&both).await;
    }
    load.set_phase(4);
    load.run_for(40).await;
    let outcomes = load.finish().await;

    let (failed, counts) = failures(&outcomes);
    eprintln!("{} requests; {counts}", outcomes.len());
    for o in &outcomes {
        if o.phase_done < 1 || o.phase_sent >= 4 {
            assert_eq!(o.status, Some(200), "{o:?}; {counts}");
        } else if o.phase_sent >= 2 && o.phase_done < 3 {
            // Signed with k2, unknown to the API: refused, and the SPA is told why.
            assert_eq!(o.status, Some(401), "{o:?}; {counts}");
            assert_eq!(o.error.as_deref(), Some("unknown_key"), "{o:?}");
        } else {
            assert!(
                matches!(o.status, Some(200 | 401)),
                "during a reload: {o:?}"
            );
        }
    }
    assert!(!failed.is_empty());
    // Paced: every refusal above was an `unknown_key`, but the warning is a line per 10 s at
    // most (anyone can send a made-up keyid), not one per request.
    let refused = outcomes
        .iter()
        .filter(|o| o.error.as_deref() == Some("unknown_key"))
        .count();
    assert!(
        refused > apis.len() * 3,
        "too few refusals to tell: {counts}"
    );
    for api in apis {
        let warnings = api
            .log()
            .lines()
            .filter(|l| l.contains("does not accept this keyid"))
            .count();
        assert!(
            (1..=2).contains(&warnings),
            "{warnings} warnings for {refused} refusals: {}",
            api.log()
        );
    }
}

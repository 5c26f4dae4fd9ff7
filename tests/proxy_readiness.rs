//! `/readyz` with several upstreams: `upstream[].required_for_ready` decides which of them the
//! proxy's readiness depends on. An upstream that is not required and goes down leaves the
//! proxy ready (its own routes fail, login, the SPA and the other APIs keep being served) and
//! is still visible, in the `/readyz` body and as `countersign_upstream_up`; a required one
//! (the default) takes readiness with it; either coming back is seen at the next check. Real
//! `countersign run` processes and hyper upstreams on loopback.
//! Run: `cargo test --all-features --test proxy_readiness`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use support_run::*;

/// An upstream answering every request 200 on `addr` until it is stopped; stopping closes its
/// listener, so connections to `addr` are refused (what a crashed API looks like).
///
/// Its port is held from start to end by a second socket bound to it that never listens
/// (`hold`), so a stopped API restarts on the same port. Left free even for an instant, the
/// port could be taken: by another test's listener, or by an outgoing connection's ephemeral
/// port (one to the port itself on loopback then connects to itself). Both happened: the check
/// in [`Api::stop`] failed once that way, and later binding the holder right after closing the
/// listener failed with "Address already in use". Both sockets set `SO_REUSEPORT`, which is
/// what lets them share the port while one listens; connections go to the listening one only.
struct Api {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    hold: tokio::net::TcpSocket,
}

/// The listening socket of an [`Api`]: `SO_REUSEPORT`, to share its port with the holder, and
/// `SO_REUSEADDR`, as a listener has, to bind again while connections it served linger in
/// TIME_WAIT on the port.
fn listening_socket() -> tokio::net::TcpSocket {
    let socket = holding_socket();
    socket.set_reuseaddr(true).unwrap();
    socket
}

/// The holder of an [`Api`]'s port: `SO_REUSEPORT` only. Without `SO_REUSEADDR` on it, no
/// socket that lacks `SO_REUSEPORT` can bind the port while the API is stopped (a test's
/// listener, or the proxy's own check that its address is free); with it, the kernel lets any
/// `SO_REUSEADDR` socket bind next to a socket that does not listen.
fn holding_socket() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket
}

impl Api {
    /// Serves on a free loopback port.
    fn start() -> Api {
        let socket = listening_socket();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let hold = holding_socket();
        hold.bind(addr).unwrap();
        Api::serve(socket, hold)
    }

    /// Listens on `socket` (bound to `hold`'s port) and answers until stopped.
    fn serve(socket: tokio::net::TcpSocket, hold: tokio::net::TcpSocket) -> Api {
        let addr = socket.local_addr().unwrap();
        let listener = socket.listen(1024).unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Api { addr, task, hold }
    }

    /// Closes the listener; the port stays held ([`Stopped`]) until [`Api::restart`].
    async fn stop(self) -> Stopped {
        self.task.abort();
        let _ = self.task.await;
        // The listener is gone with the task: connections are refused, as to a crashed API.
        // (Within a moment: see `refused_within`.)
        assert!(
            refused_within(self.addr, Duration::from_secs(5)).await,
            "{} still accepts connections after its listener was closed",
            self.addr
        );
        Stopped {
            addr: self.addr,
            hold: self.hold,
        }
    }

    /// Serves again on the port `stopped` held.
    fn restart(stopped: Stopped) -> Api {
        let socket = listening_socket();
        socket.bind(stopped.addr).unwrap();
        Api::serve(socket, stopped.hold)
    }
}

/// A stopped [`Api`]'s address, its port held (bound, not listening) until it restarts.
struct Stopped {
    addr: SocketAddr,
    hold: tokio::net::TcpSocket,
}

/// Two upstreams: `api` (no `required_for_ready`: the default) and `reports` with
/// `required_for_ready = reports_required`.
fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    api: SocketAddr,
    reports: SocketAddr,
    reports_required: bool,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
public_origin = "{ORIGIN}"
shutdown_grace = "1s"

[admin]
listen = "{admin}"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://{api}"
auth = "none"

[[upstream]]
name = "reports"
prefix = "/reports/"
url = "http://{reports}"
auth = "none"
required_for_ready = {reports_required}
"#
    )
}

struct Proxy {
    process: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Its config directory, removed after the process is killed (fields drop in order).
    _dir: TestDir,
}

fn start_proxy(tag: &str, api: SocketAddr, reports: SocketAddr, reports_required: bool) -> Proxy {
    start_proxy_with(tag, api, reports, reports_required, "")
}

/// [`start_proxy`] with `admin_lines` added to `[admin]`.
fn start_proxy_with(
    tag: &str,
    api: SocketAddr,
    reports: SocketAddr,
    reports_required: bool,
    admin_lines: &str,
) -> Proxy {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let (mut process, addr, admin) = start_on_free_ports(|listen, admin| {
        let config = dir.join("proxy.toml");
        let listen_line = format!("listen = \"{admin}\"\n");
        let text = config_text(listen, admin, api, reports, reports_required).replacen(
            &listen_line,
            &format!("{listen_line}{admin_lines}\n"),
            1,
        );
        std::fs::write(&config, text).unwrap();
        RunningProxy::spawn(&config, &[])
    });
    process.wait_listening(admin);
    Proxy {
        process,
        addr,
        admin,
        _dir: dir,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, Method::GET, path, &[], Bytes::new()).await
}

/// One `/readyz`, which must answer 503, and how long it took.
async fn timed_not_ready(admin: SocketAddr) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = get(admin, "/readyz").await;
    let spent = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    (reply, spent)
}

/// `/readyz` until its status is `status` (answers are reused for 2 s), at most 10 s; the
/// last answer.
async fn readyz_until(admin: SocketAddr, status: StatusCode) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(admin, "/readyz").await;
        if reply.status == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} ({}), wanted {status}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/metrics` until it holds `line`, at most 10 s.
async fn metrics_until(admin: SocketAddr, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(admin, "/metrics").await.text();
        if text.contains(line) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {line:?} in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz`'s body and `/metrics` say the same about each upstream.
fn assert_states(body: &serde_json::Value, metrics: &str, api_up: bool, reports_up: bool) {
    assert_eq!(body["session_store"], true, "{body}");
    assert_eq!(body["upstreams"]["api"]["up"], api_up, "{body}");
    assert_eq!(body["upstreams"]["api"]["required"], true, "{body}");
    assert_eq!(body["upstreams"]["reports"]["up"], reports_up, "{body}");
    for (name, up) in [("api", api_up), ("reports", reports_up)] {
        let line = format!(
            "\ncountersign_upstream_up{{upstream=\"{name}\"}} {}\n",
            u8::from(up)
        );
        assert!(metrics.contains(&line), "{line:?} missing in\n{metrics}");
    }
}

/// `reports` is not required: while it is down the proxy stays ready and `/api/` is served;
/// its outage shows in the `/readyz` body, in `countersign_upstream_up` and in a warning line;
/// when it is back both say so. `api` (required by default) down makes the proxy not ready,
/// back up ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_not_required_for_ready_is_reported_without_failing_readyz() {
    let api = Api::start();
    let reports = Api::start();
    let reports_down = reports.stop().await;
    let proxy = start_proxy("ready-optional", api.addr, reports_down.addr, false);
    let admin = proxy.admin;

    let ready = readyz_until(admin, StatusCode::OK).await;
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"reports\"} 0").await;
    assert_states(&ready.json(), &metrics, true, false);
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(ready.json()["upstreams"]["reports"]["required"], false);
    proxy
        .process
        .wait_for_log("readiness: upstream not reachable");
    // The other API is served; the one that is down answers 502 on its own routes only.
    assert_eq!(get(proxy.addr, "/api/x").await.status, StatusCode::OK);
    assert_eq!(
        get(proxy.addr, "/reports/x").await.status,
        StatusCode::BAD_GATEWAY
    );

    // Back up: seen at the next check.
    let reports = Api::restart(reports_down);
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"reports\"} 1").await;
    let ready = readyz_until(admin, StatusCode::OK).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = ready.json();
    while body["upstreams"]["reports"]["up"] != true {
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = get(admin, "/readyz").await.json();
    }
    assert_states(&body, &metrics, true, true);
    assert_eq!(get(proxy.addr, "/reports/x").await.status, StatusCode::OK);

    // The required one (no key: the default) down: not ready, and said why.
    let api_down = api.stop().await;
    let not_ready = readyz_until(admin, StatusCode::SERVICE_UNAVAILABLE).await;
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"api\"} 0").await;
    assert_eq!(not_ready.json()["ready"], false);
    assert_states(&not_ready.json(), &metrics, false, true);
    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);

    // Back: ready again.
    let _api = Api::restart(api_down);
    let ready = readyz_until(admin, StatusCode::OK).await;
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"api\"} 1").await;
    assert_states(&ready.json(), &metrics, true, true);
    drop(reports);
}

/// The same outage with `required_for_ready = true` on `reports`: not ready while it is down,
/// ready once it is back; the other upstream's state stays visible meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_upstream_down_makes_the_proxy_not_ready() {
    let api = Api::start();
    let reports = Api::start();
    let reports_down = reports.stop().await;
    let proxy = start_proxy("ready-required", api.addr, reports_down.addr, true);
    let admin = proxy.admin;

    let not_ready = readyz_until(admin, StatusCode::SERVICE_UNAVAILABLE).await;
    let body = not_ready.json();
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["upstreams"]["reports"]["required"], true, "{body}");
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"reports\"} 0").await;
    assert_states(&body, &metrics, true, false);

    let _reports = Api::restart(reports_down);
    let ready = readyz_until(admin, StatusCode::OK).await;
    let metrics = metrics_until(admin, "countersign_upstream_up{upstream=\"reports\"} 1").await;
    assert_states(&ready.json(), &metrics, true, true);
    drop(api);
}

/// A loopback address whose connects neither succeed nor fail: a listener with a backlog of 0
/// that never accepts, its queue filled by the returned connections, so the kernel drops
/// further SYNs (as a firewall that drops packets would). Keep both alive while in use.
async fn hanging_addr() -> (
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
    SocketAddr,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => panic!("connect to the full listener failed: {e}"),
            Err(_) => return (listener, held, addr),
        }
    }
    panic!("the listener's queue never filled: connects to {addr} do not hang here");
}

/// Probes run at once: with three upstreams whose connects hang (each probe running into its
/// 1 s limit), a check takes about 1 s, not 3, so it fits a probe timeout of 2 s such as
/// deploy/k8s's. A loaded machine can only make a check slower: up to three checks (answers
/// reused for 100 ms only, so each is a new one), one under 2.8 s passes; probes in turn take
/// 3 s or more every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_probes_run_concurrently() {
    let (_listener, _held, hanging) = hanging_addr().await;
    let dir = temp_dir("ready-concurrent");
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let (mut process, _addr, admin) = start_on_free_ports(|listen, admin| {
        let listen_line = format!("listen = \"{admin}\"\n");
        let mut text = config_text(listen, admin, hanging, hanging, false).replacen(
            &listen_line,
            &format!("{listen_line}readiness_cache = \"100ms\"\n"),
            1,
        );
        text.push_str(&format!(
            "\n[[upstream]]\nname = \"third\"\nprefix = \"/third/\"\nurl = \"http://{hanging}\"\n"
        ));
        let config = dir.join("proxy.toml");
        std::fs::write(&config, text).unwrap();
        RunningProxy::spawn(&config, &[])
    });
    process.wait_listening(admin);
    let mut took = Vec::new();
    loop {
        let (reply, spent) = timed_not_ready(admin).await;
        took.push(spent);
        // Each probe ran into its limit (the connects hang)...
        assert!(
            spent >= Duration::from_millis(900),
            "three hanging probes took {took:?}"
        );
        let body = reply.json();
        for name in ["api", "reports", "third"] {
            assert_eq!(body["upstreams"][name]["up"], false, "{body}");
        }
        // ...all three at once.
        if spent < Duration::from_millis(2800) {
            break;
        }
        assert!(took.len() < 3, "three hanging probes took {took:?}");
        // Past the 100 ms the answer is reused.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `admin.readiness_probe_timeout` bounds each probe: two upstreams whose connects hang make a
/// check wait that long (1500 ms here), not the default 1 s. (A limit above the default: a
/// loaded machine can only make a check slower, never pass one that ended early.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_timeout_bounds_each_probe() {
    let (_listener, _held, hanging) = hanging_addr().await;
    let proxy = start_proxy_with(
        "ready-probe-timeout",
        hanging,
        hanging,
        true,
        "readiness_probe_timeout = \"1500ms\"",
    );
    let (_, spent) = timed_not_ready(proxy.admin).await;
    assert!(
        spent >= Duration::from_millis(1450) && spent < Duration::from_secs(5),
        "hanging probes with a 1500 ms limit took {spent:?}"
    );
}

/// A fresh `/readyz` answer (not ready: the API is down), then the API back up: the API and
/// when it came back.
async fn fresh_answer_then_back(admin: SocketAddr, api_down: Stopped) -> (Api, Instant) {
    readyz_until(admin, StatusCode::SERVICE_UNAVAILABLE).await;
    let _ = get(admin, "/readyz").await;
    let api = Api::restart(api_down);
    (api, Instant::now())
}

/// `admin.readiness_cache` is how long an answer is reused: an upstream back up is seen within
/// a few hundred ms with `"100ms"` (the 2 s default would take about 2 s: the answer before it
/// is fresh), and is still reported down 3 s later (past the default) with `"10s"`. A loaded
/// machine can only make the first slower: up to three tries, one under 1.7 s passes (with
/// the default, every try takes about 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_cache_sets_how_long_an_answer_is_reused() {
    for (cache, seen_within) in [("100ms", Some(Duration::from_millis(1700))), ("10s", None)] {
        let api = Api::start();
        let mut api_down = api.stop().await;
        let reports = Api::start();
        let proxy = start_proxy_with(
            "ready-cache",
            api_down.addr,
            reports.addr,
            true,
            &format!("readiness_cache = \"{cache}\""),
        );
        match seen_within {
            Some(limit) => {
                let mut took = Vec::new();
                loop {
                    let (api, back) = fresh_answer_then_back(proxy.admin, api_down).await;
                    readyz_until(proxy.admin, StatusCode::OK).await;
                    let spent = back.elapsed();
                    took.push(spent);
                    if spent < limit {
                        break;
                    }
                    assert!(
                        took.len() < 3,
                        "readiness_cache = {cache}: the API back up was seen after {took:?}"
                    );
                    api_down = api.stop().await;
                }
            }
            None => {
                let (_api, _) = fresh_answer_then_back(proxy.admin, api_down).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                let reply = get(proxy.admin, "/readyz").await;
                assert_eq!(
                    reply.status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "readiness_cache = {cache}: a new check within it ({})",
                    reply.text()
                );
            }
        }
        drop(reports);
    }
}

/// A `required_for_ready` that is not a boolean is refused by `check-config`, naming the key.
#[test]
fn required_for_ready_must_be_a_boolean() {
    let dir = temp_dir("ready-config");
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let text = config_text(addr, "127.0.0.1:10".parse().unwrap(), addr, addr, false)
        .replace("required_for_ready = false", "required_for_ready = \"no\"");
    let config = dir.join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("upstream[1].required_for_ready"),
        "{stderr}"
    );
}

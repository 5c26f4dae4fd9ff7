//! Starting from a config file, reloading keys and users (directly and by a real SIGHUP to the
//! binary), and graceful shutdown. Run: `cargo test --all-features --test proxy_lifecycle`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use http::{Method, StatusCode};
use support::*;
use support_run::{start_on_free_ports, RunningProxy};

fn config_text(listen: &str, admin: &str, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
public_origin = "http://app.test"
shutdown_grace = "5s"

[admin]
listen = "{admin}"

[session]
store = "memory"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "{upstream}"
"#
    )
}

/// A config directory: proxy.toml, keys.toml (k1 active), users.toml (alice).
fn config_dir(listen: &str, admin: &str, upstream: &str) -> TestDir {
    let dir = temp_dir("lifecycle");
    write(
        &dir.join("proxy.toml"),
        &config_text(listen, admin, upstream),
    );
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    dir
}

async fn start_from_config(dir: &Path, clock: SharedClock) -> ProxyServer {
    let config = ProxyConfig::load(&dir.join("proxy.toml")).expect("config loads");
    let settings = ProxySettings::from_config(&config).unwrap();
    let deps = ProxyDeps::from_config(&config, clock).unwrap();
    ProxyServer::start(settings, deps).await.unwrap()
}

#[tokio::test]
async fn reload_switches_the_active_key_and_keeps_sessions() {
    let clock = ManualClock::new(T0);
    let shared: SharedClock = Arc::new(clock.clone());
    let upstream = start_upstream(both_keys_keyring(), shared.clone()).await;
    let dir = config_dir("127.0.0.1:0", "127.0.0.1:0", &upstream.url());
    let proxy = start_from_config(&dir, shared).await;
    let login = login_alice_at(proxy.local_addr()).await;

    assert_eq!(
        get(proxy.local_addr(), "/api/x", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.last_verified().identity.keyid, "k1");

    write(&dir.join("keys.toml"), &keyring_file_text("k2"));
    let what = proxy.state().reload().await.expect("reload");
    assert!(what.contains("k2"), "{what}");
    // Same session, same connection pool: the next request is signed with k2.
    assert_eq!(
        get(proxy.local_addr(), "/api/x", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.last_verified().identity.keyid, "k2");

    // A broken keyring on reload is refused and the current key stays.
    write(&dir.join("keys.toml"), "active = \"k9\"\n");
    let error = proxy
        .state()
        .reload()
        .await
        .expect_err("bad keyring refused");
    assert!(error.contains("keys.toml"), "{error}");
    assert_eq!(
        get(proxy.local_addr(), "/api/x", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.last_verified().identity.keyid, "k2");

    // A broken users file is refused (the old users stay), while the valid keyring next to
    // it is loaded: each file is reloaded on its own.
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), "[[users]]\nname = \"alice\"\n");
    let error = proxy
        .state()
        .reload()
        .await
        .expect_err("bad users file refused");
    assert!(error.contains("users.toml"), "{error}");
    assert_eq!(
        get(proxy.local_addr(), "/api/x", &login).await.status,
        StatusCode::OK
    );
    assert_eq!(
        upstream.last_verified().identity.keyid,
        "k1",
        "the valid keyring is loaded although the users file is broken"
    );
    login_alice_at(proxy.local_addr()).await;

    // Users are reloaded: a new users file without alice ends her logins and, as SIGHUP does,
    // her sessions (both of them). `reload` once ended none: her cookie kept working.
    write(
        &dir.join("users.toml"),
        &format!(
            "[[users]]\nname = \"carol\"\npassword = \"{}\"\n",
            cheap_hash("carol-pw")
        ),
    );
    let what = proxy.state().reload().await.expect("reload");
    assert!(
        what.contains("ended 2 session(s) of 1 removed or changed user(s)"),
        "{what}"
    );
    let refused = send(
        proxy.local_addr(),
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(proxy.local_addr(), "/auth/session", &login)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(proxy.local_addr(), "/api/x", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_in_flight_request() {
    // A grace period far longer than the request, so only the request's end can end the wait.
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.shutdown_grace = Duration::from_secs(30)),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let addr = h.addr;
    let cookie = login.cookie.clone();
    // Long enough to still be in flight while the test sees the listener close (polled below),
    // also on a loaded machine.
    let in_flight = tokio::spawn(async move {
        send(
            addr,
            Method::GET,
            "/api/slow?ms=3000",
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await
    });
    // Let the request reach the upstream, then stop the proxy.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.upstream.raw_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut h = h;
    let proxy = h.proxy.take().unwrap();
    let stopping = tokio::spawn(proxy.shutdown());
    // No new connections once shutdown began: the listener closes while the request is still
    // in flight (polled: the shutdown task runs when the runtime gets to it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still accepting 10 s after shutdown started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the request ended before the listener closed"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "slow done");
    // Well before the 30 s grace period: the shutdown ends with the last request.
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown completes after the last request")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_period_bounds_the_wait() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.shutdown_grace = Duration::from_millis(300)),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let addr = h.addr;
    let cookie = login.cookie.clone();
    // Far longer than the grace period and the bound below: only the grace period can end the
    // shutdown in time.
    let _in_flight = tokio::spawn(async move {
        send(
            addr,
            Method::GET,
            "/api/slow?ms=60000",
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.upstream.raw_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut h = h;
    let started = Instant::now();
    h.proxy.take().unwrap().shutdown().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_the_binary_switches_the_key_and_sigterm_stops_it() {
    use countersign::clock::SystemClock;
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    // `countersign run --config <dir>/proxy.toml --log-format json`, on free ports.
    let dir = config_dir("127.0.0.1:0", "127.0.0.1:0", &upstream.url());
    let (mut child, addr, _admin) = start_on_free_ports(|addr, admin| {
        write(
            &dir.join("proxy.toml"),
            &config_text(&addr.to_string(), &admin.to_string(), &upstream.url()),
        );
        RunningProxy::spawn(&dir.join("proxy.toml"), &[])
    });
    child.wait_listening(addr);
    let login = login_alice_at(addr).await;
    assert_eq!(get(addr, "/api/x", &login).await.status, StatusCode::OK);
    assert_eq!(upstream.last_verified().identity.keyid, "k1");

    write(&dir.join("keys.toml"), &keyring_file_text("k2"));
    child.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(
            get(addr, "/api/x", &login).await.status,
            StatusCode::OK,
            "session survives SIGHUP"
        );
        if upstream.last_verified().identity.keyid == "k2" {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not switch the key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Paths and queries can carry tokens: they stay out of the log.
    assert_eq!(
        get(
            addr,
            "/api/reset/path-token-123?code=query-token-456",
            &login
        )
        .await
        .status,
        StatusCode::OK
    );
    // SIGTERM, then the exit (within 10 s) and the whole log (read to its end once it exited).
    let status = child.stop();
    assert!(status.success(), "{status:?}");
    let log = child.log();
    assert!(log.contains("SIGHUP"), "{log}");
    // The JSON access log has one line per request and never the cookie or the password.
    let session_id = login.cookie.split_once('=').unwrap().1;
    assert!(!log.contains(session_id), "session id in the log");
    assert!(!log.contains(ALICE_PASSWORD), "password in the log");
    assert!(!log.contains(&login.csrf), "CSRF token in the log");
    assert!(
        !log.contains("path-token-123") && !log.contains("query-token-456"),
        "{log}"
    );
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "countersign::access")
        .collect();
    assert!(access.len() >= 3, "{log}");
    let line = access
        .iter()
        .find(|v| v["route"] == "upstream/api")
        .expect("an upstream line");
    assert_eq!(line["user"], "alice");
    assert_eq!(line["status"], 200);
    assert!(line["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(line["latency_ms"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_event_loops_share_sessions_metrics_and_reload() {
    let clock = ManualClock::new(T0);
    let shared: SharedClock = Arc::new(clock.clone());
    let upstream = start_upstream(both_keys_keyring(), shared.clone()).await;
    let dir = config_dir("127.0.0.1:0", "127.0.0.1:0", &upstream.url());
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    let deps = ProxyDeps::from_config(&config, shared).unwrap();
    let proxy = ProxyServer::start_per_core(settings, deps, 3)
        .await
        .unwrap();
    let addr = proxy.local_addr();
    let login = login_alice_at(addr).await;
    // Fresh connections are spread over the three listeners by the kernel; every one of them
    // knows the session (one store) and counts into one set of metrics.
    for _ in 0..30 {
        assert_eq!(get(addr, "/api/x", &login).await.status, StatusCode::OK);
    }
    let metrics = proxy.state().metrics().render(None, &[]);
    assert!(
        metrics.contains("countersign_requests_total{route=\"upstream/api\",status=\"200\"} 30"),
        "{metrics}"
    );
    // A reload through the first loop's state switches the key for all of them.
    write(&dir.join("keys.toml"), &keyring_file_text("k2"));
    proxy.state().reload().await.unwrap();
    for _ in 0..10 {
        assert_eq!(get(addr, "/api/x", &login).await.status, StatusCode::OK);
        assert_eq!(upstream.last_verified().identity.keyid, "k2");
    }
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("every event loop stops");
    assert!(
        refused_within(addr, Duration::from_secs(5)).await,
        "the listeners are closed"
    );
}

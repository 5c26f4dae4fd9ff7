//! A fleet on one real `redis-server`: separate `countersign run` processes (proxies) sharing
//! sessions and login throttling, and API instances (hyper on loopback behind the real
//! `VerifyLayer`) sharing the replay cache. Redis is stopped and restarted mid-run.
//!
//! Each test starts its own Redis on a free port, writes the proxies' config, keyring and users
//! files into a temporary directory, and kills every process it started when it ends.
#![cfg(feature = "proxy")]

mod support;
mod support_fleet;
mod support_redis;
mod support_run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::replay::RedisConnection;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support_fleet::{
    error_code, keyring, login, login_ok, must, send, start_api, Answer, Browser, Captured,
    FleetFiles, ProxyProcess, ALICE_PASSWORD, ORIGIN,
};
use support_redis::RedisServer;

// ---------------------------------------------------------------------------------------------
// The fleet on one Redis
// ---------------------------------------------------------------------------------------------

/// The proxies' `[session]` lines: sessions and the login throttle on `redis_url`. Redis
/// deadlines longer than the defaults (500 ms a call, 2 s to connect), beyond any stall of a
/// loaded machine: no Redis here is slow, only stopped or refusing, and a refusal must not
/// wait for them ([`CONNECT_DEADLINE`]).
fn redis_session(redis_url: &str) -> String {
    format!(
        "redis_url = \"{redis_url}\"\nredis_key_prefix = \"fleet:\"\n\
         idle_timeout = \"30m\"\nabsolute_timeout = \"12h\"\n\
         redis_timeout = \"5s\"\nredis_connect_timeout = \"{}s\"",
        CONNECT_DEADLINE.as_secs()
    )
}

/// The API instances' connection to `redis_url` (deadlines no stall of a loaded machine
/// reaches: its calls fail only while Redis is stopped).
fn api_connection(redis_url: &str) -> RedisConnection {
    RedisConnection::with_options(redis_url, support_redis::patient_options()).unwrap()
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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy_a =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api.addr)).await;
    let proxy_b =
        ProxyProcess::start(&files.proxy_config("b", &redis_session(&redis.url()), api.addr)).await;

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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy_a =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api.addr)).await;
    let proxy_b =
        ProxyProcess::start(&files.proxy_config("b", &redis_session(&redis.url()), api.addr)).await;

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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy_a =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api.addr)).await;
    let proxy_b =
        ProxyProcess::start(&files.proxy_config("b", &redis_session(&redis.url()), api.addr)).await;

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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy_a =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api.addr)).await;
    let proxy_b =
        ProxyProcess::start(&files.proxy_config("b", &redis_session(&redis.url()), api.addr)).await;
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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api.addr)).await;
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
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let config = files.proxy_config("a", &redis_session(&redis.url()), api.addr);
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
    let api_one = start_api(api_connection(&redis.url())).await;
    let api_two = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy =
        ProxyProcess::start(&files.proxy_config("a", &redis_session(&redis.url()), api_one.addr))
            .await;
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
    let signed_direct = || {
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
        Captured {
            method: parts.method.clone(),
            uri: "/api/direct".into(),
            headers,
            body: Bytes::new(),
        }
    };
    let direct = signed_direct();
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
    // API one still holds its connection to the Redis that stopped: its next call finds it
    // dead and is tried again on a new one, and a nonce that retry finds recorded is 503, not
    // `replayed` (the lost try may have been this request's own: docs/DEPLOYMENT.md). So it
    // reconnects on a request of its own first; then the copy is `replayed` there too.
    let own = signed_direct();
    let (status, _, body) = replay_to(api_one.addr, &own).await;
    assert_eq!(status, StatusCode::OK, "{body}");
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

/// The proxies' Redis connect deadline (`redis_connect_timeout` of [`redis_session`]; 2 s by
/// default). An answer that waited for it takes at least this long.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Bound for an answer "at once" (a refusal, not a wait for [`CONNECT_DEADLINE`]): half of it,
/// the rest slack for a loaded machine.
const AT_ONCE: Duration = Duration::from_secs(5);

/// Three logins in a row on a proxy whose Redis refuses it: each answers 503
/// `session_store_unavailable` without waiting for the connect deadline (within [`AT_ONCE`]).
async fn three_logins_unavailable_at_once(proxy: &ProxyProcess) {
    for attempt in 0..3 {
        let started = Instant::now();
        let (status, _, body) = login(proxy, "alice", ALICE_PASSWORD).await;
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(error_code(&body), "session_store_unavailable");
        assert!(
            elapsed < AT_ONCE,
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
    // redis_connect_timeout = CONNECT_DEADLINE (10 s) is in force.
    let url = format!("redis://countersign:WRONGPW@127.0.0.1:{port}/0");
    let (_no_upstream, upstream) = closed_addr();
    let mut proxy =
        ProxyProcess::start(&files.proxy_config("wrongpw", &redis_session(&url), upstream)).await;
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
    let mut proxy =
        ProxyProcess::start(&files.proxy_config("closed", &redis_session(&url), upstream)).await;
    three_logins_unavailable_at_once(&proxy).await;
    // The whole log: its lines are written after the answers, by a thread of the proxy's own.
    let logs = proxy.stop_and_logs().await;
    assert!(logs.contains("Connection refused"), "{logs}");
    assert!(!logs.contains("timed out"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_the_store_is_down_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let api = start_api(api_connection(&redis.url())).await;
    let files = FleetFiles::new();
    let proxy =
        ProxyProcess::start(&files.proxy_config("m", &redis_session(&redis.url()), api.addr)).await;
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
            started.elapsed() < AT_ONCE,
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

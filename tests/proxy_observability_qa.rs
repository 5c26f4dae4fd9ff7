//! What an operator reads under hostile input, beyond `proxy_observability.rs`,
//! `proxy_logs.rs` and `secret_leaks.rs`: the proxy's own refusals counted by their reason code
//! in `/metrics` (a valid scrape to the independent parsers of `support_metrics`), an
//! attacker's request method bounded in the access line (human and JSON formats), what a
//! failed login logs of the name typed (a password typed into the name field must not reach
//! the log), the request id on `verify_url`'s credential check, `Signature` values and a
//! client's credentials in no log line at `RUST_LOG=trace`, no scrape and no answer, and an
//! access line and a count for a request its HTTP/2 client abandoned. Real
//! clients on loopback, against the in-process proxy or the `countersign` binary.
//! Run: `cargo test --all-features --test proxy_observability_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_metrics;
mod support_run;

use std::sync::Arc;

use bytes::Bytes;
use countersign::clock::SystemClock;
use http::{Method, StatusCode};
use support::*;
use support_metrics::check_with_independent_parsers;
use support_run::*;

/// Every code an answer's `{"error":…}` can carry (docs/OPERATIONS.md, "Metrics").
const REASONS: [&str; 23] = [
    "unauthenticated",
    "ambiguous_session_cookie",
    "invalid_credentials",
    "too_many_attempts",
    "csrf",
    "body_too_large",
    "bad_gateway",
    "gateway_timeout",
    "session_store_unavailable",
    "not_found",
    "method_not_allowed",
    "unsupported_media_type",
    "bad_request",
    "request_timeout",
    "websocket_unsupported",
    "websocket_limit",
    "websocket_version",
    "websocket_user_limit",
    "precondition_failed",
    "range_not_satisfiable",
    "internal_error",
    "body_memory_limit",
    "client_body_memory_limit",
];

/// The value of `countersign_refusals_total{reason="…"}` in a scrape.
fn refusals(scrape: &str, reason: &str) -> u64 {
    let prefix = format!("countersign_refusals_total{{reason=\"{reason}\"}} ");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no refusals series for {reason}:\n{scrape}"))
}

/// The proxy's own refusals are counted under the code their answer carries, every code
/// present from the first scrape (0), upstream answers not at all; the scrape stays valid
/// Prometheus text to two independent parsers. Before, a 403 `csrf` and an upstream's 403
/// were one series (`countersign_requests_total{status="403"}`): an operator could not alert
/// on CSRF refusals, nor tell them from the API's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_under_their_reason_code() {
    let h = Harness::start().await;
    let fresh = send(h.admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    for reason in REASONS {
        assert_eq!(refusals(&fresh, reason), 0, "{reason}");
    }
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let none = Login {
        cookie: String::new(),
        csrf: String::new(),
    };
    let mut sent: Vec<(&str, StatusCode)> = Vec::new();
    // Upstream answers (200 here) are not refusals, whatever their status.
    for _ in 0..3 {
        assert_eq!(get(h.addr, "/api/ok", &alice).await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let r = get(h.addr, "/api/x", &none).await;
        sent.push(("unauthenticated", r.status));
    }
    let r = send(
        h.addr,
        Method::POST,
        "/api/x",
        &[("cookie", &alice.cookie)],
        "{}",
    )
    .await;
    sent.push(("csrf", r.status));
    let r = h.login_raw("alice", "wrong").await;
    sent.push(("invalid_credentials", r.status));
    let r = send(h.addr, Method::GET, "/nothing/here", &[], Bytes::new()).await;
    sent.push(("not_found", r.status));
    let r = send(h.addr, Method::GET, "/auth/login", &[], Bytes::new()).await;
    sent.push(("method_not_allowed", r.status));
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "text/plain"), ("origin", ORIGIN)],
        "x",
    )
    .await;
    sent.push(("unsupported_media_type", r.status));
    let r = get(h.addr, "/api/%2e%2e/x", &alice).await;
    sent.push(("bad_request", r.status));
    for (reason, status) in &sent {
        assert!(status.is_client_error(), "{reason}: {status}");
    }
    let scrape = send(h.admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    for reason in REASONS {
        let expected = sent.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(refusals(&scrape, reason), expected, "{reason}:\n{scrape}");
    }
    assert!(
        scrape.contains("# TYPE countersign_refusals_total counter\n"),
        "{scrape}"
    );
    check_with_independent_parsers(&[("fresh", &fresh)], &[], 100);
    check_with_independent_parsers(
        &[("refused", &scrape)],
        &["auth/login", "unmatched", "upstream/api"],
        200,
    );
}

/// The access line of a request sent with `method` (a fresh connection), found by the
/// request id the client got back, after the proxy stopped (its log flushed).
async fn access_line_of_method(log_format: &str, method: &Method) -> (String, String) {
    let (mut proxy, addr) = start_logging(
        &format!("long-method-{log_format}"),
        log_format,
        "http://127.0.0.1:9",
    );
    let reply = send(addr, method.clone(), "/nothing/here", &[], Bytes::new()).await;
    assert!(reply.status.is_client_error(), "{}", reply.status);
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    proxy.stop();
    let log = proxy.log();
    let line = log
        .lines()
        .find(|line| line.contains(&id) && line.contains("countersign::access"))
        .unwrap_or_else(|| panic!("no access line for {id}: {log}"))
        .to_owned();
    (line, log)
}

/// An extension method is any token as long as the request head (16 KiB by default): written
/// whole, one request made a 16 KiB access line (past Docker's and journald's line limits,
/// which split it, the method's tail starting a line of its own) and a flood of them a log
/// 100 times the normal size. The access line keeps the method's first 32 bytes and its
/// length, in both formats; registered methods are written whole (`proxy_observability.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_methods_are_cut_in_the_access_line() {
    let method = Method::from_bytes("X".repeat(12_000).as_bytes()).unwrap();
    let logged = format!("{}...[12000]", "X".repeat(32));
    let (line, log) = access_line_of_method("json", &method).await;
    let object: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(object["method"], logged.as_str(), "{line}");
    assert!(line.len() < 512, "{} bytes: {line}", line.len());
    assert!(
        log.lines().all(|l| l.len() < 1024),
        "a long line in the log: {log}"
    );
    let (line, log) = access_line_of_method("human", &method).await;
    assert!(line.contains(&format!(" method={logged} ")), "{line}");
    assert!(line.len() < 512, "{} bytes: {line}", line.len());
    assert!(
        log.lines().all(|l| l.len() < 1024),
        "a long line in the log: {log}"
    );
}

/// A password typed into the name field of the login form (a slip of the tab key, a password
/// manager filling the wrong field) reaches no log line, at any level (`RUST_LOG=trace`):
/// a name that is no user's is logged `-` in the access line of its failed or throttled
/// login, while a user's name is logged as typed, so an operator still sees whose account is
/// being guessed. Before, every name typed was logged, at INFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_typed_as_the_user_name_is_not_logged() {
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let dir = temp_dir("typed-password");
        let config = write_config(
            &dir,
            &addr.to_string(),
            None,
            "http://127.0.0.1:9",
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        RunningProxy::spawn_with_env(&config, "json", &[], &[("RUST_LOG", "trace")]).keep_dir(dir)
    });
    proxy.wait_listening(addr);
    let typed = "Tr0ub4dor&3-typed-as-name";
    let mut ids = Vec::new();
    // Five failures, then the throttle's refusal of that name.
    for expected in [StatusCode::UNAUTHORIZED; 5]
        .into_iter()
        .chain([StatusCode::TOO_MANY_REQUESTS])
    {
        let reply = login_at(addr, typed, "alice-password?").await;
        assert_eq!(reply.status, expected, "{}", reply.text());
        ids.push(reply.headers["x-request-id"].to_str().unwrap().to_owned());
    }
    let known = login_at(addr, "alice", "wrong").await;
    assert_eq!(known.status, StatusCode::UNAUTHORIZED);
    let known_id = known.headers["x-request-id"].to_str().unwrap().to_owned();
    proxy.stop();
    let log = proxy.log();
    // RUST_LOG took effect: each refusal is also a DEBUG line (the default level is info).
    assert!(log.contains("\"level\":\"DEBUG\""), "no debug lines: {log}");
    assert!(
        !log.contains("Tr0ub4dor"),
        "the typed name is in the log: {log}"
    );
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| line["target"] == "countersign::access")
        .collect();
    let user_of = |id: &str| {
        let lines: Vec<_> = access.iter().filter(|a| a["request_id"] == id).collect();
        assert_eq!(lines.len(), 1, "{id}: {log}");
        lines[0]["user"].as_str().unwrap().to_owned()
    };
    for id in &ids {
        assert_eq!(user_of(id), "-", "{log}");
    }
    assert_eq!(user_of(&known_id), "alice", "{log}");
}

/// With `[auth] verify_url` the credential check is a request to the API like any proxied
/// one, and carries the login's request id as `X-Request-Id` (the client's well-formed one,
/// else the proxy's), the same the client gets back and the access line names: a login that
/// the API failed (502) can be found in the API's own logs. Before, the check carried no id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_check_carries_the_logins_request_id() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(check_logins_at_the_upstream),
        ..HarnessOptions::default()
    })
    .await;
    let body = serde_json::json!({ "username": "vera", "password": "vera-pw" }).to_string();
    let login = |id: Option<&'static str>| {
        let body = body.clone();
        async move {
            let mut headers = vec![("content-type", "application/json"), ("origin", ORIGIN)];
            headers.extend(id.map(|id| ("x-request-id", id)));
            send(h.addr, Method::POST, "/auth/login", &headers, body).await
        }
    };
    for sent in [None, Some("login-trace.7_A")] {
        let reply = login(sent).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
        if let Some(sent) = sent {
            assert_eq!(id, sent);
        }
        let check = h.upstream.last_raw();
        assert!(check.uri.ends_with("/auth/verify-credentials"), "{check:?}");
        assert_eq!(
            check
                .headers
                .get_all("x-request-id")
                .iter()
                .collect::<Vec<_>>(),
            [id.as_str()],
            "{check:?}"
        );
    }
}

/// At `RUST_LOG=trace` (both formats), no log line, `/metrics` scrape or error answer holds
/// the `Signature` values the proxy sent upstream, nor what a client sent in
/// `Authorization`, `Proxy-Authorization`, `Signature` or `X-CSRF-Token` (secret_leaks.rs
/// covers keys, session ids, the session's CSRF token and passwords).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_and_client_credentials_reach_no_log_line() {
    for log_format in ["human", "json"] {
        let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
        let dir = temp_dir(&format!("no-signature-logged-{log_format}"));
        let (mut proxy, addr, admin) = start_on_free_ports(|listen, admin| {
            let config = write_config(
                &dir,
                &listen.to_string(),
                Some(&admin.to_string()),
                &upstream.url(),
                &keyring_file_text("k1"),
                &users_file_text(),
            );
            RunningProxy::spawn_with_env(&config, log_format, &[], &[("RUST_LOG", "trace")])
        });
        proxy.wait_listening(admin);
        let alice = login_alice_at(addr).await;
        let client_secrets = [
            "client-bearer-5ecret",
            "cHJveHktdXNlcjpwcm94eS01ZWNyZXQ",
            "Zm9yZ2VkLXNpZ25hdHVyZS01ZWNyZXQ",
            "forged-csrf-5ecret",
        ];
        let headers = [
            ("cookie", alice.cookie.as_str()),
            ("authorization", "Bearer client-bearer-5ecret"),
            (
                "proxy-authorization",
                "Basic cHJveHktdXNlcjpwcm94eS01ZWNyZXQ",
            ),
            ("signature", "sig1=:Zm9yZ2VkLXNpZ25hdHVyZS01ZWNyZXQ=:"),
            ("signature-input", "sig1=(\"@method\");keyid=\"k1\""),
        ];
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(send(addr, Method::GET, "/api/read", &headers, Bytes::new()).await);
        }
        let mut posted = headers.to_vec();
        posted.push(("x-csrf-token", alice.csrf.as_str()));
        posted.push(("origin", ORIGIN));
        answers.push(send(addr, Method::POST, "/api/write", &posted, "{}").await);
        // A forged token: refused (403 csrf), its value in no line.
        let mut forged = headers.to_vec();
        forged.push(("x-csrf-token", "forged-csrf-5ecret"));
        forged.push(("origin", ORIGIN));
        answers.push(send(addr, Method::POST, "/api/write", &forged, "{}").await);
        assert_eq!(answers[4].status, StatusCode::FORBIDDEN);
        let metrics = send(admin, Method::GET, "/metrics", &[], Bytes::new())
            .await
            .text();
        proxy.stop();
        let log = proxy.log();
        assert!(log.contains("DEBUG"), "no debug lines: {log}");
        let signatures: Vec<String> = upstream
            .raw
            .lock()
            .iter()
            .flat_map(|seen| {
                seen.headers
                    .get_all("signature")
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .map(|value| {
                let value = value.to_str().unwrap().to_owned();
                // `label=:BASE64:`: the base64 is the secret-derived part.
                value.split(':').nth(1).unwrap_or(&value).to_owned()
            })
            .collect();
        assert!(signatures.len() >= 4, "{signatures:?}");
        let answered: String = answers
            .iter()
            .map(|a| format!("{:?}{}", a.headers, a.text()))
            .collect();
        for (what, text) in [
            ("log", &log),
            ("/metrics", &metrics),
            ("answers", &answered),
        ] {
            for secret in signatures.iter().map(String::as_str).chain(client_secrets) {
                assert!(
                    !text.contains(secret),
                    "{secret:?} in the {what} ({log_format}): {text}"
                );
            }
        }
    }
}

/// An upstream that answers every request after `delay`, counting the requests it got.
async fn slow_upstream(
    delay: std::time::Duration,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"late")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// One GET over a fresh HTTP/2 connection (prior knowledge, as after ALPN `h2`), abandoned
/// once `started` says the upstream has it: the response future is dropped, which resets the
/// stream (RST_STREAM CANCEL, what a browser sends for an aborted fetch); the connection stays
/// open.
async fn abandon_over_http2(
    addr: std::net::SocketAddr,
    cookie: &str,
    id: &str,
    started: impl Fn() -> bool,
) {
    let (mut sender, connection) =
        support_h2::client(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    let request = http::Request::get(format!("http://{addr}/api/slow"))
        .header("cookie", cookie)
        .header("x-request-id", id)
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let pending = tokio::spawn(async move { sender.send_request(request).await });
    wait_until(&started).await;
    pending.abort();
    let _ = pending.await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    connection.abort();
}

async fn wait_until(check: &impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never happened");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A client that hangs up while the upstream works on its request (a browser tab closed, an
/// aborted fetch, or someone hiding requests) still leaves an access line and a count: the
/// signed request reached the API under the user's identity, and the API may have acted on
/// it. Over HTTP/2 (browsers, behind TLS) the stream's reset dropped the request's handling
/// and nothing was logged or counted; now its line says status 499 (nginx's "client closed
/// request") and reason `abandoned`, counted under 499. Over HTTP/1.1 the proxy finishes the
/// request and logs the upstream's status (right already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_abandons_is_still_logged_and_counted() {
    let (api, seen) = slow_upstream(std::time::Duration::from_millis(1500)).await;
    let dir = temp_dir("abandoned");
    let (mut proxy, addr, admin) = start_on_free_ports(|listen, admin| {
        let config = write_config(
            &dir,
            &listen.to_string(),
            Some(&admin.to_string()),
            &format!("http://{api}"),
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        RunningProxy::spawn_logging(&config, "json", &[])
    });
    proxy.wait_listening(admin);
    let alice = login_alice_at(addr).await;
    let upstream_saw = |n: usize| {
        let seen = seen.clone();
        move || seen.load(std::sync::atomic::Ordering::SeqCst) >= n
    };
    // HTTP/1.1: the client's task (and its connection) dropped while the upstream works.
    let abandoned = tokio::spawn({
        let cookie = alice.cookie.clone();
        async move {
            send(
                addr,
                Method::GET,
                "/api/slow",
                &[("cookie", &cookie), ("x-request-id", "abandoned-h1")],
                Bytes::new(),
            )
            .await
        }
    });
    wait_until(&upstream_saw(1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    abandon_over_http2(addr, &alice.cookie, "abandoned-h2", upstream_saw(2)).await;
    // Both lines are written once the upstream answers (1.5 s); waited for, not slept on, so
    // a loaded machine's delay cannot drop one.
    let counted = "countersign_requests_total{route=\"upstream/api\",status=\"499\"} 1\n";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let metrics = loop {
        let log = proxy.log();
        let logged = ["abandoned-h1", "abandoned-h2"].iter().all(|id| {
            log.lines()
                .any(|l| l.contains(id) && l.contains("countersign::access"))
        });
        let metrics = send(admin, Method::GET, "/metrics", &[], Bytes::new())
            .await
            .text();
        if logged && metrics.contains(counted) {
            break metrics;
        }
        if std::time::Instant::now() >= deadline {
            break metrics;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    proxy.stop();
    let log = proxy.log();
    let access = |id: &str| -> serde_json::Value {
        let line = log
            .lines()
            .find(|l| l.contains(id) && l.contains("countersign::access"))
            .unwrap_or_else(|| panic!("no access line for {id}: {log}"));
        serde_json::from_str(line).unwrap()
    };
    let h1 = access("abandoned-h1");
    assert_eq!(h1["status"], 200, "{h1}");
    let h2 = access("abandoned-h2");
    assert_eq!(h2["status"], 499, "{h2}");
    assert_eq!(h2["reason"], "abandoned", "{h2}");
    assert_eq!(h2["user"], "alice", "{h2}");
    assert_eq!(h2["route"], "upstream/api", "{h2}");
    // The abandoned line names its client as an answered one does.
    for line in [&h1, &h2] {
        assert_eq!(line["client"], "127.0.0.1", "{line}");
    }
    assert!(metrics.contains(counted), "{metrics}");
}

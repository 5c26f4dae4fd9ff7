//! What the binary writes to its log for requests: user-controlled text cannot forge lines, and
//! a request's error line and its access line carry the same request id.
//! Run: `cargo test --all-features --test proxy_logs`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use support::*;
use support_run::*;

/// Nothing listens on the discard port: every proxied request is a 502.
const DEAD_UPSTREAM: &str = "http://127.0.0.1:9";

fn start(tag: &str, log_format: &str) -> (RunningProxy, SocketAddr) {
    start_logging(tag, log_format, DEAD_UPSTREAM)
}

async fn login(addr: SocketAddr, username: &str, password: &str) -> Reply {
    send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": username, "password": password }).to_string(),
    )
    .await
}

/// A name typed at a failed login with a line break or terminal escapes cannot start a line
/// that looks like another request's, nor send escapes: a name that is no user's is not
/// logged at all (`user="-"`; it could be a password typed into the name field,
/// `proxy_observability_qa.rs`), and a user's name is written quoted and escaped.
#[tokio::test]
async fn user_names_cannot_forge_log_lines() {
    let (mut proxy, addr) = start("log-forge", "human");
    let forged = "2026-11-29T00:00:00Z  INFO countersign::access: request_id=x user=admin";
    let attempt = login(addr, &format!("evil\n{forged}"), "wrong").await;
    assert_eq!(
        attempt.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        attempt.text()
    );
    let colour = login(addr, "\u{1b}[31mred", "wrong").await;
    assert_eq!(colour.status, StatusCode::UNAUTHORIZED);
    let known = login(addr, "alice", "wrong").await;
    assert_eq!(known.status, StatusCode::UNAUTHORIZED);
    // The log after the stop: its lines are written by the proxy's log thread, after the
    // answers; the exit flushes them and `stop` reads the pipe to its end.
    proxy.stop();
    let log = proxy.log();
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-11-29T00:00:00Z")),
        "a forged line: {log}"
    );
    for typed in ["evil", "2026-11-29", "31mred"] {
        assert!(!log.contains(typed), "{typed:?} logged: {log:?}");
    }
    assert_eq!(
        log.matches(r#"reason="invalid_credentials" "#).count(),
        3,
        "{log}"
    );
    assert_eq!(log.matches(r#" user="-""#).count(), 2, "{log}");
    assert!(log.contains(r#" user="alice""#), "{log}");
}

/// In the JSON format the error line of a failed request names the same request id, as the
/// same plain string, as its access line, so a collector can join them.
#[tokio::test]
async fn error_and_access_lines_share_the_request_id() {
    let (mut proxy, addr) = start("log-ids", "json");
    let session = login(addr, "alice", ALICE_PASSWORD).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.text());
    let login = Login {
        cookie: session.session_cookie().unwrap(),
        csrf: session.json()["csrf_token"].as_str().unwrap().to_owned(),
    };
    let r = get(addr, "/api/x", &login).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    // Not `wait_for_log("bad_gateway")`: that is in the error line, and the access line comes
    // after it (and after the answer). The log after the stop has both: the exit flushes the
    // proxy's log thread and `stop` reads the pipe to its end.
    proxy.stop();
    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| {
            line["request_id"] == id.as_str() || line["fields"]["request_id"] == id.as_str()
        })
        .collect();
    assert_eq!(lines.len(), 2, "the error line and the access line: {log}");
    assert!(
        !log.contains(&format!("\\\"{id}\\\"")),
        "quoted twice: {log}"
    );
}

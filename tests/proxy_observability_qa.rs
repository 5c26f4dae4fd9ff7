//! What an operator reads under hostile input, beyond `proxy_observability.rs` and
//! `proxy_logs.rs`: the proxy's own refusals counted by their reason code in `/metrics` (a
//! valid scrape to the independent parsers of `support_metrics`), an attacker's request
//! method bounded in the access line (human and JSON formats), and what a failed login logs
//! of the name typed (a password typed into the name field must not reach the log). Real
//! clients on loopback, against the in-process proxy or the `countersign` binary.
//! Run: `cargo test --all-features --test proxy_observability_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_metrics;
mod support_run;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use support_metrics::check_with_independent_parsers;
use support_run::*;

/// Every code an answer's `{"error":…}` can carry (docs/OPERATIONS.md, "Metrics").
const REASONS: [&str; 17] = [
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
    "internal_error",
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

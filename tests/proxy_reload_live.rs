//! The live part of a `proxy.toml` edit: a reload (SIGHUP, or a file change with
//! `server.reload_check_interval`) of a valid file applies `[server.response_headers]` (and
//! `server.response_headers_on_upstream`) on every event loop, names what it applied in an
//! info line and what waits for a restart in a warning; an invalid file applies nothing.
//! Against the real binary with `--workers 2` (two event loops, each its own state).
//!
//! Run: `cargo test --all-features --test proxy_reload_live`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::SystemClock;
use http::{HeaderMap, Method, StatusCode};
use support::*;
use support_run::*;

/// Fresh connections per look at what is served: `SO_REUSEPORT` spreads connections over the
/// two event loops by their ports, so with this many each loop answers some (a loop left with
/// the old headers is missed with odds of 2^-24).
const CONNECTIONS: usize = 24;

/// `proxy.toml` for the test: [`config_text`] with `extra_server` added to `[server]` and
/// `headers` as `[server.response_headers]` (none when empty).
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: &str,
    extra_server: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut text = config_text(&listen.to_string(), Some(&admin.to_string()), upstream).replace(
        "shutdown_grace = \"2s\"\n",
        &format!("shutdown_grace = \"2s\"\n{extra_server}"),
    );
    if !headers.is_empty() {
        text.push_str("\n[server.response_headers]\n");
        for (name, value) in headers {
            text.push_str(&format!("{name} = \"{value}\"\n"));
        }
    }
    text
}

/// Replaces `dir/name` at once (a new file renamed over it), so a check never reads it
/// half-written.
fn replace_file(dir: &Path, name: &str, text: &str) {
    let staged = dir.join(format!(".{name}.new"));
    write(&staged, text);
    std::fs::rename(&staged, dir.join(name)).unwrap();
}

/// Rewrites `proxy.toml` with `[server]` extras and `[server.response_headers]` entries.
type Rewrite = Box<dyn Fn(&str, &[(&str, &str)])>;

struct Running {
    proxy: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Rewrites `proxy.toml` (same ports) with these settings.
    rewrite: Rewrite,
    _upstream: Upstream,
}

/// `countersign run --workers 2` on `dir` with an admin listener, `extra_server` in
/// `[server]` and `headers` as `[server.response_headers]`.
async fn start(dir: &Path, extra_server: &str, headers: &[(&str, &str)]) -> Running {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let url = upstream.url();
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let file = dir.join("proxy.toml");
        write(&file, &config(addr, admin, &url, extra_server, headers));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let dir = dir.to_path_buf();
    let rewrite = Box::new(move |extra: &str, headers: &[(&str, &str)]| {
        replace_file(
            &dir,
            "proxy.toml",
            &config(addr, admin, &url, extra, headers),
        );
    });
    Running {
        proxy,
        addr,
        admin,
        rewrite,
        _upstream: upstream,
    }
}

/// The headers of [`CONNECTIONS`] answers of the proxy's own (`/auth/session`, no session),
/// each on a fresh connection.
async fn own_answers(addr: SocketAddr) -> Vec<HeaderMap> {
    let mut seen = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let reply = send(addr, Method::GET, "/auth/session", &[], "").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        seen.push(reply.headers);
    }
    seen
}

/// Each answer's value of `name` (None: absent), all the same, or a panic showing them.
fn one_value(answers: &[HeaderMap], name: &str) -> Option<String> {
    let values: Vec<Option<String>> = answers
        .iter()
        .map(|h| h.get(name).map(|v| v.to_str().unwrap().to_owned()))
        .collect();
    assert!(
        values.windows(2).all(|w| w[0] == w[1]),
        "the answers disagree on {name}: {values:?}"
    );
    values.into_iter().next().flatten()
}

const CSP: &str = "default-src 'self'";
const CSP_CDN: &str = "default-src 'self' https://cdn.example";

/// An edit of only live keys: applied on both event loops and the admin listener at once,
/// named (never the values) in one info line, no warning, and `countersign_config_file_changed`
/// stays 0 (nothing waits). A second edit is compared with what runs now: taking the header
/// out again is a change, applied too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_csp_is_served_by_every_event_loop_after_sighup() {
    let dir = temp_dir("reload-live-csp");
    let mut run = start(&dir, "", &[]).await;
    let before = own_answers(run.addr).await;
    assert_eq!(one_value(&before, "content-security-policy"), None);
    assert_eq!(
        one_value(&before, "x-frame-options").as_deref(),
        Some("DENY")
    );

    (run.rewrite)(
        "",
        &[
            ("content-security-policy", CSP_CDN),
            ("x-frame-options", "SAMEORIGIN"),
        ],
    );
    run.proxy.signal("HUP");
    let applied = run
        .proxy
        .wait_json_messages("INFO", &["SIGHUP:", "applied"], 1);
    assert!(
        applied[0].contains(
            "proxy.toml: applied 2 keys: server.response_headers.content-security-policy, \
             server.response_headers.x-frame-options"
        ),
        "{applied:?}"
    );
    assert!(
        !applied[0].contains("cdn.example") && !applied[0].contains("SAMEORIGIN"),
        "a value was logged: {applied:?}"
    );
    let after = own_answers(run.addr).await;
    assert_eq!(
        one_value(&after, "content-security-policy").as_deref(),
        Some(CSP_CDN)
    );
    assert_eq!(
        one_value(&after, "x-frame-options").as_deref(),
        Some("SAMEORIGIN")
    );
    // The admin listener's set is swapped with the public one.
    let metrics = send(run.admin, Method::GET, "/metrics", &[], "").await;
    assert_eq!(
        metrics
            .headers
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap()),
        Some(CSP_CDN)
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 0);

    // Back as it started: compared with what runs (the CSP), that is a change too.
    (run.rewrite)("", &[]);
    run.proxy.signal("HUP");
    run.proxy
        .wait_json_messages("INFO", &["SIGHUP:", "applied 2 keys"], 2);
    let back = own_answers(run.addr).await;
    assert_eq!(one_value(&back, "content-security-policy"), None);
    assert_eq!(one_value(&back, "x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
    assert!(run.proxy.stop().success());
}

/// `server.response_headers_on_upstream` is live too: proxied answers get the headers from
/// the reload on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_on_upstream_applies_live() {
    let dir = temp_dir("reload-live-on-upstream");
    let mut run = start(&dir, "", &[("content-security-policy", CSP)]).await;
    let session = login_alice_at(run.addr).await;
    let proxied = get(run.addr, "/api/x", &session).await;
    assert_eq!(proxied.status, StatusCode::OK);
    assert!(proxied.headers.get("content-security-policy").is_none());

    (run.rewrite)(
        "response_headers_on_upstream = true\n",
        &[("content-security-policy", CSP)],
    );
    run.proxy.signal("HUP");
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 1 key: server.response_headers_on_upstream",
        ],
        1,
    );
    for _ in 0..CONNECTIONS / 2 {
        let proxied = get(run.addr, "/api/x", &session).await;
        assert_eq!(
            proxied
                .headers
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap()),
            Some(CSP)
        );
    }
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(run.proxy.stop().success());
}

/// A file that would not start the proxy applies nothing, not even its valid header edit:
/// an error line, the gauge, and the old headers served. Mended, it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_changes_nothing_served() {
    let dir = temp_dir("reload-live-invalid");
    let mut run = start(&dir, "", &[("content-security-policy", CSP)]).await;

    // A valid CSP next to an invalid key elsewhere.
    (run.rewrite)(
        "send_timeout = \"soon\"\n",
        &[("content-security-policy", CSP_CDN)],
    );
    run.proxy.signal("HUP");
    let refused = run
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert!(refused[0].contains("server.send_timeout"), "{refused:?}");
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(CSP)
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 1);

    // An invalid header value among valid ones.
    (run.rewrite)(
        "",
        &[
            ("content-security-policy", CSP_CDN),
            ("x-frame-options", "ALLOW-FROM https://a.example"),
        ],
    );
    run.proxy.signal("HUP");
    let refused = run
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 2);
    assert!(
        refused[1].contains("server.response_headers.x-frame-options"),
        "{refused:?}"
    );
    let answers = own_answers(run.addr).await;
    assert_eq!(
        one_value(&answers, "content-security-policy").as_deref(),
        Some(CSP)
    );
    assert_eq!(
        one_value(&answers, "x-frame-options").as_deref(),
        Some("DENY")
    );
    assert!(
        run.proxy.json_messages("INFO", &["applied"]).is_empty(),
        "{}",
        run.proxy.log()
    );

    // Mended: applied, and nothing waits.
    (run.rewrite)("", &[("content-security-policy", CSP_CDN)]);
    run.proxy.signal("HUP");
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 1 key: server.response_headers.content-security-policy",
        ],
        1,
    );
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(CSP_CDN)
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 0);
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(run.proxy.stop().success());
}

/// A mixed edit applies its live part and names the rest in a warning (and the gauge says
/// something waits); once the rest is reverted nothing waits. A header edit that comes with
/// a change of `public_origin`'s scheme waits with it (HSTS depends on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_edit_applies_the_live_part_and_names_the_rest() {
    let dir = temp_dir("reload-live-mixed");
    let mut run = start(&dir, "", &[]).await;

    (run.rewrite)(
        "log_queue_lines = 500\n",
        &[("content-security-policy", CSP)],
    );
    run.proxy.signal("HUP");
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 1 key: server.response_headers.content-security-policy",
        ],
        1,
    );
    let warned = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    assert!(
        warned[0].contains("(1 key: server.log_queue_lines)"),
        "{warned:?}"
    );
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(CSP)
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 1);

    // The restart-only key reverted: the file is what runs (the CSP applied, compared with
    // what runs, is no change), nothing waits, nothing said. The keyring's line comes after
    // the config file's in each reload.
    (run.rewrite)("", &[("content-security-policy", CSP)]);
    run.proxy.signal("HUP");
    run.proxy
        .wait_json_messages("INFO", &["SIGHUP: reloaded signing.keyring"], 2);
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert_eq!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).len(),
        1,
        "{}",
        run.proxy.log()
    );
    assert_eq!(
        run.proxy.json_messages("INFO", &["applied"]).len(),
        1,
        "{}",
        run.proxy.log()
    );

    // Headers with another public_origin scheme: both wait for the restart.
    let text = std::fs::read_to_string(dir.join("proxy.toml")).unwrap();
    replace_file(
        &dir,
        "proxy.toml",
        &text
            .replace("http://app.test", "https://app.test")
            .replace(CSP, CSP_CDN),
    );
    run.proxy.signal("HUP");
    let warned = run.proxy.wait_json_messages(
        "WARN",
        &[
            "SIGHUP:",
            "(2 keys: server.public_origin, server.response_headers.content-security-policy)",
        ],
        1,
    );
    assert!(!warned[0].contains("applied live"), "{warned:?}");
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(CSP)
    );
    assert!(run.proxy.stop().success());
}

/// With `server.reload_check_interval` the edit is applied without a signal, once (not at
/// every check), as SIGHUP applies it: the interval check treats proxy.toml's live keys as it
/// treats the keyring and the users file, which it reloads when they change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_check_applies_an_edited_csp() {
    let dir = temp_dir("reload-live-interval");
    let interval = "reload_check_interval = \"1s\"\n";
    let run = start(&dir, interval, &[]).await;
    run.proxy.wait_for_log("server.reload_check_interval");
    (run.rewrite)(interval, &[("content-security-policy", CSP)]);
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "file change:",
            "applied 1 key: server.response_headers.content-security-policy",
        ],
        1,
    );
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(CSP)
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    // A few more checks: applied once, nothing else said.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        run.proxy.json_messages("INFO", &["applied"]).len(),
        1,
        "{}",
        run.proxy.log()
    );
    assert!(run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty());
    let mut run = run;
    assert!(run.proxy.stop().success());
}

/// `server.max_response_header_value_bytes` is live with the headers it bounds: one reload
/// raises it and sets a CSP longer than the old limit, and every event loop serves that CSP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_value_limit_and_a_longer_csp_apply_together() {
    let dir = temp_dir("reload-live-value-limit");
    let mut run = start(&dir, "", &[("content-security-policy", CSP)]).await;
    let long_csp = format!("{CSP}; img-src 'self' {}", "a".repeat(5000));
    (run.rewrite)(
        "max_response_header_value_bytes = 8192\n",
        &[("content-security-policy", &long_csp)],
    );
    run.proxy.signal("HUP");
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "applied 2 keys:",
            "server.max_response_header_value_bytes",
            "server.response_headers",
        ],
        1,
    );
    assert_eq!(
        one_value(&own_answers(run.addr).await, "content-security-policy").as_deref(),
        Some(long_csp.as_str())
    );
    assert!(run.proxy.stop().success());
}

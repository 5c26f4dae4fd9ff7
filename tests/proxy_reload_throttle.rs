//! The login throttle's limits are live: a reload (SIGHUP) of a valid `proxy.toml` applies an
//! edited `[auth.throttle]` (`max_failures_per_ip`, `max_failures_per_user`, `window`,
//! `max_tracked_keys`) without a restart, so an operator can tighten the limits during a
//! credential-stuffing attack without logging every user out. A lowered limit applies to the
//! failures already counted in the current window; a changed window applies to the windows that
//! start after the reload (a window running keeps its end). A mixed edit applies the throttle
//! part and the rest waits (the gauge says so); an invalid file applies nothing. Against the
//! real binary with `--workers 2` (two event loops sharing one throttle), with the memory
//! throttle and with the Redis one.
//!
//! Run: `cargo test --all-features --test proxy_reload_throttle`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use countersign::clock::SystemClock;
use http::StatusCode;
use support::*;
use support_redis::RedisServer;
use support_run::*;

/// The default window, 15 minutes: no `Retry-After` of a window started before a reload that
/// lengthened the window may exceed it.
const DEFAULT_WINDOW_SECS: u64 = 15 * 60;

/// `proxy.toml` for the test: [`config_text`] with `session` as `[session]`'s body,
/// `extra_server` added to `[server]` and `throttle` as `[auth.throttle]` (none when empty).
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: &str,
    session: &str,
    extra_server: &str,
    throttle: &str,
) -> String {
    let mut text = config_text(&listen.to_string(), Some(&admin.to_string()), upstream)
        .replace(
            "shutdown_grace = \"2s\"\n",
            &format!("shutdown_grace = \"2s\"\n{extra_server}"),
        )
        .replace("store = \"memory\"\n", &format!("{session}\n"));
    if !throttle.is_empty() {
        text.push_str(&format!("\n[auth.throttle]\n{throttle}"));
    }
    text
}

/// Replaces `dir/name` at once (a new file renamed over it).
fn replace_file(dir: &Path, name: &str, text: &str) {
    let staged = dir.join(format!(".{name}.new"));
    write(&staged, text);
    std::fs::rename(&staged, dir.join(name)).unwrap();
}

/// Rewrites `proxy.toml` (same ports, same session store) with `[server]` extras and an
/// `[auth.throttle]` body.
type Rewrite = Box<dyn Fn(&str, &str)>;

struct Running {
    proxy: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    rewrite: Rewrite,
    _upstream: Upstream,
}

impl Running {
    /// Rewrites `proxy.toml`, sends SIGHUP.
    fn edit_and_reload(&self, extra_server: &str, throttle: &str) {
        (self.rewrite)(extra_server, throttle);
        self.proxy.signal("HUP");
    }

    /// Waits for the `count`th info line of a reload that applied exactly `keys`.
    fn wait_applied(&self, keys: &str, count: usize) -> Vec<String> {
        let applied = (self.proxy).wait_json_messages(
            "INFO",
            &["SIGHUP:", &format!("proxy.toml: applied {keys} (")],
            count,
        );
        for line in &applied {
            assert!(
                !line.contains(" = ") && !line.contains("15m") && !line.contains("2h"),
                "a value was logged: {line}"
            );
        }
        applied
    }
}

/// `countersign run --workers 2` on `dir` with an admin listener, `session` as the body of
/// `[session]` and `throttle` as `[auth.throttle]`.
async fn start(dir: &Path, session: &str, throttle: &str) -> Running {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let url = upstream.url();
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let file = dir.join("proxy.toml");
        write(&file, &config(addr, admin, &url, session, "", throttle));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let dir = dir.to_path_buf();
    let session = session.to_owned();
    let rewrite = Box::new(move |extra: &str, throttle: &str| {
        replace_file(
            &dir,
            "proxy.toml",
            &config(addr, admin, &url, &session, extra, throttle),
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

const MEMORY: &str = "store = \"memory\"";

/// `n` failed logins of `user` (each on a fresh connection, so both event loops count), each
/// answered 401.
async fn fail(addr: SocketAddr, user: &str, n: usize) {
    for i in 0..n {
        let reply = login_at(addr, user, "wrong-password").await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "failure {} of {user}: {}",
            i + 1,
            reply.text()
        );
    }
}

/// A login of `user` answered 429 `too_many_attempts`; its `Retry-After` in seconds.
async fn throttled(addr: SocketAddr, user: &str, password: &str) -> u64 {
    let reply = login_at(addr, user, password).await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{user}: {}",
        reply.text()
    );
    assert_eq!(reply.error_code(), "too_many_attempts");
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    retry_after
}

/// The operator's case: failures below the per-user limit, the limit lowered under them and
/// SIGHUP: the next attempt for that name is refused (the counts already made count against
/// the new limit), while another user logs in from the same address (per-user limit; the
/// address is below its own). Raised again, that name's logins go through to the password
/// check again. Nothing waits for a restart; sessions survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_user_limit_applies_to_failures_already_counted() {
    let dir = temp_dir("reload-throttle-user");
    let mut run = start(&dir, MEMORY, "max_failures_per_user = 5\n").await;
    let session = login_alice_at(run.addr).await;
    fail(run.addr, "mallory", 3).await;

    run.edit_and_reload("", "max_failures_per_user = 3\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 1);
    let wait = throttled(run.addr, "mallory", "wrong-password").await;
    assert!(wait <= DEFAULT_WINDOW_SECS, "{wait}");
    // Refused without a count: still refused.
    throttled(run.addr, "mallory", "wrong-password").await;
    // Another name from the same address: not throttled.
    login_alice_at(run.addr).await;
    // The session from before the reload is still valid.
    assert_eq!(
        get(run.addr, "/api/x", &session).await.status,
        StatusCode::OK
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);

    // Raised: mallory's attempts reach the password check again (3 counted, limit 10).
    run.edit_and_reload("", "max_failures_per_user = 10\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 2);
    fail(run.addr, "mallory", 2).await;
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
    assert!(run.proxy.stop().success());
}

/// The per-address limit, added to a file without `[auth.throttle]` (the table is new), below
/// the failures this address already made under several names: every name from that address
/// is refused, the right password too. The table taken out again (the defaults) lets it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_ip_limit_throttles_every_name_from_that_address() {
    let dir = temp_dir("reload-throttle-ip");
    let mut run = start(&dir, MEMORY, "").await;
    for user in ["u1", "u2", "u3"] {
        fail(run.addr, user, 1).await;
    }

    run.edit_and_reload("", "max_failures_per_ip = 3\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_ip", 1);
    throttled(run.addr, "alice", ALICE_PASSWORD).await;
    throttled(run.addr, "u4", "wrong-password").await;

    // Back to the defaults (20 per address): compared with what runs, a change, applied.
    run.edit_and_reload("", "");
    run.wait_applied("1 key: auth.throttle.max_failures_per_ip", 2);
    login_alice_at(run.addr).await;
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(run.proxy.stop().success());
}

/// A changed window applies to the windows that start after the reload: a name throttled
/// before keeps its window's end (its `Retry-After` stays within the old 15 minutes), a name
/// whose first failure comes after the reload gets the new 2 hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_window_applies_from_the_next_window() {
    let dir = temp_dir("reload-throttle-window");
    let limit_one = "max_failures_per_user = 1\n";
    let mut run = start(&dir, MEMORY, &format!("{limit_one}window = \"15m\"\n")).await;
    fail(run.addr, "u1", 1).await;
    assert!(throttled(run.addr, "u1", "wrong-password").await <= DEFAULT_WINDOW_SECS);

    run.edit_and_reload("", &format!("{limit_one}window = \"2h\"\n"));
    run.wait_applied("1 key: auth.throttle.window", 1);
    let kept = throttled(run.addr, "u1", "wrong-password").await;
    assert!(
        kept <= DEFAULT_WINDOW_SECS,
        "the running window moved: {kept}"
    );
    fail(run.addr, "u2", 1).await;
    let new = throttled(run.addr, "u2", "wrong-password").await;
    assert!(
        new > DEFAULT_WINDOW_SECS && new <= 2 * 3600,
        "not the new window: {new}"
    );
    assert!(run.proxy.stop().success());
}

/// A mixed edit (a throttle limit and a restart-only key): the limit is applied and named in
/// an info line, the other key in a warning, and `countersign_config_file_changed` stays 1. A
/// second SIGHUP compares with what runs: the limit is no change any more, the other key
/// still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_edit_applies_the_throttle_part_and_the_rest_waits() {
    let dir = temp_dir("reload-throttle-mixed");
    let mut run = start(&dir, MEMORY, "").await;
    fail(run.addr, "mallory", 2).await;

    run.edit_and_reload("log_queue_lines = 500\n", "max_failures_per_user = 2\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 1);
    let warned = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    assert!(
        warned[0].contains("(1 key: server.log_queue_lines)")
            && warned[0].contains("the keys applied live are not among them")
            && warned[0].contains("[auth.throttle] limits"),
        "{warned:?}"
    );
    throttled(run.addr, "mallory", "wrong-password").await;
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 1);

    run.proxy.signal("HUP");
    let warned = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 2);
    assert!(
        warned[1].contains("(1 key: server.log_queue_lines)"),
        "{warned:?}"
    );
    assert_eq!(
        run.proxy.json_messages("INFO", &["applied"]).len(),
        1,
        "{}",
        run.proxy.log()
    );
    throttled(run.addr, "mallory", "wrong-password").await;
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 1);
    assert!(run.proxy.stop().success());
}

/// A file with an invalid throttle value applies nothing, not even its valid lowered limit: an
/// error line naming the key, the gauge, and the old limits in force. Mended, it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_throttle_value_applies_nothing() {
    let dir = temp_dir("reload-throttle-invalid");
    let mut run = start(&dir, MEMORY, "").await;
    fail(run.addr, "mallory", 2).await;

    run.edit_and_reload("", "max_failures_per_user = 2\nmax_failures_per_ip = 0\n");
    let refused = run
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert!(
        refused[0].contains("auth.throttle.max_failures_per_ip"),
        "{refused:?}"
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 1);
    // The default limit of 5 still holds: the 3rd failure is checked, not refused.
    fail(run.addr, "mallory", 1).await;

    // A window that is not whole seconds.
    run.edit_and_reload("", "max_failures_per_user = 2\nwindow = \"1500ms\"\n");
    let refused = run
        .proxy
        .wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 2);
    assert!(refused[1].contains("auth.throttle.window"), "{refused:?}");
    fail(run.addr, "mallory", 1).await;
    assert!(
        run.proxy.json_messages("INFO", &["applied"]).is_empty(),
        "{}",
        run.proxy.log()
    );

    // Mended: 4 counted, limit 4.
    run.edit_and_reload("", "max_failures_per_user = 4\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 1);
    throttled(run.addr, "mallory", "wrong-password").await;
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 0);
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(run.proxy.stop().success());
}

/// With `store = "redis"` the counters live in Redis (started by the test): a lowered limit
/// applies to the counts already there, a lengthened window to the counters that start after
/// the reload (a counter's TTL is kept), a raised limit lets attempts through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_the_limits_apply_to_the_shared_counters() {
    let redis = RedisServer::start();
    let dir = temp_dir("reload-throttle-redis");
    let session = format!("store = \"redis\"\nredis_url = \"{}\"", redis.url());
    let mut run = start(&dir, &session, "max_failures_per_user = 5\n").await;
    let alice = login_alice_at(run.addr).await;
    fail(run.addr, "mallory", 3).await;

    run.edit_and_reload("", "max_failures_per_user = 3\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 1);
    let wait = throttled(run.addr, "mallory", "wrong-password").await;
    assert!(wait <= DEFAULT_WINDOW_SECS, "{wait}");
    login_alice_at(run.addr).await;
    assert_eq!(get(run.addr, "/api/x", &alice).await.status, StatusCode::OK);

    run.edit_and_reload("", "max_failures_per_user = 3\nwindow = \"2h\"\n");
    run.wait_applied("1 key: auth.throttle.window", 1);
    let kept = throttled(run.addr, "mallory", "wrong-password").await;
    assert!(
        kept <= DEFAULT_WINDOW_SECS,
        "the running window moved: {kept}"
    );
    fail(run.addr, "u2", 3).await;
    let new = throttled(run.addr, "u2", "wrong-password").await;
    assert!(
        new > DEFAULT_WINDOW_SECS && new <= 2 * 3600,
        "not the new window: {new}"
    );

    run.edit_and_reload("", "max_failures_per_user = 10\nwindow = \"2h\"\n");
    run.wait_applied("1 key: auth.throttle.max_failures_per_user", 2);
    fail(run.addr, "mallory", 1).await;
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    assert!(run.proxy.stop().success());
}

//! SIGHUP reload, file by file: a keyring or users file that fails to load is reported (file,
//! key, problem) and the current one kept, while the other file's valid new content is loaded
//! all the same; every failure is reported, not only the first. In-process
//! (`ProxyState::reload_files` / `reload`) and through a real SIGHUP to the binary.
//! Run: `cargo test --all-features --test proxy_reload`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::clock::{ManualClock, SharedClock, SystemClock};
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use http::{Method, StatusCode};
use support::*;
use support_run::*;

/// A users file that does not load: alice without a password.
const BROKEN_USERS: &str = "[[users]]\nname = \"alice\"\n";
/// A keyring that does not load: the active key is not in it.
fn broken_keys() -> String {
    keyring_file_text("k9")
}

fn carol_users() -> String {
    format!(
        "[[users]]\nname = \"carol\"\npassword = \"{}\"\n",
        cheap_hash("carol-pw")
    )
}

async fn login_status(addr: SocketAddr, user: &str, password: &str) -> StatusCode {
    send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": user, "password": password }).to_string(),
    )
    .await
    .status
}

/// The keyid the upstream saw on a request signed now.
async fn signing_key(addr: SocketAddr, login: &Login, upstream: &Upstream) -> String {
    assert_eq!(get(addr, "/api/x", login).await.status, StatusCode::OK);
    upstream.last_verified().identity.keyid.into_string()
}

struct InProcess {
    proxy: ProxyServer,
    upstream: Upstream,
    login: Login,
    /// Its files: removed after the proxy stops (fields drop in order).
    dir: TestDir,
}

async fn start(tag: &str) -> InProcess {
    let clock: SharedClock = Arc::new(ManualClock::new(T0));
    let upstream = start_upstream(both_keys_keyring(), clock.clone()).await;
    let dir = temp_dir(tag);
    let config = write_config(
        &dir,
        "127.0.0.1:0",
        None,
        &upstream.url(),
        &keyring_file_text("k1"),
        &users_file_text(),
    );
    let config = ProxyConfig::load(&config).unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    let deps = ProxyDeps::from_config(&config, clock).unwrap();
    let proxy = ProxyServer::start(settings, deps).await.unwrap();
    let login = login_alice_at(proxy.local_addr()).await;
    assert_eq!(
        signing_key(proxy.local_addr(), &login, &upstream).await,
        "k1"
    );
    InProcess {
        proxy,
        upstream,
        login,
        dir,
    }
}

fn write_file(dir: &Path, name: &str, text: &str) {
    write(&dir.join(name), text);
}

#[tokio::test]
async fn a_new_keyring_is_loaded_although_the_users_file_is_broken() {
    let p = start("reload-keys").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&p.dir, "users.toml", BROKEN_USERS);

    let report = p.proxy.state().reload_files();
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    assert!(
        report.loaded[0].contains("signing.keyring") && report.loaded[0].contains("k2"),
        "{report:?}"
    );
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let failure = &report.failed[0];
    assert!(
        failure.contains("auth.users_file")
            && failure.contains("users.toml")
            && failure.contains("users[0]")
            && failure.contains("keeping the current users"),
        "names the setting, the file, the key in it and what happens: {failure}"
    );

    // The rotation took effect; the old users are still there.
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k2");
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK
    );

    // `reload` (the one-line form) says the same: an error, naming both outcomes.
    let line = p.proxy.state().reload().await.expect_err("a file failed");
    assert!(
        line.contains("users.toml") && line.contains("reloaded signing.keyring"),
        "{line}"
    );
    p.proxy.shutdown().await;
}

#[tokio::test]
async fn a_new_users_file_is_loaded_although_the_keyring_is_broken() {
    let p = start("reload-users").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &broken_keys());
    write_file(&p.dir, "users.toml", &carol_users());

    let report = p.proxy.state().reload_files();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let failure = &report.failed[0];
    assert!(
        failure.contains("signing.keyring")
            && failure.contains("keys.toml")
            && failure.contains("k9")
            && failure.contains("keeping the current keys"),
        "{failure}"
    );
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    assert!(
        report.loaded[0].contains("auth.users_file") && report.loaded[0].contains("(users: 1)"),
        "{report:?}"
    );

    // The current key still signs; the new users file is active (carol in, alice out), and
    // alice's session lives on (a reload never ends sessions).
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k1");
    assert_eq!(
        login_status(addr, "carol", "carol-pw").await,
        StatusCode::OK
    );
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::UNAUTHORIZED
    );
    p.proxy.shutdown().await;
}

#[tokio::test]
async fn when_both_files_are_broken_both_problems_are_reported_and_nothing_changes() {
    let p = start("reload-both").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &broken_keys());
    write_file(&p.dir, "users.toml", BROKEN_USERS);

    let report = p.proxy.state().reload_files();
    assert!(report.loaded.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 2, "{report:?}");
    let line = p.proxy.state().reload().await.expect_err("both failed");
    assert!(
        line.contains("keys.toml") && line.contains("users.toml"),
        "every failure, not only the first: {line}"
    );
    assert!(!line.contains("; reloaded"), "{line}");
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k1");
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK
    );

    // Both fixed: both reloaded, and `reload` is Ok; alice, gone from the users file, has
    // her sessions ended (the first login's and the one checked above), as SIGHUP ends them.
    write_file(&p.dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&p.dir, "users.toml", &carol_users());
    let line = p.proxy.state().reload().await.expect("both load");
    assert!(
        line.contains("signing.keyring") && line.contains("auth.users_file"),
        "{line}"
    );
    assert!(
        line.contains("ended 2 session(s) of 1 removed or changed user(s)"),
        "{line}"
    );
    assert_eq!(
        get(addr, "/api/x", &p.login).await.status,
        StatusCode::UNAUTHORIZED
    );
    let carol = login_at(addr, "carol", "carol-pw").await;
    assert_eq!(carol.status, StatusCode::OK);
    assert_eq!(signing_key(addr, &carol.login(), &p.upstream).await, "k2");
    p.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_the_binary_reloads_the_good_file_and_logs_the_bad_one() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-sighup");
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = write_config(
            &dir,
            &addr.to_string(),
            None,
            &upstream.url(),
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let session = login_alice_at(addr).await;
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");

    write_file(&dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&dir, "users.toml", BROKEN_USERS);
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while signing_key(addr, &session, &upstream).await != "k2" {
        assert!(
            Instant::now() < deadline,
            "the key rotation was held back by the broken users file: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK,
        "the current users stay"
    );
    let log = proxy.wait_for_log("keeping the current users");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let said = |level: &str, needles: &[&str]| {
        lines.iter().any(|v| {
            v["level"] == level
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("SIGHUP") && needles.iter().all(|n| m.contains(n)))
        })
    };
    assert!(
        said("ERROR", &["auth.users_file", "users.toml", "users[0]"]),
        "{log}"
    );
    assert!(said("INFO", &["signing.keyring", "active key k2"]), "{log}");
    assert!(proxy.stop().success());
}

/// `proxy.toml` itself is read at start, and a reload applies only its live keys
/// (`[server.response_headers]`, tests/proxy_reload_live.rs). A SIGHUP after an edit names the
/// keys waiting for a restart (never their values) and keeps those settings; a file that
/// would no longer start the proxy is an error line; an unchanged file says nothing. The
/// other files are reloaded all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_names_the_config_keys_waiting_for_a_restart() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-config-file");
    write_file(&dir, "keys.toml", &keyring_file_text("k1"));
    write_file(&dir, "users.toml", &users_file_text());
    let (mut proxy, addr) = spawn_checking(&dir, &upstream, None, None);
    let session = login_alice_at(addr).await;
    let started = std::fs::read_to_string(dir.join("proxy.toml")).unwrap();

    // Unchanged (a comment added is no change): the keyring is reloaded, nothing is said of
    // the config file.
    write_file(&dir, "proxy.toml", &format!("# edited\n{started}"));
    write_file(&dir, "keys.toml", &keyring_file_text("k2"));
    proxy.signal("HUP");
    proxy.wait_json_messages("INFO", &["SIGHUP: reloaded signing.keyring", "k2"], 1);
    assert_eq!(signing_key(addr, &session, &upstream).await, "k2");
    assert!(
        proxy.json_messages("WARN", &["proxy.toml"]).is_empty()
            && proxy.json_messages("ERROR", &["proxy.toml"]).is_empty(),
        "{}",
        proxy.log()
    );

    // Three keys changed: the live one (the CSP) is applied and named in an info line, the
    // two others in a warning, in key order, without their values.
    let csp = "default-src 'self' https://cdn.example";
    let edited = started.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"2s\"\nlog_queue_lines = 999")
        + &format!(
            "pool_idle_timeout = \"7s\"\n\n[server.response_headers]\ncontent-security-policy = \"{csp}\"\n"
        );
    write_file(&dir, "proxy.toml", &edited);
    write_file(&dir, "keys.toml", &keyring_file_text("k1"));
    proxy.signal("HUP");
    let warned = proxy.wait_json_messages("WARN", &["SIGHUP:", "proxy.toml", "restart"], 1);
    assert!(
        warned[0].contains("(2 keys: server.log_queue_lines, upstream[0].pool_idle_timeout)"),
        "{warned:?}"
    );
    let applied = proxy.wait_json_messages("INFO", &["SIGHUP:", "proxy.toml: applied"], 1);
    assert!(
        applied[0].contains("applied 1 key: server.response_headers.content-security-policy"),
        "{applied:?}"
    );
    for line in warned.iter().chain(&applied) {
        assert!(
            !line.contains("cdn.example") && !line.contains("7s"),
            "a value was logged: {line}"
        );
    }
    proxy.wait_json_messages("INFO", &["SIGHUP: reloaded signing.keyring", "k1"], 1);
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");
    let own_answer = send(addr, Method::GET, "/auth/session", &[], "").await;
    assert_eq!(
        own_answer
            .headers
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap()),
        Some(csp),
        "the live key was not applied: {:?}",
        own_answer.headers
    );

    // A file that would not start the proxy: an error naming the key, the proxy serves on.
    write_file(
        &dir,
        "proxy.toml",
        &started.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"soon\""),
    );
    proxy.signal("HUP");
    let refused = proxy.wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert!(
        refused[0].contains("proxy.toml") && refused[0].contains("server.shutdown_grace"),
        "{refused:?}"
    );
    assert_eq!(get(addr, "/api/x", &session).await.status, StatusCode::OK);
    assert!(proxy.stop().success());
}

/// What an operator alerts on without reading logs: whether the last reload kept a file
/// after a failure, when the files were last all loaded, and whether `proxy.toml` waits for
/// a restart or would not start the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_config_edits_show_in_the_metrics() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-metrics");
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let config = write_config(
            &dir,
            &addr.to_string(),
            Some(&admin.to_string()),
            &upstream.url(),
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let started = std::fs::read_to_string(dir.join("proxy.toml")).unwrap();
    let at_start = gauge(admin, "countersign_reload_last_success_timestamp_seconds").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(at_start) < 120, "{at_start} vs {now}");
    for (name, value) in [
        ("countersign_reload_last_successful", 1),
        ("countersign_config_file_changed", 0),
        ("countersign_config_file_invalid", 0),
    ] {
        assert_eq!(gauge(admin, name).await, value, "{name} at start");
    }

    // A broken users file: the reload kept it, the gauge says so, the timestamp stays.
    write_file(&dir, "users.toml", BROKEN_USERS);
    proxy.signal("HUP");
    proxy.wait_json_messages("ERROR", &["SIGHUP:", "auth.users_file"], 1);
    assert_eq!(gauge(admin, "countersign_reload_last_successful").await, 0);
    assert_eq!(
        gauge(admin, "countersign_reload_last_success_timestamp_seconds").await,
        at_start
    );

    // Mended, and proxy.toml edited: every file loads; the edit waits for a restart.
    std::thread::sleep(Duration::from_millis(1100));
    write_file(&dir, "users.toml", &users_file_text());
    write_file(
        &dir,
        "proxy.toml",
        &started.replace(
            "shutdown_grace = \"2s\"",
            "shutdown_grace = \"2s\"\nlog_queue_lines = 999",
        ),
    );
    proxy.signal("HUP");
    proxy.wait_json_messages("WARN", &["SIGHUP:", "(1 key: server.log_queue_lines)"], 1);
    assert_eq!(gauge(admin, "countersign_reload_last_successful").await, 1);
    assert!(gauge(admin, "countersign_reload_last_success_timestamp_seconds").await > at_start);
    assert_eq!(gauge(admin, "countersign_config_file_changed").await, 1);
    assert_eq!(gauge(admin, "countersign_config_file_invalid").await, 0);

    // A proxy.toml that would not start the proxy: "invalid", and no longer "changed" (the
    // edit above waits no more; a restart now would fail, not apply it).
    write_file(
        &dir,
        "proxy.toml",
        &started.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"soon\""),
    );
    proxy.signal("HUP");
    proxy.wait_json_messages("ERROR", &["SIGHUP:", "would not start"], 1);
    assert_eq!(gauge(admin, "countersign_config_file_invalid").await, 1);
    assert_eq!(gauge(admin, "countersign_config_file_changed").await, 0);

    // Back as it started: nothing waits.
    write_file(&dir, "proxy.toml", &started);
    proxy.signal("HUP");
    proxy.wait_json_messages("INFO", &["SIGHUP: reloaded auth.users_file"], 3);
    assert_eq!(gauge(admin, "countersign_config_file_changed").await, 0);
    assert_eq!(gauge(admin, "countersign_config_file_invalid").await, 0);
    assert!(proxy.stop().success());
}

/// A proxy whose `proxy.toml` gives its upstream `pool_idle_timeout = "10s"` and
/// `max_response_header_bytes = "64KiB"`, and the text it started from: for the reloads of
/// the same settings written otherwise.
struct SameSettings {
    proxy: RunningProxy,
    admin: SocketAddr,
    dir: TestDir,
    started: String,
    reloads: usize,
    _upstream: Upstream,
}

impl SameSettings {
    async fn start(tag: &str) -> SameSettings {
        let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
        let dir = temp_dir(tag);
        write_file(&dir, "keys.toml", &keyring_file_text("k1"));
        write_file(&dir, "users.toml", &users_file_text());
        let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
            let config = dir.join("proxy.toml");
            let text = config_text(&addr.to_string(), Some(&admin.to_string()), &upstream.url())
                + "pool_idle_timeout = \"10s\"\nmax_response_header_bytes = \"64KiB\"\n";
            write(&config, &text);
            RunningProxy::spawn(&config, &["--workers", "2"])
        });
        proxy.wait_listening(addr);
        let started = std::fs::read_to_string(dir.join("proxy.toml")).unwrap();
        SameSettings {
            proxy,
            admin,
            dir,
            started,
            reloads: 0,
            _upstream: upstream,
        }
    }

    /// Writes `text` as `proxy.toml`, sends SIGHUP and waits for the users file's reload line,
    /// which comes after the lines on `proxy.toml` (and after the gauges are set): the point
    /// where a reload has said all it will.
    fn reload(&mut self, text: &str) {
        replace_file(&self.dir, "proxy.toml", text);
        self.proxy.signal("HUP");
        self.reloads += 1;
        (self.proxy).wait_json_messages(
            "INFO",
            &["SIGHUP: reloaded auth.users_file"],
            self.reloads,
        );
    }

    /// The file as started with two restart keys written at their defaults.
    fn defaults(&self) -> String {
        let text = (self.started)
            .replace(
                "store = \"memory\"",
                "store = \"memory\"\nsweep_interval = \"60s\"",
            )
            .replace(
                "users_file = \"users.toml\"",
                "users_file = \"users.toml\"\nmax_login_body = \"16KiB\"",
            );
        assert!(
            text.contains("sweep_interval") && text.contains("max_login_body"),
            "{text}"
        );
        text
    }

    /// The file as started with the upstream's duration and size spelled otherwise.
    fn respelled(&self) -> String {
        let text = (self.started)
            .replace("\"10s\"", "\"10000ms\"")
            .replace("\"64KiB\"", "65536");
        assert!(
            text.contains("\"10000ms\"") && text.contains("= 65536"),
            "{text}"
        );
        text
    }

    /// The warnings on `proxy.toml` so far.
    fn warnings(&self) -> Vec<String> {
        self.proxy.json_messages("WARN", &["proxy.toml"])
    }
}

/// A key that waits for a restart written out at its default (`sweep_interval = "60s"`,
/// `max_login_body = "16KiB"`) changes no setting: nothing for a restart to apply, so a reload
/// warns of nothing and `countersign_config_file_changed` stays 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_key_written_out_at_its_default_waits_for_nothing() {
    let mut proxy = SameSettings::start("reload-defaults").await;
    proxy.reload(&proxy.defaults());
    assert!(proxy.warnings().is_empty(), "{}", proxy.proxy.log());
    assert_eq!(
        gauge(proxy.admin, "countersign_config_file_changed").await,
        0
    );
    assert!(proxy.proxy.stop().success());
}

/// A duration or size that waits for a restart, spelled another way (`"10s"` as `"10000ms"`,
/// `"64KiB"` as `65536`), is the same setting: no warning, the gauge 0; a live key edited with
/// them is applied and named as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_key_spelled_another_way_waits_for_nothing() {
    let mut proxy = SameSettings::start("reload-respelled").await;
    let text = proxy.respelled().replace(
        "store = \"memory\"",
        "store = \"memory\"\nidle_timeout = \"20m\"",
    );
    proxy.reload(&text);
    let applied = (proxy.proxy).json_messages("INFO", &["SIGHUP:", "proxy.toml: applied"]);
    assert!(
        applied.len() == 1 && applied[0].contains("applied 1 key: session.idle_timeout"),
        "{applied:?}"
    );
    assert!(proxy.warnings().is_empty(), "{}", proxy.proxy.log());
    assert_eq!(
        gauge(proxy.admin, "countersign_config_file_changed").await,
        0
    );
    assert!(proxy.proxy.stop().success());
}

/// A live key spelled another way (`idle_timeout = "20m"` as `"1200s"`) changes no setting
/// either: no "applied" line for it (nothing was applied), no warning, the gauge 0. Edited
/// beside a live key that does change, only that one is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_key_spelled_another_way_is_not_said_applied() {
    let mut proxy = SameSettings::start("reload-live-respelled").await;
    let applied = |proxy: &SameSettings| {
        (proxy.proxy).json_messages("INFO", &["SIGHUP:", "proxy.toml: applied"])
    };
    let with_idle = |idle: &str| {
        (proxy.started).replace(
            "store = \"memory\"",
            &format!("store = \"memory\"\nidle_timeout = \"{idle}\""),
        )
    };
    let (twenty_minutes, respelled) = (with_idle("20m"), with_idle("1200s"));
    assert_ne!(twenty_minutes, proxy.started);

    proxy.reload(&twenty_minutes);
    let lines = applied(&proxy);
    assert!(
        lines.len() == 1 && lines[0].contains("applied 1 key: session.idle_timeout"),
        "{lines:?}"
    );

    proxy.reload(&respelled);
    assert_eq!(applied(&proxy).len(), 1, "{}", proxy.proxy.log());
    assert!(proxy.warnings().is_empty(), "{}", proxy.proxy.log());
    assert_eq!(
        gauge(proxy.admin, "countersign_config_file_changed").await,
        0
    );

    let both = respelled.replace(
        "store = \"memory\"",
        "store = \"memory\"\nabsolute_timeout = \"2h\"",
    );
    proxy.reload(&both);
    let lines = applied(&proxy);
    assert!(
        lines.len() == 2 && lines[1].contains("applied 1 key: session.absolute_timeout"),
        "{lines:?}"
    );
    assert!(proxy.warnings().is_empty(), "{}", proxy.proxy.log());
    assert!(proxy.proxy.stop().success());
}

/// A real change of a key that waits for a restart, among defaults written out and values
/// respelled, is still warned of and named alone (without its value); changed back, nothing
/// waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_change_among_the_same_settings_is_named_alone() {
    let mut proxy = SameSettings::start("reload-real-change").await;
    let same = proxy
        .defaults()
        .replace("\"10s\"", "\"10000ms\"")
        .replace("\"64KiB\"", "65536");
    let changed = same.replace("sweep_interval = \"60s\"", "sweep_interval = \"45s\"");
    assert_ne!(changed, same);
    proxy.reload(&changed);
    let warned = proxy.warnings();
    assert!(
        warned.len() == 1
            && warned[0]
                .contains("changed since the proxy started (1 key: session.sweep_interval)")
            && warned[0].contains("restart it"),
        "{warned:?}"
    );
    assert!(!warned[0].contains("45s"), "a value was logged: {warned:?}");
    assert_eq!(
        gauge(proxy.admin, "countersign_config_file_changed").await,
        1
    );

    proxy.reload(&same);
    assert_eq!(proxy.warnings().len(), 1, "{}", proxy.proxy.log());
    assert_eq!(
        gauge(proxy.admin, "countersign_config_file_changed").await,
        0
    );
    assert!(proxy.proxy.stop().success());
}

/// With `server.reload_check_interval`, an edit of `proxy.toml` is noticed without a signal
/// and named once (not at every check), as SIGHUP would name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_config_file_edit_is_named_once_without_a_signal() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-check-config-file");
    write_file(&dir, "keys.toml", &keyring_file_text("k1"));
    write_file(&dir, "users.toml", &users_file_text());
    let (mut proxy, _addr) = spawn_checking(&dir, &upstream, Some("1s"), None);
    proxy.wait_for_log("server.reload_check_interval");
    let started = std::fs::read_to_string(dir.join("proxy.toml")).unwrap();
    replace_file(
        &dir,
        "proxy.toml",
        &started.replace(
            "shutdown_grace = \"2s\"",
            "shutdown_grace = \"2s\"\nlog_queue_lines = 999",
        ),
    );
    proxy.wait_json_messages(
        "WARN",
        &[
            "file change:",
            "proxy.toml",
            "(1 key: server.log_queue_lines)",
        ],
        1,
    );
    std::thread::sleep(A_FEW_CHECKS);
    assert_eq!(
        proxy.json_messages("WARN", &["proxy.toml"]).len(),
        1,
        "{}",
        proxy.log()
    );
    // Nothing else was reloaded: only the config file changed.
    assert!(
        proxy
            .json_messages("INFO", &["file change: reloaded"])
            .is_empty(),
        "{}",
        proxy.log()
    );
    assert!(proxy.stop().success());
}

// ---------------------------------------------------------------------------------------------
// `server.reload_check_interval`: the same reload, triggered by a change of the files
// ---------------------------------------------------------------------------------------------

/// Replaces `dir/name` with `text` at once (a new file renamed over it), so a check never
/// reads it half-written: the tests count error lines.
fn replace_file(dir: &Path, name: &str, text: &str) {
    let staged = dir.join(format!(".{name}.new"));
    write(&staged, text);
    std::fs::rename(&staged, dir.join(name)).unwrap();
}

/// How long a test waits for a check to notice a change (interval 1s; a loaded 2-core machine).
const NOTICE_DEADLINE: Duration = Duration::from_secs(15);

/// `countersign run --workers 2` with `reload_check_interval = "<interval>"` (None: the key
/// left out) in `[server]`, on the files `dir` holds (`write_config`'s, unless `paths` names
/// others: the `users_file` and `keyring` values).
fn spawn_checking(
    dir: &Path,
    upstream: &Upstream,
    interval: Option<&str>,
    paths: Option<(&str, &str)>,
) -> (RunningProxy, SocketAddr) {
    let (proxy, addr, _) = spawn_checking_with_admin(dir, upstream, interval, paths);
    (proxy, addr)
}

/// [`spawn_checking`] with the admin listener on as well (its address third).
fn spawn_checking_with_admin(
    dir: &Path,
    upstream: &Upstream,
    interval: Option<&str>,
    paths: Option<(&str, &str)>,
) -> (RunningProxy, SocketAddr, SocketAddr) {
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let config = dir.join("proxy.toml");
        let mut text = config_text(&addr.to_string(), Some(&admin.to_string()), &upstream.url());
        if let Some(interval) = interval {
            text = text.replace(
                "shutdown_grace = \"2s\"\n",
                &format!("shutdown_grace = \"2s\"\nreload_check_interval = \"{interval}\"\n"),
            );
            assert!(text.contains("reload_check_interval"), "{text}");
        }
        if let Some((users, keys)) = paths {
            text = text
                .replace(
                    "users_file = \"users.toml\"",
                    &format!("users_file = \"{users}\""),
                )
                .replace("keyring = \"keys.toml\"", &format!("keyring = \"{keys}\""));
        }
        write(&config, &text);
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    (proxy, addr, admin)
}

/// Polls signed requests until the upstream sees `keyid` (or panics after [`NOTICE_DEADLINE`]).
async fn wait_signing_key(
    addr: SocketAddr,
    session: &Login,
    upstream: &Upstream,
    keyid: &str,
    proxy: &RunningProxy,
) {
    let deadline = Instant::now() + NOTICE_DEADLINE;
    while signing_key(addr, session, upstream).await != keyid {
        assert!(
            Instant::now() < deadline,
            "the proxy does not sign with {keyid}: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Long enough for a few checks at "1s": for what must *not* happen (nothing can be polled
/// for), so a slow machine only makes the test weaker, never flaky.
const A_FEW_CHECKS: Duration = Duration::from_millis(3500);

/// Kubernetes' layout of a Secret volume in `dir`: the files live in `..<version>/`,
/// `..data` points there, and each name in `dir` is a symlink into `..data/`. Calling it
/// again with a new version swaps the whole volume at once, as the kubelet does: a new
/// folder, then a new `..data` symlink renamed over the old one (atomic).
fn secret_volume(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap();
    }
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(format!("..{version}"), &staged).unwrap();
    std::fs::rename(&staged, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keyring_is_used_without_a_signal_when_checking() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-check-keys");
    write_file(&dir, "keys.toml", &keyring_file_text("k1"));
    write_file(&dir, "users.toml", &users_file_text());
    let (mut proxy, addr) = spawn_checking(&dir, &upstream, Some("1s"), None);
    proxy.wait_for_log("server.reload_check_interval");
    let session = login_alice_at(addr).await;
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");

    replace_file(&dir, "keys.toml", &keyring_file_text("k2"));
    wait_signing_key(addr, &session, &upstream, "k2", &proxy).await;
    let loaded = proxy.wait_json_messages(
        "INFO",
        &["file change: reloaded signing.keyring", "active key k2"],
        1,
    );
    assert!(loaded[0].contains("keys.toml"), "{loaded:?}");
    // Only the file that changed was reloaded: the users file was not read again.
    let log = proxy.log();
    assert!(
        proxy.json_messages("INFO", &["auth.users_file"]).is_empty(),
        "{log}"
    );
    assert!(!log.contains("SIGHUP:"), "no signal was sent: {log}");
    assert!(proxy.stop().success());
}

/// A Secret volume swapped the Kubernetes way (a new folder, the `..data` symlink renamed):
/// the paths in `proxy.toml` are symlinks that never change themselves, yet the new keyring
/// and users file are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_volume_swapped_by_symlink_is_noticed() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-check-symlink");
    let secret = dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    let alice = users_file_text();
    secret_volume(
        &secret,
        "v1",
        &[
            ("keys.toml", &keyring_file_text("k1")),
            ("users.toml", &alice),
        ],
    );
    let (mut proxy, addr) = spawn_checking(
        &dir,
        &upstream,
        Some("1s"),
        Some(("secret/users.toml", "secret/keys.toml")),
    );
    let session = login_alice_at(addr).await;
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");
    let link_times = std::fs::symlink_metadata(secret.join("keys.toml"))
        .unwrap()
        .modified()
        .unwrap();

    secret_volume(
        &secret,
        "v2",
        &[
            ("keys.toml", &keyring_file_text("k2")),
            // alice unchanged (the same hash): a reload ends the sessions of removed or
            // changed users, and this test goes on with alice's.
            ("users.toml", &format!("{alice}{}", carol_users())),
        ],
    );
    assert_eq!(
        std::fs::symlink_metadata(secret.join("keys.toml"))
            .unwrap()
            .modified()
            .unwrap(),
        link_times,
        "the configured path itself did not change"
    );
    wait_signing_key(addr, &session, &upstream, "k2", &proxy).await;
    proxy.wait_json_messages(
        "INFO",
        &["file change: reloaded auth.users_file", "(users: 2)"],
        1,
    );
    assert_eq!(
        login_status(addr, "carol", "carol-pw").await,
        StatusCode::OK
    );
    assert!(proxy.stop().success());
}

/// A broken file is logged once (not at every check) and the current one stays in use; a
/// different broken content is logged again; a valid one is then loaded. The keyring's
/// `secret_file` is watched too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_logged_once_and_a_later_valid_one_is_loaded() {
    use base64::Engine as _;
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-check-broken");
    let k1_secret = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    write_file(&dir, "k1.secret", &k1_secret);
    // keyring_file_text's k1, with its secret in a file of its own.
    let keys_with_secret_file = keyring_file_text("k1").replacen(
        &format!("secret = \"{k1_secret}\""),
        "secret_file = \"k1.secret\"",
        1,
    );
    assert!(keys_with_secret_file.contains("secret_file"));
    write_file(&dir, "keys.toml", &keys_with_secret_file);
    write_file(&dir, "users.toml", &users_file_text());
    let (mut proxy, addr) = spawn_checking(&dir, &upstream, Some("1s"), None);
    let session = login_alice_at(addr).await;
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");
    let not_reloaded = [
        "file change: signing.keyring not reloaded",
        "keeping the current keys",
    ];

    // The keyring file unchanged, its secret file broken: noticed, refused, k1 signs on.
    replace_file(&dir, "k1.secret", "not base64!");
    let errors = proxy.wait_json_messages("ERROR", &not_reloaded, 1);
    assert!(
        errors[0].contains("k1.secret") && errors[0].contains("keys[0].secret_file"),
        "names the file and the key: {errors:?}"
    );
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");
    // Unchanged since: not logged again.
    tokio::time::sleep(A_FEW_CHECKS).await;
    assert_eq!(
        proxy.json_messages("ERROR", &not_reloaded).len(),
        1,
        "{}",
        proxy.log()
    );

    // Another broken content (the active key not listed): logged again, k1 signs on.
    replace_file(&dir, "k1.secret", &k1_secret);
    replace_file(&dir, "keys.toml", &broken_keys());
    let errors = proxy.wait_json_messages("ERROR", &not_reloaded, 2);
    assert!(errors[1].contains("k9"), "{errors:?}");
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");

    // A broken users file next to it: its own line, the current users stay.
    replace_file(&dir, "users.toml", BROKEN_USERS);
    proxy.wait_json_messages(
        "ERROR",
        &["file change: auth.users_file not reloaded", "users[0]"],
        1,
    );
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK
    );

    // Valid again: loaded.
    replace_file(&dir, "keys.toml", &keyring_file_text("k2"));
    wait_signing_key(addr, &session, &upstream, "k2", &proxy).await;
    replace_file(&dir, "users.toml", &carol_users());
    proxy.wait_json_messages("INFO", &["file change: reloaded auth.users_file"], 1);
    assert_eq!(
        login_status(addr, "carol", "carol-pw").await,
        StatusCode::OK
    );
    assert_eq!(proxy.json_messages("ERROR", &not_reloaded).len(), 2);
    assert!(proxy.stop().success());
}

/// A checked reload reads only the files that changed, so the reload gauges keep each file's
/// last outcome: a keyring still broken stays `countersign_reload_last_successful 0`, with the
/// timestamp of the last time all loaded, while the users file, changed next, loads. Before,
/// that users reload set the gauge back to 1 and the timestamp to now: the alert cleared
/// while the old keys went on signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_broken_keeps_the_reload_gauges_when_another_loads() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-check-gauges");
    write_file(&dir, "keys.toml", &keyring_file_text("k1"));
    write_file(&dir, "users.toml", &users_file_text());
    let (mut proxy, _addr, admin) = spawn_checking_with_admin(&dir, &upstream, Some("1s"), None);
    let successful = "countersign_reload_last_successful";
    let timestamp = "countersign_reload_last_success_timestamp_seconds";
    let at_start = gauge(admin, timestamp).await;
    assert_eq!(gauge(admin, successful).await, 1);

    replace_file(&dir, "keys.toml", &broken_keys());
    proxy.wait_json_messages("ERROR", &["file change: signing.keyring not reloaded"], 1);
    assert_eq!(gauge(admin, successful).await, 0);
    assert_eq!(gauge(admin, timestamp).await, at_start);

    // A second later (the timestamp has whole seconds), the users file changes and loads.
    std::thread::sleep(Duration::from_millis(1100));
    replace_file(&dir, "users.toml", &carol_users());
    proxy.wait_json_messages("INFO", &["file change: reloaded auth.users_file"], 1);
    assert_eq!(gauge(admin, successful).await, 0, "{}", proxy.log());
    assert_eq!(gauge(admin, timestamp).await, at_start);

    // The keyring mended: nothing fails now.
    replace_file(&dir, "keys.toml", &keyring_file_text("k2"));
    proxy.wait_json_messages("INFO", &["file change: reloaded signing.keyring"], 1);
    assert_eq!(gauge(admin, successful).await, 1);
    assert!(gauge(admin, timestamp).await > at_start);
    assert!(proxy.stop().success());
}

/// `"off"` (and the default): no check, nothing reloaded until SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_checking_off_only_sighup_reloads() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    for interval in [Some("off"), None] {
        let dir = temp_dir("reload-check-off");
        write_file(&dir, "keys.toml", &keyring_file_text("k1"));
        write_file(&dir, "users.toml", &users_file_text());
        let (mut proxy, addr) = spawn_checking(&dir, &upstream, interval, None);
        let session = login_alice_at(addr).await;
        assert_eq!(signing_key(addr, &session, &upstream).await, "k1");

        replace_file(&dir, "keys.toml", &keyring_file_text("k2"));
        tokio::time::sleep(A_FEW_CHECKS).await;
        assert_eq!(signing_key(addr, &session, &upstream).await, "k1");
        let log = proxy.log();
        assert!(
            !log.contains("file change") && !log.contains("reload_check_interval"),
            "{interval:?}: {log}"
        );

        proxy.signal("HUP");
        wait_signing_key(addr, &session, &upstream, "k2", &proxy).await;
        assert!(proxy.stop().success());
    }
}

/// Bad values are config errors naming the file, the key and the problem, at `check-config`
/// and `run` alike; `"off"` and durations of 1s or more are accepted.
#[test]
fn reload_check_interval_values_are_checked() {
    let file = Path::new("/etc/countersign/proxy.toml");
    let parse = |value: &str| {
        let text = config_text("127.0.0.1:8080", None, "http://127.0.0.1:3000").replace(
            "shutdown_grace = \"2s\"\n",
            &format!("shutdown_grace = \"2s\"\nreload_check_interval = {value}\n"),
        );
        ProxyConfig::parse(&text, file).map(|c| c.server.reload_check_interval)
    };
    assert_eq!(parse("\"off\"").unwrap(), None);
    assert_eq!(parse("\"1s\"").unwrap(), Some(Duration::from_secs(1)));
    assert_eq!(
        parse("\"1500ms\"").unwrap(),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(parse("\" 30s \"").unwrap(), Some(Duration::from_secs(30)));
    let absent = config_text("127.0.0.1:8080", None, "http://127.0.0.1:3000");
    assert_eq!(
        ProxyConfig::parse(&absent, file)
            .unwrap()
            .server
            .reload_check_interval,
        None,
        "off by default"
    );
    for (value, problem) in [
        ("\"500ms\"", "shorter than the minimum of \"1s\""),
        ("\"999ms\"", "shorter than the minimum of \"1s\""),
        ("\"0s\"", "must be greater than zero"),
        ("\"soon\"", "invalid duration \"soon\""),
        ("\"\"", "invalid duration"),
        ("\"366d\"", "longer than the maximum of 365d"),
        ("30", "server.reload_check_interval"),
    ] {
        let error = parse(value).expect_err(value).to_string();
        assert!(
            error.starts_with("/etc/countersign/proxy.toml: server.reload_check_interval: ")
                && error.contains(problem),
            "{value}: {error}"
        );
    }

    // `check-config` says the same and exits 2.
    let dir = temp_dir("reload-check-config");
    let config = write_config(
        &dir,
        "127.0.0.1:8080",
        None,
        "http://127.0.0.1:3000",
        &keyring_file_text("k1"),
        &users_file_text(),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "shutdown_grace = \"2s\"\n",
        "shutdown_grace = \"2s\"\nreload_check_interval = \"100ms\"\n",
    );
    write(&config, &text);
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("proxy.toml: server.reload_check_interval:")
            && stderr.contains("\"100ms\" is shorter than the minimum of \"1s\""),
        "{stderr}"
    );
}

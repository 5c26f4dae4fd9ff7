//! `countersign check-config --online`: after the offline checks, the servers the config names
//! are connected to with its timeouts, one line per check (config key, target, what was found,
//! never a password), exit 1 when a required one fails: the Redis store (connect, credentials,
//! Sentinel, `maxmemory-policy noeviction` through the stores' own connection check, primary),
//! each upstream (TCP; TLS with the forwarding trust roots for https; `required_for_ready =
//! false` only warns) and `verify_url`. And `run`'s one-shot Redis check at startup: an ERROR
//! line naming the problem without any request, the proxy running all the same.
//!
//! Real servers on loopback: `redis-server` (and a sentinel), hyper upstreams (http and https
//! with a private CA), a port nothing listens on. Without `redis-server` the Redis tests fail,
//! naming how to install it.
//! Run: `cargo test --all-features --test proxy_preflight`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_redis;
mod support_run;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use countersign::clock::{SharedClock, SystemClock};
use support::TestDir;
use support::{
    keyring_file_text, start_tls_upstream, start_upstream, test_keyring, users_file_text,
};
use support_cli::{run_countersign, Checked};
use support_redis::{RedisServer, SentinelServer, SENTINEL_MASTER};
use support_run::RunningProxy;

fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A fresh config directory: `keys.toml`, `users.toml` and `proxy.toml` made of `session`
/// (the `[session]` lines), `auth` (the `[auth]` lines) and `upstreams` (the `[[upstream]]`
/// tables).
fn config_dir(tag: &str, session: &str, auth: &str, upstreams: &str) -> (TestDir, PathBuf) {
    config_dir_listening(tag, "127.0.0.1:0", None, session, auth, upstreams)
}

/// [`config_dir`] with the proxy on `listen`, and an `[admin]` listener on `admin` if given.
fn config_dir_listening(
    tag: &str,
    listen: &str,
    admin: Option<&str>,
    session: &str,
    auth: &str,
    upstreams: &str,
) -> (TestDir, PathBuf) {
    let dir = support::temp_dir(&format!("preflight-{tag}"));
    support::write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    support::write(&dir.join("users.toml"), &users_file_text());
    let admin = admin
        .map(|admin| format!("[admin]\nlisten = \"{admin}\"\n"))
        .unwrap_or_default();
    let config = dir.join("proxy.toml");
    support::write(
        &config,
        &format!(
            "[server]\nlisten = \"{listen}\"\npublic_origin = \"http://app.test\"\n{admin}\
             [session]\n{session}\n[auth]\n{auth}\n[signing]\nkeyring = \"keys.toml\"\n\
             {upstreams}"
        ),
    );
    (dir, config)
}

/// [`config_dir`] with `session` for the `[session]` lines, the users file and one upstream,
/// "api", at `api_url`: the config of the Redis checks.
fn redis_config(tag: &str, session: &str, api_url: &str) -> (TestDir, PathBuf) {
    config_dir(tag, session, USERS, &upstream("api", api_url, ""))
}

/// The `[session]` lines of a Redis store at `redis_url`, database 0.
fn redis_session(redis_url: &str) -> String {
    format!("store = \"redis\"\nredis_url = \"{redis_url}/0\"")
}

fn upstream(name: &str, url: &str, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\nprefix = \"/{name}/\"\nurl = \"{url}\"\n{extra}\n")
}

const USERS: &str = "users_file = \"users.toml\"";
const MEMORY: &str = "store = \"memory\"";

/// `countersign check-config --online --config <config>`, off the test's runtime (its servers
/// keep answering meanwhile).
async fn check_online(config: &Path) -> Checked {
    check_with(config, true).await
}

async fn check_with(config: &Path, online: bool) -> Checked {
    let mut args = vec!["check-config".to_owned()];
    if online {
        args.push("--online".to_owned());
    }
    args.push("--config".to_owned());
    args.push(config.display().to_string());
    let output = tokio::task::spawn_blocking(move || run_countersign(&args, b""))
        .await
        .unwrap();
    Checked::from(output)
}

#[track_caller]
fn assert_status(line: &str, status: &str) {
    assert!(line.starts_with(status), "{status}: {line}");
}

/// The line of `key`: `ok` when `code` is 0, else `FAIL` and containing `fail_needle`.
#[track_caller]
fn assert_ok_or_fail<'a>(run: &'a Checked, key: &str, code: i32, fail_needle: &str) -> &'a str {
    let line = run.line(key);
    if code == 0 {
        assert_status(line, "ok");
    } else {
        assert_status(line, "FAIL");
        assert!(line.contains(fail_needle), "{line}");
    }
    line
}

/// Everything up: a Redis (its default policy is noeviction), an http upstream, an https
/// upstream with a private CA trusted through `ca_file`. One `ok` line each naming the key and
/// the target, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_reachable_passes_with_one_line_per_check() {
    let redis = RedisServer::start();
    let api = start_upstream(test_keyring(), clock()).await;
    let (secure, ca) = start_tls_upstream(clock()).await;
    let dir = support::temp_dir("preflight-all-up-ca");
    let ca_file = dir.join("ca.pem");
    support::write(&ca_file, &ca.pem());
    let (_dir, config) = config_dir(
        "all-up",
        &redis_session(&redis.url()),
        USERS,
        &format!(
            "{}{}",
            upstream("api", &api.url(), ""),
            upstream(
                "secure",
                &format!("https://127.0.0.1:{}", secure.addr.port()),
                &format!("ca_file = {:?}", ca_file.display().to_string()),
            )
        ),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(0), "{run}");
    let redis_line = run.line("session.redis_url");
    assert_status(redis_line, "ok");
    assert!(
        redis_line.contains(&format!("redis://127.0.0.1:{}/0", redis.addr().port())),
        "{redis_line}"
    );
    assert!(
        redis_line.contains("maxmemory-policy noeviction, the writable primary"),
        "{redis_line}"
    );
    let api_line = run.line("upstream[0].url");
    assert_status(api_line, "ok");
    assert!(
        api_line.contains(&format!("(api) {}", api.url())),
        "{api_line}"
    );
    assert!(api_line.contains("TCP connected"), "{api_line}");
    let secure_line = run.line("upstream[1].url");
    assert_status(secure_line, "ok");
    assert!(secure_line.contains("TLS handshake ok"), "{secure_line}");
    assert!(
        run.stdout
            .contains("online checks ok (3 checks, 0 warnings)"),
        "{run}"
    );
    // The offline line comes first, as without --online.
    assert!(
        run.stdout
            .starts_with(&format!("{}: ok\n", config.display())),
        "{run}"
    );
}

/// An upstream that is down fails the check (exit 1, not 2: the config itself is valid), and
/// so does an https upstream whose certificate the proxy would not trust (no `ca_file`): the
/// forwarding connector's roots are used, so what passes here passes when forwarding. An
/// upstream with `required_for_ready = false` only warns. Without `--online` nothing is
/// connected to and the same config passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_down_or_untrusted_fail_and_optional_ones_warn() {
    let (_held, down) = support::refusing_addr();
    let (secure, _ca) = start_tls_upstream(clock()).await;
    let (_dir, config) = config_dir(
        "upstreams",
        MEMORY,
        USERS,
        &format!(
            "{}{}{}",
            upstream("api", &format!("http://{down}"), ""),
            upstream(
                "untrusted",
                &format!("https://127.0.0.1:{}", secure.addr.port()),
                ""
            ),
            upstream(
                "reports",
                &format!("http://{down}"),
                "required_for_ready = false"
            ),
        ),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    let api = run.line("upstream[0].url");
    assert_status(api, "FAIL");
    assert!(api.contains(&format!("(api) http://{down}")), "{api}");
    assert!(api.contains("Connection refused"), "{api}");
    let untrusted = run.line("upstream[1].url");
    assert_status(untrusted, "FAIL");
    assert!(untrusted.contains("certificate"), "{untrusted}");
    let reports = run.line("upstream[2].url");
    assert_status(reports, "WARN");
    assert!(reports.contains("required_for_ready = false"), "{reports}");
    assert!(run.stderr.contains("2 of 3 online checks failed"), "{run}");
    // No Redis line with the memory store.
    assert!(!run.stdout.contains("session."), "{run}");

    let offline = check_with(&config, false).await;
    assert_eq!(offline.code, Some(0), "{offline}");
    assert_eq!(offline.stdout, format!("{}: ok\n", config.display()));
}

/// Only optional upstreams down: warnings, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_upstreams_down_only_warn() {
    let (_held, down) = support::refusing_addr();
    let api = start_upstream(test_keyring(), clock()).await;
    let (_dir, config) = config_dir(
        "optional",
        MEMORY,
        USERS,
        &format!(
            "{}{}",
            upstream("api", &api.url(), ""),
            upstream(
                "reports",
                &format!("http://{down}"),
                "required_for_ready = false"
            ),
        ),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_status(run.line("upstream[1].url"), "WARN");
    assert!(
        run.stdout
            .contains("online checks ok (2 checks, 1 warnings)"),
        "{run}"
    );
}

/// A Redis with `maxmemory-policy allkeys-lru` is refused by the stores' own connection check
/// (the one `run` makes at every connection), and the line says so: server, policy, fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_fails_naming_the_policy() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let api = start_upstream(test_keyring(), clock()).await;
    let (_dir, config) = redis_config("evicting", &redis_session(&redis.url()), &api.url());
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    let line = assert_ok_or_fail(&run, "session.redis_url", 1, "maxmemory-policy allkeys-lru");
    assert!(line.contains("maxmemory-policy noeviction"), "{line}");
    assert_status(run.line("upstream[0].url"), "ok");
    assert!(run.stderr.contains("1 of 2 online checks failed"), "{run}");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing written");
}

/// A real Redis 5.0 (built by scripts/old-redis.sh) refuses `HELLO`, so its version is read
/// from `INFO server`: the line fails naming it and the version needed, instead of passing on
/// its `PONG` while every store call would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_before_7_that_refuses_hello_fails_naming_its_version() {
    let redis = RedisServer::start_program(&support_redis::old_redis_server("5.0.6"), &[]);
    let api = start_upstream(test_keyring(), clock()).await;
    let (_dir, config) = redis_config("redis-5", &redis_session(&redis.url()), &api.url());
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    let line = assert_ok_or_fail(&run, "session.redis_url", 1, "it runs Redis 5.0");
    assert!(line.contains("needs 7.0 or later"), "{line}");
    assert_status(run.line("upstream[0].url"), "ok");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing written");
}

/// Credentials: a wrong password fails as refused credentials, a right one passes; the password
/// is printed nowhere. A Redis that is down fails as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_redis_down_fail_without_printing_the_password() {
    const RIGHT: &str = "right-S3cret";
    const WRONG: &str = "wrong-S3cret";
    let redis = RedisServer::start_with(&["--requirepass", RIGHT]);
    let api = start_upstream(test_keyring(), clock()).await;
    let with_password = |tag: &str, password: &str| {
        let url = format!("redis://:{password}@127.0.0.1:{}", redis.addr().port());
        redis_config(tag, &redis_session(&url), &api.url())
    };
    for (tag, password, code, needle) in [
        ("wrong-pw", WRONG, 1, "authentication failed"),
        ("right-pw", RIGHT, 0, ""),
    ] {
        let (_dir, config) = with_password(tag, password);
        let run = check_online(&config).await;
        assert_eq!(run.code, Some(code), "{run}");
        assert_ok_or_fail(&run, "session.redis_url", code, needle);
        assert!(
            !run.to_string().contains(password),
            "password printed: {run}"
        );
    }

    let (_held, down) = support::refusing_addr();
    let session = format!(
        "{}\nredis_connect_timeout = \"1s\"",
        redis_session(&format!("redis://:{RIGHT}@{down}"))
    );
    let (_dir, config) = redis_config("redis-down", &session, &api.url());
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_ok_or_fail(&run, "session.redis_url", 1, &down.to_string());
    assert!(!run.to_string().contains(RIGHT), "password printed: {run}");
}

/// A `redis_url` that leads to a replica (a stale address after a failover): it answers PING
/// and has the right policy, but refuses every write; the readiness check's role test fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fails_as_not_the_primary() {
    let (primary, replica) = support_redis::primary_and_replica(&[]);
    let api = start_upstream(test_keyring(), clock()).await;
    for (server, code) in [(&primary, 0), (&replica, 1)] {
        let session = redis_session(&server.url());
        let (_dir, config) = redis_config(&format!("replica-{code}"), &session, &api.url());
        let run = check_online(&config).await;
        assert_eq!(run.code, Some(code), "{run}");
        assert_ok_or_fail(&run, "session.redis_url", code, "replica");
    }
}

/// With Sentinel the line names `session.redis_sentinels` and the sentinels, and passes when
/// they name a usable primary; the primary's eviction policy is checked there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_finds_the_primary_and_its_policy_is_checked() {
    let api = start_upstream(test_keyring(), clock()).await;
    for (policy, code) in [("noeviction", 0), ("volatile-lru", 1)] {
        let primary = RedisServer::start_with(&["--maxmemory-policy", policy]);
        let sentinel = SentinelServer::start(primary.addr());
        let session = format!(
            "store = \"redis\"\nredis_sentinels = [\"{}\"]\nredis_sentinel_master = \
             \"{SENTINEL_MASTER}\"",
            sentinel.addr()
        );
        let (_dir, config) = redis_config(&format!("sentinel-{policy}"), &session, &api.url());
        let run = check_online(&config).await;
        assert_eq!(run.code, Some(code), "{policy}: {run}");
        let line = assert_ok_or_fail(
            &run,
            "session.redis_sentinels",
            code,
            "maxmemory-policy volatile-lru",
        );
        assert!(line.contains(&sentinel.addr().to_string()), "{line}");
    }
}

/// `verify_url` is connected to (no login is sent): up passes, down fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_url_is_connected_to() {
    let api = start_upstream(test_keyring(), clock()).await;
    let (_up_dir, up) = config_dir(
        "verify-up",
        MEMORY,
        &format!("verify_url = \"{}/auth/verify\"", api.url()),
        &upstream("api", &api.url(), ""),
    );
    let run = check_online(&up).await;
    assert_eq!(run.code, Some(0), "{run}");
    let line = run.line("auth.verify_url");
    assert_status(line, "ok");
    assert!(line.contains("no login sent"), "{line}");
    let before = api.raw_count();

    let (_held, down) = support::refusing_addr();
    let (_dir, config) = config_dir(
        "verify-down",
        MEMORY,
        &format!("verify_url = \"http://{down}/auth/verify\""),
        &upstream("api", &api.url(), ""),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_status(run.line("auth.verify_url"), "FAIL");
    // Connections only: no request reached the API.
    assert_eq!(api.raw_count(), before);
    assert_eq!(api.raw_count(), 0);
}

/// An offline failure is still exit 2 with its one message, and nothing is connected to (the
/// Redis and the upstream addresses are listeners that record any connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_failures_stop_before_connecting() {
    let redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_dir, config) = config_dir(
        "offline-bad",
        &format!(
            "store = \"redis\"\nredis_url = \"redis://{}/0\"",
            redis.local_addr().unwrap()
        ),
        USERS,
        &upstream("api", &format!("http://{}", api.local_addr().unwrap()), ""),
    );
    std::fs::remove_file(config.parent().unwrap().join("keys.toml")).unwrap();
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("signing.keyring"), "{run}");
    assert_eq!(run.stdout, "", "{run}");
    for listener in [&redis, &api] {
        listener.set_nonblocking(true).unwrap();
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "something connected: {accepted:?}"
        );
    }
}

/// The status code of `GET path` at `addr` (HTTP/1.1, one connection, std only).
fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    let answer = support::blocking_get(addr, path);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

// ---------------------------------------------------------------------------------------------
// `run` at startup
// ---------------------------------------------------------------------------------------------

/// `countersign run` on free ports with a Redis store at `redis_url` (as written), an admin
/// listener when `with_admin`, and one upstream nothing answers on; waits until it listens.
fn spawn_run(
    tag: &str,
    redis_url: &str,
    with_admin: bool,
) -> (RunningProxy, std::net::SocketAddr, std::net::SocketAddr) {
    support_run::start_on_free_ports(|listen, admin| {
        let config = config_dir_listening(
            tag,
            &listen.to_string(),
            with_admin.then(|| admin.to_string()).as_deref(),
            &format!("store = \"redis\"\nredis_url = \"{redis_url}\""),
            USERS,
            &upstream("api", "http://127.0.0.1:9", ""),
        );
        let (dir, config) = config;
        RunningProxy::spawn(&config, &[]).keep_dir(dir)
    })
}

/// `countersign run` with a Redis that may evict: an ERROR line at startup names the policy
/// and the fix, without any request, and the proxy runs (listening, `/readyz` 503). Redis down:
/// an ERROR line naming the server.
#[test]
fn run_logs_an_unusable_redis_at_startup_and_keeps_running() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let (_held, down) = support::refusing_addr();
    for (tag, url, needles) in [
        (
            "evicting",
            format!("{}/0", redis.url()),
            vec![
                "startup check".to_owned(),
                "maxmemory-policy allkeys-lru".to_owned(),
                "noeviction".to_owned(),
            ],
        ),
        (
            "down",
            format!("redis://:pw-S3cret@{down}/0"),
            vec!["startup check".to_owned(), down.to_string()],
        ),
    ] {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let (mut proxy, listen, admin) = spawn_run(&format!("run-{tag}"), &url, true);
        let errors = proxy.wait_json_messages("ERROR", &needles, 1);
        assert!(
            !proxy.log().contains("pw-S3cret"),
            "{tag}: password logged: {}",
            proxy.log()
        );
        assert!(errors[0].contains("runs anyway"), "{tag}: {errors:?}");
        // Still running and listening; not ready.
        proxy.wait_listening(listen);
        assert_eq!(http_status(admin, "/readyz"), 503, "{tag}");
        assert!(proxy.stop().success(), "{tag}: {}", proxy.log());
    }
}

/// `countersign run` on a real Redis 5.0 (built by scripts/old-redis.sh), which answers
/// `PING` but refuses the 7.0 forms of the stores' scripts: the startup check's ERROR line
/// names the server's version (read from `INFO server`: 5.0 refuses `HELLO`), `/readyz` is
/// 503, and a login that reaches it anyway is 503 `session_store_unavailable`, its ERROR line
/// saying that countersign needs Redis 7.0 or later instead of only the script's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_redis_5_is_not_ready_and_names_the_version_it_needs() {
    let redis = RedisServer::start_program(&support_redis::old_redis_server("5.0.6"), &[]);
    let url = format!("{}/0", redis.url());
    let (mut proxy, listen, admin) =
        tokio::task::spawn_blocking(move || spawn_run("run-redis-5", &url, true))
            .await
            .unwrap();
    let errors = proxy.wait_json_messages("ERROR", &["startup check", "it runs Redis 5.0"], 1);
    assert!(errors[0].contains("7.0 or later"), "{errors:?}");
    let readyz = tokio::task::spawn_blocking(move || http_status(admin, "/readyz"))
        .await
        .unwrap();
    assert_eq!(readyz, 503, "{}", proxy.log());

    let reply = support::login_at(listen, "alice", support::ALICE_PASSWORD).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.text().contains("session_store_unavailable"),
        "{}",
        reply.text()
    );
    let refused = proxy.wait_json_messages(
        "ERROR",
        &[
            "session_store_unavailable",
            "countersign needs Redis 7.0 or later",
        ],
        1,
    );
    assert!(refused[0].contains("From Lua script"), "{refused:?}");
    assert!(proxy.stop().success(), "{}", proxy.log());
}

/// A usable Redis at startup: one INFO line, no ERROR.
#[test]
fn run_logs_a_usable_redis_at_startup() {
    let redis = RedisServer::start();
    let (mut proxy, _listen, _admin) =
        spawn_run("run-usable", &format!("{}/0", redis.url()), false);
    proxy.wait_json_messages("INFO", &["startup check: redis usable"], 1);
    assert!(
        proxy.json_messages("ERROR", &[]).is_empty(),
        "{}",
        proxy.log()
    );
    assert!(proxy.stop().success());
}

/// A least-privilege ACL user without `INFO`: the policy cannot be read, which the running
/// proxy accepts with a warning; the check passes and says so, rather than claiming
/// `noeviction`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_info_passes_and_says_the_policy_is_unknown() {
    let redis = RedisServer::start();
    assert_eq!(
        redis.cli(&[
            "ACL",
            "SETUSER",
            "countersign",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-info"
        ]),
        "OK"
    );
    let api = start_upstream(test_keyring(), clock()).await;
    let url = format!("redis://countersign:pw@127.0.0.1:{}", redis.addr().port());
    let (_dir, config) = config_dir(
        "no-info",
        &redis_session(&url),
        USERS,
        &upstream("api", &api.url(), ""),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(0), "{run}");
    let redis_line = run.line("session.redis_url");
    assert_status(redis_line, "ok");
    assert!(
        redis_line.contains("maxmemory-policy not readable") && redis_line.contains("NOPERM"),
        "{redis_line}"
    );
    assert!(
        !run.stdout.contains("pw@"),
        "the password was printed: {run}"
    );
}

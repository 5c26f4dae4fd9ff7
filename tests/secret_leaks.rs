//! Secrets never reach logs, error messages, answers or `Debug` output: keyring secrets,
//! session ids, CSRF tokens, login passwords, password hashes and Redis passwords, checked on
//! the real binary (`run` at `RUST_LOG=trace` in both log formats, `check-config`, `sign`) and
//! on the public types that hold them. Every secret is looked for in each of its encodings
//! (text, base64, base64url, hex, percent-encoding, a `Debug` byte list).
//! Run: `cargo test --all-features --test secret_leaks`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_redis;
mod support_run;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use countersign::clock::SystemClock;
use countersign::core::{KeySpec, Keyring, KeyringHandle, Policy, Rotation, Secret, Verifier};
use countersign::core::{Signer, SignerConfig};
use countersign::proxy::config::ProxyConfig;
use http::{Method, StatusCode};
use support::*;
use support_cli::run_countersign;
use support_redis::RedisServer;
use support_run::{config_text, start_on_free_ports, RunningProxy};

/// The keyring secret of every test here: 32 distinct bytes, so each encoding is distinctive.
fn key_bytes() -> [u8; 32] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
}

/// A second secret, written only into broken keyring files (reload and CLI errors).
fn other_key_bytes() -> [u8; 32] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(53).wrapping_add(201))
}

const RIGHT_PASSWORD: &str = "Right-Pw-q7Zk3vX9";
const WRONG_PASSWORD: &str = "Wrong-Pw-m4Tn8yR2";
const REDIS_PASSWORD: &str = "Redis-Pw-h6Wd2pL5";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Every form in which `bytes` could show up in text: base64 (padded and not), base64url, hex
/// (both cases), and the start of a `Debug` byte list (`[11, 48, 85, ...`).
fn byte_secret_forms(bytes: &[u8]) -> Vec<String> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let debug_list = bytes[..6]
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        b64(bytes),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        hex.clone(),
        hex.to_uppercase(),
        debug_list,
    ]
}

/// A text secret as it could show up: as is, percent-encoded, base64.
fn text_secret_forms(text: &str) -> Vec<String> {
    let percent =
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string();
    vec![text.to_owned(), percent, b64(text.as_bytes())]
}

/// Panics naming the secret and showing `haystack` when any form of a secret is in it.
fn assert_hides(haystack: &str, what: &str, forms: &[String]) {
    for form in forms {
        assert!(
            !haystack.contains(form.as_str()),
            "{what} ({form}) is in:\n{haystack}"
        );
    }
}

fn keyring_text(secret: &[u8]) -> String {
    format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{}\"\n",
        b64(secret)
    )
}

fn keyring_handle() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(key_bytes().to_vec()).unwrap()).unwrap())
}

fn users_text(hash: &str) -> String {
    format!("[[users]]\nname = \"alice\"\npassword = \"{hash}\"\nroles = [\"admin\"]\n")
}

/// Writes `text` as `name` in `dir` and returns its path.
fn put(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    write(&path, text);
    path
}

// ---------------------------------------------------------------------------------------------
// The running proxy: logs, answers, forwarded requests, metrics
// ---------------------------------------------------------------------------------------------

/// `/metrics` of the admin listener.
async fn metrics(admin: SocketAddr) -> String {
    send(admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text()
}

/// Lines of `/metrics` that are series (not comments).
fn series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name).to_owned())
        .collect()
}

/// Requests whose path, method and login name differ by `tag`: none of them may add a metric
/// series.
async fn varied_requests(addr: SocketAddr, session: &Login, tag: &str) {
    for i in 0..8 {
        let id = format!("{tag}{i}");
        let _ = get(addr, &format!("/api/items/{id}?token={id}"), session).await;
        let _ = send(
            addr,
            Method::GET,
            &format!("/nowhere/{id}"),
            &[],
            Bytes::new(),
        )
        .await;
        let method = Method::from_bytes(format!("X{id}").to_uppercase().as_bytes()).unwrap();
        let _ = send(
            addr,
            method,
            "/api/x",
            &[("cookie", &session.cookie)],
            Bytes::new(),
        )
        .await;
        let _ = login_at(addr, &format!("user-{id}"), WRONG_PASSWORD).await;
    }
}

/// Runs the proxy at `RUST_LOG=trace` in front of a real upstream (cookies forwarded) and a
/// dead one, drives every path that handles a secret, reloads broken files, and checks the
/// log, the answers, what the upstream received and the metrics.
async fn proxy_run_hides_secrets(log_format: &str) {
    let upstream = start_upstream(keyring_handle(), Arc::new(SystemClock)).await;
    let hash = cheap_hash(RIGHT_PASSWORD);
    let dir = temp_dir(&format!("secret-leaks-{log_format}"));
    let keys = put(&dir, "keys.toml", &keyring_text(&key_bytes()));
    let users = put(&dir, "users.toml", &users_text(&hash));
    let (mut proxy, addr, admin) = start_on_free_ports(|listen, admin| {
        let text = config_text(
            &listen.to_string(),
            Some(&admin.to_string()),
            &upstream.url(),
        )
        .replace(
            "prefix = \"/api/\"",
            "prefix = \"/api/\"\nforward_cookies = true",
        ) + "\n[[upstream]]\nname = \"dead\"\nprefix = \"/dead/\"\nurl = \"http://127.0.0.1:9\"\n";
        let config = put(&dir, "proxy.toml", &text);
        RunningProxy::spawn_with_env(
            &config,
            log_format,
            &["--workers", "1"],
            &[("RUST_LOG", "trace")],
        )
    });

    // Logins: wrong, malformed (the password in a body that does not parse), right.
    let wrong = login_at(addr, "alice", WRONG_PASSWORD).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text());
    assert_eq!(wrong.text(), r#"{"error":"invalid_credentials"}"#);
    let malformed = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        format!(r#"{{"username":"alice","password":"{WRONG_PASSWORD}","#),
    )
    .await;
    assert_eq!(malformed.text(), r#"{"error":"bad_request"}"#);
    let right = login_at(addr, "alice", RIGHT_PASSWORD).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text());
    let session = Login {
        cookie: right.session_cookie().unwrap(),
        csrf: right.json()["csrf_token"].as_str().unwrap().to_owned(),
    };
    let session_id = session.cookie.split_once('=').unwrap().1.to_owned();

    // Proxied calls with another cookie beside the session's: the upstream gets that one only,
    // and never the CSRF token.
    let with_theme = Login {
        cookie: format!("theme=dark; {}", session.cookie),
        csrf: session.csrf.clone(),
    };
    let read = get(addr, "/api/read", &with_theme).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let posted = post_json(addr, "/api/write", &with_theme, "{}").await;
    assert_eq!(posted.status, StatusCode::OK, "{}", posted.text());
    for seen in upstream.raw.lock().iter() {
        let headers = format!("{:?}", seen.headers);
        assert_hides(
            &headers,
            "session id at the upstream",
            std::slice::from_ref(&session_id),
        );
        assert_hides(
            &headers,
            "CSRF token at the upstream",
            std::slice::from_ref(&session.csrf),
        );
        assert!(headers.contains("theme=dark"), "{headers}");
    }

    // Refusals: wrong CSRF token, a cookie that is no session, a dead upstream.
    let forged = Login {
        cookie: session.cookie.clone(),
        csrf: "A".repeat(43),
    };
    let csrf = post_json(addr, "/api/write", &forged, "{}").await;
    assert_eq!(csrf.text(), r#"{"error":"csrf"}"#);
    let bad_cookie_value = URL_SAFE_ID;
    let stranger = Login {
        cookie: format!("countersign_session={bad_cookie_value}"),
        csrf: String::new(),
    };
    let unknown = get(addr, "/api/read", &stranger).await;
    assert_eq!(unknown.text(), r#"{"error":"unauthenticated"}"#);
    let dead = get(addr, "/dead/x", &session).await;
    assert_eq!(dead.text(), r#"{"error":"bad_gateway"}"#);
    for reply in [&wrong, &malformed, &csrf, &unknown, &dead] {
        let head = format!("{:?}", reply.headers);
        assert!(
            !head.contains("set-cookie") && !head.contains("127.0.0.1:9"),
            "{head}"
        );
    }

    // Metrics: distinct paths, methods and user names add no series.
    varied_requests(addr, &session, "a").await;
    let first = series(&metrics(admin).await);
    varied_requests(addr, &session, "b").await;
    let text = metrics(admin).await;
    assert_eq!(first, series(&text), "metric series grew:\n{text}");
    for needle in ["items", "nowhere", "user-", "XA0", "alice", "token"] {
        assert!(!text.contains(needle), "{needle:?} in /metrics:\n{text}");
    }

    // Reloads of broken files: a keyring whose secret line does not parse, a users file whose
    // hash line does not parse.
    let other = b64(&other_key_bytes());
    write(
        &keys,
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{other}\n"),
    );
    write(
        &users,
        &format!("[[users]]\nname = \"alice\"\npassword = \"{hash}\" {other}\n"),
    );
    proxy.signal("HUP");
    proxy.wait_for_log("SIGHUP");

    let logout = logout(addr, &session).await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    proxy.stop();
    let log = proxy.log();
    assert!(
        log.contains("keys.toml"),
        "the reload names the keyring: {log}"
    );
    // RUST_LOG took effect: the CSRF refusal is a debug line (the default level is info).
    assert!(log.contains("csrf: "), "no debug lines: {log}");

    assert_hides(&log, "keyring secret", &byte_secret_forms(&key_bytes()));
    assert_hides(
        &log,
        "reloaded secret",
        &byte_secret_forms(&other_key_bytes()),
    );
    assert_hides(&log, "session id", &text_secret_forms(&session_id));
    assert_hides(&log, "CSRF token", &text_secret_forms(&session.csrf));
    assert_hides(&log, "right password", &text_secret_forms(RIGHT_PASSWORD));
    assert_hides(&log, "wrong password", &text_secret_forms(WRONG_PASSWORD));
    assert_hides(&log, "stranger's cookie", &[bad_cookie_value.to_owned()]);
    let hash_tail = hash.rsplit('$').next().unwrap().to_owned();
    assert_hides(&log, "password hash", &[hash.clone(), hash_tail]);
    upstream.task.abort();
}

/// A well-formed session id that no session has.
const URL_SAFE_ID: &str = "Zm9yZ2VkLWlkLWZvcmdlZC1pZC1mb3JnZWQtaWQtMTIz";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_json_log_at_trace_holds_no_secret() {
    proxy_run_hides_secrets("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_human_log_at_trace_holds_no_secret() {
    proxy_run_hides_secrets("human").await;
}

/// Redis sessions with a password in `redis_url`: the start, a Redis outage (503s, the
/// store's error lines) and its return log the endpoint, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_logs_no_redis_password() {
    let mut redis = RedisServer::start_with(&["--requirepass", REDIS_PASSWORD]);
    let dir = temp_dir("secret-leaks-redis");
    put(&dir, "keys.toml", &keyring_text(&key_bytes()));
    put(&dir, "users.toml", &users_text(&cheap_hash(RIGHT_PASSWORD)));
    let redis_url = format!("redis://:{REDIS_PASSWORD}@{}/0", redis.addr());
    let (mut proxy, addr, _) = start_on_free_ports(|listen, _| {
        let text = config_text(&listen.to_string(), None, "http://127.0.0.1:9").replace(
            "store = \"memory\"",
            &format!("store = \"redis\"\nredis_url = \"{redis_url}\""),
        );
        let config = put(&dir, "proxy.toml", &text);
        RunningProxy::spawn_with_env(
            &config,
            "human",
            &["--workers", "1"],
            &[("RUST_LOG", "trace")],
        )
    });
    let right = login_at(addr, "alice", RIGHT_PASSWORD).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text());
    let session = Login {
        cookie: right.session_cookie().unwrap(),
        csrf: String::new(),
    };
    redis.stop();
    let down = get(addr, "/api/x", &session).await;
    assert_eq!(down.text(), r#"{"error":"session_store_unavailable"}"#);
    proxy.wait_for_log("redis unavailable");
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(addr, "/api/x", &session).await.status == StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            Instant::now() < deadline,
            "redis never came back: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop();
    let log = proxy.log();
    assert!(log.contains(&redis.addr().to_string()), "{log}");
    assert_hides(&log, "redis password", &text_secret_forms(REDIS_PASSWORD));
}

// ---------------------------------------------------------------------------------------------
// Error messages of the CLI: keyring and config files
// ---------------------------------------------------------------------------------------------

/// `countersign sign` with `keyring`: fails, and its output holds no form of `secret`.
fn sign_fails_hiding(dir: &Path, name: &str, keyring: &str, secret: &[u8]) -> String {
    let path = put(dir, name, keyring);
    let out = run_countersign(
        [
            "sign".as_ref(),
            "--keyring".as_ref(),
            path.as_os_str(),
            "--nonce".as_ref(),
            "n".repeat(22).as_ref(),
        ],
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(!out.status.success(), "{name} was accepted");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(name), "the message names the file: {text}");
    assert_hides(&text, name, &byte_secret_forms(secret));
    text
}

/// A keyring whose secret line does not parse: the TOML parser's message is reported by line
/// and column, never with the line.
#[test]
fn keyring_syntax_errors_on_the_secret_line_do_not_echo_it() {
    let dir = temp_dir("secret-leaks-keyring-syntax");
    let secret = other_key_bytes();
    let encoded = b64(&secret);
    let head = "active = \"k1\"\n[[keys]]\nid = \"k1\"\n";
    for (name, line) in [
        ("unterminated.toml", format!("secret = \"{encoded}\n")),
        ("bare.toml", format!("secret = {encoded}\n")),
        ("trailing.toml", format!("secret = \"{encoded}\" x\n")),
        ("escape.toml", format!("secret = \"{encoded}\\q\"\n")),
        ("literal.toml", format!("secret = '{encoded}\n")),
        (
            "twice.toml",
            format!("secret = \"{encoded}\"\nsecret = \"{encoded}\"\n"),
        ),
        ("array.toml", format!("secret = [\"{encoded}\"]\n")),
        ("bad-base64.toml", format!("secret = \"{encoded}!\"\n")),
    ] {
        sign_fails_hiding(&dir, name, &format!("{head}{line}"), &secret);
    }
}

/// A secret written where the file expects another type or a name: the value-type error of
/// the parser quotes the value it refused (`invalid type: string "..."`); `secret_env` and
/// `secret_file` quote the name or path, which is the secret when it was pasted there instead
/// of into `secret`.
#[test]
fn keyring_secret_in_the_wrong_key_is_not_quoted() {
    let dir = temp_dir("secret-leaks-keyring-misplaced");
    let secret = other_key_bytes();
    let encoded = b64(&secret);
    let head = "active = \"k1\"\n[[keys]]\nid = \"k1\"\n";
    let wrong_type = sign_fails_hiding(
        &dir,
        "wrong-type.toml",
        &format!(
            "{head}secret = \"{}\"\nretired = \"{encoded}\"\n",
            b64(&key_bytes())
        ),
        &secret,
    );
    assert!(wrong_type.contains("keys[0].retired"), "{wrong_type}");
    let env = sign_fails_hiding(
        &dir,
        "in-secret-env.toml",
        &format!("{head}secret_env = \"{encoded}\"\n"),
        &secret,
    );
    assert!(env.contains("keys[0].secret_env"), "{env}");
    let file = sign_fails_hiding(
        &dir,
        "in-secret-file.toml",
        &format!("{head}secret_file = \"{encoded}\"\n"),
        &secret,
    );
    assert!(file.contains("keys[0].secret_file"), "{file}");
    // A real variable name is still quoted: it is what the operator needs to see.
    let unset = sign_fails_hiding(
        &dir,
        "unset-env.toml",
        &format!("{head}secret_env = \"COUNTERSIGN_TEST_UNSET_KEY_VAR\"\n"),
        &secret,
    );
    assert!(
        unset.contains("\"COUNTERSIGN_TEST_UNSET_KEY_VAR\" is not set"),
        "{unset}"
    );
}

/// `check-config` on `proxy.toml` text whose `[session]` table is `session`: exit 2, and the
/// message holds no form of `password`.
fn check_config_fails_hiding(session: &str, password: &str) -> String {
    let dir = temp_dir("secret-leaks-check-config");
    put(&dir, "keys.toml", &keyring_text(&key_bytes()));
    put(&dir, "users.toml", &users_text(&cheap_hash(RIGHT_PASSWORD)));
    let text = config_text("127.0.0.1:18080", None, "http://127.0.0.1:3000")
        .replace("store = \"memory\"", session);
    let config = put(&dir, "proxy.toml", &text);
    let out = run_countersign(
        [
            "check-config".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{session}: {stderr}");
    assert!(stderr.contains("proxy.toml: session."), "{stderr}");
    assert_hides(
        &format!("{stderr}{}", String::from_utf8_lossy(&out.stdout)),
        "redis password",
        &text_secret_forms(password),
    );
    stderr
}

/// A Redis URL whose password lost its `@` (`redis://:password/0`, the sentinel form
/// `redis://:password@/0` mistyped) and a sentinel entry `host:password` have no user info,
/// but the text after the `:` is the password all the same: messages must not quote it.
#[test]
fn redis_password_without_its_at_is_not_quoted() {
    let pw = REDIS_PASSWORD;
    check_config_fails_hiding(
        &format!("store = \"redis\"\nredis_url = \"redis://:{pw}/0\""),
        pw,
    );
    check_config_fails_hiding(
        &format!("store = \"redis\"\nredis_url = \"redis://:{pw}\""),
        pw,
    );
    check_config_fails_hiding(
        &format!(
            "store = \"redis\"\nredis_url = \"redis://:{pw}/0\"\nredis_sentinels = \
             [\"127.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\""
        ),
        pw,
    );
    check_config_fails_hiding(
        &format!(
            "store = \"redis\"\nredis_url = \"redis://:{pw}@/0\"\nredis_sentinels = \
             [\"10.0.0.1:{pw}\"]\nredis_sentinel_master = \"mymaster\""
        ),
        pw,
    );
}

/// A password of the wrong TOML type: the parser's message quotes the value it refused.
#[test]
fn redis_passwords_of_the_wrong_type_are_not_quoted() {
    let message = check_config_fails_hiding(
        "store = \"redis\"\nredis_url = \"redis://@/0\"\nredis_sentinels = \
         [\"127.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\"\n\
         redis_sentinel_password = 48213379",
        "48213379",
    );
    assert!(
        message.contains("session.redis_sentinel_password"),
        "{message}"
    );
    assert!(message.contains("expected a string"), "{message}");
    check_config_fails_hiding(
        &format!(
            "store = \"redis\"\nredis_url = \"redis://@/0\"\nredis_sentinels = \
             \"sentinel:{REDIS_PASSWORD}@10.0.0.1\"\nredis_sentinel_master = \"mymaster\""
        ),
        REDIS_PASSWORD,
    );
}

// ---------------------------------------------------------------------------------------------
// Debug output of the public types that hold secrets
// ---------------------------------------------------------------------------------------------

/// `{:?}` and `{:#?}` of `value`, checked against `forms`.
fn assert_debug_hides(value: &dyn std::fmt::Debug, what: &str, forms: &[String]) {
    assert_hides(&format!("{value:?}"), what, forms);
    assert_hides(&format!("{value:#?}"), what, forms);
}

/// Keys, keyrings (static and rotating: derived keys too), signer, verifier.
#[test]
fn debug_of_keys_signer_and_verifier_shows_no_secret() {
    let forms = byte_secret_forms(&key_bytes());
    let secret = Secret::new(key_bytes().to_vec()).unwrap();
    assert_debug_hides(&secret, "Secret", &forms);
    let spec = KeySpec {
        id: "k1".into(),
        secret: secret.clone(),
        retired: false,
        rotation: None,
    };
    assert_debug_hides(&spec, "KeySpec", &forms);
    for rotation in [Rotation::Off, Rotation::Every(Duration::from_secs(3600))] {
        let keyring = Keyring::new("k1", vec![spec.clone()], rotation).unwrap();
        let signing = keyring.signing_key(T0);
        // Rotated: the derived key is a secret of its own.
        let derived = byte_secret_forms(signing.secret.expose());
        assert_debug_hides(&signing, "SigningKey", &forms);
        assert_debug_hides(&signing, "SigningKey (derived)", &derived);
        let _ = keyring.verification_key(&signing.keyid, T0);
        assert_debug_hides(&keyring, "Keyring", &forms);
        assert_debug_hides(&keyring, "Keyring (derived)", &derived);
        let handle = KeyringHandle::new(keyring);
        assert_debug_hides(&handle, "KeyringHandle", &forms);
        let signer = Signer::new(handle.clone(), SignerConfig::default());
        assert_debug_hides(&signer, "Signer", &forms);
        assert_debug_hides(&signer, "Signer (derived)", &derived);
        let verifier = Verifier::new(handle, Policy::default());
        assert_debug_hides(&verifier, "Verifier", &forms);
    }
}

/// The checked config (Redis passwords in `redis_url` and `redis_sentinel_password`), the
/// server's settings and dependencies built from it (keyring, users), users and sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_config_users_and_sessions_shows_no_secret() {
    use countersign::proxy::server::{ProxyDeps, ProxySettings};
    use countersign::proxy::session::{Session, SessionId};
    use countersign::proxy::users::UserDb;

    let dir = temp_dir("secret-leaks-debug");
    put(&dir, "keys.toml", &keyring_text(&key_bytes()));
    let hash = cheap_hash(RIGHT_PASSWORD);
    let users_path = put(&dir, "users.toml", &users_text(&hash));
    let sentinel_password = "Sentinel-Pw-c3Jx8sQ1";
    let base = config_text("127.0.0.1:18080", None, "http://127.0.0.1:3000");
    let hash_forms = [hash.clone(), hash.rsplit('$').next().unwrap().to_owned()];

    let redis = base.replace(
        "store = \"memory\"",
        &format!(
            "store = \"redis\"\nredis_url = \"redis://app:{REDIS_PASSWORD}@127.0.0.1:6379/0\""
        ),
    );
    let config = ProxyConfig::load(&put(&dir, "redis.toml", &redis)).unwrap();
    assert_debug_hides(&config, "ProxyConfig", &text_secret_forms(REDIS_PASSWORD));
    let sentinel = base.replace(
        "store = \"memory\"",
        &format!(
            "store = \"redis\"\nredis_url = \"redis://:{REDIS_PASSWORD}@/0\"\n\
             redis_sentinels = [\"127.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\"\n\
             redis_sentinel_password = \"{sentinel_password}\""
        ),
    );
    let config = ProxyConfig::load(&put(&dir, "sentinel.toml", &sentinel)).unwrap();
    for forms in [
        text_secret_forms(REDIS_PASSWORD),
        text_secret_forms(sentinel_password),
    ] {
        assert_debug_hides(&config, "ProxyConfig (sentinel)", &forms);
    }

    let config = ProxyConfig::load(&put(&dir, "memory.toml", &base)).unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_debug_hides(&settings, "ProxySettings", &byte_secret_forms(&key_bytes()));
    let deps = ProxyDeps::from_config(&config, Arc::new(SystemClock)).unwrap();
    for forms in [byte_secret_forms(&key_bytes()), hash_forms.to_vec()] {
        assert_debug_hides(&deps, "ProxyDeps", &forms);
    }
    let users = UserDb::load(&users_path).unwrap();
    assert_debug_hides(&users, "UserDb", &hash_forms);
    assert_debug_hides(users.get("alice").unwrap(), "UserRecord", &hash_forms);

    let id = SessionId::generate();
    let cookie = id.as_cookie_value().to_owned();
    assert_debug_hides(&id, "SessionId", &text_secret_forms(&cookie));
    let csrf_token = URL_SAFE_ID.to_owned();
    let session = Session {
        user: "alice".into(),
        roles: vec![],
        csrf_token: csrf_token.clone(),
        created_at: T0,
        last_seen: T0,
        idle_expires_at: T0 + 60,
        absolute_expires_at: T0 + 60,
    };
    assert_debug_hides(&session, "Session", &text_secret_forms(&csrf_token));
    let request_session = countersign::proxy::session::RequestSession::from(session);
    assert_debug_hides(
        &request_session,
        "RequestSession",
        &text_secret_forms(&csrf_token),
    );
}

/// `countersign dev`'s options and running server hold the demo user's password (given or
/// random): their `Debug` must not show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_dev_options_and_server_shows_no_password() {
    use countersign::proxy::dev::{self, DevOptions};
    let options = DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        password: Some(RIGHT_PASSWORD.to_owned()),
        ..DevOptions::default()
    };
    assert_debug_hides(&options, "DevOptions", &text_secret_forms(RIGHT_PASSWORD));
    let server = dev::start(options).await.unwrap();
    assert_eq!(server.password.as_str(), RIGHT_PASSWORD);
    assert_debug_hides(&server, "DevServer", &text_secret_forms(RIGHT_PASSWORD));
    server.shutdown().await;
}

/// A users file holding a plain password instead of its hash: a password that starts with `$`
/// reads as a PHC string whose algorithm is the password, and the refusal must not quote it.
#[test]
fn users_file_plain_password_is_not_quoted() {
    let dir = temp_dir("secret-leaks-users-plain");
    put(&dir, "keys.toml", &keyring_text(&key_bytes()));
    let config = put(
        &dir,
        "proxy.toml",
        &config_text("127.0.0.1:18080", None, "http://127.0.0.1:3000"),
    );
    for plain in ["$plainpw-4k9", "$plainpw-4k9$more"] {
        put(&dir, "users.toml", &users_text(plain));
        let out = run_countersign(
            [
                "check-config".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            b"",
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("users[0].password"), "{stderr}");
        assert_hides(&stderr, "plain password", &text_secret_forms("plainpw-4k9"));
    }
    // A real hash of another algorithm is still named.
    put(
        &dir,
        "users.toml",
        &users_text("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"),
    );
    let out = run_countersign(
        [
            "check-config".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("\"argon2i\""), "{stderr}");
}

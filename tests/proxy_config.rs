//! The proxy config file: the shipped example works, defaults apply, relative paths resolve
//! against the config's folder, and every kind of error names the file, the key and the
//! problem.
#![cfg(feature = "proxy")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use countersign::proxy::config::{
    parse_size, ConfigError, ProxyConfig, PublicOrigin, RouteAuth, StoreKind,
};
use countersign::proxy::users::{check_password, hash_password, UserDb, UsersHandle};

/// A fresh empty folder under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "countersign-config-{}-{}-{}",
        tag,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const KEYS: &str = r#"
active = "k1"
[[keys]]
id = "k1"
secret = "h59GLzUrs3uWiUgd7VLeMk5ILui23cAztIiaCFYN708="
"#;

/// A hash of "pw" (computed once; argon2 is slow in debug builds).
fn pw_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("pw").unwrap())
}

fn users_toml() -> String {
    format!(
        "[[users]]\nname = \"alice\"\npassword = \"{}\"\nroles = [\"admin\"]\n",
        pw_hash()
    )
}

const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
public_origin = "http://localhost:8080"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://127.0.0.1:3000"
"#;

/// A folder holding keys.toml, users.toml and proxy.toml with `config` as its text.
fn setup(config: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir("case");
    std::fs::write(dir.join("keys.toml"), KEYS).unwrap();
    std::fs::write(dir.join("users.toml"), users_toml()).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

/// Loads `config` and expects an error; checks it names the config file and `key`, and that
/// the problem mentions `needle`.
fn expect_error(config: &str, key: &str, needle: &str) -> ConfigError {
    let (_dir, path) = setup(config);
    let err = ProxyConfig::load(&path).expect_err("config should be rejected");
    assert_error(&err, &path, key, needle);
    err
}

fn assert_error(err: &ConfigError, file: &Path, key: &str, needle: &str) {
    assert_eq!(err.file(), file, "file of {err}");
    assert_eq!(err.key(), key, "key of {err}");
    assert!(
        err.problem().contains(needle),
        "problem of {err:?} should mention {needle:?}"
    );
    let text = err.to_string();
    assert!(text.starts_with(&file.display().to_string()), "{text}");
    if !key.is_empty() {
        assert!(text.contains(&format!(": {key}: ")), "{text}");
    }
}

#[tokio::test]
async fn shipped_proxy_toml_is_a_working_local_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let config = ProxyConfig::load(&path).unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.server.public_origin.as_origin(),
        "http://localhost:8080"
    );
    assert_eq!(config.upstreams.len(), 1);
    assert_eq!(config.upstreams[0].url, "http://127.0.0.1:3000");
    assert_eq!(config.session.store, StoreKind::Memory);
    config.check_files().unwrap();
    let keyring = config.load_keyring().unwrap();
    assert_eq!(keyring.active_id(), "demo-1");
    let users = UsersHandle::new(config.load_users().unwrap().unwrap());
    let identity = check_password(&users, "demo", "demo-password")
        .await
        .unwrap();
    assert_eq!(identity.user, "demo");
    assert!(check_password(&users, "demo", "wrong").await.is_none());
}

#[test]
fn defaults_apply_and_paths_resolve_against_the_config_folder() {
    let (dir, path) = setup(BASE);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(c.source, path);
    assert_eq!(c.server.max_header_bytes, 16 * 1024);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.request_timeout, Duration::from_secs(60));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.server.max_connections, 10_000);
    assert!(c.server.tls.is_none());
    assert!(c.admin.listen.is_none());
    assert_eq!(c.session.idle_timeout, Duration::from_secs(1800));
    assert_eq!(c.session.absolute_timeout, Duration::from_secs(12 * 3600));
    assert_eq!(c.session.cookie_name, "countersign_session");
    assert_eq!(c.session.max_sessions, 1_000_000);
    assert_eq!(c.session.sweep_interval, Duration::from_secs(60));
    assert_eq!(c.auth.throttle.max_failures_per_ip, 20);
    assert_eq!(c.auth.throttle.max_failures_per_user, 5);
    assert_eq!(c.auth.throttle.window, Duration::from_secs(900));
    assert_eq!(c.auth.throttle.max_tracked_keys, 100_000);
    assert_eq!(c.signing.window, Duration::from_secs(10));
    assert_eq!(c.signing.user_header.as_str(), "x-auth-user");
    assert_eq!(c.signing.roles_header.as_str(), "x-auth-roles");
    assert!(c.signing.extra_headers.is_empty());
    let up = &c.upstreams[0];
    assert!(!up.strip_prefix);
    assert_eq!(up.timeout, Duration::from_secs(30));
    assert_eq!(up.max_body, 1024 * 1024);
    assert_eq!(up.auth, RouteAuth::Required);
    assert!(!up.forward_cookies);
    // Relative paths: against the config file's folder, not the working directory.
    assert_eq!(c.signing.keyring, dir.join("keys.toml"));
    assert_eq!(
        c.auth.users_file.as_deref(),
        Some(dir.join("users.toml").as_path())
    );
    c.check_files().unwrap();
}

#[test]
fn every_key_can_be_set() {
    let text = r#"
[server]
listen = "0.0.0.0:8443"
public_origin = "https://App.Example.com:443/"
tls_cert = "cert.pem"
tls_key = "/etc/key.pem"
static_dir = "dist"
max_header_bytes = "32KiB"
header_read_timeout = "5s"
request_timeout = "2m"
shutdown_grace = "500ms"
max_connections = 7

[admin]
listen = "127.0.0.1:9090"

[session]
store = "redis"
redis_url = "redis://:hunter2@127.0.0.1:6379/0"
redis_key_prefix = "cs:"
idle_timeout = "10m"
absolute_timeout = "1d"
cookie_name = "sid"
max_sessions = 50
sweep_interval = "5s"

[auth]
verify_url = "http://127.0.0.1:3000/auth/verify"

[auth.throttle]
max_failures_per_ip = 3
max_failures_per_user = 2
window = "1m"
max_tracked_keys = 10

[signing]
keyring = "keys.toml"
window = "30s"
user_header = "X-User"
roles_header = "x-roles"
extra_headers = ["x-tenant", "Content-Type"]

[[upstream]]
name = "api"
prefix = "/api/"
url = "https://api.internal:8443"
strip_prefix = true
timeout = "3s"
max_body = 2048
auth = "none"
forward_cookies = true

[[upstream]]
name = "admin-api"
prefix = "/api/admin/"
url = "http://127.0.0.1:4000/"
"#;
    let (dir, path) = setup(text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(
        c.server.public_origin.as_origin(),
        "https://app.example.com"
    );
    assert!(c.server.public_origin.is_https());
    let tls = c.server.tls.as_ref().unwrap();
    assert_eq!(tls.cert, dir.join("cert.pem"));
    assert_eq!(tls.key, PathBuf::from("/etc/key.pem"));
    assert_eq!(c.server.static_dir, Some(dir.join("dist")));
    assert_eq!(c.server.max_header_bytes, 32 * 1024);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(5));
    assert_eq!(c.server.request_timeout, Duration::from_secs(120));
    assert_eq!(c.server.shutdown_grace, Duration::from_millis(500));
    assert_eq!(c.server.max_connections, 7);
    assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(
        c.session.store,
        StoreKind::Redis {
            url: "redis://:hunter2@127.0.0.1:6379/0".into(),
            key_prefix: "cs:".into()
        }
    );
    // The Redis password never shows in Debug output (logs).
    assert!(!format!("{c:?}").contains("hunter2"));
    assert_eq!(c.session.idle_timeout, Duration::from_secs(600));
    assert_eq!(c.session.absolute_timeout, Duration::from_secs(86_400));
    assert_eq!(c.session.cookie_name, "sid");
    assert_eq!(c.session.max_sessions, 50);
    assert_eq!(c.session.sweep_interval, Duration::from_secs(5));
    assert!(c.auth.users_file.is_none());
    assert_eq!(c.auth.verify_url.as_ref().unwrap().path(), "/auth/verify");
    assert_eq!(c.auth.throttle.max_failures_per_ip, 3);
    assert_eq!(c.auth.throttle.max_failures_per_user, 2);
    assert_eq!(c.auth.throttle.window, Duration::from_secs(60));
    assert_eq!(c.auth.throttle.max_tracked_keys, 10);
    assert_eq!(c.signing.window, Duration::from_secs(30));
    assert_eq!(c.signing.user_header.as_str(), "x-user");
    assert_eq!(c.signing.extra_headers.len(), 2);
    let api = &c.upstreams[0];
    assert!(api.strip_prefix && api.forward_cookies);
    assert_eq!(api.auth, RouteAuth::None);
    assert_eq!(api.max_body, 2048);
    assert_eq!(api.timeout, Duration::from_secs(3));
    // Longest prefix wins.
    assert_eq!(c.route("/api/admin/x").unwrap().name, "admin-api");
    assert_eq!(c.route("/api/notes").unwrap().name, "api");
    assert!(c.route("/other").is_none());
}

#[test]
fn unknown_keys_are_named() {
    expect_error(
        &format!("{BASE}\nlisten = 1\n"),
        "upstream[0].listen",
        "unknown field",
    );
    let text = BASE.replace("[server]\n", "[server]\nlisen = \"x\"\n");
    expect_error(&text, "server.lisen", "unknown field");
    let text = format!("{BASE}\n[extra]\na = 1\n");
    expect_error(&text, "extra", "unknown field");
    let text = format!("{BASE}\n[auth.throttle]\nwindoww = \"1m\"\n");
    expect_error(&text, "auth.throttle.windoww", "unknown field");
}

#[test]
fn missing_required_keys_are_named() {
    expect_error(
        &BASE.replace("listen = \"127.0.0.1:8080\"\n", ""),
        "server.listen",
        "missing field",
    );
    expect_error(
        &BASE.replace("keyring = \"keys.toml\"\n", ""),
        "signing.keyring",
        "missing field",
    );
    let no_upstream = BASE.split("[[upstream]]").next().unwrap().to_owned();
    expect_error(&no_upstream, "upstream", "at least one");
    expect_error(
        &BASE.replace("users_file = \"users.toml\"\n", ""),
        "auth.users_file",
        "missing",
    );
    expect_error(
        &BASE.replace("prefix = \"/api/\"\n", ""),
        "upstream[0].prefix",
        "missing field",
    );
}

#[test]
fn bad_durations_are_named() {
    let text = format!("{BASE}\n[session]\nidle_timeout = \"3x\"\n");
    let err = expect_error(&text, "session.idle_timeout", "invalid duration \"3x\"");
    assert!(err
        .to_string()
        .contains("proxy.toml: session.idle_timeout: invalid duration"));
    let text = format!("{BASE}\ntimeout = \"0s\"\n");
    expect_error(&text, "upstream[0].timeout", "greater than zero");
    let text = BASE.replace(
        "keyring = \"keys.toml\"",
        "keyring = \"keys.toml\"\nwindow = \"off\"",
    );
    expect_error(&text, "signing.window", "off");
    let text = format!("{BASE}\n[session]\nidle_timeout = 30\n");
    expect_error(&text, "session.idle_timeout", "invalid type");
    let text = format!("{BASE}\n[session]\nidle_timeout = \"2h\"\nabsolute_timeout = \"1h\"\n");
    expect_error(
        &text,
        "session.absolute_timeout",
        "at least session.idle_timeout",
    );
}

#[test]
fn bad_sizes_are_named() {
    let text = format!("{BASE}\nmax_body = \"1 MiB\"\n");
    expect_error(&text, "upstream[0].max_body", "invalid size");
    let text = format!("{BASE}\nmax_body = \"12XB\"\n");
    expect_error(&text, "upstream[0].max_body", "invalid size");
    let text = BASE.replace("[server]\n", "[server]\nmax_header_bytes = \"100\"\n");
    expect_error(&text, "server.max_header_bytes", "at least 1KiB");
}

#[test]
fn parse_size_units() {
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("512B"), Ok(512));
    assert_eq!(parse_size("64KiB"), Ok(65_536));
    assert_eq!(parse_size("1MiB"), Ok(1_048_576));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("10KB"), Ok(10_000));
    assert_eq!(parse_size("10MB"), Ok(10_000_000));
    assert_eq!(parse_size(" 1MiB "), Ok(1_048_576));
    for bad in [
        "",
        "MiB",
        "1.5MiB",
        "-1",
        "1 MiB",
        "1mib",
        "1TiB",
        "99999999999999999999GiB",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn bad_urls_are_named() {
    for (url, needle) in [
        ("ftp://127.0.0.1:3000", "scheme"),
        ("127.0.0.1:3000", "scheme"),
        ("http://", "not a valid URL"),
        ("http://127.0.0.1:3000/base", "without a path"),
        ("http://user:pw@127.0.0.1:3000", "user info"),
    ] {
        let text = BASE.replace("http://127.0.0.1:3000", url);
        expect_error(&text, "upstream[0].url", needle);
    }
    let text = BASE.replace("http://localhost:8080", "localhost:8080");
    expect_error(&text, "server.public_origin", "");
    let text = BASE.replace("http://localhost:8080", "https://app.example.com/spa");
    expect_error(&text, "server.public_origin", "no path");
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        "verify_url = \"ftp://127.0.0.1/verify\"",
    );
    expect_error(&text, "auth.verify_url", "scheme");
    let text = BASE.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\"");
    expect_error(&text, "server.listen", "invalid address");
}

#[test]
fn public_origin_forms() {
    let o = PublicOrigin::parse("http://localhost:8080").unwrap();
    assert_eq!(
        (o.as_origin().as_str(), o.is_https()),
        ("http://localhost:8080", false)
    );
    let o = PublicOrigin::parse("https://app.example.com").unwrap();
    assert_eq!(
        (o.as_origin().as_str(), o.is_https()),
        ("https://app.example.com", true)
    );
    assert_eq!(o.port, None);
    let o = PublicOrigin::parse("http://[::1]:80").unwrap();
    assert_eq!(o.as_origin(), "http://[::1]");
    assert!(PublicOrigin::parse("https://app.example.com?x=1").is_err());
    assert!(PublicOrigin::parse("ws://app.example.com").is_err());
}

#[test]
fn bad_prefixes_are_named() {
    for (prefix, needle) in [
        ("api/", "start and end"),
        ("/api", "start and end"),
        ("/a//b/", "normalised"),
        ("/a/../b/", "normalised"),
        ("/auth/", "proxy answers itself"),
        ("/a b/", "not allowed"),
    ] {
        let text = BASE.replace("prefix = \"/api/\"", &format!("prefix = \"{prefix}\""));
        expect_error(&text, "upstream[0].prefix", needle);
    }
}

#[test]
fn duplicate_upstreams_are_named() {
    let second =
        "\n[[upstream]]\nname = \"api\"\nprefix = \"/v2/\"\nurl = \"http://127.0.0.1:3001\"\n";
    expect_error(
        &format!("{BASE}{second}"),
        "upstream[1].name",
        "duplicate upstream name",
    );
    let second =
        "\n[[upstream]]\nname = \"other\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3001\"\n";
    expect_error(
        &format!("{BASE}{second}"),
        "upstream[1].prefix",
        "duplicate prefix",
    );
}

#[test]
fn tls_cert_and_key_go_together() {
    let text = BASE.replace("[server]\n", "[server]\ntls_cert = \"cert.pem\"\n");
    expect_error(
        &text,
        "server.tls_key",
        "tls_cert is set but tls_key is not",
    );
    let text = BASE.replace("[server]\n", "[server]\ntls_key = \"key.pem\"\n");
    expect_error(
        &text,
        "server.tls_cert",
        "tls_key is set but tls_cert is not",
    );
}

#[test]
fn other_value_checks_are_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "\n[session]\nstore = \"etcd\"\n",
            "session.store",
            "unknown store",
        ),
        (
            "\n[session]\nstore = \"redis\"\n",
            "session.redis_url",
            "required",
        ),
        (
            "\n[session]\nredis_url = \"redis://x\"\n",
            "session.redis_url",
            "only used",
        ),
        (
            "\n[session]\ncookie_name = \"__Host-sid\"\n",
            "session.cookie_name",
            "__Host-",
        ),
        (
            "\n[session]\ncookie_name = \"a;b\"\n",
            "session.cookie_name",
            "not a valid cookie name",
        ),
        (
            "\n[session]\nmax_sessions = 0\n",
            "session.max_sessions",
            "greater than zero",
        ),
        (
            "\n[auth.throttle]\nmax_failures_per_user = 0\n",
            "auth.throttle.max_failures_per_user",
            "greater than zero",
        ),
        (
            "\n[admin]\nlisten = \"127.0.0.1:8080\"\n",
            "admin.listen",
            "must differ",
        ),
        ("\nauth = \"maybe\"\n", "upstream[0].auth", "required"),
    ];
    for (extra, key, needle) in cases {
        expect_error(&format!("{BASE}{extra}"), key, needle);
    }
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        "users_file = \"users.toml\"\nverify_url = \"http://127.0.0.1:3000/v\"",
    );
    expect_error(&text, "auth.verify_url", "not both");
    let text = BASE.replace(
        "keyring = \"keys.toml\"",
        "keyring = \"keys.toml\"\nuser_header = \"bad header\"",
    );
    expect_error(&text, "signing.user_header", "not a valid header name");
}

#[test]
fn toml_syntax_errors_name_the_file_and_line() {
    let (_dir, path) = setup("[server]\nlisten = \n");
    let err = ProxyConfig::load(&path).unwrap_err();
    assert_eq!(err.file(), path);
    assert_eq!(err.key(), "");
    assert!(err.problem().contains("line 2"), "{err}");
}

#[test]
fn unreadable_config_is_named() {
    let dir = temp_dir("missing");
    let path = dir.join("nope.toml");
    let err = ProxyConfig::load(&path).unwrap_err();
    assert_error(&err, &path, "", "cannot read config file");
}

#[test]
fn unreadable_or_bad_users_file_is_named() {
    let (dir, path) = setup(BASE);
    let config = ProxyConfig::load(&path).unwrap();
    let users = dir.join("users.toml");

    std::fs::remove_file(&users).unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &users, "", "cannot read users file");

    std::fs::write(&users, "[[users]]\nname = \"bob\"\npassword = \"plain\"\n").unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[0].password", "not a PHC password hash");

    let bcrypt_like = "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
    std::fs::write(
        &users,
        format!("[[users]]\nname = \"bob\"\npassword = \"{bcrypt_like}\"\n"),
    )
    .unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[0].password", "use argon2id");

    let dup = format!("{}{}", users_toml(), users_toml());
    std::fs::write(&users, dup).unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[1].name", "duplicate user");

    std::fs::write(&users, format!("{}rolez = []\n", users_toml())).unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[0].rolez", "unknown field");

    std::fs::write(&users, "[[users]]\nname = \"bob\"\n").unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[0].password", "missing field");
}

#[test]
fn bad_keyring_is_named() {
    let (dir, path) = setup(BASE);
    let config = ProxyConfig::load(&path).unwrap();
    let keys = dir.join("keys.toml");

    std::fs::write(
        &keys,
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"c2hvcnQ=\"\n",
    )
    .unwrap();
    let err = config.check_files().unwrap_err();
    assert_eq!(err.file(), keys);
    assert_eq!(err.key(), "keys[0].secret");
    assert!(
        err.to_string().contains("keys.toml: keys[0].secret: "),
        "{err}"
    );

    std::fs::remove_file(&keys).unwrap();
    let err = config.load_keyring().unwrap_err();
    assert_eq!(err.file(), keys);
}

#[test]
fn users_from_records_and_reload_handle() {
    let record = |name: &str| countersign::proxy::users::UserRecord {
        name: name.into(),
        password_hash: pw_hash().into(),
        roles: vec!["r".into()],
    };
    let db = UserDb::from_records(vec![record("a"), record("b")]).unwrap();
    assert_eq!(db.len(), 2);
    // Debug never shows hashes.
    assert!(!format!("{:?}", db.get("a").unwrap()).contains("argon2"));
    let handle = UsersHandle::new(db);
    handle.store(UserDb::from_records(vec![record("c")]).unwrap());
    assert!(handle.load().get("a").is_none());
    assert!(handle.load().get("c").is_some());
    let err = UserDb::from_records(vec![record("a"), record("a")]).unwrap_err();
    assert_eq!(err.key(), "users[1].name");
}

fn alice_handle() -> UsersHandle {
    let db = UserDb::parse(&users_toml(), Path::new("users.toml")).unwrap();
    UsersHandle::new(db)
}

#[tokio::test]
async fn check_password_accepts_only_the_right_password_of_a_known_user() {
    let users = alice_handle();
    let identity = check_password(&users, "alice", "pw").await.unwrap();
    assert_eq!(identity.user, "alice");
    assert_eq!(identity.roles, vec!["admin"]);
    assert!(check_password(&users, "alice", "PW").await.is_none());
    assert!(check_password(&users, "alice", "").await.is_none());
    // Names are exact.
    assert!(check_password(&users, "Alice", "pw").await.is_none());
    assert!(check_password(&users, "nobody", "pw").await.is_none());
    let huge = "x".repeat(countersign::proxy::users::MAX_PASSWORD_BYTES + 1);
    assert!(check_password(&users, "alice", &huge).await.is_none());
}

/// Unknown users cost an argon2 verification too, so timing does not tell which names exist.
#[tokio::test]
async fn unknown_users_take_as_long_as_wrong_passwords() {
    let users = alice_handle();
    // Warm up (the dummy hash is prepared by UsersHandle::new; this warms caches).
    check_password(&users, "nobody", "x").await;
    let time = |name: &'static str| {
        let users = users.clone();
        async move {
            let start = std::time::Instant::now();
            for _ in 0..3 {
                assert!(check_password(&users, name, "wrong").await.is_none());
            }
            start.elapsed()
        }
    };
    let known = time("alice").await;
    let unknown = time("nobody").await;
    // Generous bounds: the point is that both do the argon2 work (an unknown user answered
    // without it would be ~1000x faster), not a precise timing comparison on a shared machine.
    assert!(
        unknown * 3 > known,
        "unknown {unknown:?} vs known {known:?}"
    );
    assert!(
        known * 3 > unknown,
        "unknown {unknown:?} vs known {known:?}"
    );
}

/// The argon2 work runs on the blocking pool: on a single-threaded runtime, other tasks keep
/// running while a password is checked.
#[tokio::test(flavor = "current_thread")]
async fn password_checks_do_not_block_the_async_worker() {
    let users = alice_handle();
    let ticks = std::sync::Arc::new(AtomicU32::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let start = std::time::Instant::now();
    assert!(check_password(&users, "alice", "pw").await.is_some());
    let elapsed = start.elapsed();
    ticker.abort();
    let ticked = ticks.load(Ordering::SeqCst);
    // A blocking check would have frozen the ticker for the whole duration (0 ticks).
    assert!(
        ticked >= 3,
        "only {ticked} ticks during a {elapsed:?} password check"
    );
}

#[test]
fn hash_password_makes_salted_argon2id_phc_strings() {
    let a = hash_password("correct horse").unwrap();
    let b = hash_password("correct horse").unwrap();
    assert!(a.starts_with("$argon2id$v=19$"), "{a}");
    assert_ne!(a, b, "salts must differ");
    let db = UserDb::parse(
        &format!("[[users]]\nname = \"x\"\npassword = \"{a}\"\n"),
        Path::new("u.toml"),
    )
    .unwrap();
    assert!(db.get("x").unwrap().roles.is_empty());
    assert!(hash_password("").is_err());
}

#[test]
fn check_files_reports_missing_tls_files_and_static_dir() {
    let text = BASE.replace(
        "[server]\n",
        "[server]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\nstatic_dir = \"dist\"\n",
    );
    let (dir, path) = setup(&text);
    let config = ProxyConfig::load(&path).unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "server.tls_cert", "cert.pem");
    std::fs::write(dir.join("cert.pem"), "x").unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "server.tls_key", "key.pem");
    std::fs::write(dir.join("key.pem"), "x").unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "server.static_dir", "not a folder");
    std::fs::create_dir(dir.join("dist")).unwrap();
    config.check_files().unwrap();
}

/// At most `max_checks` argon2 verifications run at once; the rest wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_password_checks_are_bounded() {
    let db = UserDb::parse(&users_toml(), Path::new("users.toml")).unwrap();
    let users = UsersHandle::with_max_concurrent_checks(db, 1);
    let mut checks = Vec::new();
    for password in ["pw", "wrong", "pw"] {
        let users = users.clone();
        checks.push(tokio::spawn(async move {
            check_password(&users, "alice", password).await.is_some()
        }));
    }
    let mut peak = 0;
    while !checks.iter().all(|c| c.is_finished()) {
        peak = peak.max(users.checks_in_progress());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(peak, 1, "checks ran {peak} at a time");
    let mut results = Vec::new();
    for c in checks {
        results.push(c.await.unwrap());
    }
    assert_eq!(results, vec![true, false, true]);
    assert_eq!(users.checks_in_progress(), 0);
}

#[test]
fn max_concurrent_password_checks_is_configurable() {
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        "users_file = \"users.toml\"\nmax_concurrent_password_checks = 3",
    );
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(c.auth.max_concurrent_password_checks, 3);
    let (_dir, path) = setup(BASE);
    let c = ProxyConfig::load(&path).unwrap();
    assert!(c.auth.max_concurrent_password_checks >= 1);
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        "users_file = \"users.toml\"\nmax_concurrent_password_checks = 0",
    );
    expect_error(
        &text,
        "auth.max_concurrent_password_checks",
        "greater than zero",
    );
}

proptest::proptest! {
    /// No input makes the config, size or session-id parsers panic: they answer or refuse.
    #[test]
    fn parsers_never_panic_on_arbitrary_input(
        cut in 0usize..400,
        insert in "\\PC{0,12}",
        size in "\\PC{0,12}",
    ) {
        let mut text = BASE.to_owned();
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.insert_str(at, &insert);
        let _ = ProxyConfig::parse(&text, Path::new("fuzz.toml"));
        let _ = UserDb::parse(&text, Path::new("fuzz-users.toml"));
        let _ = parse_size(&size);
        let _ = PublicOrigin::parse(&size);
        let _ = countersign::proxy::session::SessionId::parse(&size);
    }
}

//! The proxy config file: the shipped example works, defaults apply, relative paths resolve
//! against the config's folder, and every kind of error names the file, the key and the
//! problem.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_tmp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use countersign::proxy::config::{
    parse_positive_duration, parse_size, ConfigError, ProxyConfig, PublicOrigin, RouteAuth,
    StoreKind,
};
use countersign::proxy::users::{check_password, hash_password, HashLimits, UserDb, UsersHandle};
use support_cli::check_config;
use support_tmp::TestDir;

/// A fresh empty folder under the system temp dir, removed when dropped.
fn temp_dir(tag: &str) -> TestDir {
    TestDir::new(&format!("config-{tag}"))
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
fn setup(config: &str) -> (TestDir, PathBuf) {
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
    assert_eq!(c.session.max_session_cookies, 4);
    assert!(c.server.http1_half_close);
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
http1_half_close = false
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
max_session_cookies = 2
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
    assert!(!c.server.http1_half_close);
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
    assert_eq!(c.session.max_session_cookies, 2);
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
    expect_error(&text, "server.max_header_bytes", "at least 8KiB");
    // Between 1 KiB and 8 KiB it used to be taken, and not hold over HTTP/1 (hyper's head
    // buffer is never smaller than 8 KiB).
    for small in ["1KiB", "8191"] {
        let text = BASE.replace(
            "[server]\n",
            &format!("[server]\nmax_header_bytes = \"{small}\"\n"),
        );
        expect_error(&text, "server.max_header_bytes", "at least 8KiB");
    }
    let text = BASE.replace("[server]\n", "[server]\nmax_header_bytes = \"8KiB\"\n");
    let (_dir, path) = setup(&text);
    let config = ProxyConfig::load(&path).expect("8KiB is the smallest");
    assert_eq!(config.server.max_header_bytes, 8 * 1024);
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

/// A value of the wrong type names its line, as a syntax error does, and says what to write:
/// the messages were serde's ("invalid type: map, expected a sequence") without either.
#[test]
fn wrong_value_types_name_the_line_and_what_to_write() {
    let text = format!("{BASE}\n[session]\nidle_timeout = 1800\n");
    let line = text.lines().count();
    let err = expect_error(&text, "session.idle_timeout", "write it in quotes");
    assert!(err.problem().contains(&format!("line {line}:")), "{err}");
    let text = format!("{BASE}\n[auth.throttle]\nmax_failures_per_ip = \"20\"\n");
    let err = expect_error(
        &text,
        "auth.throttle.max_failures_per_ip",
        "a number: write it without quotes",
    );
    assert!(
        err.problem()
            .contains(&format!("line {}:", text.lines().count())),
        "{err}"
    );
    let text = BASE.replace("[[upstream]]", "[upstream]");
    assert_ne!(text, BASE);
    expect_error(&text, "upstream", "write [[upstream]], with two brackets");
}

#[test]
fn bad_prefixes_are_named() {
    for (prefix, needle) in [
        ("api/", "start and end"),
        ("/api", "start and end"),
        ("/a//b/", "normalised"),
        ("/a/../b/", "normalised"),
        ("/auth/", "proxy answers itself"),
        // In any case: a request path that reads as /auth/ with case ignored is refused (400),
        // so such a route would load and answer nothing.
        ("/Auth/", "in any letter case"),
        ("/AUTH/v1/", "in any letter case"),
        ("/a b/", "not allowed"),
    ] {
        let text = BASE.replace("prefix = \"/api/\"", &format!("prefix = \"{prefix}\""));
        expect_error(&text, "upstream[0].prefix", needle);
    }
}

/// A prefix the proxy could never route a request under is refused at load (and so by
/// `check-config`), not accepted as a silently dead route: `%` and `;` because paths are
/// compared with escapes decoded and `;` parameters dropped (`/caf%C3%A9/list` reads as
/// `/café/list`, which names no route: 400), `\` and raw non-ASCII because the proxy refuses
/// them in request paths, and the characters RFC 3986 does not allow unescaped in a path
/// because clients that follow it send them escaped, which the proxy refuses (curl sends `|`
/// raw, Python's requests as `%7C`: the route would work for some clients only).
#[test]
fn unroutable_prefixes_are_refused_at_load() {
    for (prefix, needle) in [
        ("/caf%C3%A9/", "escapes decoded"),
        ("/v2;beta/", "`;` parameters dropped"),
        ("/a%2Fb/", "escapes decoded"),
        ("/a\\b/", "refuses it in request paths"),
        ("/données/", "non-ASCII"),
        ("/\u{3b1}/", "non-ASCII"),
        ("/a\"b/", "send it percent-encoded"),
        ("/a<b/", "send it percent-encoded"),
        ("/a>b/", "send it percent-encoded"),
        ("/a`b/", "send it percent-encoded"),
        ("/a{b}/", "send it percent-encoded"),
        ("/a^b/", "send it percent-encoded"),
        ("/a|b/", "send it percent-encoded"),
    ] {
        // A TOML literal string: the prefix exactly as written, `\` and `"` included.
        let text = BASE.replace("prefix = \"/api/\"", &format!("prefix = '{prefix}'"));
        let err = expect_error(&text, "upstream[0].prefix", needle);
        assert!(
            err.problem().contains("unreserved ASCII"),
            "{prefix}: {err}"
        );
    }
    // Control: unreserved characters of every kind, capitals included, still load as written.
    for prefix in ["/Api-v2_beta.x~1/", "/A/b-c/D_e/9.9/~f/"] {
        let text = BASE.replace("prefix = \"/api/\"", &format!("prefix = '{prefix}'"));
        let (_dir, path) = setup(&text);
        let config = ProxyConfig::load(&path).unwrap_or_else(|e| panic!("{prefix}: {e}"));
        assert_eq!(config.upstreams[0].prefix, prefix);
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
            // The memory store numbers its places in 32 bits: more was cut without a word.
            "\n[session]\nmax_sessions = 4294967295\n",
            "session.max_sessions",
            "4294967295 is more than 4294967294",
        ),
        (
            "\n[session]\nmax_session_cookies = 0\n",
            "session.max_session_cookies",
            "greater than zero",
        ),
        (
            "\n[session]\nmax_session_cookies = 17\n",
            "session.max_session_cookies",
            "17 is more than 16",
        ),
        (
            "\n[auth.throttle]\nmax_failures_per_user = 0\n",
            "auth.throttle.max_failures_per_user",
            "greater than zero",
        ),
        (
            // One attempt counts an address and a name: 1 ran as 2 without a word.
            "\n[auth.throttle]\nmax_tracked_keys = 1\n",
            "auth.throttle.max_tracked_keys",
            "1 is less than 2",
        ),
        (
            "\n[auth.throttle]\nmax_tracked_keys = 0\n",
            "auth.throttle.max_tracked_keys",
            "0 is less than 2",
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
    // A value the parser refuses: the line, and the key the line shows.
    let (_dir, path) = setup("[server]\nlisten = \n");
    let err = ProxyConfig::load(&path).unwrap_err();
    assert_eq!(err.file(), path);
    assert_eq!(err.key(), "server.listen");
    assert!(err.problem().contains("line 2"), "{err}");
    // One line, even where the parser's message has several.
    assert!(!err.to_string().contains('\n'), "{err:?}");
    // A broken table header has no key to name: the line alone.
    let (_dir, path) = setup("[server\nlisten = \"127.0.0.1:8080\"\n");
    let err = ProxyConfig::load(&path).unwrap_err();
    assert_eq!(err.key(), "");
    assert!(err.problem().contains("line 1"), "{err}");
}

/// A number the TOML parser itself refuses (too large for any integer) has no key path from
/// the parser: the key is read from the line, in tables, arrays of tables and dotted keys.
#[test]
fn numbers_too_large_name_their_key() {
    let huge = "99999999999999999999";
    let text = BASE.replace(
        "[server]\n",
        &format!("[server]\nmax_connections = {huge}\n"),
    );
    let err = expect_error(&text, "server.max_connections", "line 3");
    assert!(err.problem().contains("number too large"), "{err}");
    let second = format!(
        "\n[[upstream]]\nname = \"b\"\nprefix = \"/b/\"\nurl = \"http://127.0.0.1:3001\"\npool_max_idle_per_host = {huge}\n"
    );
    expect_error(
        &format!("{BASE}{second}"),
        "upstream[1].pool_max_idle_per_host",
        "number too large",
    );
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        &format!("users_file = \"users.toml\"\nthrottle.max_tracked_keys = {huge}"),
    );
    expect_error(&text, "auth.throttle.max_tracked_keys", "number too large");
    // After a multi-line array the lines cannot be placed with certainty: no key rather than
    // a wrong one.
    let text = BASE.replace(
        "keyring = \"keys.toml\"",
        &format!("keyring = \"keys.toml\"\nextra_headers = [\n  \"x-a\",\n]\nwindow = {huge}"),
    );
    expect_error(&text, "", "number too large");
}

/// A negative or fractional size says what a size is, under its key (it said "data did not
/// match any variant of untagged enum RawSize").
#[test]
fn bad_size_values_say_what_a_size_is() {
    let text = BASE.replace("[server]\n", "[server]\nmax_header_bytes = -1\n");
    let err = expect_error(&text, "server.max_header_bytes", "-1 is negative");
    assert!(err.problem().contains("\"16KiB\""), "{err}");
    assert!(!err.problem().contains("untagged"), "{err}");
    let text = format!("{BASE}\nmax_body = 1.5\n");
    expect_error(&text, "upstream[0].max_body", "expected a size");
    let text = format!("{BASE}\nmax_body = true\n");
    expect_error(&text, "upstream[0].max_body", "expected a size");
    // Both forms still work.
    let text = format!("{BASE}\nmax_body = 2048\n");
    let (_dir, path) = setup(&text);
    assert_eq!(
        ProxyConfig::load(&path).unwrap().upstreams[0].max_body,
        2048
    );
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

    // A file that cannot be read: the config file and the key that names it, and the path.
    std::fs::remove_file(&users).unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "auth.users_file", "cannot read users file");
    assert!(
        err.problem().contains(&users.display().to_string()),
        "{err}"
    );

    std::fs::write(&users, "[[users]]\nname = \"bob\"\npassword = \"plain\"\n").unwrap();
    let err = config.load_users().unwrap_err();
    assert_error(&err, &users, "users[0].password", "not a PHC password hash");

    // A large binary file (a wrong path) is named by its size, not "not valid UTF-8" (it was
    // read to the limit and decoded first).
    std::fs::write(&users, vec![0xff_u8; 1024 * 1024 + 7]).unwrap();
    let err = config.load_users().unwrap_err();
    assert!(
        err.to_string().contains("auth.users_file")
            && err.to_string().contains("larger than 1048576 bytes"),
        "{err}"
    );

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

    // A keyring that cannot be read: the config file and the key that names it, and the path.
    std::fs::remove_file(&keys).unwrap();
    let err = config.load_keyring().unwrap_err();
    assert_error(&err, &path, "signing.keyring", "cannot read keyring file");
    assert!(err.problem().contains(&keys.display().to_string()), "{err}");
    // A secret_file inside the keyring that cannot be read stays the keyring's error.
    std::fs::write(
        &keys,
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"nope.b64\"\n",
    )
    .unwrap();
    let err = config.load_keyring().unwrap_err();
    assert_eq!(err.file(), keys);
    assert_eq!(err.key(), "keys[0].secret_file");
}

#[test]
fn unreadable_redis_ca_file_is_named_by_check_files() {
    let text = format!(
        "{BASE}\n[session]\nstore = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380\"\nredis_ca_file = \"no-ca.pem\"\n"
    );
    let (dir, path) = setup(&text);
    let config = ProxyConfig::load(&path).unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "session.redis_ca_file", "cannot read CA file");
    // Read and parsed as `run` reads it: a file without a PEM certificate is refused too.
    std::fs::write(dir.join("no-ca.pem"), "x").unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(&err, &path, "session.redis_ca_file", "no PEM certificate");
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("no-ca.pem"), ca.cert.pem()).unwrap();
    config.check_files().unwrap();
    // A file over 1 MiB, or a device, is refused by its size: it was read whole, and
    // `/dev/zero` until memory ran out (the process aborted, check-config included).
    let mut big = ca.cert.pem();
    while big.len() <= 1024 * 1024 {
        big.push_str(&ca.cert.pem());
    }
    std::fs::write(dir.join("no-ca.pem"), big).unwrap();
    let err = config.check_files().unwrap_err();
    assert_error(
        &err,
        &path,
        "session.redis_ca_file",
        "larger than 1048576 bytes",
    );
    let text = format!(
        "{BASE}\n[session]\nstore = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380\"\nredis_ca_file = \"/dev/zero\"\n"
    );
    let (_dir, path) = setup(&text);
    let err = ProxyConfig::load(&path).unwrap().check_files().unwrap_err();
    assert_error(
        &err,
        &path,
        "session.redis_ca_file",
        "/dev/zero: CA file is larger",
    );
}

/// `auth.max_users_file`: a users file over 1 MiB (about 7,500 users) is refused by default,
/// the error naming the key to raise; with the key raised it loads whole (its last user is
/// there), as `run`, `check-config` and a reload load it. Out of range, or without
/// `users_file`, the key is refused naming it.
#[test]
fn max_users_file_sets_the_largest_users_file() {
    let mut users = String::new();
    let mut count = 0;
    while users.len() <= 1024 * 1024 {
        users.push_str(&format!(
            "[[users]]\nname = \"user{count}\"\npassword = \"{}\"\n",
            pw_hash()
        ));
        count += 1;
    }
    let (dir, path) = setup(BASE);
    std::fs::write(dir.join("users.toml"), &users).unwrap();
    let err = ProxyConfig::load(&path).unwrap().load_users().unwrap_err();
    assert_error(&err, &path, "auth.users_file", "auth.max_users_file");
    assert!(err.problem().contains("larger than 1048576 bytes"), "{err}");
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("auth.max_users_file"), "{stderr}");

    let raised = BASE.replace(
        "users_file = \"users.toml\"\n",
        "users_file = \"users.toml\"\nmax_users_file = \"2MiB\"\n",
    );
    std::fs::write(&path, &raised).unwrap();
    let config = ProxyConfig::load(&path).unwrap();
    assert_eq!(config.auth.max_users_file, 2 * 1024 * 1024);
    let db = config.load_users().unwrap().unwrap();
    assert!(
        db.get(&format!("user{}", count - 1)).is_some(),
        "the last user"
    );
    let out = check_config(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (lines, needle) in [
        (
            "max_users_file = \"512B\"\n",
            "must be between 1KiB and 64MiB",
        ),
        (
            "max_users_file = \"65MiB\"\n",
            "must be between 1KiB and 64MiB",
        ),
    ] {
        expect_error(
            &BASE.replace(
                "users_file = \"users.toml\"\n",
                &format!("users_file = \"users.toml\"\n{lines}"),
            ),
            "auth.max_users_file",
            needle,
        );
    }
    expect_error(
        &BASE.replace(
            "users_file = \"users.toml\"\n",
            "verify_url = \"http://127.0.0.1:3000/verify\"\nmax_users_file = \"2MiB\"\n",
        ),
        "auth.max_users_file",
        "only used with auth.users_file",
    );
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
    let huge = "x".repeat(countersign::proxy::users::MAX_PASSWORD_BYTES_LIMIT + 1);
    assert!(check_password(&users, "alice", &huge).await.is_none());
}

/// Unknown users cost an argon2 verification too, so timing does not tell which names exist.
#[tokio::test]
async fn unknown_users_take_as_long_as_wrong_passwords() {
    let users = alice_handle();
    // Warm up (the dummy hash is prepared by UsersHandle::new; this warms caches).
    check_password(&users, "nobody", "x").await;
    // Three checks of each, interleaved, and the fastest of each compared: on a shared machine
    // the load (other tests in this process, other processes) comes and goes, and a check that
    // ran while it was high would make its side look costly. The fastest is the least disturbed.
    let (mut known, mut unknown) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        for (name, fastest) in [("alice", &mut known), ("nobody", &mut unknown)] {
            let start = std::time::Instant::now();
            assert!(check_password(&users, name, "wrong").await.is_none());
            *fastest = (*fastest).min(start.elapsed());
        }
    }
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

/// `[signing]` with `key = value` added (e.g. `extra_headers = ["x"]`).
fn with_signing(line: &str) -> String {
    BASE.replace(
        "keyring = \"keys.toml\"",
        &format!("keyring = \"keys.toml\"\n{line}"),
    )
}

/// Every field the protocol reserves, the proxy sets or the proxy strips (src/proxy/forward.rs)
/// is refused as an identity header and as an extra header, naming the key; before, these
/// passed and then every request failed (`component covered twice`) or was clobbered (`host`
/// = the user name).
#[test]
fn signing_headers_the_proxy_sets_strips_or_reserves_are_refused() {
    let refused = [
        "content-digest",
        "signature",
        "signature-input",
        "host",
        "cookie",
        "set-cookie",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "content-length",
        "x-csrf-token",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "authorization",
        // Case and surrounding spaces do not hide a name.
        "Content-Digest",
        " HOST ",
    ];
    for name in refused {
        for (line, key) in [
            (format!("user_header = \"{name}\""), "signing.user_header"),
            (format!("roles_header = \"{name}\""), "signing.roles_header"),
            (
                format!("extra_headers = [\"x-tenant\", \"{name}\"]"),
                "signing.extra_headers[1]",
            ),
        ] {
            expect_error(&with_signing(&line), key, "cannot be used here");
        }
    }
    // Derived components are not header names.
    for name in ["@method", "@authority", "@query-param"] {
        expect_error(
            &with_signing(&format!("extra_headers = [\"{name}\"]")),
            "signing.extra_headers[0]",
            "derived component",
        );
        expect_error(
            &with_signing(&format!("user_header = \"{name}\"")),
            "signing.user_header",
            "derived component",
        );
    }
    // Ordinary fields are fine, in any case.
    let (_dir, path) = setup(&with_signing(
        "user_header = \"X-User\"\nroles_header = \"x-roles\"\nextra_headers = [\"Content-Type\", \"accept\", \"x-tenant\", \"idempotency-key\"]",
    ));
    let c = ProxyConfig::load(&path).unwrap();
    let extras: Vec<&str> = c.signing.extra_headers.iter().map(|h| h.as_str()).collect();
    assert_eq!(
        extras,
        ["content-type", "accept", "x-tenant", "idempotency-key"]
    );
}

/// The identity headers and the extra headers are all distinct: a header covered twice fails
/// every request.
#[test]
fn signing_headers_must_be_distinct() {
    expect_error(
        &with_signing("extra_headers = [\"x-auth-user\"]"),
        "signing.extra_headers[0]",
        "already covered as signing.user_header",
    );
    expect_error(
        &with_signing("extra_headers = [\"x-a\", \"X-Auth-Roles\"]"),
        "signing.extra_headers[1]",
        "already covered as signing.roles_header",
    );
    expect_error(
        &with_signing("user_header = \"x-who\"\nextra_headers = [\"x-who\"]"),
        "signing.extra_headers[0]",
        "already covered as signing.user_header",
    );
    expect_error(
        &with_signing("extra_headers = [\"x-tenant\", \"X-Tenant\"]"),
        "signing.extra_headers[1]",
        "duplicate header \"X-Tenant\" (also signing.extra_headers[0])",
    );
    expect_error(
        &with_signing("roles_header = \"X-AUTH-USER\""),
        "signing.roles_header",
        "must differ from signing.user_header",
    );
}

/// Durations are bounded (365 days), naming the key: an absurd one passed check-config and
/// then made every connection panic (`Instant` overflow).
#[test]
fn durations_have_a_maximum() {
    let text = BASE.replace(
        "[server]\n",
        "[server]\nheader_read_timeout = \"213503982334601d\"\n",
    );
    expect_error(&text, "server.header_read_timeout", "maximum of 365d");
    for too_long in ["366d", "8761h", "525601m", "31536001s", "31536000001ms"] {
        let text = format!("{BASE}\ntimeout = \"{too_long}\"\n");
        expect_error(&text, "upstream[0].timeout", "maximum of 365d");
    }
    // The maximum itself is accepted.
    let text = format!("{BASE}\n[session]\nabsolute_timeout = \"365d\"\n");
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(
        c.session.absolute_timeout,
        Duration::from_secs(365 * 86_400)
    );
    assert_eq!(
        countersign::proxy::config::MAX_DURATION,
        Duration::from_secs(365 * 86_400)
    );
    // The CLI's duration flags share the parser, so the bound.
    assert!(parse_positive_duration("366d").is_err());
    assert_eq!(
        parse_positive_duration("365d"),
        Ok(Duration::from_secs(31_536_000))
    );
}

/// Settings counted in whole seconds refuse fractions instead of rounding them down:
/// `signing.window = "500ms"` signed with expires == created.
#[test]
fn whole_second_settings_refuse_fractions() {
    expect_error(
        &with_signing("window = \"500ms\""),
        "signing.window",
        "whole number of seconds",
    );
    expect_error(
        &with_signing("window = \"1500ms\""),
        "signing.window",
        "whole number of seconds",
    );
    for (table, key) in [
        ("session", "idle_timeout"),
        ("session", "absolute_timeout"),
        ("auth.throttle", "window"),
    ] {
        let text = format!("{BASE}\n[{table}]\n{key} = \"90500ms\"\n");
        expect_error(&text, &format!("{table}.{key}"), "whole number of seconds");
    }
    let redis = "[session]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n";
    expect_error(
        &format!("{BASE}\n{redis}redis_touch_interval = \"500ms\"\n"),
        "session.redis_touch_interval",
        "whole number of seconds",
    );
    // Whole seconds written in ms are fine; other durations keep their milliseconds.
    let text = format!(
        "{}\n[session]\nidle_timeout = \"60000ms\"\n",
        with_signing("window = \"2000ms\"")
    );
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(c.signing.window, Duration::from_secs(2));
    assert_eq!(c.session.idle_timeout, Duration::from_secs(60));
    let text = BASE.replace("[server]\n", "[server]\nshutdown_grace = \"1500ms\"\n");
    let (_dir, path) = setup(&text);
    assert_eq!(
        ProxyConfig::load(&path).unwrap().server.shutdown_grace,
        Duration::from_millis(1500)
    );
}

/// Surrounding spaces in a duration are ignored, as for every value parsed from text (sizes,
/// addresses, header names): docs/CONFIG.md says so and this pins it.
#[test]
fn surrounding_spaces_in_parsed_values_are_ignored() {
    let text = format!("{BASE}\n[session]\nidle_timeout = \" 30m \"\n");
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(c.session.idle_timeout, Duration::from_secs(1800));
    assert_eq!(parse_positive_duration(" 10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_size(" 1MiB "), Ok(1_048_576));
    // URLs too: `session.redis_url` and `auth.verify_url`, as an upstream's `url`.
    let text = format!(
        "{BASE}\n[session]\nstore = \"redis\"\nredis_url = \" redis://127.0.0.1:6379/0 \"\n"
    );
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(
        c.session.store,
        StoreKind::Redis {
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "countersign:".into()
        }
    );
    let text = BASE
        .replace(
            "users_file = \"users.toml\"",
            "verify_url = \" http://127.0.0.1:3000/auth/verify \"",
        )
        .replace("\"http://127.0.0.1:3000\"", "\" http://127.0.0.1:3000 \"");
    let (_dir, path) = setup(&text);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(
        c.auth
            .verify_url
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("http://127.0.0.1:3000/auth/verify")
    );
    assert_eq!(c.upstreams[0].url.to_string(), "http://127.0.0.1:3000/");
    // Spaces inside still are not.
    assert!(parse_positive_duration("10 s").is_err());
}

/// A URL without a scheme whose path or query holds a `://` further on: its password is left
/// out of the message all the same (the later `://` was taken for the scheme's, and the
/// whole URL was quoted).
#[test]
fn a_later_scheme_in_a_url_does_not_unveil_its_password() {
    let url = "admin:hunter2@auth.internal/verify?next=https://x";
    let cases = [
        (
            BASE.replace(
                "users_file = \"users.toml\"",
                &format!("verify_url = \"{url}\""),
            ),
            "auth.verify_url",
        ),
        (
            format!("{BASE}\n[session]\nstore = \"redis\"\nredis_url = \"{url}\"\n"),
            "session.redis_url",
        ),
        (
            BASE.replace("\"http://127.0.0.1:3000\"", &format!("\"{url}\"")),
            "upstream[0].url",
        ),
    ];
    for (text, key) in cases {
        let err = expect_error(&text, key, "");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(
            err.to_string().contains("[redacted]@auth.internal"),
            "{err}"
        );
    }
}

/// Keys that would do nothing are refused, naming the key and why: password checks with
/// `verify_url` (the API checks the passwords) and a WebSocket session check on a route
/// without sessions (`auth = "none"`).
#[test]
fn keys_without_effect_are_refused() {
    let text = BASE.replace(
        "users_file = \"users.toml\"",
        "verify_url = \"http://127.0.0.1:3000/v\"\nmax_concurrent_password_checks = 2",
    );
    expect_error(
        &text,
        "auth.max_concurrent_password_checks",
        "only used with auth.users_file: with auth.verify_url the API checks the passwords",
    );
    expect_error(
        &format!("{BASE}auth = \"none\"\nwebsocket = true\nwebsocket_session_check = \"5s\"\n"),
        "upstream[0].websocket_session_check",
        "only used on a route that requires a session: with auth = \"none\"",
    );
    // Where they have an effect, they are taken.
    for text in [
        BASE.replace(
            "users_file = \"users.toml\"",
            "users_file = \"users.toml\"\nmax_concurrent_password_checks = 2",
        ),
        BASE.replace(
            "users_file = \"users.toml\"",
            "verify_url = \"http://127.0.0.1:3000/v\"",
        ),
        format!("{BASE}auth = \"none\"\nwebsocket = true\n"),
        format!("{BASE}auth = \"required\"\nwebsocket = true\nwebsocket_session_check = \"5s\"\n"),
    ] {
        let (_dir, path) = setup(&text);
        assert!(ProxyConfig::load(&path).is_ok(), "{text}");
    }
}

/// Only the session checks keep a busy WebSocket's session alive (each touches it): checked
/// half the idle timeout apart or more, the session of a socket in use expired and the socket
/// was closed 1008 `session_ended` (the default 30 s check with `idle_timeout = "20s"`).
#[test]
fn a_websocket_session_check_must_be_under_half_the_idle_timeout() {
    let with = |route: &str, idle: &str| {
        format!("{BASE}{route}websocket = true\n\n[session]\nidle_timeout = \"{idle}\"\n")
    };
    let err = expect_error(
        &with("", "40s"),
        "upstream[0].websocket_session_check",
        "less than half of session.idle_timeout (30s, 40s)",
    );
    assert!(err.problem().contains("only these checks keep"), "{err}");
    expect_error(
        &with("websocket_session_check = \"10s\"\n", "20s"),
        "upstream[0].websocket_session_check",
        "less than half",
    );
    for text in [
        with("websocket_session_check = \"9s\"\n", "20s"),
        with("", "61s"),
        // A public route has no session to check.
        with("auth = \"none\"\n", "2s"),
    ] {
        let (_dir, path) = setup(&text);
        ProxyConfig::load(&path).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

/// `admin.listen` on `server.listen`'s port with either one a wildcard address cannot bind
/// beside it: refused as the same address is; distinct addresses, or another port, are not.
#[test]
fn admin_listen_overlapping_server_listen_is_refused() {
    let with = |server: &str, admin: &str| {
        BASE.replace("127.0.0.1:8080", server) + &format!("\n[admin]\nlisten = \"{admin}\"\n")
    };
    for (server, admin) in [
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "[::]:8080"),
        ("[::]:8080", "0.0.0.0:8080"),
        ("[::1]:8080", "[::]:8080"),
        ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
    ] {
        let err = expect_error(
            &with(server, admin),
            "admin.listen",
            "overlaps server.listen",
        );
        assert!(err.problem().contains("wildcard"), "{err}");
    }
    for (server, admin) in [
        ("127.0.0.1:8080", "0.0.0.0:9090"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("[::1]:8080", "0.0.0.0:8080"),
        ("0.0.0.0:0", "0.0.0.0:0"),
    ] {
        let text = with(server, admin);
        let (_dir, path) = setup(&text);
        assert!(ProxyConfig::load(&path).is_ok(), "{server} / {admin}");
    }
}

/// The prefix `/api/` also takes the path `/api` (so that `/api` reaches the API rather than
/// a 404), but not `/apix`: what docs/CONFIG.md says. (tests/proxy_config_limits.rs checks the
/// proxy's own router does the same.)
#[test]
fn route_prefix_also_matches_the_path_without_its_trailing_slash() {
    let second =
        "\n[[upstream]]\nname = \"raw\"\nprefix = \"/api/raw/\"\nurl = \"http://127.0.0.1:3001\"\n";
    let (_dir, path) = setup(&format!("{BASE}{second}"));
    let c = ProxyConfig::load(&path).unwrap();
    let route = |p: &str| c.route(p).map(|u| u.name.as_str());
    assert_eq!(route("/api"), Some("api"));
    assert_eq!(route("/api/"), Some("api"));
    assert_eq!(route("/api/x"), Some("api"));
    assert_eq!(route("/api/raw"), Some("raw"));
    assert_eq!(route("/api/raw/x"), Some("raw"));
    assert_eq!(route("/api/rawx"), Some("api"));
    assert_eq!(route("/apix"), None);
    assert_eq!(route("/ap"), None);
    assert_eq!(route("/"), None);
}

/// A users file hash with the `m`, `t`, `p` given (a cheap real hash of "pw", parameters
/// rewritten: nothing parses it past the parameters before the limits refuse it).
fn hash_with_params(m: u32, t: u32, p: u32) -> String {
    let cheap = cheap_hash("pw", 8, 1, 1);
    cheap.replace("m=8,t=1,p=1", &format!("m={m},t={t},p={p}"))
}

/// A real argon2id hash of `password` with parameters `m` (KiB), `t`, `p`.
fn cheap_hash(password: &str, m: u32, t: u32, p: u32) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher as _, SaltString};
    let params = argon2::Params::new(m, t, p, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    argon
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

fn user_line(name: &str, hash: &str) -> String {
    format!("[[users]]\nname = \"{name}\"\npassword = \"{hash}\"\n")
}

/// The QA report's hash (`m=4000000,t=100`: 4 GB and > 40 s to load) is refused by the
/// default limits, quickly, naming the users file, the user and the parameter; every load
/// path applies the limits (ProxyConfig::load_users, UserDb::load / parse).
#[test]
fn users_file_hashes_beyond_the_argon2_limits_are_refused() {
    let (dir, path) = setup(BASE);
    let config = ProxyConfig::load(&path).unwrap();
    let users = dir.join("users.toml");
    let cases = [
        (
            (4_000_000, 100, 1),
            "m=4000000",
            "auth.max_hash_memory (262144 KiB = 256MiB)",
        ),
        (
            (256 * 1024 + 1, 1, 1),
            "m=262145",
            "auth.max_hash_memory (262144 KiB = 256MiB)",
        ),
        ((8, 11, 1), "t=11", "auth.max_hash_iterations (10)"),
        ((72, 1, 9), "p=9", "auth.max_hash_parallelism (8)"),
    ];
    for ((m, t, p), parameter, limit) in cases {
        let text = format!(
            "{}{}",
            users_toml(),
            user_line("mallory", &hash_with_params(m, t, p))
        );
        std::fs::write(&users, &text).unwrap();
        let started = std::time::Instant::now();
        let err = config.load_users().unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_error(&err, &users, "users[1].password", "user \"mallory\"");
        assert!(err.problem().contains(parameter), "{err}");
        assert!(err.problem().contains(limit), "{err}");
        let err = config.check_files().unwrap_err();
        assert_eq!(err.key(), "users[1].password", "{err}");
        // The loaders without a config apply the default limits.
        let err = UserDb::load(&users).unwrap_err();
        assert!(err.problem().contains(limit), "{err}");
        let err = UserDb::parse(&text, &users).unwrap_err();
        assert!(err.problem().contains(limit), "{err}");
    }
    // At the limits: accepted (a cheap real hash, so the dummy hash is cheap too).
    std::fs::write(&users, user_line("bob", &cheap_hash("pw", 64, 10, 8))).unwrap();
    assert_eq!(config.load_users().unwrap().unwrap().len(), 1);
}

/// The limits are `[auth]` keys: raised, a hash beyond the default is accepted; lowered, even
/// `hash-password`'s own hashes (19 MiB) are refused; nonsense values are named.
#[test]
fn argon2_limits_are_configurable() {
    let (_dir, path) = setup(BASE);
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(c.auth.hash_limits, HashLimits::default());
    assert_eq!(
        (
            c.auth.hash_limits.max_memory_kib,
            c.auth.hash_limits.max_iterations,
            c.auth.hash_limits.max_parallelism
        ),
        (256 * 1024, 10, 8)
    );
    // hash-password's hashes pass the defaults.
    c.check_files().unwrap();

    let auth = |lines: &str| {
        BASE.replace(
            "users_file = \"users.toml\"",
            &format!("users_file = \"users.toml\"\n{lines}"),
        )
    };
    let (dir, path) = setup(&auth(
        "max_hash_memory = \"16MiB\"\nmax_hash_iterations = 12\nmax_hash_parallelism = 2",
    ));
    let c = ProxyConfig::load(&path).unwrap();
    assert_eq!(
        c.auth.hash_limits,
        HashLimits {
            max_memory_kib: 16 * 1024,
            max_iterations: 12,
            max_parallelism: 2
        }
    );
    let err = c.load_users().unwrap_err();
    assert_error(
        &err,
        &dir.join("users.toml"),
        "users[0].password",
        "auth.max_hash_memory (16384 KiB = 16MiB)",
    );
    std::fs::write(
        dir.join("users.toml"),
        user_line("bob", &cheap_hash("pw", 8, 12, 1)),
    )
    .unwrap();
    c.check_files().unwrap();

    expect_error(
        &auth("max_hash_memory = \"4KiB\""),
        "auth.max_hash_memory",
        "at least 8KiB",
    );
    expect_error(
        &auth("max_hash_memory = \"lots\""),
        "auth.max_hash_memory",
        "invalid size",
    );
    expect_error(
        &auth("max_hash_iterations = 0"),
        "auth.max_hash_iterations",
        "greater than zero",
    );
    expect_error(
        &auth("max_hash_parallelism = 0"),
        "auth.max_hash_parallelism",
        "greater than zero",
    );
    expect_error(
        &auth("max_hash_parallelism = -2"),
        "auth.max_hash_parallelism",
        "",
    );
    for key in [
        "max_hash_memory = \"1GiB\"",
        "max_hash_iterations = 3",
        "max_hash_parallelism = 1",
    ] {
        let text = BASE.replace(
            "users_file = \"users.toml\"",
            &format!("verify_url = \"http://127.0.0.1:3000/v\"\n{key}"),
        );
        let name = key.split(' ').next().unwrap();
        expect_error(
            &text,
            &format!("auth.{name}"),
            "only used with auth.users_file",
        );
    }
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

/// A Redis touch interval above half the idle timeout is refused when set (a session in use
/// could expire); the default gives way to a short idle timeout instead of failing.
#[test]
fn redis_touch_interval_is_at_most_half_the_idle_timeout() {
    let redis = "[session]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n";
    for touch in ["6s", "10s"] {
        expect_error(
            &format!("{BASE}\n{redis}idle_timeout = \"10s\"\nredis_touch_interval = \"{touch}\"\n"),
            "session.redis_touch_interval",
            "at most half of session.idle_timeout",
        );
    }
    for text in [
        format!("{BASE}\n{redis}idle_timeout = \"10s\"\nredis_touch_interval = \"5s\"\n"),
        // The default (5s) with a 5s idle timeout: accepted, the store uses 2s.
        format!("{BASE}\n{redis}idle_timeout = \"5s\"\n"),
    ] {
        let (_dir, path) = setup(&text);
        assert!(ProxyConfig::load(&path).is_ok(), "{text}");
    }
}

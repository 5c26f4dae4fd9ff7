//! The binary as an operator runs it (`check-config`, `run`, SIGHUP, `/readyz`, `demo-api`),
//! each test from a defect a QA pass found: `/readyz` probes an https upstream on 443; URL
//! ports outside 1..=65535 or empty are refused; connection limits are bounded; `check-config`
//! refuses every Redis URL and CA file `run` refuses; URL passwords never appear in messages;
//! TLS and keyring errors name their key and fit on one line; users files with over-long names
//! or no users are refused; `demo-api --replay-capacity 0` is refused.
//! Run: `cargo test --all-features --test proxy_operator_checks`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_run;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;
use support_cli::exit_within;
use support_run::*;

fn countersign(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn check_config(path: &Path) -> Output {
    countersign(&["check-config", "--config", path.to_str().unwrap()])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A config directory with `keys.toml`, `users.toml` and a `proxy.toml` made of the usual
/// sections, with `server_extra`, `session`, `auth_extra` and `upstream_url` put in place.
struct Cfg<'a> {
    listen: &'a str,
    admin: Option<&'a str>,
    public_origin: &'a str,
    server_extra: &'a str,
    session: &'a str,
    auth: &'a str,
    upstream_url: &'a str,
}

impl Default for Cfg<'_> {
    fn default() -> Self {
        Cfg {
            listen: "127.0.0.1:8080",
            admin: None,
            public_origin: "http://app.test",
            server_extra: "",
            session: "",
            auth: "users_file = \"users.toml\"",
            upstream_url: "http://127.0.0.1:3000",
        }
    }
}

impl Cfg<'_> {
    /// Writes proxy.toml (and keys, users) into a fresh directory: the directory (removed when
    /// dropped) and the config's path.
    fn write(&self, tag: &str) -> (TestDir, PathBuf) {
        let dir = temp_dir(tag);
        write(&dir.join("keys.toml"), &keyring_file_text("k1"));
        write(&dir.join("users.toml"), &users_file_text());
        let admin = self
            .admin
            .map(|a| format!("[admin]\nlisten = \"{a}\"\n"))
            .unwrap_or_default();
        let path = dir.join("proxy.toml");
        write(
            &path,
            &format!(
                "[server]\nlisten = \"{}\"\npublic_origin = \"{}\"\nshutdown_grace = \"2s\"\n{}\n\
                 {admin}\n[session]\n{}\n\n[auth]\n{}\n\n[signing]\nkeyring = \"keys.toml\"\n\n\
                 [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"{}\"\n",
                self.listen,
                self.public_origin,
                self.server_extra,
                self.session,
                self.auth,
                self.upstream_url
            ),
        );
        (dir, path)
    }
}

// ---------------------------------------------------------------------------------------------
// /readyz probes port 443 for an https:// upstream without an explicit port
// ---------------------------------------------------------------------------------------------

/// docs/OPERATIONS.md: "`GET /readyz` readiness: the session store and the upstreams are
/// reachable". For `url = "https://host"` the probe (`admin::Readiness::check`) connects to
/// `host:443`, where the upstream is, so a working https upstream is reported ready. Before the
/// fix, it connected to `host:80`: a working https upstream was reported unreachable, and one
/// that was down was reported ready whenever something answered on port 80.
#[test]
fn readyz_probes_port_443_for_an_https_upstream_without_a_port() {
    use rand::Rng as _;
    // An address of our own in 127/8, so nothing else listens on its port 80 or 443.
    let mut rng = rand::thread_rng();
    let ip = format!(
        "127.{}.{}.{}",
        rng.gen_range(100..200),
        rng.gen_range(1..250),
        rng.gen_range(1..250)
    );
    // The upstream's TLS port: a plain TCP listener is all the readiness probe (a TCP
    // connect) needs. Port 443 needs privileges: this test runs as root (here and in CI), and
    // fails rather than skips without them (the probe address itself is unit-tested in
    // `proxy::admin`).
    let _upstream = std::net::TcpListener::bind(format!("{ip}:443")).unwrap_or_else(|e| {
        panic!("cannot bind {ip}:443 ({e}): this test needs root (CAP_NET_BIND_SERVICE)")
    });
    let url = format!("https://{ip}");
    let (mut proxy, _listen, admin) = start_on_free_ports(|listen, admin| {
        let config = Cfg {
            listen: &listen.to_string(),
            admin: Some(&admin.to_string()),
            upstream_url: &url,
            ..Cfg::default()
        }
        .write("qa-op-readyz");
        let (dir, config) = config;
        RunningProxy::spawn(&config, &["--workers", "1"]).keep_dir(dir)
    });
    let answer = blocking_get(admin, "/readyz");
    proxy.stop();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "an https upstream listening on {ip}:443 must be ready; got: {answer}\nlog: {}",
        proxy.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Out-of-range or empty ports in URLs are refused
// ---------------------------------------------------------------------------------------------

/// A port above 65535, a port of 0 or an empty port (`host:`) in `upstream[].url`,
/// `auth.verify_url` or `server.public_origin` is refused by `check-config` with exit 2 and an
/// error naming the key, as docs/CONFIG.md promises for bad values. Before the fix,
/// `http://host:99999` passed and every request went to `host:80`: `port_u16()` is `None` for a
/// port that does not fit, and everything downstream treated `None` as the scheme's default.
#[test]
fn urls_with_out_of_range_or_empty_ports_are_refused() {
    let cases: Vec<(&str, Cfg)> = vec![
        (
            "upstream[0].url",
            Cfg {
                upstream_url: "http://127.0.0.1:99999",
                ..Cfg::default()
            },
        ),
        (
            "upstream[0].url",
            Cfg {
                upstream_url: "http://127.0.0.1:0",
                ..Cfg::default()
            },
        ),
        (
            "upstream[0].url",
            Cfg {
                upstream_url: "http://127.0.0.1:",
                ..Cfg::default()
            },
        ),
        (
            "server.public_origin",
            Cfg {
                public_origin: "http://app.test:80800",
                ..Cfg::default()
            },
        ),
        (
            "auth.verify_url",
            Cfg {
                auth: "verify_url = \"http://127.0.0.1:700000/auth/verify\"",
                ..Cfg::default()
            },
        ),
    ];
    let mut wrong = Vec::new();
    for (key, cfg) in cases {
        let (_dir, path) = cfg.write("qa-op-port");
        let out = check_config(&path);
        let err = stderr(&out);
        if out.status.code() != Some(2) || !err.contains(key) {
            let text = std::fs::read_to_string(&path).unwrap();
            wrong.push(format!(
                "{key}: exit {:?}, stderr {err:?}, config:\n{text}",
                out.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "accepted:\n{}", wrong.join("\n"));
}

/// A `public_origin` written with a host outside ASCII (`https://bücher.example`, as an address
/// bar shows it) was refused as "is not a URL", though it is one. Browsers send that host in
/// `Origin` in its punycode form, so the message now names the origin to write instead.
#[test]
fn a_public_origin_with_a_non_ascii_host_names_its_ascii_form() {
    let (_dir, path) = Cfg {
        public_origin: "https://b\u{fc}cher.example",
        ..Cfg::default()
    }
    .write("qa-op-idn");
    let out = check_config(&path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("server.public_origin"), "{err}");
    assert!(!err.contains("is not a URL"), "{err}");
    assert!(err.contains("\"https://xn--bcher-kva.example\""), "{err}");
}

// ---------------------------------------------------------------------------------------------
// max_connections beyond tokio's semaphore limit: a config error in check-config and run
// ---------------------------------------------------------------------------------------------

/// A `server.max_connections` or `admin.max_connections` above tokio's
/// `Semaphore::MAX_PERMITS` (usize::MAX >> 3) is refused by both `run` and `check-config` with
/// exit 2, naming the key, and `run` does not panic. Project rule: bad config input gives file,
/// key, problem and a non-zero exit, never a panic; and check-config accepts exactly what run
/// accepts. Before the fix, only > 0 was checked: check-config passed, then run panicked
/// (exit 101) in `ProxyServer::start_on`.
#[test]
fn huge_max_connections_is_a_config_error_not_a_panic() {
    for (key, server_extra, admin_extra) in [
        (
            "server.max_connections",
            "max_connections = 4611686018427387904",
            "",
        ),
        (
            "admin.max_connections",
            "",
            "max_connections = 4611686018427387904",
        ),
    ] {
        let (listen, admin) = two_free_addrs();
        let (_dir, path) = Cfg {
            listen: &listen.to_string(),
            admin: Some(&admin.to_string()),
            server_extra,
            ..Cfg::default()
        }
        .write("qa-op-maxconn");
        if !admin_extra.is_empty() {
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replacen("[admin]\n", &format!("[admin]\n{admin_extra}\n"), 1);
            write(&path, &text);
        }
        let mut proxy = RunningProxy::spawn_logging(&path, "human", &["--workers", "1"]);
        let status = proxy.wait_exit(Duration::from_secs(10));
        let log = proxy.log();
        assert!(
            !log.contains("panicked"),
            "{key}: run panicked instead of naming the key: {log}"
        );
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{key}: run must refuse the value with exit 2: {log}"
        );
        assert!(log.contains(key), "{key}: not named: {log}");
        let out = check_config(&path);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{key}: check-config must refuse what run refuses: {}",
            stderr(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// check-config refuses the Redis settings that run refuses
// ---------------------------------------------------------------------------------------------

/// A `session.redis_ca_file` that is a directory, an empty file or a file without a PEM
/// certificate is refused by `run` (exit 2) and by `check-config` (exit 2, naming the key).
/// docs/OPERATIONS.md: check-config "loads the config, the users file and the keyring exactly
/// as `run` would"; project rule: check-config accepts exactly what run accepts. Before the fix,
/// check-config only opened the file (a directory opens fine) and never parsed it.
#[test]
fn check_config_refuses_a_redis_ca_file_that_run_refuses() {
    let mut wrong = Vec::new();
    for (what, make) in [
        (
            "a directory",
            (|dir: &Path| std::fs::create_dir_all(dir.join("ca.pem")).unwrap()) as fn(&Path),
        ),
        ("an empty file", |dir: &Path| write(&dir.join("ca.pem"), "")),
        ("not PEM", |dir: &Path| {
            write(&dir.join("ca.pem"), "garbage\n")
        }),
    ] {
        let (listen, _) = two_free_addrs();
        let (_dir, path) = Cfg {
            listen: &listen.to_string(),
            session: "store = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380/0\"\n\
                      redis_ca_file = \"ca.pem\"",
            ..Cfg::default()
        }
        .write("qa-op-redis-ca");
        make(path.parent().unwrap());
        if let Some(problem) = refused_by_run_but_not_check_config(&path, "session.redis_ca_file") {
            wrong.push(format!("{what}: {problem}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Asserts that `run` refuses the config at `path` (exit 2; it fails before binding, so a short
/// wait is enough), and says how `check-config` failed to do the same, naming `key`, if it did.
fn refused_by_run_but_not_check_config(path: &Path, key: &str) -> Option<String> {
    let mut proxy = RunningProxy::spawn_logging(path, "human", &["--workers", "1"]);
    let status = proxy.wait_exit(Duration::from_secs(10));
    let run_log = proxy.log();
    drop(proxy);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "run refuses it: {run_log}"
    );
    let out = check_config(path);
    (out.status.code() != Some(2) || !stderr(&out).contains(key)).then(|| {
        format!(
            "check-config exit {:?} ({}) but run said: {}",
            out.status.code(),
            stderr(&out).trim(),
            run_log.trim()
        )
    })
}

/// A `session.redis_url` with a bad port, a bad database number or a missing host is refused
/// by `run` and by `check-config` alike: exit 2, naming `session.redis_url`. Before the fix,
/// check-config only checked the `redis://` / `rediss://` scheme.
#[test]
fn check_config_refuses_a_redis_url_that_run_refuses() {
    let mut wrong = Vec::new();
    for url in [
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/notadb",
        "redis://",
    ] {
        let (listen, _) = two_free_addrs();
        let session = format!("store = \"redis\"\nredis_url = \"{url}\"");
        let (_dir, path) = Cfg {
            listen: &listen.to_string(),
            session: &session,
            ..Cfg::default()
        }
        .write("qa-op-redis-url");
        if let Some(problem) = refused_by_run_but_not_check_config(&path, "session.redis_url") {
            wrong.push(format!("{url}: {problem}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Passwords in URLs are never echoed in config errors
// ---------------------------------------------------------------------------------------------

/// A URL with user info (`http://user:password@host`) is refused for `upstream[].url`,
/// `auth.verify_url` and `server.public_origin` with exit 2, naming the key, and the message
/// does not contain the password. Project rule: passwords never appear in error messages (the
/// Redis URL is redacted for the same reason). Before the fix, the message quoted the whole
/// URL, password included.
#[test]
fn config_errors_do_not_echo_passwords_in_urls() {
    const PASSWORD: &str = "Sup3rS3cretPw";
    let upstream = format!("http://svc:{PASSWORD}@127.0.0.1:3000");
    let origin = format!("https://svc:{PASSWORD}@app.test");
    let verify = format!("verify_url = \"http://svc:{PASSWORD}@127.0.0.1:3000/auth/verify\"");
    let cases = [
        (
            "upstream[0].url",
            Cfg {
                upstream_url: &upstream,
                ..Cfg::default()
            },
        ),
        (
            "server.public_origin",
            Cfg {
                public_origin: &origin,
                ..Cfg::default()
            },
        ),
        (
            "auth.verify_url",
            Cfg {
                auth: &verify,
                ..Cfg::default()
            },
        ),
    ];
    let mut leaked = Vec::new();
    for (key, cfg) in cases {
        let (_dir, path) = cfg.write("qa-op-userinfo");
        let out = check_config(&path);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
        if err.contains(PASSWORD) {
            leaked.push(err);
        }
    }
    assert!(
        leaked.is_empty(),
        "password in the message:\n{}",
        leaked.concat()
    );
}

// ---------------------------------------------------------------------------------------------
// run's TLS errors name the key
// ---------------------------------------------------------------------------------------------

/// With an unusable certificate or key, `run` exits 2 with a message naming the key
/// (`server.tls_cert`), as `check-config` does
/// (`proxy.toml: server.tls_cert/tls_key: ./c.pem: no certificate found`). Project rule: file,
/// key and problem. Before the fix, run's message named only the file
/// (`proxy.toml: ./c.pem: no certificate found`).
#[test]
fn run_names_the_tls_key_when_the_certificate_is_unusable() {
    let (listen, _) = two_free_addrs();
    let (_dir, path) = Cfg {
        listen: &listen.to_string(),
        server_extra: "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
        ..Cfg::default()
    }
    .write("qa-op-tls");
    let dir = path.parent().unwrap();
    write(&dir.join("c.pem"), "not a certificate\n");
    write(&dir.join("k.pem"), "not a key\n");
    let mut proxy = RunningProxy::spawn_logging(&path, "human", &["--workers", "1"]);
    let status = proxy.wait_exit(Duration::from_secs(10));
    let log = proxy.log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(
        log.contains("server.tls_cert"),
        "run's message names no key (check-config says server.tls_cert/tls_key): {log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keyring syntax errors fit on one line
// ---------------------------------------------------------------------------------------------

/// A keyring TOML syntax error (`secret = B7...` without quotes) is reported by `check-config`
/// on one line (exit 2), as the config and users files' errors are. docs/OPERATIONS.md: "Every
/// failure is logged, one line each". Before the fix, `keyfile::parse_keyring` kept the TOML
/// parser's multi-line message (`keys.toml: invalid string` / `expected ...`).
#[test]
fn keyring_syntax_errors_are_one_line() {
    let (_dir, path) = Cfg::default().write("qa-op-keyring-line");
    write(
        &path.parent().unwrap().join("keys.toml"),
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7A=\n",
    );
    let out = check_config(&path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "check-config's message is one line: {err:?}"
    );
}

/// The same through SIGHUP: with the default (human) log format every log line, including the
/// keyring error's, starts with its timestamp. Before the fix, the error's second line did not.
#[test]
fn sighup_logs_a_keyring_syntax_error_on_one_line() {
    let written = std::cell::RefCell::new(PathBuf::new());
    let (mut proxy, _listen, _admin) = start_on_free_ports(|listen, _admin| {
        let config = Cfg {
            listen: &listen.to_string(),
            ..Cfg::default()
        }
        .write("qa-op-hup-line");
        let (dir, config) = config;
        *written.borrow_mut() = config.clone();
        RunningProxy::spawn_logging(&config, "human", &["--workers", "1"]).keep_dir(dir)
    });
    let config = written.into_inner();
    write(
        &config.parent().unwrap().join("keys.toml"),
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7B7A=\n",
    );
    proxy.signal("HUP");
    proxy.wait_for_log("signing.keyring not reloaded");
    // Let the log writer flush the rest of the entry.
    std::thread::sleep(Duration::from_millis(500));
    proxy.stop();
    let log = proxy.log();
    let stray: Vec<&str> = log
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(
        stray.is_empty(),
        "log lines without a timestamp (a failure split over lines): {stray:?}\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Users the login can never accept
// ---------------------------------------------------------------------------------------------

/// A users file may hold a name longer than `auth.max_username_bytes` (default 256): it loads
/// A users file holding a name longer than `auth.max_username_bytes` is refused by
/// `check-config` with exit 2, naming `users[i].name` (docs/CONFIG.md: "A users file name longer
/// than this is refused when the file loads ...: that user could never log in"). Before the
/// fix, the file loaded and that user's login always answered 400 `bad_request`.
#[test]
fn users_file_names_longer_than_max_username_bytes_are_refused() {
    let (_dir, path) = Cfg {
        auth: "users_file = \"users.toml\"\nmax_username_bytes = 16",
        ..Cfg::default()
    }
    .write("qa-op-long-name");
    write(
        &path.parent().unwrap().join("users.toml"),
        &format!(
            "[[users]]\nname = \"{}\"\npassword = \"{}\"\n",
            "a".repeat(40),
            cheap_hash(ALICE_PASSWORD)
        ),
    );
    let out = check_config(&path);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a user who can never log in is accepted: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(stderr(&out).contains("users[0].name"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// demo-api --replay-capacity 0
// ---------------------------------------------------------------------------------------------

/// `demo-api --replay-capacity 0` is refused with exit 2, like `--max-headers 0` and every
/// other count in the CLI and the config ("> 0"). Before the fix, it started, and then every
/// correctly signed request answered 503 `replay_cache_unavailable` (the cache is always full).
#[test]
fn demo_api_refuses_a_replay_capacity_of_zero() {
    let dir = temp_dir("qa-op-demo-api");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "demo-api",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--keyring",
            dir.join("keys.toml").to_str().unwrap(),
            "--replay-capacity",
            "0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(5));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "--replay-capacity 0 is accepted (every request would be 503)"
    );
}

/// A users file without users (nobody could log in) is refused like any other unusable
/// users file: exit 2, naming the file and `users`. (`dev` builds its own one-user database
/// and is not affected.)
#[test]
fn an_empty_users_file_is_refused() {
    for text in ["", "# no users yet\n", "users = []\n"] {
        let (_dir, path) = Cfg::default().write("qa-op-no-users");
        write(&path.parent().unwrap().join("users.toml"), text);
        let out = check_config(&path);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert!(
            err.contains("users.toml: users: no users"),
            "{text:?}: {err}"
        );
    }
}

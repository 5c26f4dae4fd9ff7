//! Config limits as a user meets them: `check-config` and `run` (the real binary) refuse
//! signing header names the proxy sets, strips or reserves, unbounded or fractional durations,
//! users-file hashes beyond the argon2 limits and unreadable files, each with the file, the key
//! and exit status 2; and the proxy's router matches a route prefix without its trailing slash
//! as docs/CONFIG.md says.
//! Run: `cargo test --all-features --test proxy_config_limits`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::*;
use support_cli::BIN;

/// A folder with keys.toml, users.toml (alice, a cheap hash) and proxy.toml.
fn good_config(dir: &Path) -> PathBuf {
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let path = dir.join("proxy.toml");
    write(
        &path,
        r#"
[server]
listen = "127.0.0.1:0"
public_origin = "http://localhost:8080"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "http://127.0.0.1:3000"
"#,
    );
    path
}

/// The QA report's users file: one hash with `m=4000000,t=100` (4 GB, > 40 s per check).
fn costly_users_file() -> String {
    let hash = cheap_hash("pw").replace("m=8,t=1,p=1", "m=4000000,t=100,p=1");
    assert!(hash.contains("m=4000000"), "{hash}");
    format!("[[users]]\nname = \"mallory\"\npassword = \"{hash}\"\n")
}

/// Runs `countersign <args>`; a process still running after `limit` is killed and the test
/// fails (a `run` that accepted its config would serve forever).
fn countersign_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "countersign {args:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

type Edit = fn(&Path, &str) -> String;

/// Each case: what, an edit of (folder, proxy.toml text) -> new text (it may write other
/// files), the file and the key the message must name, and a word of the problem.
fn cases() -> Vec<(&'static str, Edit, &'static str, &'static str, &'static str)> {
    fn signing(text: &str, line: &str) -> String {
        text.replace(
            "keyring = \"keys.toml\"",
            &format!("keyring = \"keys.toml\"\n{line}"),
        )
    }
    vec![
        (
            "extra header content-digest",
            |_, t| signing(t, "extra_headers = [\"content-digest\"]"),
            "proxy.toml",
            "signing.extra_headers[0]",
            "cannot be used here",
        ),
        (
            "extra header = user header",
            |_, t| signing(t, "extra_headers = [\"x-auth-user\"]"),
            "proxy.toml",
            "signing.extra_headers[0]",
            "already covered",
        ),
        (
            "user header content-digest",
            |_, t| signing(t, "user_header = \"content-digest\""),
            "proxy.toml",
            "signing.user_header",
            "cannot be used here",
        ),
        (
            "user header host",
            |_, t| signing(t, "user_header = \"host\""),
            "proxy.toml",
            "signing.user_header",
            "cannot be used here",
        ),
        (
            "roles header cookie",
            |_, t| signing(t, "roles_header = \"cookie\""),
            "proxy.toml",
            "signing.roles_header",
            "cannot be used here",
        ),
        (
            "extra header transfer-encoding",
            |_, t| signing(t, "extra_headers = [\"transfer-encoding\"]"),
            "proxy.toml",
            "signing.extra_headers[0]",
            "hop-by-hop",
        ),
        (
            "signing window below a second",
            |_, t| signing(t, "window = \"500ms\""),
            "proxy.toml",
            "signing.window",
            "whole number of seconds",
        ),
        (
            "absurd duration",
            |_, t| {
                t.replace(
                    "[server]\n",
                    "[server]\nheader_read_timeout = \"213503982334601d\"\n",
                )
            },
            "proxy.toml",
            "server.header_read_timeout",
            "maximum of 365d",
        ),
        (
            "negative size",
            |_, t| t.replace("[server]\n", "[server]\nmax_header_bytes = -1\n"),
            "proxy.toml",
            "server.max_header_bytes",
            "negative",
        ),
        (
            "integer too large",
            |_, t| {
                t.replace(
                    "[server]\n",
                    "[server]\nmax_connections = 99999999999999999999\n",
                )
            },
            "proxy.toml",
            "server.max_connections",
            "number too large",
        ),
        (
            "missing keyring",
            |_, t| t.replace("keyring = \"keys.toml\"", "keyring = \"nope.toml\""),
            "proxy.toml",
            "signing.keyring",
            "nope.toml",
        ),
        (
            "missing users file",
            |_, t| t.replace("users_file = \"users.toml\"", "users_file = \"nope.toml\""),
            "proxy.toml",
            "auth.users_file",
            "nope.toml",
        ),
        (
            "admin listener on the server's port, wildcard",
            |_, t| {
                t.replace("127.0.0.1:0", "127.0.0.1:18080")
                    + "\n[admin]\nlisten = \"0.0.0.0:18080\"\n"
            },
            "proxy.toml",
            "admin.listen",
            "overlaps server.listen",
        ),
        (
            "max_body_memory below a route's max_body",
            |_, t| {
                t.replace(
                    "public_origin = \"http://localhost:8080\"",
                    "public_origin = \"http://localhost:8080\"\nmax_body_memory = \"1MiB\"",
                ) + "max_body = \"2MiB\"\n"
            },
            "proxy.toml",
            "server.max_body_memory",
            "1048576 bytes is less than upstream[0].max_body (2097152 bytes)",
        ),
        (
            "max_body_memory below the login body",
            |_, t| {
                t.replace(
                    "public_origin = \"http://localhost:8080\"",
                    "public_origin = \"http://localhost:8080\"\nmax_body_memory = \"1KiB\"",
                ) + "max_body = \"512\"\n"
            },
            "proxy.toml",
            "server.max_body_memory",
            "less than auth.max_login_body (16384 bytes)",
        ),
        (
            "max_body_memory_per_client below a route's max_body",
            |_, t| {
                t.replace(
                    "public_origin = \"http://localhost:8080\"",
                    "public_origin = \"http://localhost:8080\"\n\
                     max_body_memory_per_client = \"1MiB\"",
                ) + "max_body = \"2MiB\"\n"
            },
            "proxy.toml",
            "server.max_body_memory_per_client",
            "1048576 bytes is less than upstream[0].max_body (2097152 bytes)",
        ),
        (
            "max_body_memory_per_client below the login body",
            |_, t| {
                t.replace(
                    "public_origin = \"http://localhost:8080\"",
                    "public_origin = \"http://localhost:8080\"\n\
                     max_body_memory_per_client = \"1KiB\"",
                ) + "max_body = \"512\"\n"
            },
            "proxy.toml",
            "server.max_body_memory_per_client",
            "less than auth.max_login_body (16384 bytes)",
        ),
        (
            "max_body_memory not a size",
            |_, t| {
                t.replace(
                    "public_origin = \"http://localhost:8080\"",
                    "public_origin = \"http://localhost:8080\"\nmax_body_memory = \"lots\"",
                )
            },
            "proxy.toml",
            "server.max_body_memory",
            "lots",
        ),
        (
            "costly argon2 hash",
            |dir, t| {
                write(&dir.join("users.toml"), &costly_users_file());
                t.to_owned()
            },
            "users.toml",
            "users[0].password",
            "max_hash_memory",
        ),
    ]
}

#[test]
fn check_config_refuses_with_file_key_and_exit_2() {
    for (what, edit, file, key, needle) in cases() {
        let dir = temp_dir("limits-check");
        let path = good_config(&dir);
        let text = std::fs::read_to_string(&path).unwrap();
        write(&path, &edit(&dir, &text));
        let path_text = path.to_str().unwrap();
        let out = countersign_within(
            &["check-config", "--config", path_text],
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        let file = dir.join(file);
        assert!(
            stderr.contains(&format!("{}: {key}: ", file.display())),
            "{what}: file and key not named: {stderr}"
        );
        assert!(stderr.contains(needle), "{what}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
    }
}

/// check-config applies the configured `auth.max_hash_*`, not only the defaults: a hash with
/// t=2 passes by default and is refused with `max_hash_iterations = 1`.
#[test]
fn check_config_applies_the_configured_argon2_limits() {
    let dir = temp_dir("limits-configured");
    let path = good_config(&dir);
    let hash = cheap_hash("pw").replace("m=8,t=1,p=1", "m=8,t=2,p=1");
    write(
        &dir.join("users.toml"),
        &format!("[[users]]\nname = \"bob\"\npassword = \"{hash}\"\n"),
    );
    let check = || {
        let out = countersign_within(
            &["check-config", "--config", path.to_str().unwrap()],
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    let (code, stderr) = check();
    assert_eq!(code, Some(0), "{stderr}");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "users_file = \"users.toml\"",
        "users_file = \"users.toml\"\nmax_hash_iterations = 1",
    );
    write(&path, &text);
    let (code, stderr) = check();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("users.toml: users[0].password: user \"bob\": argon2 iterations t=2"),
        "{stderr}"
    );
    assert!(stderr.contains("auth.max_hash_iterations (1)"), "{stderr}");
}

/// `run` checks the same before it serves: it exits 2 at once (a config it accepted would
/// keep it serving, and the costly hash would keep it hashing for 40 s).
#[test]
fn run_refuses_the_same_configs_with_exit_2() {
    for (what, edit, _file, key, needle) in cases() {
        let dir = temp_dir("limits-run");
        let path = good_config(&dir);
        let text = std::fs::read_to_string(&path).unwrap();
        write(&path, &edit(&dir, &text));
        let out = countersign_within(
            &["run", "--config", path.to_str().unwrap(), "--workers", "1"],
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        // `run` reads the users file with `UserDb::load` (src/proxy/server.rs), which names
        // the users file but not `auth.users_file`; `ProxyConfig::load_users` names both.
        if key != "auth.users_file" {
            assert!(stderr.contains(key), "{what}: key not named: {stderr}");
        }
        assert!(stderr.contains(needle), "{what}: {stderr}");
    }
}

/// The proxy's router, like `ProxyConfig::route` and as docs/CONFIG.md says: the prefix
/// `/api/` takes `/api` too (and with `strip_prefix` it reaches the upstream as `/`), but not
/// `/apix`.
#[tokio::test]
async fn a_route_prefix_takes_the_path_without_its_trailing_slash() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|settings, upstream| {
            let mut raw = route("raw", "/raw/", &upstream.url());
            raw.strip_prefix = true;
            settings.routes.push(raw);
        }),
        ..Default::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;

    let r = get(h.addr, "/api", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.last_verified().uri, "/api");

    let r = get(h.addr, "/raw", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.last_verified().uri, "/");
    let r = get(h.addr, "/raw/notes?x=1", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.upstream.last_verified().uri, "/notes?x=1");

    let seen = h.upstream.raw_count();
    for path in ["/apix", "/rawx", "/ap"] {
        let r = send(
            h.addr,
            Method::GET,
            path,
            &[("cookie", &login.cookie)],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text());
    }
    assert_eq!(
        h.upstream.raw_count(),
        seen,
        "no other path reached the upstream"
    );
}

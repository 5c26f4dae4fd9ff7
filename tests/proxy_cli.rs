//! The proxy subcommands through the real binary (`check-config`, `hash-password`, `dev`,
//! `demo-api`) and
//! `dev` mode in-process (demo API behind the real VerifyLayer).
//! Run: `cargo test --all-features --test proxy_cli`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::proxy::dev::{self, DevOptions};
use http::{Method, StatusCode};
use support::*;
use support_cli::{run_countersign, BIN};

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

fn good_config(dir: &Path) -> std::path::PathBuf {
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let path = dir.join("proxy.toml");
    write(
        &path,
        r#"
[server]
listen = "127.0.0.1:8080"
public_origin = "https://app.example.com"

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

#[test]
fn check_config_accepts_a_good_file() {
    let dir = temp_dir("cli-good");
    let path = good_config(&dir);
    let out = check_config(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

/// `println!` panics when stdout cannot be written: `check-config > report.txt` on a full disk
/// ended with exit 101 and a backtrace. Now it is exit 2 and a message naming the command and
/// the problem, as `hash-password` answers.
#[test]
fn check_config_reports_an_unwritable_stdout() {
    let dir = temp_dir("cli-full-stdout");
    let path = good_config(&dir);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("countersign check-config: cannot write to stdout: No space left"),
        "{stderr}"
    );
}

/// A users file with hashes cheaper than OWASP's least argon2id cost loads, and
/// `check-config` says how many (as `hash-password` says it of one it makes); a file hashed
/// at argon2's default (what `hash-password` makes) gets no word. Before, only
/// `hash-password` warned: a file hashed by another tool at a test's cost went unnoticed.
#[test]
fn check_config_warns_of_hashes_cheaper_than_owasps_least_cost() {
    let dir = temp_dir("cli-weak-argon2");
    let path = good_config(&dir);
    let phc = |m: u32, t: u32| {
        format!(
            "$argon2id$v=19$m={m},t={t},p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
        )
    };
    let users = |costs: &[(&str, u32, u32)]| -> String {
        (costs.iter())
            .map(|(name, m, t)| {
                format!(
                    "[[users]]\nname = \"{name}\"\npassword = \"{}\"\n",
                    phc(*m, *t)
                )
            })
            .collect()
    };
    // argon2's default (19 MiB, 2) and OWASP's 46 MiB with 1 pass: nothing to say.
    write(
        &dir.join("users.toml"),
        &users(&[("alice", 19456, 2), ("bob", 47104, 1)]),
    );
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    // 19 MiB with 1 pass and 64 KiB with 3: both below every OWASP setting.
    write(
        &dir.join("users.toml"),
        &users(&[("alice", 19456, 2), ("bob", 19456, 1), ("carol", 64, 3)]),
    );
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for part in [
        "warning: auth.users_file",
        "users.toml",
        "2 of 3 users' password hashes cost less than OWASP's least argon2id setting",
        "hash-password",
    ] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
}

/// A users file whose hashes mix argon2 parameter sets loads. Up to 8 sets, unknown names are
/// checked against them in the users' proportions, and nothing is said; beyond 8, the users of
/// the rarest sets are told from unknown names by a login's time, and `check-config` says so.
#[test]
fn check_config_warns_of_a_users_file_mixing_more_argon2_parameter_sets_than_it_covers() {
    let dir = temp_dir("cli-mixed-argon2");
    let path = good_config(&dir);
    let phc = |t: u32| {
        format!(
            "$argon2id$v=19$m=64,t={t},p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
        )
    };
    let users = |sets: &[(&str, u32)]| -> String {
        sets.iter()
            .map(|(name, t)| format!("[[users]]\nname = \"{name}\"\npassword = \"{}\"\n", phc(*t)))
            .collect()
    };
    write(
        &dir.join("users.toml"),
        &users(&[("old", 3), ("bob", 2), ("carol", 2)]),
    );
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("most common"),
        "two sets are covered: {stderr}"
    );

    let nine: Vec<(String, u32)> = (1..=9).map(|t| (format!("user{t}"), t)).collect();
    let mut sets: Vec<(&str, u32)> = nine.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    sets.push(("alice", 1));
    write(&dir.join("users.toml"), &users(&sets));
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for part in [
        "warning: auth.users_file",
        "users.toml",
        "1 of 10 users",
        "beyond the 8 most common of the file's 9 sets",
        "response time",
    ] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
}

#[test]
fn check_config_errors_name_file_and_key_and_exit_2() {
    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "bad duration",
            Box::new(|t: &str| t.replace("[auth]", "[session]\nidle_timeout = \"3x\"\n\n[auth]")),
            "proxy.toml",
            "session.idle_timeout",
        ),
        (
            "bad upstream url",
            Box::new(|t: &str| t.replace("http://127.0.0.1:3000", "ftp://x")),
            "proxy.toml",
            "url",
        ),
        (
            "bad origin",
            Box::new(|t: &str| t.replace("https://app.example.com", "not an origin")),
            "proxy.toml",
            "server.public_origin",
        ),
        (
            "missing keyring",
            Box::new(|t: &str| t.replace("keys.toml", "nope.toml")),
            "nope.toml",
            "",
        ),
        (
            "missing static dir",
            Box::new(|t: &str| {
                t.replace(
                    "listen = \"127.0.0.1:8080\"",
                    "listen = \"127.0.0.1:8080\"\nstatic_dir = \"no-such-dist\"",
                )
            }),
            "proxy.toml",
            "server.static_dir",
        ),
        (
            "tls cert without key",
            Box::new(|t: &str| {
                t.replace(
                    "listen = \"127.0.0.1:8080\"",
                    "listen = \"127.0.0.1:8080\"\ntls_cert = \"c.pem\"",
                )
            }),
            "proxy.toml",
            "tls",
        ),
        (
            "unreadable upstream ca_file",
            Box::new(|t: &str| {
                t.replace(
                    "url = \"http://127.0.0.1:3000\"",
                    "url = \"https://127.0.0.1:3000\"\nca_file = \"no-such-ca.pem\"",
                )
            }),
            "proxy.toml",
            "upstream[0].ca_file",
        ),
        (
            "ca_file on an http upstream",
            Box::new(|t: &str| {
                t.replace(
                    "url = \"http://127.0.0.1:3000\"",
                    "url = \"http://127.0.0.1:3000\"\nca_file = \"ca.pem\"",
                )
            }),
            "proxy.toml",
            "upstream[0].ca_file",
        ),
        (
            "login body limit too small",
            Box::new(|t: &str| {
                t.replace(
                    "users_file = \"users.toml\"",
                    "users_file = \"users.toml\"\nmax_login_body = 8",
                )
            }),
            "proxy.toml",
            "auth.max_login_body",
        ),
    ];
    for (what, edit, file, key) in cases {
        let dir = temp_dir("cli-bad");
        let path = good_config(&dir);
        let text = std::fs::read_to_string(&path).unwrap();
        write(&path, &edit(&text));
        let out = check_config(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(file), "{what}: file not named: {stderr}");
        assert!(stderr.contains(key), "{what}: key not named: {stderr}");
    }
    // A config file that does not exist.
    let out = check_config(Path::new("/nonexistent/proxy.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.toml"));
}

#[test]
fn hash_password_reads_stdin_and_prints_a_verifiable_phc_string() {
    let out = run_countersign(["hash-password"], b"s3cret pass\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    use argon2::PasswordVerifier as _;
    let parsed = argon2::PasswordHash::new(&hash).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret pass", &parsed)
        .is_ok());
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret pass\n", &parsed)
        .is_err());

    let out = run_countersign(["hash-password"], b"\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty password"));
}

#[test]
fn dev_on_a_busy_port_says_so_and_exits_2() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = countersign(&["dev", "--listen", &addr, "--password", "pw"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&addr) && stderr.contains("cannot listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn zero_or_malformed_duration_flags_are_usage_errors_naming_the_flag() {
    for (args, flag, problem) in [
        (
            &["dev", "--idle-timeout", "0s"][..],
            "--idle-timeout",
            "greater than zero",
        ),
        (
            &["dev", "--absolute-timeout", "off"][..],
            "--absolute-timeout",
            "\"off\" is not allowed",
        ),
        (
            &["dev", "--idle-timeout", "soon"][..],
            "--idle-timeout",
            "invalid duration",
        ),
        (
            &[
                "demo-api",
                "--listen",
                "127.0.0.1:0",
                "--keyring",
                "k.toml",
                "--window",
                "0s",
            ][..],
            "--window",
            "greater than zero",
        ),
    ] {
        let out = countersign(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(stderr.contains(problem), "{args:?}: {stderr}");
    }
}

#[test]
fn dev_binary_prints_url_credentials_and_a_curl_walkthrough() {
    use std::io::BufRead as _;
    // A port is only known to be free when it is chosen: if another process binds it before
    // `dev` does, `dev` exits saying so, and it is started again on another port.
    let mut attempts = 0;
    // The reader is kept (its pipe open) until the end, as `dev` may still write to it.
    let (mut child, _reader, listen, stdout) = loop {
        attempts += 1;
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(BIN)
            .args(["dev", "--listen", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read the banner up to its last line (the logout example), then stop the server.
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut stdout = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut exited = false;
        while !stdout.contains("/auth/logout") {
            assert!(Instant::now() < deadline, "banner incomplete: {stdout}");
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                exited = true;
                break;
            }
            stdout.push_str(&line);
        }
        if !exited {
            break (child, reader, listen, stdout);
        }
        let _ = child.wait();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(
            stderr.contains("Address already in use") && attempts < 3,
            "dev exited early: {stdout}{stderr}"
        );
    };
    assert!(
        std::net::TcpStream::connect(&listen).is_ok(),
        "listening once the banner is out"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stdout.contains(&format!("http://{listen}/")), "{stdout}");
    assert!(stdout.contains("user      demo"), "{stdout}");
    let password = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("password"))
        .map(str::trim)
        .expect("password line");
    assert!(password.len() >= 16, "random password is long: {password}");
    assert!(
        stdout.contains("curl -c jar.txt") && stdout.contains("X-CSRF-Token"),
        "{stdout}"
    );
}

/// A state-changing request as the dev page sends it (its own origin).
async fn post_dev(
    addr: std::net::SocketAddr,
    origin: &str,
    path: &str,
    login: &Login,
    body: &str,
) -> Reply {
    send(
        addr,
        Method::POST,
        path,
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", origin),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_end_to_end_through_the_real_verify_layer() {
    let server = dev::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        password: Some("demo-pass".into()),
        ..DevOptions::default()
    })
    .await
    .unwrap();
    let addr = server.proxy.local_addr();
    let origin = format!("http://127.0.0.1:{}", addr.port());

    // The page.
    let page = send(addr, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/auth/login") && page.text().contains("X-CSRF-Token"));

    // The demo API is not reachable without the proxy's signature.
    let direct = send(
        server.api_addr,
        Method::GET,
        "/api/whoami",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(direct.status, StatusCode::UNAUTHORIZED);
    assert_eq!(direct.error_code(), "missing_signature");

    // Login (both loopback spellings of the origin are accepted).
    let wrong = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", &origin)],
        r#"{"username":"demo","password":"nope"}"#,
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let localhost = format!("http://localhost:{}", addr.port());
    let r = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", &localhost)],
        r#"{"username":"demo","password":"demo-pass"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let login = Login {
        cookie: r.session_cookie().unwrap(),
        csrf: r.json()["csrf_token"].as_str().unwrap().to_owned(),
    };

    let who = get(addr, "/api/whoami", &login).await;
    assert_eq!(who.status, StatusCode::OK);
    assert_eq!(who.json()["user"], "demo");
    assert_eq!(who.json()["roles"], serde_json::json!(["user"]));

    let echo = post_dev(addr, &origin, "/api/echo", &login, r#"{"hello":1}"#).await;
    assert_eq!(echo.status, StatusCode::OK);
    assert_eq!(echo.json()["body"], r#"{"hello":1}"#);
    assert_eq!(echo.json()["identity"]["user"], "demo");

    let created = post_dev(addr, &origin, "/api/notes", &login, r#"{"text":"first"}"#).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let list = get(addr, "/api/notes", &login).await;
    assert_eq!(list.json()["notes"][0]["text"], "first");
    // Edited by its author (the demo API authorizes by the signed user), CSRF-checked.
    let edit_headers = [
        ("cookie", login.cookie.as_str()),
        ("x-csrf-token", login.csrf.as_str()),
        ("origin", origin.as_str()),
        ("content-type", "application/json"),
    ];
    let edited = send(
        addr,
        Method::PUT,
        &format!("/api/notes/{id}"),
        &edit_headers,
        r#"{"text":"edited"}"#,
    )
    .await;
    assert_eq!(edited.status, StatusCode::OK, "{}", edited.text());
    assert_eq!(
        get(addr, "/api/notes", &login).await.json()["notes"][0]["text"],
        "edited"
    );
    let forged = send(
        addr,
        Method::PUT,
        &format!("/api/notes/{id}"),
        &edit_headers[..1],
        r#"{"text":"forged"}"#,
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        get(addr, "/api/notes", &login).await.json()["notes"][0]["text"],
        "edited"
    );
    // The server-sent event stream reaches the page through the proxy, signed for the user.
    let events = send_streaming(
        addr,
        Method::GET,
        "/api/events",
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut events = events.into_body();
    let mut text = String::new();
    while !text.contains("event: tick") {
        use http_body_util::BodyExt as _;
        let frame = tokio::time::timeout(Duration::from_secs(5), events.frame())
            .await
            .expect("a tick within 5 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    assert!(text.contains(r#""user":"demo""#), "{text}");
    drop(events);
    // CSRF applies to the demo API like any upstream.
    let forged = send(
        addr,
        Method::DELETE,
        &format!("/api/notes/{id}"),
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let deleted = send(
        addr,
        Method::DELETE,
        &format!("/api/notes/{id}"),
        &[("cookie", &login.cookie), ("x-csrf-token", &login.csrf)],
        Bytes::new(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(addr, "/api/notes", &login).await.json()["notes"],
        serde_json::json!([])
    );
    let bad = post_dev(addr, &origin, "/api/notes", &login, r#"{"nope":1}"#).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let out = post_dev(addr, &origin, "/auth/logout", &login, "").await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(addr, "/api/whoami", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
    server.shutdown().await;
}

#[tokio::test]
async fn dev_serves_a_static_dir_when_given() {
    let dir = temp_dir("dev-static");
    write(&dir.join("index.html"), "my spa");
    let server = dev::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        password: Some("pw".into()),
        static_dir: Some(dir.to_path_buf()),
        ..DevOptions::default()
    })
    .await
    .unwrap();
    let r = send(
        server.proxy.local_addr(),
        Method::GET,
        "/some/route",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.text(), "my spa");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// demo-api: the demo API tier alone
// ---------------------------------------------------------------------------------------------

/// A `countersign demo-api` process, stopped (SIGTERM, then waited for) when dropped.
struct DemoApiProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl DemoApiProcess {
    /// Starts `demo-api` on a free port with `keyring` and waits for its "listening" line.
    fn start(keyring: &Path, extra: &[&str]) -> DemoApiProcess {
        use std::io::BufRead as _;
        let mut child = Command::new(BIN)
            .args(["demo-api", "--listen", "127.0.0.1:0", "--keyring"])
            .arg(keyring)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("demo API listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        DemoApiProcess { child, addr }
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for DemoApiProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Signs a raw HTTP/1.1 request with `countersign sign` (the keyring's active key).
fn sign_raw(keyring: &Path, user: &str, roles: &str, request: &str) -> Vec<u8> {
    let out = run_countersign(
        [
            OsStr::new("sign"),
            OsStr::new("--keyring"),
            keyring.as_os_str(),
            OsStr::new("--user"),
            OsStr::new(user),
            OsStr::new("--roles"),
            OsStr::new(roles),
        ],
        request.as_bytes(),
    );
    assert!(
        out.status.success(),
        "sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Status code and body of a raw HTTP/1.1 answer.
fn split_answer(answer: &str) -> (u16, serde_json::Value) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// `demo-api --user-header / --roles-header`: the names of a proxy configured with
/// `signing.user_header` / `roles_header`, so the demo API names the user that proxy signs
/// for (it answered `"user":null` to every such request before).
#[tokio::test]
async fn demo_api_reads_the_identity_fields_under_the_names_given() {
    let dir = temp_dir("demo-api-names");
    let keyring = dir.join("keys.toml");
    write(&keyring, &keyring_file_text("k1"));
    let names = ["--user-header", "x-user", "--roles-header", "x-roles"];
    let api = DemoApiProcess::start(&keyring, &names);
    let host = api.addr.to_string();
    let out = run_countersign(
        [
            OsStr::new("sign"),
            OsStr::new("--keyring"),
            keyring.as_os_str(),
            OsStr::new("--user"),
            OsStr::new("alice"),
            OsStr::new("--roles"),
            OsStr::new("ops"),
        ]
        .into_iter()
        .chain(names.iter().map(OsStr::new)),
        format!("GET /api/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = split_answer(&raw_exchange(api.addr, &out.stdout).await);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["roles"], serde_json::json!(["ops"]));
    assert!(api.stop().success());
}

#[tokio::test]
async fn demo_api_serves_signed_requests_and_refuses_unsigned_ones() {
    let dir = temp_dir("demo-api");
    let keyring = dir.join("keys.toml");
    write(&keyring, &keyring_file_text("k1"));
    let api = DemoApiProcess::start(&keyring, &["--window", "30s"]);
    let host = api.addr.to_string();

    // Signed by the CLI signer with a user and roles: 200 and the verified identity.
    let signed = sign_raw(
        &keyring,
        "alice",
        "admin,ops",
        &format!("GET /api/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    let (status, body) = split_answer(&raw_exchange(api.addr, &signed).await);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["roles"], serde_json::json!(["admin", "ops"]));
    assert_eq!(body["keyid"], "k1");

    // The notes CRUD is there too (a signed POST with a body and its digest).
    let note = "{\"text\":\"from the CLI\"}";
    let signed = sign_raw(
        &keyring,
        "alice",
        "admin",
        &format!(
            "POST /api/notes HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{note}",
            note.len()
        ),
    );
    let (status, body) = split_answer(&raw_exchange(api.addr, &signed).await);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["author"], "alice");
    assert_eq!(body["text"], "from the CLI");

    // Unsigned: refused by the VerifyLayer.
    let unsigned = format!("GET /api/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (status, body) = split_answer(&raw_exchange(api.addr, unsigned.as_bytes()).await);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "missing_signature");

    // Signed with a key the API does not hold: refused as well.
    let other = dir.join("other-keys.toml");
    write(
        &other,
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"\n",
    );
    let forged = sign_raw(
        &other,
        "mallory",
        "admin",
        &format!("GET /api/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    let (status, body) = split_answer(&raw_exchange(api.addr, &forged).await);
    assert_eq!(status, 401, "{body}");
    assert_ne!(body["user"], "mallory");

    let status = api.stop();
    assert!(
        status.success(),
        "SIGTERM stops demo-api cleanly: {status:?}"
    );
}

#[test]
fn demo_api_with_a_bad_keyring_names_the_file_and_exits_2() {
    let out = countersign(&[
        "demo-api",
        "--listen",
        "127.0.0.1:0",
        "--keyring",
        "/nonexistent/keys.toml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/keys.toml"));
}

#[test]
fn demo_api_on_a_busy_port_says_so_and_exits_2() {
    let dir = temp_dir("demo-api-busy");
    let keyring = dir.join("keys.toml");
    write(&keyring, &keyring_file_text("k1"));
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = countersign(&[
        "demo-api",
        "--listen",
        &addr,
        "--keyring",
        keyring.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains(&addr),
        "{stderr}"
    );
}

/// The "listening" line is a courtesy: with stdout unwritable (here `/dev/full`; a supervisor
/// that closed it is the same) `demo-api` serves all the same, where `println!` panicked right
/// after binding and the process ended with 101.
#[test]
fn demo_api_serves_with_an_unwritable_stdout() {
    let dir = temp_dir("demo-api-full-stdout");
    let keyring = dir.join("keys.toml");
    write(&keyring, &keyring_file_text("k1"));
    let port = free_port();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["demo-api", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--keyring")
        .arg(&keyring)
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "demo-api exited before listening"
        );
        assert!(Instant::now() < deadline, "demo-api never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The panic came right after the bind: give it the time it would take.
    std::thread::sleep(Duration::from_millis(500));
    let early_exit = child.try_wait().unwrap();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        early_exit.is_none(),
        "demo-api ended on its own: {early_exit:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        status.success(),
        "SIGTERM stops it cleanly: {status:?}: {stderr}"
    );
}

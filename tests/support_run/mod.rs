//! Running `countersign run` as a real process: a config directory, the child with its log
//! (stderr) collected while it runs, waiting for its port, its exit, signals. Include after
//! `mod support;` (its [`TestDir`]).
#![allow(dead_code)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{free_port, TestDir};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_countersign");

/// A `proxy.toml` for `listen` (and `admin` when given) with `users.toml` and `keys.toml`
/// next to it, one upstream at `upstream`.
pub fn config_text(listen: &str, admin: Option<&str>, upstream: &str) -> String {
    let admin = admin
        .map(|a| format!("[admin]\nlisten = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = "{listen}"
public_origin = "http://app.test"
shutdown_grace = "2s"

{admin}
[session]
store = "memory"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "{upstream}"
"#
    )
}

/// A running `countersign run`, killed (and reaped) on drop.
pub struct RunningProxy {
    pub child: Child,
    log: Arc<Mutex<String>>,
    /// Its config sets `server.reload_check_interval`: listening is not enough before a test
    /// changes a watched file (see [`Self::wait_listening`]).
    checks_files: bool,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Its config directory when it owns it ([`Self::keep_dir`]): removed once the child is
    /// killed and reaped (fields drop after `drop` has run).
    dir: Option<TestDir>,
}

impl RunningProxy {
    /// `countersign run --config <config> --log-format json` plus `extra` arguments.
    pub fn spawn(config: &Path, extra: &[&str]) -> RunningProxy {
        Self::spawn_logging(config, "json", extra)
    }

    /// [`RunningProxy::spawn`] with another `--log-format`.
    pub fn spawn_logging(config: &Path, log_format: &str, extra: &[&str]) -> RunningProxy {
        Self::spawn_with_env(config, log_format, extra, &[])
    }

    /// [`RunningProxy::spawn_logging`] with extra environment variables (e.g. `RUST_LOG`).
    pub fn spawn_with_env(
        config: &Path,
        log_format: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> RunningProxy {
        let checks_files = std::fs::read_to_string(config).is_ok_and(|text| {
            text.lines().any(|line| {
                let line = line.trim_start();
                line.starts_with("reload_check_interval") && !line.contains("\"off\"")
            })
        });
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--log-format", log_format])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        // Read while it runs, so a long log can never block the child on a full pipe.
        let reader = std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stderr);
            let mut line = String::new();
            while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        RunningProxy {
            child,
            log,
            checks_files,
            reader: Some(reader),
            dir: None,
        }
    }

    /// Keeps `dir` (its config, keyring...) for as long as the process: removed after the
    /// process is killed on drop.
    pub fn keep_dir(mut self, dir: TestDir) -> RunningProxy {
        self.dir = Some(dir);
        self
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle` (or panics after 30 s, showing the log).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The messages of its JSON log lines (`--log-format json`) at `level` that contain every
    /// one of `needles`.
    pub fn json_messages(&self, level: &str, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["level"] == level)
            .filter_map(|v| v["message"].as_str().map(str::to_owned))
            .filter(|m| needles.iter().all(|n| m.contains(n)))
            .collect()
    }

    /// Waits until [`Self::json_messages`] finds `count` lines (or panics after 30 s, showing
    /// the log); returns them.
    pub fn wait_json_messages(&self, level: &str, needles: &[&str], count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.json_messages(level, needles);
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "not {count} {level} lines with {needles:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (at most `limit`); None if it is still running then.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until it accepts connections on `addr`, and with `server.reload_check_interval`
    /// until the file check has read its first baseline (a file changed before that read is
    /// only noticed at its next change: docs/OPERATIONS.md, "Reloading without a signal");
    /// panics with its log if it exits first or either takes over 30 s.
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the proxy exited ({status}) instead of listening: {}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {addr}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.checks_files {
            self.wait_for_log("(server.reload_check_interval)");
        }
    }

    /// Sends a signal (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then the exit status (panics if it does not stop within 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(10))
            .expect("SIGTERM stops the proxy")
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free loopback addresses for a proxy to bind (tests/support_ports: one after
/// the other, so they differ).
pub fn two_free_addrs() -> (SocketAddr, SocketAddr) {
    let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
    (addr(free_port()), addr(free_port()))
}

/// Starts a proxy with `spawn(listen, admin)` on two free loopback addresses (a test without
/// an admin listener ignores the second) and waits until it logs that it listens. Returns it
/// with the two addresses. A port is only known to be free when it is chosen: if another
/// process binds it before the proxy does, the proxy exits with "Address already in use", and
/// this starts it again on other ports (three attempts in all).
pub fn start_on_free_ports(
    spawn: impl Fn(SocketAddr, SocketAddr) -> RunningProxy,
) -> (RunningProxy, SocketAddr, SocketAddr) {
    let mut last_log = String::new();
    for _ in 0..3 {
        let (listen, admin) = two_free_addrs();
        let mut proxy = spawn(listen, admin);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if proxy.log().contains("proxy listening") {
                return (proxy, listen, admin);
            }
            if let Some(status) = proxy.wait_exit(Duration::ZERO) {
                last_log = proxy.log();
                assert!(
                    last_log.contains("Address already in use"),
                    "the proxy exited ({status}) instead of listening: {last_log}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no \"proxy listening\" within 30 s: {}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the proxy found its ports taken three times: {last_log}");
}

/// Fills `dir` with `proxy.toml` (from [`config_text`]), `keys.toml` and `users.toml` (the
/// texts given); returns the `proxy.toml` path.
pub fn write_config(
    dir: &Path,
    listen: &str,
    admin: Option<&str>,
    upstream: &str,
    keys: &str,
    users: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("keys.toml"), keys).unwrap();
    std::fs::write(dir.join("users.toml"), users).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(&config, config_text(listen, admin, upstream)).unwrap();
    config
}

/// A proxy (memory sessions, [`keyring_file_text`](crate::support::keyring_file_text) and
/// [`users_file_text`](crate::support::users_file_text), one upstream `api` at `upstream`, no
/// admin listener) logging in `log_format`, started on a free port and listening; its config
/// directory (named after `tag`) lives as long as it.
pub fn start_logging(tag: &str, log_format: &str, upstream: &str) -> (RunningProxy, SocketAddr) {
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let dir = crate::support::temp_dir(tag);
        let config = write_config(
            &dir,
            &addr.to_string(),
            None,
            upstream,
            &crate::support::keyring_file_text("k1"),
            &crate::support::users_file_text(),
        );
        RunningProxy::spawn_logging(&config, log_format, &[]).keep_dir(dir)
    });
    proxy.wait_listening(addr);
    (proxy, addr)
}

//! Running the `countersign` binary the way a user does: arguments, bytes on stdin, and its
//! exit status and output back.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test (built by cargo for the integration tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_countersign");

/// Starts `countersign args...` with its stdin, stdout and stderr piped to the test.
pub fn spawn_countersign<I, S>(args: I) -> Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `countersign args...` with `stdin` as its standard input and waits for it.
pub fn run_countersign<I, S>(args: I, stdin: &[u8]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = spawn_countersign(args);
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    // Written from a thread so a child that exits early (or writes a lot) cannot deadlock the
    // test; a broken pipe here is expected when the child rejects the input before reading it.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `countersign check-config --config <path>` with stdin closed, waited for.
pub fn check_config(path: &Path) -> Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Polls `child` until it exits (its status) or `limit` has passed (None; it is still
/// running, and the caller decides what that means and kills it).
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one `countersign` run (`check-config`, mostly) printed and how it exited.
pub struct Checked {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Checked {
    fn from(output: Output) -> Checked {
        Checked {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Checked {
    /// The stdout line naming `key` as a word, panicking (with everything printed) if there
    /// is not exactly one.
    #[track_caller]
    pub fn line(&self, key: &str) -> &str {
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.split(' ').any(|word| word == key))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {key}: {self}");
        lines[0]
    }
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// One finished `countersign` run: exit code (-1 when killed by a signal) and output as text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// [`run_countersign`] as a [`Run`]; fails the test if the binary panicked.
pub fn run(args: &[&str], stdin: &[u8]) -> Run {
    let out = run_countersign(args, stdin);
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

/// `countersign demo-api` on a free loopback port with `keyring` and the replay-cache flags
/// `replay`, killed (and reaped) on drop.
pub struct DemoApi {
    child: Child,
    pub addr: SocketAddr,
}

impl DemoApi {
    /// Starts it and waits for its first line, which names its address.
    pub fn start<S: AsRef<OsStr>>(keyring: &Path, replay: &[S]) -> DemoApi {
        let mut child = Command::new(BIN)
            .args(["demo-api", "--listen", "127.0.0.1:0", "--keyring"])
            .arg(keyring)
            .args(replay)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("demo API listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        DemoApi { child, addr }
    }
}

impl Drop for DemoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw `request` bytes to `addr` on a new connection and reads the answer to its end
/// (the demo API closes after answering a `Connection: close` request): status and body.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// `GET /api/whoami` (what the demo API answers) signed now by `countersign sign` as user
/// alice with `keyring`, plus `extra` sign flags (`--nonce N`); the signed request's bytes.
pub fn signed_whoami(keyring: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        OsStr::new("sign"),
        OsStr::new("--keyring"),
        keyring.as_os_str(),
        OsStr::new("--user"),
        OsStr::new("alice"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = run_countersign(
        args,
        b"GET /api/whoami HTTP/1.1\r\nHost: api.internal\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

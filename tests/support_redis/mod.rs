//! A real `redis-server` for tests: started on a free loopback port in its own temporary
//! directory, stopped (killed) when dropped. Include with `#[path = "support_redis/mod.rs"] mod
//! support_redis;` (or `mod support_redis;` from a file in `tests/`).
//!
//! When `redis-server` is not installed the helper panics with a message saying how to install
//! it: a Redis test that silently skips would pass without testing anything.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

// Included by `support` and `support_redis` alike (a test file may use both, or only the
// second, which needs no proxy feature): two copies of the small guard type, never mixed.
#[allow(clippy::duplicate_mod)]
#[path = "../support_tmp/mod.rs"]
mod support_tmp;
use std::time::{Duration, Instant};
pub use support_tmp::TestDir;
#[allow(clippy::duplicate_mod)]
#[path = "../support_ports/mod.rs"]
mod support_ports;
use support_ports::free_port;
#[allow(unused_imports)] // not every test needs a refusing port
pub use support_ports::refusing_addr;

pub mod forwarder;

/// How long a starting server gets to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadlines short enough for tests that pause or cut off the server and measure how soon a
/// call gives up (the defaults are seconds): each operation 300 ms, a connect 500 ms, a health
/// PING 200 ms. Too short for the calls of such a test that must succeed (a loaded CI machine
/// may not run the process for a second or two): make those on a connection with
/// [`patient_options`], or retry them ([`wait_connected`]).
pub fn fast_options() -> countersign::replay::RedisOptions {
    countersign::replay::RedisOptions {
        op_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        ping_timeout: Duration::from_millis(200),
    }
}

/// Deadlines for calls that must succeed on a Redis that answers: 10 s each (a call, a
/// connect, a health PING), far above the time a loaded CI machine may leave the test process
/// or the server unscheduled (up to about 2 s), so no such stall fails a call. A test on these
/// that checks a refusal comes "at once" bounds it well under 10 s (a wait for a deadline takes
/// at least that).
pub fn patient_options() -> countersign::replay::RedisOptions {
    let patient = Duration::from_secs(10);
    countersign::replay::RedisOptions {
        op_timeout: patient,
        connect_timeout: patient,
        ping_timeout: patient,
    }
}

/// Polls `connection`'s health check until it passes (panics after `limit`): the connection
/// is then made and checked. For a connection with short deadlines ([`fast_options`]), whose
/// single check a stall of the machine may fail, before the test pauses or cuts off Redis.
pub async fn wait_connected(connection: &countersign::replay::RedisConnection, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !connection.ping().await {
        assert!(
            Instant::now() < deadline,
            "redis not ready within {limit:?}: {:?}",
            connection.readiness().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `redis-server` of an older Redis built by `scripts/old-redis.sh` (`version`: "5.0.6",
/// "6.2.14"), in `$COUNTERSIGN_OLD_REDIS_DIR` (default `target/old-redis` in the checkout).
/// Fails the test, naming the script, when it is not there: scripts/test.sh runs the script
/// first.
pub fn old_redis_server(version: &str) -> PathBuf {
    let dir = std::env::var_os("COUNTERSIGN_OLD_REDIS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/old-redis"));
    let program = dir.join(version).join("redis-server");
    assert!(
        program.is_file(),
        "{} is missing: build Redis {version} with `scripts/old-redis.sh` (scripts/test.sh \
         does), or point COUNTERSIGN_OLD_REDIS_DIR at its output",
        program.display()
    );
    program
}

/// A running (or stopped) `redis-server` owned by one test.
pub struct RedisServer {
    port: u16,
    /// Its working directory, removed once the server is killed (fields drop after `drop`).
    dir: TestDir,
    extra_args: Vec<String>,
    /// The server binary: `redis-server` from the PATH, or another build
    /// ([`RedisServer::start_program`]).
    program: PathBuf,
    child: Option<Child>,
    /// More directories it uses (TLS material), shared with the [`TlsFiles`] handed out.
    cleanup: Vec<Arc<TestDir>>,
}

impl RedisServer {
    /// A new server whose only user is docs/DEPLOYMENT.md's least-privilege `ACL SETUSER
    /// countersign` line (read from the guide, its password replaced; `default` turned off):
    /// the server and a URL that logs in as that user.
    pub fn start_with_documented_acl() -> (RedisServer, String) {
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/DEPLOYMENT.md"))
                .unwrap();
        let acl_line = guide
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("ACL SETUSER countersign"))
            .expect("the guide has an ACL line");
        let server = RedisServer::start();
        let mut args: Vec<&str> = acl_line.split_whitespace().collect();
        let password_arg = args
            .iter()
            .position(|a| a.starts_with('>'))
            .expect("a password in the ACL line");
        args[password_arg] = ">acl-test-pw";
        assert_eq!(server.cli(&args), "OK");
        server.cli(&["ACL", "SETUSER", "default", "off"]);
        let url = format!(
            "redis://countersign:acl-test-pw@127.0.0.1:{}/0",
            server.addr().port()
        );
        (server, url)
    }

    /// Starts a server on a free loopback port, no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`] with extra `redis-server` arguments (e.g.
    /// `["--requirepass", "pw"]`).
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        Self::start_program(Path::new("redis-server"), extra_args)
    }

    /// Like [`RedisServer::start_with`] with another `redis-server` binary (an older Redis
    /// built by scripts/old-redis.sh).
    pub fn start_program(program: &Path, extra_args: &[&str]) -> RedisServer {
        let dir = TestDir::new("redis");
        // The free port is found by binding port 0 and releasing it; another process could take
        // it in between, so a failed start is retried on a new port.
        let mut server = RedisServer {
            port: free_port(),
            dir,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            program: program.to_owned(),
            child: None,
            cleanup: Vec::new(),
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.kill();
                    server.port = free_port();
                    // A `--tls-port` found the same way may be what was taken (another node's
                    // cluster bus, port + 10000, among others): it moves too ([`Self::tls_port`]).
                    if let Some(i) = server.extra_args.iter().position(|a| a == "--tls-port") {
                        if let Some(value) = server.extra_args.get_mut(i + 1) {
                            *value = free_port().to_string();
                        }
                    }
                }
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// The `--tls-port` this server listens on, if it was given one (a failed start may have
    /// moved it: [`Self::start_program`]).
    pub fn tls_port(&self) -> Option<u16> {
        let i = self.extra_args.iter().position(|a| a == "--tls-port")?;
        self.extra_args.get(i + 1)?.parse().ok()
    }

    /// Starts a server that also listens with TLS, with a certificate for `127.0.0.1` issued
    /// by a fresh test CA. Returns the server, the TLS port and the CA certificate (PEM). The
    /// plain port stays open for readiness checks and `cli`.
    pub fn start_tls() -> (RedisServer, u16, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("leaf params")
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        let dir = TestDir::new("redis-tls");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, leaf.pem()).expect("write cert");
        std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");
        let tls_port = free_port();
        let mut server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert.display().to_string(),
            "--tls-key-file",
            &key.display().to_string(),
            "--tls-auth-clients",
            "no",
        ]);
        server.cleanup.push(Arc::new(dir));
        let tls_port = server.tls_port().unwrap_or(tls_port);
        (server, tls_port, ca.pem())
    }

    /// Starts a server that also listens with TLS, with a certificate for `names` (IP
    /// addresses or DNS names) issued by a fresh test CA, and returns the files (a sentinel
    /// monitoring the TLS port needs them: `tls-replication yes` with the CA to verify the
    /// server, and a certificate of its own). The plain port stays open for readiness checks
    /// and `cli`.
    pub fn start_tls_files(names: &[&str]) -> (RedisServer, u16, TlsFiles) {
        let files = TlsFiles::issue(names);
        let tls_port = free_port();
        let mut server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &files.cert_file.display().to_string(),
            "--tls-key-file",
            &files.key_file.display().to_string(),
            "--tls-auth-clients",
            "no",
        ]);
        server.cleanup.push(files.dir.clone());
        let tls_port = server.tls_port().unwrap_or(tls_port);
        (server, tls_port, files)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL: as abrupt as a crash). Clients see connection errors.
    pub fn stop(&mut self) {
        self.kill();
        // Wait until the port no longer answers, so the caller observes "down".
        let deadline = Instant::now() + START_TIMEOUT;
        while ping(self.addr()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port (data is gone: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger for a moment; retry until the deadline.
                Err(e) if Instant::now() >= deadline => panic!("could not restart redis: {e}"),
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, like a
    /// hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Runs one command through `redis-cli` and returns its output (for assertions on keys).
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("run redis-cli (apt-get install -y redis-server)");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new(&self.program)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("yes")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "{} is required for the Redis tests and could not be run ({e}); install it \
                     with `apt-get install -y redis-server` (an older Redis: \
                     `scripts/old-redis.sh`)",
                    self.program.display()
                )
            });
        let child = match child {
            Ok(child) => child,
            Err(e) => panic!("{e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server exited early: {status}"));
                }
            }
            if ping(self.addr()) {
                return self.answered_by_own_child();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("redis-server did not answer PING in time".to_owned())
    }

    /// Whether the server that answers on the port is this one's child: another test (or test
    /// binary) may have picked the same free port a moment before, its server answering PING
    /// while this one's fails to bind; two tests would then share a server. (An answer without
    /// a process id, e.g. NOAUTH, is taken as this one's, as before.)
    fn answered_by_own_child(&self) -> Result<(), String> {
        let own = self.child.as_ref().map(Child::id);
        let auth: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let info = self.cli(&[cli_auth(&auth).as_slice(), &["INFO", "server"]].concat());
        served_by(own, self.port, &info)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a paused (SIGSTOPped) server.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The TLS material of [`RedisServer::start_tls_files`] (kept while the server runs) or of
/// [`TlsFiles::issue`].
pub struct TlsFiles {
    /// The test CA's certificate (PEM), which issued the server's.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The directory holding the files: removed when the last holder (this, or a server or
    /// sentinel using the files) is dropped.
    pub dir: Arc<TestDir>,
}

impl TlsFiles {
    /// A fresh test CA and a certificate it issued for `names` (IP addresses or DNS names),
    /// written to a new temporary directory (`dir`), removed when the last holder of it is
    /// dropped: these files, or a [`SentinelServer::start_tls_only`] given them.
    pub fn issue(names: &[&str]) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (redis-cli, redis-server) takes a certificate whose issuer
        // is its own subject for a self-signed one (rcgen gives both the same default name),
        // and a certificate from another test CA must show as issued by an unknown CA.
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("countersign test CA {}-{n}", std::process::id()),
        );
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut leaf_params = CertificateParams::new(names).expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "countersign test server");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        let dir = TestDir::new("redis-tlsfiles");
        let files = TlsFiles {
            ca_pem: ca.pem(),
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            dir: Arc::new(dir),
        };
        std::fs::write(&files.ca_file, &files.ca_pem).expect("write ca");
        std::fs::write(&files.cert_file, leaf.pem()).expect("write cert");
        std::fs::write(&files.key_file, leaf_key.serialize_pem()).expect("write key");
        files
    }

    /// `sentinel.conf` lines for a sentinel that monitors the server's TLS port: TLS to the
    /// servers it monitors, verified with the test CA; its own certificate is the server's.
    pub fn sentinel_lines(&self) -> Vec<String> {
        vec![
            "tls-replication yes".to_owned(),
            format!("tls-cert-file {}", self.cert_file.display()),
            format!("tls-key-file {}", self.key_file.display()),
            format!("tls-ca-cert-file {}", self.ca_file.display()),
        ]
    }
}

/// Whether `info` (an `INFO server` reply from `port`) comes from the process `own`: an error
/// naming the other server when its `process_id` differs (an answer without one, e.g.
/// NOAUTH, is taken as `own`'s).
fn served_by(own: Option<u32>, port: u16, info: &str) -> Result<(), String> {
    match process_id(info) {
        Some(pid) if Some(pid) != own => Err(format!(
            "port {port} is served by another redis-server (pid {pid})"
        )),
        _ => Ok(()),
    }
}

/// The `process_id` of an `INFO server` reply.
fn process_id(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()
}

/// True if a server at `addr` answers `PING` (with `+PONG`, or with `-NOAUTH` when it
/// requires a password: either way it is up).
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && (&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
}

/// A Redis Sentinel (`redis-server <conf> --sentinel`) monitoring one primary as `mymaster`
/// (quorum 1, down after 1 s, failover timeout 5 s), on a free loopback port, its config file
/// (which the sentinel rewrites) in its own temporary directory; killed when dropped.
pub struct SentinelServer {
    port: u16,
    /// Its config directory, removed once the sentinel is killed (fields drop after `drop`).
    dir: TestDir,
    child: Option<Child>,
    /// The sentinel's own password (`requirepass`), for `cli`.
    password: Option<String>,
    /// A TLS-only sentinel ([`SentinelServer::start_tls_only`]): the CA of its certificate
    /// (`cli` uses TLS with it), and the directory of its own TLS files (kept while it runs).
    tls: Option<(PathBuf, Option<Arc<TestDir>>)>,
}

/// The master name every [`SentinelServer`] monitors.
pub const SENTINEL_MASTER: &str = "mymaster";

impl SentinelServer {
    /// A sentinel monitoring the primary at `primary` (no passwords).
    pub fn start(primary: SocketAddr) -> SentinelServer {
        Self::start_with(primary, &[], None)
    }

    /// Like [`SentinelServer::start`] with extra config lines (e.g. `sentinel auth-pass
    /// mymaster pw` for a primary with a password) and the sentinel's own password.
    pub fn start_with(
        primary: SocketAddr,
        extra_lines: &[&str],
        password: Option<&str>,
    ) -> SentinelServer {
        Self::start_conf(primary, extra_lines, password, None)
    }

    /// A sentinel that listens with TLS only (`port 0`, `tls-port`) and monitors the TLS port
    /// at `primary`, whose certificate `primary_files`' CA issued (`tls-replication yes`). It
    /// presents `own`'s certificate (for 127.0.0.1, from another CA; `own.dir` is removed on
    /// drop), or with `None` the primary's; `cli` trusts the CA of the one it presents.
    pub fn start_tls_only(
        primary: SocketAddr,
        primary_files: &TlsFiles,
        own: Option<TlsFiles>,
        password: Option<&str>,
    ) -> SentinelServer {
        let (cert, key, ca, cleanup) = match &own {
            Some(own) => (&own.cert_file, &own.key_file, &own.ca_file, Some(&own.dir)),
            None => (
                &primary_files.cert_file,
                &primary_files.key_file,
                &primary_files.ca_file,
                None,
            ),
        };
        let lines = [
            "tls-replication yes".to_owned(),
            "tls-auth-clients no".to_owned(),
            format!("tls-cert-file {}", cert.display()),
            format!("tls-key-file {}", key.display()),
            format!("tls-ca-cert-file {}", primary_files.ca_file.display()),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        Self::start_conf(
            primary,
            &lines,
            password,
            Some((ca.clone(), cleanup.cloned())),
        )
    }

    fn start_conf(
        primary: SocketAddr,
        extra_lines: &[&str],
        password: Option<&str>,
        tls: Option<(PathBuf, Option<Arc<TestDir>>)>,
    ) -> SentinelServer {
        let dir = TestDir::new("sentinel");
        let mut server = SentinelServer {
            port: 0,
            dir,
            child: None,
            password: password.map(str::to_owned),
            tls,
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            let listen = if server.tls.is_some() {
                format!("port 0\ntls-port {}", server.port)
            } else {
                format!("port {}", server.port)
            };
            let mut conf = format!(
                "{listen}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} {} {} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                server.dir.display(),
                primary.ip(),
                primary.port(),
            );
            for line in extra_lines {
                conf.push_str(line);
                conf.push('\n');
            }
            if let Some(password) = password {
                conf.push_str(&format!("requirepass {password}\n"));
            }
            let file = server.dir.join("sentinel.conf");
            std::fs::write(&file, conf).expect("write sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "redis-server (with --sentinel) is required for the Sentinel tests and \
                         could not be run ({e}); install it with `apt-get install -y redis-server`"
                    )
                });
            server.child = Some(child);
            let deadline = Instant::now() + START_TIMEOUT;
            let started = loop {
                if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                    break Err(format!("redis-server --sentinel exited early: {status}"));
                }
                if server.answers() {
                    // Another test's server may answer on the port (see
                    // `RedisServer::answered_by_own_child`).
                    let own = server.child.as_ref().map(Child::id);
                    break served_by(own, server.port, &server.cli(&["INFO", "server"]));
                }
                if Instant::now() >= deadline {
                    break Err("the sentinel did not answer PING in time".to_owned());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            match started {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.kill();
                }
            }
        }
        panic!("could not start a sentinel: {last_error}");
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the sentinel answers `PING` (over TLS for a TLS-only one).
    fn answers(&self) -> bool {
        match &self.tls {
            None => ping(self.addr()),
            Some(_) => {
                let reply = self.cli(&["PING"]);
                reply == "PONG" || reply.starts_with("NOAUTH")
            }
        }
    }

    /// Runs one command through `redis-cli` on the sentinel and returns its output (over TLS,
    /// trusting the sentinel's CA, for a TLS-only sentinel).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string());
        if let Some((ca_file, _)) = &self.tls {
            command.arg("--tls").arg("--cacert").arg(ca_file);
        }
        if let Some(password) = &self.password {
            command.arg("-a").arg(password).arg("--no-auth-warning");
        }
        let output = command
            .args(args)
            .output()
            .expect("run redis-cli (apt-get install -y redis-server)");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The port of the primary this sentinel names now (`SENTINEL get-master-addr-by-name`).
    pub fn primary_port(&self) -> Option<u16> {
        let reply = self.cli(&["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER]);
        reply.lines().nth(1)?.trim().parse().ok()
    }

    /// Kills the sentinel (SIGKILL) and waits until its port no longer answers.
    pub fn stop(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        while self.answers() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A keyring of one key, `k1` (32 bytes of 7), for the proxy configs tests write.
pub const TEST_KEYRING: &str = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\"\n";
/// A users file of one user, `alice` (a hash no password matches: these configs are loaded,
/// not logged into).
pub const TEST_USERS: &str = "[[users]]\nname = \"alice\"\npassword = \"$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNo\"\nroles = []\n";

/// A new temporary directory named after `dir_name` with [`TEST_KEYRING`], [`TEST_USERS`] and
/// a `proxy.toml`: listening on `listen`, with `tables` (extra top-level tables such as
/// `[admin]`) before a Redis `[session]` of `session` keys, and one `/api/` upstream whose
/// table ends with `upstream_keys`. Returns the directory's guard and the config's path.
pub fn redis_proxy_config(
    dir_name: &str,
    listen: &str,
    tables: &str,
    session: &str,
    upstream_keys: &str,
) -> (TestDir, PathBuf) {
    let dir = TestDir::new(dir_name);
    std::fs::write(dir.join("keys.toml"), TEST_KEYRING).unwrap();
    std::fs::write(dir.join("users.toml"), TEST_USERS).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{listen}\"\npublic_origin = \"http://app.test\"\n\n\
             {tables}\n[session]\nstore = \"redis\"\n{session}\n\n\
             [auth]\nusers_file = \"users.toml\"\n\n[signing]\nkeyring = \"keys.toml\"\n\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n\
             {upstream_keys}\n"
        ),
    )
    .unwrap();
    (dir, path)
}

/// Polls `check` every 20 ms until it holds, for at most `limit`; panics naming `what`.
pub fn wait_until(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A primary and its replica, in sync; `auth` are extra arguments of both servers (e.g.
/// `["--requirepass", "pw", "--masterauth", "pw"]`). No wait before a full sync (Redis 7 waits
/// 5 s by default for more replicas to join).
pub fn primary_and_replica(auth: &[&str]) -> (RedisServer, RedisServer) {
    let mut args = vec!["--repl-diskless-sync-delay", "0"];
    args.extend_from_slice(auth);
    let primary = RedisServer::start_with(&args);
    let replica = RedisServer::start_with(&args);
    let port = primary.addr().port().to_string();
    let cli_auth = cli_auth(auth);
    replica.cli(&[cli_auth.as_slice(), &["REPLICAOF", "127.0.0.1", &port]].concat());
    let info = [cli_auth.as_slice(), &["INFO", "replication"]].concat();
    wait_until(
        "the replica to sync",
        std::time::Duration::from_secs(10),
        || replica.cli(&info).contains("master_link_status:up"),
    );
    (primary, replica)
}

/// `redis-cli` arguments for the `--requirepass` among a server's `auth` arguments.
pub fn cli_auth<'a>(auth: &[&'a str]) -> Vec<&'a str> {
    match auth.iter().position(|a| *a == "--requirepass") {
        Some(i) => vec!["-a", auth[i + 1], "--no-auth-warning"],
        None => Vec::new(),
    }
}

/// Connection options for a test's Redis client: a call times out after 1 s, a ping after
/// 500 ms, connecting after `connect_timeout`.
pub fn redis_test_options(connect_timeout: Duration) -> countersign::replay::RedisOptions {
    countersign::replay::RedisOptions {
        op_timeout: Duration::from_secs(1),
        connect_timeout,
        ping_timeout: Duration::from_millis(500),
    }
}

/// `cache` records `nonce` (fresh) and then refuses it as a replay.
pub async fn assert_fresh_then_replayed(
    cache: &impl countersign::replay::ReplayCache,
    nonce: &str,
    expires_at: u64,
    now: u64,
) {
    use countersign::replay::ReplayOutcome;
    assert_eq!(
        cache.check_and_record(nonce, expires_at, now).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        cache.check_and_record(nonce, expires_at, now).await,
        Ok(ReplayOutcome::Replayed)
    );
}

/// A Redis Cluster on real processes: `primaries` [`RedisServer`]s started with
/// `--cluster-enabled yes` (each its own `nodes.conf` in its own directory), joined with
/// `redis-cli --cluster create ... --cluster-replicas 0` (the slots split evenly) and ready
/// (`cluster_state:ok` on every node). Stopped with the servers when dropped.
///
/// Needs `redis-cli` (Debian: in `redis-tools`, which `redis-server` depends on): panics when
/// it is missing, so a cluster test never passes without a cluster.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// A cluster of `primaries` nodes, each `maxmemory-policy noeviction`.
    pub fn start(primaries: usize) -> RedisCluster {
        Self::start_with(primaries, &[])
    }

    /// Like [`RedisCluster::start`] with extra `redis-server` arguments for every node.
    pub fn start_with(primaries: usize, extra_args: &[&str]) -> RedisCluster {
        Self::start_program(Path::new("redis-server"), primaries, extra_args)
    }

    /// Like [`RedisCluster::start_with`] with another `redis-server` binary for every node (an
    /// older Redis built by scripts/old-redis.sh).
    pub fn start_program(program: &Path, primaries: usize, extra_args: &[&str]) -> RedisCluster {
        let args = Self::node_args(extra_args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nodes: Vec<RedisServer> = (0..primaries)
            .map(|_| RedisServer::start_program(program, &args))
            .collect();
        Self::join(nodes, 0)
    }

    /// A cluster whose nodes also listen with TLS (`tls-cluster yes`: the bus too), each with
    /// a certificate for `127.0.0.1` issued by one fresh test CA. Returns the cluster, each
    /// node's TLS port, and the TLS files (removed with the cluster). The cluster is joined
    /// through the plain ports, which stay open for `cli`.
    pub fn start_tls(primaries: usize) -> (RedisCluster, Vec<u16>, TlsFiles) {
        let files = TlsFiles::issue(&["127.0.0.1"]);
        let nodes: Vec<RedisServer> = (0..primaries)
            .map(|_| {
                let tls_port = free_port();
                let tls = [
                    "--tls-port".to_owned(),
                    tls_port.to_string(),
                    "--tls-cert-file".to_owned(),
                    files.cert_file.display().to_string(),
                    "--tls-key-file".to_owned(),
                    files.key_file.display().to_string(),
                    "--tls-ca-cert-file".to_owned(),
                    files.ca_file.display().to_string(),
                    "--tls-auth-clients".to_owned(),
                    "no".to_owned(),
                    "--tls-cluster".to_owned(),
                    "yes".to_owned(),
                ];
                let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
                let args = Self::node_args(&tls);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                RedisServer::start_with(&args)
            })
            .collect();
        // Each node's own: a failed start moves it (`RedisServer::start_program`).
        let tls_ports: Vec<u16> = nodes.iter().filter_map(RedisServer::tls_port).collect();
        let mut cluster = Self::join(nodes, 0);
        cluster.nodes[0].cleanup.push(files.dir.clone());
        (cluster, tls_ports, files)
    }

    fn node_args(extra_args: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--maxmemory-policy",
            "noeviction",
        ];
        args.extend_from_slice(extra_args);
        args.into_iter().map(str::to_owned).collect()
    }

    /// A cluster of `primaries` primaries with one replica each (`redis-cli --cluster create
    /// --cluster-replicas 1`: the first `primaries` nodes are the primaries), every replica in
    /// sync before it returns.
    pub fn start_with_replicas(primaries: usize) -> RedisCluster {
        let args = Self::node_args(&["--repl-diskless-sync-delay", "0"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nodes: Vec<RedisServer> = (0..primaries * 2)
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let cluster = Self::join(nodes, 1);
        wait_until("every replica in sync", Duration::from_secs(30), || {
            cluster.nodes.iter().all(|node| {
                let info = node.cli(&["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            })
        });
        cluster
    }

    /// The index of a node that replicates node `primary`.
    pub fn replica_of(&self, primary: usize) -> Option<usize> {
        let id = self.nodes[primary].cli(&["CLUSTER", "MYID"]);
        self.nodes.iter().position(|node| {
            node.cli(&["CLUSTER", "NODES"]).lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(2).is_some_and(|flags| flags.contains("myself"))
                    && fields.get(3) == Some(&id.as_str())
            })
        })
    }

    /// `redis-cli --cluster create` over `nodes`, then waits for `cluster_state:ok`.
    fn join(nodes: Vec<RedisServer>, replicas: usize) -> RedisCluster {
        require_redis_cli();
        let cluster = RedisCluster { nodes };
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.node_addrs())
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok("after the create");
        cluster
    }

    /// Waits (up to 30 s) until every node says `cluster_state:ok`; `when` is for the panic
    /// message.
    pub fn wait_ok(&self, when: &str) {
        wait_until(
            &format!("cluster_state:ok on every node {when}"),
            Duration::from_secs(30),
            || {
                self.nodes
                    .iter()
                    .all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            },
        );
    }

    /// `127.0.0.1:PORT` of each node.
    pub fn node_addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect()
    }

    /// `redis://127.0.0.1:PORT` of each node.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// How many keys matching `pattern` each node holds (asked node by node, not through the
    /// cluster).
    pub fn keys_per_node(&self, pattern: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|node| {
                node.cli(&["KEYS", pattern])
                    .lines()
                    .filter(|line| !line.trim().is_empty())
                    .count()
            })
            .collect()
    }

    /// The node (index) that serves `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        self.nodes
            .iter()
            .position(|node| node_serves(node, slot))
            .expect("a node serves the slot")
    }
}

/// Whether `node` lists itself (`myself`) as the primary of `slot` in `CLUSTER NODES`.
fn node_serves(node: &RedisServer, slot: u16) -> bool {
    node.cli(&["CLUSTER", "NODES"]).lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(2).is_some_and(|flags| flags.contains("myself"))
            && fields.iter().skip(8).any(|range| {
                let mut bounds = range.splitn(2, '-');
                let start = bounds.next().and_then(|s| s.parse::<u16>().ok());
                let end = bounds.next().and_then(|s| s.parse::<u16>().ok()).or(start);
                matches!((start, end), (Some(start), Some(end)) if (start..=end).contains(&slot))
            })
    })
}

/// Panics, saying how to install it, when `redis-cli` cannot be run.
pub fn require_redis_cli() {
    let ran = Command::new("redis-cli")
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    match ran {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "redis-cli --version failed ({}): the Redis Cluster tests need redis-cli",
            output.status
        ),
        Err(e) => panic!(
            "redis-cli is required for the Redis Cluster tests and could not be run ({e}); \
             install it with `apt-get install -y redis-tools` (or redis-server, which depends \
             on it)"
        ),
    }
}

//! `run`, `check-config`, `dev`, `demo-api`, `hash-password`.
//!
//! Exit codes: 0 success; 1 `check-config --online`: the config is valid but a required
//! server it names cannot be used now (one line per check on stdout); 2 a config, usage or
//! startup error (one message on stderr naming the file, key and problem, or the address that
//! could not be bound).

use std::io::{self, IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use countersign::proxy::admin::probe_address;
use countersign::proxy::config::{
    parse_size, parse_whole_seconds, ProxyConfig, StoreKind, DEFAULT_LOG_QUEUE_LINES,
};
use countersign::proxy::dev::{self, DevOptions, DEMO_USER};
use countersign::proxy::error::error_chain;
use countersign::proxy::forward::{upstream_connector, UpstreamConnect};
use countersign::proxy::server::{load_tls, ProxyDeps, ProxyServer, ProxySettings, Signals};
use countersign::proxy::session_redis::check_redis;
use countersign::proxy::session_snapshot;
use countersign::proxy::users;
use http::uri::{Scheme, Uri};
use zeroize::Zeroizing;

use super::password::{self, Typed};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The proxy config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Log format (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Event loops (one single-threaded runtime per core, SO_REUSEPORT); default: the number
    /// of CPUs available.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
}

/// `check-config` arguments.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The proxy config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// After the offline checks, connect to what the config names, with its timeouts: the
    /// Redis store (credentials, Sentinel, maxmemory-policy noeviction, primary), each
    /// upstream (TCP, TLS for https, presenting the client certificate; after a TLS 1.3
    /// handshake a short read catches a refused one) and verify_url, sending no request. One
    /// line per check; exit 1 when a required one fails (an upstream with required_for_ready =
    /// false only warns).
    #[arg(long)]
    pub online: bool,
}

/// `dev` arguments. `Debug` never shows the password.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Where the proxy listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin listener (/healthz, /readyz, /metrics); none by default.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Password of the `demo` user (random when absent). On the command line it is visible
    /// to every local user (`ps`, /proc/PID/cmdline); in the environment variable it is not.
    // Taken as bytes, checked in `dev`: clap's own refusal of bytes that are not UTF-8 named
    // neither the option nor the variable.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "COUNTERSIGN_DEV_PASSWORD",
        hide_env_values = true,
        value_parser = clap::builder::OsStringValueParser::new()
    )]
    pub password: Option<std::ffi::OsString>,
    /// Serve this SPA build instead of the built-in page.
    #[arg(long, value_name = "DIR")]
    pub static_dir: Option<PathBuf>,
    /// A session unused this long ends (e.g. "2s", "30m").
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_whole_seconds)]
    pub idle_timeout: Duration,
    /// A session ends this long after login, used or not.
    #[arg(long, value_name = "DURATION", default_value = "12h", value_parser = parse_whole_seconds)]
    pub absolute_timeout: Duration,
    /// Log format (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `demo-api` arguments. `Debug` never shows the `--replay-redis` URL (it may hold a
/// password).
#[derive(clap::Args)]
pub struct DemoApiArgs {
    /// Where the demo API listens.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Keyring file (the proxy's `signing.keyring`); SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    pub keyring: PathBuf,
    /// Signature lifetime accepted (the proxy's `signing.window`): a duration ("10s") or
    /// seconds ("10"), at least 1 second.
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = |text: &str| super::parse_positive_seconds_arg(text).map(Duration::from_secs))]
    pub window: Duration,
    /// The identity fields' names (the proxy's `signing.user_header` / `roles_header`).
    #[command(flatten)]
    pub identity_headers: super::signing::IdentityHeaderArgs,
    /// Record nonces in this shared Redis (`redis://` or `rediss://`), so that several API
    /// instances reject a request replayed from one to another. Default: in memory. With
    /// --replay-redis-cluster-node or --replay-redis-sentinel: the credentials and TLS (and,
    /// with sentinels, the database) only, without a host (`redis://[user:password@][/db]`,
    /// `rediss://...`; may be left out for plain TCP without a password).
    #[arg(long, value_name = "URL")]
    pub replay_redis: Option<String>,
    /// The replay cache on a Redis Cluster or behind Redis Sentinel, and its TLS.
    #[command(flatten)]
    pub replay: super::signing::ReplayRedisArgs,
    /// Most nonces the in-memory replay cache holds (without the --replay-redis options);
    /// full = 503.
    /// At least 1 (0 would answer every request 503).
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub replay_capacity: usize,
    /// Log format (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for DevArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevArgs")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("static_dir", &self.static_dir)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl std::fmt::Debug for DemoApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoApiArgs")
            .field("listen", &self.listen)
            .field("keyring", &self.keyring)
            .field("window", &self.window)
            .field("identity_headers", &self.identity_headers)
            .field(
                "replay_redis",
                &self.replay_redis.as_ref().map(|_| "[redacted]"),
            )
            .field("replay", &self.replay)
            .field("replay_capacity", &self.replay_capacity)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// `hash-password` arguments: the argon2id cost of the hash (default 19MiB, 2 passes, 1 lane).
#[derive(Debug, clap::Args)]
pub struct HashPasswordArgs {
    /// argon2 memory cost, e.g. "64MiB" (whole KiB; at least 8KiB per lane). The proxy
    /// accepts up to auth.max_hash_memory (default 256MiB).
    #[arg(long, value_name = "SIZE", default_value = "19MiB", value_parser = parse_hash_memory)]
    pub memory: u32,
    /// argon2 passes. The proxy accepts up to auth.max_hash_iterations (default 10).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub iterations: u32,
    /// argon2 lanes. The proxy accepts up to auth.max_hash_parallelism (default 8).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(users::MAX_HASH_LANES)))]
    pub parallelism: u32,
    /// Longest password read, in bytes (UTF-8), 1 to 65536: a longer one is refused, nothing
    /// hashed. Match it to the proxy's auth.max_password_bytes (default 1024), which refuses a
    /// longer password at login.
    #[arg(long, value_name = "BYTES", default_value_t = users::DEFAULT_MAX_PASSWORD_BYTES,
          value_parser = parse_max_password_bytes)]
    pub max_password_bytes: usize,
}

/// `--max-password-bytes`: 1 to [`users::MAX_PASSWORD_BYTES_LIMIT`], as the proxy's key.
fn parse_max_password_bytes(s: &str) -> Result<usize, String> {
    let limit = users::MAX_PASSWORD_BYTES_LIMIT;
    match s.parse::<usize>() {
        Ok(bytes) if (1..=limit).contains(&bytes) => Ok(bytes),
        _ => Err(format!("{s:?} is not a whole number from 1 to {limit}")),
    }
}

/// `--memory`: a size in whole KiB (argon2's unit), as a KiB count that fits argon2's `u32`.
fn parse_hash_memory(s: &str) -> Result<u32, String> {
    // parse_size's own example ("512") is no whole number of KiB: one that argon2 takes.
    let bytes = parse_size(s).map_err(|e| {
        if e.starts_with("invalid size") {
            format!("invalid size {s:?} (use e.g. \"19MiB\" or \"64MiB\")")
        } else {
            e
        }
    })?;
    if bytes % 1024 != 0 {
        return Err(format!(
            "{s:?} is not a whole number of KiB (argon2's unit)"
        ));
    }
    u32::try_from(bytes / 1024).map_err(|_| format!("{s:?} is more than argon2 can use"))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    super::stderr_line(format_args!("countersign: {message}"));
    ExitCode::from(2)
}

/// Logs go to stderr through a background writer thread: the request path only formats the
/// line and queues it (no write syscall, no lock held on the hot path); the writer batches
/// lines in a buffer and flushes whenever the queue is drained. When `queue_lines` lines are
/// waiting (stderr cannot keep up), further lines are dropped rather than slowing requests,
/// and counted: `/metrics` reports the count as `countersign_log_lines_dropped_total`. Keep
/// the guard alive: dropping it flushes what is queued.
fn init_logging(
    format: LogFormat,
    queue_lines: usize,
) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .thread_name("countersign-log")
        .buffered_lines_limit(queue_lines)
        // Lossy (the default, stated): a full queue drops the line and counts it.
        .lossy(true)
        .finish(io::BufWriter::with_capacity(64 * 1024, io::stderr()));
    countersign::proxy::metrics::report_log_lines_dropped(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// `countersign run --config FILE`.
pub fn run(args: RunArgs) -> ExitCode {
    // The config first: it sizes the log queue. Until then nothing logs (a config error is
    // one line on stderr, written directly).
    let config = match ProxyConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => return fail(e),
    };
    let _log_guard = init_logging(args.log_format, config.server.log_queue_lines);
    let settings = match ProxySettings::from_config(&config) {
        Ok(settings) => settings,
        Err(e) => return fail(e),
    };
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    // This thread is the first event loop (plus signals and the admin listener); the server
    // starts `workers - 1` more, one per core.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => return fail(format!("cannot install signal handlers: {e}")),
        };
        // Held until the process ends (after the stop has written the snapshot): no other
        // proxy restores or writes this snapshot file meanwhile.
        let snapshot_lock = match &config.session.snapshot_file {
            Some(path) => {
                let wait = config.session.snapshot_lock_wait;
                tokio::select! {
                    lock = lock_snapshot(path, wait) => match lock {
                        Ok(lock) => {
                            countersign::proxy::metrics::report_snapshot_lock_held(true);
                            Some(KeptLock::watch(lock, path.clone()))
                        }
                        Err(e) if e.prevents_start() => return fail(e.to_string()),
                        // A folder this process cannot write: it serves all the same (the
                        // check at restore says what that means for the stop).
                        Err(e) => {
                            tracing::error!("{e}");
                            countersign::proxy::metrics::report_snapshot_lock_held(false);
                            None
                        }
                    },
                    () = signals.stop_requested() => {
                        tracing::info!(
                            "stopped while waiting for the lock of session.snapshot_file {}: \
                             nothing was restored or served",
                            path.display()
                        );
                        return ExitCode::SUCCESS;
                    }
                }
            }
            None => None,
        };
        let deps = match ProxyDeps::from_config_system_clock(&config) {
            Ok(deps) => deps,
            Err(e) => return fail(e),
        };
        // The sessions the last graceful stop wrote, back before the first request.
        let snapshot = config.session.snapshot_file.clone();
        if let Some(path) = &snapshot {
            if let Err(e) = restore_sessions(&deps, &config, path) {
                return fail(e);
            }
        }
        let kept = deps.clone();
        let server = match ProxyServer::start_per_core(settings, deps, workers).await {
            Ok(server) => server,
            Err(e) => {
                // The sessions just restored go back to the file for the next attempt (the
                // address still taken by the old process, say), instead of ending here.
                if let Some(path) = &snapshot {
                    save_sessions(&kept, &config, path);
                }
                return fail(format!("{}: {e}", config.source.display()));
            }
        };
        // Redis is connected lazily (a proxy may start before its Redis in a fleet start), so
        // check it once now: a wrong eviction policy, refused credentials or an unreachable
        // server is an ERROR line at startup rather than news at the first request or probe.
        if matches!(config.session.store, StoreKind::Redis { .. }) {
            let config = config.clone();
            tokio::spawn(async move { startup_redis_check(&config).await });
        }
        signals.serve(server).await;
        // The lock once more, in case its file went missing since the last check: the file
        // is written all the same (this proxy's sessions are in no other), but a second proxy
        // on it is news for the operator before its own stop writes over them.
        if let Some(lock) = &snapshot_lock {
            lock.check_at_stop();
        }
        // Every connection has ended (or was cut at shutdown_grace): the store holds what the
        // next start restores.
        match &snapshot {
            Some(path) => save_sessions(&kept, &config, path),
            None => ExitCode::SUCCESS,
        }
    })
}

/// `session.snapshot_file`'s lock, for the process's life: at once when no other process
/// holds it; else (a proxy on the same file still stopping, as in a restart that overlaps it)
/// once that one has ended and written its snapshot, up to `session.snapshot_lock_wait`.
async fn lock_snapshot(
    path: &std::path::Path,
    wait: std::time::Duration,
) -> Result<session_snapshot::SnapshotLock, session_snapshot::SnapshotError> {
    session_snapshot::SnapshotLock::acquire(
        path,
        wait,
        std::time::Duration::from_millis(100),
        |lock| {
            tracing::warn!(
                "session.snapshot_file {}: another process holds its lock {} (a proxy on the \
                 same file, still stopping?): waiting for it up to {wait:?} \
                 (session.snapshot_lock_wait) before restoring its sessions",
                path.display(),
                lock.display()
            );
        },
        tokio::time::sleep,
    )
    .await
}

/// `session.snapshot_file`'s lock while the proxy runs: checked every
/// [`session_snapshot::LOCK_CHECK_INTERVAL`] ([`session_snapshot::SnapshotLock::keep`]), its
/// file taken again when it was removed, and each change of what a check finds logged once.
/// Dropped (released) when the process ends.
struct KeptLock {
    state: std::sync::Arc<std::sync::Mutex<LockState>>,
}

struct LockState {
    lock: session_snapshot::SnapshotLock,
    snapshot: PathBuf,
    /// What the last check logged, so that a lasting condition is one line, not one a second.
    last: LastLockCheck,
}

#[derive(PartialEq, Eq)]
enum LastLockCheck {
    Held,
    TakenByAnother,
    Failed(String),
}

impl KeptLock {
    /// Starts the checks on the current runtime.
    fn watch(lock: session_snapshot::SnapshotLock, snapshot: PathBuf) -> KeptLock {
        let state = std::sync::Arc::new(std::sync::Mutex::new(LockState {
            lock,
            snapshot,
            last: LastLockCheck::Held,
        }));
        let checked = std::sync::Arc::clone(&state);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(session_snapshot::LOCK_CHECK_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                lock_state(&checked).check(false);
            }
        });
        KeptLock { state }
    }

    /// The last check, before the stop writes the snapshot: only a second proxy on the file
    /// is news now. A name taken again or an error taking it is not (the lock is released in a
    /// moment; a folder gone is the save's own ERROR line).
    fn check_at_stop(&self) {
        lock_state(&self.state).check(true);
    }
}

fn lock_state(state: &std::sync::Mutex<LockState>) -> std::sync::MutexGuard<'_, LockState> {
    // A check that panicked left nothing half-done: the lock is still a lock.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LockState {
    fn check(&mut self, stopping: bool) {
        let snapshot = self.snapshot.display();
        let lock = self.lock.path().display().to_string();
        let now = match self.lock.keep() {
            Ok(session_snapshot::LockKept::Held) => LastLockCheck::Held,
            Ok(session_snapshot::LockKept::Retaken) if stopping => LastLockCheck::Held,
            Ok(session_snapshot::LockKept::Retaken) => {
                tracing::warn!(
                    "session.snapshot_file {snapshot}: its lock file {lock} was removed or \
                     replaced while this proxy held it: locked again (never remove it while a \
                     proxy runs: a proxy started on the same file meanwhile would not have \
                     waited for this one)"
                );
                LastLockCheck::Held
            }
            Ok(session_snapshot::LockKept::TakenByAnother) => {
                if self.last != LastLockCheck::TakenByAnother {
                    tracing::error!(
                        "session.snapshot_file {snapshot}: its lock file {lock} was removed \
                         while this proxy held it, and another process holds the one there \
                         now: a second proxy on the same snapshot file? Each writes the file at \
                         its stop, the later over the earlier's sessions: stop one of them, or \
                         give each a snapshot_file of its own"
                    );
                }
                LastLockCheck::TakenByAnother
            }
            Err(_) if stopping => return,
            Err(e) => {
                let said = e.to_string();
                let now = LastLockCheck::Failed(said);
                if self.last != now {
                    tracing::error!(
                        "taking the lock again after its file was removed or replaced: {e}"
                    );
                }
                now
            }
        };
        countersign::proxy::metrics::report_snapshot_lock_held(now == LastLockCheck::Held);
        self.last = now;
    }
}

/// `session.snapshot_file` at start: the sessions of the last graceful stop, restored. Only an
/// error that makes a later restore unsafe (the file cannot be removed) stops the start; any
/// other (a file changed, sealed with a key no longer in the keyring, not a snapshot) is an
/// ERROR line, and the proxy starts without those sessions, as it would without the file.
/// (A path that is one of the files the config reads, which the restore would remove and the
/// stop replace, is refused with the config: `ProxyConfig::file_named_by_snapshot_file`.)
fn restore_sessions(
    deps: &ProxyDeps,
    config: &ProxyConfig,
    path: &std::path::Path,
) -> Result<(), String> {
    let Some(store) = deps.sessions.as_memory() else {
        return Ok(());
    };
    let max_sessions = config.session.max_sessions;
    let now = deps.clock.now_unix();
    let keyring = deps.keyring.load();
    // The file says which proxy wrote it: two proxies given one file must not take each
    // other's sessions.
    match session_snapshot::restore_for(
        store,
        path,
        &keyring,
        deps.users.as_ref(),
        now,
        max_sessions,
        &config.server.public_origin.as_origin(),
    ) {
        Ok(None) => {
            tracing::info!(
                "session.snapshot_file {}: none (no graceful stop wrote one since it was last \
                 read): starting without sessions",
                path.display()
            );
        }
        Ok(Some(report)) => {
            tracing::info!(
                "session.snapshot_file {}: {report}; snapshot of {}s ago, removed",
                path.display(),
                now.saturating_sub(report.saved_at)
            );
        }
        Err(e) if e.prevents_start() => return Err(e.to_string()),
        Err(e) => {
            tracing::error!("{e}: starting without its sessions");
        }
    }
    // The temporary files of stops that did not finish (killed while writing): random names
    // no later stop replaces, each as large as a snapshot, so they are removed here.
    match session_snapshot::remove_leftovers(path, std::time::SystemTime::now()) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            "session.snapshot_file {}: removed {removed} temporary files left beside it by \
             stops that did not finish writing (killed while writing, the host down)",
            path.display()
        ),
        Err(e) => tracing::error!("{e}: it stays there (remove it by hand)"),
    }
    // The stop writes there: a folder it cannot write is said now, while it can be fixed
    // (the proxy serves all the same), rather than at the stop with the sessions lost.
    if let Err(e) = session_snapshot::check_writable(path) {
        tracing::error!(
            "{e}: the stop will not be able to write the sessions (they would end with the \
             process): make the folder writable for this process while it runs"
        );
    }
    Ok(())
}

/// `session.snapshot_file` at a graceful stop: the live sessions, written for the next start.
/// A failure is an ERROR line and exit status 1 (the sessions end with the process).
fn save_sessions(deps: &ProxyDeps, config: &ProxyConfig, path: &std::path::Path) -> ExitCode {
    let Some(store) = deps.sessions.as_memory() else {
        return ExitCode::SUCCESS;
    };
    // Checked at the start with the config; again now, since a reloaded keyring may name a
    // `secret_file` at this path since: the snapshot would be written over the key.
    if let Some((key, other)) = config.file_named_by_snapshot_file() {
        tracing::error!(
            "session.snapshot_file {}: is now the file {key} names ({}): not written over it; \
             the sessions end with this process",
            path.display(),
            other.display()
        );
        return ExitCode::FAILURE;
    }
    let keyring = deps.keyring.load();
    let now = deps.clock.now_unix();
    // Marked with this proxy's `public_origin`, which the next start checks.
    let proxy = config.server.public_origin.as_origin();
    match session_snapshot::save_for(store, path, &keyring, deps.users.as_ref(), now, &proxy) {
        Ok(saved) => {
            tracing::info!(
                "session.snapshot_file {}: {saved}, for the next start",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}: the sessions end with this process");
            ExitCode::FAILURE
        }
    }
}

/// `countersign check-config --config FILE`: the file, the files it names (keyring, users,
/// TLS, static dir) and the settings the server derives from it.
pub fn check_config(args: CheckConfigArgs) -> ExitCode {
    let config = match ProxyConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => return fail(e),
    };
    if let Err(e) = config.check_files() {
        return fail(e);
    }
    // Loaded again (the dummy hash is cached): what loads but deserves a word.
    if let (Ok(Some(users)), Some(path)) = (config.load_users(), &config.auth.users_file) {
        for warning in [users.parameter_warning(), users.weak_hash_warning()]
            .into_iter()
            .flatten()
        {
            super::stderr_line(format_args!(
                "warning: auth.users_file {}: {warning}",
                path.display()
            ));
        }
    }
    if let Err(e) = ProxySettings::from_config(&config) {
        return fail(e);
    }
    if let Some(tls) = &config.server.tls {
        if let Err(e) = load_tls(&tls.cert, &tls.key) {
            return fail(format!(
                "{}: server.tls_cert/tls_key: {e}",
                config.source.display()
            ));
        }
    }
    // Not `println!`, which panics (exit 101) when stdout cannot be written: a full disk
    // behind `> check.txt`, a closed pipe. The lock is let go before the online checks.
    let written = {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{}: ok", args.config.display()).and_then(|()| stdout.flush())
    };
    if let Err(e) = written {
        return stdout_failed(e);
    }
    if !args.online {
        return ExitCode::SUCCESS;
    }
    let settings = match ProxySettings::from_config(&config) {
        Ok(settings) => settings,
        Err(e) => return fail(e),
    };
    init_preflight_warnings();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let checks = runtime.block_on(online_checks(&config, &settings));
    let mut out = io::stdout().lock();
    for check in &checks {
        if let Err(e) = writeln!(out, "{check}") {
            return stdout_failed(e);
        }
    }
    let failed = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Failed)
        .count();
    let warned = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Warning)
        .count();
    if failed > 0 {
        let _ = out.flush();
        super::stderr_line(format_args!(
            "countersign: {}: {failed} of {} online checks failed",
            args.config.display(),
            checks.len()
        ));
        return ExitCode::from(1);
    }
    let written = writeln!(
        out,
        "{}: online checks ok ({} checks, {warned} warnings)",
        args.config.display(),
        checks.len()
    )
    .and_then(|()| out.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => stdout_failed(e),
    }
}

/// `check-config`'s report could not be written to stdout: said on stderr, exit 2 (as
/// `hash-password`, `keygen`, `sign` and `verify` answer), never a panic.
fn stdout_failed(error: io::Error) -> ExitCode {
    super::stderr_line(format_args!(
        "countersign check-config: cannot write to stdout: {error}"
    ));
    ExitCode::from(2)
}

/// `run`'s one-shot Redis check at startup ([`check_redis`]): an INFO line when Redis is
/// usable, an ERROR line naming the problem when not. The proxy runs either way: Redis may come
/// up after it (a fleet start), requests that need it answer 503 and `/readyz` 503 until then.
async fn startup_redis_check(config: &ProxyConfig) {
    let Some(check) = check_redis(config).await else {
        return;
    };
    match check.outcome {
        Ok(found) => tracing::info!(
            key = check.key,
            endpoint = check.endpoint.as_str(),
            "startup check: redis usable ({found})"
        ),
        Err(problem) => tracing::error!(
            key = check.key,
            endpoint = check.endpoint.as_str(),
            "startup check: redis not usable: {problem}. The proxy runs anyway (Redis may come \
             up later): logins and session requests answer 503 and /readyz answers 503 until it \
             is usable"
        ),
    }
}

/// How one online check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckStatus {
    Ok,
    /// Failed, but not required (`required_for_ready = false`): no failure of the whole.
    Warning,
    Failed,
}

/// One line of `check-config --online`: the status, the config key, the target (never a
/// password), what was found.
#[derive(Debug)]
struct OnlineCheck {
    status: CheckStatus,
    key: String,
    target: String,
    detail: String,
}

impl std::fmt::Display for OnlineCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            CheckStatus::Ok => "ok  ",
            CheckStatus::Warning => "WARN",
            CheckStatus::Failed => "FAIL",
        };
        // One line whatever the detail holds (a server's error text).
        let detail: String = self
            .detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        write!(f, "{status} {} {}: {detail}", self.key, self.target)
    }
}

/// The warnings the Redis connection logs while `check-config --online` runs (its eviction
/// policy cannot be read, it reached a replica), on stderr; not its ERROR lines, which speak of
/// requests refused, and which the check's own line says better.
fn init_preflight_warnings() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() == tracing::Level::WARN
        }));
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// `scheme://host:port` of an upstream or `verify_url` (the port the connection goes to, never
/// user info or path).
fn connect_target(url: &Uri) -> String {
    let scheme = url.scheme().cloned().unwrap_or(Scheme::HTTP);
    match url.authority() {
        Some(authority) => format!("{scheme}://{}", probe_address(&scheme, authority)),
        None => format!("{scheme}://?"),
    }
}

/// After a TLS 1.3 handshake, the check reads from the connection (sending nothing) for at least
/// this long, or for as long as the connection and handshake took if that is longer, up to
/// [`POST_HANDSHAKE_MAX_WAIT`], and never past the check's own limit. Why: with TLS 1.3 the
/// client's certificate reaches the server in the client's last flight, after which the client
/// considers the handshake done; a server that refuses the certificate (or requires one and got
/// none) answers with an alert about one round trip later, which the client only sees when it
/// reads. The connection and the handshake took at least two round trips, so waiting as long
/// covers the one round trip the verdict needs on a slow link, and the floor covers the
/// server's own work on a fast one. The usual passing case does not wait that long: servers
/// send their session tickets right after they have processed the client's last flight, and
/// the first ticket ends the wait (with client authentication a TLS 1.3 server can make a
/// ticket only from the client's whole last flight, its certificate included, so the ticket
/// comes after the verdict).
const POST_HANDSHAKE_MIN_WAIT: Duration = Duration::from_millis(300);

/// The longest the post-handshake read of [`POST_HANDSHAKE_MIN_WAIT`] lasts: a passing check of
/// an upstream that sends no session ticket is at most this much slower.
const POST_HANDSHAKE_MAX_WAIT: Duration = Duration::from_millis(750);

/// What a TLS 1.3 connection showed after its handshake, while the check read without
/// sending anything ([`after_the_handshake`]).
#[derive(Debug)]
enum AfterHandshake {
    /// The server sent a session ticket: it processed the client's last flight (its
    /// certificate included) and kept the connection.
    Ticket,
    /// The server sent application data without being asked: it too has accepted the
    /// client's last flight.
    Data,
    /// Neither data nor an error within the wait.
    Quiet(Duration),
    /// A TLS alert, a reset or another read error: the server refused the connection.
    Refused(io::Error),
    /// The server closed the connection without a word (no alert).
    Closed,
}

/// Reads from `tls` for up to `wait`, sending nothing, and says what came (see
/// [`AfterHandshake`]). rustls consumes a session ticket without returning application data:
/// the read stays pending, and the ticket count tells it happened.
async fn after_the_handshake<IO>(
    tls: &mut tokio_rustls::client::TlsStream<IO>,
    wait: Duration,
) -> AfterHandshake
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::task::Poll;
    use tokio::io::AsyncRead as _;
    // Anything the server says first fits; what it says is not kept.
    let mut byte = [0u8; 1];
    let read = std::future::poll_fn(|cx| {
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        match std::pin::Pin::new(&mut *tls).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(AfterHandshake::Closed),
            Poll::Ready(Ok(())) => Poll::Ready(AfterHandshake::Data),
            Poll::Ready(Err(e)) => Poll::Ready(AfterHandshake::Refused(e)),
            Poll::Pending if tls.get_ref().1.tls13_tickets_received() > 0 => {
                Poll::Ready(AfterHandshake::Ticket)
            }
            Poll::Pending => Poll::Pending,
        }
    });
    tokio::time::timeout(wait, read)
        .await
        .unwrap_or(AfterHandshake::Quiet(wait))
}

/// The problem of a connection refused right after its TLS 1.3 handshake. `client_cert_key`
/// names the config key of the client certificate; `presented`: one was configured.
fn refused_after_handshake(how: &AfterHandshake, client_cert_key: &str, presented: bool) -> String {
    let what = match how {
        AfterHandshake::Refused(e) => error_chain(e),
        _ => "it closed the connection without a TLS alert".to_owned(),
    };
    if presented {
        format!(
            "TLS handshake ok, then the upstream refused the client certificate \
             ({client_cert_key}): {what} (with TLS 1.3 the server checks it after the \
             handshake; the proxy would answer 502)"
        )
    } else {
        format!(
            "TLS handshake ok, then the upstream refused the connection before any request: \
             {what} (with TLS 1.3 this is how a server that requires a client certificate \
             refuses a client without one: set {client_cert_key}; the proxy would answer 502)"
        )
    }
}

/// Connects to `url` as the proxy does when it forwards: the forwarding connector (TCP with
/// `connect.connect_timeout`, `TCP_NODELAY`; for https the TLS handshake against the web PKI
/// roots plus `shared_roots` plus the upstream's own CAs, presenting `connect.client_cert`),
/// the whole bounded by `limit` (the route's `timeout` bounds the handshake when forwarding
/// too). After a TLS 1.3 handshake it reads, sending nothing, for a short bounded time
/// ([`POST_HANDSHAKE_MIN_WAIT`]): a TLS 1.3 server refuses a client certificate (or its
/// absence) only after the client has finished its handshake, so without this read such an
/// upstream would pass here and answer the first request with an alert. Any TLS 1.3
/// connection gets the read, client certificate or not: an upstream that requires one from a
/// proxy configured without any is the same mistake. With TLS 1.2 the server's verdict on the
/// client certificate is part of the handshake, which is then enough. `client_cert_key`
/// names the config key of the client certificate, for the messages.
async fn connect_like_forwarding(
    url: &Uri,
    connect: &UpstreamConnect,
    shared_roots: &[rustls::pki_types::CertificateDer<'static>],
    limit: Duration,
    client_cert_key: &str,
) -> Result<String, String> {
    use tower_service::Service as _;
    let mut connector = upstream_connector(connect, shared_roots)?;
    let started = std::time::Instant::now();
    let stream = match tokio::time::timeout(limit, connector.call(url.clone())).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(error_chain(e.as_ref())),
        Err(_) => return Err(format!("no connection within {} ms", limit.as_millis())),
    };
    let mut tls = match stream {
        hyper_rustls::MaybeHttpsStream::Http(_) => return Ok("TCP connected".to_owned()),
        hyper_rustls::MaybeHttpsStream::Https(tls) => tls,
    };
    let tls = tls.inner_mut();
    const HANDSHAKE_OK: &str =
        "TCP connected, TLS handshake ok (certificate trusted and valid for the host";
    if tls.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Ok(format!("{HANDSHAKE_OK})"));
    }
    let took = started.elapsed();
    let wait = took
        .clamp(POST_HANDSHAKE_MIN_WAIT, POST_HANDSHAKE_MAX_WAIT)
        .min(limit.saturating_sub(took));
    let presented = connect.client_cert.is_some();
    match after_the_handshake(tls, wait).await {
        AfterHandshake::Ticket => Ok(format!(
            "{HANDSHAKE_OK}; TLS 1.3), then accepted (the upstream sent a session ticket)"
        )),
        AfterHandshake::Data => Ok(format!(
            "{HANDSHAKE_OK}; TLS 1.3), then accepted (the upstream sent data unasked)"
        )),
        AfterHandshake::Quiet(waited) => Ok(format!(
            "{HANDSHAKE_OK}; TLS 1.3), no refusal within {} ms after it",
            waited.as_millis()
        )),
        how => Err(refused_after_handshake(&how, client_cert_key, presented)),
    }
}

/// Every online check, run at once, reported in config order: the Redis store, each upstream,
/// `verify_url`.
async fn online_checks(config: &ProxyConfig, settings: &ProxySettings) -> Vec<OnlineCheck> {
    let redis = async {
        check_redis(config).await.map(|check| {
            let (status, detail) = match check.outcome {
                Ok(found) => (CheckStatus::Ok, found),
                Err(problem) => (CheckStatus::Failed, problem),
            };
            OnlineCheck {
                status,
                key: check.key.to_owned(),
                target: check.endpoint,
                detail,
            }
        })
    };
    let upstreams = futures_util::future::join_all(settings.routes.iter().enumerate().map(
        |(i, route)| async move {
            let required = config.upstreams.get(i).is_none_or(|u| u.required_for_ready);
            let found = connect_like_forwarding(
                &route.url,
                &route.connect,
                &settings.upstream_roots,
                route.connect.connect_timeout.saturating_add(route.timeout),
                &format!("upstream[{i}].client_cert_file"),
            )
            .await;
            let (status, detail) = match found {
                Ok(found) => (CheckStatus::Ok, found),
                Err(problem) if required => (CheckStatus::Failed, problem),
                Err(problem) => (
                    CheckStatus::Warning,
                    format!(
                        "{problem} (required_for_ready = false: its routes fail, the proxy \
                         stays ready)"
                    ),
                ),
            };
            OnlineCheck {
                status,
                key: format!("upstream[{i}].url"),
                target: format!("({}) {}", route.name, connect_target(&route.url)),
                detail,
            }
        },
    ));
    let verify = async {
        let url = settings.verify_url.as_ref()?;
        // The client certificate the verify_url client presents (mutual TLS), as `run` loads it.
        let client_cert = config
            .auth
            .verify_client_cert
            .as_ref()
            .map(|files| files.load(&config.source))
            .transpose();
        let found = match client_cert {
            Ok(client_cert) => {
                let connect = UpstreamConnect {
                    connect_timeout: settings.connect_timeout,
                    extra_roots: settings.verify_roots.clone(),
                    client_cert,
                    ..UpstreamConnect::default()
                };
                connect_like_forwarding(
                    url,
                    &connect,
                    &settings.upstream_roots,
                    settings.verify_timeout,
                    "auth.verify_client_cert_file",
                )
                .await
            }
            Err(e) => Err(e.to_string()),
        };
        let (status, detail) = match found {
            Ok(found) => (CheckStatus::Ok, format!("{found} (no login sent)")),
            Err(problem) => (CheckStatus::Failed, problem),
        };
        Some(OnlineCheck {
            status,
            key: "auth.verify_url".to_owned(),
            target: connect_target(url),
            detail,
        })
    };
    let (redis, upstreams, verify) = tokio::join!(redis, upstreams, verify);
    redis.into_iter().chain(upstreams).chain(verify).collect()
}

/// `countersign dev`.
pub fn dev(args: DevArgs) -> ExitCode {
    // The same rule as `session.absolute_timeout` in a config file: a session cannot be idle
    // for longer than it may live at all.
    if args.absolute_timeout < args.idle_timeout {
        return fail(format!(
            "--absolute-timeout must be at least --idle-timeout ({}s < {}s)",
            args.absolute_timeout.as_secs(),
            args.idle_timeout.as_secs()
        ));
    }
    // Named here: the hashing below would say only "empty password", naming neither source.
    // The value itself is never printed.
    let password = match args.password.map(std::ffi::OsString::into_string) {
        None => None,
        Some(Err(_)) => {
            return fail(
                "--password (or COUNTERSIGN_DEV_PASSWORD) is not UTF-8: the demo user's \
                 password is text"
                    .to_owned(),
            )
        }
        Some(Ok(password)) => {
            // The demo's proxy has the default `auth.max_password_bytes`.
            let max = users::DEFAULT_MAX_PASSWORD_BYTES;
            let problem = match password.len() {
                0 => Some("is empty".to_owned()),
                n if n > max => Some(format!("is longer than {max} bytes")),
                _ => None,
            };
            if let Some(problem) = problem {
                return fail(format!(
                    "--password (or COUNTERSIGN_DEV_PASSWORD) {problem}: the demo user's \
                     password is 1 to {max} bytes"
                ));
            }
            Some(password)
        }
    };
    let _log_guard = init_logging(args.log_format, DEFAULT_LOG_QUEUE_LINES);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => return fail(format!("cannot install signal handlers: {e}")),
        };
        let options = DevOptions {
            listen: args.listen,
            admin_listen: args.admin_listen,
            password,
            static_dir: args.static_dir,
            idle_timeout: args.idle_timeout,
            absolute_timeout: args.absolute_timeout,
            clock: None,
        };
        let server = match dev::start(options).await {
            Ok(server) => server,
            Err(e) => return fail(e),
        };
        print_banner(&server);
        let dev::DevServer { proxy, .. } = server;
        signals.serve(proxy).await;
        ExitCode::SUCCESS
    })
}

fn print_banner(server: &dev::DevServer) {
    let url = &server.url;
    let password = server.password.as_str();
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\ncountersign dev is running (in-memory state, ephemeral key; Ctrl-C stops it)\n\
         \n  open      {url}/\n  user      {DEMO_USER}\n  password  {password}\n  demo API  http://{api} (behind the VerifyLayer; reached through {url}/api/)\n  websocket {ws}/api/ws (the page's WebSocket button: signed handshake, then echo)\n",
        api = server.api_addr,
        ws = url.replacen("http", "ws", 1),
    );
    if let Some(admin) = server.proxy.admin_addr() {
        let _ = writeln!(out, "  admin     http://{admin}/metrics\n");
    }
    let _ = writeln!(
        out,
        "Try it with curl:\n\
         \n  # log in: the answer holds the CSRF token, the cookie jar the session\n\
         {login}\n\
         \n  # read: the proxy signs the request with your identity, the API verifies it\n\
         \x20 curl -b jar.txt {url}/api/whoami\n\
         \n  # write: state-changing requests need the CSRF token from the login answer\n\
         \x20 curl -b jar.txt -H 'X-CSRF-Token: <csrf_token>' -H 'Content-Type: application/json' \\\n\
         \x20      -d '{{\"text\":\"hello\"}}' {url}/api/notes\n\
         \x20 curl -b jar.txt {url}/api/notes\n\
         \n  # a server-sent event stream, signed for you (Ctrl-C to stop)\n\
         \x20 curl -N -b jar.txt {url}/api/events\n\
         \n  # log out\n\
         \x20 curl -b jar.txt -X POST -H 'X-CSRF-Token: <csrf_token>' {url}/auth/logout\n",
        login = curl_login(url, password),
    );
    let _ = out.flush();
}

/// The banner's login command (two lines, indented as the banner's commands are): the body is
/// JSON made by `serde_json` and quoted for a POSIX shell, so that any `--password` (a `"`, a
/// `'`, a `$`) reaches the login endpoint as given.
fn curl_login(url: &str, password: &str) -> String {
    #[derive(serde::Serialize)]
    struct Login<'a> {
        username: &'a str,
        password: &'a str,
    }
    let body = serde_json::to_string(&Login {
        username: DEMO_USER,
        password,
    })
    // Two strings always serialize.
    .unwrap_or_default();
    format!(
        "\x20 curl -c jar.txt -H 'Content-Type: application/json' \\\n\
         \x20      -d {} {url}/auth/login",
        shell_quote(&body)
    )
}

/// `text` as one word for a POSIX shell: in single quotes, inside which nothing is special
/// but `'` itself, written `'\''` (end the quoting, an escaped quote, quote again).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `countersign demo-api --listen ADDR --keyring FILE`: the API tier of the demo (what `dev`
/// embeds) on its own, behind the real VerifyLayer. SIGTERM/SIGINT stop it, SIGHUP reloads
/// the keyring (a bad file is logged and the old keys kept).
pub fn demo_api(args: DemoApiArgs) -> ExitCode {
    use countersign::core::KeyringHandle;
    use tokio::signal::unix::{signal, SignalKind};

    let _log_guard = init_logging(args.log_format, DEFAULT_LOG_QUEUE_LINES);
    let keyring = match countersign::keyfile::load_keyring(&args.keyring) {
        Ok(keyring) => KeyringHandle::new(keyring),
        Err(e) => return fail(e),
    };
    let identity_headers = match args.identity_headers.headers() {
        Ok(headers) => headers,
        Err(e) => return fail(e),
    };
    // The same options and messages as `verify --replay-redis`; checked before anything
    // starts (opening the cache does not connect).
    let redis = match super::signing::replay_redis_cache(args.replay_redis.as_deref(), &args.replay)
    {
        Ok(redis) => redis,
        Err(e) => return fail(e),
    };
    // Where nonces go, for the log line (never a password).
    let replay_store = redis.as_ref().map_or_else(
        || "memory".to_owned(),
        |cache| cache.connection().endpoint().to_owned(),
    );
    let replay: std::sync::Arc<dyn countersign::replay::ReplayCache> = match redis {
        Some(cache) => std::sync::Arc::new(cache),
        None => std::sync::Arc::new(countersign::replay::MemoryReplayCache::new(
            args.replay_capacity,
        )),
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        let (mut term, mut int, mut hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
            _ => return fail("cannot install signal handlers"),
        };
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(listener) => listener,
            Err(e) => return fail(format!("--listen: cannot listen on {}: {e}", args.listen)),
        };
        let addr = listener.local_addr().unwrap_or(args.listen);
        let clock: countersign::clock::SharedClock =
            std::sync::Arc::new(countersign::clock::SystemClock);
        let task = dev::serve_demo_api(
            listener,
            keyring.clone(),
            replay,
            clock,
            args.window,
            identity_headers,
        );
        tracing::info!(
            %addr,
            keyring = %args.keyring.display(),
            replay = replay_store.as_str(),
            "demo API listening"
        );
        // Not `println!`, which panics when stdout cannot be written (closed by a supervisor,
        // a full disk): the line is a courtesy to whoever started it, the log above says the
        // same, and the API serves either way.
        {
            let mut stdout = io::stdout().lock();
            let _ = writeln!(stdout, "demo API listening on http://{addr}")
                .and_then(|()| stdout.flush());
        }
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => match countersign::keyfile::load_keyring(&args.keyring) {
                    Ok(new) => {
                        let active = new.active_id().to_owned();
                        keyring.store(new);
                        tracing::info!("SIGHUP: reloaded keyring (active key {active})");
                    }
                    Err(e) => tracing::error!("SIGHUP: keeping the current keyring: {e}"),
                },
            }
        }
        task.abort();
        tracing::info!("demo API stopped");
        ExitCode::SUCCESS
    })
}

/// `countersign hash-password`: reads one password (on a terminal: typed twice, without echo)
/// and prints its argon2id PHC string, at the cost the flags give.
pub fn hash_password(args: HashPasswordArgs) -> ExitCode {
    // Messages name the command, as those of `keygen`, `sign` and `verify` do.
    let fail = |message: String| {
        super::stderr_line(format_args!("countersign hash-password: {message}"));
        ExitCode::from(2)
    };
    let cost = users::HashCost {
        memory_kib: args.memory,
        iterations: args.iterations,
        parallelism: args.parallelism,
    };
    // Checked before the password is asked for: a flag out of argon2's range, or more memory
    // than this machine can give, costs no typing.
    if let Err(e) = cost.params().and_then(|_| cost.check_allocatable()) {
        return fail(e);
    }
    // Made all the same (the proxy's bounds may have been raised), but the operator learns
    // now, not at the first login, which key a proxy with the default bounds would refuse.
    for above in cost.above(&users::HashLimits::default()) {
        super::stderr_line(format_args!(
            "countersign hash-password: warning: {above}, its default: a proxy refuses this \
             hash unless that key is raised"
        ));
    }
    if let Some(weak) = cost.below_recommended() {
        super::stderr_line(format_args!("countersign hash-password: warning: {weak}"));
    }
    // Refuses an empty password, and one too long (which the reading refuses first).
    let max_password_bytes = args.max_password_bytes;
    let hash = move |password: Zeroizing<String>| {
        // Hashed all the same (the proxy's key may have been raised), but said now, not at
        // the first login that fails.
        let default_max = users::DEFAULT_MAX_PASSWORD_BYTES;
        if password.len() > default_max {
            super::stderr_line(format_args!(
                "countersign hash-password: warning: the password is {} bytes, more than \
                 auth.max_password_bytes' default ({default_max}): a proxy refuses it at login \
                 unless that key is raised",
                password.len()
            ));
        }
        users::hash_password_with(&password, &cost)
    };
    let hashed = if io::stdin().is_terminal() {
        // Typed blind, so asked twice; hashed while a Ctrl-C still ends the command. Piped
        // input (a script, a secret store) is taken as it comes.
        match password::read_typed_twice(max_password_bytes, hash) {
            Ok(Typed::Same(hashed)) => hashed,
            Ok(Typed::Differ) => {
                return fail("the two passwords typed differ; nothing hashed".to_owned())
            }
            Ok(Typed::Interrupted(code)) => return ExitCode::from(code),
            Err(e) => return fail(e),
        }
    } else {
        match password::read_piped(io::stdin().lock(), max_password_bytes) {
            Ok(password) => hash(password),
            Err(e) => return fail(e),
        }
    };
    match hashed {
        // Not `println!`, which panics (exit 101) when stdout cannot be written: a full disk
        // behind `> users-hash.txt`, a closed pipe.
        Ok(hash) => {
            let mut stdout = io::stdout().lock();
            match writeln!(stdout, "{hash}").and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("cannot write to stdout: {e}")),
            }
        }
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::curl_login;

    /// Runs `command` (the banner's login line, its `curl` swapped for `printf '%s\n'`) in
    /// `sh`: the words the shell hands curl, one per line.
    fn shell_words(command: &str) -> Vec<String> {
        let command = command
            .replace("\\\n", " ")
            .replacen("curl", "printf '%s\\n'", 1);
        let out = std::process::Command::new("sh")
            .args(["-c", &command])
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The password went into the banner's JSON body and its shell quoting as it was: `a"b`
    /// made invalid JSON, a `'` ended the shell's quoting. Now the shell hands curl exactly
    /// the JSON of the demo user and that password, whatever it holds.
    #[test]
    fn the_login_line_quotes_any_password() {
        for password in [
            "plain",
            "a\"b",
            "it's",
            "'",
            "a\\b",
            "$(echo run)`echo run` $HOME",
            "ünï\u{2028}côde\n\ttab",
        ] {
            let line = curl_login("http://127.0.0.1:8080", password);
            assert!(line.starts_with("  curl -c jar.txt "), "{line}");
            assert!(
                line.ends_with(" http://127.0.0.1:8080/auth/login"),
                "{line}"
            );
            let words = shell_words(&line);
            let data = words
                .iter()
                .position(|w| w == "-d")
                .and_then(|i| words.get(i + 1))
                .unwrap_or_else(|| panic!("{password:?}: no -d in {words:?}"));
            let body: serde_json::Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("{password:?}: {data:?}: {e}"));
            assert_eq!(
                body,
                serde_json::json!({"username": "demo", "password": password}),
                "{password:?}"
            );
            assert_eq!(words.last().unwrap(), "http://127.0.0.1:8080/auth/login");
        }
        assert!(curl_login("http://h", "a\"b")
            .contains(r#"-d '{"username":"demo","password":"a\"b"}'"#));
        assert!(curl_login("http://h", "it's").contains(r#""password":"it'\''s"}'"#));
    }
}

//! The proxy's configuration file (`proxy.toml`).
//!
//! The file is deserialised into raw structs that mirror the TOML exactly (unknown keys are
//! errors, so a typo cannot silently fall back to a default), then converted with `TryFrom`
//! into checked types whose fields can be used without further validation. Every error names
//! the file, the key (`session.idle_timeout`, `upstream[1].prefix`) and the problem.
//! docs/CONFIG.md documents every key and its default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use serde::Deserialize;

pub use super::session_redis::RedisTuning;
use super::users::UserDb;
use crate::core::Keyring;

/// Largest config file read: anything bigger is a wrong path, not a config.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Cookie name prefixes the server adds itself (`__Host-` over https).
const RESERVED_COOKIE_PREFIXES: [&str; 2] = ["__Host-", "__Secure-"];

/// Paths the proxy answers itself; an upstream prefix under them would never be reached.
const RESERVED_PREFIX: &str = "/auth/";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration problem: which file, which key, what is wrong.
///
/// Display: `"<file>: <key>: <problem>"`, e.g.
/// `proxy.toml: session.idle_timeout: invalid duration "3x" (use e.g. "30m")`; whole-file
/// problems (unreadable, TOML syntax) have no key: `"<file>: <problem>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: PathBuf,
    key: String,
    problem: String,
}

impl ConfigError {
    /// An error about `key` (empty for the whole file) in `file`.
    pub fn new(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// The file the problem is in.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The key path (`server.listen`, `upstream[0].url`, `users[2].password`); empty when the
    /// problem concerns the whole file.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The problem, without file and key.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads a small text file, with errors that name it.
pub(crate) fn read_text_file(path: &Path, what: &str) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let unreadable =
        |e: std::io::Error| ConfigError::new(path, "", format!("cannot read {what}: {e}"));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut text = String::new();
    let read = file
        .take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if read as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigError::new(
            path,
            "",
            format!("{what} is larger than {MAX_CONFIG_FILE_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// Deserialises TOML `text` into `T`, turning errors into [`ConfigError`]s that name the key.
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = toml_key_path(err.path());
        let inner = err.into_inner();
        let message = inner.message().trim().to_owned();
        // For an unknown or missing key the path names the table; the key is in the message.
        let key = match unknown_field(&message) {
            Some(field) if key.is_empty() => field.to_owned(),
            Some(field) if key != field && !key.ends_with(&format!(".{field}")) => {
                format!("{key}.{field}")
            }
            _ => key,
        };
        let problem = match (inner.span(), key.is_empty()) {
            (Some(span), true) => {
                // Bytes, not str slicing: a span off a char boundary must not panic.
                let before = &text.as_bytes()[..span.start.min(text.len())];
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                format!("line {line}: {message}")
            }
            _ => message,
        };
        ConfigError::new(path, key, problem)
    })
}

/// `upstream[1].url` from serde_path_to_error's path (which prints `upstream[1].url` for
/// sequences and `?` for unknown positions).
fn toml_key_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." || text == "?" {
        String::new()
    } else {
        text
    }
}

/// The field an "unknown field `x`" or "missing field `x`" message is about.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split_once('`').map(|(field, _)| field)
}

// ---------------------------------------------------------------------------------------------
// Value parsers
// ---------------------------------------------------------------------------------------------

/// Parses a byte size: `"512"`, `"64KiB"`, `"1MiB"`, `"1GiB"` (powers of 1024) or `"10KB"`,
/// `"10MB"`, `"1GB"` (powers of 1000); `"B"` is allowed as a unit. No fractions, no spaces
/// inside (surrounding whitespace is ignored).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("invalid size {s:?} (use e.g. \"1MiB\", \"64KiB\" or \"512\")");
    let trimmed = s.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = trimmed[..digits_end].parse().map_err(|_| bad())?;
    let multiplier: u64 = match &trimmed[digits_end..] {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    number
        .checked_mul(multiplier)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration that must be positive (`"off"` is not allowed here): what every duration
/// key of the config takes, and the CLI's duration flags too, so both say the same.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (use e.g. \"30m\"; units ms, s, m, h, d)");
    match crate::keyfile::parse_duration(text) {
        Ok(Some(d)) if d > Duration::ZERO => Ok(d),
        Ok(Some(_)) => Err(format!("{text:?}: must be greater than zero")),
        Ok(None) => Err(format!("{text:?}: \"off\" is not allowed here")),
        Err(_) => Err(invalid()),
    }
}

/// A size given as a TOML integer (bytes) or a string (`"1MiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

impl RawSize {
    fn to_bytes(&self) -> Result<usize, String> {
        match self {
            RawSize::Bytes(n) => usize::try_from(*n).map_err(|_| format!("size {n} is too large")),
            RawSize::Text(s) => parse_size(s),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) structs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    session: RawSession,
    auth: RawAuth,
    signing: RawSigning,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    public_origin: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    static_dir: Option<PathBuf>,
    max_header_bytes: Option<RawSize>,
    header_read_timeout: Option<String>,
    request_timeout: Option<String>,
    shutdown_grace: Option<String>,
    max_connections: Option<usize>,
    max_static_file: Option<RawSize>,
    http2_max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    store: Option<String>,
    redis_url: Option<String>,
    redis_key_prefix: Option<String>,
    redis_timeout: Option<String>,
    redis_connect_timeout: Option<String>,
    redis_touch_interval: Option<String>,
    redis_ca_file: Option<String>,
    idle_timeout: Option<String>,
    absolute_timeout: Option<String>,
    cookie_name: Option<String>,
    max_sessions: Option<usize>,
    sweep_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: Option<PathBuf>,
    verify_url: Option<String>,
    max_concurrent_password_checks: Option<usize>,
    verify_timeout: Option<String>,
    max_login_body: Option<RawSize>,
    max_username_bytes: Option<usize>,
    max_verify_answer: Option<RawSize>,
    #[serde(default)]
    throttle: RawThrottle,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    max_failures_per_ip: Option<u32>,
    max_failures_per_user: Option<u32>,
    window: Option<String>,
    max_tracked_keys: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    keyring: PathBuf,
    window: Option<String>,
    user_header: Option<String>,
    roles_header: Option<String>,
    #[serde(default)]
    extra_headers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    prefix: String,
    url: String,
    #[serde(default)]
    strip_prefix: bool,
    timeout: Option<String>,
    max_body: Option<RawSize>,
    auth: Option<String>,
    #[serde(default)]
    forward_cookies: bool,
    connect_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
    ca_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Checked types
// ---------------------------------------------------------------------------------------------

/// The whole, validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The config file this was read from (relative paths inside resolve against its folder).
    pub source: PathBuf,
    /// The public listener.
    pub server: ServerConfig,
    /// The ops listener.
    pub admin: AdminConfig,
    /// Session store and lifetimes.
    pub session: SessionConfig,
    /// How logins are checked and throttled.
    pub auth: AuthConfig,
    /// How forwarded requests are signed.
    pub signing: SigningConfig,
    /// The APIs behind the proxy, in file order.
    pub upstreams: Vec<UpstreamConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address the public listener binds.
    pub listen: SocketAddr,
    /// The SPA's origin: Origin checks, cookie `Secure` and `__Host-`.
    pub public_origin: PublicOrigin,
    /// Certificate and key files: HTTPS (HTTP/2 via ALPN) when set.
    pub tls: Option<TlsFiles>,
    /// SPA assets served same-origin.
    pub static_dir: Option<PathBuf>,
    /// Largest request head (request line + headers), default 16 KiB.
    pub max_header_bytes: usize,
    /// Time allowed to receive a request head, default 10s.
    pub header_read_timeout: Duration,
    /// Whole-request cap for slow clients, default 60s.
    pub request_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown, default 30s.
    pub shutdown_grace: Duration,
    /// Concurrent client connections, default 10000.
    pub max_connections: usize,
    /// Largest file served from `static_dir` (files are read whole), default 32 MiB.
    pub max_static_file: u64,
    /// Concurrent streams one HTTP/2 client connection may open, default 256.
    pub http2_max_concurrent_streams: u32,
}

/// The public origin of the SPA (`scheme://host[:port]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOrigin {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or address, lower case (IPv6 in brackets).
    pub host: String,
    /// Explicit port; `None` when it is the scheme's default.
    pub port: Option<u16>,
}

impl PublicOrigin {
    /// Parses an origin such as `https://app.example.com` or `http://localhost:8080`. A path
    /// of `/` is tolerated; any other path, a query, a fragment or user info is an error.
    pub fn parse(text: &str) -> Result<PublicOrigin, String> {
        let uri: Uri = text
            .parse()
            .map_err(|_| format!("{text:?} is not a URL (use e.g. \"https://app.example.com\")"))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| format!("{text:?} has no scheme (use http:// or https://)"))?
            .to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{text:?}: scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?}: user info is not allowed in an origin"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || text.contains('#') {
            return Err(format!(
                "{text:?}: an origin has no path or query (use e.g. \"https://app.example.com\")"
            ));
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = authority.port_u16().filter(|&p| p != default_port);
        Ok(PublicOrigin { scheme, host, port })
    }

    /// The serialised origin, as browsers send it in `Origin`: `https://app.example.com`.
    pub fn as_origin(&self) -> String {
        match self.port {
            Some(port) => format!("{}://{}:{}", self.scheme, self.host, port),
            None => format!("{}://{}", self.scheme, self.host),
        }
    }

    /// Whether the origin is https (cookies get `Secure` and the `__Host-` prefix).
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }

    /// `host[:port]` as in a `Host` header / `X-Forwarded-Host`.
    pub fn authority(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{}", self.host, port),
            None => self.host.clone(),
        }
    }
}

/// Certificate chain and private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the ops listener (`/healthz`, `/readyz`, `/metrics`, revoke); none = off.
    pub listen: Option<SocketAddr>,
    /// Concurrent connections on the admin listener (probes and scrapers), default 64; more
    /// are closed at once, so a flood of them cannot take the proxy's memory.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
        }
    }
}

/// Default `admin.max_connections`.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default `server.http2_max_concurrent_streams`.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;

/// `[session]`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where sessions live.
    pub store: StoreKind,
    /// An unused session ends after this, default 30m.
    pub idle_timeout: Duration,
    /// A session ends this long after login regardless, default 12h.
    pub absolute_timeout: Duration,
    /// Cookie name, default `countersign_session`; the server adds `__Host-` over https.
    pub cookie_name: String,
    /// Most sessions held at once, default 1_000_000 (full -> logins answer 503).
    pub max_sessions: usize,
    /// How often expired sessions are swept, default 60s.
    pub sweep_interval: Duration,
    /// Timeouts, touch interval and TLS roots of the Redis stores (`redis_*` keys; used
    /// with `store = "redis"` only).
    pub redis: RedisTuning,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            store: StoreKind::Memory,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            cookie_name: "countersign_session".to_owned(),
            max_sessions: 1_000_000,
            sweep_interval: Duration::from_secs(60),
            redis: RedisTuning::default(),
        }
    }
}

/// The session store kind.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// In-process ([`super::session::MemorySessionStore`]).
    Memory,
    /// Redis ([`super::session_redis::RedisSessionStore`] and the Redis login throttle).
    Redis {
        /// `redis://` or `rediss://` URL (may hold a password: never printed).
        url: String,
        /// Prefix of every key the proxy writes.
        key_prefix: String,
    },
}

impl fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("Memory"),
            StoreKind::Redis { url, key_prefix } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .field("key_prefix", key_prefix)
                .finish(),
        }
    }
}

/// `scheme://[redacted]@host...` when the URL has user info (a Redis password).
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://[redacted]{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Users file (argon2id hashes): logins checked by the proxy.
    pub users_file: Option<PathBuf>,
    /// Or: the API checks credentials (the proxy POSTs them there, signed).
    pub verify_url: Option<Uri>,
    /// Failed-login limits.
    pub throttle: ThrottleConfig,
    /// Password checks (argon2, ~19 MiB each) running at once, default: the number of CPUs.
    /// Pass it to `UsersHandle::with_max_concurrent_checks`.
    pub max_concurrent_password_checks: usize,
    /// Time limit of one `verify_url` call (connect, send, read the answer), default 10s.
    pub verify_timeout: Duration,
    /// Largest `POST /auth/login` body, default 16 KiB.
    pub max_login_body: usize,
    /// Longest user name accepted at login, in bytes (UTF-8), default 256.
    pub max_username_bytes: usize,
    /// Largest `verify_url` answer read, default 64 KiB (a larger one is a 502).
    pub max_verify_answer: usize,
}

/// Default `auth.verify_timeout`.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `auth.max_login_body`.
pub const DEFAULT_MAX_LOGIN_BODY: usize = 16 * 1024;
/// Smallest `auth.max_login_body`: below this not even a short name and password fit.
pub const MIN_LOGIN_BODY: usize = 64;
/// Default `auth.max_username_bytes`.
pub const DEFAULT_MAX_USERNAME_BYTES: usize = 256;
/// Default `auth.max_verify_answer`.
pub const DEFAULT_MAX_VERIFY_ANSWER: usize = 64 * 1024;
/// Default `upstream[].connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `upstream[].pool_idle_timeout`.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `upstream[].pool_max_idle_per_host`.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 1024;

/// `[auth.throttle]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failed logins per client address per window, default 20.
    pub max_failures_per_ip: u32,
    /// Failed logins per user name per window, default 5.
    pub max_failures_per_user: u32,
    /// The fixed window, default 15m.
    pub window: Duration,
    /// Most addresses and names tracked at once, default 100_000 (pass it to
    /// `MemoryLoginThrottle::new`); when full, logins answer 503 rather than go unthrottled.
    pub max_tracked_keys: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            max_failures_per_ip: 20,
            max_failures_per_user: 5,
            window: Duration::from_secs(15 * 60),
            max_tracked_keys: DEFAULT_THROTTLE_MAX_TRACKED_KEYS,
        }
    }
}

/// Default bound on the addresses and names the login throttle tracks.
pub const DEFAULT_THROTTLE_MAX_TRACKED_KEYS: usize = 100_000;

/// `[signing]`.
#[derive(Debug, Clone)]
pub struct SigningConfig {
    /// Keyring file (format of `countersign::keyfile`).
    pub keyring: PathBuf,
    /// Signature lifetime (`expires - created`), default 10s.
    pub window: Duration,
    /// Header carrying the user, default `x-auth-user`.
    pub user_header: HeaderName,
    /// Header carrying the roles, default `x-auth-roles`.
    pub roles_header: HeaderName,
    /// Further request headers to cover by the signature when present.
    pub extra_headers: Vec<HeaderName>,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name for logs and metrics.
    pub name: String,
    /// Path prefix routed here (starts and ends with `/`); longest prefix wins.
    pub prefix: String,
    /// Base URL: `http(s)://host[:port]`.
    pub url: Uri,
    /// Remove the prefix (keeping a leading `/`) before forwarding, default false.
    pub strip_prefix: bool,
    /// Time for the upstream to answer (response head), default 30s.
    pub timeout: Duration,
    /// Largest request body, default 1 MiB.
    pub max_body: usize,
    /// Whether a session is required, default required.
    pub auth: RouteAuth,
    /// Forward the browser's cookies (except the session cookie), default false.
    pub forward_cookies: bool,
    /// Time to establish a connection (TCP, and TLS for https), default 5s.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept, default 60s.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host (per event loop), default 1024; 0 keeps
    /// none (a new connection per request).
    pub pool_max_idle_per_host: usize,
    /// PEM bundle of extra CAs trusted for this (https) upstream besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
}

/// Whether a route needs a logged-in session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    /// No session -> 401.
    Required,
    /// Public: forwarded signed, without identity.
    None,
}

// ---------------------------------------------------------------------------------------------
// Conversion
// ---------------------------------------------------------------------------------------------

/// Checks raw values and builds checked ones, naming keys in errors.
struct Checker<'a> {
    path: &'a Path,
    base: PathBuf,
}

impl Checker<'_> {
    fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, key, problem)
    }

    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(text) => parse_positive_duration(text).map_err(|p| self.err(key, p)),
        }
    }

    fn size(
        &self,
        key: &str,
        value: Option<&RawSize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(raw) => raw.to_bytes().map_err(|p| self.err(key, p)),
        }
    }

    fn positive(
        &self,
        key: &str,
        value: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            Some(0) => Err(self.err(key, "must be greater than zero")),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    }

    fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.trim().parse().map_err(|_| {
            self.err(
                key,
                format!("invalid address {text:?} (use IP:PORT, e.g. \"127.0.0.1:8080\")"),
            )
        })
    }

    fn file_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn header_name(&self, key: &str, text: &str) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(text.trim().as_bytes())
            .map_err(|_| self.err(key, format!("{text:?} is not a valid header name")))
    }

    fn http_url(&self, key: &str, text: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = text
            .parse()
            .map_err(|_| self.err(key, format!("{text:?} is not a valid URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(self.err(key, format!("{text:?}: scheme must be http or https"))),
        }
        match uri.authority() {
            Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => Ok(uri),
            Some(_) => Err(self.err(key, format!("{text:?}: host required, no user info"))),
            None => Err(self.err(key, format!("{text:?} has no host"))),
        }
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.socket_addr("server.listen", &raw.listen)?;
        let public_origin = PublicOrigin::parse(raw.public_origin.trim())
            .map_err(|p| self.err("server.public_origin", p))?;
        let tls = match (raw.tls_cert, raw.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: self.file_path(&cert),
                key: self.file_path(&key),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.err(
                    "server.tls_key",
                    "tls_cert is set but tls_key is not (set both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(self.err(
                    "server.tls_cert",
                    "tls_key is set but tls_cert is not (set both or neither)",
                ))
            }
        };
        let max_header_bytes = self.size(
            "server.max_header_bytes",
            raw.max_header_bytes.as_ref(),
            16 * 1024,
        )?;
        if max_header_bytes < 1024 {
            return Err(self.err("server.max_header_bytes", "must be at least 1KiB"));
        }
        let max_static_file = self.size(
            "server.max_static_file",
            raw.max_static_file.as_ref(),
            super::static_files::DEFAULT_MAX_FILE_BYTES as usize,
        )?;
        if max_static_file == 0 {
            return Err(self.err("server.max_static_file", "must be greater than zero"));
        }
        if raw.max_static_file.is_some() && raw.static_dir.is_none() {
            return Err(self.err("server.max_static_file", "only used with server.static_dir"));
        }
        let max_static_file = max_static_file as u64;
        Ok(ServerConfig {
            listen,
            public_origin,
            tls,
            static_dir: raw.static_dir.map(|d| self.file_path(&d)),
            max_header_bytes,
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            request_timeout: self.duration(
                "server.request_timeout",
                raw.request_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace.as_deref(),
                Duration::from_secs(30),
            )?,
            max_connections: self.positive(
                "server.max_connections",
                raw.max_connections,
                10_000,
            )?,
            max_static_file,
            http2_max_concurrent_streams: match raw.http2_max_concurrent_streams {
                None => DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
                Some(0) => {
                    return Err(self.err(
                        "server.http2_max_concurrent_streams",
                        "must be greater than zero",
                    ))
                }
                Some(streams) => streams,
            },
        })
    }

    fn session(&self, raw: RawSession) -> Result<SessionConfig, ConfigError> {
        let defaults = SessionConfig::default();
        let mut redis = defaults.redis.clone();
        let store = match raw.store.as_deref().map(str::trim) {
            None | Some("memory") => {
                for (key, set) in [
                    ("session.redis_timeout", raw.redis_timeout.is_some()),
                    (
                        "session.redis_connect_timeout",
                        raw.redis_connect_timeout.is_some(),
                    ),
                    (
                        "session.redis_touch_interval",
                        raw.redis_touch_interval.is_some(),
                    ),
                    ("session.redis_ca_file", raw.redis_ca_file.is_some()),
                ] {
                    if set {
                        return Err(self.err(key, "only used with store = \"redis\""));
                    }
                }
                if raw.redis_url.is_some() {
                    return Err(self.err("session.redis_url", "only used with store = \"redis\""));
                }
                if raw.redis_key_prefix.is_some() {
                    return Err(self.err(
                        "session.redis_key_prefix",
                        "only used with store = \"redis\"",
                    ));
                }
                StoreKind::Memory
            }
            Some("redis") => {
                let url = raw.redis_url.ok_or_else(|| {
                    self.err("session.redis_url", "required when store = \"redis\"")
                })?;
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(self.err(
                        "session.redis_url",
                        format!(
                            "{:?} must start with redis:// or rediss://",
                            redact_url(&url)
                        ),
                    ));
                }
                redis = RedisTuning {
                    op_timeout: self.duration(
                        "session.redis_timeout",
                        raw.redis_timeout.as_deref(),
                        redis.op_timeout,
                    )?,
                    connect_timeout: self.duration(
                        "session.redis_connect_timeout",
                        raw.redis_connect_timeout.as_deref(),
                        redis.connect_timeout,
                    )?,
                    touch_interval: self.duration(
                        "session.redis_touch_interval",
                        raw.redis_touch_interval.as_deref(),
                        redis.touch_interval,
                    )?,
                    ca_file: raw
                        .redis_ca_file
                        .as_deref()
                        .map(|file| self.file_path(Path::new(file))),
                };
                if redis.ca_file.is_some() && !url.starts_with("rediss://") {
                    return Err(self.err(
                        "session.redis_ca_file",
                        "needs a rediss:// (TLS) session.redis_url",
                    ));
                }
                StoreKind::Redis {
                    url,
                    key_prefix: raw
                        .redis_key_prefix
                        .unwrap_or_else(|| "countersign:".to_owned()),
                }
            }
            Some(other) => {
                return Err(self.err(
                    "session.store",
                    format!("unknown store {other:?} (use \"memory\" or \"redis\")"),
                ))
            }
        };
        let idle_timeout = self.duration(
            "session.idle_timeout",
            raw.idle_timeout.as_deref(),
            defaults.idle_timeout,
        )?;
        let absolute_timeout = self.duration(
            "session.absolute_timeout",
            raw.absolute_timeout.as_deref(),
            defaults.absolute_timeout,
        )?;
        if absolute_timeout < idle_timeout {
            return Err(self.err(
                "session.absolute_timeout",
                format!(
                    "must be at least session.idle_timeout ({}s < {}s)",
                    absolute_timeout.as_secs(),
                    idle_timeout.as_secs()
                ),
            ));
        }
        if idle_timeout < Duration::from_secs(1) {
            return Err(self.err(
                "session.idle_timeout",
                "must be at least 1s (sessions count whole seconds)",
            ));
        }
        let cookie_name = match raw.cookie_name {
            None => defaults.cookie_name,
            Some(name) => {
                let is_token = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !is_token {
                    return Err(self.err(
                        "session.cookie_name",
                        format!(
                            "{name:?} is not a valid cookie name (letters, digits, - _ . etc.)"
                        ),
                    ));
                }
                if RESERVED_COOKIE_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    return Err(self.err(
                        "session.cookie_name",
                        "must not start with __Host- or __Secure- (the server adds __Host- over https)",
                    ));
                }
                name
            }
        };
        Ok(SessionConfig {
            store,
            idle_timeout,
            absolute_timeout,
            cookie_name,
            max_sessions: self.positive(
                "session.max_sessions",
                raw.max_sessions,
                defaults.max_sessions,
            )?,
            sweep_interval: self.duration(
                "session.sweep_interval",
                raw.sweep_interval.as_deref(),
                defaults.sweep_interval,
            )?,
            redis,
        })
    }

    fn auth(&self, raw: RawAuth) -> Result<AuthConfig, ConfigError> {
        let defaults = ThrottleConfig::default();
        let verify_url = raw
            .verify_url
            .as_deref()
            .map(|u| self.http_url("auth.verify_url", u))
            .transpose()?;
        match (&raw.users_file, &verify_url) {
            (None, None) => {
                return Err(self.err(
                    "auth.users_file",
                    "missing: set users_file (or verify_url) so logins can be checked",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "auth.verify_url",
                    "set either users_file or verify_url, not both",
                ))
            }
            _ => {}
        }
        let positive_u32 = |key: &str, value: Option<u32>, default: u32| match value {
            Some(0) => Err(self.err(key, "must be greater than zero")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let throttle = ThrottleConfig {
            max_failures_per_ip: positive_u32(
                "auth.throttle.max_failures_per_ip",
                raw.throttle.max_failures_per_ip,
                defaults.max_failures_per_ip,
            )?,
            max_failures_per_user: positive_u32(
                "auth.throttle.max_failures_per_user",
                raw.throttle.max_failures_per_user,
                defaults.max_failures_per_user,
            )?,
            window: self.duration(
                "auth.throttle.window",
                raw.throttle.window.as_deref(),
                defaults.window,
            )?,
            max_tracked_keys: self.positive(
                "auth.throttle.max_tracked_keys",
                raw.throttle.max_tracked_keys,
                defaults.max_tracked_keys,
            )?,
        };
        if raw.verify_timeout.is_some() && verify_url.is_none() {
            return Err(self.err("auth.verify_timeout", "only used with auth.verify_url"));
        }
        let max_login_body = self.size(
            "auth.max_login_body",
            raw.max_login_body.as_ref(),
            DEFAULT_MAX_LOGIN_BODY,
        )?;
        if max_login_body < MIN_LOGIN_BODY {
            return Err(self.err(
                "auth.max_login_body",
                format!("must be at least {MIN_LOGIN_BODY} bytes (a login is a name and a password in JSON)"),
            ));
        }
        let max_verify_answer = self.size(
            "auth.max_verify_answer",
            raw.max_verify_answer.as_ref(),
            DEFAULT_MAX_VERIFY_ANSWER,
        )?;
        if max_verify_answer == 0 {
            return Err(self.err("auth.max_verify_answer", "must be greater than zero"));
        }
        if raw.max_verify_answer.is_some() && verify_url.is_none() {
            return Err(self.err("auth.max_verify_answer", "only used with auth.verify_url"));
        }
        Ok(AuthConfig {
            users_file: raw.users_file.map(|p| self.file_path(&p)),
            max_username_bytes: self.positive(
                "auth.max_username_bytes",
                raw.max_username_bytes,
                DEFAULT_MAX_USERNAME_BYTES,
            )?,
            max_verify_answer,
            verify_timeout: self.duration(
                "auth.verify_timeout",
                raw.verify_timeout.as_deref(),
                DEFAULT_VERIFY_TIMEOUT,
            )?,
            max_login_body,
            verify_url,
            throttle,
            max_concurrent_password_checks: self.positive(
                "auth.max_concurrent_password_checks",
                raw.max_concurrent_password_checks,
                super::users::default_max_concurrent_checks(),
            )?,
        })
    }

    fn signing(&self, raw: RawSigning) -> Result<SigningConfig, ConfigError> {
        let user_header = match raw.user_header {
            Some(h) => self.header_name("signing.user_header", &h)?,
            None => HeaderName::from_static("x-auth-user"),
        };
        let roles_header = match raw.roles_header {
            Some(h) => self.header_name("signing.roles_header", &h)?,
            None => HeaderName::from_static("x-auth-roles"),
        };
        if user_header == roles_header {
            return Err(self.err(
                "signing.roles_header",
                "must differ from signing.user_header",
            ));
        }
        let mut extra_headers = Vec::with_capacity(raw.extra_headers.len());
        for (i, text) in raw.extra_headers.iter().enumerate() {
            let key = format!("signing.extra_headers[{i}]");
            let name = self.header_name(&key, text)?;
            if extra_headers.contains(&name) {
                return Err(self.err(key, format!("duplicate header {text:?}")));
            }
            extra_headers.push(name);
        }
        Ok(SigningConfig {
            keyring: self.file_path(&raw.keyring),
            window: self.duration(
                "signing.window",
                raw.window.as_deref(),
                Duration::from_secs(10),
            )?,
            user_header,
            roles_header,
            extra_headers,
        })
    }

    fn upstream(&self, i: usize, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let key = |field: &str| format!("upstream[{i}].{field}");
        let name = raw.name.trim().to_owned();
        if name.is_empty() {
            return Err(self.err(key("name"), "must not be empty"));
        }
        let prefix = raw.prefix;
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(self.err(
                key("prefix"),
                format!("{prefix:?} must start and end with \"/\" (e.g. \"/api/\")"),
            ));
        }
        if prefix.contains("//") || prefix.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(self.err(
                key("prefix"),
                format!("{prefix:?} is not a normalised path"),
            ));
        }
        if prefix
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
        {
            return Err(self.err(
                key("prefix"),
                format!("{prefix:?} contains characters not allowed in a path"),
            ));
        }
        if prefix.starts_with(RESERVED_PREFIX) {
            return Err(self.err(
                key("prefix"),
                format!("{prefix:?} is under {RESERVED_PREFIX}, which the proxy answers itself"),
            ));
        }
        let url = self.http_url(&key("url"), raw.url.trim())?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(self.err(
                key("url"),
                format!(
                    "{:?} must be scheme://host[:port] without a path or query",
                    raw.url
                ),
            ));
        }
        let auth = match raw.auth.as_deref().map(str::trim) {
            None | Some("required") => RouteAuth::Required,
            Some("none") => RouteAuth::None,
            Some(other) => {
                return Err(self.err(
                    key("auth"),
                    format!("{other:?} (use \"required\" or \"none\")"),
                ))
            }
        };
        if raw.ca_file.is_some() && url.scheme_str() != Some("https") {
            return Err(self.err(key("ca_file"), "only used with an https:// url"));
        }
        Ok(UpstreamConfig {
            connect_timeout: self.duration(
                &key("connect_timeout"),
                raw.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            pool_idle_timeout: self.duration(
                &key("pool_idle_timeout"),
                raw.pool_idle_timeout.as_deref(),
                DEFAULT_POOL_IDLE_TIMEOUT,
            )?,
            pool_max_idle_per_host: raw
                .pool_max_idle_per_host
                .unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
            ca_file: raw.ca_file.map(|f| self.file_path(&f)),
            name,
            prefix,
            url,
            strip_prefix: raw.strip_prefix,
            timeout: self.duration(
                &key("timeout"),
                raw.timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            max_body: self.size(&key("max_body"), raw.max_body.as_ref(), 1024 * 1024)?,
            auth,
            forward_cookies: raw.forward_cookies,
        })
    }
}

impl TryFrom<(RawConfig, &Path)> for ProxyConfig {
    type Error = ConfigError;

    fn try_from((raw, path): (RawConfig, &Path)) -> Result<Self, ConfigError> {
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let checker = Checker { path, base };
        let server = checker.server(raw.server)?;
        let admin = AdminConfig {
            listen: raw
                .admin
                .listen
                .as_deref()
                .map(|a| checker.socket_addr("admin.listen", a))
                .transpose()?,
            max_connections: checker.positive(
                "admin.max_connections",
                raw.admin.max_connections,
                DEFAULT_ADMIN_MAX_CONNECTIONS,
            )?,
        };
        if raw.admin.max_connections.is_some() && admin.listen.is_none() {
            return Err(checker.err("admin.max_connections", "only used with admin.listen"));
        }
        if let Some(admin_listen) = admin.listen {
            if admin_listen == server.listen && admin_listen.port() != 0 {
                return Err(checker.err("admin.listen", "must differ from server.listen"));
            }
        }
        let session = checker.session(raw.session)?;
        let auth = checker.auth(raw.auth)?;
        let signing = checker.signing(raw.signing)?;
        if raw.upstream.is_empty() {
            return Err(checker.err("upstream", "missing: at least one [[upstream]] is required"));
        }
        let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstream.len());
        for (i, raw_upstream) in raw.upstream.into_iter().enumerate() {
            let upstream = checker.upstream(i, raw_upstream)?;
            if let Some(j) = upstreams.iter().position(|u| u.name == upstream.name) {
                return Err(checker.err(
                    format!("upstream[{i}].name"),
                    format!(
                        "duplicate upstream name {:?} (also upstream[{j}])",
                        upstream.name
                    ),
                ));
            }
            if let Some(j) = upstreams.iter().position(|u| u.prefix == upstream.prefix) {
                return Err(checker.err(
                    format!("upstream[{i}].prefix"),
                    format!(
                        "duplicate prefix {:?} (also upstream[{j}])",
                        upstream.prefix
                    ),
                ));
            }
            upstreams.push(upstream);
        }
        Ok(ProxyConfig {
            source: path.to_path_buf(),
            server,
            admin,
            session,
            auth,
            signing,
            upstreams,
        })
    }
}

impl ProxyConfig {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = read_text_file(path, "config file")?;
        Self::parse(&text, path)
    }

    /// Checks config `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<ProxyConfig, ConfigError> {
        let raw: RawConfig = deserialize_toml(text, path)?;
        ProxyConfig::try_from((raw, path))
    }

    /// Loads the keyring named by `signing.keyring`.
    pub fn load_keyring(&self) -> Result<Keyring, ConfigError> {
        crate::keyfile::load_keyring(&self.signing.keyring)
            .map_err(|e| ConfigError::new(e.file(), e.key().unwrap_or(""), e.problem().to_owned()))
    }

    /// Loads the users file named by `auth.users_file`, if one is configured.
    pub fn load_users(&self) -> Result<Option<UserDb>, ConfigError> {
        self.auth
            .users_file
            .as_deref()
            .map(UserDb::load)
            .transpose()
    }

    /// Everything `check-config` verifies beyond the file itself: the keyring and the users
    /// file load, the TLS files can be read, `static_dir` is a folder.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        self.load_keyring()?;
        self.load_users()?;
        if let Some(tls) = &self.server.tls {
            for (key, file) in [("server.tls_cert", &tls.cert), ("server.tls_key", &tls.key)] {
                std::fs::File::open(file).map_err(|e| {
                    ConfigError::new(
                        &self.source,
                        key,
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
            }
        }
        if let Some(dir) = &self.server.static_dir {
            if !dir.is_dir() {
                return Err(ConfigError::new(
                    &self.source,
                    "server.static_dir",
                    format!("{} is not a folder", dir.display()),
                ));
            }
        }
        Ok(())
    }

    /// The upstream whose prefix is the longest one matching `path`.
    pub fn route(&self, path: &str) -> Option<&UpstreamConfig> {
        self.upstreams
            .iter()
            .filter(|u| path.starts_with(&u.prefix) || path == u.prefix.trim_end_matches('/'))
            .max_by_key(|u| u.prefix.len())
    }
}

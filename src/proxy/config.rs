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

use super::client_address::{canonical_net, TrustedProxies};
use super::forward::{ClientCert, ClientCertError, ClientCertFile};
pub use super::response_headers::ResponseHeaderRules;
pub use super::session_redis::{RedisTuning, SentinelTuning};
use super::users::{HashLimits, UserDb, DEFAULT_MAX_PASSWORD_BYTES, MAX_PASSWORD_BYTES_LIMIT};
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

/// Reads a small text file (at most 1 MiB), with errors that name it.
pub(crate) fn read_text_file(path: &Path, what: &str) -> Result<String, ConfigError> {
    read_text_file_within(path, what, MAX_CONFIG_FILE_BYTES)
}

/// Reads a text file of at most `max` bytes, with errors that name it.
pub(crate) fn read_text_file_within(
    path: &Path,
    what: &str,
    max: u64,
) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let unreadable =
        |e: std::io::Error| ConfigError::new(path, "", format!("cannot read {what}: {e}"));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let too_large = || ConfigError::new(path, "", format!("{what} is larger than {max} bytes"));
    // Before reading: read to the limit, a large binary file (a wrong path) would be reported
    // as "stream did not contain valid UTF-8".
    if file.metadata().is_ok_and(|m| m.len() > max) {
        return Err(too_large());
    }
    let mut text = String::new();
    let read = file
        .take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if read as u64 > max {
        return Err(too_large());
    }
    Ok(text)
}

/// A CA certificate file (PEM: `session.redis_ca_file`, the CLI's `--replay-redis-ca`), read
/// as every file the config names is, at most 1 MiB; the error names the file. Without the
/// bound a path naming a device (`/dev/zero`) or a huge file was read until memory ran out and
/// the process aborted, `check-config` included.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    read_text_file(path, "CA file")
        .map(String::into_bytes)
        .map_err(|e| format!("{}: {}", path.display(), e.problem()))
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
        // One line: the TOML parser's messages can span several ("invalid string\nexpected
        // `\"`"). Without the value a type error quotes: it may be a password written without
        // quotes, or under the wrong key.
        let message =
            crate::keyfile::without_quoted_value(&crate::keyfile::one_line(inner.message()));
        // For an unknown or missing key the path names the table; the key is in the message.
        let key = match unknown_field(&message) {
            Some(field) if key.is_empty() => field.to_owned(),
            Some(field) if key != field && !key.ends_with(&format!(".{field}")) => {
                format!("{key}.{field}")
            }
            _ => key,
        };
        let message = match type_hint(&message, &key) {
            Some(hint) => format!("{message} ({hint})"),
            None => message,
        };
        // Bytes, not str slicing: a span off a char boundary must not panic.
        let line_of = |offset: usize| {
            let before = &text.as_bytes()[..offset.min(text.len())];
            before.iter().filter(|&&b| b == b'\n').count() + 1
        };
        let (key, problem) = match (inner.span(), key.is_empty()) {
            (Some(span), true) => {
                // A value the TOML parser itself refused (a number too large, a malformed
                // string) comes with a span but no key path: name the key from the text.
                let key = key_at(text, span.start).unwrap_or_default();
                (key, format!("line {}: {message}", line_of(span.start)))
            }
            // A value of the wrong type: the line too, as for a syntax error.
            (Some(span), false) => (key, format!("line {}: {message}", line_of(span.start))),
            (None, _) => (key, message),
        };
        ConfigError::new(path, key, problem)
    })
}

/// What to write instead, for the type errors a hand-written file makes most (serde's messages
/// name Rust types: "expected u32", "expected a sequence").
fn type_hint(message: &str, key: &str) -> Option<String> {
    let expects_number = ["u8", "u16", "u32", "u64", "usize", "i64", "an integer"]
        .iter()
        .any(|ty| message.ends_with(&format!("expected {ty}")));
    if message.starts_with("invalid type: map, expected a sequence") {
        Some(format!(
            "a table where an array of tables is expected: write [[{key}]], with two brackets"
        ))
    } else if message.starts_with("invalid type: string") && expects_number {
        Some("a number: write it without quotes".to_owned())
    } else if message.starts_with("invalid type: integer") && message.ends_with("a string") {
        Some("write it in quotes: a duration as \"30m\", a path or a URL as a string".to_owned())
    } else {
        None
    }
}

/// The key whose value holds byte `offset` of TOML `text` (`server.max_connections`,
/// `upstream[1].timeout`), for parser errors that have a span but no key path.
///
/// Best effort and conservative: `None` unless the offset is in the value of a one-line
/// `key = value` whose key is bare (`a`, `a.b`), under table headers that are bare too, with
/// nothing before it (a multi-line string, array or inline table; a quoted name) that this
/// line-by-line reading could misplace. A wrong key would mislead more than none.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    // The current table as a key path (`upstream[1]`); `None` after a header not understood.
    let mut table: Option<String> = Some(String::new());
    // Arrays of tables seen so far (`upstream`, by resolved path) and their lengths.
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let line_end = line_start + line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        if offset < line_end || line_end == text.len() {
            let eq = content.find('=')?;
            if offset <= line_start + eq {
                return None;
            }
            let key = bare_key(&content[..eq])?.join(".");
            return match table? {
                t if t.is_empty() => Some(key),
                t => Some(format!("{t}.{key}")),
            };
        }
        let trimmed = content.trim();
        if let Some(rest) = trimmed.strip_prefix("[[") {
            table = rest
                .split_once("]]")
                .filter(|(_, after)| after.trim().is_empty() || after.trim().starts_with('#'))
                .and_then(|(name, _)| bare_key(name))
                .map(|segments| resolve_table(&segments, &mut arrays, true));
        } else if let Some(rest) = trimmed.strip_prefix('[') {
            table = rest
                .split_once(']')
                .filter(|(_, after)| after.trim().is_empty() || after.trim().starts_with('#'))
                .and_then(|(name, _)| bare_key(name))
                .map(|segments| resolve_table(&segments, &mut arrays, false));
        } else if !trimmed.is_empty() && !trimmed.starts_with('#') && !one_line_value(trimmed) {
            // Lines after a multi-line value cannot be read one by one.
            return None;
        }
        line_start = line_end;
    }
    None
}

/// The segments of a bare (dotted) TOML key (`a`, `a.b`, `a . b`), or `None` for anything else
/// (quoted keys, empty segments).
fn bare_key(text: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = text.split('.').map(str::trim).collect();
    let bare = |s: &&str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    segments.iter().all(bare).then_some(segments)
}

/// The key path of a table header's segments: a segment naming an array of tables gets the
/// index of its last element (`upstream[1]`); `[[x]]` first appends an element to `x`.
fn resolve_table(
    segments: &[&str],
    arrays: &mut std::collections::HashMap<String, usize>,
    array_header: bool,
) -> String {
    let mut path = String::new();
    for (i, segment) in segments.iter().enumerate() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(segment);
        if array_header && i + 1 == segments.len() {
            *arrays.entry(path.clone()).or_insert(0) += 1;
        }
        if let Some(&len) = arrays.get(&path) {
            path = format!("{path}[{}]", len.saturating_sub(1));
        }
    }
    path
}

/// Whether a `key = value` line's value ends on that line: brackets and braces outside
/// strings balance and no multi-line string starts.
fn one_line_value(line: &str) -> bool {
    if line.contains("\"\"\"") || line.contains("'''") {
        return false;
    }
    let mut depth = 0i64;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for b in line.bytes() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if b == b'\\' && q == b'"' {
                    escaped = true;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'"' | b'\'' => quote = Some(b),
                b'#' => break,
                b'[' | b'{' => depth += 1,
                b']' | b'}' => depth -= 1,
                _ => {}
            },
        }
    }
    depth == 0 && quote.is_none()
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

/// Appends to `out` the key paths (below `prefix`) whose values differ between two parsed
/// config files, in key order: a key added or removed counts, a table is compared key by key
/// (one added or removed names its keys), an array of tables (`[[upstream]]`) entry by entry,
/// any other array as one value.
fn changed_keys(prefix: &str, before: &toml::Table, after: &toml::Table, out: &mut Vec<String>) {
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let path = key_path(prefix, name);
        match (before.get(name), after.get(name)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                changed_keys(&path, a, b, out);
            }
            // A table added or removed: its keys, each a setting of its own.
            (Some(toml::Value::Table(a)), None) => changed_keys(&path, a, &toml::Table::new(), out),
            (None, Some(toml::Value::Table(b))) => changed_keys(&path, &toml::Table::new(), b, out),
            (Some(toml::Value::Array(a)), Some(toml::Value::Array(b)))
                if a.iter().chain(b).all(toml::Value::is_table) =>
            {
                for i in 0..a.len().max(b.len()) {
                    let entry = format!("{path}[{i}]");
                    match (a.get(i), b.get(i)) {
                        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                            changed_keys(&entry, x, y, out);
                        }
                        _ => out.push(entry),
                    }
                }
            }
            (a, b) if a != b => out.push(path),
            _ => {}
        }
    }
}

/// `prefix.name`, the name quoted when it is not a bare TOML key (a header name with a dot).
fn key_path(prefix: &str, name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let name = if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}.{name}")
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

/// Longest duration a config key or a duration flag takes: 365 days.
///
/// Why a bound at all: durations are added to clock readings (`Instant + d` panics on
/// overflow: `header_read_timeout = "213503982334601d"` made every connection panic), and
/// nothing the proxy times (a request, a session, a throttle window, a signature) is meant to
/// last a year. No key needs more; one that did would get its own documented bound.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Shortest `server.reload_check_interval`: 1 second. Why: each check reads and hashes every
/// file a reload reads; more often than this costs CPU and buys nothing (a kubelet refreshes
/// a Secret volume about once a minute, a renewal tool writes files once in weeks).
pub const MIN_RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Parses a duration that must be positive and at most [`MAX_DURATION`] (`"off"` is not
/// allowed here): what every duration key of the config takes, and the CLI's duration flags
/// too, so both say the same. Surrounding spaces are ignored, as for every value parsed from
/// text (sizes, addresses, URLs, header names).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (use e.g. \"30m\"; units ms, s, m, h, d)");
    match crate::keyfile::parse_duration(text) {
        Ok(Some(d)) if d > MAX_DURATION => {
            Err(format!("{text:?} is longer than the maximum of 365d"))
        }
        Ok(Some(d)) if d > Duration::ZERO => Ok(d),
        Ok(Some(_)) => Err(format!("{text:?}: must be greater than zero")),
        Ok(None) => Err(format!("{text:?}: \"off\" is not allowed here")),
        Err(_) => Err(invalid()),
    }
}

/// [`parse_positive_duration`] for a setting used in whole seconds (signature times, session
/// and throttle expiry are unix seconds): `"1500ms"` would silently become 1s and `"500ms"` 0s,
/// so both are errors. Also the value parser of the CLI's flags for such settings.
pub fn parse_whole_seconds(text: &str) -> Result<Duration, String> {
    let duration = parse_positive_duration(text)?;
    if duration.subsec_nanos() != 0 {
        return Err(format!(
            "{text:?}: must be a whole number of seconds, at least \"1s\" (this setting counts whole seconds)"
        ));
    }
    Ok(duration)
}

/// A size given as a TOML integer (bytes) or a string (`"1MiB"`).
#[derive(Debug, Clone)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum answers every wrong value with
/// "data did not match any variant of untagged enum RawSize"; this says what a size is.
impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl serde::de::Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_FORMS)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawSize, E> {
                u64::try_from(n)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom(format!("{n} is negative: expected {SIZE_FORMS}")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(s.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// What a size key takes, for messages.
const SIZE_FORMS: &str = "a size: a number of bytes (2048) or a string such as \"16KiB\"";

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
    max_body_memory: Option<RawSize>,
    max_body_memory_per_client: Option<RawSize>,
    send_timeout: Option<String>,
    shutdown_grace: Option<String>,
    max_connections: Option<usize>,
    websocket_max_open: Option<usize>,
    websocket_max_open_per_user: Option<usize>,
    max_static_file: Option<RawSize>,
    static_cache_size: Option<RawSize>,
    static_immutable: Option<Vec<String>>,
    http2_max_concurrent_streams: Option<u32>,
    http2_idle_timeout: Option<String>,
    http2_max_reset_streams: Option<usize>,
    max_header_count: Option<usize>,
    http1_half_close: Option<bool>,
    reload_check_interval: Option<String>,
    log_queue_lines: Option<usize>,
    /// Header name (as written) → value; an empty value removes a default.
    response_headers: Option<std::collections::BTreeMap<String, String>>,
    response_headers_on_upstream: Option<bool>,
    max_response_header_value_bytes: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    client_address_header: Option<String>,
    client_address_max_hops: Option<usize>,
    proxy_protocol: Option<bool>,
    proxy_protocol_max_bytes: Option<RawSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    max_connections: Option<usize>,
    allowed_hosts: Option<Vec<String>>,
    readiness_probe_timeout: Option<String>,
    readiness_cache: Option<String>,
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
    redis_sentinels: Option<Vec<String>>,
    redis_sentinel_master: Option<String>,
    redis_sentinel_password: Option<String>,
    redis_sentinel_tls: Option<bool>,
    redis_cluster_nodes: Option<Vec<String>>,
    idle_timeout: Option<String>,
    absolute_timeout: Option<String>,
    cookie_name: Option<String>,
    max_session_cookies: Option<usize>,
    max_sessions: Option<usize>,
    max_sessions_per_user: Option<usize>,
    sweep_interval: Option<String>,
    snapshot_file: Option<PathBuf>,
    snapshot_lock_wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: Option<PathBuf>,
    max_users_file: Option<RawSize>,
    verify_url: Option<String>,
    max_concurrent_password_checks: Option<usize>,
    verify_timeout: Option<String>,
    max_login_body: Option<RawSize>,
    max_username_bytes: Option<usize>,
    max_password_bytes: Option<usize>,
    max_verify_answer: Option<RawSize>,
    max_verify_answer_header_bytes: Option<RawSize>,
    max_verify_answer_header_count: Option<usize>,
    verify_client_cert_file: Option<PathBuf>,
    verify_client_key_file: Option<PathBuf>,
    verify_ca_file: Option<PathBuf>,
    verify_pool_max_lifetime: Option<String>,
    verify_pool_max_idle: Option<usize>,
    verify_pool_idle_timeout: Option<String>,
    max_hash_memory: Option<RawSize>,
    max_hash_iterations: Option<u32>,
    max_hash_parallelism: Option<u32>,
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
    cross_origin_redirects: Option<String>,
    connect_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
    pool_max_lifetime: Option<String>,
    pool_stale_after: Option<String>,
    body_idle_timeout: Option<String>,
    max_response_header_count: Option<usize>,
    max_response_header_bytes: Option<RawSize>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default = "required_for_ready_by_default")]
    required_for_ready: bool,
    #[serde(default)]
    websocket: bool,
    websocket_idle_timeout: Option<String>,
    websocket_session_check: Option<String>,
    websocket_max_open: Option<usize>,
    websocket_close_timeout: Option<String>,
    websocket_max_refusal_body: Option<RawSize>,
}

/// Default `upstream[].required_for_ready`: true, as before the key existed (an upgrade does
/// not change what a balancer sees), and failing safe: an operator opts an upstream out.
fn required_for_ready_by_default() -> bool {
    true
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
    /// The file's contents as this config was read from them: what a reload compares the
    /// file with ([`ProxyConfig::compare_with_file`]).
    pub as_loaded: LoadedText,
}

/// A config file's contents as parsed TOML (not checked), kept to tell later which keys of the
/// file changed. Not shown by `Debug`: the text can hold a Redis password.
#[derive(Clone, Default)]
pub struct LoadedText(Option<std::sync::Arc<toml::Table>>);

impl fmt::Debug for LoadedText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "LoadedText(..)"
        } else {
            "LoadedText(none)"
        })
    }
}

impl LoadedText {
    /// These contents with the [live keys](LIVE_KEYS) as `now` has them (set, or removed when
    /// `now` lacks them): what a running proxy runs on once a reload applied `now`'s live
    /// settings, so that the next comparison names only what still differs. Unchanged when
    /// either side was not read from a file.
    pub fn with_live_keys_from(&self, now: &LoadedText) -> LoadedText {
        self.with_keys_from(now, &LIVE_KEYS)
    }

    /// [`LoadedText::with_live_keys_from`] for some of the [`LIVE_KEYS`] only (`keys`, dotted
    /// paths of bare names: those a reload applied).
    pub fn with_keys_from(&self, now: &LoadedText, keys: &[&str]) -> LoadedText {
        let (Some(running), Some(now)) = (&self.0, &now.0) else {
            return self.clone();
        };
        let mut running = toml::Table::clone(running);
        for key in keys {
            let path: Vec<&str> = key.split('.').collect();
            let Some((name, tables)) = path.split_last() else {
                continue;
            };
            let value = tables
                .iter()
                .try_fold(&**now, |table, name| table_below(table, name))
                .and_then(|section| section.get(*name))
                .cloned();
            match value {
                Some(value) => {
                    // The tables on the way, made where missing (an entry of an array of
                    // tables, `upstream[1]`, is never made: only one both sides have is set).
                    let mut section = Some(&mut running);
                    for table in tables {
                        section = section.and_then(|s| match array_entry(table) {
                            Some((array, i)) => {
                                s.get_mut(array)?.as_array_mut()?.get_mut(i)?.as_table_mut()
                            }
                            None => s
                                .entry(*table)
                                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                                .as_table_mut(),
                        });
                    }
                    if let Some(section) = section {
                        section.insert((*name).to_owned(), value);
                    }
                }
                None => {
                    let section = tables.iter().try_fold(&mut running, |table, name| {
                        match array_entry(name) {
                            Some((array, i)) => table
                                .get_mut(array)?
                                .as_array_mut()?
                                .get_mut(i)?
                                .as_table_mut(),
                            None => table.get_mut(*name)?.as_table_mut(),
                        }
                    });
                    if let Some(section) = section {
                        section.remove(*name);
                    }
                }
            }
        }
        LoadedText(Some(std::sync::Arc::new(running)))
    }
}

/// `name[3]` as the array name and the index (a segment of a key path such as
/// `upstream[3].timeout`), else None.
fn array_entry(segment: &str) -> Option<(&str, usize)> {
    let (name, rest) = segment.split_once('[')?;
    Some((name, rest.strip_suffix(']')?.parse().ok()?))
}

/// The value at `key` (a key path of bare names: `upstream[0].pool_idle_timeout`) in `table`.
fn value_at<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let path: Vec<&str> = key.split('.').collect();
    let (name, tables) = path.split_last()?;
    (tables.iter())
        .try_fold(table, |table, name| table_below(table, name))?
        .get(*name)
}

/// The table `segment` (a name, or an array entry `upstream[3]`) of `table`.
fn table_below<'a>(table: &'a toml::Table, segment: &str) -> Option<&'a toml::Table> {
    match array_entry(segment) {
        Some((array, i)) => table.get(array)?.as_array()?.get(i)?.as_table(),
        None => table.get(segment)?.as_table(),
    }
}

/// The settings a running proxy takes from an edited, valid config file on reload (SIGHUP,
/// or a file change with `server.reload_check_interval`): each is read per answer (the
/// headers), per login attempt (the throttle's limits), per request, per connection accepted
/// or made (the [`LIVE_CONNECTION_KEYS`], the [`LIVE_CONNECTION_LIMIT_KEYS`], an upstream's
/// `connect_timeout`: open ones keep theirs) or when a shutdown starts, needs no socket bound,
/// and is swapped whole for every event loop. Every other key waits for a restart.
/// `section.key`, each covering the keys below it: the [`LIVE_HEADER_KEYS`], the
/// [`LIVE_THROTTLE_KEYS`], the [`LIVE_SESSION_KEYS`], the [`LIVE_STATIC_KEYS`],
/// [`LIVE_WEBSOCKET_KEYS`], the [`LIVE_SERVER_KEYS`], the [`LIVE_CONNECTION_LIMIT_KEYS`] and
/// the [`LIVE_ADMIN_KEYS`]. Besides these, each `[[upstream]]`'s [`LIVE_UPSTREAM_KEYS`]
/// (`upstream[i].timeout`, ...) and [`LIVE_UPSTREAM_WEBSOCKET_KEYS`].
pub const LIVE_KEYS: [&str; 33] = [
    LIVE_HEADER_KEYS[0],
    LIVE_HEADER_KEYS[1],
    LIVE_HEADER_KEYS[2],
    LIVE_THROTTLE_KEYS[0],
    LIVE_THROTTLE_KEYS[1],
    LIVE_THROTTLE_KEYS[2],
    LIVE_THROTTLE_KEYS[3],
    LIVE_SESSION_KEYS[0],
    LIVE_SESSION_KEYS[1],
    LIVE_SESSION_KEYS[2],
    LIVE_STATIC_KEYS[0],
    LIVE_STATIC_KEYS[1],
    LIVE_STATIC_KEYS[2],
    LIVE_WEBSOCKET_KEYS[0],
    LIVE_WEBSOCKET_KEYS[1],
    LIVE_SERVER_KEYS[0],
    LIVE_SERVER_KEYS[1],
    LIVE_SERVER_KEYS[2],
    LIVE_SERVER_KEYS[3],
    LIVE_SERVER_KEYS[4],
    LIVE_SERVER_KEYS[5],
    LIVE_SERVER_KEYS[6],
    LIVE_SERVER_KEYS[7],
    LIVE_SERVER_KEYS[8],
    LIVE_SERVER_KEYS[9],
    LIVE_SERVER_KEYS[10],
    LIVE_SERVER_KEYS[11],
    LIVE_SERVER_KEYS[12],
    LIVE_SERVER_KEYS[13],
    LIVE_SERVER_KEYS[14],
    LIVE_CONNECTION_LIMIT_KEYS[0],
    LIVE_CONNECTION_LIMIT_KEYS[1],
    LIVE_ADMIN_KEYS[0],
];

/// The [`LIVE_KEYS`] of the server's own timeouts and header limits: applied together
/// (`server::LiveServerSettings`). `request_timeout` is read per request (a request
/// that starts after the reload has the new value), `shutdown_grace` when a shutdown starts,
/// `max_body_memory` and `max_body_memory_per_client` whenever a body takes more (bodies being
/// read keep what they hold); the [`LIVE_CONNECTION_KEYS`] when a connection is accepted.
pub const LIVE_SERVER_KEYS: [&str; 15] = [
    "server.request_timeout",
    "server.shutdown_grace",
    "server.max_body_memory",
    "server.max_body_memory_per_client",
    LIVE_CONNECTION_KEYS[0],
    LIVE_CONNECTION_KEYS[1],
    LIVE_CONNECTION_KEYS[2],
    LIVE_CONNECTION_KEYS[3],
    LIVE_CONNECTION_KEYS[4],
    LIVE_CONNECTION_KEYS[5],
    LIVE_CONNECTION_KEYS[6],
    LIVE_CONNECTION_KEYS[7],
    LIVE_CONNECTION_KEYS[8],
    LIVE_CONNECTION_KEYS[9],
    LIVE_CONNECTION_KEYS[10],
];

/// The [`LIVE_SERVER_KEYS`] a connection reads once, when it is accepted (the timeouts, and
/// the head and stream limits set in its hyper builder): a reload applies them to the
/// connections accepted from then on; those already open keep the values they started with
/// (HTTP/2 and WebSocket connections can stay open for hours). `trusted_proxies` and
/// `client_address_header` too: whether the other end is a trusted balancer is settled when
/// its connection is accepted.
pub const LIVE_CONNECTION_KEYS: [&str; 11] = [
    "server.header_read_timeout",
    "server.send_timeout",
    "server.http2_idle_timeout",
    "server.max_header_bytes",
    "server.max_header_count",
    "server.http2_max_concurrent_streams",
    "server.http1_half_close",
    "server.http2_max_reset_streams",
    "server.trusted_proxies",
    "server.client_address_header",
    "server.client_address_max_hops",
];

/// The [`LIVE_KEYS`] of the listeners' connection limits, each on its own
/// (`server::ConnectionLimit`): counted when a connection is accepted. Raised, more
/// are admitted at once; lowered, no open connection is closed: new ones are refused until
/// fewer than the new limit are open. Each applies only while its listener's `listen`
/// (`server.listen`, `admin.listen`) is the one running.
pub const LIVE_CONNECTION_LIMIT_KEYS: [&str; 2] =
    ["server.max_connections", "admin.max_connections"];

/// The [`LIVE_KEYS`] of the admin listener's host names, read per admin request: a reload
/// applies them to the next request, while `admin.listen` is the one running.
pub const LIVE_ADMIN_KEYS: [&str; 1] = ["admin.allowed_hosts"];

/// The [`LIVE_KEYS`] of the proxy-wide WebSocket limits: applied together, counted at each
/// handshake (`websocket::Registry`), nothing built from them.
pub const LIVE_WEBSOCKET_KEYS: [&str; 2] = [
    "server.websocket_max_open",
    "server.websocket_max_open_per_user",
];

/// The [`LIVE_KEYS`] of the session store: applied together, the lifetimes to the sessions
/// already issued too ([`super::session::SessionStore::set_timeouts`]), the per-user cap to
/// the logins from then on ([`super::session::SessionStore::set_max_sessions_per_user`]).
pub const LIVE_SESSION_KEYS: [&str; 3] = [
    "session.idle_timeout",
    "session.absolute_timeout",
    "session.max_sessions_per_user",
];

/// The [`LIVE_KEYS`] of `static_dir`'s limits: applied together, only while `static_dir` is
/// the one running ([`super::static_files::StaticDir::set_limits`]).
pub const LIVE_STATIC_KEYS: [&str; 3] = [
    "server.max_static_file",
    "server.static_cache_size",
    "server.static_immutable",
];

/// The live keys of each `[[upstream]]` (below `upstream[i].`): applied together, for the
/// requests that start after the reload (`connect_timeout`: for the upstream connections made
/// after it; pooled ones stay as they are), only while that upstream's `name` and `prefix` are
/// the ones running ([`super::forward::LiveRouteLimits`]).
pub const LIVE_UPSTREAM_KEYS: [&str; 4] = [
    "timeout",
    "max_body",
    "body_idle_timeout",
    "connect_timeout",
];

/// The live WebSocket limits of each `[[upstream]]` (below `upstream[i].`): applied together
/// (`websocket_max_open` and `websocket_max_refusal_body` to the handshakes that start after
/// the reload, the three timeouts to the WebSockets open already too), only while that
/// upstream's `name` and `prefix` are the ones running and it had and has `websocket = true`
/// ([`super::forward::WebSocketRoute::set_limits`]).
pub const LIVE_UPSTREAM_WEBSOCKET_KEYS: [&str; 5] = [
    "websocket_idle_timeout",
    "websocket_session_check",
    "websocket_max_open",
    "websocket_close_timeout",
    "websocket_max_refusal_body",
];

/// The upstream (`i` of `upstream[i]`) and the entry of [`LIVE_UPSTREAM_KEYS`] or
/// [`LIVE_UPSTREAM_WEBSOCKET_KEYS`] that `key` is, if it is one.
pub fn live_upstream_key_of(key: &str) -> Option<(usize, &'static str)> {
    let (entry, name) = key.split_once('.')?;
    let ("upstream", i) = array_entry(entry)? else {
        return None;
    };
    (LIVE_UPSTREAM_KEYS.into_iter())
        .chain(LIVE_UPSTREAM_WEBSOCKET_KEYS)
        .find(|live| *live == name)
        .map(|live| (i, live))
}

/// The [`LIVE_KEYS`] of the response headers: applied together, only while
/// `server.public_origin`'s scheme is the one running (HSTS depends on it).
pub const LIVE_HEADER_KEYS: [&str; 3] = [
    "server.response_headers",
    "server.response_headers_on_upstream",
    "server.max_response_header_value_bytes",
];

/// The [`LIVE_KEYS`] of the login throttle (`[auth.throttle]`, all of it): applied together
/// ([`super::throttle::LoginThrottle::set_limits`]).
pub const LIVE_THROTTLE_KEYS: [&str; 4] = [
    "auth.throttle.max_failures_per_ip",
    "auth.throttle.max_failures_per_user",
    "auth.throttle.window",
    "auth.throttle.max_tracked_keys",
];

/// Whether a key path of [`ConfigFileNow::Changed`] is one of the [`LIVE_KEYS`] or below one
/// (`server.response_headers.content-security-policy`).
pub fn is_live_key(key: &str) -> bool {
    live_key_of(key).is_some() || live_upstream_key_of(key).is_some()
}

/// The entry of the [`LIVE_KEYS`] that `key` (a key path of [`ConfigFileNow::Changed`]) is or
/// is below, if any.
pub fn live_key_of(key: &str) -> Option<&'static str> {
    LIVE_KEYS.into_iter().find(|live| {
        key.strip_prefix(live)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// The config file now, against the config running ([`ProxyConfig::compare_with_file`]).
#[derive(Debug)]
pub enum ConfigFileNow {
    /// The same settings (comments and layout aside, and keys waiting for a restart that
    /// mean what runs: a default written out, a value spelled another way), or a config not
    /// read from a file.
    Unchanged,
    /// A valid file with some keys changed, added or removed.
    Changed(ChangedFile),
    /// A file that would not start the proxy: unreadable, or failing a check.
    Invalid(ConfigError),
}

/// A valid config file that differs from the settings running ([`ConfigFileNow::Changed`]).
#[derive(Debug)]
pub struct ChangedFile {
    /// The keys that differ, in key order (key paths as errors name them: `server.max_body`,
    /// `upstream[1].timeout`; never the values): every live key whose text differs, and the
    /// keys waiting for a restart whose settings differ.
    pub keys: Vec<String>,
    /// The file as it is now, checked as `run` checks it (without the files it names).
    pub now: Box<ProxyConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
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
    /// Bytes all request bodies being read or held for signing may take at once
    /// (`max_body_memory`), default [`DEFAULT_MAX_BODY_MEMORY`] or the largest body a route
    /// (or the login) accepts, if that is more.
    pub max_body_memory: usize,
    /// The most of `max_body_memory` one client may hold at once
    /// (`max_body_memory_per_client`): a session's user on the routes that require one, the
    /// client address on public routes and for the login. Default a quarter of
    /// `max_body_memory`, or the largest body a route (or the login) accepts if that is
    /// more; None: `"off"`.
    pub max_body_memory_per_client: Option<usize>,
    /// Longest a write to a client may stay blocked (a client that takes no bytes of an
    /// answer), default 60s.
    pub send_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown, default 30s.
    pub shutdown_grace: Duration,
    /// Concurrent client connections, default 10000.
    pub max_connections: usize,
    /// WebSockets open at once on the whole proxy (every route together), default 10000.
    pub websocket_max_open: usize,
    /// WebSockets one user (a session's user name, all their sessions together) may have
    /// open at once through this proxy, default 64.
    pub websocket_max_open_per_user: usize,
    /// Largest file served from `static_dir` (files are read whole), default 32 MiB.
    pub max_static_file: u64,
    /// File contents from `static_dir` kept in memory between requests, default 64 MiB.
    pub static_cache_size: u64,
    /// Path prefixes under `static_dir` whose files never change once deployed (a build
    /// tool's content-hashed assets, e.g. `/assets/`): served `immutable` for a year.
    pub static_immutable: Vec<String>,
    /// Concurrent streams one HTTP/2 client connection may open, default 256.
    pub http2_max_concurrent_streams: u32,
    /// An HTTP/2 client connection with no stream open this long is closed, default 60s.
    pub http2_idle_timeout: Duration,
    /// Streams an HTTP/2 client may reset before their answer's head before its connection
    /// is closed (rapid reset), default [`DEFAULT_HTTP2_MAX_RESET_STREAMS`].
    pub http2_max_reset_streams: usize,
    /// Most header field lines in an HTTP/1 request head, and most distinct field names in an
    /// HTTP/2 request, default 100.
    pub max_header_count: usize,
    /// An HTTP/1.1 client's EOF while its answer is being made (it shut down its sending
    /// side): `true` (the default) answers it all the same; `false` closes the connection
    /// (and the upstream answer feeding it) at once, which frees a quiet event stream whose
    /// client has left without waiting for `body_idle_timeout`.
    pub http1_half_close: bool,
    /// How often `run` checks whether a file SIGHUP reloads (keyring and its `secret_file`s,
    /// users file, TLS certificate and key) has changed, and reloads what did; None (`"off"`,
    /// the default): only on SIGHUP.
    pub reload_check_interval: Option<Duration>,
    /// Log lines the background log writer holds before it drops new ones (counted in
    /// `countersign_log_lines_dropped_total`), default 128000.
    pub log_queue_lines: usize,
    /// Browser security headers: the defaults with `[server.response_headers]` applied, and
    /// whether proxied answers get them too (`response_headers_on_upstream`).
    pub response_headers: ResponseHeaderRules,
    /// Longest `[server.response_headers]` value (`max_response_header_value_bytes`, default
    /// 4096).
    pub max_response_header_value_bytes: usize,
    /// The load balancers whose `client_address_header` names the browser's address
    /// (`trusted_proxies`, default none: every connection is its own client).
    pub trusted_proxies: TrustedProxies,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from one of the
    /// `trusted_proxies`, naming the client (`proxy_protocol`, default false).
    pub proxy_protocol: bool,
    /// The longest address block and TLVs of a v2 PROXY header read
    /// (`proxy_protocol_max_bytes`, default 1KiB); a longer header closes the connection.
    pub proxy_protocol_max_bytes: usize,
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
    /// Messages quote the text with any user info (a password) redacted.
    pub fn parse(text: &str) -> Result<PublicOrigin, String> {
        let shown = redact_url(text);
        let uri: Uri = text.parse().map_err(|_| match ascii_origin(text) {
            // A URL all the same (`https://bücher.example`, as an address bar shows it), but
            // the `Origin` the CSRF check compares it with carries the punycode host.
            Some(ascii) => format!(
                "{shown:?}: write the host in ASCII, as browsers send it in Origin: {ascii:?}"
            ),
            None => format!("{shown:?} is not a URL (use e.g. \"https://app.example.com\")"),
        })?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| format!("{shown:?} has no scheme (use http:// or https://)"))?
            .to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{shown:?}: scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{shown:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{shown:?}: user info is not allowed in an origin"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || text.contains('#') {
            return Err(format!(
                "{shown:?}: an origin has no path or query (use e.g. \"https://app.example.com\")"
            ));
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("{shown:?} has no host"));
        }
        let port = authority_port(authority.as_str()).map_err(|p| format!("{shown:?}: {p}"))?;
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = port.filter(|&p| p != default_port);
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

/// The origin of `text`, a URL with characters outside ASCII, as browsers serialise it
/// (`https://bücher.example` is `https://xn--bcher-kva.example`); None for an ASCII text or one
/// that is no http(s) URL with a host.
fn ascii_origin(text: &str) -> Option<String> {
    if text.is_ascii() {
        return None;
    }
    let url = url::Url::parse(text).ok()?;
    let origin = url.origin();
    (matches!(url.scheme(), "http" | "https") && origin.is_tuple())
        .then(|| origin.ascii_serialization())
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
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Address of the ops listener (`/healthz`, `/readyz`, `/metrics`, revoke); none = off.
    pub listen: Option<SocketAddr>,
    /// Concurrent connections on the admin listener (probes and scrapers), default 64; more
    /// are closed at once, so a flood of them cannot take the proxy's memory.
    pub max_connections: usize,
    /// The host names, besides IP literals and `localhost`, that requests to the admin
    /// listener may carry in `Host` (`admin.allowed_hosts`, default none): in lower case,
    /// without port or trailing dot. Any other name is refused, since only a DNS name can be
    /// rebound to the listener's address by a web page (`admin::refuse_foreign_hosts`).
    pub allowed_hosts: Vec<String>,
    /// How `/readyz` and `/metrics` probe the upstreams and reuse the answer: the time limit of
    /// one upstream TCP probe (`admin.readiness_probe_timeout`, default 1s) and how long an
    /// answer and a round of probes are reused (`admin.readiness_cache`, default 2s).
    pub readiness: super::admin::ReadinessTiming,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            allowed_hosts: Vec::new(),
            readiness: super::admin::ReadinessTiming::default(),
        }
    }
}

/// Default `admin.readiness_probe_timeout`.
pub const DEFAULT_READINESS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `admin.readiness_cache`.
pub const DEFAULT_READINESS_CACHE: Duration = Duration::from_secs(2);
/// Longest `admin.readiness_probe_timeout` and `admin.readiness_cache`: a probe that waits
/// longer, or an answer older than this, tells a balancer nothing current.
pub const MAX_READINESS_DURATION: Duration = Duration::from_secs(60);

/// One `admin.allowed_hosts` entry as the admin listener compares it: a host name (letters,
/// digits, `-` and `_` in dot-separated labels of 1 to 63 characters, 253 in all; `_` for
/// Docker Compose service names), in lower case and without the trailing dot of a fully
/// qualified name. Refused with what is wrong: a port, scheme or path (the entry is compared
/// with `Host` without its port, so `"name:9090"` would never match), an IP address (always
/// allowed: listing one would suggest the others are not), a wildcard or anything else that
/// is not a name.
fn admin_allowed_host(entry: &str) -> Result<String, String> {
    if entry.is_empty() {
        return Err("is empty: give a host name, e.g. \"countersign-admin.monitoring.svc\"".into());
    }
    if entry.contains("://") {
        return Err(format!(
            "{entry:?} must be a host name without a scheme (e.g. \
             \"countersign-admin.monitoring.svc\")"
        ));
    }
    let unbracketed = entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(entry);
    if unbracketed.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{entry:?} is an IP address: IP addresses (and localhost) are always allowed, list \
             only the DNS names scrapers and probes use"
        ));
    }
    if entry.contains(':') {
        return Err(format!(
            "{entry:?} must be a host name without a port: any port is allowed, the name is \
             compared with Host without its port"
        ));
    }
    if entry.contains('/') {
        return Err(format!("{entry:?} must be a host name without a path"));
    }
    let name = entry.strip_suffix('.').unwrap_or(entry);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{entry:?} is not a host name: dot-separated labels of 1 to 63 letters, digits, \
             '-' or '_' (not starting or ending with '-'), 253 characters at most; no wildcards"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// Default `admin.max_connections`.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `server.max_body_memory` (raised to the largest `upstream[].max_body` or
/// `auth.max_login_body` when one is larger): 64 bodies of the default 1 MiB `max_body` at
/// once, a quarter of the deployment's memory limit (docs/DEPLOYMENT.md).
pub const DEFAULT_MAX_BODY_MEMORY: usize = 64 * 1024 * 1024;

/// Default `server.max_body_memory_per_client`: a quarter of `max_body_memory`, so that one
/// client (a user, or an address on public routes) holding all it may still leaves three
/// quarters to the others; but never less than `largest_body`, the largest
/// `upstream[].max_body` or `auth.max_login_body`, which would otherwise never be read.
pub fn default_max_body_memory_per_client(max_body_memory: usize, largest_body: usize) -> usize {
    (max_body_memory / 4).max(largest_body)
}

/// Largest `server.max_connections` and `admin.max_connections`: 2^24 (16,777,216), more
/// connections than a process can hold open (each is a file descriptor; Linux's default
/// `fs.nr_open` is 1,048,576). (When the count was a tokio semaphore, a value above its ~2^61
/// permits made `run` panic; it is an atomic count now, see `server::ConnectionLimit`.)
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 24;
/// Default `server.http2_idle_timeout`: as long as a browser keeps an idle connection open
/// (Chromium 5 min, Firefox 115 s) would be longer than needed; nginx closes after 75 s.
pub const DEFAULT_HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `server.http2_max_reset_streams`: far above what a page's aborted fetches do on
/// one connection, far below the thousands of upstream requests a rapid reset would make.
pub const DEFAULT_HTTP2_MAX_RESET_STREAMS: usize = 100;
/// Largest `server.http2_max_reset_streams`: past it the limit no longer bounds anything.
pub const MAX_HTTP2_MAX_RESET_STREAMS: usize = 1_000_000;

/// Default `server.http2_max_concurrent_streams`.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default `server.log_queue_lines`: tracing-appender's own default, about 2 s of access
/// lines at 60k requests/s before a stalled stderr costs a line.
pub const DEFAULT_LOG_QUEUE_LINES: usize = 128_000;
/// Largest `server.log_queue_lines`. The queue's slots are allocated up front (32 bytes each,
/// a length-prefixed pointer and a stamp: 32 MiB at this bound) and each queued line holds its text (~300 bytes for an access
/// line): a larger queue only delays, at a memory cost, what a stderr that cannot keep up
/// makes inevitable.
pub const MAX_LOG_QUEUE_LINES: usize = 1 << 20;

/// Default `server.max_header_count` (hyper's own default: a browser sends 10-20 fields).
pub const DEFAULT_MAX_HEADER_COUNT: usize = 100;
/// Largest `server.max_header_count`: hyper keeps one slot per field on the stack-or-heap
/// while parsing, and a head of this many fields no longer fits any sensible
/// `max_header_bytes` anyway.
pub const MAX_HEADER_COUNT_LIMIT: usize = 10_000;

/// Default `session.snapshot_lock_wait`, at least: the previous process's stop
/// (`server.shutdown_grace`, default 30s) and the writing of its snapshot, with room to spare.
/// With a longer `shutdown_grace` the default is that grace plus
/// [`SNAPSHOT_LOCK_WAIT_OVER_GRACE`].
pub const DEFAULT_SNAPSHOT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How much longer than `server.shutdown_grace` the default `session.snapshot_lock_wait` is:
/// the snapshot's writing (about 1 s per million sessions) and the process's exit.
pub const SNAPSHOT_LOCK_WAIT_OVER_GRACE: Duration = Duration::from_secs(30);

/// Largest `session.max_sessions`: the memory store numbers its places in 32 bits.
pub const MAX_SESSIONS_LIMIT: usize = u32::MAX as usize - 1;

/// Default `session.max_sessions_per_user`: one person's browsers and devices rarely hold
/// more than a handful of sessions at once; 32 leaves room for many, and for scripts or
/// shared accounts, while one user can hold only 32 of `max_sessions`' places.
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 32;

/// Default `session.max_session_cookies`: a browser holds one session cookie, or a few with
/// a sibling subdomain's or an old `Path`'s beside it.
pub const DEFAULT_MAX_SESSION_COOKIES: usize = 4;

/// Largest `session.max_session_cookies`: each id beyond the first costs a store lookup (a
/// Redis `GET`) on the request that carries it.
pub const MAX_SESSION_COOKIES_LIMIT: usize = 16;

/// Smallest `server.max_header_bytes`: hyper reads an HTTP/1 request head into a buffer of at
/// least 8 KiB (`max_buf_size` refuses less), so a lower limit would be accepted and not hold.
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

/// `[session]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// Where sessions live.
    pub store: StoreKind,
    /// An unused session ends after this, default 30m.
    pub idle_timeout: Duration,
    /// A session ends this long after login regardless, default 12h.
    pub absolute_timeout: Duration,
    /// Cookie name, default `countersign_session`; the server adds `__Host-` over https.
    pub cookie_name: String,
    /// Most distinct session ids one request's cookies may carry (cookie tossing, stale
    /// paths), default [`DEFAULT_MAX_SESSION_COOKIES`], at most [`MAX_SESSION_COOKIES_LIMIT`].
    /// More are refused as 401 `ambiguous_session_cookie` before any store lookup.
    pub max_session_cookies: usize,
    /// Most sessions held at once, default 1_000_000 (full -> logins answer 503).
    pub max_sessions: usize,
    /// Most live sessions of one user, default [`DEFAULT_MAX_SESSIONS_PER_USER`]: a login
    /// of a user holding that many ends the user's oldest session first (so one user cannot
    /// fill `max_sessions`). Live on reload.
    pub max_sessions_per_user: usize,
    /// How often expired sessions are swept, default 60s.
    pub sweep_interval: Duration,
    /// The in-memory store's sessions are written here when the proxy stops gracefully and
    /// restored from it at the next start (`super::session_snapshot`); default none (a
    /// restart ends every session). Memory store only.
    pub snapshot_file: Option<PathBuf>,
    /// How long a start waits for another process holding `snapshot_file`'s lock (a proxy
    /// still stopping, in a restart that overlaps it) before it refuses to start, default
    /// [`DEFAULT_SNAPSHOT_LOCK_WAIT`] or `server.shutdown_grace` plus
    /// [`SNAPSHOT_LOCK_WAIT_OVER_GRACE`], whichever is longer. Only with `snapshot_file`.
    pub snapshot_lock_wait: Duration,
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
            max_session_cookies: DEFAULT_MAX_SESSION_COOKIES,
            max_sessions: 1_000_000,
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
            sweep_interval: Duration::from_secs(60),
            snapshot_file: None,
            snapshot_lock_wait: DEFAULT_SNAPSHOT_LOCK_WAIT,
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

/// Whether a Redis key prefix holds a non-empty hash tag (`{...}`, as Redis Cluster reads it:
/// the first `{` and the first `}` after it, with something between), so that every key under
/// it hashes to one slot.
pub(crate) fn has_hash_tag(prefix: &str) -> bool {
    prefix.find('{').is_some_and(|open| {
        prefix[open + 1..]
            .find('}')
            .is_some_and(|close_offset| close_offset > 0)
    })
}

/// Whether two listen addresses cannot both be bound: the same port (not 0, which picks a free
/// one) on the same address, or with either one a wildcard that covers the other: `0.0.0.0`
/// every IPv4 address, `[::]` every address (a dual-stack socket, Linux's default, takes the
/// IPv4 port too). An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is its IPv4 address.
pub(crate) fn listen_addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |wide: IpAddr, other: IpAddr| match wide {
        IpAddr::V6(v6) => v6.is_unspecified(),
        IpAddr::V4(v4) => v4.is_unspecified() && other.is_ipv4(),
    };
    a == b || covers(a, b) || covers(b, a)
}

/// `scheme://[redacted]@host...` when the URL has user info (a password), for messages and
/// logs: everything between `://` (or the start, without one) and the last `@` is left out,
/// so a password holding `/` or `@` is hidden too. Without an `@`, a "port" that is not a
/// number is left out with everything after it (`redis://:[redacted]`): that is what a
/// password looks like when its `@` was forgotten (`redis://:password/0` for the sentinel
/// form `redis://:password@/0`, or a sentinel entry `host:password`). Only a `://` after a
/// valid scheme name at the start counts: one further on (`user:password@host/?next=https://x`)
/// belongs to the path or query, and the URL has no scheme.
pub(crate) fn redact_url(url: &str) -> String {
    match (url_scheme(url), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme.len() => {
            format!("{scheme}://[redacted]{}", &url[at..])
        }
        (None, Some(at)) => format!("[redacted]{}", &url[at..]),
        _ => redact_non_numeric_port(url),
    }
}

/// The scheme of `url` when it starts with one followed by `://`: a letter, then letters,
/// digits, `+`, `-` or `.` (RFC 3986 §3.1). None otherwise, also when a `://` comes later.
fn url_scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// [`redact_url`] for a URL (or `host:port`) without user info.
fn redact_non_numeric_port(url: &str) -> String {
    let authority_start = url_scheme(url).map_or(0, |scheme| scheme.len() + 3);
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    // An IPv6 literal's colons are not a port's; its port follows the `]`.
    let port_colon = match authority.find(']') {
        Some(close) if authority.starts_with('[') => {
            authority[close..].find(':').map(|i| close + i)
        }
        _ => authority.find(':'),
    };
    match port_colon {
        Some(colon) if !authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            format!("{}[redacted]", &url[..authority_start + colon + 1])
        }
        _ => url.to_owned(),
    }
}

/// The port written in a URL's authority (`host`, `host:port`, `[v6]:port`, after any user
/// info): `None` when there is none. An empty port (`host:`), 0, or anything but a number from
/// 1 to 65535 is an error: the `http` crate reads such a port as "none", so `host:99999` would
/// silently become the scheme's default port (and `url`, which Redis URLs go through, reads
/// `host:` the same way).
pub(crate) fn authority_port(authority: &str) -> Result<Option<u16>, String> {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let port = match host_port.strip_prefix('[') {
        // An IPv6 literal: the port follows the closing bracket.
        Some(rest) => rest
            .split_once(']')
            .and_then(|(_, after)| after.strip_prefix(':')),
        None => host_port.split_once(':').map(|(_, port)| port),
    };
    match port {
        None => Ok(None),
        Some("") => Err(
            "empty port after \":\" (write the port, or leave out the colon for the scheme's \
             default port)"
                .to_owned(),
        ),
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(port)),
            // Quoted only when it is digits: without an `@` before it, the text after the
            // `:` may be a password (`redis://:password/0`), never to be printed.
            _ if text.bytes().all(|b| b.is_ascii_digit()) => {
                Err(format!("port {text:?} is not a number from 1 to 65535"))
            }
            _ => Err(
                "the port is not a number from 1 to 65535 (not shown: without an \"@\" \
                      before it, it could be a password)"
                    .to_owned(),
            ),
        },
    }
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// Users file (argon2id hashes): logins checked by the proxy.
    pub users_file: Option<PathBuf>,
    /// The largest users file read (`max_users_file`, default 1 MiB): a larger one is refused
    /// at start and by a reload (which keeps the users it has).
    pub max_users_file: u64,
    /// Or: the API checks credentials (the proxy POSTs them there, signed).
    pub verify_url: Option<Uri>,
    /// Failed-login limits.
    pub throttle: ThrottleConfig,
    /// Password checks running at once, default: the number of CPUs. Each holds its hash's
    /// argon2 memory (19 MiB for `hash-password`'s, at most `hash_limits.max_memory_kib`).
    /// Pass it to `UsersHandle::with_max_concurrent_checks`.
    pub max_concurrent_password_checks: usize,
    /// Bounds on the users file's argon2 parameters (`max_hash_memory`,
    /// `max_hash_iterations`, `max_hash_parallelism`); defaults: [`HashLimits::default`].
    /// [`ProxyConfig::load_users`] applies them.
    pub hash_limits: HashLimits,
    /// Time limit of one `verify_url` call (connect, send, read the answer), default 10s.
    pub verify_timeout: Duration,
    /// Largest `POST /auth/login` body, default 16 KiB.
    pub max_login_body: usize,
    /// Longest user name accepted at login, in bytes (UTF-8), default 256.
    pub max_username_bytes: usize,
    /// Longest password accepted at login, in bytes (UTF-8), default 1024, at most
    /// [`MAX_PASSWORD_BYTES_LIMIT`].
    pub max_password_bytes: usize,
    /// Largest `verify_url` answer read, default 64 KiB (a larger one is a 502).
    pub max_verify_answer: usize,
    /// Largest `verify_url` answer head, status line included (`max_verify_answer_header_bytes`,
    /// default hyper's ~408 KiB, at least 8 KiB); larger: the login answers 502.
    pub max_verify_answer_header_bytes: usize,
    /// Most header fields in a `verify_url` answer (`max_verify_answer_header_count`, default
    /// 100); more: the login answers 502.
    pub max_verify_answer_header_count: usize,
    /// The client certificate presented to an https `verify_url` (mutual TLS):
    /// `verify_client_cert_file` and `verify_client_key_file`.
    pub verify_client_cert: Option<ClientCertFiles>,
    /// CAs trusted for an https `verify_url` besides the web PKI roots (a private CA), PEM.
    pub verify_ca_file: Option<PathBuf>,
    /// Longest a `verify_url` connection is reused, counted from when it was made
    /// (`verify_pool_max_lifetime`, default 1h; `None`: `"off"`, no limit).
    pub verify_pool_max_lifetime: Option<Duration>,
    /// Idle keep-alive connections to `verify_url` kept for the next logins
    /// (`verify_pool_max_idle`, default 16; 0: none kept).
    pub verify_pool_max_idle: usize,
    /// How long an idle `verify_url` connection is kept (`verify_pool_idle_timeout`, default
    /// 60s).
    pub verify_pool_idle_timeout: Duration,
}

/// Default `auth.verify_pool_max_idle`: logins are few next to API calls, and go to one host.
pub const DEFAULT_VERIFY_POOL_MAX_IDLE: usize = 16;
/// Largest `auth.verify_pool_max_idle`.
pub const MAX_VERIFY_POOL_MAX_IDLE: usize = 65_536;

/// Default `auth.verify_timeout`.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `auth.max_login_body`.
pub const DEFAULT_MAX_LOGIN_BODY: usize = 16 * 1024;
/// Smallest `auth.max_login_body`: below this not even a short name and password fit.
pub const MIN_LOGIN_BODY: usize = 64;
/// Default `auth.max_username_bytes`.
pub const DEFAULT_MAX_USERNAME_BYTES: usize = 256;
/// Default `auth.max_users_file`: about 7,000 users of ~150 bytes each.
pub const DEFAULT_MAX_USERS_FILE: u64 = 1024 * 1024;
/// Largest `auth.max_users_file`.
pub const MAX_MAX_USERS_FILE: u64 = 64 * 1024 * 1024;

/// Default `auth.max_verify_answer`.
pub const DEFAULT_MAX_VERIFY_ANSWER: usize = 64 * 1024;
/// Default `upstream[].connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `upstream[].pool_idle_timeout`.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `upstream[].pool_max_idle_per_host`.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// Default `upstream[].max_response_header_count`: hyper's client default, which applied
/// before the key existed.
pub const DEFAULT_MAX_RESPONSE_HEADER_COUNT: usize = 100;
/// Default `upstream[].max_response_header_bytes`: hyper's client read buffer limit
/// (8 KiB + 100 x 4 KiB = 408 KiB), which applied before the key existed.
pub const DEFAULT_MAX_RESPONSE_HEADER_BYTES: usize = 8192 + 4096 * 100;
/// Smallest `upstream[].max_response_header_bytes`: hyper's read buffer starts at 8 KiB and
/// refuses (panics on) a limit below it.
pub const MIN_MAX_RESPONSE_HEADER_BYTES: usize = 8192;
/// Largest `upstream[].max_response_header_bytes`: a head is read whole into memory, per
/// answer in flight.
pub const MAX_MAX_RESPONSE_HEADER_BYTES: usize = 16 * 1024 * 1024;

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

impl ThrottleConfig {
    /// The window in whole seconds, at least one (both throttles count in whole seconds).
    pub fn window_secs(&self) -> u64 {
        self.window.as_secs().max(1)
    }
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
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Name for logs and metrics.
    pub name: String,
    /// Path prefix routed here (starts and ends with `/`; no `%`, `;`, `\`, non-ASCII or other
    /// character a request path cannot carry as written); longest prefix wins.
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
    /// What becomes of the upstream's redirect to another origin in answer to a write that
    /// carried `X-CSRF-Token`, default refused (502).
    pub cross_origin_redirects: CrossOriginRedirects,
    /// Time to establish a connection (TCP, and TLS for https), default 5s.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept, default 60s.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host (per event loop), default 1024; 0 keeps
    /// none (a new connection per request).
    pub pool_max_idle_per_host: usize,
    /// How long after it is made a pooled connection stops being reused (then closed after
    /// its exchange in flight), default 1h (nginx's `keepalive_time`); None: `"off"`, no limit.
    pub pool_max_lifetime: Option<Duration>,
    /// A pooled connection idle at least this long may be stale (closed by the upstream's
    /// keep-alive timeout): an idempotent request sent on it that gets no answer is signed
    /// again and sent once on a new connection, default 1s; None: `"off"`, never resent.
    pub pool_stale_after: Option<Duration>,
    /// The longest the upstream's answer body may send nothing (a stream's events, a
    /// download's pieces), default 60s; longer, the answer is cut.
    pub body_idle_timeout: Duration,
    /// Most header fields in the upstream's answer head, default 100; more: 502.
    pub max_response_header_count: usize,
    /// Largest upstream answer head (status line and fields), default 408 KiB; larger: 502.
    pub max_response_header_bytes: usize,
    /// PEM bundle of extra CAs trusted for this (https) upstream besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate presented to this (https) upstream (mutual TLS):
    /// `client_cert_file` and `client_key_file`.
    pub client_cert: Option<ClientCertFiles>,
    /// Whether `/readyz` answers 503 while this upstream refuses TCP connections, default
    /// true. Not required: its state is still probed and shown (the `/readyz` body,
    /// `countersign_upstream_up`).
    pub required_for_ready: bool,
    /// WebSocket handshakes proxied on this route (`websocket = true`, with
    /// `websocket_idle_timeout`, `websocket_session_check`, `websocket_max_open`); None:
    /// refused with 501, the default.
    pub websocket: Option<super::forward::WebSocketRoute>,
}

/// Default `upstream[].websocket_idle_timeout`: 5 minutes without a byte either way.
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `upstream[].websocket_session_check`: 30 seconds.
pub const DEFAULT_WEBSOCKET_SESSION_CHECK: Duration = Duration::from_secs(30);
/// Default `upstream[].websocket_max_open`: 10,000 per route.
pub const DEFAULT_WEBSOCKET_MAX_OPEN: usize = 10_000;

/// Default `server.websocket_max_open_per_user`: 64, a few per tab for a user with a dozen
/// tabs open, and far below `websocket_max_open`, so one account cannot take its places.
pub const DEFAULT_WEBSOCKET_MAX_OPEN_PER_USER: usize = 64;

/// A client certificate's two PEM files (`upstream[].client_cert_file`/`client_key_file`,
/// `auth.verify_client_cert_file`/`verify_client_key_file`) and the config keys naming them.
///
/// [`ClientCertFiles::load`] reads them once and shares the result: every event loop's
/// connections to the upstream present the same [`ClientCert`], and a clone of the config
/// (the one SIGHUP reloads from) reaches it to reload it ([`ProxyConfig::reload_client_certs`]).
#[derive(Debug, Clone)]
pub struct ClientCertFiles {
    /// Certificate chain file (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key file (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The config key naming `cert` (`upstream[0].client_cert_file`).
    pub cert_setting: String,
    /// The config key naming `key` (`upstream[0].client_key_file`).
    pub key_setting: String,
    loaded: std::sync::Arc<parking_lot::Mutex<Option<std::sync::Arc<ClientCert>>>>,
}

/// The same files named by the same keys: what a config file says (a reload compares a
/// file's settings with the running ones). The certificate loaded from them is not a setting.
impl PartialEq for ClientCertFiles {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.cert_setting == other.cert_setting
            && self.key_setting == other.key_setting
    }
}

impl ClientCertFiles {
    /// The certificate, read and checked the first time (then shared); errors name
    /// `config_file`, the key of the file at fault and the problem.
    pub fn load(&self, config_file: &Path) -> Result<std::sync::Arc<ClientCert>, ConfigError> {
        let mut loaded = self.loaded.lock();
        if let Some(cert) = &*loaded {
            return Ok(cert.clone());
        }
        let cert = ClientCert::load(
            (self.cert_setting.clone(), self.key_setting.clone()),
            &self.cert,
            &self.key,
        )
        .map(std::sync::Arc::new)
        .map_err(|e| self.error(config_file, e))?;
        *loaded = Some(cert.clone());
        Ok(cert)
    }

    /// Reads and checks the files as [`ClientCertFiles::load`] does, keeping nothing
    /// (`check-config`).
    pub fn check(&self, config_file: &Path) -> Result<(), ConfigError> {
        super::forward::read_client_cert(&self.cert, &self.key, std::time::SystemTime::now())
            .map(drop)
            .map_err(|e| self.error(config_file, e))
    }

    fn error(&self, config_file: &Path, e: ClientCertError) -> ConfigError {
        let setting = match e.file {
            ClientCertFile::Cert => &self.cert_setting,
            ClientCertFile::Key => &self.key_setting,
        };
        ConfigError::new(config_file, setting.as_str(), e.problem)
    }

    /// The certificate if [`ClientCertFiles::load`] has loaded it.
    fn loaded(&self) -> Option<std::sync::Arc<ClientCert>> {
        self.loaded.lock().clone()
    }
}

/// Whether a route needs a logged-in session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    /// No session -> 401.
    Required,
    /// Public: forwarded signed, without identity.
    None,
}

/// What becomes of an upstream's redirect (301, 302, 303, 307, 308) to another origin than
/// the public one, answering a write that carried `X-CSRF-Token` (`upstream[].
/// cross_origin_redirects`). A browser follows such a redirect by itself with the request's
/// headers (`XMLHttpRequest`, so Angular's `HttpClient`, cannot refuse to), taking the token to
/// that origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrossOriginRedirects {
    /// Answered 502 `bad_gateway` instead (logged with the origin it led to).
    #[default]
    Refuse,
    /// Passed on as the upstream sent it.
    Pass,
}

// ---------------------------------------------------------------------------------------------
// Conversion
// ---------------------------------------------------------------------------------------------

/// A `[signing]` header name (`user_header`, `roles_header`, an `extra_headers` entry): a
/// valid field name that the signer can cover and the proxy leaves alone. A name the proxy
/// sets, strips or that the signature protocol reserves would break every request
/// (`component covered twice`), overwrite the request (`host` = the user name) or never be
/// present (a stripped field as an extra header).
fn signing_header_name(text: &str) -> Result<HeaderName, String> {
    if text.trim().starts_with('@') {
        return Err(format!(
            "{text:?} is a derived component, not a header: the signature always covers \
             @method, @authority, @path and @query, and no other derived component can be \
             configured"
        ));
    }
    let name = HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| format!("{text:?} is not a valid header name"))?;
    if let Some(why) = reserved_signing_header(&name) {
        return Err(format!("{text:?} cannot be used here: {why}"));
    }
    // What the signer turns the name into; a name it refused would fail every request.
    if crate::core::ComponentId::plain(name.as_str()).is_err() {
        return Err(format!("{text:?} is not a valid signature component name"));
    }
    Ok(name)
}

/// The name of an identity field, `signing.user_header` or `roles_header` (and the CLI's
/// `--user-header` / `--roles-header`, which name what such a proxy sends): a `[signing]`
/// header name (a valid field name the signer can cover and the proxy leaves alone: not one
/// it sets, strips or the signature protocol reserves) without a `_`. The proxy drops a browser's field
/// spelled with `_` for an identity name's `-` (`X_Auth_User`: CGI-style upstreams read both
/// as `HTTP_X_AUTH_USER`) only when the browser's name holds the `_`; an identity name that
/// holds one itself would let the browser's `-` spelling through to such an upstream.
pub fn identity_header_name(text: &str) -> Result<HeaderName, String> {
    let name = signing_header_name(text)?;
    if name.as_str().contains('_') {
        return Err(format!(
            "{:?} holds a `_`: CGI-style servers (PHP, Rack) read `_` and `-` alike, and the \
             browser's spelling with `-` would reach them; write it with `-` (e.g. {:?})",
            name.as_str(),
            name.as_str().replace('_', "-")
        ));
    }
    Ok(name)
}

/// Why `name` cannot be a `[signing]` header (identity or extra), if it cannot.
///
/// The proxy's own handling of request fields is in `forward.rs` (`HOP_BY_HOP`, `SPOOFABLE`,
/// the fields `prepare_upstream_headers` sets): the fields it removes are found through its
/// own checks, the ones it sets are named here. As an identity header, such a field would be
/// overwritten by the signer (or strip the identity); as an extra header, a stripped field is
/// never there to cover.
fn reserved_signing_header(name: &HeaderName) -> Option<&'static str> {
    use super::csrf::CSRF_HEADER;
    use super::forward::{is_hop_by_hop, is_spoofable, REQUEST_ID_HEADER};
    let why = match name.as_str() {
        "signature" | "signature-input" => "the signature's own fields (RFC 9421)",
        // `BASE_COMPONENTS`' one field: covering it again fails every request.
        "content-digest" => "the body digest, which the signature always covers",
        "host" => "the proxy sets Host to the upstream's address (signed as @authority)",
        "cookie" | "set-cookie" => "cookies carry the session: the proxy removes or filters them",
        "content-length" => "message framing, which the HTTP layer sets for the upstream",
        CSRF_HEADER => "the CSRF token, which the proxy checks and removes",
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | REQUEST_ID_HEADER => {
            "the proxy sets it on every forwarded request"
        }
        // The rest by the proxy's own lists, so a field added there is reserved here too.
        _ if is_hop_by_hop(name) => {
            "a hop-by-hop field, which the proxy removes (RFC 9110 section 7.6.1)"
        }
        // Client-address and path-override fields and the browser's own credentials.
        _ if is_spoofable(name) => "the proxy removes it from every request",
        _ => return None,
    };
    Some(why)
}

/// Why `name` cannot be `server.client_address_header`, if it cannot (`forwarded`, read in
/// another syntax, has its own message; the `[signing]` names as configured are checked where
/// both sections are known, in [`ProxyConfig`]'s conversion).
///
/// `server.rs` removes that field from every request on arrival, before the CSRF checks,
/// routing, the login and the signer read it. A field any of them, or the API, relies on
/// would silently be gone: with `origin`, a write carrying neither `Origin` nor
/// `Sec-Fetch-Site` would pass the Origin check. Client-address fields (`x-forwarded-for`,
/// `x-real-ip`, ...) are what it is for: the proxy strips them from forwarded requests anyway.
fn reserved_client_address_header(name: &HeaderName) -> Option<&'static str> {
    use super::csrf::CSRF_HEADER;
    use super::forward::is_hop_by_hop;
    let text = name.as_str();
    let why = match text {
        "origin" | "sec-fetch-site" => {
            "the CSRF check reads it (without it, a write carrying neither Origin nor \
             Sec-Fetch-Site would pass the Origin check)"
        }
        _ if text.starts_with("sec-fetch-") => {
            "it is a browser's fetch metadata, read by CSRF defences"
        }
        CSRF_HEADER => "it is the CSRF token, which the proxy checks on every write",
        "cookie" => "it carries the session cookie",
        "host" => "it is the request's authority (RFC 9110 section 7.2)",
        "authorization" => "it holds the request's credentials",
        // `Signature`, `Signature-Input` and their companions (`Signature-Agent`).
        _ if text == "content-digest" || text.starts_with("signature") => {
            "it is a signature field (RFC 9421), which the proxy writes for the API"
        }
        _ if text.starts_with("content-") => {
            "it describes the request's body (type, length, encoding), which the proxy and the \
             API read"
        }
        _ if text.starts_with("sec-websocket-") => "it is a WebSocket handshake field",
        _ if is_hop_by_hop(name) => {
            "it is a hop-by-hop field, which frames the message or upgrades the connection \
             (WebSocket handshakes read Connection and Upgrade)"
        }
        "accept-encoding" | "range" | "if-range" | "if-match" | "if-none-match" => {
            "static_dir's answers read it"
        }
        _ => return None,
    };
    Some(why)
}

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
        self.parsed_duration(key, value, default, parse_positive_duration)
    }

    /// A positive duration of at most [`MAX_READINESS_DURATION`].
    fn readiness_duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let duration = self.duration(key, value, default)?;
        if duration > MAX_READINESS_DURATION {
            return Err(self.err(
                key,
                format!(
                    "{:?} is longer than {}s: a readiness answer that old, or a probe that \
                     waits that long, tells a balancer nothing current",
                    value.unwrap_or_default(),
                    MAX_READINESS_DURATION.as_secs()
                ),
            ));
        }
        Ok(duration)
    }

    /// A duration that `"off"` disables (None), `default` when absent.
    fn optional_duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        match value {
            None => Ok(default),
            Some(text) if text.trim() == "off" => Ok(None),
            Some(text) => parse_positive_duration(text)
                .map(Some)
                .map_err(|p| self.err(key, format!("{p} (or \"off\")"))),
        }
    }

    /// A duration for a setting used in whole seconds ([`parse_whole_seconds`]).
    fn whole_seconds(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.parsed_duration(key, value, default, parse_whole_seconds)
    }

    fn parsed_duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
        parse: fn(&str) -> Result<Duration, String>,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(text) => parse(text).map_err(|p| self.err(key, p)),
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

    /// `session.max_session_cookies`: from 1 to [`MAX_SESSION_COOKIES_LIMIT`].
    fn session_cookies(&self, value: Option<usize>) -> Result<usize, ConfigError> {
        const KEY: &str = "session.max_session_cookies";
        match value {
            Some(n) if n > MAX_SESSION_COOKIES_LIMIT => Err(self.err(
                KEY,
                format!(
                    "{n} is more than {MAX_SESSION_COOKIES_LIMIT} (each id beyond the first \
                     costs a session-store lookup on the request that carries it)"
                ),
            )),
            _ => self.positive(KEY, value, DEFAULT_MAX_SESSION_COOKIES),
        }
    }

    /// A connection limit (`server.max_connections`, `admin.max_connections`): from 1 to
    /// [`MAX_CONNECTIONS_LIMIT`].
    fn connections(
        &self,
        key: &str,
        value: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            Some(n) if n > MAX_CONNECTIONS_LIMIT => Err(self.err(
                key,
                format!(
                    "{n} is more than the {MAX_CONNECTIONS_LIMIT} connections allowed (more than \
                     a process can hold open)"
                ),
            )),
            _ => self.positive(key, value, default),
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
        // Beside a config in the working directory a relative path is already right as
        // written, and messages show it so (not `././keys.toml`).
        if path.is_absolute() || self.base == Path::new(".") {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    /// `server.proxy_protocol_max_bytes`: only with `proxy_protocol = true`, from
    /// [`MIN_MAX_V2_PAYLOAD`](super::proxy_protocol::MIN_MAX_V2_PAYLOAD) to 65535 bytes.
    fn proxy_protocol_max_bytes(
        &self,
        on: Option<bool>,
        value: Option<&RawSize>,
    ) -> Result<usize, ConfigError> {
        use super::proxy_protocol::{
            DEFAULT_MAX_V2_PAYLOAD, MAX_MAX_V2_PAYLOAD, MIN_MAX_V2_PAYLOAD,
        };
        const KEY: &str = "server.proxy_protocol_max_bytes";
        if value.is_some() && on != Some(true) {
            return Err(self.err(KEY, "only used with server.proxy_protocol = true"));
        }
        let bytes = self.size(KEY, value, DEFAULT_MAX_V2_PAYLOAD)?;
        if !(MIN_MAX_V2_PAYLOAD..=MAX_MAX_V2_PAYLOAD).contains(&bytes) {
            return Err(self.err(
                KEY,
                format!(
                    "must be between {MIN_MAX_V2_PAYLOAD} (the largest address block, so that \
                     every header without TLVs fits) and {MAX_MAX_V2_PAYLOAD} bytes (all a v2 \
                     header's length can say), not {bytes}"
                ),
            ));
        }
        Ok(bytes)
    }

    /// `server.trusted_proxies`, `server.client_address_header` and
    /// `server.client_address_max_hops`.
    fn trusted_proxies(
        &self,
        nets: Option<&[String]>,
        header: Option<&str>,
        max_hops: Option<usize>,
    ) -> Result<TrustedProxies, ConfigError> {
        use super::client_address::{DEFAULT_MAX_HOPS, MAX_MAX_HOPS};
        const KEY: &str = "server.trusted_proxies";
        const HEADER_KEY: &str = "server.client_address_header";
        const HOPS_KEY: &str = "server.client_address_max_hops";
        let nets = nets.unwrap_or_default();
        if nets.is_empty() {
            for (key, set) in [
                (HEADER_KEY, header.is_some()),
                (HOPS_KEY, max_hops.is_some()),
            ] {
                if set {
                    return Err(self.err(
                        key,
                        "only with server.trusted_proxies: the header is believed only from \
                         the addresses listed there",
                    ));
                }
            }
            return Ok(TrustedProxies::none());
        }
        let max_hops = match max_hops {
            None => DEFAULT_MAX_HOPS,
            Some(n) if (1..=MAX_MAX_HOPS).contains(&n) => n,
            Some(n) => {
                return Err(self.err(
                    HOPS_KEY,
                    format!(
                        "must be between 1 and {MAX_MAX_HOPS} (addresses of the header read, \
                         right to left), not {n}"
                    ),
                ))
            }
        };
        let mut parsed = Vec::with_capacity(nets.len());
        for (i, text) in nets.iter().enumerate() {
            let key = format!("{KEY}[{i}]");
            let net = text
                .trim()
                .parse::<ipnet::IpNet>()
                .or_else(|_| {
                    text.trim()
                        .parse::<std::net::IpAddr>()
                        .map(ipnet::IpNet::from)
                })
                .map_err(|_| {
                    self.err(
                        &key,
                        format!(
                            "{text:?} is not an IP address or CIDR block (e.g. \"10.0.0.0/8\", \
                             \"192.0.2.7\", \"2001:db8::/32\")"
                        ),
                    )
                })?;
            // On the canonical form: `::ffff:0:0/96` is every IPv4 address too.
            if canonical_net(net).prefix_len() == 0 {
                return Err(self.err(
                    &key,
                    format!(
                        "{text:?} trusts every address: any client could then choose the \
                         address the proxy counts it under; list only the balancers' addresses"
                    ),
                ));
            }
            parsed.push(net);
        }
        // Blocks that each leave some addresses out can still cover them all between them
        // (`0.0.0.0/1` and `128.0.0.0/1`): the same mistake, refused the same way.
        let canonical: Vec<ipnet::IpNet> = parsed
            .iter()
            .map(|net| super::client_address::canonical_net(*net))
            .collect();
        if ipnet::IpNet::aggregate(&canonical)
            .iter()
            .any(|net| net.prefix_len() == 0)
        {
            return Err(self.err(
                KEY,
                "its blocks together cover every IPv4 or every IPv6 address: any client could \
                 then choose the address the proxy counts it under; list only the balancers' \
                 addresses",
            ));
        }
        let header = match header {
            None => HeaderName::from_static("x-forwarded-for"),
            Some(text) => {
                let name = self.header_name(HEADER_KEY, text)?;
                if name == http::header::FORWARDED {
                    return Err(self.err(
                        HEADER_KEY,
                        "\"forwarded\" (RFC 7239, `for=...`) is not read: use a header that \
                         lists addresses, e.g. \"x-forwarded-for\"",
                    ));
                }
                if let Some(why) = reserved_client_address_header(&name) {
                    return Err(self.err(
                        HEADER_KEY,
                        format!(
                            "{text:?} cannot be used here: {why}, and the proxy removes this \
                             header from every request on arrival; name the header the \
                             balancers write the client's address in (e.g. \
                             \"x-forwarded-for\", \"x-real-ip\")"
                        ),
                    ));
                }
                name
            }
        };
        Ok(TrustedProxies::new(parsed, header).with_max_hops(max_hops))
    }

    fn header_name(&self, key: &str, text: &str) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(text.trim().as_bytes())
            .map_err(|_| self.err(key, format!("{text:?} is not a valid header name")))
    }

    /// A `[signing]` header name (`user_header`, `roles_header`, an `extra_headers` entry):
    /// [`signing_header_name`], its problem under `key`.
    fn signing_header(&self, key: &str, text: &str) -> Result<HeaderName, ConfigError> {
        signing_header_name(text).map_err(|problem| self.err(key, problem))
    }

    /// An `http(s)://` URL with a host, no user info and, if any, a port from 1 to 65535.
    /// Messages quote the URL with any user info (a password) redacted.
    ///
    /// The authority is given back as the signer's `@authority` reads it (docs/PROTOCOL.md
    /// §3.1): the host in lower case, the port as a number, and no port when it is the
    /// scheme's default (`https://api.internal:443` is `https://api.internal`). Everything
    /// downstream takes it from here: the `Host` sent upstream, the signed URI, the connection
    /// pools, `/readyz`'s probes and the logs. Kept as written, `Host: api.internal:443` went
    /// out signed as `api.internal`, and a verifier reading the origin-form request as `http`
    /// (the default `Policy`) kept the `:443`: every request was `bad_signature`.
    fn http_url(&self, key: &str, text: &str) -> Result<Uri, ConfigError> {
        let shown = redact_url(text);
        let uri: Uri = text
            .parse()
            .map_err(|_| self.err(key, format!("{shown:?} is not a valid URL")))?;
        let default_port = match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return Err(self.err(key, format!("{shown:?}: scheme must be http or https"))),
        };
        let authority = match uri.authority() {
            Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => {
                let port = authority_port(a.as_str())
                    .map_err(|p| self.err(key, format!("{shown:?}: {p}")))?;
                // `host()` keeps an IPv6 literal's brackets.
                let host = a.host().to_ascii_lowercase();
                match port.filter(|&p| p != default_port) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            }
            Some(_) => return Err(self.err(key, format!("{shown:?}: host required, no user info"))),
            None => return Err(self.err(key, format!("{shown:?} has no host"))),
        };
        if uri.authority().is_some_and(|a| a.as_str() == authority) {
            return Ok(uri);
        }
        let mut parts = uri.into_parts();
        parts.authority = Some(
            authority
                .parse()
                .map_err(|_| self.err(key, format!("{shown:?} is not a valid URL")))?,
        );
        Uri::from_parts(parts).map_err(|_| self.err(key, format!("{shown:?} is not a valid URL")))
    }

    /// A client certificate's pair of keys (`<prefix>client_cert_file`,
    /// `<prefix>client_key_file`): both or neither, and only towards an https URL (`https`:
    /// whether it is one; `url_key`: the key of that URL, for the message).
    fn client_cert(
        &self,
        prefix: &str,
        files: (Option<PathBuf>, Option<PathBuf>),
        https: Option<bool>,
        url_key: &str,
    ) -> Result<Option<ClientCertFiles>, ConfigError> {
        let cert_setting = format!("{prefix}client_cert_file");
        let key_setting = format!("{prefix}client_key_file");
        // As written in the table (`client_cert_file`, `verify_client_cert_file`).
        let short = |setting: &str| setting.rsplit('.').next().unwrap_or_default().to_owned();
        let (cert_field, key_field) = (short(&cert_setting), short(&key_setting));
        let (cert, key) = match files {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(self.err(
                    &key_setting,
                    format!("{cert_field} is set but {key_field} is not (set both or neither)"),
                ))
            }
            (None, Some(_)) => {
                return Err(self.err(
                    &cert_setting,
                    format!("{key_field} is set but {cert_field} is not (set both or neither)"),
                ))
            }
        };
        match https {
            None => return Err(self.err(&cert_setting, format!("only used with {url_key}"))),
            Some(false) => {
                return Err(self.err(
                    &cert_setting,
                    format!(
                        "only used with an https:// {url_key} (a client certificate is \
                         presented in the TLS handshake)"
                    ),
                ))
            }
            Some(true) => {}
        }
        Ok(Some(ClientCertFiles {
            cert: self.file_path(&cert),
            key: self.file_path(&key),
            cert_setting,
            key_setting,
            loaded: Default::default(),
        }))
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
        if max_header_bytes < MIN_HEADER_BYTES {
            return Err(self.err(
                "server.max_header_bytes",
                "must be at least 8KiB (hyper's smallest request-head buffer: a lower limit \
                 would not hold over HTTP/1)",
            ));
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
        let static_cache_size = self.size(
            "server.static_cache_size",
            raw.static_cache_size.as_ref(),
            super::static_files::DEFAULT_MAX_CACHE_BYTES as usize,
        )? as u64;
        if raw.static_cache_size.is_some() && raw.static_dir.is_none() {
            return Err(self.err(
                "server.static_cache_size",
                "only used with server.static_dir",
            ));
        }
        let static_immutable = raw.static_immutable.unwrap_or_default();
        if !static_immutable.is_empty() && raw.static_dir.is_none() {
            return Err(self.err(
                "server.static_immutable",
                "only used with server.static_dir",
            ));
        }
        for (i, prefix) in static_immutable.iter().enumerate() {
            // Whole folders only: "/assets" would also match "/assets-old.js".
            let folder = prefix.len() > 1
                && prefix.starts_with('/')
                && prefix.ends_with('/')
                && !prefix.contains("//")
                && prefix.bytes().all(|b| b.is_ascii_graphic());
            if !folder {
                return Err(self.err(
                    format!("server.static_immutable[{i}]"),
                    format!(
                        "{prefix:?} must be a folder path starting and ending with \"/\" \
                         (e.g. \"/assets/\"), not the site root"
                    ),
                ));
            }
        }
        let max_response_header_value_bytes = self.count_within(
            "server.max_response_header_value_bytes",
            raw.max_response_header_value_bytes,
            super::response_headers::DEFAULT_MAX_VALUE_BYTES,
            super::response_headers::MAX_VALUE_BYTES_LIMIT,
            "",
        )?;
        let response_headers = self.response_headers(
            raw.response_headers.unwrap_or_default(),
            raw.response_headers_on_upstream.unwrap_or(false),
            public_origin.is_https(),
            max_response_header_value_bytes,
        )?;
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
            // The default is raised to the largest body a route takes once the routes are
            // read (`ProxyConfig::try_from`).
            max_body_memory: self.size(
                "server.max_body_memory",
                raw.max_body_memory.as_ref(),
                DEFAULT_MAX_BODY_MEMORY,
            )?,
            // Also set to its default once the routes are read (`ProxyConfig::try_from`);
            // here only a set value is read.
            max_body_memory_per_client: match &raw.max_body_memory_per_client {
                Some(RawSize::Text(text)) if text.trim() == "off" => None,
                Some(set) => Some(set.to_bytes().map_err(|problem| {
                    self.err(
                        "server.max_body_memory_per_client",
                        format!("{problem} (or \"off\")"),
                    )
                })?),
                None => None,
            },
            send_timeout: self.duration(
                "server.send_timeout",
                raw.send_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace.as_deref(),
                Duration::from_secs(30),
            )?,
            max_connections: self.connections(
                "server.max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            websocket_max_open: self.positive(
                "server.websocket_max_open",
                raw.websocket_max_open,
                DEFAULT_WEBSOCKET_MAX_OPEN,
            )?,
            websocket_max_open_per_user: self.positive(
                "server.websocket_max_open_per_user",
                raw.websocket_max_open_per_user,
                DEFAULT_WEBSOCKET_MAX_OPEN_PER_USER,
            )?,
            max_static_file,
            static_cache_size,
            static_immutable,
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
            http2_idle_timeout: self.duration(
                "server.http2_idle_timeout",
                raw.http2_idle_timeout.as_deref(),
                DEFAULT_HTTP2_IDLE_TIMEOUT,
            )?,
            http2_max_reset_streams: match raw.http2_max_reset_streams {
                None => DEFAULT_HTTP2_MAX_RESET_STREAMS,
                Some(n) if (1..=MAX_HTTP2_MAX_RESET_STREAMS).contains(&n) => n,
                Some(_) => {
                    return Err(self.err(
                        "server.http2_max_reset_streams",
                        format!("must be between 1 and {MAX_HTTP2_MAX_RESET_STREAMS}"),
                    ))
                }
            },
            max_header_count: match raw.max_header_count {
                None => DEFAULT_MAX_HEADER_COUNT,
                Some(count) if (1..=MAX_HEADER_COUNT_LIMIT).contains(&count) => count,
                Some(_) => {
                    return Err(self.err(
                        "server.max_header_count",
                        format!("must be between 1 and {MAX_HEADER_COUNT_LIMIT}"),
                    ))
                }
            },
            http1_half_close: raw.http1_half_close.unwrap_or(true),
            trusted_proxies: self.trusted_proxies(
                raw.trusted_proxies.as_deref(),
                raw.client_address_header.as_deref(),
                raw.client_address_max_hops,
            )?,
            proxy_protocol: match raw.proxy_protocol {
                Some(true) if raw.trusted_proxies.as_ref().is_none_or(Vec::is_empty) => {
                    return Err(self.err(
                        "server.proxy_protocol",
                        "only with server.trusted_proxies: the PROXY header is believed only \
                         from the load balancers listed there",
                    ))
                }
                on => on.unwrap_or(false),
            },
            proxy_protocol_max_bytes: self.proxy_protocol_max_bytes(
                raw.proxy_protocol,
                raw.proxy_protocol_max_bytes.as_ref(),
            )?,
            reload_check_interval: self
                .reload_check_interval(raw.reload_check_interval.as_deref())?,
            // 0 would make a rendezvous queue: every line would be dropped unless the writer
            // thread happened to be waiting at that moment.
            log_queue_lines: match raw.log_queue_lines {
                None => DEFAULT_LOG_QUEUE_LINES,
                Some(lines) if (1..=MAX_LOG_QUEUE_LINES).contains(&lines) => lines,
                Some(_) => {
                    return Err(self.err(
                        "server.log_queue_lines",
                        format!("must be between 1 and {MAX_LOG_QUEUE_LINES}"),
                    ))
                }
            },
            response_headers,
            max_response_header_value_bytes,
        })
    }

    /// `[server.response_headers]` (name → value, empty removes a default) and
    /// `server.response_headers_on_upstream`; each entry checked by
    /// [`super::response_headers::check_header`], errors naming `server.response_headers.<name>`.
    fn response_headers(
        &self,
        table: std::collections::BTreeMap<String, String>,
        on_upstream: bool,
        https: bool,
        max_value_bytes: usize,
    ) -> Result<ResponseHeaderRules, ConfigError> {
        let mut rules = ResponseHeaderRules::new()
            .on_upstream(on_upstream)
            .max_value_bytes(max_value_bytes);
        for (name, value) in &table {
            // The key as TOML would write it: bare when it can be.
            let bare = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let key = if bare {
                format!("server.response_headers.{name}")
            } else {
                format!("server.response_headers.{name:?}")
            };
            rules = rules
                .set(name, value, https)
                .map_err(|problem| self.err(key, problem))?;
        }
        Ok(rules)
    }

    /// `server.reload_check_interval`: `"off"` (also when absent), or a duration from
    /// [`MIN_RELOAD_CHECK_INTERVAL`] to [`MAX_DURATION`].
    fn reload_check_interval(&self, value: Option<&str>) -> Result<Option<Duration>, ConfigError> {
        const KEY: &str = "server.reload_check_interval";
        let Some(interval) = self.optional_duration(KEY, value, None)? else {
            return Ok(None);
        };
        if interval < MIN_RELOAD_CHECK_INTERVAL {
            let text = value.unwrap_or_default();
            return Err(self.err(
                KEY,
                format!("{text:?} is shorter than the minimum of \"1s\" (or \"off\")"),
            ));
        }
        Ok(Some(interval))
    }

    /// `[session]`; `shutdown_grace` (`[server]`'s) sets the default `snapshot_lock_wait`.
    fn session(
        &self,
        raw: RawSession,
        shutdown_grace: Duration,
    ) -> Result<SessionConfig, ConfigError> {
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
                    ("session.redis_sentinels", raw.redis_sentinels.is_some()),
                    (
                        "session.redis_sentinel_master",
                        raw.redis_sentinel_master.is_some(),
                    ),
                    (
                        "session.redis_sentinel_password",
                        raw.redis_sentinel_password.is_some(),
                    ),
                    (
                        "session.redis_sentinel_tls",
                        raw.redis_sentinel_tls.is_some(),
                    ),
                    (
                        "session.redis_cluster_nodes",
                        raw.redis_cluster_nodes.is_some(),
                    ),
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
                let sentinel = self.sentinel(
                    raw.redis_sentinels,
                    raw.redis_sentinel_master,
                    raw.redis_sentinel_password,
                    raw.redis_sentinel_tls,
                )?;
                let cluster_nodes = self.cluster_nodes(raw.redis_cluster_nodes, &sentinel)?;
                // With sentinels or cluster nodes, the URL only carries credentials, database
                // and TLS: without any, it may be left out.
                let url = match (raw.redis_url, &sentinel) {
                    (Some(url), _) => url.trim().to_owned(),
                    (None, Some(_)) => "redis://".to_owned(),
                    (None, None) if cluster_nodes.is_some() => "redis://".to_owned(),
                    (None, None) => {
                        return Err(self.err(
                            "session.redis_url",
                            "required when store = \"redis\" (the primary's URL; or \
                             session.redis_sentinels with session.redis_sentinel_master; or \
                             session.redis_cluster_nodes)",
                        ))
                    }
                };
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
                    // Compared with unix seconds: "500ms" would be 0 (a write per request).
                    touch_interval: self.whole_seconds(
                        "session.redis_touch_interval",
                        raw.redis_touch_interval.as_deref(),
                        redis.touch_interval,
                    )?,
                    ca_file: raw
                        .redis_ca_file
                        .as_deref()
                        .map(|file| self.file_path(Path::new(file))),
                    sentinel,
                    cluster_nodes,
                };
                // With sentinels or cluster nodes the URL only carries credentials (and TLS):
                // the servers come from the list.
                let hostless = if redis.cluster_nodes.is_some() {
                    Some((
                        "with session.redis_cluster_nodes the nodes are listed there",
                        "redis://[user:password@], or rediss://... for TLS); the URL only \
                         holds the credentials and TLS",
                    ))
                } else if redis.sentinel.is_some() {
                    Some((
                        "with session.redis_sentinels the sentinels name the primary",
                        "redis://[user:password@][/db], or rediss://... for TLS); the URL \
                         only holds the credentials, database and TLS",
                    ))
                } else {
                    None
                };
                if let Some((why, accepted)) = hostless {
                    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
                    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
                    if !crate::replay::url_authority_host(authority).is_empty() {
                        return Err(self.err(
                            "session.redis_url",
                            format!(
                                "{:?} names a host, but {why}: leave the host out ({accepted}",
                                redact_url(&url)
                            ),
                        ));
                    }
                }
                // The `redis` crate reads `rediss://host/#insecure` as TLS without a
                // certificate check; this build has no such mode, so it would fail at every
                // call: refused here, with what to do instead.
                if url.contains('#') {
                    return Err(self.err(
                        "session.redis_url",
                        format!(
                            "{:?} has a fragment (`#...`), which is not part of a Redis URL: \
                             `#insecure` (TLS without checking the server's certificate) is \
                             not supported (for a private CA set session.redis_ca_file), and \
                             a `#` in a password is written %23",
                            redact_url(&url)
                        ),
                    ));
                }
                let sentinel_tls = redis.sentinel.as_ref().is_some_and(|s| s.tls);
                if redis.ca_file.is_some() && !url.starts_with("rediss://") && !sentinel_tls {
                    return Err(self.err(
                        "session.redis_ca_file",
                        "needs a rediss:// (TLS) session.redis_url (or, with \
                         session.redis_sentinels, session.redis_sentinel_tls = true)",
                    ));
                }
                let key_prefix = raw
                    .redis_key_prefix
                    .unwrap_or_else(|| "countersign:".to_owned());
                if redis.cluster_nodes.is_some() && !has_hash_tag(&key_prefix) {
                    return Err(self.err(
                        "session.redis_key_prefix",
                        format!(
                            "{key_prefix:?} has no hash tag, but with session.redis_cluster_nodes \
                             every key of the sessions and the login throttle must be in one \
                             hash slot (their scripts and pipelines touch several keys, which \
                             Redis Cluster allows only within one slot): put a non-empty hash tag \
                             in braces in it, e.g. \"{{countersign}}:\""
                        ),
                    ));
                }
                StoreKind::Redis { url, key_prefix }
            }
            Some(other) => {
                return Err(self.err(
                    "session.store",
                    format!("unknown store {other:?} (use \"memory\" or \"redis\")"),
                ))
            }
        };
        // Sessions expire in whole unix seconds: "1500ms" would silently be 1s.
        let idle_timeout = self.whole_seconds(
            "session.idle_timeout",
            raw.idle_timeout.as_deref(),
            defaults.idle_timeout,
        )?;
        let absolute_timeout = self.whole_seconds(
            "session.absolute_timeout",
            raw.absolute_timeout.as_deref(),
            defaults.absolute_timeout,
        )?;
        // A touch interval of half the idle timeout or more lets a session in constant use
        // expire (its last-seen is rewritten too late), or after a short pause. The store
        // uses at most half of it anyway (the default then gives way); set explicitly, say so.
        if raw.redis_touch_interval.is_some()
            && redis.touch_interval.as_secs() > idle_timeout.as_secs() / 2
        {
            return Err(self.err(
                "session.redis_touch_interval",
                format!(
                    "must be at most half of session.idle_timeout ({}s > {}s / 2): a session in \
                     use could otherwise expire",
                    redis.touch_interval.as_secs(),
                    idle_timeout.as_secs()
                ),
            ));
        }
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
                // Browsers match these prefixes case-insensitively (RFC 6265bis §5.7) and
                // drop such a cookie unless `Secure`: `__secure-sid` over http would never be
                // stored, and every login would leave no session.
                let reserved = RESERVED_COOKIE_PREFIXES.iter().any(|p| {
                    name.get(..p.len())
                        .is_some_and(|start| start.eq_ignore_ascii_case(p))
                });
                if reserved {
                    return Err(self.err(
                        "session.cookie_name",
                        "must not start with __Host- or __Secure- in any letter case (browsers refuse such a cookie unless Secure; the server adds __Host- over https)",
                    ));
                }
                name
            }
        };
        let snapshot_file = self.snapshot_file(raw.snapshot_file, &store)?;
        if snapshot_file.is_none() && raw.snapshot_lock_wait.is_some() {
            return Err(self.err(
                "session.snapshot_lock_wait",
                "only with session.snapshot_file (it is how long a start waits for that file's \
                 lock)",
            ));
        }
        // A restart that overlaps a stop waits for that whole stop by default: a longer
        // `shutdown_grace` than the default one lengthens the wait with it.
        let snapshot_lock_wait = self.duration(
            "session.snapshot_lock_wait",
            raw.snapshot_lock_wait.as_deref(),
            defaults
                .snapshot_lock_wait
                .max(shutdown_grace.saturating_add(SNAPSHOT_LOCK_WAIT_OVER_GRACE)),
        )?;
        Ok(SessionConfig {
            store,
            idle_timeout,
            absolute_timeout,
            cookie_name,
            max_session_cookies: self.session_cookies(raw.max_session_cookies)?,
            max_sessions: match self.positive(
                "session.max_sessions",
                raw.max_sessions,
                defaults.max_sessions,
            )? {
                // The memory store numbers its places in 32 bits (one value kept for "none"):
                // more was cut to this without a word.
                n if n > MAX_SESSIONS_LIMIT => {
                    return Err(self.err(
                        "session.max_sessions",
                        format!("{n} is more than {MAX_SESSIONS_LIMIT}"),
                    ))
                }
                n => n,
            },
            max_sessions_per_user: self.positive(
                "session.max_sessions_per_user",
                raw.max_sessions_per_user,
                defaults.max_sessions_per_user,
            )?,
            sweep_interval: self.duration(
                "session.sweep_interval",
                raw.sweep_interval.as_deref(),
                defaults.sweep_interval,
            )?,
            snapshot_file,
            snapshot_lock_wait,
            redis,
        })
    }

    /// `session.snapshot_file`: memory store only (Redis keeps its sessions itself), in a
    /// folder that exists (the proxy writes the file there when it stops; a folder missing
    /// then would lose every session).
    fn snapshot_file(
        &self,
        path: Option<PathBuf>,
        store: &StoreKind,
    ) -> Result<Option<PathBuf>, ConfigError> {
        const KEY: &str = "session.snapshot_file";
        let Some(path) = path else {
            return Ok(None);
        };
        if matches!(store, StoreKind::Redis { .. }) {
            return Err(self.err(
                KEY,
                "only with store = \"memory\" (with Redis, sessions outlive a restart already)",
            ));
        }
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            return Err(self.err(KEY, format!("{:?} does not name a file", path.display())));
        }
        // `<file>.lock` is the lock of the proxy on `<file>`: a snapshot there would be
        // removed and written over by one proxy while another holds it as its lock.
        if path.extension().is_some_and(|ext| ext == "lock") {
            return Err(self.err(
                KEY,
                format!(
                    "{}: a name ending in .lock is the lock file of another snapshot_file (the \
                     proxy locks <snapshot_file>.lock beside its file): choose another name",
                    path.display()
                ),
            ));
        }
        let path = self.file_path(&path);
        let folder = match path.parent() {
            Some(folder) if !folder.as_os_str().is_empty() => folder.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !folder.is_dir() {
            return Err(self.err(
                KEY,
                format!(
                    "{}: its folder {} does not exist (the proxy writes the file there when it \
                     stops)",
                    path.display(),
                    folder.display()
                ),
            ));
        }
        if path.is_dir() {
            return Err(self.err(KEY, format!("{} is a folder, not a file", path.display())));
        }
        // A device (`/dev/null`, written as if to turn snapshots off): the start would remove
        // what is at the path and the stop rename a file over it, so as root the host lost
        // its device node. Refused here, as `run` refuses it (`session_snapshot::restore_for`).
        if super::session_snapshot::is_device(&path) {
            return Err(self.err(
                KEY,
                format!(
                    "{} is a device, not a file (the proxy removes this file when it starts and \
                     writes a snapshot in its place when it stops): name a file in a folder of \
                     the proxy's own, or leave snapshot_file out to keep no snapshot",
                    path.display()
                ),
            ));
        }
        Ok(Some(path))
    }

    /// `[session] redis_sentinels`, `redis_sentinel_master`, `redis_sentinel_password`,
    /// `redis_sentinel_tls`: all or none (the password and TLS are optional); each sentinel
    /// `host:port` (or `host`, port 26379), no duplicates; a master name without spaces.
    fn sentinel(
        &self,
        sentinels: Option<Vec<String>>,
        master: Option<String>,
        password: Option<String>,
        tls: Option<bool>,
    ) -> Result<Option<SentinelTuning>, ConfigError> {
        let Some(sentinels) = sentinels else {
            if master.is_some() {
                return Err(self.err(
                    "session.redis_sentinels",
                    "required with session.redis_sentinel_master (the sentinels to ask, e.g. \
                     [\"10.0.0.1:26379\", \"10.0.0.2:26379\"])",
                ));
            }
            if password.is_some() {
                return Err(self.err(
                    "session.redis_sentinel_password",
                    "only used with session.redis_sentinels",
                ));
            }
            if tls.is_some() {
                return Err(self.err(
                    "session.redis_sentinel_tls",
                    "only used with session.redis_sentinels (TLS to the primary itself: a \
                     rediss:// session.redis_url)",
                ));
            }
            return Ok(None);
        };
        let key = "session.redis_sentinels";
        if sentinels.is_empty() {
            return Err(self.err(
                key,
                "must list at least one sentinel (host:port, e.g. \"10.0.0.1:26379\")",
            ));
        }
        self.host_port_entries(
            key,
            &sentinels,
            (
                "the sentinels' password is session.redis_sentinel_password; TLS to them is \
                 session.redis_sentinel_tls = true",
                "10.0.0.1:26379",
            ),
            crate::replay::DEFAULT_SENTINEL_PORT,
        )?;
        let master_name = master.ok_or_else(|| {
            self.err(
                "session.redis_sentinel_master",
                "required with session.redis_sentinels (the name of the sentinels' `sentinel \
                 monitor` line, e.g. \"mymaster\")",
            )
        })?;
        if master_name.is_empty()
            || master_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.err(
                "session.redis_sentinel_master",
                format!("{master_name:?} is not a master name (not empty, no spaces)"),
            ));
        }
        if password.as_deref() == Some("") {
            return Err(self.err(
                "session.redis_sentinel_password",
                "is empty (leave it out if the sentinels need no password)",
            ));
        }
        Ok(Some(SentinelTuning {
            sentinels,
            master_name,
            password,
            tls: tls.unwrap_or(false),
        }))
    }

    /// The entries of a `host:port` list (`redis_sentinels`, `redis_cluster_nodes`): each a
    /// `host:port` or `host` (port `default_port`; no URL: `not_a_url` says where its parts go
    /// instead), a valid port, no server listed twice (as
    /// [`crate::replay::host_port_entry_key`] compares them: the host in any case, the port
    /// written or left to its default). Errors name `key`, the entry's position and the entry,
    /// its credentials redacted.
    fn host_port_entries(
        &self,
        key: &str,
        entries: &[String],
        (not_a_url, example): (&str, &str),
        default_port: u16,
    ) -> Result<(), ConfigError> {
        use crate::replay::{
            host_port_entry_key, host_port_entry_problem, url_authority_host, HostPortProblem,
        };
        // The port as a number (`06379` is 6379): the entries are checked before this runs.
        let server = |entry: &str| {
            let port = authority_port(entry).ok().flatten();
            host_port_entry_key(url_authority_host(entry), port.unwrap_or(default_port))
        };
        for (index, entry) in entries.iter().enumerate() {
            let problem = match host_port_entry_problem(entry) {
                Some(HostPortProblem::Url) => {
                    Some(format!("expected host:port, not a URL ({not_a_url})"))
                }
                Some(HostPortProblem::Empty | HostPortProblem::NotHostPort) => {
                    Some(format!("expected host:port (e.g. \"{example}\")"))
                }
                None => authority_port(entry).err(),
            };
            if let Some(problem) = problem {
                return Err(self.err(
                    key,
                    format!("entry {} ({:?}): {problem}", index + 1, redact_url(entry)),
                ));
            }
            let this = server(entry);
            if let Some(first) = entries[..index].iter().position(|e| server(e) == this) {
                return Err(self.err(
                    key,
                    format!(
                        "entry {} ({entry:?}) is listed twice: entry {} ({:?}) names the same \
                         server ({this})",
                        index + 1,
                        first + 1,
                        entries[first]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[session] redis_cluster_nodes`: at least one `host:port` (or `host`, port 6379), no
    /// duplicates, not with `redis_sentinels` (a cluster finds its primaries itself).
    fn cluster_nodes(
        &self,
        nodes: Option<Vec<String>>,
        sentinel: &Option<SentinelTuning>,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(nodes) = nodes else {
            return Ok(None);
        };
        let key = "session.redis_cluster_nodes";
        if sentinel.is_some() {
            return Err(self.err(
                key,
                "cannot be used with session.redis_sentinels: Redis Cluster and Redis Sentinel \
                 are two different deployments (a cluster finds its primaries itself); keep the \
                 one your Redis runs",
            ));
        }
        if nodes.is_empty() {
            return Err(self.err(
                key,
                "must list at least one cluster node (host:port, e.g. \"10.0.0.1:6379\")",
            ));
        }
        self.host_port_entries(
            key,
            &nodes,
            (
                "credentials and TLS go in session.redis_url, without a host: \
                 redis://[user:password@] or rediss://...",
                "10.0.0.1:6379",
            ),
            // Redis's own port: a node without one.
            6379,
        )?;
        Ok(Some(nodes))
    }

    fn auth(&self, raw: RawAuth) -> Result<AuthConfig, ConfigError> {
        let defaults = ThrottleConfig::default();
        let verify_url = raw
            .verify_url
            .as_deref()
            .map(|u| self.http_url("auth.verify_url", u.trim()))
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
            // Counted in whole unix seconds (and sent as `Retry-After` seconds).
            window: self.whole_seconds(
                "auth.throttle.window",
                raw.throttle.window.as_deref(),
                defaults.window,
            )?,
            // At least two: one attempt counts an address and a name (1 ran as 2).
            max_tracked_keys: match raw.throttle.max_tracked_keys {
                Some(n @ 0..=1) => {
                    return Err(self.err(
                        "auth.throttle.max_tracked_keys",
                        format!(
                            "{n} is less than 2: one login attempt counts its address and its \
                             user name"
                        ),
                    ))
                }
                Some(n) => n,
                None => defaults.max_tracked_keys,
            },
        };
        if raw.verify_timeout.is_some() && verify_url.is_none() {
            return Err(self.err("auth.verify_timeout", "only used with auth.verify_url"));
        }
        let verify_pool_max_lifetime = self.optional_duration(
            "auth.verify_pool_max_lifetime",
            raw.verify_pool_max_lifetime.as_deref(),
            Some(super::forward::DEFAULT_POOL_MAX_LIFETIME),
        )?;
        if raw.verify_pool_max_lifetime.is_some() && verify_url.is_none() {
            return Err(self.err(
                "auth.verify_pool_max_lifetime",
                "only used with auth.verify_url",
            ));
        }
        for (key, set) in [
            (
                "auth.verify_pool_max_idle",
                raw.verify_pool_max_idle.is_some(),
            ),
            (
                "auth.verify_pool_idle_timeout",
                raw.verify_pool_idle_timeout.is_some(),
            ),
        ] {
            if set && verify_url.is_none() {
                return Err(self.err(key, "only used with auth.verify_url"));
            }
        }
        let verify_pool_max_idle = match raw.verify_pool_max_idle {
            Some(n) if n > MAX_VERIFY_POOL_MAX_IDLE => {
                return Err(self.err(
                    "auth.verify_pool_max_idle",
                    format!("{n} is more than {MAX_VERIFY_POOL_MAX_IDLE}"),
                ))
            }
            Some(n) => n,
            None => DEFAULT_VERIFY_POOL_MAX_IDLE,
        };
        let verify_pool_idle_timeout = self.duration(
            "auth.verify_pool_idle_timeout",
            raw.verify_pool_idle_timeout.as_deref(),
            DEFAULT_POOL_IDLE_TIMEOUT,
        )?;
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
        if verify_url.is_none() {
            for (key, set) in [
                ("auth.max_verify_answer", raw.max_verify_answer.is_some()),
                (
                    "auth.max_verify_answer_header_bytes",
                    raw.max_verify_answer_header_bytes.is_some(),
                ),
                (
                    "auth.max_verify_answer_header_count",
                    raw.max_verify_answer_header_count.is_some(),
                ),
            ] {
                if set {
                    return Err(self.err(key, "only used with auth.verify_url"));
                }
            }
        }
        let max_verify_answer_header_bytes = self.answer_header_bytes(
            "auth.max_verify_answer_header_bytes",
            raw.max_verify_answer_header_bytes.as_ref(),
        )?;
        let max_verify_answer_header_count = self.answer_header_count(
            "auth.max_verify_answer_header_count",
            raw.max_verify_answer_header_count,
        )?;
        let verify_client_cert = self.client_cert(
            "auth.verify_",
            (
                raw.verify_client_cert_file.clone(),
                raw.verify_client_key_file.clone(),
            ),
            verify_url.as_ref().map(|u| u.scheme_str() == Some("https")),
            "auth.verify_url",
        )?;
        let verify_ca_file = match (&raw.verify_ca_file, &verify_url) {
            (None, _) => None,
            (Some(file), Some(url)) if url.scheme_str() == Some("https") => {
                Some(self.file_path(file))
            }
            (Some(_), _) => {
                return Err(self.err(
                    "auth.verify_ca_file",
                    "only used with an https:// auth.verify_url",
                ))
            }
        };
        if raw.max_concurrent_password_checks.is_some() && verify_url.is_some() {
            return Err(self.err(
                "auth.max_concurrent_password_checks",
                "only used with auth.users_file: with auth.verify_url the API checks the \
                 passwords, and no argon2 check runs here",
            ));
        }
        let hash_limits = self.hash_limits(&raw, positive_u32)?;
        Ok(AuthConfig {
            verify_client_cert,
            verify_ca_file,
            verify_pool_max_lifetime,
            verify_pool_max_idle,
            verify_pool_idle_timeout,
            hash_limits,
            max_users_file: self.max_users_file(&raw)?,
            users_file: raw.users_file.map(|p| self.file_path(&p)),
            max_username_bytes: self.positive(
                "auth.max_username_bytes",
                raw.max_username_bytes,
                DEFAULT_MAX_USERNAME_BYTES,
            )?,
            max_password_bytes: self.count_within(
                "auth.max_password_bytes",
                raw.max_password_bytes,
                DEFAULT_MAX_PASSWORD_BYTES,
                MAX_PASSWORD_BYTES_LIMIT,
                " (no password needs more, and argon2 digests all of it)",
            )?,
            max_verify_answer,
            max_verify_answer_header_bytes,
            max_verify_answer_header_count,
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

    /// A count `key` sets from 1 to `max` (`default` when absent); `why` says, after the
    /// range, why it stops there (empty: nothing).
    fn count_within(
        &self,
        key: &str,
        value: Option<usize>,
        default: usize,
        max: usize,
        why: &str,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(_) => Err(self.err(key, format!("must be between 1 and {max}{why}"))),
        }
    }

    /// A limit on the header fields of an answer the proxy reads (`upstream[].
    /// max_response_header_count`, `auth.max_verify_answer_header_count`): 1 to
    /// [`MAX_HEADER_COUNT_LIMIT`], default hyper's 100.
    fn answer_header_count(&self, key: &str, value: Option<usize>) -> Result<usize, ConfigError> {
        self.count_within(
            key,
            value,
            DEFAULT_MAX_RESPONSE_HEADER_COUNT,
            MAX_HEADER_COUNT_LIMIT,
            "",
        )
    }

    /// A limit on the head of an answer the proxy reads (`upstream[].max_response_header_bytes`,
    /// `auth.max_verify_answer_header_bytes`): 8 KiB to 16 MiB, default hyper's.
    fn answer_header_bytes(
        &self,
        key: &str,
        value: Option<&RawSize>,
    ) -> Result<usize, ConfigError> {
        match self.size(key, value, DEFAULT_MAX_RESPONSE_HEADER_BYTES)? {
            bytes
                if (MIN_MAX_RESPONSE_HEADER_BYTES..=MAX_MAX_RESPONSE_HEADER_BYTES)
                    .contains(&bytes) =>
            {
                Ok(bytes)
            }
            _ => Err(self.err(
                key,
                "must be between 8KiB and 16MiB (hyper reads a head into a buffer of at least \
                 8 KiB)",
            )),
        }
    }

    /// `auth.max_users_file`: only with `users_file`, from 1 KiB to [`MAX_MAX_USERS_FILE`].
    fn max_users_file(&self, raw: &RawAuth) -> Result<u64, ConfigError> {
        const KEY: &str = "auth.max_users_file";
        if raw.max_users_file.is_some() && raw.users_file.is_none() {
            return Err(self.err(KEY, "only used with auth.users_file"));
        }
        let bytes = self.size(
            KEY,
            raw.max_users_file.as_ref(),
            DEFAULT_MAX_USERS_FILE as usize,
        )?;
        if !(1024..=MAX_MAX_USERS_FILE as usize).contains(&bytes) {
            return Err(self.err(
                KEY,
                format!(
                    "must be between 1KiB and 64MiB (the file is read whole, at start and by \
                     each reload), not {bytes} bytes"
                ),
            ));
        }
        Ok(bytes as u64)
    }

    /// `auth.max_hash_*`: bounds on the users file's argon2 parameters (only with
    /// `users_file`: `verify_url` hashes nothing here).
    fn hash_limits(
        &self,
        raw: &RawAuth,
        positive_u32: impl Fn(&str, Option<u32>, u32) -> Result<u32, ConfigError>,
    ) -> Result<HashLimits, ConfigError> {
        let defaults = HashLimits::default();
        if raw.users_file.is_none() {
            for (key, set) in [
                ("auth.max_hash_memory", raw.max_hash_memory.is_some()),
                (
                    "auth.max_hash_iterations",
                    raw.max_hash_iterations.is_some(),
                ),
                (
                    "auth.max_hash_parallelism",
                    raw.max_hash_parallelism.is_some(),
                ),
            ] {
                if set {
                    return Err(self.err(key, "only used with auth.users_file"));
                }
            }
        }
        let max_memory_kib = match &raw.max_hash_memory {
            None => defaults.max_memory_kib,
            Some(size) => {
                let bytes = size
                    .to_bytes()
                    .map_err(|p| self.err("auth.max_hash_memory", p))?;
                // argon2's `m` is in KiB and at least 8 KiB: a smaller bound refuses every hash.
                if bytes < 8 * 1024 {
                    return Err(self.err(
                        "auth.max_hash_memory",
                        "must be at least 8KiB (argon2's smallest memory cost)",
                    ));
                }
                u32::try_from(bytes / 1024).unwrap_or(u32::MAX)
            }
        };
        Ok(HashLimits {
            max_memory_kib,
            max_iterations: positive_u32(
                "auth.max_hash_iterations",
                raw.max_hash_iterations,
                defaults.max_iterations,
            )?,
            max_parallelism: positive_u32(
                "auth.max_hash_parallelism",
                raw.max_hash_parallelism,
                defaults.max_parallelism,
            )?,
        })
    }

    fn signing(&self, raw: RawSigning) -> Result<SigningConfig, ConfigError> {
        let user_header = match raw.user_header {
            Some(h) => identity_header_name(&h).map_err(|p| self.err("signing.user_header", p))?,
            None => HeaderName::from_static("x-auth-user"),
        };
        let roles_header = match raw.roles_header {
            Some(h) => identity_header_name(&h).map_err(|p| self.err("signing.roles_header", p))?,
            None => HeaderName::from_static("x-auth-roles"),
        };
        if user_header == roles_header {
            return Err(self.err(
                "signing.roles_header",
                "must differ from signing.user_header",
            ));
        }
        // The signer covers the base components and both identity fields, then each extra
        // header present; verifiers refuse a longer list than their `Policy::max_components`
        // (default 64), so such a request could never verify.
        let most_covered = crate::core::BASE_COMPONENTS.len() + 2 + raw.extra_headers.len();
        if most_covered > crate::core::DEFAULT_MAX_COMPONENTS {
            return Err(self.err(
                "signing.extra_headers",
                format!(
                    "lists {} headers: with @method, @authority, @path, @query, content-digest \
                     and the two identity fields a signature could cover {most_covered} \
                     components, more than the {} a verifier accepts by default \
                     (Policy::max_components); list at most {}",
                    raw.extra_headers.len(),
                    crate::core::DEFAULT_MAX_COMPONENTS,
                    crate::core::DEFAULT_MAX_COMPONENTS - crate::core::BASE_COMPONENTS.len() - 2,
                ),
            ));
        }
        let mut extra_headers: Vec<HeaderName> = Vec::with_capacity(raw.extra_headers.len());
        for (i, text) in raw.extra_headers.iter().enumerate() {
            let key = format!("signing.extra_headers[{i}]");
            let name = self.signing_header(&key, text)?;
            // Each covered twice would fail every request ("component covered twice").
            for (identity, identity_key) in [
                (&user_header, "signing.user_header"),
                (&roles_header, "signing.roles_header"),
            ] {
                if name == identity {
                    return Err(self.err(
                        key,
                        format!("{text:?} is already covered as {identity_key}"),
                    ));
                }
            }
            if let Some(j) = extra_headers.iter().position(|h| *h == name) {
                return Err(self.err(
                    key,
                    format!("duplicate header {text:?} (also signing.extra_headers[{j}])"),
                ));
            }
            extra_headers.push(name);
        }
        Ok(SigningConfig {
            keyring: self.file_path(&raw.keyring),
            // `expires = created + window` in whole seconds: "500ms" would sign with
            // expires == created.
            window: self.whole_seconds(
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
        // Characters that load fine but leave the route dead, every request under it refused
        // or never matching: kept in step with `forward::check_path` (refuses `\` and raw
        // non-ASCII in request paths) and `Router::check_reading` (compares the path with
        // escapes decoded and `;` parameters dropped, so `/caf%C3%A9/x` reads as `/café/x`
        // and no longer matches the prefix `/caf%C3%A9/`).
        if let Some(c) = prefix.chars().find(|&c| {
            !c.is_ascii()
                || matches!(
                    c,
                    '%' | ';' | '\\' | '"' | '<' | '>' | '`' | '{' | '}' | '^' | '|'
                )
        }) {
            let why = match c {
                '%' | ';' => {
                    "the proxy compares request paths as an upstream may read them (escapes \
                     decoded, `;` parameters dropped), so every request under it would be \
                     refused"
                }
                '\\' => "the proxy refuses it in request paths",
                _ if !c.is_ascii() => {
                    "browsers percent-encode non-ASCII in a path and the proxy refuses it raw, \
                     so no request would match"
                }
                // `|` and `^` reach the proxy raw from some clients (curl; browsers for `|`)
                // and escaped from others (Python's requests, Go; Firefox for `^`), and an
                // escaped spelling reads as this prefix only once decoded: refused, 400.
                _ => {
                    "RFC 3986 does not allow it unescaped in a path, so HTTP clients that \
                     follow it (or the URL Standard) send it percent-encoded, and the proxy \
                     refuses an escaped spelling of a route's prefix: the route would work \
                     for some clients only"
                }
            };
            return Err(self.err(
                key("prefix"),
                format!(
                    "{prefix:?} contains {c:?}: {why}; use a prefix of unreserved ASCII \
                     characters (letters, digits, \"-\", \".\", \"_\", \"~\") between the \"/\""
                ),
            ));
        }
        // In any letter case: the proxy refuses a request path that reads as its own
        // `/auth/` with case ignored (400), so `/Auth/` would load and answer nothing.
        let reserved = prefix.get(..RESERVED_PREFIX.len());
        if reserved.is_some_and(|start| start.eq_ignore_ascii_case(RESERVED_PREFIX)) {
            return Err(self.err(
                key("prefix"),
                format!(
                    "{prefix:?} is under {RESERVED_PREFIX} (in any letter case), which the \
                     proxy answers itself"
                ),
            ));
        }
        let url = self.http_url(&key("url"), raw.url.trim())?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(self.err(
                key("url"),
                format!(
                    "{:?} must be scheme://host[:port] without a path or query",
                    redact_url(&raw.url)
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
        let cross_origin_redirects = match raw.cross_origin_redirects.as_deref().map(str::trim) {
            None | Some("refuse") => CrossOriginRedirects::Refuse,
            Some("pass") => CrossOriginRedirects::Pass,
            Some(other) => {
                return Err(self.err(
                    key("cross_origin_redirects"),
                    format!("{other:?} (use \"refuse\" or \"pass\")"),
                ))
            }
        };
        if raw.ca_file.is_some() && url.scheme_str() != Some("https") {
            return Err(self.err(key("ca_file"), "only used with an https:// url"));
        }
        let client_cert = self.client_cert(
            &format!("upstream[{i}]."),
            (raw.client_cert_file, raw.client_key_file),
            Some(url.scheme_str() == Some("https")),
            "url",
        )?;
        let websocket = self.websocket(
            i,
            raw.websocket,
            (
                raw.websocket_idle_timeout.as_deref(),
                raw.websocket_session_check.as_deref(),
                raw.websocket_max_open,
            ),
            (
                raw.websocket_close_timeout.as_deref(),
                raw.websocket_max_refusal_body.as_ref(),
            ),
        )?;
        if auth == RouteAuth::None && raw.websocket_session_check.is_some() {
            return Err(self.err(
                key("websocket_session_check"),
                "only used on a route that requires a session: with auth = \"none\" a \
                 WebSocket has no session to look up again (leave it out, or remove auth = \
                 \"none\")",
            ));
        }
        Ok(UpstreamConfig {
            websocket,
            client_cert,
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
            pool_max_lifetime: self.optional_duration(
                &key("pool_max_lifetime"),
                raw.pool_max_lifetime.as_deref(),
                Some(super::forward::DEFAULT_POOL_MAX_LIFETIME),
            )?,
            pool_stale_after: self.optional_duration(
                &key("pool_stale_after"),
                raw.pool_stale_after.as_deref(),
                Some(super::forward::DEFAULT_POOL_STALE_AFTER),
            )?,
            body_idle_timeout: self.duration(
                &key("body_idle_timeout"),
                raw.body_idle_timeout.as_deref(),
                super::forward::DEFAULT_BODY_IDLE_TIMEOUT,
            )?,
            max_response_header_count: self.answer_header_count(
                &key("max_response_header_count"),
                raw.max_response_header_count,
            )?,
            max_response_header_bytes: self.answer_header_bytes(
                &key("max_response_header_bytes"),
                raw.max_response_header_bytes.as_ref(),
            )?,
            ca_file: raw.ca_file.map(|f| self.file_path(&f)),
            required_for_ready: raw.required_for_ready,
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
            cross_origin_redirects,
        })
    }
}

impl Checker<'_> {
    /// `upstream[i].websocket` and its limits: the limits only with `websocket = true`, each
    /// above zero (durations as every duration: positive).
    fn websocket(
        &self,
        i: usize,
        enabled: bool,
        (idle_timeout, session_check, max_open): (Option<&str>, Option<&str>, Option<usize>),
        (close_timeout, max_refusal_body): (Option<&str>, Option<&RawSize>),
    ) -> Result<Option<super::forward::WebSocketRoute>, ConfigError> {
        use super::forward::{DEFAULT_WEBSOCKET_MAX_REFUSAL_BODY, MAX_WEBSOCKET_MAX_REFUSAL_BODY};
        let key = |k: &str| format!("upstream[{i}].{k}");
        if !enabled {
            let set = [
                ("websocket_idle_timeout", idle_timeout.is_some()),
                ("websocket_session_check", session_check.is_some()),
                ("websocket_max_open", max_open.is_some()),
                ("websocket_close_timeout", close_timeout.is_some()),
                ("websocket_max_refusal_body", max_refusal_body.is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                return Err(self.err(key(name), "only used with websocket = true"));
            }
            return Ok(None);
        }
        let idle_timeout = self.duration(
            &key("websocket_idle_timeout"),
            idle_timeout,
            DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
        )?;
        let session_check = self.duration(
            &key("websocket_session_check"),
            session_check,
            DEFAULT_WEBSOCKET_SESSION_CHECK,
        )?;
        let max_open = max_open.unwrap_or(DEFAULT_WEBSOCKET_MAX_OPEN);
        if max_open == 0 {
            return Err(self.err(
                key("websocket_max_open"),
                "must be at least 1 (leave websocket = false to refuse WebSockets)",
            ));
        }
        let close_timeout = self.duration(
            &key("websocket_close_timeout"),
            close_timeout,
            super::forward::DEFAULT_WEBSOCKET_CLOSE_TIMEOUT,
        )?;
        let max_refusal_body = self.size(
            &key("websocket_max_refusal_body"),
            max_refusal_body,
            DEFAULT_WEBSOCKET_MAX_REFUSAL_BODY,
        )?;
        if max_refusal_body > MAX_WEBSOCKET_MAX_REFUSAL_BODY {
            return Err(self.err(
                key("websocket_max_refusal_body"),
                format!(
                    "must be at most 16MiB (each refusal's body is held whole), not \
                     {max_refusal_body} bytes"
                ),
            ));
        }
        Ok(Some(
            super::forward::WebSocketRoute::new(idle_timeout, session_check, max_open)
                .with_close_timeout(close_timeout)
                .with_max_refusal_body(max_refusal_body),
        ))
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
        let max_body_memory_set = raw.server.max_body_memory.is_some();
        let per_client_set = raw.server.max_body_memory_per_client.is_some();
        let mut server = checker.server(raw.server)?;
        // Said before the values are read: a key that is not used is the first thing to fix.
        for (key, set) in [
            (
                "admin.readiness_probe_timeout",
                &raw.admin.readiness_probe_timeout,
            ),
            ("admin.readiness_cache", &raw.admin.readiness_cache),
        ] {
            if set.is_some() && raw.admin.listen.is_none() {
                return Err(checker.err(key, "only used with admin.listen"));
            }
        }
        let admin = AdminConfig {
            listen: raw
                .admin
                .listen
                .as_deref()
                .map(|a| checker.socket_addr("admin.listen", a))
                .transpose()?,
            max_connections: checker.connections(
                "admin.max_connections",
                raw.admin.max_connections,
                DEFAULT_ADMIN_MAX_CONNECTIONS,
            )?,
            allowed_hosts: (raw.admin.allowed_hosts.iter().flatten().enumerate())
                .map(|(i, entry)| {
                    admin_allowed_host(entry).map_err(|problem| {
                        checker.err(format!("admin.allowed_hosts[{i}]"), problem)
                    })
                })
                .collect::<Result<_, _>>()?,
            readiness: super::admin::ReadinessTiming {
                probe_timeout: checker.readiness_duration(
                    "admin.readiness_probe_timeout",
                    raw.admin.readiness_probe_timeout.as_deref(),
                    DEFAULT_READINESS_PROBE_TIMEOUT,
                )?,
                reuse_for: checker.readiness_duration(
                    "admin.readiness_cache",
                    raw.admin.readiness_cache.as_deref(),
                    DEFAULT_READINESS_CACHE,
                )?,
            },
        };
        if raw.admin.max_connections.is_some() && admin.listen.is_none() {
            return Err(checker.err("admin.max_connections", "only used with admin.listen"));
        }
        if raw.admin.allowed_hosts.is_some() && admin.listen.is_none() {
            return Err(checker.err("admin.allowed_hosts", "only used with admin.listen"));
        }
        if let Some(admin_listen) = admin.listen {
            if admin_listen == server.listen && admin_listen.port() != 0 {
                return Err(checker.err("admin.listen", "must differ from server.listen"));
            }
            if listen_addresses_overlap(admin_listen, server.listen) {
                return Err(checker.err(
                    "admin.listen",
                    format!(
                        "{admin_listen} overlaps server.listen {}: the same port, and a \
                         wildcard address (0.0.0.0, [::]) takes that port on every address, \
                         so the second listener cannot bind; use another port",
                        server.listen
                    ),
                ));
            }
        }
        let session = checker.session(raw.session, server.shutdown_grace)?;
        let auth = checker.auth(raw.auth)?;
        let signing = checker.signing(raw.signing)?;
        if server.trusted_proxies.any() {
            // The header is removed from every request on arrival (`server.rs`): an identity
            // field would be one the proxy signs for the API, an extra header one the
            // signature could then never cover.
            let header = server.trusted_proxies.header();
            let identity = [
                (&signing.user_header, "signing.user_header".to_owned()),
                (&signing.roles_header, "signing.roles_header".to_owned()),
            ];
            let extras = (signing.extra_headers.iter().enumerate())
                .map(|(i, name)| (name, format!("signing.extra_headers[{i}]")));
            if let Some((_, key)) = identity
                .into_iter()
                .chain(extras)
                .find(|(name, _)| *name == header)
            {
                let why = if key.starts_with("signing.extra_headers") {
                    "a field the signature covers from the browser's request: removed on \
                     arrival, it would never be signed"
                } else {
                    "an identity field the proxy signs for the API"
                };
                return Err(checker.err(
                    "server.client_address_header",
                    format!(
                        "{:?} cannot be used here: it is also {key}, {why}; the proxy removes \
                         this header from every request on arrival",
                        header.as_str()
                    ),
                ));
            }
        }
        if raw.upstream.is_empty() {
            return Err(checker.err("upstream", "missing: at least one [[upstream]] is required"));
        }
        let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstream.len());
        for (i, raw_upstream) in raw.upstream.into_iter().enumerate() {
            let upstream = checker.upstream(i, raw_upstream)?;
            // A WebSocket's traffic keeps its session alive only through these checks (each
            // touches the session; with Redis a touch may be skipped for up to half the idle
            // timeout): checked less often than that, a busy socket's session expired and the
            // socket was closed 1008 `session_ended`, the user logged out.
            let session_check = (upstream.websocket.as_ref())
                .filter(|_| upstream.auth == RouteAuth::Required)
                .map(|route| route.limits().session_check);
            if let Some(check) = session_check {
                if check.saturating_mul(2) >= session.idle_timeout {
                    return Err(checker.err(
                        format!("upstream[{i}].websocket_session_check"),
                        format!(
                            "must be less than half of session.idle_timeout ({}s, {}s): only these \
                             checks keep a WebSocket's session alive, and a busy socket's \
                             session would otherwise expire",
                            check.as_secs_f64(),
                            session.idle_timeout.as_secs()
                        ),
                    ));
                }
            }
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
        // Every body a route or the login accepts must fit in `server.max_body_memory` on its
        // own, or it could never be read: a value set below one is an error, the default is
        // raised to it.
        let largest = (upstreams.iter().enumerate())
            .map(|(i, u)| (u.max_body, format!("upstream[{i}].max_body")))
            .chain([(auth.max_login_body, "auth.max_login_body".to_owned())])
            .max_by_key(|(bytes, _)| *bytes);
        if let Some((bytes, key)) = largest {
            if !max_body_memory_set {
                server.max_body_memory = server.max_body_memory.max(bytes);
            } else if server.max_body_memory < bytes {
                return Err(checker.err(
                    "server.max_body_memory",
                    format!(
                        "{} bytes is less than {key} ({bytes} bytes): a body that size could \
                         never be read; raise max_body_memory (it bounds all bodies being read \
                         at once) or lower {key}",
                        server.max_body_memory
                    ),
                ));
            }
            // The same for one client's share: a quarter of the cap by default, raised to the
            // largest body; a value set below it is an error. Above the cap it does nothing.
            if !per_client_set {
                server.max_body_memory_per_client = Some(default_max_body_memory_per_client(
                    server.max_body_memory,
                    bytes,
                ));
            } else if let Some(per_client) =
                server.max_body_memory_per_client.filter(|&set| set < bytes)
            {
                return Err(checker.err(
                    "server.max_body_memory_per_client",
                    format!(
                        "{per_client} bytes is less than {key} ({bytes} bytes): a body that \
                         size could never be read by anyone; raise max_body_memory_per_client \
                         (the most of server.max_body_memory one client may hold at once), \
                         set it to \"off\", or lower {key}"
                    ),
                ));
            }
        }
        let config = ProxyConfig {
            source: path.to_path_buf(),
            server,
            admin,
            session,
            auth,
            signing,
            upstreams,
            as_loaded: LoadedText::default(),
        };
        if let Some((key, other)) = config.file_named_by_snapshot_file() {
            return Err(checker.err(
                "session.snapshot_file",
                format!(
                    "is the file {key} names ({}): the proxy removes that file at the start and \
                     writes a snapshot over it at the stop; give snapshot_file a file of its own",
                    other.display()
                ),
            ));
        }
        if let Some((lock, key, other)) = config.file_named_by_snapshot_lock() {
            return Err(checker.err(
                "session.snapshot_file",
                format!(
                    "its lock file {} is the file {key} names ({}): the proxy would hold that \
                     file open for writing and locked for its whole life, and an edit that \
                     replaces it would end the lock unnoticed; give snapshot_file a name whose \
                     \".lock\" is no other file",
                    lock.display(),
                    other.display()
                ),
            ));
        }
        Ok(config)
    }
}

impl ProxyConfig {
    /// The key and path of a file this config reads that `session.snapshot_file` names too
    /// (the same file, through any link), if any: the config file itself, the keyring and the
    /// `secret_file`s it names, the users file, the TLS pair, the CA and client-certificate
    /// files.
    pub fn file_named_by_snapshot_file(&self) -> Option<(String, PathBuf)> {
        let snapshot = self.session.snapshot_file.as_deref()?;
        self.configured_file_at(snapshot)
    }

    /// The lock file of `session.snapshot_file` (`<file>.lock`), with the key and path of a
    /// file this config reads that it is too (by name or hard link), if any, as
    /// [`ProxyConfig::file_named_by_snapshot_file`] for the snapshot. A symbolic link at the
    /// lock's name is not one: the lock refuses to open it (an ERROR line at the start, not a
    /// config error).
    pub fn file_named_by_snapshot_lock(&self) -> Option<(PathBuf, String, PathBuf)> {
        let snapshot = self.session.snapshot_file.as_deref()?;
        let lock = super::session_snapshot::lock_path(snapshot);
        let is_file = std::fs::symlink_metadata(&lock).is_ok_and(|meta| meta.file_type().is_file());
        if !is_file {
            return None;
        }
        let (key, other) = self.configured_file_at(&lock)?;
        Some((lock, key, other))
    }

    /// The key and path of a file this config reads that `path` names too.
    fn configured_file_at(&self, snapshot: &Path) -> Option<(String, PathBuf)> {
        // A key's `secret_file` is read at every start and reload like the keyring itself:
        // the start would remove the secret and the stop write a snapshot in its place. (A
        // keyring that cannot be read or parsed names none here; loading it says why.)
        // Read as the keyring is loaded: into a buffer sized before reading, as a growing one
        // would free its earlier copies of the secrets unzeroized.
        let secret_files: Vec<(String, PathBuf)> =
            crate::keyfile::read_limited(&self.signing.keyring)
                .map(|text| crate::keyfile::secret_files(&text, &self.signing.keyring))
                .unwrap_or_default()
                .into_iter()
                .map(|file| ("signing.keyring's secret_file".to_owned(), file))
                .collect();
        let mut read: Vec<(String, &Path)> = vec![
            ("the config file".to_owned(), self.source.as_path()),
            ("signing.keyring".to_owned(), self.signing.keyring.as_path()),
        ];
        read.extend(
            secret_files
                .iter()
                .map(|(key, p)| (key.clone(), p.as_path())),
        );
        read.extend((self.auth.users_file.as_deref()).map(|p| ("auth.users_file".to_owned(), p)));
        if let Some(tls) = &self.server.tls {
            read.push(("server.tls_cert".to_owned(), tls.cert.as_path()));
            read.push(("server.tls_key".to_owned(), tls.key.as_path()));
        }
        read.extend(
            (self.auth.verify_ca_file.as_deref()).map(|p| ("auth.verify_ca_file".to_owned(), p)),
        );
        for (i, upstream) in self.upstreams.iter().enumerate() {
            read.extend(
                (upstream.ca_file.as_deref()).map(|p| (format!("upstream[{i}].ca_file"), p)),
            );
        }
        for files in self.client_cert_files() {
            read.push((files.cert_setting.clone(), files.cert.as_path()));
            read.push((files.key_setting.clone(), files.key.as_path()));
        }
        read.into_iter()
            .find(|(_, other)| super::session_snapshot::same_file(snapshot, other))
            .map(|(key, other)| (key, other.to_path_buf()))
    }

    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = read_text_file(path, "config file")?;
        Self::parse(&text, path)
    }

    /// Checks config `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<ProxyConfig, ConfigError> {
        let raw: RawConfig = deserialize_toml(text, path)?;
        let mut config = ProxyConfig::try_from((raw, path))?;
        // A text that passed the checks above is valid TOML.
        config.as_loaded = LoadedText(text.parse::<toml::Table>().ok().map(std::sync::Arc::new));
        Ok(config)
    }

    /// Reads the config file again and compares it with what this config was read from
    /// (SIGHUP, and a file change with `server.reload_check_interval`): a running proxy applies
    /// the [`LIVE_KEYS`] of a valid file and keeps its other settings, so an operator who
    /// edited the file learns which keys were applied and which wait for a restart, or that
    /// the file as it is now would not start the proxy. The file is checked as `run` checks
    /// it, without the files it names (a reload loads those). Blocking (reads the file).
    pub fn compare_with_file(&self) -> ConfigFileNow {
        self.compare_file_with(&self.as_loaded)
    }

    /// [`ProxyConfig::compare_with_file`] against `running`: the contents this config was read
    /// from with the live settings a reload applied since ([`LoadedText::with_live_keys_from`]).
    pub fn compare_file_with(&self, running: &LoadedText) -> ConfigFileNow {
        let Some(loaded) = &running.0 else {
            return ConfigFileNow::Unchanged;
        };
        let text = match read_text_file(&self.source, "config file") {
            Ok(text) => text,
            Err(e) => return ConfigFileNow::Invalid(e),
        };
        let checked = match ProxyConfig::parse(&text, &self.source) {
            Ok(checked) => checked,
            Err(e) => return ConfigFileNow::Invalid(e),
        };
        let Some(now) = &checked.as_loaded.0 else {
            return ConfigFileNow::Invalid(ConfigError::new(
                &self.source,
                "",
                "the file is not valid TOML",
            ));
        };
        let mut keys = Vec::new();
        changed_keys("", loaded, now, &mut keys);
        let keys = self.keys_that_change_settings(running, &checked, keys);
        if keys.is_empty() {
            ConfigFileNow::Unchanged
        } else {
            ConfigFileNow::Changed(ChangedFile {
                keys,
                now: Box::new(checked),
            })
        }
    }

    /// `keys` (the keys of the file `now` whose TOML differs from `running`'s) without those
    /// that wait for a restart yet would change no setting: a default written out
    /// (`sweep_interval = "60s"` added to `[session]`) or a value spelled another way
    /// (`"10000ms"` for `"10s"`, `65536` for `"64KiB"`, `"./www"` for `"www"`). A restart
    /// would run what runs already, so such a key is neither named in the warning nor counted
    /// in `countersign_config_file_changed`. Judged on the checked settings: the file's
    /// against those of `running` with the file's changed live keys taken (what this reload
    /// leaves running); when they differ, each waiting key on its own, taken from the file
    /// into those contents. The live keys that change a setting are kept as they are (what
    /// applying them means is `server::apply_live_keys`'s to say); those that change none
    /// are dropped first ([`Self::without_respelled_live_keys`]). A key that cannot be judged alone (an
    /// `[[upstream]]` entry added or removed; a value that checks only together with another
    /// edit) stays named, and so does every waiting key when the settings differ but no key
    /// alone makes them differ: rather a restart too many than one missed.
    fn keys_that_change_settings(
        &self,
        running: &LoadedText,
        now: &ProxyConfig,
        keys: Vec<String>,
    ) -> Vec<String> {
        let mut keys = self.without_respelled_live_keys(running, now, keys);
        if keys.iter().all(|key| is_live_key(key)) {
            return keys;
        }
        let mut live: Vec<String> = (keys.iter())
            .filter_map(|key| match live_key_of(key) {
                Some(live) => Some(live.to_owned()),
                None => live_upstream_key_of(key).map(|(i, live)| format!("upstream[{i}].{live}")),
            })
            .collect();
        live.sort();
        live.dedup();
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let base = running.with_keys_from(&now.as_loaded, &live);
        let Some(settings) = self.settings_of(&base) else {
            return keys;
        };
        if settings.same_settings(now) {
            keys.retain(|key| is_live_key(key));
            return keys;
        }
        let changed: Vec<String> = (keys.iter())
            .filter(|key| is_live_key(key) || self.changes_alone(&base, now, &settings, key))
            .cloned()
            .collect();
        if changed.iter().all(|key| is_live_key(key)) {
            keys
        } else {
            changed
        }
    }

    /// `keys` without the live keys that change no setting: a value spelled another way
    /// (`idle_timeout = "20m"` for `"1200s"`) or a default written out. Applying one would
    /// change nothing, and a line saying it was applied would tell the operator something
    /// happened when nothing did. Each live key is judged alone: taken from the file `now`
    /// into `running`'s contents, are the checked settings those of `running`? A key that
    /// cannot be taken alone (an `[[upstream]]` entry added or removed, a quoted header name)
    /// or whose contents would not check stays: rather a line too many than a change unsaid.
    fn without_respelled_live_keys(
        &self,
        running: &LoadedText,
        now: &ProxyConfig,
        mut keys: Vec<String>,
    ) -> Vec<String> {
        if !keys.iter().any(|key| is_live_key(key)) {
            return keys;
        }
        let Some(settings) = self.settings_of(running) else {
            return keys;
        };
        keys.retain(|key| !is_live_key(key) || self.changes_alone(running, now, &settings, key));
        keys
    }

    /// Whether `key`, taken alone from the file `now` into `base`'s contents, makes checked
    /// settings other than `settings`. An entry added or removed whole, or a name that is not a
    /// bare key (a header name with a dot is a live key's anyway), is not taken alone, and
    /// neither is a value that would not check without another edit: each counts as a change
    /// (rather named once too often than missed).
    fn changes_alone(
        &self,
        base: &LoadedText,
        now: &ProxyConfig,
        settings: &ProxyConfig,
        key: &str,
    ) -> bool {
        let last = key.rsplit('.').next().unwrap_or(key);
        if key.contains('"') || array_entry(last).is_some() {
            return true;
        }
        let alone = base.with_keys_from(&now.as_loaded, &[key]);
        let taken = match (&alone.0, &now.as_loaded.0) {
            (Some(alone), Some(file)) => value_at(alone, key) == value_at(file, key),
            _ => false,
        };
        !taken
            || self
                .settings_of(&alone)
                .is_none_or(|alone| !alone.same_settings(settings))
    }

    /// The settings `contents` would run as this file (relative paths against its folder),
    /// checked as [`ProxyConfig::parse`] checks a file; None if they would not start the proxy.
    fn settings_of(&self, contents: &LoadedText) -> Option<ProxyConfig> {
        let text = toml::to_string(contents.0.as_deref()?).ok()?;
        ProxyConfig::parse(&text, &self.source).ok()
    }

    /// Whether `other` holds the same settings, each compared as checked (a duration as its
    /// length, a size as its bytes, a path as its components), whatever text each was read
    /// from. The config file's name is compared too; the contents kept for the next reload
    /// ([`ProxyConfig::as_loaded`]) are not.
    pub fn same_settings(&self, other: &ProxyConfig) -> bool {
        // Named one by one, so that a field added to the config is compared too.
        let ProxyConfig {
            source,
            server,
            admin,
            session,
            auth,
            signing,
            upstreams,
            as_loaded: _,
        } = self;
        *source == other.source
            && *server == other.server
            && *admin == other.admin
            && *session == other.session
            && *auth == other.auth
            && *signing == other.signing
            && *upstreams == other.upstreams
    }

    /// Loads the keyring named by `signing.keyring`. A keyring file that cannot be read is
    /// reported against this config file and `signing.keyring` (which names it); problems
    /// inside the keyring name the keyring file and the key there (`keys[0].secret`).
    pub fn load_keyring(&self) -> Result<Keyring, ConfigError> {
        let file = &self.signing.keyring;
        crate::keyfile::load_keyring(file).map_err(|e| {
            if e.kind() == crate::keyfile::KeyfileErrorKind::Unreadable
                && e.key().is_none()
                && e.file() == file.as_path()
            {
                let why = e
                    .problem()
                    .strip_prefix("cannot read: ")
                    .unwrap_or(e.problem());
                self.unreadable("signing.keyring", "keyring file", file, why)
            } else {
                ConfigError::new(e.file(), e.key().unwrap_or(""), e.problem().to_owned())
            }
        })
    }

    /// Loads the users file named by `auth.users_file`, if one is configured, with the
    /// `auth.max_hash_*` bounds on its hashes and `auth.max_username_bytes` on its names (a
    /// longer name could never log in). A users file that cannot be read is reported against
    /// this config file and `auth.users_file`; problems inside it name the users file and the
    /// key there (`users[2].password`). A file without users is refused too (`users`): nobody
    /// could log in. `run`, `check-config` and SIGHUP all load it through here.
    pub fn load_users(&self) -> Result<Option<UserDb>, ConfigError> {
        let Some(file) = self.auth.users_file.as_deref() else {
            return Ok(None);
        };
        let text =
            read_text_file_within(file, "users file", self.auth.max_users_file).map_err(|e| {
                // `read_text_file`'s whole-file errors: "cannot read users file: <io error>" or
                // "users file is larger than ...".
                if let Some(size) = e.problem().strip_prefix("users file is ") {
                    return self.unreadable(
                        "auth.users_file",
                        "users file",
                        file,
                        &format!("{size} (auth.max_users_file; raise it for more users)"),
                    );
                }
                let why = e
                    .problem()
                    .strip_prefix("cannot read users file: ")
                    .unwrap_or(e.problem());
                self.unreadable("auth.users_file", "users file", file, why)
            })?;
        let db = UserDb::parse_with_name_limit(
            &text,
            file,
            &self.auth.hash_limits,
            self.auth.max_username_bytes,
        )?;
        if db.is_empty() {
            return Err(ConfigError::new(
                file,
                "users",
                "no users: nobody could log in (add a [[users]] table with a name and a \
                 `countersign hash-password` hash, or check logins with auth.verify_url)",
            ));
        }
        Ok(Some(db))
    }

    /// "`<config>`: `<key>`: cannot read `<what>` `<file>`: `<why>`".
    fn unreadable(&self, key: &str, what: &str, file: &Path, why: &str) -> ConfigError {
        ConfigError::new(
            &self.source,
            key,
            format!("cannot read {what} {}: {why}", file.display()),
        )
    }

    /// Everything `check-config` verifies beyond the file itself: the keyring and the users
    /// file load, the Redis URL and CA file are usable (read and parsed exactly as `run` does,
    /// through [`redis_connection`](super::session_redis::redis_connection)), the TLS files can
    /// be read, `static_dir` is a folder.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        self.load_keyring()?;
        self.load_users()?;
        if let StoreKind::Redis { url, .. } = &self.session.store {
            super::session_redis::redis_connection(self, url)?;
        }
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
        for files in self.client_cert_files() {
            files.check(&self.source)?;
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

    /// Every configured client certificate: the upstreams' in order, then `verify_url`'s.
    pub fn client_cert_files(&self) -> impl Iterator<Item = &ClientCertFiles> {
        self.upstreams
            .iter()
            .filter_map(|u| u.client_cert.as_ref())
            .chain(self.auth.verify_client_cert.as_ref())
    }

    /// Reloads every client certificate loaded from this config (SIGHUP, and a file change
    /// with `server.reload_check_interval`): Ok lines for those reloaded, Err lines for those
    /// kept (their files failed the checks). New connections present the reloaded ones.
    pub fn reload_client_certs(&self) -> Vec<Result<String, String>> {
        self.client_cert_files()
            .filter_map(ClientCertFiles::loaded)
            .map(|cert| cert.reload())
            .collect()
    }

    /// The upstream whose prefix is the longest one matching `path`: `path` starts with the
    /// prefix, or is the prefix without its trailing `/` (`/api` goes to the `/api/` route,
    /// `/apix` does not), as the proxy's router (`forward::Router`) matches.
    pub fn route(&self, path: &str) -> Option<&UpstreamConfig> {
        self.upstreams
            .iter()
            .filter(|u| path.starts_with(&u.prefix) || path == u.prefix.trim_end_matches('/'))
            .max_by_key(|u| u.prefix.len())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_tags_as_redis_cluster_reads_them() {
        for prefix in ["{countersign}:", "app:{x}:", "{a}{b}", "a}{b}"] {
            assert!(super::has_hash_tag(prefix), "{prefix}");
        }
        for prefix in ["countersign:", "{}:", "{}{x}", "{countersign:", "}x{", ""] {
            assert!(!super::has_hash_tag(prefix), "{prefix}");
        }
    }

    use super::*;

    fn changes(before: &str, after: &str) -> Vec<String> {
        let mut out = Vec::new();
        changed_keys(
            "",
            &before.parse().unwrap(),
            &after.parse().unwrap(),
            &mut out,
        );
        out
    }

    /// Key paths as errors name them, values never; layout and comments are no change.
    #[test]
    fn live_keys_are_the_response_headers_the_throttle_limits_and_only_those() {
        for key in [
            "server.response_headers",
            "server.response_headers.content-security-policy",
            "server.response_headers.\"x.y\"",
            "server.response_headers_on_upstream",
            "auth.throttle.max_failures_per_ip",
            "auth.throttle.max_failures_per_user",
            "auth.throttle.window",
            "auth.throttle.max_tracked_keys",
        ] {
            assert!(is_live_key(key), "{key}");
        }
        assert_eq!(
            live_key_of("server.response_headers.x-frame-options"),
            Some("server.response_headers")
        );
        for key in [
            "server.response_headers_x",
            "server.response_headers_on_upstreams",
            "server.public_origin",
            "server",
            "upstream[0].response_headers",
            "auth.throttle",
            "auth.throttle.windows",
            "auth.max_failures_per_ip",
            "auth.users_file",
        ] {
            assert!(!is_live_key(key), "{key}");
        }
    }

    /// The live keys of each `[[upstream]]` (`upstream[i].timeout`, ...), the session
    /// lifetimes and the static limits; not an upstream's other keys.
    #[test]
    fn upstream_session_and_static_limits_are_live_keys() {
        for key in [
            "upstream[0].timeout",
            "upstream[12].max_body",
            "upstream[1].body_idle_timeout",
            "upstream[0].connect_timeout",
            "session.idle_timeout",
            "session.absolute_timeout",
            "server.request_timeout",
            "server.header_read_timeout",
            "server.send_timeout",
            "server.http2_idle_timeout",
            "server.http2_max_reset_streams",
            "server.shutdown_grace",
            "server.max_header_bytes",
            "server.max_header_count",
            "server.http2_max_concurrent_streams",
            "server.http1_half_close",
            "server.max_connections",
            "admin.max_connections",
            "server.max_static_file",
            "server.static_cache_size",
            "server.static_immutable",
        ] {
            assert!(is_live_key(key), "{key}");
        }
        assert_eq!(
            live_upstream_key_of("upstream[3].max_body"),
            Some((3, "max_body"))
        );
        for key in [
            "upstream[0].name",
            "upstream[0].prefix",
            "upstream[0].pool_idle_timeout",
            "upstream[0].connect_timeout.x",
            "upstream[0].timeout.x",
            "upstream.timeout",
            "upstream[x].timeout",
            "upstreams[0].timeout",
            "upstream[0]",
            "session.cookie_name",
            "session.store",
            "server.static_dir",
            "server.listen",
            "server.tls_cert",
            "admin.listen",
            "server.max_connections_x",
        ] {
            assert!(!is_live_key(key), "{key}");
        }
    }

    /// An applied upstream key goes into its entry of the baseline's `[[upstream]]` array;
    /// an entry only the file has is never made.
    #[test]
    fn a_baseline_takes_live_keys_of_upstream_entries() {
        let loaded = |text: &str| LoadedText(Some(std::sync::Arc::new(text.parse().unwrap())));
        let start = loaded("[[upstream]]\nname = \"a\"\n[[upstream]]\nname = \"b\"\n");
        let file = "[[upstream]]\nname = \"a\"\n[[upstream]]\nname = \"b\"\ntimeout = \"1s\"\n\
                    [[upstream]]\nname = \"c\"\ntimeout = \"2s\"\n";
        let running = start.with_keys_from(
            &loaded(file),
            &[
                "upstream[1].timeout",
                "upstream[0].timeout",
                "upstream[2].timeout",
            ],
        );
        let mut keys = Vec::new();
        changed_keys(
            "",
            running.0.as_ref().unwrap(),
            &file.parse().unwrap(),
            &mut keys,
        );
        assert_eq!(keys, ["upstream[2]"]);
    }

    /// The baseline after a reload applied the live keys: the file's live keys, the start's
    /// others; compared with the file, only the others differ.
    #[test]
    fn a_baseline_takes_the_live_keys_only() {
        let loaded = |text: &str| LoadedText(Some(std::sync::Arc::new(text.parse().unwrap())));
        let start = loaded(
            "[server]\nlisten = \"a\"\n[server.response_headers]\nx-frame-options = \"DENY\"\n",
        );
        let file = "[server]\nlisten = \"b\"\nresponse_headers_on_upstream = true\n";
        let running = start.with_live_keys_from(&loaded(file));
        let mut keys = Vec::new();
        changed_keys(
            "",
            running.0.as_ref().unwrap(),
            &file.parse().unwrap(),
            &mut keys,
        );
        assert_eq!(keys, ["server.listen"]);
        assert!(LoadedText::default()
            .with_live_keys_from(&start)
            .0
            .is_none());
    }

    /// Nested live keys (`auth.throttle.window`): set, added with their tables, removed; only
    /// the keys asked for are taken.
    #[test]
    fn a_baseline_takes_nested_live_keys() {
        let loaded = |text: &str| LoadedText(Some(std::sync::Arc::new(text.parse().unwrap())));
        let differ = |running: &LoadedText, file: &str| {
            let mut keys = Vec::new();
            changed_keys(
                "",
                running.0.as_ref().unwrap(),
                &file.parse().unwrap(),
                &mut keys,
            );
            keys
        };
        let start = loaded("[auth]\nusers_file = \"u\"\n");
        let file = "[auth]\nusers_file = \"v\"\n[auth.throttle]\nwindow = \"1h\"\n\
                    max_failures_per_ip = 3\n[server.response_headers]\nx-a = \"b\"\n";
        let running = start.with_keys_from(&loaded(file), &LIVE_THROTTLE_KEYS);
        assert_eq!(
            differ(&running, file),
            ["auth.users_file", "server.response_headers.x-a"]
        );
        // Removed from the file: removed from the baseline (no empty table left to differ).
        let back = "[auth]\nusers_file = \"v\"\n[server.response_headers]\nx-a = \"b\"\n";
        let running = running.with_live_keys_from(&loaded(back));
        assert_eq!(differ(&running, back), ["auth.users_file"]);
        let mut keys = Vec::new();
        changed_keys(
            "",
            running.0.as_ref().unwrap(),
            start.0.as_ref().unwrap(),
            &mut keys,
        );
        assert_eq!(keys, ["server.response_headers.x-a"]);
    }

    #[test]
    fn changed_keys_name_every_difference_and_only_those() {
        let before = "[server]\nlisten = \"127.0.0.1:8080\"\n\
                      [server.response_headers]\n\"x.dotted\" = \"a\"\n\
                      [[upstream]]\nprefix = \"/a\"\ntimeout = \"5s\"\n\
                      [[upstream]]\nprefix = \"/b\"\n\
                      [auth]\nallowed = [\"x\", \"y\"]\n";
        let reformatted = "# a comment\n[auth]\nallowed = [ \"x\",\"y\" ]\n\
                           [server]\nlisten=\"127.0.0.1:8080\"\n\
                           [server.response_headers]\n\"x.dotted\"=\"a\"\n\
                           [[upstream]]\ntimeout = \"5s\"\nprefix = \"/a\"\n\
                           [[upstream]]\nprefix = \"/b\"\n";
        assert!(changes(before, reformatted).is_empty());
        let after = "[server]\nlisten = \"127.0.0.1:8080\"\nmax_body = \"1MiB\"\n\
                     [server.response_headers]\n\"x.dotted\" = \"b\"\n\
                     [[upstream]]\nprefix = \"/a\"\ntimeout = \"6s\"\n\
                     [[upstream]]\nprefix = \"/b\"\n\
                     [[upstream]]\nprefix = \"/c\"\n\
                     [auth]\nallowed = [\"y\", \"x\"]\n";
        assert_eq!(
            changes(before, after),
            [
                "auth.allowed",
                "server.max_body",
                "server.response_headers.\"x.dotted\"",
                "upstream[0].timeout",
                "upstream[2]",
            ]
        );
        // A key removed counts as much as one added.
        assert_eq!(changes(after, before)[1], "server.max_body");
        // A table added (or removed) names its keys.
        assert_eq!(
            changes(
                "[server]\nlisten = \"x\"\n",
                "[server]\nlisten = \"x\"\n[admin]\nlisten = \"y\"\n"
            ),
            ["admin.listen"]
        );
    }

    /// `key_at` at the first byte of `needle` in `text`.
    fn key_of(text: &str, needle: &str) -> Option<String> {
        key_at(text, text.find(needle).expect("needle in text"))
    }

    #[test]
    fn key_at_follows_tables_arrays_of_tables_and_dotted_keys() {
        let text = "top = 1\n[server]\nlisten = X1\n\n# a comment [x]\n[[upstream]]\nname = X2\n\
                    [[upstream]]\nname = \"b\" # c\ntimeout = X3\n[upstream.tls]\nca = X4\n\
                    [ auth ]\nthrottle . window = X5\n[[upstream]]\nx = X6";
        assert_eq!(key_of(text, "1").as_deref(), Some("top"));
        assert_eq!(key_of(text, "X1").as_deref(), Some("server.listen"));
        assert_eq!(key_of(text, "X2").as_deref(), Some("upstream[0].name"));
        assert_eq!(key_of(text, "X3").as_deref(), Some("upstream[1].timeout"));
        assert_eq!(key_of(text, "X4").as_deref(), Some("upstream[1].tls.ca"));
        assert_eq!(key_of(text, "X5").as_deref(), Some("auth.throttle.window"));
        assert_eq!(key_of(text, "X6").as_deref(), Some("upstream[2].x"));
    }

    /// No key rather than a possibly wrong one.
    #[test]
    fn key_at_gives_up_where_a_line_cannot_be_placed() {
        // The offset in the key, not the value; a line without `=`.
        assert_eq!(key_of("[s]\nlisten = 1\n", "listen"), None);
        assert_eq!(key_of("[s]\nlisten\n", "listen"), None);
        // Quoted keys and table names.
        assert_eq!(key_of("[s]\n\"a b\" = X\n", "X"), None);
        assert_eq!(key_of("[\"s t\"]\na = X\n", "X"), None);
        // After a multi-line array, inline table or string.
        assert_eq!(key_of("a = [\n1,\n]\nb = X\n", "X"), None);
        assert_eq!(key_of("a = {\n}\nb = X\n", "X"), None);
        assert_eq!(key_of("a = \"\"\"\n[t]\n\"\"\"\nb = X\n", "X"), None);
        // One-line values with brackets and quotes are read correctly.
        assert_eq!(
            key_of("a = [\"]\", '[', \"\\\"[\"] # [\nb = X\n", "X").as_deref(),
            Some("b")
        );
        // Offsets at or past the end.
        assert_eq!(key_at("a = 1", 5).as_deref(), Some("a"));
        assert_eq!(key_at("a = 1", 99).as_deref(), Some("a"));
        assert_eq!(key_at("", 0), None);
    }

    /// Every field the signature always covers is refused as a `[signing]` header (covering
    /// it again fails every request), whatever the profile's list becomes.
    #[test]
    fn fields_the_signature_always_covers_are_reserved() {
        for name in crate::core::BASE_COMPONENTS {
            if name.starts_with('@') {
                continue;
            }
            let name = HeaderName::from_static(name);
            assert!(reserved_signing_header(&name).is_some(), "{name}");
        }
    }

    /// A port that does not fit, 0 or an empty one is refused (the `http` crate reads each as
    /// "no port", i.e. the scheme's default); no port, or a port in 1..=65535, is read.
    #[test]
    fn authority_ports_outside_1_to_65535_or_empty_are_refused() {
        for (authority, port) in [
            ("h", None),
            ("h:1", Some(1)),
            ("h:65535", Some(65535)),
            ("u:p@h:8080", Some(8080)),
            ("[::1]", None),
            ("[::1]:443", Some(443)),
            ("u:p:x@[fd00::7]:9443", Some(9443)),
        ] {
            assert_eq!(authority_port(authority), Ok(port), "{authority}");
        }
        for authority in [
            "h:", "h:0", "h:65536", "h:99999", "h:+80", "h:-1", "h:8o", "[::1]:", "[::1]:0",
            "u:p@h:",
        ] {
            assert!(authority_port(authority).is_err(), "{authority}");
        }
    }

    /// Everything between the scheme and the last `@` is left out of messages.
    #[test]
    fn redact_url_hides_user_info() {
        assert_eq!(
            redact_url("redis://:pw@h:6379/0"),
            "redis://[redacted]@h:6379/0"
        );
        assert_eq!(redact_url("http://u:p/w@rd@h/x"), "http://[redacted]@h/x");
        assert_eq!(redact_url("u:pw@h"), "[redacted]@h");
        assert_eq!(redact_url("https://h:8443/"), "https://h:8443/");
        // A password whose `@` was forgotten reads as a port that is not a number.
        assert_eq!(redact_url("redis://:p/w#x/0"), "redis://:[redacted]");
        assert_eq!(redact_url("10.0.0.1:pw"), "10.0.0.1:[redacted]");
        assert_eq!(redact_url("redis://[::1]:6379/0"), "redis://[::1]:6379/0");
        assert_eq!(redact_url("redis://[::1]:pw"), "redis://[::1]:[redacted]");
        assert_eq!(redact_url("redis://h/0"), "redis://h/0");
        // Without a scheme, a `://` further on (in the path or query) is not one: the user
        // info before the `@`, or a password in the port, is left out all the same.
        assert_eq!(
            redact_url("admin:hunter2@auth.internal/verify?next=https://x"),
            "[redacted]@auth.internal/verify?next=https://x"
        );
        assert_eq!(
            redact_url("10.0.0.1:hunter2/x?next=https://y"),
            "10.0.0.1:[redacted]"
        );
        assert_eq!(
            redact_url("redis//:hunter2@h/0?x=a://b"),
            "[redacted]@h/0?x=a://b"
        );
    }

    /// URL keys: a bad port names the key, and a password is never quoted.
    #[test]
    fn url_keys_refuse_bad_ports_and_never_quote_passwords() {
        let origin = PublicOrigin::parse("http://app.test:80800").unwrap_err();
        assert!(origin.contains("80800"), "{origin}");
        assert_eq!(
            PublicOrigin::parse("https://app.test:8443").map(|o| o.port),
            Ok(Some(8443))
        );
        let origin = PublicOrigin::parse("https://u:S3cret@app.test").unwrap_err();
        assert!(!origin.contains("S3cret"), "{origin}");
        let checker = Checker {
            path: Path::new("proxy.toml"),
            base: PathBuf::from("."),
        };
        for url in [
            "http://h:0",
            "http://h:",
            "http://h:70000",
            "https://[::1]:",
        ] {
            let err = checker.http_url("upstream[0].url", url).unwrap_err();
            assert_eq!(err.key(), "upstream[0].url", "{err}");
        }
        let err = checker
            .http_url("auth.verify_url", "http://svc:S3cret@h:99999/verify")
            .unwrap_err();
        assert!(!err.to_string().contains("S3cret"), "{err}");
        assert!(checker
            .http_url("upstream[0].url", "https://[::1]:8443")
            .is_ok());
    }

    /// `admin.allowed_hosts` defaults to none; its entries are kept as the admin listener
    /// compares them: in lower case, without a fully qualified name's trailing dot.
    #[test]
    fn admin_allowed_hosts_default_to_none_and_are_read_in_lower_case() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\n\
                    public_origin = \"http://localhost:8080\"\n\
                    [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
                    [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\n\
                    url = \"http://127.0.0.1:3000\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n";
        let path = Path::new("/etc/countersign/proxy.toml");
        let config = ProxyConfig::parse(base, path).expect("valid config");
        assert!(config.admin.allowed_hosts.is_empty());
        assert!(AdminConfig::default().allowed_hosts.is_empty());
        let text = format!(
            "{base}allowed_hosts = [\"Countersign-Admin.Monitoring.svc\", \"prometheus_target\", \
             \"admin.cluster.local.\"]\n"
        );
        let config = ProxyConfig::parse(&text, path).expect("valid config");
        assert_eq!(
            config.admin.allowed_hosts,
            [
                "countersign-admin.monitoring.svc",
                "prometheus_target",
                "admin.cluster.local"
            ]
        );
        assert!(admin_allowed_host(&format!("{}.svc", "a".repeat(63))).is_ok());
        assert!(admin_allowed_host(&format!("{}.svc", "a".repeat(64))).is_err());
        assert!(admin_allowed_host(".").is_err());
        assert!(admin_allowed_host("a.-b").is_err());
    }

    /// `server.max_body_memory` defaults to 64 MiB, raised to the largest body a route takes
    /// (so that body can be read at all); a value that is set is kept as it is.
    #[test]
    fn max_body_memory_default_is_raised_to_the_largest_body() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\n\
                    public_origin = \"http://localhost:8080\"\nMEMORY\n\
                    [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
                    [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\n\
                    url = \"http://127.0.0.1:3000\"\nmax_body = \"BODY\"\n";
        let path = Path::new("/etc/countersign/proxy.toml");
        let memory = |set: &str, body: &str| {
            let text = base.replace("MEMORY", set).replace("BODY", body);
            ProxyConfig::parse(&text, path)
                .expect("valid config")
                .server
                .max_body_memory
        };
        assert_eq!(memory("", "1MiB"), DEFAULT_MAX_BODY_MEMORY);
        assert_eq!(memory("", "100MiB"), 100 * 1024 * 1024);
        assert_eq!(
            memory("max_body_memory = \"8MiB\"", "1MiB"),
            8 * 1024 * 1024
        );
        assert_eq!(memory("max_body_memory = \"1GiB\"", "100MiB"), 1 << 30);
    }

    /// `server.max_body_memory_per_client` defaults to a quarter of `max_body_memory` (as
    /// raised), raised to the largest body a route or the login takes; a value set is kept,
    /// above the cap too; `"off"` is None; a value below the largest body is an error naming
    /// both keys.
    #[test]
    fn max_body_memory_per_client_default_value_off_and_too_small() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\n\
                    public_origin = \"http://localhost:8080\"\nMEMORY\n\
                    [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
                    [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\n\
                    url = \"http://127.0.0.1:3000\"\nmax_body = \"BODY\"\n";
        let path = Path::new("/etc/countersign/proxy.toml");
        let parse = |set: &str, body: &str| {
            let text = base.replace("MEMORY", set).replace("BODY", body);
            ProxyConfig::parse(&text, path).map(|c| c.server.max_body_memory_per_client)
        };
        let per_client = |set: &str, body: &str| parse(set, body).expect("valid config");
        const MIB: usize = 1024 * 1024;
        assert_eq!(per_client("", "1MiB"), Some(DEFAULT_MAX_BODY_MEMORY / 4));
        assert_eq!(per_client("", "1MiB"), Some(16 * MIB));
        // The cap raised to a 100 MiB body, and the share to it too (a quarter is 25 MiB).
        assert_eq!(per_client("", "100MiB"), Some(100 * MIB));
        assert_eq!(
            per_client("max_body_memory = \"1GiB\"", "1MiB"),
            Some(256 * MIB)
        );
        // Raised to the largest body above a quarter of the cap.
        assert_eq!(
            per_client("max_body_memory = \"8MiB\"", "4MiB"),
            Some(4 * MIB)
        );
        assert_eq!(
            per_client("max_body_memory_per_client = \"2MiB\"", "1MiB"),
            Some(2 * MIB)
        );
        assert_eq!(
            per_client("max_body_memory_per_client = 3000000", "1MiB"),
            Some(3_000_000)
        );
        // Above the cap: allowed (it then does nothing).
        assert_eq!(
            per_client("max_body_memory_per_client = \"1GiB\"", "1MiB"),
            Some(1 << 30)
        );
        assert_eq!(
            per_client("max_body_memory_per_client = \"off\"", "1MiB"),
            None
        );
        let error = parse("max_body_memory_per_client = \"512KiB\"", "1MiB")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server.max_body_memory_per_client")
                && error.contains("524288 bytes is less than upstream[0].max_body (1048576 bytes)"),
            "{error}"
        );
        let error = parse("max_body_memory_per_client = \"1KiB\"", "512")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server.max_body_memory_per_client")
                && error.contains("less than auth.max_login_body (16384 bytes)"),
            "{error}"
        );
        let error = parse("max_body_memory_per_client = \"lots\"", "1MiB")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server.max_body_memory_per_client") && error.contains("or \"off\""),
            "{error}"
        );
    }

    proptest::proptest! {
        /// Any text and offset: an answer or none, never a panic.
        #[test]
        fn key_at_never_panics(text in "\\PC{0,80}", offset in 0usize..100) {
            let _ = key_at(&text, offset);
        }
    }
}

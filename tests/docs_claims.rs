//! "The docs say X: does the software do X?" Claims of README.md, docs/CONFIG.md,
//! docs/PROTOCOL.md, docs/DEPLOYMENT.md and proxy.toml checked against the real binary (and,
//! for defaults, the real config parser), so that the documents cannot drift from the code
//! unnoticed: the keys `check-config` accepts are exactly the keys CONFIG.md documents, each in
//! its section's one table; proxy.toml's comments name only real keys; README's command table
//! lists exactly the flags of each command's `--help`; PROTOCOL.md's reason-code table is the
//! library's; `--replay-redis` URLs follow the same port rules as proxy.toml's URLs;
//! proxy.toml's values are CONFIG.md's defaults (but for named examples); and OPERATIONS.md's
//! metrics table is the families `/metrics` exposes, with their types.
//! Run: `cargo test --all-features --test docs_claims`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_ports;
mod support_tmp;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use countersign::proxy::config::{
    parse_positive_duration, parse_size, ProxyConfig, LIVE_KEYS, LIVE_UPSTREAM_KEYS,
    LIVE_UPSTREAM_WEBSOCKET_KEYS,
};
use countersign::Reason;
use support_cli::{exit_within, run_countersign, BIN};
use support_tmp::TestDir;

/// The repository root (where README.md and docs/ are).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_doc(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// A fresh folder under the system's temporary directory for one test's files, removed when
/// dropped.
fn scratch(tag: &str) -> TestDir {
    TestDir::new(&format!("docs-{tag}"))
}

fn countersign(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The names between backticks in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// docs/CONFIG.md's key tables against what `check-config` accepts

/// The config sections CONFIG.md documents, as its headings name them.
const SECTIONS: [&str; 7] = [
    "server",
    "admin",
    "session",
    "auth",
    "auth.throttle",
    "signing",
    "upstream",
];

/// A config with an unknown key in `section`: the parser refuses it before reading any other
/// file, and its message lists every key the section accepts.
fn config_with_unknown_key(section: &str) -> String {
    let extra = |name: &str| {
        if name == section {
            "zz_not_a_key = 1\n"
        } else {
            ""
        }
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n{}\
         [admin]\n{}\
         [session]\n{}\
         [auth]\nusers_file = \"users.toml\"\n{}\
         [auth.throttle]\n{}\
         [signing]\nkeyring = \"keys.toml\"\n{}\
         [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n{}",
        extra("server"),
        extra("admin"),
        extra("session"),
        extra("auth"),
        extra("auth.throttle"),
        extra("signing"),
        extra("upstream"),
    )
}

/// The keys `countersign check-config` accepts in each section, read from its own answer to an
/// unknown key (`unknown field ..., expected one of `a`, `b`, ...`). Read once: two tests use
/// it, and in parallel each would empty the other's scratch folder.
fn accepted_keys() -> BTreeMap<String, BTreeSet<String>> {
    static ACCEPTED: std::sync::OnceLock<BTreeMap<String, BTreeSet<String>>> =
        std::sync::OnceLock::new();
    ACCEPTED.get_or_init(read_accepted_keys).clone()
}

fn read_accepted_keys() -> BTreeMap<String, BTreeSet<String>> {
    let dir = scratch("accepted-keys");
    let mut accepted = BTreeMap::new();
    for section in SECTIONS {
        let path = dir.join(format!("{section}.toml"));
        std::fs::write(&path, config_with_unknown_key(section)).unwrap();
        let out = countersign(&["check-config", "--config", path.to_str().unwrap()]);
        let message = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{section}: {message}");
        let (_, expected) = message
            .split_once("zz_not_a_key`, expected")
            .unwrap_or_else(|| panic!("{section}: no list of accepted keys in {message:?}"));
        let mut keys: BTreeSet<String> = backticked(expected).into_iter().collect();
        // A section holding a table lists it as a field ([auth] holds [auth.throttle]).
        if section == "auth" {
            keys.remove("throttle");
        }
        accepted.insert(section.to_owned(), keys);
    }
    accepted
}

/// The rows of each section's key table in CONFIG.md (`| key | type | default | meaning |`),
/// with the default column. A key row anywhere else in the section (after a paragraph that
/// split the table, so that Markdown renders it as plain text) is reported in `stray`.
struct DocumentedKeys {
    tables: BTreeMap<String, BTreeMap<String, String>>,
    /// Each row whole, by section and key.
    rows: BTreeMap<String, BTreeMap<String, String>>,
    stray: Vec<String>,
}

fn config_md_keys() -> DocumentedKeys {
    let doc = read_doc("docs/CONFIG.md");
    // Lines by section, from its heading (`## `[server]`: ...`, `### `[auth.throttle]`...`,
    // `## `[[upstream]]`...`) to the next heading; code fences hold `#` comments, not headings.
    let mut by_section: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_fence = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_fence = !in_fence;
        }
        if !in_fence && line.starts_with('#') {
            current = line
                .split('`')
                .nth(1)
                .filter(|name| name.starts_with('['))
                .map(|name| name.trim_matches(['[', ']']).to_owned())
                .filter(|name| SECTIONS.contains(&name.as_str()));
            continue;
        }
        if let Some(section) = &current {
            by_section.entry(section.clone()).or_default().push(line);
        }
    }
    let key_of = |line: &str| -> Option<(String, String)> {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells.first()?.strip_prefix("| `")?.strip_suffix('`')?;
        let key_like = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        key_like.then(|| (key.to_owned(), cells.get(2).unwrap_or(&"").to_string()))
    };
    let mut tables = BTreeMap::new();
    let mut whole_rows = BTreeMap::new();
    let mut stray = Vec::new();
    for (section, lines) in by_section {
        let header = lines
            .iter()
            .position(|l| l.starts_with("| key |"))
            .unwrap_or_else(|| panic!("docs/CONFIG.md: [{section}] has no key table"));
        let table_end = lines[header..]
            .iter()
            .position(|l| !l.starts_with('|'))
            .map_or(lines.len(), |n| header + n);
        let mut rows = BTreeMap::new();
        let mut whole = BTreeMap::new();
        for line in &lines[header..table_end] {
            if let Some((key, default)) = key_of(line) {
                whole.insert(key.clone(), (*line).to_owned());
                let again = rows.insert(key.clone(), default);
                assert!(
                    again.is_none(),
                    "docs/CONFIG.md: [{section}] documents {key} twice"
                );
            }
        }
        for line in lines[..header].iter().chain(&lines[table_end..]) {
            if let Some((key, _)) = key_of(line) {
                stray.push(format!(
                    "[{section}] {key}: a key row outside the section's table (a paragraph \
                     splits the table, so Markdown shows the row as text)"
                ));
            }
        }
        whole_rows.insert(section.clone(), whole);
        tables.insert(section, rows);
    }
    DocumentedKeys {
        tables,
        rows: whole_rows,
        stray,
    }
}

/// CONFIG.md: "Unknown keys are errors" and "every key is in docs/CONFIG.md" (README): the
/// keys the parser accepts are exactly the documented ones, each section's keys in one table.
#[test]
fn config_md_documents_exactly_the_keys_check_config_accepts() {
    let accepted = accepted_keys();
    let documented = config_md_keys();
    let mut problems = documented.stray.clone();
    for section in SECTIONS {
        let accepted = &accepted[section];
        let documented: BTreeSet<String> = documented
            .tables
            .get(section)
            .map(|rows| rows.keys().cloned().collect())
            .unwrap_or_default();
        for key in accepted.difference(&documented) {
            problems.push(format!(
                "[{section}] {key}: accepted by check-config, not in docs/CONFIG.md's table"
            ));
        }
        for key in documented.difference(accepted) {
            problems.push(format!(
                "[{section}] {key}: in docs/CONFIG.md's table, refused by check-config"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A config that sets every `only with ...` companion, so that the parser fills in the
/// default of every key the defaults test compares.
const DEFAULTS_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:8080"
public_origin = "http://localhost:8080"
static_dir = "dist"
[admin]
listen = "127.0.0.1:9090"
[session]
store = "redis"
redis_url = "redis://127.0.0.1:6379/0"
[auth]
users_file = "users.toml"
[signing]
keyring = "keys.toml"
[[upstream]]
name = "api"
prefix = "/api/"
url = "http://127.0.0.1:3000"
"#;

/// `verify_url` instead of `users_file`: the defaults of the `verify_*` keys.
fn verify_url_config() -> String {
    DEFAULTS_CONFIG.replace(
        "users_file = \"users.toml\"",
        "verify_url = \"http://127.0.0.1:3000/auth/verify\"",
    )
}

/// A documented default (`"16KiB"`, `"30m"`, `100`) as the number the parser holds: bytes,
/// milliseconds or the integer itself.
fn documented_number(default: &str) -> Option<u128> {
    let default = default.trim();
    if let Some(quoted) = default
        .strip_prefix("`\"")
        .and_then(|d| d.strip_suffix("\"`"))
    {
        return match parse_positive_duration(quoted) {
            Ok(duration) => Some(duration.as_millis()),
            Err(_) => parse_size(quoted).ok().map(|bytes| bytes as u128),
        };
    }
    default
        .strip_prefix('`')
        .and_then(|d| d.strip_suffix('`'))
        .and_then(|d| d.parse().ok())
}

/// CONFIG.md's default column against the defaults the parser applies, for every key with a
/// numeric, duration or size default.
#[test]
fn config_md_defaults_are_the_parsers_defaults() {
    let path = Path::new("/etc/countersign/proxy.toml");
    let config = ProxyConfig::parse(DEFAULTS_CONFIG, path).unwrap();
    let verify = ProxyConfig::parse(&verify_url_config(), path).unwrap();
    // The keys only used behind a balancer: their defaults as the parser applies them there.
    let behind_balancer = ProxyConfig::parse(
        &DEFAULTS_CONFIG.replace(
            "static_dir = \"dist\"\n",
            "static_dir = \"dist\"\ntrusted_proxies = [\"10.0.0.1\"]\nproxy_protocol = true\n",
        ),
        path,
    )
    .unwrap();
    let ms = |d: Duration| d.as_millis();
    let n = |v: usize| v as u128;
    let upstream = &config.upstreams[0];
    let parsed: Vec<(&str, &str, u128)> = vec![
        (
            "server",
            "max_header_bytes",
            n(config.server.max_header_bytes),
        ),
        (
            "server",
            "max_header_count",
            n(config.server.max_header_count),
        ),
        (
            "server",
            "log_queue_lines",
            n(config.server.log_queue_lines),
        ),
        (
            "server",
            "max_response_header_value_bytes",
            n(config.server.max_response_header_value_bytes),
        ),
        (
            "server",
            "header_read_timeout",
            ms(config.server.header_read_timeout),
        ),
        (
            "server",
            "request_timeout",
            ms(config.server.request_timeout),
        ),
        ("server", "send_timeout", ms(config.server.send_timeout)),
        ("server", "shutdown_grace", ms(config.server.shutdown_grace)),
        (
            "server",
            "max_connections",
            n(config.server.max_connections),
        ),
        (
            "server",
            "http2_max_concurrent_streams",
            config.server.http2_max_concurrent_streams.into(),
        ),
        (
            "server",
            "http2_idle_timeout",
            ms(config.server.http2_idle_timeout),
        ),
        (
            "server",
            "http2_max_reset_streams",
            n(config.server.http2_max_reset_streams),
        ),
        (
            "server",
            "client_address_max_hops",
            n(behind_balancer.server.trusted_proxies.max_hops()),
        ),
        (
            "server",
            "proxy_protocol_max_bytes",
            n(behind_balancer.server.proxy_protocol_max_bytes),
        ),
        (
            "server",
            "max_static_file",
            config.server.max_static_file.into(),
        ),
        (
            "server",
            "static_cache_size",
            config.server.static_cache_size.into(),
        ),
        ("admin", "max_connections", n(config.admin.max_connections)),
        (
            "admin",
            "readiness_probe_timeout",
            ms(config.admin.readiness.probe_timeout),
        ),
        (
            "admin",
            "readiness_cache",
            ms(config.admin.readiness.reuse_for),
        ),
        (
            "session",
            "redis_timeout",
            ms(config.session.redis.op_timeout),
        ),
        (
            "session",
            "redis_connect_timeout",
            ms(config.session.redis.connect_timeout),
        ),
        (
            "session",
            "redis_touch_interval",
            ms(config.session.redis.touch_interval),
        ),
        ("session", "idle_timeout", ms(config.session.idle_timeout)),
        (
            "session",
            "absolute_timeout",
            ms(config.session.absolute_timeout),
        ),
        ("session", "max_sessions", n(config.session.max_sessions)),
        (
            "session",
            "max_session_cookies",
            n(config.session.max_session_cookies),
        ),
        (
            "session",
            "sweep_interval",
            ms(config.session.sweep_interval),
        ),
        (
            "auth",
            "max_hash_memory",
            u128::from(config.auth.hash_limits.max_memory_kib) * 1024,
        ),
        (
            "auth",
            "max_hash_iterations",
            config.auth.hash_limits.max_iterations.into(),
        ),
        (
            "auth",
            "max_hash_parallelism",
            config.auth.hash_limits.max_parallelism.into(),
        ),
        ("auth", "max_login_body", n(config.auth.max_login_body)),
        ("auth", "max_users_file", config.auth.max_users_file.into()),
        (
            "auth",
            "max_username_bytes",
            n(config.auth.max_username_bytes),
        ),
        (
            "auth",
            "max_password_bytes",
            n(config.auth.max_password_bytes),
        ),
        (
            "auth",
            "max_verify_answer",
            n(verify.auth.max_verify_answer),
        ),
        (
            "auth",
            "max_verify_answer_header_bytes",
            n(verify.auth.max_verify_answer_header_bytes),
        ),
        (
            "auth",
            "max_verify_answer_header_count",
            n(verify.auth.max_verify_answer_header_count),
        ),
        ("auth", "verify_timeout", ms(verify.auth.verify_timeout)),
        (
            "auth",
            "verify_pool_max_idle",
            n(verify.auth.verify_pool_max_idle),
        ),
        (
            "auth",
            "verify_pool_idle_timeout",
            ms(verify.auth.verify_pool_idle_timeout),
        ),
        (
            "auth.throttle",
            "max_failures_per_ip",
            config.auth.throttle.max_failures_per_ip.into(),
        ),
        (
            "auth.throttle",
            "max_failures_per_user",
            config.auth.throttle.max_failures_per_user.into(),
        ),
        ("auth.throttle", "window", ms(config.auth.throttle.window)),
        (
            "auth.throttle",
            "max_tracked_keys",
            n(config.auth.throttle.max_tracked_keys),
        ),
        ("signing", "window", ms(config.signing.window)),
        ("upstream", "timeout", ms(upstream.timeout)),
        ("upstream", "max_body", n(upstream.max_body)),
        ("upstream", "connect_timeout", ms(upstream.connect_timeout)),
        (
            "upstream",
            "pool_idle_timeout",
            ms(upstream.pool_idle_timeout),
        ),
        (
            "upstream",
            "pool_max_idle_per_host",
            n(upstream.pool_max_idle_per_host),
        ),
        (
            "upstream",
            "pool_max_lifetime",
            // "off" has no number: the default is a duration (1h).
            upstream.pool_max_lifetime.map_or(u128::MAX, ms),
        ),
        (
            "upstream",
            "pool_stale_after",
            upstream.pool_stale_after.map_or(u128::MAX, ms),
        ),
    ];
    let documented = config_md_keys().tables;
    let mut problems = Vec::new();
    for (section, key, value) in parsed {
        let Some(default) = documented.get(section).and_then(|rows| rows.get(key)) else {
            problems.push(format!("[{section}] {key}: not in docs/CONFIG.md's table"));
            continue;
        };
        match documented_number(default) {
            Some(number) if number == value => {}
            Some(number) => problems.push(format!(
                "[{section}] {key}: docs/CONFIG.md says {default} ({number}), the parser's \
                 default is {value}"
            )),
            None => problems.push(format!(
                "[{section}] {key}: docs/CONFIG.md's default {default} is not a number, size \
                 or duration"
            )),
        }
    }
    // The string defaults.
    for (section, key, value) in [
        ("session", "cookie_name", config.session.cookie_name.clone()),
        (
            "signing",
            "user_header",
            config.signing.user_header.to_string(),
        ),
        (
            "signing",
            "roles_header",
            config.signing.roles_header.to_string(),
        ),
    ] {
        let default = documented.get(section).and_then(|rows| rows.get(key));
        if default.map(String::as_str) != Some(format!("`\"{value}\"`").as_str()) {
            problems.push(format!(
                "[{section}] {key}: docs/CONFIG.md says {default:?}, the parser's default is \
                 {value:?}"
            ));
        }
    }
    // The boolean default.
    let default = documented
        .get("upstream")
        .and_then(|rows| rows.get("required_for_ready"));
    let value = upstream.required_for_ready;
    if default.map(String::as_str) != Some(format!("`{value}`").as_str()) {
        problems.push(format!(
            "[upstream] required_for_ready: docs/CONFIG.md says {default:?}, the parser's \
             default is {value}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The `key = value` lines of proxy.toml, commented out or not, with the `[section]` (one of
/// [`SECTIONS`]) they stand in: `(section, key, value as written)`. Lines before the first
/// section, and text that only reads like a key (prose in a comment), are skipped.
fn proxy_toml_entries() -> Vec<(String, String, String)> {
    let example = read_doc("proxy.toml");
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix('[') {
            let name = name.trim_matches(['[', ']']);
            if SECTIONS.contains(&name) {
                section = name.to_owned();
            }
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if section.is_empty() || key.contains(' ') || key.is_empty() {
            continue;
        }
        entries.push((section.clone(), key.to_owned(), value.to_owned()));
    }
    entries
}

/// proxy.toml ("every key is in docs/CONFIG.md"): each key it sets or shows in a comment
/// (`# max_connections = 10000`) is one the parser accepts in that section, and the file as
/// shipped passes `check-config`.
#[test]
fn proxy_toml_names_only_accepted_keys_and_passes_check_config() {
    let accepted = accepted_keys();
    let mut problems = Vec::new();
    for (section, key, _) in proxy_toml_entries() {
        if !accepted[&section].contains(key.as_str()) {
            problems.push(format!(
                "proxy.toml [{section}] {key}: not a key check-config accepts"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let shipped = repo().join("proxy.toml");
    let out = countersign(&["check-config", "--config", shipped.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// README.md's command table against each command's `--help`

/// The flags (`--name`) in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(str::to_owned)
        .collect()
}

/// README.md "Command line": every command listed with exactly the flags its `--help` shows,
/// and every command of `countersign --help` listed.
#[test]
fn readme_command_table_matches_each_commands_help() {
    let readme = read_doc("README.md");
    let mut listed = BTreeMap::new();
    for line in readme.lines() {
        let Some(rest) = line.strip_prefix("| `countersign ") else {
            continue;
        };
        let (usage, _) = rest.split_once("` |").unwrap();
        let command = usage.split(' ').next().unwrap().to_owned();
        listed.insert(command, flags(usage));
    }
    let top = text(&countersign(&["--help"]).stdout);
    let commands: BTreeSet<String> = top
        .split_once("Commands:")
        .unwrap()
        .1
        .split_once("Options:")
        .unwrap()
        .0
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    let mut problems = Vec::new();
    for command in &commands {
        let Some(documented) = listed.get(command) else {
            problems.push(format!("{command}: not in README.md's command table"));
            continue;
        };
        // The option lines only (`  -h, --help`, `      --keyring <FILE>`), not flags that a
        // description mentions.
        let help = text(&countersign(&[command, "--help"]).stdout);
        let mut shown: BTreeSet<String> = help
            .lines()
            .map(str::trim_start)
            .filter(|line| line.starts_with('-'))
            .filter_map(|line| flags(line.split("  ").next().unwrap_or("")).pop_first())
            .collect();
        shown.remove("--help");
        if &shown != documented {
            problems.push(format!(
                "{command}: README.md lists {documented:?}, --help shows {shown:?}"
            ));
        }
    }
    for command in listed.keys() {
        if !commands.contains(command) {
            problems.push(format!(
                "{command}: in README.md, not a command of the binary"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// docs/PROTOCOL.md §7 against the library's reason codes

/// PROTOCOL.md §7 lists every `Reason` with its HTTP status, and nothing else; its gRPC table
/// gives the status `Reason::grpc_status` returns.
#[test]
fn protocol_md_reason_table_is_the_librarys() {
    let doc = read_doc("docs/PROTOCOL.md");
    let (_, section) = doc.split_once("## 7. Reason codes").unwrap();
    let (table_part, grpc_part) = section.split_once("### gRPC").unwrap();
    let mut documented = BTreeMap::new();
    for line in table_part.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        if let (Some(code), Some(status)) = (cells.first(), cells.get(1)) {
            if let Some(code) = code.strip_prefix("| `").and_then(|c| c.strip_suffix('`')) {
                documented.insert(code.to_owned(), status.parse::<u16>().unwrap());
            }
        }
    }
    let library: BTreeMap<String, u16> = Reason::ALL
        .into_iter()
        .map(|r| (r.as_str().to_owned(), r.http_status()))
        .collect();
    assert_eq!(
        documented, library,
        "docs/PROTOCOL.md §7 against Reason::ALL"
    );
    for reason in Reason::ALL {
        let status = reason.http_status();
        let grpc = reason.grpc_status();
        let row = grpc_part
            .lines()
            .filter(|l| l.starts_with('|'))
            .find(|l| {
                // The 401 row names its range (`missing_signature` ... `replayed`).
                l.contains(&format!("`{}`", reason.as_str()))
                    || (status == 401 && l.contains("the 401 codes"))
            })
            .unwrap_or_else(|| panic!("no gRPC row for {}", reason.as_str()));
        assert!(
            row.contains(&format!("| {status} | {grpc} ")),
            "docs/PROTOCOL.md gRPC row for {} is {row:?}, the library answers HTTP {status}, \
             gRPC {grpc}",
            reason.as_str()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `--replay-redis` URLs (docs/DEPLOYMENT.md: "a bad URL is a usage error (exit 2)")

/// A signed request and its keyring, through `countersign keygen` and `sign`.
fn signed_request(dir: &Path) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys.toml");
    let keygen = countersign(&["keygen"]);
    assert!(keygen.status.success(), "{}", text(&keygen.stderr));
    std::fs::write(&keys, &keygen.stdout).unwrap();
    let raw = b"GET /api/whoami HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let signed = run_countersign(
        [
            "sign",
            "--keyring",
            keys.to_str().unwrap(),
            "--user",
            "alice",
        ],
        raw,
    );
    assert!(signed.status.success(), "{}", text(&signed.stderr));
    let request = dir.join("request.txt");
    std::fs::write(&request, &signed.stdout).unwrap();
    (keys, request)
}

/// Redis URLs whose port is empty or 0. `host:` is read by the URL parser as "no port" (so
/// 6379: another server than the one meant), port 0 cannot be connected to; docs/CONFIG.md
/// refuses both in `session.redis_url`, and the CLI must not accept them either.
const BAD_PORT_REDIS_URLS: [&str; 6] = [
    "redis://127.0.0.1:/0",
    "redis://127.0.0.1:0/0",
    "rediss://:s3cret-pw@127.0.0.1:/0",
    "redis://[::1]:0",
    // The scheme in capitals, as the URL parser reads it (it reached port 6379).
    "REDIS://127.0.0.1:/0",
    "Redis://127.0.0.1:0",
];

/// DEPLOYMENT.md: `verify --replay-redis URL` answers `replay_cache_unavailable` (exit 1) when
/// Redis is unreachable and "a bad URL is a usage error (exit 2)". Before the fix an empty port
/// silently meant 6379 and port 0 reached nothing: both answered
/// `{"valid":false,"reason":"replay_cache_unavailable"}` and exit 1, a verdict on the request
/// for a mistake in the command line.
#[test]
fn verify_replay_redis_url_with_empty_or_zero_port_is_a_usage_error() {
    let dir = scratch("verify-redis-port");
    let (keys, request) = signed_request(&dir);
    for url in BAD_PORT_REDIS_URLS {
        let out = countersign(&[
            "verify",
            "--keyring",
            keys.to_str().unwrap(),
            "--replay-redis",
            url,
            request.to_str().unwrap(),
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{url}: stdout {:?}, stderr {stderr:?}",
            text(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "{url}: {:?}", text(&out.stdout));
        assert!(stderr.contains("--replay-redis"), "{url}: {stderr}");
        assert!(stderr.contains("port"), "{url}: {stderr}");
        assert!(
            !stderr.contains("s3cret"),
            "{url}: the password shows: {stderr}"
        );
    }
    // A usage error whatever the request: before the fix the URL was only looked at once the
    // signature had verified, so an expired request with a bad URL answered exit 1 `expired`.
    for url in ["redis://127.0.0.1:0/0", "http://127.0.0.1:6379"] {
        let out = countersign(&[
            "verify",
            "--keyring",
            keys.to_str().unwrap(),
            "--now",
            "4000000000",
            "--replay-redis",
            url,
            request.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{url} with an expired request: stdout {:?}, stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // The rule is about the port only: a refused connection is still the documented verdict.
    let (_refusing, refused) = support_ports::refusing_addr();
    let out = countersign(&[
        "verify",
        "--keyring",
        keys.to_str().unwrap(),
        "--replay-redis",
        &format!("redis://{refused}/0"),
        request.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"valid":false,"reason":"replay_cache_unavailable"}"#
    );
}

/// `demo-api --replay-redis` takes the same URLs: one with an empty or zero port stops it at
/// start with exit 2, instead of a demo API answering 503 to every signed request.
#[test]
fn demo_api_replay_redis_url_with_empty_or_zero_port_is_refused_at_start() {
    let dir = scratch("demo-api-redis-port");
    let (keys, _) = signed_request(&dir);
    for url in ["redis://127.0.0.1:/0", "redis://127.0.0.1:0/0"] {
        let mut child = Command::new(BIN)
            .args(["demo-api", "--listen", "127.0.0.1:0", "--keyring"])
            .arg(&keys)
            .args(["--replay-redis", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = exit_within(&mut child, Duration::from_secs(10)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{url}: demo-api started and kept running");
        };
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains("--replay-redis"), "{url}: {stderr}");
        assert!(stderr.contains("port"), "{url}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// proxy.toml's values against CONFIG.md's defaults

/// The keys proxy.toml shows with a value other than the default on purpose: examples of what
/// to set (`static_immutable = ["/assets/"]` for Vite, `proxy_protocol = true` behind an NLB,
/// TLS to the sentinels), each next to a comment saying what it does.
const PROXY_TOML_EXAMPLES: [&str; 3] = [
    "server.static_immutable",
    "server.proxy_protocol",
    "session.redis_sentinel_tls",
];

/// proxy.toml writes most keys as `# key = value` with the default as the value
/// (`# max_header_bytes = "16KiB"`), and sets the session and throttle lifetimes to theirs: a
/// reader takes those for the defaults. Wherever CONFIG.md's default column is one literal
/// (`"16KiB"`, `100`, `true`), proxy.toml's value must be it, except for the named examples.
#[test]
fn proxy_toml_values_are_config_md_defaults() {
    let documented = config_md_keys().tables;
    let mut compared = 0;
    let mut problems = Vec::new();
    for (section, key, value) in proxy_toml_entries() {
        let key = key.as_str();
        let dotted = format!("{section}.{key}");
        if PROXY_TOML_EXAMPLES.contains(&dotted.as_str()) {
            continue;
        }
        // The value, without a trailing comment (none of the compared values holds a `#`).
        let value = value.split(" #").next().unwrap().trim();
        let Some(default) = documented.get(&section).and_then(|keys| keys.get(key)) else {
            continue; // a key missing from CONFIG.md is the other tests' failure
        };
        // Only a default that is one backticked literal and nothing else.
        let default = default.trim();
        let Some(literal) = default
            .strip_prefix('`')
            .and_then(|rest| rest.strip_suffix('`'))
            .filter(|inner| !inner.contains('`'))
        else {
            continue;
        };
        compared += 1;
        if value != literal {
            problems.push(format!(
                "proxy.toml {dotted} = {value}, CONFIG.md's default is {literal}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        compared >= 40,
        "only {compared} values compared: is the parsing still right?"
    );
}

// ---------------------------------------------------------------------------------------------
// docs/OPERATIONS.md's metrics table against the admin listener's /metrics

/// The `(name, type)` rows of OPERATIONS.md's "Metrics" table.
fn operations_md_metrics() -> BTreeSet<(String, String)> {
    let doc = read_doc("docs/OPERATIONS.md");
    let start = doc
        .find("\n### Metrics\n")
        .expect("OPERATIONS.md has a Metrics section");
    let end = start
        + doc[start..]
            .find("\n### Logs\n")
            .expect("a Logs section after it");
    doc[start..end]
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix("| `")?.split(" | ");
            let name = cells.next()?.strip_suffix('`')?;
            let kind = cells.next()?;
            name.starts_with("countersign_")
                .then(|| (name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// A `GET` of `path` on `addr`, its whole answer as text (`Connection: close`).
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// OPERATIONS.md "Metrics": every family the proxy exposes is in the table with its type, and
/// every row is a family the proxy exposes. The config turns on what adds families
/// (`session.snapshot_file`: the lock gauge; a `websocket = true` upstream: the open
/// WebSockets gauge; `tls_cert`: the certificate's expiry), so that each of them is there to
/// compare.
#[test]
fn operations_md_metrics_table_is_what_metrics_exposes() {
    let documented = operations_md_metrics();
    assert!(documented.len() >= 20, "parsed {documented:?}");
    let dir = scratch("metrics-table");
    let keys = dir.join("keys.toml");
    let out = countersign(&["keygen", "--out", keys.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    std::fs::copy(
        repo().join("examples/config/users.toml"),
        dir.join("users.toml"),
    )
    .unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let mut last_log = String::new();
    for _attempt in 0..3 {
        // Free ports for the proxy to take (retried if another process takes one).
        let ports: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", support_ports::free_port()))
            .collect();
        let (listen, admin, upstream) = (&ports[0], &ports[1], &ports[2]);
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{listen}\"\npublic_origin = \"https://localhost\"\n\
                 tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n\
                 [admin]\nlisten = \"{admin}\"\n\
                 [session]\nsnapshot_file = \"sessions.snapshot\"\n\
                 [auth]\nusers_file = \"users.toml\"\n\
                 [signing]\nkeyring = \"keys.toml\"\n\
                 [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://{upstream}\"\n\
                 websocket = true\n"
            ),
        )
        .unwrap();
        let log = dir.join("run.log");
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--workers",
                "1",
                "--config",
                config.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let metrics = loop {
            if let Ok(answer) = http_get(admin, "/metrics") {
                if answer.starts_with("HTTP/1.1 200") {
                    break Some(answer);
                }
            }
            if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        last_log = std::fs::read_to_string(&log).unwrap_or_default();
        let Some(metrics) = metrics else {
            assert!(last_log.contains("Address already in use"), "{last_log}");
            continue;
        };
        let exposed: BTreeSet<(String, String)> = metrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
            .collect();
        let undocumented: Vec<_> = exposed.difference(&documented).collect();
        let not_exposed: Vec<_> = documented.difference(&exposed).collect();
        assert!(
            undocumented.is_empty() && not_exposed.is_empty(),
            "exposed, not in OPERATIONS.md's table (or with another type): {undocumented:?}\n\
             in the table, not exposed: {not_exposed:?}"
        );
        return;
    }
    panic!("the proxy found its ports taken three times: {last_log}");
}

// ---------------------------------------------------------------------------------------------
// docs/CONFIG.md's **Live** marks against the keys a reload applies

/// CONFIG.md: a `proxy.toml` change applies "its live keys, marked **Live** in these tables"
/// (the `[auth.throttle]` rows say "Applies on SIGHUP", under a heading that says so for all
/// four). Every key a reload applies (`LIVE_KEYS`, each upstream's live keys) has its mark, and
/// every marked row is such a key. `server.websocket_max_open` and the upstream's
/// `websocket_max_open` were live without the mark.
#[test]
fn config_md_marks_exactly_the_live_keys() {
    let rows = config_md_keys().rows;
    let live: BTreeSet<String> = LIVE_KEYS
        .iter()
        .map(|key| key.to_string())
        .chain(
            LIVE_UPSTREAM_KEYS
                .iter()
                .chain(&LIVE_UPSTREAM_WEBSOCKET_KEYS)
                .map(|key| format!("upstream.{key}")),
        )
        .collect();
    let mut marked = BTreeSet::new();
    for (section, keys) in &rows {
        for (key, row) in keys {
            // `reload_check_interval` mentions the mark ("marked **Live** in these tables").
            let row = row.replace("marked **Live**", "");
            if row.contains("**Live**") || row.contains("Applies on SIGHUP") {
                marked.insert(format!("{section}.{key}"));
            }
        }
    }
    let unmarked: Vec<_> = live.difference(&marked).collect();
    let not_live: Vec<_> = marked.difference(&live).collect();
    assert!(
        unmarked.is_empty() && not_live.is_empty(),
        "live, not marked **Live** in CONFIG.md: {unmarked:?}\n\
         marked, not live: {not_live:?}"
    );
}

/// Every code the proxy's `{"error":…}` answers can carry (`REASON_CODES`, the refusal
/// counter's labels) is in FRONTEND.md's error tables, in the JS client's `ErrorCode` union
/// and in OPERATIONS.md's `countersign_refusals_total` row; and each of those lists no proxy
/// code the proxy does not have. A new code documented in one place only is caught here.
#[test]
fn the_proxys_reason_codes_are_listed_wherever_clients_read_them() {
    use countersign::proxy::error::REASON_CODES;
    let frontend = read_doc("docs/FRONTEND.md");
    let in_tables: BTreeSet<&str> = frontend
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // `| status | code | meaning …`: the status cell is a number (or `502/504`).
            let status = cells.get(1)?;
            let code = cells.get(2)?;
            (status.chars().next()?.is_ascii_digit() && code.starts_with('`')).then_some(*code)
        })
        .flat_map(|cell| cell.split(" / "))
        .map(|code| code.trim_matches('`'))
        .collect();
    let dts = read_doc("clients/js/countersign.d.ts");
    let operations = read_doc("docs/OPERATIONS.md");
    let metrics_row = operations
        .lines()
        .find(|line| line.starts_with("| `countersign_refusals_total` |"))
        .expect("OPERATIONS.md has a countersign_refusals_total row");
    let expected: BTreeSet<&str> = REASON_CODES.iter().copied().collect();
    for code in REASON_CODES {
        assert!(
            in_tables.contains(code),
            "docs/FRONTEND.md's error tables lack {code}"
        );
        assert!(
            dts.contains(&format!("| '{code}'")),
            "countersign.d.ts's ErrorCode lacks {code}"
        );
        assert!(
            metrics_row.contains(&format!("`{code}`")),
            "OPERATIONS.md's countersign_refusals_total row lacks {code}"
        );
    }
    let extra: Vec<&&str> = in_tables.difference(&expected).collect();
    assert!(
        extra.is_empty(),
        "FRONTEND.md lists codes the proxy does not have: {extra:?}"
    );
    assert!(
        metrics_row.contains(&format!("{} series in all", REASON_CODES.len())),
        "OPERATIONS.md names another series count: {metrics_row}"
    );
}

/// The JS client's tests run `tsc` from its `node_modules` (its types must compile), so from a
/// fresh clone `npm test` alone fails two of them ("typescript is not installed"): where the
/// docs give the command, `npm ci` comes first, and no doc says the tests need no install.
#[test]
fn the_js_clients_test_command_installs_what_its_tests_need() {
    let js = repo().join("clients/js");
    let needs_install = std::fs::read_dir(&js)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(".test.js"))
        .any(|path| {
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("node_modules")
        });
    assert!(
        needs_install,
        "no clients/js test reads node_modules: this check has nothing left to hold"
    );
    let readme = read_doc("clients/js/README.md");
    let test = readme
        .find("\nnpm test")
        .expect("clients/js/README.md gives `npm test`");
    let block = &readme[readme[..test].rfind("```").unwrap()..test];
    assert!(
        block.contains("\nnpm ci"),
        "clients/js/README.md runs `npm test` without `npm ci` before it:{block}"
    );
    let frontend = read_doc("docs/FRONTEND.md");
    let start = frontend
        .find("cd clients/js &&")
        .expect("docs/FRONTEND.md gives the client's test command");
    let command = frontend[start..].split('`').next().unwrap();
    let ci = command.find("npm ci");
    let test = command.find("npm test");
    assert!(
        matches!((ci, test), (Some(ci), Some(test)) if ci < test),
        "docs/FRONTEND.md's test command does not install first: {command}"
    );
    for doc in ["clients/js/README.md", "docs/FRONTEND.md"] {
        assert!(
            !read_doc(doc).contains("no install needed"),
            "{doc} says the client's tests need no install"
        );
    }
}

/// DEPLOYMENT.md: `deploy/compose/init.sh` hashes the password with the local build if there
/// is one. Cargo builds under `$CARGO_TARGET_DIR` when that is set (this repository's own
/// scripts honour it), and init.sh looked only under `target/`: it ignored the build and went
/// to Docker (here a `docker` that fails, as one without an engine or buildx does).
#[test]
fn compose_init_hashes_with_the_local_build_under_cargo_target_dir() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = scratch("compose-init");
    let compose = dir.path().join("checkout/deploy/compose");
    std::fs::create_dir_all(&compose).unwrap();
    std::fs::copy(
        repo().join("deploy/compose/init.sh"),
        compose.join("init.sh"),
    )
    .unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::create_dir_all(target.join("debug")).unwrap();
    symlink(BIN, target.join("debug/countersign")).unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let docker = tools.join("docker");
    std::fs::write(&docker, "#!/bin/sh\necho 'docker: no engine' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap());
    let mut child = Command::new("bash")
        .arg(compose.join("init.sh"))
        .args(["alice", "a,b"])
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"a password\n").unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "init.sh failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let users = std::fs::read_to_string(compose.join("users.toml")).unwrap();
    assert!(
        users.contains("name = \"alice\"") && users.contains("password = \"$argon2id$"),
        "{users}"
    );
    assert!(compose.join("secrets/k1").is_file());
}

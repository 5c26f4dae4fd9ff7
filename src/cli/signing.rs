//! `keygen`, `sign`, `verify`: key tools and signing of raw HTTP/1.1 requests, for scripts and
//! interoperability checks.
//!
//! Exit codes: 0 success; 1 `verify` answered "invalid" (one line of JSON says why); 2 usage,
//! keyring or input errors (a message on stderr names the problem).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use countersign::core::{
    is_valid_key_id, signature_base_for, CompactString, Identity, IdentityHeaders, KeyringHandle,
    Nonce, Policy, Reason, RequestView, Signer, SignerConfig, Verifier, DEFAULT_SKEW, DEFAULT_TAG,
    DEFAULT_WINDOW, KEY_ID_RULE,
};
use countersign::keyfile::{keygen_entry, load_keyring};
use countersign::replay::{
    host_port_entry_key, host_port_entry_problem, split_host_less_redis_url, url_authority_host,
    HostLessRedisUrl, HostLessUrlProblem, HostPortProblem,
};
use zeroize::Zeroizing;

use super::rawhttp::{
    encode_chunked, read_request_keeping_head, BodyFraming, Limits, RawHttpError, RawRequest,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES,
};

/// `keygen` arguments.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Key id: visible ASCII (no spaces) without `"` or `\`.
    #[arg(long, default_value = "k1")]
    pub id: String,
    /// Write the keyring to this new file, readable by its owner only (mode 0600), instead of
    /// stdout (where `> keys.toml` makes a file the umask leaves readable by everyone).
    /// An existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Input limits shared by `sign` and `verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct InputLimitArgs {
    /// Largest request line plus header block, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Most header field lines (1 to 65536).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HEADERS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub max_headers: usize,
    /// Largest body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
}

impl From<&InputLimitArgs> for Limits {
    fn from(a: &InputLimitArgs) -> Self {
        Limits {
            max_header_bytes: a.max_header_bytes,
            max_headers: a.max_headers,
            max_body_bytes: a.max_body_bytes,
        }
    }
}

/// The names of the identity fields, for `sign`, `verify` and `demo-api`: what the proxy's
/// `signing.user_header` and `roles_header` set, checked by the same rules. With other names
/// than the proxy's, `verify` reads a request a proxy signed as anonymous (`"user":null`,
/// its user's field an extra covered one) and `sign` writes fields that API does not read.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityHeaderArgs {
    /// The user name field (the proxy's `signing.user_header`).
    #[arg(long, value_name = "NAME", default_value = "x-auth-user",
          value_parser = countersign::proxy::config::identity_header_name)]
    pub user_header: http::HeaderName,
    /// The roles field (the proxy's `signing.roles_header`).
    #[arg(long, value_name = "NAME", default_value = "x-auth-roles",
          value_parser = countersign::proxy::config::identity_header_name)]
    pub roles_header: http::HeaderName,
}

impl IdentityHeaderArgs {
    /// The two names, which must differ (a usage error, exit 2).
    pub fn headers(&self) -> Result<IdentityHeaders, String> {
        if self.user_header == self.roles_header {
            return Err(format!(
                "--roles-header {:?} must differ from --user-header",
                self.roles_header.as_str()
            ));
        }
        Ok(IdentityHeaders {
            user: self.user_header.clone(),
            roles: self.roles_header.clone(),
        })
    }
}

/// `sign` arguments.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Keyring file (TOML); its active key signs.
    #[arg(long, value_name = "FILE")]
    pub keyring: PathBuf,
    /// User name to forward (any non-empty Unicode; sent percent-encoded in X-Auth-User).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Roles to forward, comma-separated, each non-empty (needs --user; empty: no roles).
    #[arg(long, value_name = "a,b", requires = "user")]
    pub roles: Option<String>,
    /// The identity fields' names.
    #[command(flatten)]
    pub identity_headers: IdentityHeaderArgs,
    /// `created` parameter, unix seconds (default: now).
    #[arg(long, value_name = "UNIX")]
    pub created: Option<u64>,
    /// `nonce` parameter (default: 128 random bits, base64url).
    #[arg(long, value_name = "STR")]
    pub nonce: Option<String>,
    /// `expires = created + window`: seconds ("10") or a duration ("10s", as
    /// `signing.window`), at least 1 second.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_WINDOW.as_secs(),
          value_parser = super::parse_positive_seconds_arg)]
    pub window: u64,
    /// Input size limits.
    #[command(flatten)]
    pub limits: InputLimitArgs,
    /// The raw request: a file, or `-` for stdin.
    #[arg(value_name = "FILE|-", default_value = "-")]
    pub input: PathBuf,
}

/// `verify` arguments. `Debug` never shows the `--replay-redis` URL (it may hold a password).
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Keyring file (TOML); every non-retired key verifies.
    #[arg(long, value_name = "FILE")]
    pub keyring: PathBuf,
    /// The time to verify at, unix seconds (default: now).
    #[arg(long, value_name = "UNIX")]
    pub now: Option<u64>,
    /// Replay window: `created` may be at most this old (plus skew): seconds ("10") or a
    /// duration ("10s", as `signing.window`).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_WINDOW.as_secs(),
          value_parser = super::parse_seconds_arg)]
    pub window: u64,
    /// Allowed clock skew: seconds ("2") or a duration ("2s").
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SKEW.as_secs(),
          value_parser = super::parse_seconds_arg)]
    pub skew: u64,
    /// Input size limits.
    #[command(flatten)]
    pub limits: InputLimitArgs,
    /// The identity fields' names.
    #[command(flatten)]
    pub identity_headers: IdentityHeaderArgs,
    /// Also record the nonce of a valid request in this Redis (`redis://`, `rediss://`),
    /// the replay cache the APIs share: a nonce already there answers `replayed`, Redis
    /// unreachable answers `replay_cache_unavailable`. With --replay-redis-cluster-node or
    /// --replay-redis-sentinel: the credentials and TLS (and, with sentinels, the database)
    /// only, without a host (`redis://[user:password@][/db]`, `rediss://...`; may be left out
    /// for plain TCP without a password).
    #[arg(long, value_name = "URL")]
    pub replay_redis: Option<String>,
    /// The replay cache on a Redis Cluster or behind Redis Sentinel, and its TLS.
    #[command(flatten)]
    pub replay: ReplayRedisArgs,
    /// The raw request: a file, or `-` for stdin.
    #[arg(value_name = "FILE|-", default_value = "-")]
    pub input: PathBuf,
}

impl std::fmt::Debug for VerifyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyArgs")
            .field("keyring", &self.keyring)
            .field("now", &self.now)
            .field("window", &self.window)
            .field("skew", &self.skew)
            .field("limits", &self.limits)
            .field("identity_headers", &self.identity_headers)
            .field(
                "replay_redis",
                &self.replay_redis.as_ref().map(|_| "[redacted]"),
            )
            .field("replay", &self.replay)
            .field("input", &self.input)
            .finish()
    }
}

/// A failure that ends the command with exit code 2 and a message on stderr.
struct Fatal(String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

fn exit_fatal(command: &str, f: Fatal) -> ExitCode {
    // Nothing useful can be done if stderr itself is gone.
    let _ = writeln!(io::stderr(), "countersign {command}: {}", f.0);
    ExitCode::from(2)
}

/// `countersign keygen [--id ID]`: prints a keyring entry with a fresh 32-byte secret.
pub fn keygen(args: KeygenArgs) -> ExitCode {
    // The keyring's own rule, so that what keygen prints always loads.
    if !is_valid_key_id(&args.id) {
        return exit_fatal(
            "keygen",
            Fatal(format!("--id {:?}: must be {KEY_ID_RULE}", args.id)),
        );
    }
    // The entry holds the secret: wipe it from memory once written.
    let entry = Zeroizing::new(keygen_entry(&args.id));
    let written = match &args.out {
        Some(path) => write_new_private_file(path, entry.as_bytes())
            .map_err(|e| Fatal(format!("--out {}: {e}", path.display()))),
        None => io::stdout()
            .lock()
            .write_all(entry.as_bytes())
            .map_err(|e| Fatal(format!("cannot write to stdout: {e}"))),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => exit_fatal("keygen", f),
    }
}

/// Creates `path` (never an existing file, nor through a link: `create_new` is `O_EXCL`) with
/// mode 0600 from the start, so the secret is never readable by others, and writes `bytes`.
/// A failed write removes the partial file.
fn write_new_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            e.kind(),
            "the file exists (keygen never overwrites a keyring; append the new key's [[keys]] \
             table to it yourself, or choose a new file)",
        ),
        _ => e,
    })?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// `countersign sign`: reads one raw request, writes it back signed.
pub fn sign(args: SignArgs) -> ExitCode {
    match run_sign(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => exit_fatal("sign", f),
    }
}

fn run_sign(args: &SignArgs) -> Result<(), Fatal> {
    let nonce = match &args.nonce {
        // `Nonce::new` refuses what verifiers of the profile refuse (under 128 bits, ...).
        Some(n) => Nonce::new(n).map_err(|e| Fatal(format!("--nonce: {e}")))?,
        None => Nonce::random(),
    };
    let identity = match &args.user {
        Some(user) => Some(identity_arg(user, args.roles.as_deref())?),
        None => None,
    };
    let keyring = load_keyring(&args.keyring)?;
    let raw =
        read_input(&args.input, Limits::from(&args.limits), &mut None).map_err(Fatal::from)?;
    // What goes wrong from here on is about the request: the message names where it came from.
    let source = input_name(&args.input);
    let mut parts = raw
        .to_parts()
        .map_err(|e| Fatal(format!("{source}: {e}")))?;
    let config = SignerConfig {
        window: Duration::from_secs(args.window),
        identity_headers: args.identity_headers.headers().map_err(Fatal)?,
        ..SignerConfig::default()
    };
    let replaced = [
        "signature",
        "signature-input",
        "content-digest",
        config.identity_headers.user.as_str(),
        config.identity_headers.roles.as_str(),
    ]
    .map(str::to_owned);
    if identity.is_none() {
        // Not silent: a request copied from a proxy's traffic carries the user it was sent for,
        // and signing it without --user drops that user (the signature is anonymous).
        let ids = &config.identity_headers;
        let dropped: Vec<&str> = raw
            .headers
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| {
                name.eq_ignore_ascii_case(ids.user.as_str())
                    || name.eq_ignore_ascii_case(ids.roles.as_str())
            })
            .collect();
        if !dropped.is_empty() {
            let _ = writeln!(
                io::stderr(),
                "countersign sign: note: {source}: {} removed: without --user the request is \
                 signed anonymous (give --user NAME [--roles a,b] to sign an identity)",
                dropped.join(", ")
            );
        }
    }
    let signer = Signer::new(KeyringHandle::new(keyring), config);
    let created = args.created.unwrap_or_else(unix_now);
    signer
        .sign(&mut parts, &raw.body, identity.as_ref(), created, &nonce)
        .map_err(|e| Fatal(format!("{source}: {e}")))?;

    let out = render_signed(&raw, &parts.headers, &replaced);
    check_output_limits(&out, &args.limits)
        .map_err(|problem| Fatal(format!("{source}: {problem}")))?;
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .map_err(|e| Fatal(format!("cannot write to stdout: {e}")))
}

/// `sign` adds up to six field lines (`Content-Length`, `Content-Digest`, the identity fields,
/// `Signature-Input`, `Signature`): a request just within the limits could come out beyond them,
/// and `verify` with the same limits would then refuse what `sign` wrote. The signed request is
/// held to the limits it was read with, so that it always reads back.
fn check_output_limits(out: &[u8], limits: &InputLimitArgs) -> Result<(), String> {
    // Values hold no CR or LF, so the first empty line ends the header block.
    let head = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |at| at + 4);
    let lines = out[..head].windows(2).filter(|w| w == b"\r\n").count();
    let fields = lines.saturating_sub(2);
    if fields > limits.max_headers {
        return Err(format!(
            "signed, the request would have {fields} header lines, more than --max-headers {} \
             (verify, with the same limit, would refuse it): give both commands a larger \
             --max-headers",
            limits.max_headers
        ));
    }
    if head > limits.max_header_bytes {
        return Err(format!(
            "signed, the request line and headers would be {head} bytes, more than \
             --max-header-bytes {} (verify, with the same limit, would refuse them): give both \
             commands a larger --max-header-bytes",
            limits.max_header_bytes
        ));
    }
    Ok(())
}

/// The identity of `--user` and `--roles`. `--roles ''` (or none) is a user without roles; every
/// listed role must be non-empty, as must the user (docs/PROTOCOL.md §4: the signer would refuse
/// them anyway; here the message names the option).
fn identity_arg(user: &str, roles: Option<&str>) -> Result<Identity, Fatal> {
    if user.is_empty() {
        return Err(Fatal(
            "--user: the user name is empty (a signed identity needs a name; omit --user to \
             sign without an identity)"
                .to_owned(),
        ));
    }
    let roles: Vec<CompactString> = match roles {
        None | Some("") => Vec::new(),
        Some(list) => list.split(',').map(CompactString::from).collect(),
    };
    if let Some(position) = roles.iter().position(|role| role.is_empty()) {
        return Err(Fatal(format!(
            "--roles {:?}: role {} of {} is empty (role names must be non-empty, separated by \
             single commas; omit --roles or give --roles '' for a user without roles)",
            roles.join(","),
            position + 1,
            roles.len()
        )));
    }
    Ok(Identity {
        user: user.into(),
        roles,
    })
}

/// The request as read (normalised as src/cli/rawhttp.rs says: each line `Name: value` and
/// CRLF, the body re-framed), minus the fields the signer replaced, plus the signer's fields
/// (`Content-Digest`, identity, `Signature-Input`, `Signature`) at the end of the header block.
fn render_signed(raw: &RawRequest, signed: &http::HeaderMap, replaced: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.body.len() + 1024);
    out.extend_from_slice(raw.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(raw.target.as_bytes());
    out.extend_from_slice(if raw.minor_version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in &raw.headers {
        if replaced.iter().any(|r| name.eq_ignore_ascii_case(r)) {
            continue;
        }
        push_field(&mut out, name, value);
    }
    // A body read to EOF gets an explicit length, so the output is a complete HTTP message.
    if raw.framing == BodyFraming::UntilEof && !raw.body.is_empty() {
        push_field(
            &mut out,
            "Content-Length",
            raw.body.len().to_string().as_bytes(),
        );
    }
    for name in replaced
        .iter()
        .filter(|n| n.as_str() != "signature" && n.as_str() != "signature-input")
    {
        for value in signed.get_all(name.as_str()) {
            push_field(&mut out, &display_name(name), value.as_bytes());
        }
    }
    for name in ["signature-input", "signature"] {
        for value in signed.get_all(name) {
            push_field(&mut out, &display_name(name), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    if raw.framing == BodyFraming::Chunked {
        // Still chunked (its `Transfer-Encoding` field is kept), as one chunk: the content,
        // which is what `Content-Digest` covers, is the input's; its chunk boundaries and
        // extensions are not part of it.
        encode_chunked(&raw.body, &mut out);
    } else {
        out.extend_from_slice(&raw.body);
    }
    out
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `x-auth-user` → `X-Auth-User`, the conventional spelling for the fields we add.
fn display_name(name: &str) -> String {
    name.split('-')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// `countersign verify`: one line of JSON; exit 0 valid, 1 invalid, 2 error.
pub fn verify(args: VerifyArgs) -> ExitCode {
    match run_verify(&args) {
        Ok(answer) => {
            let (line, code) = match &answer {
                Ok(verified) => {
                    let identity = verified.identity.as_ref();
                    let line = serde_json::to_string(&ValidLine {
                        valid: true,
                        user: identity.map(|i| i.user.as_str()),
                        roles: identity.map(|i| i.roles.as_slice()).unwrap_or(&[]),
                        keyid: &verified.keyid,
                    });
                    (line, ExitCode::SUCCESS)
                }
                Err((reason, detail)) => {
                    let _ = writeln!(io::stderr(), "countersign verify: {reason}: {detail}");
                    let line = serde_json::to_string(&InvalidLine {
                        valid: false,
                        reason: reason.as_str(),
                    });
                    (line, ExitCode::from(1))
                }
            };
            let line = match line {
                Ok(line) => line,
                Err(e) => {
                    return exit_fatal("verify", Fatal(format!("cannot encode the answer: {e}")))
                }
            };
            let mut stdout = io::stdout().lock();
            match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
                Ok(()) => code,
                Err(e) => exit_fatal("verify", Fatal(format!("cannot write to stdout: {e}"))),
            }
        }
        Err(f) => exit_fatal("verify", f),
    }
}

/// The success line; field order is the documented one.
#[derive(serde::Serialize)]
struct ValidLine<'a> {
    valid: bool,
    user: Option<&'a str>,
    roles: &'a [CompactString],
    keyid: &'a str,
}

/// The failure line.
#[derive(serde::Serialize)]
struct InvalidLine {
    valid: bool,
    reason: &'static str,
}

type VerifyAnswer = Result<countersign::core::Verified, (Reason, String)>;

fn run_verify(args: &VerifyArgs) -> Result<VerifyAnswer, Fatal> {
    let keyring = load_keyring(&args.keyring)?;
    // A bad `--replay-redis` URL or cluster node is a usage error (exit 2) whatever the
    // request: checked before the request is read, so an invalid one cannot hide it behind
    // exit 1. Opening the cache does not connect.
    let replay = replay_redis_cache(args.replay_redis.as_deref(), &args.replay).map_err(Fatal)?;
    let limits = Limits::from(&args.limits);
    let policy = Policy {
        window: Duration::from_secs(args.window),
        skew: Duration::from_secs(args.skew),
        identity_headers: args.identity_headers.headers().map_err(Fatal)?,
        ..Policy::default()
    };
    let verifier = Verifier::new(KeyringHandle::new(keyring), policy);
    let now = args.now.unwrap_or_else(unix_now);
    // Why the verifier refused, with what helps to mend it.
    let refused = |e: countersign::core::VerifyError, parts: &http::request::Parts| {
        let mut detail = e.detail().to_owned();
        match e.reason() {
            Reason::Expired | Reason::NotYetValid => {
                detail.push_str(&time_context(now, args));
            }
            Reason::BadSignature => {
                if let Some(base) = computed_base(parts) {
                    detail.push_str(&format!(
                        "\nthe signature base computed here (the signer MACed its own; they \
                         must be byte-identical, so compare line by line: a difference is \
                         what changed on the way, else the secrets differ):\n{base}"
                    ));
                }
            }
            Reason::UnknownKey => detail.push_str(&format!(
                " is not a listed, non-retired key of {} (a key with rotation on signs as \
                 <id>.<created / period>)",
                args.keyring.display()
            )),
            _ => {}
        }
        Ok(Err((e.reason(), detail)))
    };
    let mut head = None;
    let raw = match read_input(&args.input, limits, &mut head) {
        Ok(raw) => raw,
        // A body over the limit is a documented verification outcome, not a usage error; but
        // as at the VerifyLayer, the headers and MAC are checked first and the first failure
        // decides (an unsigned or expired request is that, whatever its size).
        Err(ReadFailure::Parse(source, e @ RawHttpError::BodyTooLarge(_))) => {
            let parts = match head.as_ref().map(|head| head.to_parts()) {
                Some(Ok(parts)) => Some(parts),
                // A head `http` cannot represent is no request whatever its body's size: exit
                // 2, as below for a request that fits (not a `body_too_large` verdict).
                Some(Err(unreadable)) => return Err(Fatal(format!("{source}: {unreadable}"))),
                None => None,
            };
            if let Some(parts) = parts {
                if let Err(refusal) = verifier.verify_headers(&parts, now) {
                    return refused(refusal, &parts);
                }
            }
            return Ok(Err((Reason::BodyTooLarge, format!("{source}: {e}"))));
        }
        Err(f) => return Err(f.into()),
    };
    // What `http` cannot represent (a request target that is not a URI, more distinct header
    // names than it holds) cannot be read as an HTTP/1.1 request: exit 2 with a message naming
    // the problem, as for what the raw parser refuses, and as `sign` answers. Only a request
    // that was read gets a verdict (`{"valid":false,...}`, exit 1).
    let parts = raw
        .to_parts()
        .map_err(|e| Fatal(format!("{}: {e}", input_name(&args.input))))?;
    let verified = match verifier.verify(&parts, &raw.body, now) {
        Ok(verified) => verified,
        Err(e) => return refused(e, &parts),
    };
    match replay {
        // With `--now`, time stands still at it; else the clock is read again when Redis has
        // answered (`replay_answer`).
        Some(cache) => {
            check_replay_redis(&cache, verified, now, || args.now.unwrap_or_else(unix_now))
        }
        None => Ok(Ok(verified)),
    }
}

/// The signature base this verifier computes for the request's signature with the default tag,
/// shown with `bad_signature`. It holds only the covered components (and the signature
/// parameters), no key material. `None` when it cannot be built (then verification would not
/// have reached the MAC either).
fn computed_base(parts: &http::request::Parts) -> Option<String> {
    use sfv::{BareItem, ListEntry, Parser, SerializeValue as _};
    let mut joined = String::new();
    for value in &parts.headers.get_all("signature-input") {
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(value.to_str().ok()?);
    }
    let dictionary = Parser::parse_dictionary(joined.as_bytes()).ok()?;
    let tag = BareItem::String(DEFAULT_TAG.to_owned());
    let mut tagged = dictionary.values().filter(|entry| {
        matches!(entry, ListEntry::InnerList(inner) if inner.params.get("tag") == Some(&tag))
    });
    let member = tagged.next()?;
    if tagged.next().is_some() {
        return None;
    }
    let text = vec![member.clone()].serialize_value().ok()?;
    signature_base_for(&RequestView::from_parts(parts), &text)
        .ok()
        .map(|base| base.as_str().to_owned())
}

/// For `expired` and `not_yet_valid`: the time the request was judged at, where that time came
/// from, and the `created` values it accepts, so that a clock or `--now` mistake shows at once.
fn time_context(now: u64, args: &VerifyArgs) -> String {
    let clock = if args.now.is_some() {
        "--now"
    } else {
        "this host's clock; --now UNIX to choose"
    };
    format!(
        " (verified at {now}, {clock}; --window {}s, --skew {}s: created must be from {} to {}, \
         and expires, if present, at least {}; compare created= and expires= in \
         Signature-Input)",
        args.window,
        args.skew,
        now.saturating_sub(args.window.saturating_add(args.skew)),
        now.saturating_add(args.skew),
        now.saturating_sub(args.skew)
    )
}

/// Where `verify` and `demo-api` keep nonces besides `--replay-redis URL` (one server): a Redis
/// Cluster or the primary that Redis Sentinel names, with the credentials, database and TLS
/// of a host-less `--replay-redis` (as proxy.toml's `redis_cluster_nodes` and
/// `redis_sentinels` with a host-less `redis_url`), and a private CA for TLS. Shared by both
/// commands, so they accept the same options with the same messages.
/// `Debug` never shows the sentinels' password.
#[derive(Clone, Default, clap::Args)]
pub struct ReplayRedisArgs {
    /// Keep the nonces in this Redis Cluster instead: a seed node, `host:port` (`host` for
    /// port 6379); repeat the option or separate nodes with commas, and list several (any node
    /// that answers gives the cluster's layout). Credentials and TLS come from --replay-redis,
    /// without a host.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_delimiter = ',',
        conflicts_with = "replay_redis_sentinel"
    )]
    pub replay_redis_cluster_node: Vec<String>,
    /// Keep the nonces on the primary these Redis Sentinels name: a sentinel, `host:port`
    /// (`host` for port 26379); repeat the option or separate sentinels with commas. Needs
    /// --replay-redis-sentinel-master; the primary's credentials, database and TLS come from
    /// --replay-redis, without a host.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_delimiter = ',',
        requires = "replay_redis_sentinel_master"
    )]
    pub replay_redis_sentinel: Vec<String>,
    /// The master name the sentinels monitor (their `sentinel monitor` line).
    #[arg(long, value_name = "NAME", requires = "replay_redis_sentinel")]
    pub replay_redis_sentinel_master: Option<String>,
    /// The sentinels' own password (their `requirepass`), if they have one.
    #[arg(long, value_name = "PASSWORD", requires = "replay_redis_sentinel")]
    pub replay_redis_sentinel_password: Option<String>,
    /// Reach the sentinels with TLS (on their `tls-port`), each certificate valid for the host
    /// written in --replay-redis-sentinel. Without it their answer and password cross the
    /// network in clear.
    #[arg(long, requires = "replay_redis_sentinel")]
    pub replay_redis_sentinel_tls: bool,
    /// PEM file of the private CA that issued the Redis servers' TLS certificates (with a
    /// rediss:// --replay-redis, or --replay-redis-sentinel-tls); default: the public web
    /// roots.
    #[arg(long, value_name = "FILE")]
    pub replay_redis_ca: Option<PathBuf>,
}

impl std::fmt::Debug for ReplayRedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayRedisArgs")
            .field("replay_redis_cluster_node", &self.replay_redis_cluster_node)
            .field("replay_redis_sentinel", &self.replay_redis_sentinel)
            .field(
                "replay_redis_sentinel_master",
                &self.replay_redis_sentinel_master,
            )
            .field(
                "replay_redis_sentinel_password",
                &self
                    .replay_redis_sentinel_password
                    .as_ref()
                    .map(|_| "[redacted]"),
            )
            .field("replay_redis_sentinel_tls", &self.replay_redis_sentinel_tls)
            .field("replay_redis_ca", &self.replay_redis_ca)
            .finish()
    }
}

impl ReplayRedisArgs {
    fn sentinel_options_given(&self) -> bool {
        self.replay_redis_sentinel_master.is_some()
            || self.replay_redis_sentinel_password.is_some()
            || self.replay_redis_sentinel_tls
    }
}

const URL_FLAG: &str = "--replay-redis";
const CLUSTER_NODE_FLAG: &str = "--replay-redis-cluster-node";
const SENTINEL_FLAG: &str = "--replay-redis-sentinel";
const CA_FLAG: &str = "--replay-redis-ca";

/// The Redis replay cache of `--replay-redis URL` (one server), of
/// `--replay-redis-cluster-node HOST:PORT...` (a Redis Cluster) or of
/// `--replay-redis-sentinel HOST:PORT... --replay-redis-sentinel-master NAME` (the primary the
/// sentinels name), those two with the credentials (database, TLS) of a host-less
/// `--replay-redis`; `None` without any. Does not connect. The error names the option at fault
/// and never holds a password.
pub fn replay_redis_cache(
    url: Option<&str>,
    args: &ReplayRedisArgs,
) -> Result<Option<countersign::replay::RedisReplayCache>, String> {
    use countersign::replay::{RedisReplayCache, DEFAULT_REPLAY_PREFIX};
    let ca = match &args.replay_redis_ca {
        Some(file) => Some((
            file,
            countersign::proxy::config::read_ca_file(file)
                .map_err(|e| format!("{CA_FLAG}: {e}"))?,
        )),
        None => None,
    };
    let connection = if !args.replay_redis_cluster_node.is_empty() {
        cluster_connection(url, &args.replay_redis_cluster_node, ca)?
    } else if !args.replay_redis_sentinel.is_empty() {
        sentinel_connection(url, args, ca)?
    } else if args.sentinel_options_given() {
        // clap's `requires` catches these; kept for a caller that builds the arguments itself.
        return Err(format!(
            "{SENTINEL_FLAG}: the sentinel options need at least one {SENTINEL_FLAG} HOST:PORT"
        ));
    } else {
        let Some(url) = url else {
            return match ca {
                Some(_) => Err(format!(
                    "{CA_FLAG}: only used with {URL_FLAG} (rediss://), {CLUSTER_NODE_FLAG} or \
                     {SENTINEL_FLAG}"
                )),
                None => Ok(None),
            };
        };
        single_connection(url, ca)?
    };
    Ok(Some(RedisReplayCache::new(
        connection,
        DEFAULT_REPLAY_PREFIX,
    )))
}

/// `--replay-redis URL` alone: one server (the contract of before the cluster and sentinel
/// options, unchanged), with a private CA when `--replay-redis-ca` is given.
fn single_connection(
    url: &str,
    ca: Option<(&PathBuf, Vec<u8>)>,
) -> Result<countersign::replay::RedisConnection, String> {
    use countersign::replay::{RedisConnection, RedisOptions};
    let connection = RedisConnection::open(url).map_err(|e| {
        if names_no_host(url) {
            format!(
                "{URL_FLAG}: the URL names no host (name the server: \
                 redis://[user:password@]host[:port][/db]; for a Redis Cluster or Sentinel, \
                 list the nodes with {CLUSTER_NODE_FLAG} or the sentinels with {SENTINEL_FLAG} \
                 and keep only the credentials and TLS in {URL_FLAG}): {e}"
            )
        } else {
            format!("{URL_FLAG}: {e}")
        }
    })?;
    let Some((file, pem)) = ca else {
        return Ok(connection);
    };
    if !url.starts_with("rediss://") {
        return Err(format!(
            "{CA_FLAG}: only used with TLS: a rediss:// {URL_FLAG} URL"
        ));
    }
    // The URL was checked on its own first: what is wrong now is the CA.
    RedisConnection::with_tls_root_cert(url, RedisOptions::default(), &pem)
        .map_err(|e| format!("{CA_FLAG}: {}: {e}", file.display()))
}

/// `--replay-redis-cluster-node`: each node's URL is the host-less `--replay-redis`'s scheme and
/// credentials (plain TCP without a password when it is left out) and the node's host:port.
fn cluster_connection(
    url: Option<&str>,
    nodes: &[String],
    ca: Option<(&PathBuf, Vec<u8>)>,
) -> Result<countersign::replay::RedisConnection, String> {
    use countersign::replay::{RedisConnection, RedisOptions};
    let info = host_less_url(
        url.unwrap_or("redis://"),
        CLUSTER_NODE_FLAG,
        "the nodes' credentials and TLS",
        CLUSTER_URL_FORMS,
    )?;
    if info.db != 0 {
        return Err(host_less_problem(
            CLUSTER_NODE_FLAG,
            "the nodes' credentials and TLS",
            CLUSTER_URL_FORMS,
            "a Redis Cluster has only database 0: leave the /db out",
        ));
    }
    check_host_port_entries(CLUSTER_NODE_FLAG, "node", nodes, 6379)?;
    let urls: Vec<String> = nodes
        .iter()
        .map(|node| format!("{}{node}", info.prefix))
        .collect();
    let nodes_error = |e: countersign::replay::RedisUrlError| {
        format!("{CLUSTER_NODE_FLAG}: {e} (each node host:port, e.g. 10.0.0.1:6379)")
    };
    let connection =
        RedisConnection::cluster(&urls, RedisOptions::default()).map_err(nodes_error)?;
    let Some((file, pem)) = ca else {
        return Ok(connection);
    };
    if !info.tls {
        return Err(format!(
            "{CA_FLAG}: only used with TLS: give the nodes' scheme as {URL_FLAG} rediss://..."
        ));
    }
    // The nodes were checked on their own first: what is wrong now is the CA.
    RedisConnection::cluster_with_tls_root_cert(&urls, RedisOptions::default(), &pem)
        .map_err(|e| format!("{CA_FLAG}: {}: {e}", file.display()))
}

/// `--replay-redis-sentinel`: the primary that the sentinels name for
/// `--replay-redis-sentinel-master`, with the credentials, database and TLS of the host-less
/// `--replay-redis` (plain TCP, no password, database 0 when it is left out).
fn sentinel_connection(
    url: Option<&str>,
    args: &ReplayRedisArgs,
    ca: Option<(&PathBuf, Vec<u8>)>,
) -> Result<countersign::replay::RedisConnection, String> {
    use countersign::replay::{RedisConnection, RedisOptions};
    const MASTER_FLAG: &str = "--replay-redis-sentinel-master";
    const PASSWORD_FLAG: &str = "--replay-redis-sentinel-password";
    let info = host_less_url(
        url.unwrap_or("redis://"),
        SENTINEL_FLAG,
        "the primary's credentials, database and TLS",
        SENTINEL_URL_FORMS,
    )?;
    let sentinels = &args.replay_redis_sentinel;
    check_host_port_entries(SENTINEL_FLAG, "sentinel", sentinels, 26379)?;
    let master = args.replay_redis_sentinel_master.as_deref().unwrap_or("");
    if master.is_empty() || master.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{MASTER_FLAG}: {:?} is not a master name (the name of the sentinels' `sentinel \
             monitor` line: not empty, no spaces)",
            master
                .chars()
                .filter(|c| !c.is_control())
                .collect::<String>()
        ));
    }
    if args.replay_redis_sentinel_password.as_deref() == Some("") {
        return Err(format!(
            "{PASSWORD_FLAG}: is empty (leave it out if the sentinels need no password)"
        ));
    }
    let node = info.into_sentinel_options(
        args.replay_redis_sentinel_password.clone(),
        args.replay_redis_sentinel_tls,
    );
    let connection = RedisConnection::sentinel(sentinels, master, &node, RedisOptions::default())
        .map_err(|e| {
        format!("{SENTINEL_FLAG}: {e} (each sentinel host:port, e.g. 10.0.0.1:26379)")
    })?;
    let Some((file, pem)) = ca else {
        return Ok(connection);
    };
    if !node.tls && !node.sentinel_tls {
        return Err(format!(
            "{CA_FLAG}: only used with TLS: to the primary ({URL_FLAG} rediss://...) or to the \
             sentinels (--replay-redis-sentinel-tls)"
        ));
    }
    // The sentinels were checked on their own first: what is wrong now is the CA.
    RedisConnection::sentinel_with_tls_root_cert(
        sentinels,
        master,
        &node,
        RedisOptions::default(),
        &pem,
    )
    .map_err(|e| format!("{CA_FLAG}: {}: {e}", file.display()))
}

/// The `--replay-redis` forms accepted with `--replay-redis-cluster-node`, for messages.
const CLUSTER_URL_FORMS: &str = "redis://[user:password@] or rediss://[user:password@]";

/// The `--replay-redis` forms accepted with `--replay-redis-sentinel`, for messages.
const SENTINEL_URL_FORMS: &str = "redis://[user:password@][/db] or rediss://[user:password@][/db]";

/// A message about the host-less `--replay-redis` given with `with` (the cluster or sentinel
/// option), which only holds `holds`, written as `forms`.
fn host_less_problem(with: &str, holds: &str, forms: &str, problem: &str) -> String {
    format!(
        "{URL_FLAG}: {problem} (with {with} the URL only holds {holds}, without a host: \
         {forms})"
    )
}

/// Whether a `redis://` or `rediss://` URL names no host (`redis://:password@`: the cluster or
/// sentinel form, given without its nodes).
fn names_no_host(url: &str) -> bool {
    !matches!(
        split_host_less_redis_url(url),
        Err(HostLessUrlProblem::Scheme | HostLessUrlProblem::NamesHost(_))
    )
}

/// A host-less `--replay-redis` (given with `with`) taken apart
/// ([`split_host_less_redis_url`]): its scheme and user info as the start of a server's URL
/// (`rediss://user:password@`, `redis://`), and what it holds (user, password, database, TLS).
/// Nothing else may be in it: the servers come from `with`.
fn host_less_url(
    url: &str,
    with: &str,
    holds: &str,
    forms: &str,
) -> Result<HostLessRedisUrl, String> {
    split_host_less_redis_url(url).map_err(|problem| {
        let problem = match problem {
            HostLessUrlProblem::NamesHost(host) => format!(
                "it names a host ({host:?}), but the servers come from {with}: leave the host out"
            ),
            other => other.to_string(),
        };
        host_less_problem(with, holds, forms, &problem)
    })
}

/// The entries of `flag` (cluster nodes, sentinels; each a `what`): each `host:port`, `host`
/// (port `default_port`) or `[v6]:port`, not a URL (credentials and TLS go in
/// `--replay-redis`), none empty, none listed twice. Ports are checked by the library's
/// constructors.
fn check_host_port_entries(
    flag: &str,
    what: &str,
    entries: &[String],
    default_port: u16,
) -> Result<(), String> {
    let count = entries.len();
    let key = |entry: &str| host_port_entry_key(entry, default_port);
    for (index, entry) in entries.iter().enumerate() {
        let which = format!("{what} {} of {count}", index + 1);
        let problem = match host_port_entry_problem(entry) {
            Some(HostPortProblem::Empty) => Some(format!(
                "{which} is empty (a stray comma? each {what} host:port, e.g. \
                 10.0.0.1:{default_port})"
            )),
            // Not quoted: a URL may hold a password.
            Some(HostPortProblem::Url) => Some(format!(
                "{which} is a URL, expected host:port (credentials and TLS go in {URL_FLAG}, \
                 without a host)"
            )),
            Some(HostPortProblem::NotHostPort) => Some(format!(
                "{which} ({:?}) is not host:port (e.g. 10.0.0.1:{default_port})",
                shown_entry(entry)
            )),
            None => None,
        };
        if let Some(problem) = problem {
            return Err(format!("{flag}: {problem}"));
        }
        let this = key(entry);
        if let Some(first) = entries[..index].iter().position(|e| key(e) == this) {
            // Shown as any refused entry is: a port that is not a number may be a password.
            return Err(format!(
                "{flag}: {which} ({:?}) is {what} {} listed again",
                shown_entry(entry),
                first + 1
            ));
        }
    }
    Ok(())
}

/// An entry as it may be shown: a port that is not a number is left out (it could be a
/// password given in the wrong place), and so are control characters.
fn shown_entry(entry: &str) -> String {
    let host = url_authority_host(entry);
    match entry[host.len()..].strip_prefix(':') {
        Some(port) if !port.bytes().all(|b| b.is_ascii_digit()) => format!("{host}:[redacted]"),
        _ => entry.chars().filter(|c| !c.is_control()).collect(),
    }
}

/// Records the nonce of `verified` in the Redis replay cache `cache` (one `SET NX GET`), then
/// reads the clock again with `answered_at` ([`replay_answer`]).
fn check_replay_redis(
    cache: &countersign::replay::RedisReplayCache,
    verified: countersign::core::Verified,
    now: u64,
    answered_at: impl FnOnce() -> u64,
) -> Result<VerifyAnswer, Fatal> {
    use countersign::replay::ReplayCache as _;
    let Some(nonce) = verified.nonce.clone() else {
        // The default policy requires a nonce, so a verified request always has one.
        return Ok(Err((
            Reason::MalformedSignature,
            "no nonce to record in the replay cache".to_owned(),
        )));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}")))?;
    let outcome = runtime.block_on(cache.check_and_record(&nonce, verified.replay_until, now));
    Ok(replay_answer(outcome, verified, answered_at()))
}

/// The verdict on a verified request from the replay cache's `outcome`, with the clock read
/// once the cache answered (`answered_at`). A "fresh" answer that came at or after
/// `replay_until` is `expired`, as the verify layer answers it (docs/PROTOCOL.md §6, phase 3):
/// the nonce is kept only until then, and so was the first copy's, so a write that ran late may
/// have found that copy's nonce already expired and called a replay fresh.
fn replay_answer(
    outcome: Result<countersign::replay::ReplayOutcome, countersign::replay::ReplayError>,
    verified: countersign::core::Verified,
    answered_at: u64,
) -> VerifyAnswer {
    use countersign::replay::ReplayOutcome;
    match outcome {
        Ok(ReplayOutcome::Fresh) if answered_at >= verified.replay_until => Err((
            Reason::Expired,
            format!(
                "the signature's window closed (at {}) before the replay cache answered (now \
                 {answered_at})",
                verified.replay_until
            ),
        )),
        Ok(ReplayOutcome::Fresh) => Ok(verified),
        Ok(ReplayOutcome::Replayed) => Err((
            Reason::Replayed,
            "nonce already recorded in the replay cache".to_owned(),
        )),
        Err(e) => Err((e.reason(), e.detail().to_owned())),
    }
}

/// Why the request could not be read: the file cannot be opened, or its content is not an
/// acceptable HTTP/1.x request (the source is named: `stdin` or the path).
enum ReadFailure {
    Open(String),
    Parse(String, RawHttpError),
}

impl From<ReadFailure> for Fatal {
    fn from(f: ReadFailure) -> Self {
        match f {
            ReadFailure::Open(msg) => Fatal(msg),
            ReadFailure::Parse(source, e) => Fatal(format!("{source}: {e}")),
        }
    }
}

/// How messages name the request's source: `stdin` for `-`, else the path as given (a file name
/// that is not UTF-8, which a path may be, shown with U+FFFD in place of what is not).
fn input_name(input: &Path) -> String {
    if input.as_os_str() == "-" {
        "stdin".to_owned()
    } else {
        input.display().to_string()
    }
}

/// Reads the request from a file or stdin (`-`).
/// Reads the request of `input` (`-`: stdin); `head` as [`read_request_keeping_head`] leaves it.
fn read_input(
    input: &Path,
    limits: Limits,
    head: &mut Option<RawRequest>,
) -> Result<RawRequest, ReadFailure> {
    let source = input_name(input);
    let read = if input.as_os_str() == "-" {
        read_request_keeping_head(io::stdin().lock(), limits, head)
    } else {
        let file = File::open(input)
            .map_err(|e| ReadFailure::Open(format!("cannot open request file {source}: {e}")))?;
        read_request_keeping_head(io::BufReader::new(file), limits, head)
    };
    read.map_err(|e| ReadFailure::Parse(source, e))
}

fn unix_now() -> u64 {
    // A clock before 1970 is a broken machine; 0 then makes every signature expired, not valid.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::{display_name, replay_redis_cache, ReplayRedisArgs};

    /// A host-less --replay-redis whose "credentials" hold a `?` or `#` names a host in
    /// disguise (`redis://:pw@evil?x=@` reaches `evil`, the rest is a query): refused, as a
    /// host named, for the cluster and the sentinel forms alike.
    #[test]
    fn a_host_hidden_before_a_query_is_refused() {
        let cluster = ReplayRedisArgs {
            replay_redis_cluster_node: vec!["10.0.0.1:6379".to_owned()],
            ..ReplayRedisArgs::default()
        };
        let sentinel = ReplayRedisArgs {
            replay_redis_sentinel: vec!["10.0.0.1:26379".to_owned()],
            replay_redis_sentinel_master: Some("mymaster".to_owned()),
            ..ReplayRedisArgs::default()
        };
        for args in [&cluster, &sentinel] {
            for url in ["redis://:pw@evil?x=@", "rediss://evil#@"] {
                let error = replay_redis_cache(Some(url), args).expect_err(url);
                assert!(error.starts_with("--replay-redis: "), "{url}: {error}");
                assert!(error.contains("names a host (\"evil\")"), "{url}: {error}");
                assert!(!error.contains("pw"), "{url}: {error}");
            }
            assert!(replay_redis_cache(Some("redis://:pw@/0"), args).is_ok());
        }
    }

    /// A "fresh" answer of the Redis replay cache that comes once the window has closed is
    /// `expired`, as in the verify layer (a late write may have found the first copy's nonce
    /// expired already); before `replay_until` it stands, and the other answers are unchanged.
    #[test]
    fn a_fresh_replay_answer_after_the_window_is_expired() {
        use countersign::replay::{ReplayError, ReplayOutcome};
        use countersign::Reason;
        let verified = countersign::core::Verified {
            identity: None,
            keyid: "k1".into(),
            nonce: Some("n".into()),
            created: 1000,
            replay_until: 1013,
        };
        let reason = |outcome, at| {
            super::replay_answer(outcome, verified.clone(), at)
                .err()
                .map(|(reason, _)| reason)
        };
        assert_eq!(reason(Ok(ReplayOutcome::Fresh), 1012), None);
        assert_eq!(
            reason(Ok(ReplayOutcome::Fresh), 1013),
            Some(Reason::Expired)
        );
        assert_eq!(
            reason(Ok(ReplayOutcome::Fresh), 1100),
            Some(Reason::Expired)
        );
        assert_eq!(
            reason(Ok(ReplayOutcome::Replayed), 1013),
            Some(Reason::Replayed)
        );
        assert_eq!(
            reason(Err(ReplayError::new("down")), 1012),
            Some(Reason::ReplayCacheUnavailable)
        );
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name("x-auth-user"), "X-Auth-User");
        assert_eq!(display_name("signature-input"), "Signature-Input");
        assert_eq!(display_name("content-digest"), "Content-Digest");
    }
}

//! Keyring files: the TOML format the CLI and the proxy both read.
//!
//! ```toml
//! active = "k1"        # the key that signs
//! rotation = "off"     # or a duration, e.g. "6h"
//! [[keys]]
//! id = "k1"
//! secret = "<base64 of >= 32 random bytes>"   # or secret_file = "path" / secret_env = "VAR"
//! # retired = true     # listed, but no longer accepted (its secret must be no other key's)
//! # rotation = "6h"    # this key's own rotation ("off" or a duration); default: the one above
//! ```
//!
//! The file is deserialised into raw structs (unknown keys are errors, so a typo such as
//! `secert` cannot silently drop a key), then converted into a [`Keyring`] with `TryFrom`. Every
//! error names the file, the key path (`keys[1].secret`) and the problem, and never quotes a
//! secret: TOML syntax errors are reported by message and line, not with the offending source
//! line, because that line may hold a secret.
//!
//! Decoded secrets go straight into zeroizing buffers. Copies that the TOML parser makes of the
//! base64 text while parsing are outside this module's control.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::core::{KeySpec, Keyring, Rotation, Secret, MIN_SECRET_LEN};

/// Largest keyring file (or `secret_file`) read: a keyring is a few hundred bytes per key, so
/// anything bigger is a wrong path (a log file, a device), not a keyring.
pub const MAX_KEYRING_FILE_BYTES: u64 = 1024 * 1024;

/// Standard base64 alphabet; trailing `=` padding optional (some tools strip it).
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What kind of problem a [`KeyfileError`] reports (for callers that branch on it; the
/// `Display` text is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyfileErrorKind {
    /// The keyring file or a `secret_file` cannot be read.
    Unreadable,
    /// Not valid TOML, a wrong value type, a missing or unknown key.
    Syntax,
    /// A secret is not valid base64.
    BadBase64,
    /// A secret decodes to fewer than 32 bytes.
    ShortSecret,
    /// `secret_env` names an unset (or non-UTF-8) environment variable.
    MissingEnv,
    /// A key sets none or more than one of `secret`, `secret_file`, `secret_env`.
    SecretSource,
    /// `active` names no listed key, or a retired one.
    UnknownActive,
    /// Two keys share an id.
    DuplicateId,
    /// A key id contains characters that cannot appear in a `keyid` parameter.
    BadId,
    /// `rotation` (top-level or a key's) is not `off` or a valid duration of at least one
    /// second.
    BadDuration,
    /// No keys are listed.
    NoKeys,
    /// A retired key's secret is also the secret of a key that is not retired (so it is still
    /// accepted).
    SharedSecret,
}

/// A keyring file problem: which file, which key (`keys[1].secret`), what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyfileError {
    file: PathBuf,
    key: Option<String>,
    kind: KeyfileErrorKind,
    problem: String,
}

impl KeyfileError {
    fn new(
        file: &Path,
        key: Option<String>,
        kind: KeyfileErrorKind,
        problem: impl Into<String>,
    ) -> Self {
        KeyfileError {
            file: file.to_path_buf(),
            key,
            kind,
            problem: problem.into(),
        }
    }

    /// The keyring file (as given by the caller).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The key path inside the file, e.g. `keys[1].secret`; `None` for whole-file problems.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The kind of problem.
    pub fn kind(&self) -> KeyfileErrorKind {
        self.kind
    }

    /// The problem, without file and key.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for KeyfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "keyring file {}", self.file.display())?;
        if let Some(key) = &self.key {
            write!(f, ", key {key}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for KeyfileError {}

/// A duration that is not `off`, `<n>ms`, `<n>s`, `<n>m`, `<n>h` or `<n>d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    text: String,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a duration: expected \"off\" or a whole number followed by ms, s, m, h or d (e.g. \"10s\", \"6h\")",
            self.text
        )
    }
}

impl std::error::Error for DurationError {}

/// Longest `rotation` period: 365 days.
const MAX_ROTATION_SECS: u64 = 365 * 24 * 3600;

/// Parses a configuration duration: `"500ms"`, `"10s"`, `"30m"`, `"6h"`, `"1d"`, or `"off"`
/// (→ `None`). One whole number and one unit, no spaces inside, no sign, no fractions; surrounding
/// whitespace is ignored. Shared by the keyring file (`rotation`) and the proxy config.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, DurationError> {
    let err = || DurationError {
        text: text.to_owned(),
    };
    let trimmed = text.trim();
    if trimmed == "off" {
        return Ok(None);
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(err)?;
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(err());
    }
    let n: u64 = number.parse().map_err(|_| err())?;
    let seconds_per_unit: u64 = match unit {
        "ms" => return Ok(Some(Duration::from_millis(n))),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err()),
    };
    n.checked_mul(seconds_per_unit)
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(err)
}

/// A secret string from the file, zeroized when dropped (also when deserialisation fails
/// half-way through the file).
struct RawSecret(Zeroizing<String>);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| RawSecret(Zeroizing::new(s)))
    }
}

/// The file as written. Only syntax is checked here; meaning is checked in `TryFrom`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyring {
    active: String,
    #[serde(default)]
    rotation: Option<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    #[serde(default)]
    secret: Option<RawSecret>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    retired: bool,
    /// This key's own rotation; absent: the top-level one.
    #[serde(default)]
    rotation: Option<String>,
}

/// A `rotation` value (top-level or a key's): `off`, or a whole number of seconds from 1s to
/// 365d. The error is the problem, for the caller to name the file and key.
fn parse_rotation(text: &str) -> Result<Rotation, String> {
    match parse_duration(text) {
        Ok(None) => Ok(Rotation::Off),
        // At most a year, as every other duration countersign reads: a longer period
        // is a typo ("213503982334601d" never rotates: every keyid is `id.0`).
        Ok(Some(period)) if period.as_secs() > MAX_ROTATION_SECS => {
            Err(format!("{text:?} is longer than the maximum of 365d"))
        }
        Ok(Some(period)) if period.subsec_nanos() == 0 && period.as_secs() >= 1 => {
            Ok(Rotation::Every(period))
        }
        Ok(Some(_)) => Err(format!(
            "{text:?}: the rotation period must be a whole number of seconds, at least 1s"
        )),
        // A secret pasted here is not quoted back (the duration error quotes the value).
        Err(_) if looks_like_secret(text) => Err(format!(
            "the value ({PASTED_SECRET} \"off\" or a duration such as \"6h\") is not a duration"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// A parsed file plus where it came from (to resolve `secret_file` and to name it in errors).
struct SourcedKeyring<'a> {
    raw: RawKeyring,
    origin: &'a Path,
}

impl TryFrom<SourcedKeyring<'_>> for Keyring {
    type Error = KeyfileError;

    fn try_from(src: SourcedKeyring<'_>) -> Result<Keyring, KeyfileError> {
        let origin = src.origin;
        let raw = src.raw;
        let err = |key: String, kind, problem: String| {
            KeyfileError::new(origin, Some(key), kind, problem)
        };

        let rotation = match raw.rotation.as_deref() {
            None => Rotation::Off,
            Some(text) => parse_rotation(text).map_err(|problem| {
                err("rotation".into(), KeyfileErrorKind::BadDuration, problem)
            })?,
        };

        if raw.keys.is_empty() {
            return Err(err(
                "keys".into(),
                KeyfileErrorKind::NoKeys,
                "no keys listed (add a [[keys]] table; `countersign keygen` prints one)".into(),
            ));
        }

        // Each key's own rotation, read before the ids are checked: the `.` rule holds for
        // every id once any key rotates, whether it is listed before or after that key.
        let own_rotations = raw
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                key.rotation
                    .as_deref()
                    .map(parse_rotation)
                    .transpose()
                    .map_err(|problem| {
                        err(
                            format!("keys[{i}].rotation"),
                            KeyfileErrorKind::BadDuration,
                            problem,
                        )
                    })
            })
            .collect::<Result<Vec<Option<Rotation>>, KeyfileError>>()?;
        // Where rotation is on, to name it when an id breaks the `.` rule.
        let rotating_at = own_rotations
            .iter()
            .enumerate()
            .find(|(_, own)| matches!(own.unwrap_or(rotation), Rotation::Every(_)))
            .map(|(i, own)| match own {
                Some(_) => format!("keys[{i}].rotation"),
                None => format!("rotation, inherited by keys[{i}]"),
            });

        let mut specs: Vec<KeySpec> = Vec::with_capacity(raw.keys.len());
        // Where each spec's secret came from (`keys[1].secret_file`), for the check below.
        let mut sources: Vec<String> = Vec::with_capacity(raw.keys.len());
        for ((i, key), own_rotation) in raw.keys.into_iter().enumerate().zip(own_rotations) {
            let at = |field: &str| format!("keys[{i}].{field}");
            if !crate::core::is_valid_key_id(&key.id) {
                return Err(err(
                    at("id"),
                    KeyfileErrorKind::BadId,
                    format!(
                        "id {} must be {}",
                        quoted(&key.id),
                        crate::core::KEY_ID_RULE
                    ),
                ));
            }
            if let Some(rotating_at) = rotating_at.as_deref().filter(|_| key.id.contains('.')) {
                return Err(err(
                    at("id"),
                    KeyfileErrorKind::BadId,
                    format!("id {:?} must not contain '.' when rotation is on (it is on by {rotating_at}; rotated keyids are id.epoch)", key.id),
                ));
            }
            if let Some(first) = specs.iter().position(|s| s.id == key.id) {
                return Err(err(
                    at("id"),
                    KeyfileErrorKind::DuplicateId,
                    format!("duplicate id {} (also keys[{first}].id)", quoted(&key.id)),
                ));
            }
            let (source_field, mut bytes) = match (key.secret, key.secret_file, key.secret_env) {
                (Some(secret), None, None) => {
                    let bytes = decode_secret(&secret.0).map_err(|problem| {
                        err(
                            at("secret"),
                            KeyfileErrorKind::BadBase64,
                            format!("secret is {problem}"),
                        )
                    })?;
                    ("secret", bytes)
                }
                (None, Some(file), None) => {
                    let path = secret_file_path(origin, &file);
                    // A secret pasted here instead of under `secret` is never echoed.
                    let shown = if file.to_str().is_some_and(looks_like_secret) {
                        format!("the file named there ({PASTED_SECRET} the path of a file)")
                    } else {
                        path.display().to_string()
                    };
                    let text = read_limited(&path).map_err(|problem| {
                        err(
                            at("secret_file"),
                            KeyfileErrorKind::Unreadable,
                            format!("cannot read {shown}: {problem}"),
                        )
                    })?;
                    let bytes = decode_secret(&text).map_err(|problem| {
                        err(
                            at("secret_file"),
                            KeyfileErrorKind::BadBase64,
                            format!("{shown} is {problem}"),
                        )
                    })?;
                    ("secret_file", bytes)
                }
                (None, None, Some(var)) => {
                    // A secret pasted here instead of under `secret` is never echoed.
                    let var_shown = if looks_like_secret(&var) {
                        format!("named there ({PASTED_SECRET} the name of a variable)")
                    } else {
                        format!("{var:?}")
                    };
                    let value = std::env::var(&var).map(Zeroizing::new).map_err(|e| {
                        let why = match e {
                            std::env::VarError::NotPresent => "is not set",
                            std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                        };
                        err(
                            at("secret_env"),
                            KeyfileErrorKind::MissingEnv,
                            format!("environment variable {var_shown} {why}"),
                        )
                    })?;
                    let bytes = decode_secret(&value).map_err(|problem| {
                        err(
                            at("secret_env"),
                            KeyfileErrorKind::BadBase64,
                            format!("environment variable {var_shown} is {problem}"),
                        )
                    })?;
                    ("secret_env", bytes)
                }
                (secret, file, env) => {
                    let set: Vec<&str> = [
                        secret.is_some().then_some("secret"),
                        file.is_some().then_some("secret_file"),
                        env.is_some().then_some("secret_env"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    let problem = if set.is_empty() {
                        "no secret: set exactly one of secret, secret_file, secret_env".to_owned()
                    } else {
                        format!(
                            "set exactly one of secret, secret_file, secret_env (found {})",
                            set.join(", ")
                        )
                    };
                    return Err(err(
                        format!("keys[{i}]"),
                        KeyfileErrorKind::SecretSource,
                        problem,
                    ));
                }
            };
            let len = bytes.len();
            // Move the buffer out (no copy); Secret re-wraps it in a zeroizing container.
            let secret = Secret::new(std::mem::take(&mut *bytes)).map_err(|_| {
                err(
                    at(source_field),
                    KeyfileErrorKind::ShortSecret,
                    format!("secret is {len} bytes, at least {MIN_SECRET_LEN} are required (use `countersign keygen`)"),
                )
            })?;
            specs.push(KeySpec {
                id: key.id,
                secret,
                retired: key.retired,
                rotation: own_rotation,
            });
            sources.push(at(source_field));
        }

        // A retired key is "no longer accepted"; its secret still is when a key that is not
        // retired has it too (the new key's secret pasted from the old one, one secret file
        // named twice): whoever holds it signs under that key's id, which every request shows.
        for (r, retired) in specs.iter().enumerate().filter(|(_, s)| s.retired) {
            let shared = specs.iter().enumerate().find(|(_, s)| {
                !s.retired && bool::from(s.secret.expose().ct_eq(retired.secret.expose()))
            });
            if let Some((a, accepted)) = shared {
                return Err(err(
                    sources[a].clone(),
                    KeyfileErrorKind::SharedSecret,
                    format!(
                        "the secret of key {} is the secret of keys[{r}] ({}), which is retired: \
                         a request signed with that secret is still accepted, as keyid {}; give \
                         {} a new secret (`countersign keygen`), or remove keys[{r}] if it was \
                         only renamed",
                        quoted(&accepted.id),
                        quoted(&retired.id),
                        quoted(&accepted.id),
                        quoted(&accepted.id),
                    ),
                ));
            }
        }

        match specs.iter().find(|s| s.id == raw.active) {
            None => {
                let ids: Vec<&str> = specs
                    .iter()
                    .map(|s| match looks_like_secret(&s.id) {
                        true => "(an id not shown: it looks like a base64 secret)",
                        false => s.id.as_str(),
                    })
                    .collect();
                return Err(err(
                    "active".into(),
                    KeyfileErrorKind::UnknownActive,
                    format!(
                        "active key {} is not listed (listed: {})",
                        quoted(&raw.active),
                        ids.join(", ")
                    ),
                ));
            }
            Some(spec) if spec.retired => {
                return Err(err(
                    "active".into(),
                    KeyfileErrorKind::UnknownActive,
                    // Step 1 of the rotation runbook leaves an API's `active` on the old key,
                    // so an API is where this is met: say what the edit must do as well.
                    format!(
                        "active key {} is retired; a retired key cannot sign: point `active` \
                         at a key that is not retired in the same edit, also in a keyring that \
                         only verifies (an API's: the new key)",
                        quoted(&raw.active)
                    ),
                ));
            }
            Some(_) => {}
        }

        // Everything Keyring::new checks was checked above with a precise key path; this arm
        // only keeps a future rule from being lost.
        Keyring::new(&raw.active, specs, rotation)
            .map_err(|e| KeyfileError::new(origin, None, KeyfileErrorKind::Syntax, e.to_string()))
    }
}

/// How a message names a `secret_file` path or `secret_env` name that [`looks_like_secret`],
/// followed by what the key takes instead.
const PASTED_SECRET: &str =
    "not shown: it looks like a base64 secret, which belongs under `secret`; this key takes";

/// `text` (an id, `active`) quoted for a message, unless it [`looks_like_secret`]: then a note
/// that it is not shown.
fn quoted(text: &str) -> String {
    if looks_like_secret(text) {
        "(not shown: it looks like a base64 secret, which belongs under `secret`)".to_owned()
    } else {
        format!("{text:?}")
    }
}

/// Whether `text` decodes as a secret would (base64, at least [`MIN_SECRET_LEN`] bytes; hex
/// of that many bytes is base64 too): a `secret_file` path or `secret_env` name written so is
/// most likely the secret itself, pasted under the wrong key, and messages must not quote it.
/// Real names (`COUNTERSIGN_KEY_K1`, `/etc/countersign/k1.key`) are far shorter or hold
/// characters base64 has not.
fn looks_like_secret(text: &str) -> bool {
    decode_secret(text).is_ok_and(|bytes| bytes.len() >= MIN_SECRET_LEN)
        || decoded_len_over_lines(text).is_some_and(|len| len >= MIN_SECRET_LEN)
}

/// Decodes trimmed base64 into a zeroizing buffer; the error says what the text is instead.
fn decode_secret(text: &str) -> Result<Zeroizing<Vec<u8>>, &'static str> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty (expected base64 of at least 32 random bytes)");
    }
    // Reserve the final size up front so decoding never reallocates and leaves an unzeroized
    // copy behind.
    let mut out = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(text.len())));
    if SECRET_BASE64.decode_vec(text, &mut out).is_ok() {
        return Ok(out);
    }
    // `base64` wraps its output at 76 columns, so a secret of 58 bytes or more made as the
    // docs show (`head -c 64 /dev/urandom | base64`) comes over several lines: say so, rather
    // than "not valid base64" of what plainly is base64.
    if decoded_len_over_lines(text).is_some() {
        return Err(
            "base64 written over several lines (`base64` wraps its output at 76 \
             columns): write it on one line (`base64 -w0`, or `countersign keygen`)",
        );
    }
    Err("not valid base64 (standard alphabet, e.g. from `countersign keygen`)")
}

/// The decoded length of `text` (trimmed) when it is base64 only once the white space inside
/// it is removed (written over several lines); `None` otherwise. Joined and decoded in
/// zeroizing buffers of their final size, so no reallocation leaves a copy behind.
fn decoded_len_over_lines(text: &str) -> Option<usize> {
    let text = text.trim();
    if !text.contains(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let mut joined = Zeroizing::new(String::with_capacity(text.len()));
    for piece in text.split_ascii_whitespace() {
        joined.push_str(piece);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(
        joined.len(),
    )));
    SECRET_BASE64
        .decode_vec(joined.as_str(), &mut out)
        .ok()
        .map(|()| out.len())
}

/// Reads a whole file (keyring or secret) into a zeroizing string, refusing huge files. The
/// proxy reads a keyring with it too, to find its `secret_file`s.
pub(crate) fn read_limited(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a directory".into());
    }
    // Before reading: read to the limit, a large file cut inside a character (or any binary
    // file) would be reported as "not UTF-8 text".
    if meta.len() > MAX_KEYRING_FILE_BYTES {
        return Err(format!("larger than {MAX_KEYRING_FILE_BYTES} bytes"));
    }
    // Sized up front so that reading never grows the buffer (growing copies it, and frees the
    // old copy unzeroized): the file's length and the one byte more that tells "too large";
    // the whole limit when the length is not known in advance (a pipe such as
    // `--keyring <(sops -d keys.toml)`, a /proc file: their length reads 0).
    let capacity = match meta.len() {
        0 => MAX_KEYRING_FILE_BYTES,
        len => len.min(MAX_KEYRING_FILE_BYTES),
    } + 1;
    let mut text = Zeroizing::new(String::with_capacity(
        usize::try_from(capacity).unwrap_or(0),
    ));
    let read = file
        .take(MAX_KEYRING_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => "not UTF-8 text".to_owned(),
            _ => e.to_string(),
        })?;
    if read as u64 > MAX_KEYRING_FILE_BYTES {
        return Err(format!("larger than {MAX_KEYRING_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// Reads and parses a keyring file. `secret_file` paths resolve against its folder.
pub fn load_keyring(path: &Path) -> Result<Keyring, KeyfileError> {
    let text = read_limited(path).map_err(|problem| {
        KeyfileError::new(
            path,
            None,
            KeyfileErrorKind::Unreadable,
            format!("cannot read: {problem}"),
        )
    })?;
    parse_keyring(&text, path)
}

/// Where a key's `secret_file` is: relative to the folder of the keyring file `origin`.
fn secret_file_path(origin: &Path, file: &Path) -> PathBuf {
    origin.parent().unwrap_or_else(|| Path::new("")).join(file)
}

/// Only the `secret_file` entries of a keyring file: everything else is ignored, not checked.
#[cfg(feature = "proxy")]
#[derive(Deserialize)]
struct RawSecretFiles {
    #[serde(default)]
    keys: Vec<RawSecretFile>,
}

#[cfg(feature = "proxy")]
#[derive(Deserialize)]
struct RawSecretFile {
    #[serde(default)]
    secret_file: Option<PathBuf>,
}

/// The `secret_file`s keyring `text` (read from `origin`) names, resolved as [`load_keyring`]
/// resolves them, in file order; empty when `text` is not TOML with a `keys` list. For the
/// proxy's file-change check (`server.reload_check_interval`), which must notice a changed
/// secret file as well as a changed keyring file; whether the keyring is valid is the reload's
/// business, not this one's.
#[cfg(feature = "proxy")]
pub(crate) fn secret_files(text: &str, origin: &Path) -> Vec<PathBuf> {
    toml::from_str::<RawSecretFiles>(text)
        .map(|raw| {
            raw.keys
                .into_iter()
                .filter_map(|key| key.secret_file)
                .map(|file| secret_file_path(origin, &file))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses keyring TOML. `origin` is the file the text came from: errors name it, and relative
/// `secret_file` paths resolve against its folder.
pub fn parse_keyring(text: &str, origin: &Path) -> Result<Keyring, KeyfileError> {
    let deserializer = toml::Deserializer::new(text);
    let raw: RawKeyring = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // One line, as in a log line (SIGHUP) or `check-config`'s message; without the value
        // a type error quotes (it may be a secret under the wrong key).
        let mut problem = without_quoted_value(&one_line(inner.message()));
        if let Some(span) = inner.span() {
            let (line, column) = line_column(text, span.start);
            problem = format!("{problem} (line {line}, column {column})");
        }
        // `active` read inside a key's table: a top-level key written after the first
        // `[[keys]]` (TOML puts it in that table), as appending a whole `keygen` output does.
        if path.starts_with("keys[") && path.ends_with("].active") {
            problem.push_str(
                "; `active` is a top-level key and must come before the first [[keys]] table \
                 (appending a whole `countersign keygen` output puts it after one: append only \
                 its [[keys]] table, and point the top-level `active` at the new key when it \
                 should sign)",
            );
        }
        // serde_path_to_error reports "." when the failure is at the top level.
        let key = (path != "." && !path.is_empty()).then_some(path);
        KeyfileError::new(origin, key, KeyfileErrorKind::Syntax, problem)
    })?;
    Keyring::try_from(SourcedKeyring { raw, origin })
}

/// A parser message on one line: the TOML parser's messages can span several (`invalid
/// string` / `expected `"`, `'``); their trimmed, non-empty lines joined with `": "`. Shared
/// with the proxy's config and users files (`proxy::config`), so every file error is one line.
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// A serde type or value error without the value it quotes: `invalid type: string "...",
/// expected a boolean` becomes `invalid type: string, expected a boolean` (the same for
/// `invalid value:`, and for integers, floats and booleans, quoted in backticks). Why: the value
/// may be a secret in the wrong place (a keyring secret under another key, a password written
/// without quotes is an integer), and these messages go to stderr and, on SIGHUP, to the log.
/// Shared with the proxy's config and users files (`proxy::config`).
pub(crate) fn without_quoted_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        // serde writes `<kind> <value>, expected <what>`; the value ends at the last
        // ", expected " (a quoted string may hold that text too, the expectation does not).
        let Some(expected_at) = rest.rfind(", expected ") else {
            continue;
        };
        let unexpected = &rest[..expected_at];
        let kind = &unexpected[..unexpected.find(['"', '`']).unwrap_or(unexpected.len())];
        return format!("{prefix}{}{}", kind.trim_end(), &rest[expected_at..]);
    }
    message.to_owned()
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A complete keyring file with one fresh key (32 random bytes from the OS CSPRNG):
/// `countersign keygen > keys.toml` gives a working keyring. To add the key to an existing
/// keyring, append only its `[[keys]]` table (the comment in the output says so).
pub fn keygen_entry(id: &str) -> String {
    let secret = Secret::random();
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(secret.expose()));
    let id = toml_string(id);
    format!(
        "# countersign keyring: one fresh key (32 random bytes, base64).\n\
         # To add this key to an existing keyring instead, append only the [[keys]] table\n\
         # below, and point `active` at it there when it should sign.\n\
         active = {id}        # the key that signs\n\
         rotation = \"off\"     # or a period such as \"6h\"\n\
         \n\
         [[keys]]\n\
         id = {id}\n\
         secret = \"{}\"\n",
        encoded.as_str()
    )
}

/// A TOML basic string for `value` (quotes, backslashes and control characters escaped).
fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TOML syntax error is one line (a log line on SIGHUP), with its position.
    #[test]
    fn syntax_errors_are_one_line() {
        let text = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = B7B7B7=\n";
        let err = parse_keyring(text, Path::new("keys.toml")).unwrap_err();
        assert_eq!(err.kind(), KeyfileErrorKind::Syntax);
        let message = err.to_string();
        assert_eq!(message.lines().count(), 1, "{message:?}");
        assert!(message.contains("(line 4, column 10)"), "{message:?}");
        assert_eq!(one_line("a\n  b \n\n c\n"), "a: b: c");
        assert_eq!(one_line("one"), "one");
        assert_eq!(
            without_quoted_value(r#"invalid type: string "s, expected x", expected a boolean"#),
            "invalid type: string, expected a boolean"
        );
        assert_eq!(
            without_quoted_value("invalid value: integer `-1`, expected usize"),
            "invalid value: integer, expected usize"
        );
        assert_eq!(
            without_quoted_value("invalid type: sequence, expected a string"),
            "invalid type: sequence, expected a string"
        );
        assert_eq!(without_quoted_value("invalid string"), "invalid string");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("off"), Ok(None));
        assert_eq!(parse_duration("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_duration("30m"), Ok(Some(Duration::from_secs(1800))));
        assert_eq!(parse_duration("6h"), Ok(Some(Duration::from_secs(21_600))));
        assert_eq!(parse_duration("1d"), Ok(Some(Duration::from_secs(86_400))));
        assert_eq!(
            parse_duration("500ms"),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_duration(" 2s "), Ok(Some(Duration::from_secs(2))));
        for bad in [
            "",
            "s",
            "10",
            "10 s",
            "-1s",
            "+1s",
            "1.5h",
            "1w",
            "ms",
            "99999999999999999999s",
            "18446744073709551615d",
            "OFF",
            "1S",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn line_columns() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 0), (1, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}

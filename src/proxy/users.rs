//! The users file and password checks.
//!
//! ```toml
//! [[users]]
//! name = "alice"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."   # from `countersign hash-password`
//! roles = ["admin"]
//! ```
//!
//! Only argon2id PHC strings are accepted, checked when the file loads (a typo'd hash is a
//! config error, not a user who can never log in): the parameters, the version and the salt
//! (at least argon2's 8 bytes), everything the verifier would otherwise refuse at each login.
//! Verification runs on tokio's blocking pool (argon2 takes tens of milliseconds of CPU and
//! would stall the async workers). An unknown user costs the same work: the password is
//! verified against a dummy hash with argon2 parameters of the file's hashes, so response time
//! does not reveal which names exist. A file
//! that mixes parameter sets (some users rehashed with stronger ones) gives each unknown name
//! one of its sets, fixed per name and drawn in the proportions the users have them
//! (`UserDb::dummy_for`), so the time of one name's login tells no more than the share of
//! users with each set does.
//! Concurrent checks are bounded (each holds the hash's argon2 memory: 19 MiB for
//! `hash-password`'s hashes), so a login flood queues instead of exhausting memory. The hashes'
//! argon2 parameters are bounded too ([`HashLimits`], the `[auth]` `max_hash_*` keys): a hash
//! with `m` in gigabytes or `t` in thousands would make every login (and the dummy hash
//! computed at load) cost that much, so such a file is refused when it loads. Passwords are
//! never logged and the record's `Debug` redacts the hash.
//!
//! A reload compares the new users with those in use ([`UsersHandle::replace`],
//! [`UserDb::changes_to`]): the proxy ends the sessions of users removed or whose password or
//! roles changed, since a session keeps the identity of its login. Sessions in Redis outlive
//! the proxies, so no reload may ever compare them with a newer file (every proxy restarted
//! on it, or proxies of one fleet on different files): each user's [`CredentialStamp`], a short
//! digest of the user's record computed when the file loads, is kept with the session at
//! login, and a Redis session lookup accepts the session only while the proxy's users file
//! still gives that user the same stamp ([`UsersHandle::stamp_is_current`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::config::{deserialize_toml, read_text_file, ConfigError, DEFAULT_MAX_USERNAME_BYTES};
use crate::core::Identity;

/// Default longest password, in bytes: of a login (`auth.max_password_bytes`) and of what
/// `hash-password` reads (`--max-password-bytes`).
pub const DEFAULT_MAX_PASSWORD_BYTES: usize = 1024;

/// Largest value of `auth.max_password_bytes` and `hash-password --max-password-bytes`, and the
/// bound [`check_login`] and [`hash_password_with`] apply themselves. argon2 hashes any length
/// (its first step digests the password with BLAKE2b, linear in its length), but no password
/// needs megabytes, and a login body of that size would only cost the proxy.
pub const MAX_PASSWORD_BYTES_LIMIT: usize = 64 * 1024;

/// Upper bounds on the argon2 parameters of the users file's hashes (`[auth]`
/// `max_hash_memory`, `max_hash_iterations`, `max_hash_parallelism`).
///
/// Why: verifying a password costs what its hash's parameters say (memory `m`, passes `t`),
/// and so do the dummy hashes for unknown users, computed with the file's parameter sets
/// when it loads. One hash with `m=4000000,t=100` made loading take 4 GB and 40 s, and
/// every login would pay it. With these bounds, logins hold at most
/// `max_concurrent_password_checks` × `max_memory_kib` KiB at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashLimits {
    /// Largest argon2 memory cost `m`, in KiB (argon2's unit). Default 256 MiB.
    pub max_memory_kib: u32,
    /// Largest number of passes `t`. Default 10.
    pub max_iterations: u32,
    /// Largest number of lanes `p`. Default 8.
    pub max_parallelism: u32,
}

/// Default `auth.max_hash_memory`, in KiB: 256 MiB. Accepts `hash-password`'s 19 MiB, every
/// OWASP argon2id setting (at most 46 MiB), RFC 9106's second recommendation (64 MiB) and
/// libsodium's "moderate" (256 MiB), while a single check cannot take gigabytes.
pub const DEFAULT_MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;
/// Default `auth.max_hash_iterations`: 10 (OWASP's settings use 1 to 5, RFC 9106's 1 and 3,
/// libsodium's at most 4).
pub const DEFAULT_MAX_HASH_ITERATIONS: u32 = 10;
/// Default `auth.max_hash_parallelism`: 8 (RFC 9106 recommends 4; some libraries used 8).
/// This build computes the lanes one after the other, so `p` adds no memory or time beyond
/// `m` and `t`; the bound keeps hashes to what other verifiers accept too.
pub const DEFAULT_MAX_HASH_PARALLELISM: u32 = 8;

impl Default for HashLimits {
    fn default() -> Self {
        HashLimits {
            max_memory_kib: DEFAULT_MAX_HASH_MEMORY_KIB,
            max_iterations: DEFAULT_MAX_HASH_ITERATIONS,
            max_parallelism: DEFAULT_MAX_HASH_PARALLELISM,
        }
    }
}

/// `MemTotal` + `SwapTotal` of `/proc/meminfo`, in KiB; None where it cannot be read.
fn machine_memory_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(field("MemTotal")?.saturating_add(field("SwapTotal").unwrap_or(0)))
}

/// `n` KiB in GiB, MiB (rounded down, marked `~`, when inexact) or KiB: for messages only.
fn kib_text(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}GiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}MiB", n >> 10),
        n if n >= 1 << 10 => format!("~{}MiB", n >> 10),
        n => format!("{n}KiB"),
    }
}

/// One user as listed in the users file.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Login name (compared exactly, case-sensitive). No two names of a file may be the same
    /// once NFC-normalised (they would differ only in how their characters are encoded).
    pub name: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Roles forwarded to the APIs.
    pub roles: Vec<String>,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("name", &self.name)
            .field("password_hash", &"[redacted]")
            .field("roles", &self.roles)
            .finish()
    }
}

/// Length of a [`CredentialStamp`], in bytes (128 bits).
pub const CREDENTIAL_STAMP_BYTES: usize = 16;

/// A short digest of one user's record in the users file: the first 16 bytes of SHA-256 over
/// a fixed label, the user name, the password hash (PHC string) and the roles as a set (sorted,
/// repeats once), each length-prefixed. Two records have the same stamp exactly when
/// [`UserDb::changes_to`] would see no change between them.
///
/// Why: a session in Redis outlives the proxy that created it, so a users-file reload is not
/// always there to end it (every proxy restarted on a new file; a proxy of the fleet on another
/// file). The stamp is kept with the session at login, and a lookup compares it with the
/// user's stamp in the proxy's current file: a user removed, or whose password or roles
/// changed, no longer matches. Each user's stamp is computed once, when the file loads; a
/// lookup costs one map lookup and a 16-byte constant-time compare.
///
/// The stamp reveals nothing useful (a digest of a salted argon2 hash), but it stays out of
/// logs and `Debug` all the same.
#[derive(Clone, Copy)]
pub struct CredentialStamp([u8; CREDENTIAL_STAMP_BYTES]);

impl CredentialStamp {
    /// Separates these digests from any other SHA-256 of the same fields.
    const LABEL: &'static [u8] = b"countersign credential stamp v1\0";

    /// The stamp of `record`.
    pub fn of(record: &UserRecord) -> Self {
        fn field(hasher: &mut Sha256, bytes: &[u8]) {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        let mut roles: Vec<&str> = record.roles.iter().map(String::as_str).collect();
        roles.sort_unstable();
        roles.dedup();
        let mut hasher = Sha256::new();
        hasher.update(Self::LABEL);
        field(&mut hasher, record.name.as_bytes());
        field(&mut hasher, record.password_hash.as_bytes());
        hasher.update((roles.len() as u64).to_be_bytes());
        for role in roles {
            field(&mut hasher, role.as_bytes());
        }
        let digest = hasher.finalize();
        let mut stamp = [0u8; CREDENTIAL_STAMP_BYTES];
        stamp.copy_from_slice(&digest[..CREDENTIAL_STAMP_BYTES]);
        CredentialStamp(stamp)
    }

    /// A stamp as stored (with a session).
    pub fn from_bytes(bytes: [u8; CREDENTIAL_STAMP_BYTES]) -> Self {
        CredentialStamp(bytes)
    }

    /// The stamp's bytes, to store.
    pub fn as_bytes(&self) -> &[u8; CREDENTIAL_STAMP_BYTES] {
        &self.0
    }

    /// Whether `other` is the same stamp, compared in constant time.
    pub fn matches(&self, other: &CredentialStamp) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Debug for CredentialStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialStamp([redacted])")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsersFile {
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// One user of a [`UserDb`]: the record and its stamp, computed when the file loads.
#[derive(Clone)]
struct UserEntry {
    record: UserRecord,
    stamp: CredentialStamp,
}

/// The users, by name.
#[derive(Clone, Default)]
pub struct UserDb {
    users: HashMap<String, UserEntry>,
    /// What unknown names are verified against ([`UserDb::dummy_for`]).
    dummies: Dummies,
    /// Users whose parameter set has no dummy hash ([`MAX_DUMMY_SETS`]), when there are any.
    other_parameters: Option<OtherParameters>,
    /// Users whose hash costs less than every argon2id setting OWASP lists
    /// ([`UserDb::weak_hash_warning`]).
    weak_hashes: usize,
}

/// Most argon2 parameter sets of one users file that get a dummy hash each (one argon2 hash
/// per set when the file first loads in a process). A file mixes a few (the parameters of
/// `hash-password` of several releases, a stronger set for administrators); more than this
/// is no plan anyone made, and each set's hash would slow the load.
pub const MAX_DUMMY_SETS: usize = 8;

/// The dummy hashes an unknown name is verified against, one per argon2 parameter set of the
/// file (at most [`MAX_DUMMY_SETS`], the most common; in the order of their costs), each with
/// the number of users whose hashes have that set.
///
/// Why more than one: a password check costs what its hash's parameters say. With one dummy
/// (the most common set), a user whose hash has another set answered in another time than
/// any unknown name, so that name was known to exist. Now an unknown name gets a set too,
/// drawn in the users' proportions and fixed per name (a keyed hash of the name picks it):
/// if 1 user in 10 has a stronger set, so does 1 unknown name in 10, and the same name
/// always, so asking again tells nothing either.
#[derive(Clone, Default)]
struct Dummies {
    sets: Vec<(Arc<str>, usize)>,
    /// The key of the draw: a digest of one of the file's names and password hashes
    /// ([`draw_key`]), so it is the same on every proxy of a fleet that loads the same file (a name gets the same set
    /// whichever proxy answers) and unknown to anyone without the file (whose salted hashes
    /// nobody outside can guess), who could otherwise compute an unknown name's set and see
    /// a known name answer in another.
    key: [u8; 32],
}

/// The users file mixes more argon2 parameter sets than [`MAX_DUMMY_SETS`]: the logins of
/// the users with the others take a time no unknown name's does
/// ([`UserDb::parameter_warning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OtherParameters {
    /// Users whose hashes have a set without a dummy hash.
    users: usize,
    /// Parameter sets in the file.
    sets: usize,
}

/// Whether two hashes cost the same to verify (argon2's `m`, `t`, `p`).
fn same_cost(a: &argon2::Params, b: &argon2::Params) -> bool {
    cost_of(a) == cost_of(b)
}

impl fmt::Debug for UserDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.users.keys().collect();
        names.sort();
        f.debug_struct("UserDb").field("users", &names).finish()
    }
}

/// Checks that `hash` is an argon2id PHC string the verifier can use, with parameters within
/// `limits`; returns its parameters.
fn check_hash(hash: &str, limits: &HashLimits) -> Result<argon2::Params, String> {
    let parsed = PasswordHash::new(hash).map_err(|e| {
        format!("not a PHC password hash ({e}); generate one with `countersign hash-password`")
    })?;
    if parsed.algorithm.as_str() != "argon2id" {
        // Named only when it is a known algorithm: a plain password written here instead of
        // its hash reads as `$<algorithm>...` when it starts with `$`, and must not be echoed.
        const KNOWN: [&str; 7] = [
            "argon2i",
            "argon2d",
            "scrypt",
            "pbkdf2",
            "pbkdf2-sha256",
            "pbkdf2-sha512",
            "balloon",
        ];
        let algorithm = parsed.algorithm.as_str();
        let named = if KNOWN.contains(&algorithm) {
            format!("algorithm {algorithm:?}")
        } else {
            "an unknown algorithm (not shown: it may be a plain password)".to_owned()
        };
        return Err(format!(
            "{named} is not accepted, use argon2id (`countersign hash-password`)"
        ));
    }
    let Some(salt) = parsed.salt.filter(|_| parsed.hash.is_some()) else {
        return Err("hash or salt missing from the PHC string".to_owned());
    };
    let rehash = "rehash the password with `countersign hash-password`";
    // What the verifier refuses before any argon2 work, so that no password could ever match
    // (and the login would fail at once, where an unknown name costs the argon2 work): a
    // version argon2 does not define, a salt shorter than argon2's minimum or not B64.
    if let Some(version) = parsed.version {
        if argon2::Version::try_from(version).is_err() {
            return Err(format!(
                "argon2 version v={version} is not one argon2 defines (16 or 19): no password \
                 could match it; {rehash}"
            ));
        }
    }
    let mut salt_bytes = [0u8; 64];
    match salt.decode_b64(&mut salt_bytes) {
        Ok(bytes) if bytes.len() >= argon2::MIN_SALT_LEN => {}
        Ok(bytes) => {
            return Err(format!(
                "the salt is {} bytes, argon2 needs at least {}: no password could match it; \
                 {rehash}",
                bytes.len(),
                argon2::MIN_SALT_LEN
            ))
        }
        Err(_) => {
            return Err(format!(
                "the salt is not valid B64 (PHC strings' base64): no password could match it; \
                 {rehash}"
            ))
        }
    }
    // `p` first, from the text: argon2 0.5's `Params::new` multiplies it by 8 in `u32` before
    // its own bound, which overflows for p >= 2^29 (a panic in a debug build, a wrapped value
    // in a release one), so a hostile or mistyped file must not reach it with such a `p`.
    if let Some(p) = parsed.params.get_decimal("p") {
        if p > limits.max_parallelism {
            return Err(parallelism_error(p, limits.max_parallelism, rehash));
        }
    }
    // Parameters out of range would only fail at login time; fail now instead.
    let params =
        argon2::Params::try_from(&parsed).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    if params.m_cost() > limits.max_memory_kib {
        return Err(format!(
            "argon2 memory m={} KiB ({}) is above auth.max_hash_memory ({} KiB = {}): every \
             login would need that much memory; {rehash} or raise auth.max_hash_memory",
            params.m_cost(),
            kib_text(params.m_cost().into()),
            limits.max_memory_kib,
            kib_text(limits.max_memory_kib.into()),
        ));
    }
    if params.t_cost() > limits.max_iterations {
        return Err(format!(
            "argon2 iterations t={} is above auth.max_hash_iterations ({}): every login would \
             take that many passes; {rehash} or raise auth.max_hash_iterations",
            params.t_cost(),
            limits.max_iterations,
        ));
    }
    if params.p_cost() > limits.max_parallelism {
        return Err(parallelism_error(
            params.p_cost(),
            limits.max_parallelism,
            rehash,
        ));
    }
    Ok(params)
}

/// The refusal of a hash whose lanes `p` exceed `auth.max_hash_parallelism` (`max`).
fn parallelism_error(p: u32, max: u32, rehash: &str) -> String {
    format!(
        "argon2 parallelism p={p} is above auth.max_hash_parallelism ({max}); {rehash} or raise \
         auth.max_hash_parallelism"
    )
}

impl UserDb {
    /// Reads a users file, with the default [`HashLimits`] and name bound. A proxy started
    /// from a config file loads it with `[auth]`'s limits instead (`ProxyConfig::load_users`,
    /// which start, `check-config` and SIGHUP reload all use).
    pub fn load(path: &Path) -> Result<UserDb, ConfigError> {
        Self::load_with_limits(path, &HashLimits::default())
    }

    /// Reads a users file whose hashes must be within `limits` (names: the default bound).
    pub fn load_with_limits(path: &Path, limits: &HashLimits) -> Result<UserDb, ConfigError> {
        let text = read_text_file(path, "users file")?;
        Self::parse_with_limits(&text, path, limits)
    }

    /// Parses users-file `text` (errors name `path`), with the default [`HashLimits`] and name
    /// bound.
    pub fn parse(text: &str, path: &Path) -> Result<UserDb, ConfigError> {
        Self::parse_with_limits(text, path, &HashLimits::default())
    }

    /// Parses users-file `text` (errors name `path`); hashes must be within `limits`, names
    /// at most [`DEFAULT_MAX_USERNAME_BYTES`] long (the login's default bound).
    pub fn parse_with_limits(
        text: &str,
        path: &Path,
        limits: &HashLimits,
    ) -> Result<UserDb, ConfigError> {
        Self::parse_with_name_limit(text, path, limits, DEFAULT_MAX_USERNAME_BYTES)
    }

    /// Parses users-file `text` (errors name `path`); hashes must be within `limits`, names at
    /// most `max_name_bytes` bytes (UTF-8) long: the login refuses a longer name before any
    /// check (`auth.max_username_bytes`), so such a user could never log in.
    pub fn parse_with_name_limit(
        text: &str,
        path: &Path,
        limits: &HashLimits,
        max_name_bytes: usize,
    ) -> Result<UserDb, ConfigError> {
        let raw: RawUsersFile = deserialize_toml(text, path)?;
        let records = raw
            .users
            .into_iter()
            .map(|u| UserRecord {
                name: u.name,
                password_hash: u.password,
                roles: u.roles,
            })
            .collect();
        Self::build(records, path, limits, max_name_bytes)
    }

    /// Builds a database from records (dev mode, tests), with the default [`HashLimits`] and
    /// name bound ([`DEFAULT_MAX_USERNAME_BYTES`]). Errors name the file `<records>`.
    pub fn from_records(records: Vec<UserRecord>) -> Result<UserDb, ConfigError> {
        Self::build(
            records,
            Path::new("<records>"),
            &HashLimits::default(),
            DEFAULT_MAX_USERNAME_BYTES,
        )
    }

    fn build(
        records: Vec<UserRecord>,
        path: &Path,
        limits: &HashLimits,
        max_name_bytes: usize,
    ) -> Result<UserDb, ConfigError> {
        let mut users = HashMap::with_capacity(records.len());
        // Each name's NFC form and the entry it came from: two names that differ only in
        // their Unicode encoding are the same text to people and to most APIs.
        let mut canonical: HashMap<String, usize> = HashMap::with_capacity(records.len());
        let nfc = icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
        // How many users' hashes have each parameter set, in the order first seen.
        let mut parameter_sets: Vec<(argon2::Params, usize)> = Vec::new();
        let mut weak_hashes = 0;
        for (i, record) in records.into_iter().enumerate() {
            let key = |field: &str| format!("users[{i}].{field}");
            if record.name.is_empty() {
                return Err(ConfigError::new(path, key("name"), "must not be empty"));
            }
            if record.name.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    path,
                    key("name"),
                    "must not contain control characters",
                ));
            }
            if record.name.len() > max_name_bytes {
                return Err(ConfigError::new(
                    path,
                    key("name"),
                    format!(
                        "{} bytes long, more than auth.max_username_bytes ({max_name_bytes}): \
                         this user could never log in (shorten the name or raise the limit)",
                        record.name.len()
                    ),
                ));
            }
            // Checked before anything is hashed (the dummy hash below uses these parameters).
            match check_hash(&record.password_hash, limits) {
                Ok(params) => {
                    if !meets_owasp(params.m_cost(), params.t_cost()) {
                        weak_hashes += 1;
                    }
                    match (parameter_sets.iter_mut()).find(|(seen, _)| same_cost(seen, &params)) {
                        Some((_, count)) => *count += 1,
                        None => parameter_sets.push((params, 1)),
                    }
                }
                Err(problem) => {
                    return Err(ConfigError::new(
                        path,
                        key("password"),
                        format!("user {:?}: {problem}", record.name),
                    ))
                }
            }
            if record.roles.iter().any(|r| r.is_empty()) {
                return Err(ConfigError::new(
                    path,
                    key("roles"),
                    "a role must not be empty",
                ));
            }
            if users.contains_key(&record.name) {
                return Err(ConfigError::new(
                    path,
                    key("name"),
                    format!("duplicate user {:?}", record.name),
                ));
            }
            // Names compare exactly (`Bob` and `bob` are two users), but two names that are
            // one text encoded two ways (`é` precomposed, or `e` and a combining accent) look
            // the same in this file, in logs and in the identity the APIs receive, and an API
            // that normalises names takes them for one user.
            match canonical.entry(nfc.normalize(&record.name).into_owned()) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    return Err(ConfigError::new(
                        path,
                        key("name"),
                        format!(
                            "user {:?} is the same name as users[{}].name once Unicode-normalised \
                             (NFC): it differs only in how its characters are encoded, so it \
                             looks the same in logs and to the APIs; write both names the same \
                             way (NFC) or give the users different names",
                            record.name,
                            first.get()
                        ),
                    ));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
            let stamp = CredentialStamp::of(&record);
            users.insert(record.name.clone(), UserEntry { record, stamp });
        }
        // The most common sets first (a stable sort: equally common ones as first seen), so
        // those beyond MAX_DUMMY_SETS are the rarest.
        let set_count = parameter_sets.len();
        parameter_sets.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        parameter_sets.truncate(MAX_DUMMY_SETS);
        // Drawn in the order of their costs, not of how common they are: an edit of the file
        // that changes the counts, even their order, moves only the names at the shares'
        // edges (`dummy_for`).
        parameter_sets.sort_by_key(|(params, _)| cost_of(params));
        let sets: Vec<(Arc<str>, usize)> = parameter_sets
            .iter()
            .map(|(params, count)| (dummy_hash_for(params), *count))
            .collect();
        let with_dummy: usize = sets.iter().map(|(_, count)| count).sum();
        let other_parameters = (with_dummy < users.len()).then(|| OtherParameters {
            users: users.len() - with_dummy,
            sets: set_count,
        });
        let key = draw_key(&users);
        Ok(UserDb {
            users,
            dummies: Dummies { sets, key },
            other_parameters,
            weak_hashes,
        })
    }

    /// The hash an unknown `name` is verified against: the dummy hash of one of the file's
    /// argon2 parameter sets, drawn in the users' proportions by a keyed hash of the name
    /// ([`Dummies`] says why). `None` for a file without users.
    fn dummy_for(&self, name: &str) -> Option<Arc<str>> {
        use hmac::Mac as _;
        let sets = &self.dummies.sets;
        if let [(only, _)] = sets.as_slice() {
            return Some(only.clone());
        }
        let total: usize = sets.iter().map(|(_, count)| count).sum();
        let mut mac = crate::core::keyed_hmac(&self.dummies.key);
        mac.update(name.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag[..8]);
        // The name's point in [0, 1) (64 bits), and the set whose share of the users covers
        // it, the shares laid end to end in a fixed order: when an edit changes the shares,
        // only names near their edges change sets (adding 1 user to 100 moves about 1 name
        // in 1000), where a draw modulo the count moved most of them, and a name that changed
        // its time after an edit was unknown. `point / 2^64 < covered / total`, in integers.
        let point = u128::from(u64::from_be_bytes(first)) * total as u128;
        let mut covered = 0u128;
        for (hash, count) in sets {
            covered += *count as u128;
            if point < covered << 64 {
                return Some(hash.clone());
            }
        }
        sets.last().map(|(hash, _)| hash.clone())
    }

    /// When the users' hashes mix more argon2 parameter sets than [`MAX_DUMMY_SETS`]: a
    /// password check costs what its hash's parameters say, and no unknown name is checked
    /// against the rarest sets, so a login's response time tells the names whose hashes have
    /// them from unknown names. Said at start, reload and `check-config`.
    pub fn parameter_warning(&self) -> Option<String> {
        self.other_parameters.map(|other| {
            format!(
                "{} of {} users' password hashes have argon2 parameters beyond the \
                 {MAX_DUMMY_SETS} most common of the file's {} sets: unknown names are checked \
                 against those {MAX_DUMMY_SETS} only, so a login's response time tells those \
                 users' names from unknown ones; rehash their passwords with `countersign \
                 hash-password` (or all of them with one set)",
                other.users,
                self.users.len(),
                other.sets,
            )
        })
    }

    /// When some users' hashes cost less than every argon2id setting OWASP's Password Storage
    /// Cheat Sheet lists ([`OWASP_ARGON2ID`]): such a file, once stolen, is that much cheaper
    /// to guess passwords from. They are accepted (a file hashed for tests, or by another
    /// tool); said at start, reload and `check-config`, as `hash-password` says it.
    pub fn weak_hash_warning(&self) -> Option<String> {
        (self.weak_hashes > 0).then(|| {
            format!(
                "{} of {} users' password hashes cost less than OWASP's least argon2id setting \
                 (19MiB with 2 iterations, argon2's default, or 46MiB with 1): a stolen users \
                 file is that much cheaper to guess their passwords from; rehash them with \
                 `countersign hash-password` (they are accepted meanwhile)",
                self.weak_hashes,
                self.users.len(),
            )
        })
    }

    /// The record for `name`.
    pub fn get(&self, name: &str) -> Option<&UserRecord> {
        self.users.get(name).map(|entry| &entry.record)
    }

    /// The [`CredentialStamp`] of `name`'s record.
    pub fn stamp_of(&self, name: &str) -> Option<CredentialStamp> {
        self.users.get(name).map(|entry| entry.stamp)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The users of `self` (the database in use) whose sessions must end now that `newer`
    /// replaces it: those `newer` no longer lists, those whose password hash changed and those
    /// whose roles changed. Names compare exactly, as the login looks them up (`Bob` and `bob`
    /// are two users), so a user renamed counts as removed. Roles compare as sets: a reorder
    /// or a repeated role grants nothing new and ends no session. Users added by `newer` have
    /// no sessions yet. Each list is sorted by name.
    pub fn changes_to(&self, newer: &UserDb) -> UserChanges {
        let mut changes = UserChanges::default();
        for (name, old) in &self.users {
            let old = &old.record;
            match newer.get(name) {
                None => changes.removed.push(name.clone()),
                Some(new) if new.password_hash != old.password_hash => {
                    changes.password_changed.push(name.clone());
                }
                Some(new) if !same_roles(&old.roles, &new.roles) => {
                    changes.roles_changed.push(name.clone());
                }
                Some(_) => {}
            }
        }
        changes.removed.sort_unstable();
        changes.password_changed.sort_unstable();
        changes.roles_changed.sort_unstable();
        changes
    }
}

/// Whether two role lists grant the same roles (order and repeats aside).
fn same_roles<A: AsRef<str>, B: AsRef<str>>(a: &[A], b: &[B]) -> bool {
    use std::collections::BTreeSet;
    a.iter().map(AsRef::as_ref).collect::<BTreeSet<&str>>()
        == b.iter().map(AsRef::as_ref).collect::<BTreeSet<&str>>()
}

/// Users whose sessions a users-file reload ends ([`UserDb::changes_to`]): a session keeps the
/// identity (name and roles) of its login, so it would outlive a removal or a role change, and
/// a password reset is how an operator locks a user out. Names only: never the hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserChanges {
    /// No longer in the file.
    pub removed: Vec<String>,
    /// Still there with another password hash.
    pub password_changed: Vec<String>,
    /// Still there, same hash, other roles.
    pub roles_changed: Vec<String>,
}

impl UserChanges {
    /// Every user whose sessions end, removed first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.removed
            .iter()
            .chain(&self.password_changed)
            .chain(&self.roles_changed)
            .map(String::as_str)
    }

    /// How many users changed.
    pub fn len(&self) -> usize {
        self.removed.len() + self.password_changed.len() + self.roles_changed.len()
    }

    /// Whether no user changed (sessions all stay).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for UserChanges {
    /// `removed: bob; password changed: carol` (the non-empty groups), each group's names
    /// as [`NameList`] shows them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (what, names) in [
            ("removed", &self.removed),
            ("password changed", &self.password_changed),
            ("roles changed", &self.roles_changed),
        ] {
            if !names.is_empty() {
                write!(f, "{sep}{what}: {}", NameList(names))?;
                sep = "; ";
            }
        }
        Ok(())
    }
}

/// User names for a log line: `a, b, c`, at most [`NameList::MAX_SHOWN`] of them and then
/// `and N more` (a file rewritten from scratch can change thousands of users, and one log line
/// should stay readable).
#[derive(Debug, Clone, Copy)]
pub struct NameList<'a>(pub &'a [String]);

impl NameList<'_> {
    /// Most names shown.
    pub const MAX_SHOWN: usize = 20;
}

impl fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for name in self.0.iter().take(Self::MAX_SHOWN) {
            write!(f, "{sep}{name}")?;
            sep = ", ";
        }
        if let Some(hidden) = self.0.len().checked_sub(Self::MAX_SHOWN).filter(|&n| n > 0) {
            write!(f, " and {hidden} more")?;
        }
        Ok(())
    }
}

/// The current users, swappable at runtime (SIGHUP reload) without blocking readers, and the
/// limit on concurrent password checks.
#[derive(Clone, Debug)]
pub struct UsersHandle {
    db: Arc<ArcSwap<UserDb>>,
    /// Each argon2 check holds its hash's memory (19 MiB for `hash-password`'s, at most
    /// `auth.max_hash_memory`) and a CPU for tens of milliseconds; without a bound, a flood of
    /// logins would queue hundreds of them on the blocking pool at once.
    checks: Arc<tokio::sync::Semaphore>,
    max_checks: usize,
}

/// Default bound on concurrent password checks: one per CPU.
pub fn default_max_concurrent_checks() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl UsersHandle {
    /// A handle holding `db`, allowing [`default_max_concurrent_checks`] password checks at
    /// once. Also computes the dummy hash for unknown users (one argon2 hash, once per
    /// process), so the first unknown-user login is not slower than others: create the handle
    /// at startup.
    pub fn new(db: UserDb) -> Self {
        Self::with_max_concurrent_checks(db, default_max_concurrent_checks())
    }

    /// Like [`new`](Self::new), with at most `max_checks` (at least 1) password checks running
    /// at once; further logins wait their turn.
    pub fn with_max_concurrent_checks(db: UserDb, max_checks: usize) -> Self {
        prepare_dummy_hash();
        let max_checks = max_checks.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        UsersHandle {
            db: Arc::new(ArcSwap::from_pointee(db)),
            checks: Arc::new(tokio::sync::Semaphore::new(max_checks)),
            max_checks,
        }
    }

    /// Password checks running right now (for metrics and tests); at most the configured
    /// maximum, further logins wait for a turn.
    pub fn checks_in_progress(&self) -> usize {
        self.max_checks - self.checks.available_permits()
    }

    /// The current users.
    pub fn load(&self) -> Arc<UserDb> {
        self.db.load_full()
    }

    /// Whether the current users have `name` with the record `stamp` was made from (neither
    /// removed nor given another password hash or roles since). One map lookup and a
    /// constant-time compare: the Redis session lookup asks this on every request.
    pub fn stamp_is_current(&self, name: &str, stamp: &CredentialStamp) -> bool {
        self.db
            .load()
            .users
            .get(name)
            .is_some_and(|entry| entry.stamp.matches(stamp))
    }

    /// Whether the current users have `name` with the same `roles` (as a set). For sessions
    /// stored without a [`CredentialStamp`] (created before stamps existed, or rewritten by
    /// such a proxy): the most they can be compared on.
    pub fn has_user_with_roles<R: AsRef<str>>(&self, name: &str, roles: &[R]) -> bool {
        self.db
            .load()
            .users
            .get(name)
            .is_some_and(|entry| same_roles(&entry.record.roles, roles))
    }

    /// Replaces the users (sessions already created are not affected).
    pub fn store(&self, db: UserDb) {
        self.db.store(Arc::new(db));
    }

    /// Replaces the users and returns who changed from the database replaced (read in the
    /// same atomic swap, so no other store can slip in between): the users whose sessions
    /// must end ([`UserDb::changes_to`]). The sessions themselves are the caller's to end:
    /// the session store is async, this is not.
    pub fn replace(&self, db: UserDb) -> UserChanges {
        let newer = Arc::new(db);
        let older = self.db.swap(Arc::clone(&newer));
        older.changes_to(&newer)
    }
}

/// A hash of a random password with `params`, verified when the user is unknown so that the
/// answer takes as long as for a known user. Computed once per parameter set per process
/// (one argon2 hash), so reloading a users file costs nothing more.
fn dummy_hash_for(params: &argon2::Params) -> Arc<str> {
    type Cache = parking_lot::Mutex<HashMap<(u32, u32, u32), Arc<str>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let key = (params.m_cost(), params.t_cost(), params.p_cost());
    if let Some(hash) = cache.lock().get(&key) {
        return hash.clone();
    }
    let mut random = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut OsRng, &mut *random);
    let salt = SaltString::generate(&mut OsRng);
    let argon2 = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    // Hashing with parameters that parsed from a valid PHC string does not fail; were it
    // to, the empty string makes unknown-user checks fast (a timing difference, never a
    // wrong answer: unknown users are always rejected).
    let hash: Arc<str> = argon2
        .hash_password(&random[..], &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
        .into();
    cache.lock().insert(key, hash.clone());
    hash
}

/// The key of [`UserDb::dummy_for`]'s draw: the least of the users' digests, each SHA-256
/// over one user's name and password hash (length-prefixed). Secret (a salted hash is in each)
/// and the same on every proxy loading the file, like a digest of the whole file, but not
/// changed by most edits: only one that removes or rehashes the user whose digest is least,
/// or adds one with a lesser digest (about 1 edit in as many as there are users). A key
/// changed by every edit drew every unknown name anew each time, and the names whose login
/// time changed after an edit were the unknown ones.
fn draw_key(users: &HashMap<String, UserEntry>) -> [u8; 32] {
    users
        .iter()
        .map(|(name, entry)| {
            let mut digest = Sha256::new();
            digest.update(b"countersign/unknown-user-parameters/v2");
            for part in [name.as_bytes(), entry.record.password_hash.as_bytes()] {
                digest.update((part.len() as u64).to_be_bytes());
                digest.update(part);
            }
            <[u8; 32]>::from(digest.finalize())
        })
        .min()
        .unwrap_or_default()
}

/// An argon2 parameter set's place in [`Dummies::sets`]: by memory, passes, lanes.
fn cost_of(params: &argon2::Params) -> (u32, u32, u32) {
    (params.m_cost(), params.t_cost(), params.p_cost())
}

/// The dummy hash for the default parameters (`hash_password`'s).
fn default_dummy_hash() -> Arc<str> {
    dummy_hash_for(&argon2::Params::default())
}

/// Computes the dummy hash for the default parameters (one argon2 hash) so the first
/// unknown-user login is not slower than later ones. Call at startup, off the async workers.
pub fn prepare_dummy_hash() {
    let _ = default_dummy_hash();
}

fn verify(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Checks a login. `Some(identity)` when `username` exists and `password` matches its hash.
///
/// The argon2 work runs in `spawn_blocking`; an unknown user is verified against a dummy hash
/// so the time taken is similar. The password is never logged.
pub async fn check_password(
    users: &UsersHandle,
    username: &str,
    password: &str,
) -> Option<Identity> {
    check_login(users, username, password)
        .await
        .map(|(identity, _)| identity)
}

/// The users database a login was checked against ([`check_login`]).
///
/// Why: a users-file reload swaps the users, then ends the sessions of those it removed or
/// changed. A login whose password check (tens of milliseconds) started before the swap, with
/// the old password, could create its session after those sessions were ended, and keep it.
/// Asked once the session exists, [`UsersSeen::still_current`] closes that: a reload seen by
/// then changed the user (the session must end now), one not seen yet swaps later and ends the
/// session itself.
#[derive(Debug, Clone)]
pub struct UsersSeen(Arc<UserDb>);

impl UsersSeen {
    /// The [`CredentialStamp`] of `name` in the database the login was checked against: the
    /// one to keep with the session.
    pub fn stamp_of(&self, name: &str) -> Option<CredentialStamp> {
        self.0.stamp_of(name)
    }

    /// Whether `name` has the same password hash and roles in `users` now as in the database
    /// its login was checked against (so no reload removed or changed that user since): the
    /// user's [`CredentialStamp`] then is still current, the check Redis session lookups make.
    pub fn still_current(&self, users: &UsersHandle, name: &str) -> bool {
        if Arc::ptr_eq(&self.0, &users.load()) {
            return true;
        }
        self.stamp_of(name)
            .is_some_and(|stamp| users.stamp_is_current(name, &stamp))
    }
}

/// [`check_password`], also returning the users database the password was checked against.
pub async fn check_login(
    users: &UsersHandle,
    username: &str,
    password: &str,
) -> Option<(Identity, UsersSeen)> {
    // The bounds are `auth.max_username_bytes` and `auth.max_password_bytes`, checked by the
    // caller before. The password is capped here too, at the largest value that key takes, so
    // a caller that forgot cannot make argon2 digest megabytes; the name is not (capped at the
    // password's bound, as it once was, a longer name the config allows could never log in).
    if password.len() > MAX_PASSWORD_BYTES_LIMIT {
        return None;
    }
    let db = users.load();
    let record = db.get(username).cloned();
    let hash: Arc<str> = match &record {
        Some(r) => r.password_hash.as_str().into(),
        None => db.dummy_for(username).unwrap_or_else(default_dummy_hash),
    };
    let password = Zeroizing::new(password.to_owned());
    let known = record.is_some();
    // Held until the check itself finishes: the permit moves into the blocking task. Held by
    // this future instead, it was released when a client hung up mid-check (the future is
    // dropped) while the argon2 work went on, so a flood of logins that disconnect at once ran
    // any number of checks, each holding its hash's memory. The semaphore is never closed, so
    // acquiring only waits.
    let permit = Arc::clone(&users.checks).acquire_owned().await.ok()?;
    let matched = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        // Unknown users: the same work against the dummy hash, and the result is ignored.
        let matched = verify(&password, &hash);
        known && matched
    })
    .await
    .unwrap_or(false);
    match record {
        Some(r) if matched => Some((
            Identity {
                user: r.name.into(),
                roles: r.roles.into_iter().map(Into::into).collect(),
            },
            UsersSeen(db),
        )),
        _ => None,
    }
}

/// The argon2id cost of a new hash (`hash-password --memory --iterations --parallelism`).
///
/// The default is argon2's own: 19 MiB, 2 passes, 1 lane, the first of OWASP's argon2id
/// settings. Costlier settings (RFC 9106's second recommendation is 64 MiB, 3 passes, 4 lanes)
/// make a stolen users file slower to crack, and every login and every dummy check for an
/// unknown name pays them too; the proxy accepts a hash up to its [`HashLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory `m`, in KiB (argon2's unit): at least 8 KiB per lane.
    pub memory_kib: u32,
    /// Passes `t`: at least 1.
    pub iterations: u32,
    /// Lanes `p`: 1 to [`MAX_HASH_LANES`].
    pub parallelism: u32,
}

/// Most lanes argon2 defines (2^24 − 1).
pub const MAX_HASH_LANES: u32 = (1 << 24) - 1;

/// Whether `memory_kib` with `passes` costs at least one of [`OWASP_ARGON2ID`]'s settings.
fn meets_owasp(memory_kib: u32, passes: u32) -> bool {
    OWASP_ARGON2ID
        .iter()
        .any(|&(memory, least)| memory_kib >= memory && passes >= least)
}

/// The argon2id costs (memory in KiB, passes; one lane) of OWASP's Password Storage Cheat
/// Sheet, equally strong by its account: a hash should meet at least one.
pub const OWASP_ARGON2ID: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];

impl Default for HashCost {
    fn default() -> Self {
        HashCost {
            memory_kib: argon2::Params::DEFAULT_M_COST,
            iterations: argon2::Params::DEFAULT_T_COST,
            parallelism: argon2::Params::DEFAULT_P_COST,
        }
    }
}

impl HashCost {
    /// argon2's parameters, or what is out of argon2's range, in the terms of `hash-password`'s
    /// flags.
    pub fn params(&self) -> Result<argon2::Params, String> {
        if self.iterations == 0 {
            return Err("--iterations must be at least 1".to_owned());
        }
        if self.parallelism == 0 || self.parallelism > MAX_HASH_LANES {
            return Err(format!("--parallelism must be 1 to {MAX_HASH_LANES}"));
        }
        // argon2 gives each lane at least 8 KiB (two blocks of a sync point each).
        let least = u64::from(self.parallelism) * 8;
        if u64::from(self.memory_kib) < least {
            return Err(format!(
                "--memory {} is less than argon2's 8KiB per lane ({} for --parallelism {})",
                kib_text(self.memory_kib.into()),
                kib_text(least),
                self.parallelism
            ));
        }
        argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| format!("invalid argon2 parameters: {e}"))
    }

    /// Whether this machine can give argon2 the memory the cost asks for. argon2 allocates it
    /// whole and then writes every block: more than the machine's memory and swap either
    /// fails the allocation, which aborts the process ("memory allocation of N bytes failed",
    /// exit 134), or, with an allocator that reserves address space only (jemalloc), fills
    /// memory until the kernel kills the process. `hash-password --memory 4000GiB` did one or
    /// the other after the password was typed, where it must exit 2 naming `--memory`.
    /// Compared with `/proc/meminfo`'s `MemTotal` + `SwapTotal` where there is one; then a
    /// reservation of the amount (address space only, given back at once) must succeed.
    pub fn check_allocatable(&self) -> Result<(), String> {
        let asked_kib = u64::from(self.memory_kib);
        let refused = |why: String| {
            format!(
                "--memory {} cannot be allocated on this machine: {why}",
                kib_text(asked_kib)
            )
        };
        if let Some(total_kib) = machine_memory_kib() {
            if asked_kib > total_kib {
                return Err(refused(format!(
                    "its memory and swap are {} (argon2 takes and writes it all)",
                    kib_text(total_kib)
                )));
            }
        }
        let bytes = usize::try_from(asked_kib * 1024)
            .map_err(|_| refused("more than this process can address".to_owned()))?;
        Vec::<u8>::new()
            .try_reserve_exact(bytes)
            .map_err(|e| refused(e.to_string()))
    }

    /// Why this cost is weaker than every argon2id setting OWASP's Password Storage Cheat Sheet
    /// lists ([`OWASP_ARGON2ID`]: 46 MiB × 1 pass, 19 MiB × 2 (argon2's default), 12 MiB × 3,
    /// 9 MiB × 4, 7 MiB × 5, one lane); None when it meets one of them. A weaker hash is made
    /// all the same (tests, a device that cannot afford more), with a warning.
    pub fn below_recommended(&self) -> Option<String> {
        (!meets_owasp(self.memory_kib, self.iterations)).then(|| {
            format!(
                "--memory {} with --iterations {} is weaker than OWASP's least argon2id cost \
                 (19MiB with 2 iterations, argon2's default, or 46MiB with 1): a stolen users \
                 file is that much cheaper to guess passwords from",
                kib_text(self.memory_kib.into()),
                self.iterations
            )
        })
    }

    /// What in this cost is above `limits`, one line per `[auth]` key that would have to be
    /// raised for the proxy to accept the hash (empty when it is accepted as it is).
    pub fn above(&self, limits: &HashLimits) -> Vec<String> {
        let mut above = Vec::new();
        if self.memory_kib > limits.max_memory_kib {
            above.push(format!(
                "--memory {} is above auth.max_hash_memory ({})",
                kib_text(self.memory_kib.into()),
                kib_text(limits.max_memory_kib.into())
            ));
        }
        if self.iterations > limits.max_iterations {
            above.push(format!(
                "--iterations {} is above auth.max_hash_iterations ({})",
                self.iterations, limits.max_iterations
            ));
        }
        if self.parallelism > limits.max_parallelism {
            above.push(format!(
                "--parallelism {} is above auth.max_hash_parallelism ({})",
                self.parallelism, limits.max_parallelism
            ));
        }
        above
    }
}

/// Hashes `password` as an argon2id PHC string with a random salt and the default
/// parameters (19 MiB, 2 passes, 1 lane: the OWASP recommendation).
pub fn hash_password(password: &str) -> Result<String, String> {
    hash_password_with(password, &HashCost::default())
}

/// Hashes `password` as an argon2id PHC string with a random salt at `cost`.
pub fn hash_password_with(password: &str, cost: &HashCost) -> Result<String, String> {
    if password.is_empty() {
        return Err("empty password".to_owned());
    }
    if password.len() > MAX_PASSWORD_BYTES_LIMIT {
        return Err(format!(
            "password longer than {MAX_PASSWORD_BYTES_LIMIT} bytes"
        ));
    }
    let params = cost.params()?;
    cost.check_allocatable()?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A users database of one user `a` with password `pw`, hashed with argon2id at `m` KiB
    /// and `t` passes.
    fn one_user(m: u32, t: u32) -> UserDb {
        let params = argon2::Params::new(m, t, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        UserDb::from_records(vec![UserRecord {
            name: "a".into(),
            password_hash: hash,
            roles: vec![],
        }])
        .unwrap()
    }

    /// `hash-password`'s flags become the hash's `m`, `t` and `p`, and the users file takes
    /// the hash; out-of-range flags are refused in their own terms, before any hashing.
    #[test]
    fn hash_cost_is_the_hashs_parameters() {
        let cost = HashCost {
            memory_kib: 64,
            iterations: 3,
            parallelism: 4,
        };
        let hash = hash_password_with("pw", &cost).unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=3,p=4$"), "{hash}");
        let params = check_hash(&hash, &HashLimits::default()).unwrap();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (64, 3, 4)
        );
        let default = hash_password("pw").unwrap();
        assert!(
            default.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{default}"
        );

        let refused = |memory_kib, iterations, parallelism| {
            HashCost {
                memory_kib,
                iterations,
                parallelism,
            }
            .params()
            .unwrap_err()
        };
        assert_eq!(refused(64, 0, 1), "--iterations must be at least 1");
        assert_eq!(refused(64, 1, 0), "--parallelism must be 1 to 16777215");
        assert_eq!(
            refused(64, 1, 1 << 24),
            "--parallelism must be 1 to 16777215"
        );
        assert_eq!(
            refused(31, 1, 4),
            "--memory 31KiB is less than argon2's 8KiB per lane (32KiB for --parallelism 4)"
        );
        assert!(hash_password_with(
            "pw",
            &HashCost {
                iterations: 0,
                ..cost
            }
        )
        .is_err());
    }

    /// Above the proxy's bounds, each flag names the `[auth]` key to raise.
    #[test]
    fn hash_cost_above_the_limits_names_the_keys() {
        let limits = HashLimits::default();
        assert!(HashCost::default().above(&limits).is_empty());
        let at_bounds = HashCost {
            memory_kib: limits.max_memory_kib,
            iterations: limits.max_iterations,
            parallelism: limits.max_parallelism,
        };
        assert!(at_bounds.above(&limits).is_empty());
        let over = HashCost {
            memory_kib: limits.max_memory_kib + 1024,
            iterations: limits.max_iterations + 1,
            parallelism: limits.max_parallelism + 1,
        };
        assert_eq!(
            over.above(&limits),
            [
                "--memory 257MiB is above auth.max_hash_memory (256MiB)",
                "--iterations 11 is above auth.max_hash_iterations (10)",
                "--parallelism 9 is above auth.max_hash_parallelism (8)",
            ]
        );
    }

    /// A name longer than the login accepts could never log in: refused when the file loads,
    /// naming the entry and the limit.
    #[test]
    fn names_longer_than_the_login_limit_are_refused() {
        let hash = {
            let params = argon2::Params::new(8, 1, 1, None).unwrap();
            let salt = SaltString::generate(&mut OsRng);
            Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password(b"pw", &salt)
                .unwrap()
                .to_string()
        };
        let text = |name: &str| format!("[[users]]\nname = \"{name}\"\npassword = \"{hash}\"\n");
        let limits = HashLimits::default();
        let path = Path::new("users.toml");
        // Bytes, not characters: "é" is two.
        let db = UserDb::parse_with_name_limit(&text("aé"), path, &limits, 3).unwrap();
        assert_eq!(db.len(), 1);
        let err = UserDb::parse_with_name_limit(&text("aéb"), path, &limits, 3).unwrap_err();
        assert_eq!(err.key(), "users[0].name");
        assert!(
            err.problem().contains("auth.max_username_bytes (3)"),
            "{err}"
        );
        // The default bound is the login's default.
        let long = "a".repeat(DEFAULT_MAX_USERNAME_BYTES + 1);
        assert!(UserDb::parse(&text(&long), path).is_err());
        let longest = "a".repeat(DEFAULT_MAX_USERNAME_BYTES);
        assert!(UserDb::parse(&text(&longest), path).is_ok());
    }

    /// A login whose client hangs up mid-check keeps its turn until the argon2 work it started
    /// is done: the bound on concurrent checks (and so on their memory) holds whatever clients
    /// do. Before, dropping the request's future gave the permit back while the work went on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_login_keeps_its_check_slot_until_the_work_ends() {
        // Costly enough (8 MiB, 8 passes; unoptimized) to still be running when looked at.
        let db = one_user(8 * 1024, 8);
        let users = Arc::new(UsersHandle::with_max_concurrent_checks(db, 1));
        let login = {
            let users = Arc::clone(&users);
            tokio::spawn(async move { check_password(&users, "a", "pw").await })
        };
        while users.checks_in_progress() == 0 {
            tokio::task::yield_now().await;
        }
        // The client goes away: its request future is dropped mid-check.
        login.abort();
        let _ = login.await;
        assert_eq!(
            users.checks_in_progress(),
            1,
            "the check still runs, so it still holds its slot"
        );
        let started = std::time::Instant::now();
        while users.checks_in_progress() == 1 {
            assert!(started.elapsed() < std::time::Duration::from_secs(60));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // And the slot is free again afterwards.
        assert!(check_password(&users, "a", "pw").await.is_some());
    }

    /// A users database from `(name, hash, roles)` triples.
    fn db_of(users: &[(&str, &str, &[&str])]) -> UserDb {
        UserDb::from_records(
            users
                .iter()
                .map(|(name, hash, roles)| UserRecord {
                    name: (*name).into(),
                    password_hash: (*hash).into(),
                    roles: roles.iter().map(|r| (*r).into()).collect(),
                })
                .collect(),
        )
        .unwrap()
    }

    /// Removed, password changed and roles changed users are found, each once (a user whose
    /// password and roles both changed counts as a password change); unchanged and added users
    /// are not; roles compare as sets; names compare exactly, as the login does.
    #[test]
    fn changes_name_the_removed_and_changed_users() {
        let (h1, h2) = (phc(8, 1, 1), phc(16, 1, 1));
        let before = db_of(&[
            ("alice", &h1, &["admin"]),
            ("bob", &h1, &[]),
            ("carol", &h1, &["ops"]),
            ("dave", &h1, &["ops", "dev"]),
            ("erin", &h1, &["ops"]),
            ("Frank", &h1, &[]),
            ("gina", &h1, &["ops"]),
        ]);
        let after = db_of(&[
            ("alice", &h1, &["admin"]),
            ("carol", &h2, &["admin"]),
            ("dave", &h1, &["dev", "ops", "dev"]),
            ("erin", &h1, &["ops", "admin"]),
            ("frank", &h1, &[]),
            ("gina", &h1, &[]),
            ("hugo", &h1, &["admin"]),
        ]);
        let changes = before.changes_to(&after);
        assert_eq!(changes.removed, ["Frank", "bob"]);
        assert_eq!(changes.password_changed, ["carol"]);
        assert_eq!(changes.roles_changed, ["erin", "gina"]);
        assert_eq!(changes.len(), 5);
        assert_eq!(
            changes.names().collect::<Vec<_>>(),
            ["Frank", "bob", "carol", "erin", "gina"]
        );
        assert_eq!(
            changes.to_string(),
            "removed: Frank, bob; password changed: carol; roles changed: erin, gina"
        );
        assert!(before.changes_to(&before.clone()).is_empty());
        // The log line shows at most MAX_SHOWN names and counts the rest.
        let many: Vec<String> = (0..NameList::MAX_SHOWN + 3)
            .map(|i| format!("u{i}"))
            .collect();
        let text = NameList(&many).to_string();
        assert!(
            text.starts_with("u0, u1, ") && text.ends_with("u19 and 3 more"),
            "{text}"
        );
        assert_eq!(NameList(&many[..2]).to_string(), "u0, u1");
    }

    /// `replace` compares with the database it swapped out, and the new one is in use.
    #[test]
    fn replace_reports_the_changes_from_the_database_in_use() {
        let h = phc(8, 1, 1);
        let handle = UsersHandle::new(db_of(&[("alice", &h, &[]), ("bob", &h, &[])]));
        let changes = handle.replace(db_of(&[("alice", &h, &[])]));
        assert_eq!(changes.removed, ["bob"]);
        assert!(handle.load().get("bob").is_none());
        assert!(handle.replace(db_of(&[("alice", &h, &[])])).is_empty());
    }

    /// A login checked before a reload is still current after it only for a user the reload
    /// left as it was.
    #[test]
    fn a_login_is_current_while_its_user_is_unchanged() {
        let h = phc(8, 1, 1);
        let handle = UsersHandle::new(db_of(&[("alice", &h, &["a"]), ("bob", &h, &[])]));
        let seen = UsersSeen(handle.load());
        assert!(seen.still_current(&handle, "alice"));
        handle.replace(db_of(&[("alice", &h, &["a", "a"])]));
        assert!(seen.still_current(&handle, "alice"), "same roles as a set");
        assert!(!seen.still_current(&handle, "bob"), "removed");
        handle.replace(db_of(&[("alice", &h, &["b"])]));
        assert!(!seen.still_current(&handle, "alice"), "roles changed");
        handle.replace(db_of(&[("alice", &phc(16, 1, 1), &["a"])]));
        assert!(!seen.still_current(&handle, "alice"), "password changed");
    }

    /// Roles count as a set (order and repeats do not change the stamp); any change of the
    /// name, the hash or the roles does, and fields cannot be shifted into each other.
    #[test]
    fn the_stamp_changes_with_the_name_hash_or_roles_only() {
        let record = |name: &str, hash: &str, roles: &[&str]| UserRecord {
            name: name.into(),
            password_hash: hash.into(),
            roles: roles.iter().map(|r| (*r).into()).collect(),
        };
        let (h1, h2) = (phc(8, 1, 1), phc(16, 1, 1));
        let stamp = CredentialStamp::of(&record("alice", &h1, &["a", "b"]));
        for same in [&["b", "a"][..], &["a", "b", "a"], &["b", "b", "a"]] {
            let other = CredentialStamp::of(&record("alice", &h1, same));
            assert!(stamp.matches(&other), "{same:?}");
        }
        let others = [
            record("Alice", &h1, &["a", "b"]),
            record("bob", &h1, &["a", "b"]),
            record("alice", &h2, &["a", "b"]),
            record("alice", &h1, &["a"]),
            record("alice", &h1, &["a", "b", "c"]),
            record("alice", &h1, &[]),
            record("alice", &h1, &["a,b"]),
            record("alice", &h1, &["ab"]),
        ];
        for other in &others {
            assert!(
                !stamp.matches(&CredentialStamp::of(other)),
                "{other:?} has alice's stamp"
            );
        }
        // Length-prefixed fields: moving bytes from one field to the next changes the stamp.
        let split = |name: &str, hash: &str| CredentialStamp::of(&record(name, hash, &[]));
        assert!(!split("ab", "c").matches(&split("a", "bc")));
        assert!(!CredentialStamp::of(&record("a", "b", &["c", "d"]))
            .matches(&CredentialStamp::of(&record("a", "b", &["cd"]))));
        // Debug shows nothing of it.
        assert_eq!(format!("{stamp:?}"), "CredentialStamp([redacted])");
        // A database holds each user's stamp, computed when it loads.
        let db = db_of(&[("alice", &h1, &["b", "a"])]);
        assert!(db.stamp_of("alice").unwrap().matches(&stamp));
        assert!(db.stamp_of("bob").is_none());
    }

    /// A session's stamp is current while the users in use have its user with the same
    /// record; an unstamped session while the user exists with the same roles.
    #[test]
    fn a_stamp_is_current_while_the_users_file_keeps_the_record() {
        let (h1, h2) = (phc(8, 1, 1), phc(16, 1, 1));
        let handle = UsersHandle::new(db_of(&[("alice", &h1, &["a", "b"]), ("bob", &h1, &[])]));
        let stamp = handle.load().stamp_of("alice").unwrap();
        let roles = vec!["a".to_owned(), "b".to_owned()];
        assert!(handle.stamp_is_current("alice", &stamp));
        assert!(
            !handle.stamp_is_current("bob", &stamp),
            "another user's stamp"
        );
        assert!(handle.has_user_with_roles("alice", &roles));
        assert!(!handle.has_user_with_roles("bob", &roles));
        handle.replace(db_of(&[("alice", &h1, &["b", "a", "a"])]));
        assert!(
            handle.stamp_is_current("alice", &stamp),
            "same roles as a set"
        );
        assert!(
            !handle.has_user_with_roles("bob", &[] as &[&str]),
            "removed"
        );
        handle.replace(db_of(&[("alice", &h2, &["a", "b"])]));
        assert!(
            !handle.stamp_is_current("alice", &stamp),
            "password changed"
        );
        assert!(
            handle.has_user_with_roles("alice", &roles),
            "unstamped: a password change is not seen"
        );
        handle.replace(db_of(&[("alice", &h1, &["a"])]));
        assert!(!handle.stamp_is_current("alice", &stamp), "roles changed");
        assert!(
            !handle.has_user_with_roles("alice", &roles),
            "roles changed"
        );
        handle.replace(db_of(&[("bob", &h1, &[])]));
        assert!(!handle.stamp_is_current("alice", &stamp), "removed");
        // The login's database gives the stamp the session keeps.
        handle.replace(db_of(&[("alice", &h1, &["a", "b"])]));
        let seen = UsersSeen(handle.load());
        assert!(seen.stamp_of("alice").unwrap().matches(&stamp));
    }

    /// The argon2 `t` of the dummy hash `name` (unknown) is verified against.
    fn dummy_t_cost(db: &UserDb, name: &str) -> u32 {
        let dummy = db.dummy_for(name).unwrap();
        let parsed = PasswordHash::new(&dummy).unwrap();
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        argon2::Params::try_from(&parsed).unwrap().t_cost()
    }

    /// The dummy hash for unknown users has the users' parameters, not just the defaults.
    #[test]
    fn dummy_hash_uses_the_parameters_of_the_users_file() {
        let db = one_user(8 * 1024, 3);
        let dummy = db.dummy_for("nobody").unwrap();
        let parsed = PasswordHash::new(&dummy).unwrap();
        let dummy_params = argon2::Params::try_from(&parsed).unwrap();
        assert_eq!(dummy_params.m_cost(), 8 * 1024);
        assert_eq!(dummy_params.t_cost(), 3);
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        // An empty users file falls back to the default parameters.
        assert!(UserDb::from_records(vec![])
            .unwrap()
            .dummy_for("x")
            .is_none());
        assert_eq!(db.parameter_warning(), None, "one set: nothing to say");
    }

    fn user_with(name: &str, m: u32, t: u32) -> UserRecord {
        UserRecord {
            name: name.into(),
            password_hash: phc(m, t, 1),
            roles: vec![],
        }
    }

    /// A file mixing parameter sets (1 user in 10 rehashed with a stronger one): unknown names
    /// get the sets in the users' proportions, each name always the same one, and the same on
    /// every proxy that loads the same file; a file with other hashes draws otherwise (its
    /// key is the file's, which nobody outside has). Two sets: nothing to warn about.
    #[test]
    fn unknown_names_get_the_files_parameter_sets_in_its_proportions() {
        let mut records = vec![user_with("admin", 8 * 1024, 3)];
        records.extend((0..9).map(|i| user_with(&format!("user{i}"), 8 * 1024, 2)));
        let db = UserDb::from_records(records.clone()).unwrap();
        assert_eq!(db.parameter_warning(), None);
        let names: Vec<String> = (0..4000).map(|i| format!("unknown-{i}")).collect();
        let strong = names.iter().filter(|n| dummy_t_cost(&db, n) == 3).count();
        assert!(
            (300..=500).contains(&strong),
            "{strong} of 4000 unknown names on the set 1 user in 10 has"
        );
        for name in names.iter().take(200) {
            assert_eq!(dummy_t_cost(&db, name), dummy_t_cost(&db, name), "{name}");
        }
        let same_file = UserDb::from_records(records.clone()).unwrap();
        let draws = |db: &UserDb| -> Vec<u32> {
            names
                .iter()
                .take(400)
                .map(|n| dummy_t_cost(db, n))
                .collect()
        };
        assert_eq!(
            draws(&db),
            draws(&same_file),
            "another proxy, the same file"
        );
        let mut other = records;
        for record in &mut other {
            record.password_hash = record.password_hash.replace("c2FsdHNh", "b3RoZXJz");
        }
        let other_file = UserDb::from_records(other).unwrap();
        assert_ne!(draws(&db), draws(&other_file), "other hashes, another key");
    }

    /// An edit of the file moves few unknown names to another set. The draw was keyed by a
    /// digest of the whole file and reduced modulo the users' count, so adding one user (or
    /// any edit) drew most names anew: 1 in 10 users on a stronger set, about 18 % of unknown
    /// names changed their login time at each edit, while a real user's time never changes
    /// (it is their own hash's). Timing names before and after an edit told unknown names
    /// from users. Now only the names at the edge of the shares move, here about 1 in 1000.
    #[test]
    fn an_edit_of_the_users_file_moves_few_unknown_names_to_another_set() {
        let mut records: Vec<UserRecord> = (0..10)
            .map(|i| user_with(&format!("admin{i}"), 8 * 1024, 3))
            .collect();
        records.extend((0..90).map(|i| user_with(&format!("user{i}"), 8 * 1024, 2)));
        let before = UserDb::from_records(records.clone()).unwrap();
        let names: Vec<String> = (0..4000).map(|i| format!("unknown-{i}")).collect();
        let moved = |after: &UserDb| {
            names
                .iter()
                .filter(|n| dummy_t_cost(&before, n) != dummy_t_cost(after, n))
                .count()
        };
        // One user more on the common set, then on the rare one; one removed.
        let mut added = records.clone();
        added.push(user_with("newcomer", 8 * 1024, 2));
        let mut added_rare = records.clone();
        added_rare.push(user_with("new-admin", 8 * 1024, 3));
        let mut removed = records.clone();
        removed.retain(|r| r.name != "user7");
        for (edit, after) in [
            ("one user added", added),
            ("one user added on the rarer set", added_rare),
            ("one user removed", removed),
        ] {
            let after = UserDb::from_records(after).unwrap();
            let moved = moved(&after);
            assert!(
                moved <= 40,
                "{edit}: {moved} of 4000 unknown names changed their set"
            );
        }
    }

    /// More sets than get a dummy hash: the rarest set is never drawn, and its users are said
    /// to be told apart by timing.
    #[test]
    fn a_users_file_with_more_parameter_sets_than_dummies_gets_a_warning() {
        // t = 1 twice, then t = 2..=9 once each: nine sets, the last one seen the rarest.
        let mut records = vec![user_with("a", 64, 1), user_with("b", 64, 1)];
        records.extend((2..=9).map(|t| user_with(&format!("t{t}"), 64, t)));
        let db = UserDb::from_records(records).unwrap();
        let warning = db.parameter_warning().unwrap();
        for part in [
            "1 of 10 users",
            "beyond the 8 most common of the file's 9 sets",
            "response time",
            "hash-password",
        ] {
            assert!(warning.contains(part), "{part:?} missing: {warning}");
        }
        let drawn: std::collections::BTreeSet<u32> = (0..2000)
            .map(|i| dummy_t_cost(&db, &format!("unknown-{i}")))
            .collect();
        assert_eq!(drawn, (1..=8).collect(), "every set but the rarest");
    }

    /// A syntactically valid argon2id PHC string with parameters `m`, `t`, `p` (nothing is
    /// hashed: `check_hash` only reads the parameters).
    fn phc(m: u32, t: u32, p: u32) -> String {
        format!("$argon2id$v=19$m={m},t={t},p={p}$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g")
    }

    /// The default limits accept what `hash-password` produces (argon2's defaults) and every
    /// argon2id setting OWASP's password storage cheat sheet recommends, plus RFC 9106's
    /// second recommendation and libsodium's "moderate" profile.
    #[test]
    fn default_hash_limits_accept_the_recommended_settings() {
        let limits = HashLimits::default();
        let defaults = argon2::Params::default();
        let ours = phc(defaults.m_cost(), defaults.t_cost(), defaults.p_cost());
        assert_eq!(
            (defaults.m_cost(), defaults.t_cost(), defaults.p_cost()),
            (19 * 1024, 2, 1),
            "hash-password's parameters changed: check the documented limits"
        );
        let owasp = [
            (47_104, 1, 1),
            (19_456, 2, 1),
            (12_288, 3, 1),
            (9_216, 4, 1),
            (7_168, 5, 1),
        ];
        let others = [(65_536, 3, 4), (256 * 1024, 3, 1), (102_400, 2, 8)];
        assert!(check_hash(&ours, &limits).is_ok());
        for (m, t, p) in owasp.into_iter().chain(others) {
            assert!(
                check_hash(&phc(m, t, p), &limits).is_ok(),
                "m={m},t={t},p={p}"
            );
        }
    }

    /// Each parameter has its own bound and the message names the parameter and the key that
    /// raises it; a bound of exactly the hash's value is accepted.
    #[test]
    fn hash_limits_bound_each_parameter() {
        let limits = HashLimits {
            max_memory_kib: 1024,
            max_iterations: 3,
            max_parallelism: 2,
        };
        assert!(check_hash(&phc(1024, 3, 2), &limits).is_ok());
        let err = check_hash(&phc(1025, 3, 2), &limits).unwrap_err();
        assert!(
            err.contains("m=1025 KiB") && err.contains("auth.max_hash_memory (1024 KiB = 1MiB)"),
            "{err}"
        );
        let err = check_hash(&phc(1024, 4, 2), &limits).unwrap_err();
        assert!(
            err.contains("t=4") && err.contains("auth.max_hash_iterations (3)"),
            "{err}"
        );
        let err = check_hash(&phc(1024, 3, 3), &limits).unwrap_err();
        assert!(
            err.contains("p=3") && err.contains("auth.max_hash_parallelism (2)"),
            "{err}"
        );
        // The QA report's hash: refused by the defaults (before anything is hashed).
        let err = check_hash(&phc(4_000_000, 100, 1), &HashLimits::default()).unwrap_err();
        assert!(
            err.contains("m=4000000 KiB (~3906MiB)") && err.contains("(262144 KiB = 256MiB)"),
            "{err}"
        );
    }

    /// A `p` of 2^29 or more overflowed argon2's own check (`p * 8` in `u32`): a panic in a
    /// debug build (`check-config`, `run`, a reload) where the file's error was due. Refused
    /// by the bound, naming it, with the largest `p` too.
    #[test]
    fn a_huge_parallelism_is_refused_not_a_panic() {
        for p in [1u32 << 29, u32::MAX] {
            let err = check_hash(&phc(19_456, 2, p), &HashLimits::default()).unwrap_err();
            assert!(
                err.contains(&format!("p={p} is above auth.max_hash_parallelism")),
                "{err}"
            );
        }
    }
}

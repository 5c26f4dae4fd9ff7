//! Keys: secrets that are zeroized on drop and never printed, a keyring with one active key and
//! optional automatic rotation per key, and a handle that swaps the whole keyring atomically at
//! runtime.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hmac::digest::KeyInit as _;
use hmac::Hmac;
use parking_lot::RwLock;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// HKDF salt for rotated keys (docs/PROTOCOL.md).
pub const ROTATION_SALT: &[u8] = b"countersign/v1";

/// Longest rotation period: 365 days (docs/PROTOCOL.md §5).
pub(crate) const MAX_ROTATION_SECS: u64 = 365 * 24 * 3600;

/// Upper bound of the derived-key cache: it only ever holds a handful of (key, epoch) pairs,
/// but an attacker choosing keyids must not be able to grow it.
const DERIVED_CACHE_MAX: usize = 256;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Secret key material. Zeroized on drop; `Debug` prints `Secret([redacted])`.
#[derive(Clone)]
pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
    mac: MacKey,
}

impl Secret {
    /// Wraps key bytes. Fails when shorter than [`MIN_SECRET_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyringError> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < MIN_SECRET_LEN {
            return Err(KeyringError::new(format!(
                "secret is {} bytes, at least {MIN_SECRET_LEN} are required",
                bytes.len()
            )));
        }
        Ok(Secret::from_zeroizing(bytes))
    }

    /// A fresh random secret of 32 bytes from the OS CSPRNG.
    pub fn random() -> Self {
        use rand::RngCore as _;
        let mut bytes = Zeroizing::new(vec![0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Secret::from_zeroizing(bytes)
    }

    fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Self {
        let mac = MacKey::new(&bytes);
        Secret { bytes, mac }
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// A fresh HMAC-SHA256 keyed with this secret: a copy of the state keyed once at
    /// construction, so a MAC costs no re-keying (two SHA-256 compressions per MAC).
    pub(crate) fn hmac(&self) -> HmacSha256 {
        (*self.mac.0).clone()
    }
}

/// The HMAC-SHA256 state keyed with a secret (its ipad and opad blocks already compressed),
/// computed once per key and cloned per MAC.
///
/// It is as sensitive as the key itself, and wiped like it: sha2's and hmac's `zeroize`
/// features (on in Cargo.toml, checked at compile time below) overwrite a SHA-256 state and
/// its block buffer when they are dropped, so this heap copy is wiped when the last `Secret`
/// holding it goes, and so is each per-MAC clone when its MAC is finished. What stays is what
/// a move leaves behind (Rust moves by copying and wipes only the final place) and the
/// `key ^ opad` block that `new_from_slice` builds on its own stack. No `Debug`: it must never
/// be printed.
#[derive(Clone)]
struct MacKey(Box<HmacSha256>);

impl MacKey {
    fn new(key: &[u8]) -> Self {
        MacKey(Box::new(keyed_hmac(key)))
    }
}

/// HMAC-SHA256 keyed with `key`. HMAC accepts keys of every length, so `new_from_slice`
/// cannot fail; the fallback (an all-zero key) would only yield MACs that verify nowhere.
pub(crate) fn keyed_hmac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

// The wiping above rests on sha2's `zeroize` feature: without it `Sha256` (whose state type
// `HmacSha256` holds twice) does not implement `ZeroizeOnDrop`, and this does not compile.
const _: fn() = || {
    fn wiped_on_drop<T: hmac::digest::zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<Sha256>();
};

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A keyring configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringError {
    message: String,
}

impl KeyringError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        KeyringError {
            message: message.into(),
        }
    }
}

impl fmt::Display for KeyringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KeyringError {}

/// The key id rule in words, for error messages (docs/PROTOCOL.md §5 states the same rule).
pub const KEY_ID_RULE: &str =
    "non-empty visible ASCII (0x21-0x7E: no space or control character) without `\"` or `\\`";

/// Whether `id` can name a key: one or more bytes of visible ASCII (0x21-0x7E) other than `"`
/// and `\`. The one rule for key ids, used by [`Keyring::new`] (and so by every keyring loader)
/// and by `countersign keygen`.
///
/// Why this set: the id is sent as the `keyid` sf-string, which carries 0x20-0x7E with `"` and
/// `\` escaped; excluding those two keeps the id and its wire form byte-identical. Space, which
/// an sf-string could carry, is excluded too: an id is written in TOML files, logs and shell
/// commands, where `k1 ` and `k1` are hard to tell apart. When any key of a keyring rotates, no
/// id of that keyring may contain `.` ([`Keyring::new`] checks that), since rotated keyids are
/// `<id>.<epoch>`.
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// One key as listed in a keyring.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The key id ([`is_valid_key_id`]; must not contain `.` when any key of the keyring
    /// rotates).
    pub id: String,
    /// The secret (at least 32 bytes).
    pub secret: Secret,
    /// Listed but no longer accepted.
    pub retired: bool,
    /// This key's own rotation; `None` inherits the keyring-wide setting given to
    /// [`Keyring::new`]. A key with its own setting can sit beside keys with another one, which
    /// is how rotation is turned on or off, or its period changed, without rejected requests
    /// (add a key with the new setting, make it active, retire the old key).
    pub rotation: Option<Rotation>,
}

/// Automatic key rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Each listed key signs and verifies under its own id.
    Off,
    /// The key that signs at time `t` is derived per epoch `floor(t / period)`. The period is a
    /// whole number of seconds from 1 s to 365 days; [`Keyring::new`] refuses any other.
    Every(Duration),
}

struct KeyEntry {
    secret: Arc<Secret>,
    retired: bool,
    /// The key's effective rotation period in whole seconds (at least 1); `None`: rotation off.
    period_secs: Option<u64>,
}

/// How the active key signs, fixed at construction so that [`Keyring::signing_key`] does no map
/// lookup per request.
enum Signing {
    /// Rotation off: the same keyid and secret for every request (a cheap clone of two `Arc`s).
    Static(SigningKey),
    /// Rotation on: the keyid and key are derived per epoch of `period_secs` from `secret`.
    Rotating {
        period_secs: u64,
        secret: Arc<Secret>,
    },
}

/// The key that signs now: its wire `keyid` and secret.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// The `keyid` parameter value.
    pub keyid: Arc<str>,
    /// The MAC key.
    pub secret: Arc<Secret>,
}

/// A set of keys: one active key signs, every non-retired key verifies.
pub struct Keyring {
    active: String,
    /// The keyring-wide default, inherited by keys without their own setting.
    rotation: Rotation,
    keys: HashMap<String, KeyEntry>,
    signing: Signing,
    /// Whether any key rotates: then no id contains `.`, so a keyid with a `.` can only be a
    /// rotated one and a keyid without can only be a static one.
    any_rotating: bool,
    derived: RwLock<HashMap<String, Arc<Secret>>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("rotation", &self.rotation)
            .field("active_rotation", &self.active_rotation())
            .field("key_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a keyring. `active` must name a listed, non-retired key; ids must be unique.
    /// `rotation` is the keyring-wide default: each key without its own
    /// [`KeySpec::rotation`] uses it. When any key rotates (by its own setting or the default),
    /// no id may contain `.`, so that a keyid `a.5` names key `a`, epoch 5, and nothing else.
    /// Every rotation period given (the default included, even when no key inherits it) must be
    /// a whole number of seconds from 1 s to 365 days.
    pub fn new(active: &str, keys: Vec<KeySpec>, rotation: Rotation) -> Result<Self, KeyringError> {
        // docs/PROTOCOL.md §5: a whole number of seconds, 1 s to 365 days. Refused rather than
        // rounded: a signer and a verifier given 1.5 s must not silently work with 1 s.
        let period_secs = |rotation: Rotation| -> Result<Option<u64>, KeyringError> {
            match rotation {
                Rotation::Off => Ok(None),
                Rotation::Every(period) if period.subsec_nanos() != 0 || period.as_secs() == 0 => {
                    Err(KeyringError::new(format!(
                        "rotation period {period:?} must be a whole number of seconds, at least 1s"
                    )))
                }
                Rotation::Every(period) if period.as_secs() > MAX_ROTATION_SECS => {
                    Err(KeyringError::new(format!(
                        "rotation period {period:?} is longer than the maximum of 365d"
                    )))
                }
                Rotation::Every(period) => Ok(Some(period.as_secs())),
            }
        };
        let default_period = period_secs(rotation)?;
        let mut map = HashMap::with_capacity(keys.len());
        // The first key that rotates, to name it when another id breaks the `.` rule.
        let mut rotating: Option<String> = None;
        for spec in keys {
            if !is_valid_key_id(&spec.id) {
                return Err(KeyringError::new(format!(
                    "key id {:?} must be {KEY_ID_RULE}",
                    spec.id
                )));
            }
            let period = match spec.rotation {
                Some(own) => period_secs(own)?,
                None => default_period,
            };
            if period.is_some() && rotating.is_none() {
                rotating = Some(spec.id.clone());
            }
            let entry = KeyEntry {
                secret: Arc::new(spec.secret),
                retired: spec.retired,
                period_secs: period,
            };
            if map.insert(spec.id.clone(), entry).is_some() {
                return Err(KeyringError::new(format!(
                    "key id {:?} is listed twice",
                    spec.id
                )));
            }
        }
        if let Some(rotating) = &rotating {
            let mut dotted: Vec<&String> = map.keys().filter(|id| id.contains('.')).collect();
            dotted.sort();
            if let Some(id) = dotted.first() {
                return Err(KeyringError::new(format!(
                    "key id {id:?} must not contain '.' when rotation is on (key {rotating:?} rotates)"
                )));
            }
        }
        let entry = map
            .get(active)
            .ok_or_else(|| KeyringError::new(format!("active key {active:?} is not listed")))?;
        if entry.retired {
            return Err(KeyringError::new(format!(
                "active key {active:?} is retired"
            )));
        }
        let signing = match entry.period_secs {
            None => Signing::Static(SigningKey {
                keyid: Arc::from(active),
                secret: entry.secret.clone(),
            }),
            Some(period_secs) => Signing::Rotating {
                period_secs,
                secret: entry.secret.clone(),
            },
        };
        Ok(Keyring {
            active: active.to_owned(),
            rotation,
            keys: map,
            signing,
            any_rotating: rotating.is_some(),
            derived: RwLock::new(HashMap::new()),
        })
    }

    /// A keyring with one key, no rotation.
    pub fn single(id: &str, secret: Secret) -> Result<Self, KeyringError> {
        Keyring::new(
            id,
            vec![KeySpec {
                id: id.to_owned(),
                secret,
                retired: false,
                rotation: None,
            }],
            Rotation::Off,
        )
    }

    /// The active key's id.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// The keyring-wide default rotation (the keyring file's top-level `rotation`), which keys
    /// without their own setting inherit. What signs is [`Keyring::active_rotation`]; each key
    /// verifies with its own ([`Keyring::key_rotation`]).
    pub fn rotation(&self) -> Rotation {
        self.rotation
    }

    /// The rotation of the active key: how [`Keyring::signing_key`] forms keyids.
    pub fn active_rotation(&self) -> Rotation {
        match &self.signing {
            Signing::Static(_) => Rotation::Off,
            Signing::Rotating { period_secs, .. } => {
                Rotation::Every(Duration::from_secs(*period_secs))
            }
        }
    }

    /// The effective rotation of the listed key `id` (its own, or the keyring-wide default), or
    /// `None` when no such key is listed.
    pub fn key_rotation(&self, id: &str) -> Option<Rotation> {
        self.keys.get(id).map(|entry| match entry.period_secs {
            None => Rotation::Off,
            Some(secs) => Rotation::Every(Duration::from_secs(secs)),
        })
    }

    /// The key that signs a request created at `now` (unix seconds), by the active key's own
    /// rotation.
    pub fn signing_key(&self, now: u64) -> SigningKey {
        match &self.signing {
            Signing::Static(key) => key.clone(),
            Signing::Rotating {
                period_secs,
                secret,
            } => {
                let keyid = format!("{}.{}", self.active, now / period_secs);
                let secret = self.derived_for(secret, &keyid);
                SigningKey {
                    keyid: Arc::from(keyid),
                    secret,
                }
            }
        }
    }

    /// The key that verifies a signature with this `keyid` created at `created`, if any: a
    /// listed, non-retired key with rotation off, named exactly; or `<id>.<epoch>` where `id` is
    /// a listed, non-retired key with rotation on and `epoch` is `floor(created / its period)`.
    pub fn verification_key(&self, keyid: &str, created: u64) -> Option<Arc<Secret>> {
        // Without a rotating key, ids may contain `.`; with one, none does, so the `.` alone
        // tells a rotated keyid from a static one and either takes one map lookup.
        let rotated = if self.any_rotating {
            keyid.rsplit_once('.')
        } else {
            None
        };
        let Some((id, epoch)) = rotated else {
            return self
                .keys
                .get(keyid)
                .filter(|k| !k.retired && k.period_secs.is_none())
                .map(|k| k.secret.clone());
        };
        // Canonical decimal only (no sign, no leading zero): otherwise `k.080000` and
        // `k.80000` would be distinct keyids (distinct derived keys, distinct cache
        // entries) for one epoch, and attacker-chosen spellings could churn the cache.
        if epoch.is_empty()
            || !epoch.bytes().all(|b| b.is_ascii_digit())
            || epoch.len() > 20
            || (epoch.len() > 1 && epoch.starts_with('0'))
        {
            return None;
        }
        let epoch: u64 = epoch.parse().ok()?;
        let entry = self.keys.get(id).filter(|k| !k.retired)?;
        let period_secs = entry.period_secs?;
        if epoch != created / period_secs {
            return None;
        }
        Some(self.derived_for(&entry.secret, keyid))
    }

    /// The key derived from `secret` for `keyid`, from the cache when it was derived before.
    fn derived_for(&self, secret: &Secret, keyid: &str) -> Arc<Secret> {
        if let Some(s) = self.derived.read().get(keyid) {
            return s.clone();
        }
        let derived = Arc::new(derive_rotated(secret, keyid));
        let mut cache = self.derived.write();
        if cache.len() >= DERIVED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(keyid.to_owned(), derived.clone());
        derived
    }
}

/// HKDF-SHA256(ikm = secret, salt = `countersign/v1`, info = keyid), 32 bytes.
pub fn derive_rotated(secret: &Secret, keyid: &str) -> Secret {
    let okm = hkdf_sha256_32(ROTATION_SALT, secret.expose(), keyid.as_bytes());
    Secret::from_zeroizing(Zeroizing::new(okm.to_vec()))
}

/// HKDF-SHA256 (RFC 5869) with a 32-byte output: `PRK = HMAC(salt, ikm)`, then the one
/// expand block `T(1) = HMAC(PRK, info || 0x01)`.
///
/// Written out instead of taken from the hkdf crate because hkdf 0.13 drops the PRK and the
/// expand step's output block (a copy of the derived key) as plain arrays, which stay on the
/// stack; here both are `Zeroizing`, and the HMAC states wipe themselves (see [`MacKey`]).
/// A unit test below checks it against RFC 5869's test vectors, `tests/core_rotation.rs`
/// against the hkdf crate.
pub(crate) fn hkdf_sha256_32(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    use hmac::digest::FixedOutput as _;
    use hmac::Mac as _;
    let mut prk = Zeroizing::new([0u8; 32]);
    let mut extract = keyed_hmac(salt);
    extract.update(ikm);
    extract.finalize_into((&mut *prk).into());
    let mut okm = Zeroizing::new([0u8; 32]);
    let mut expand = keyed_hmac(&prk[..]);
    expand.update(info);
    expand.update(&[1]);
    expand.finalize_into((&mut *okm).into());
    okm
}

/// A shared, atomically swappable keyring: readers never block, a reload replaces it whole.
#[derive(Clone, Debug)]
pub struct KeyringHandle(Arc<ArcSwap<Keyring>>);

impl KeyringHandle {
    /// A handle holding `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        KeyringHandle(Arc::new(ArcSwap::from_pointee(keyring)))
    }

    /// The current keyring.
    pub fn load(&self) -> Arc<Keyring> {
        self.0.load_full()
    }

    /// Replaces the keyring; requests in flight keep the one they loaded.
    pub fn store(&self, keyring: Keyring) {
        self.0.store(Arc::new(keyring));
    }
}

impl From<Keyring> for KeyringHandle {
    fn from(k: Keyring) -> Self {
        KeyringHandle::new(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::new(vec![b; 32]).unwrap()
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5869 appendix A.1 and A.3 (SHA-256): the first 32 bytes of each OKM are `T(1)`, all
    /// that `hkdf_sha256_32` computes. A.3's empty salt is HMAC's all-zero key, as RFC 5869's
    /// "not provided" salt is.
    #[test]
    fn hkdf_matches_rfc_5869_test_vectors() {
        let ikm = [0x0b; 22];
        let a1 = hkdf_sha256_32(
            &hex("000102030405060708090a0b0c"),
            &ikm,
            &hex("f0f1f2f3f4f5f6f7f8f9"),
        );
        assert_eq!(
            a1[..],
            hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")[..]
        );
        let a3 = hkdf_sha256_32(&[], &ikm, &[]);
        assert_eq!(
            a3[..],
            hex("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d")[..]
        );
    }

    #[test]
    fn short_secret_rejected_and_debug_redacted() {
        assert!(Secret::new(vec![1; 31]).is_err());
        let s = secret(7);
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        let k = Keyring::single("k1", s).unwrap();
        assert!(!format!("{k:?}").contains("7, 7"));
    }

    #[test]
    fn active_must_exist_and_not_be_retired() {
        let keys = vec![
            KeySpec {
                id: "a".into(),
                secret: secret(1),
                retired: true,
                rotation: None,
            },
            KeySpec {
                id: "b".into(),
                secret: secret(2),
                retired: false,
                rotation: None,
            },
        ];
        assert!(Keyring::new("a", keys.clone(), Rotation::Off).is_err());
        assert!(Keyring::new("c", keys.clone(), Rotation::Off).is_err());
        let k = Keyring::new("b", keys, Rotation::Off).unwrap();
        assert!(k.verification_key("a", 0).is_none());
        assert!(k.verification_key("b", 0).is_some());
    }

    #[test]
    fn rotation_epochs() {
        let period = 3600;
        let k = Keyring::new(
            "k",
            vec![KeySpec {
                id: "k".into(),
                secret: secret(3),
                retired: false,
                rotation: None,
            }],
            Rotation::Every(Duration::from_secs(period)),
        )
        .unwrap();
        let t = 10 * period - 1;
        let a = k.signing_key(t);
        let b = k.signing_key(t + 1);
        assert_eq!(&*a.keyid, "k.9");
        assert_eq!(&*b.keyid, "k.10");
        assert_ne!(a.secret.expose(), b.secret.expose());
        assert_eq!(
            k.verification_key("k.9", t).unwrap().expose(),
            a.secret.expose()
        );
        assert!(k.verification_key("k.9", t + 1).is_none());
        assert!(k.verification_key("k", t).is_none());
        assert!(k.verification_key("x.9", t).is_none());
        assert!(k.verification_key("k.+9", t).is_none());
    }

    fn spec(id: &str, byte: u8, retired: bool, rotation: Option<Rotation>) -> KeySpec {
        KeySpec {
            id: id.into(),
            secret: secret(byte),
            retired,
            rotation,
        }
    }

    fn every(secs: u64) -> Rotation {
        Rotation::Every(Duration::from_secs(secs))
    }

    /// A static key, a key rotating hourly and one rotating every 6 h (by inheritance) in one
    /// keyring: each signs with its own setting and each verifies by its own setting only.
    #[test]
    fn mixed_static_and_rotating_keys_sign_and_verify_each() {
        let keys = vec![
            spec("static", 1, false, Some(Rotation::Off)),
            spec("hourly", 2, false, Some(every(3600))),
            spec("inherits", 3, false, None),
        ];
        let t = 6 * 3600 * 100 + 5;
        for (active, keyid) in [
            ("static", "static".to_owned()),
            ("hourly", format!("hourly.{}", t / 3600)),
            ("inherits", format!("inherits.{}", t / (6 * 3600))),
        ] {
            let k = Keyring::new(active, keys.clone(), every(6 * 3600)).unwrap();
            let signing = k.signing_key(t);
            assert_eq!(&*signing.keyid, keyid, "active {active}");
            // Every keyring with the same keys verifies it, whichever key is active.
            for verifier_active in ["static", "hourly", "inherits"] {
                let v = Keyring::new(verifier_active, keys.clone(), every(6 * 3600)).unwrap();
                let key = v.verification_key(&keyid, t).expect("verifies");
                assert_eq!(key.expose(), signing.secret.expose(), "{keyid}");
            }
        }
        let k = Keyring::new("static", keys, every(6 * 3600)).unwrap();
        assert_eq!(k.rotation(), every(6 * 3600));
        assert_eq!(k.active_rotation(), Rotation::Off);
        assert_eq!(k.key_rotation("hourly"), Some(every(3600)));
        assert_eq!(k.key_rotation("inherits"), Some(every(6 * 3600)));
        assert_eq!(k.key_rotation("static"), Some(Rotation::Off));
        assert_eq!(k.key_rotation("nope"), None);
        // A static key static-signed stays the same keyid and secret at any time.
        assert_eq!(k.signing_key(0).secret.expose(), secret(1).expose());
        // Each key is accepted only in its own form.
        assert!(k.verification_key("static.0", 0).is_none());
        assert!(k.verification_key("hourly", t).is_none());
        assert!(k.verification_key("inherits", t).is_none());
    }

    #[test]
    fn mixed_keyring_refuses_wrong_epochs_and_spellings() {
        let keys = vec![
            spec("a", 1, false, Some(Rotation::Off)),
            spec("b", 2, false, Some(every(10))),
            spec("c", 3, false, Some(every(20))),
        ];
        let k = Keyring::new("b", keys, Rotation::Off).unwrap();
        let t = 1_000_005;
        assert!(k.verification_key(&format!("b.{}", t / 10), t).is_some());
        assert!(k.verification_key(&format!("c.{}", t / 20), t).is_some());
        // The epoch is that of the key's own period, not another key's.
        assert!(k.verification_key(&format!("b.{}", t / 20), t).is_none());
        assert!(k.verification_key(&format!("c.{}", t / 10), t).is_none());
        assert!(k
            .verification_key(&format!("b.{}", t / 10 + 1), t)
            .is_none());
        assert!(k.verification_key(&format!("b.0{}", t / 10), t).is_none());
        assert!(k.verification_key(&format!("b.+{}", t / 10), t).is_none());
        assert!(k.verification_key("b.", t).is_none());
        // A static key never takes an epoch.
        assert!(k.verification_key(&format!("a.{}", t / 10), t).is_none());
        assert!(k.verification_key("a", t).is_some());
        assert!(k.verification_key("x", t).is_none());
    }

    #[test]
    fn retired_keys_are_refused_in_either_form() {
        let keys = vec![
            spec("on", 1, true, Some(every(60))),
            spec("off", 2, true, Some(Rotation::Off)),
            spec("live", 3, false, None),
        ];
        let k = Keyring::new("live", keys, every(60)).unwrap();
        let t = 6000;
        assert!(k.verification_key("on.100", t).is_none());
        assert!(k.verification_key("off", t).is_none());
        assert!(k.verification_key("live.100", t).is_some());
    }

    /// A `.` in an id is fine while no key rotates; once any key rotates (by its own setting
    /// or by inheritance) every id, retired or static, must be free of `.`.
    #[test]
    fn dot_rule_applies_when_any_key_rotates() {
        let dotted = |rotation| spec("a.5", 1, false, rotation);
        let plain = |rotation| spec("a", 2, false, rotation);
        assert!(Keyring::new("a.5", vec![dotted(None), plain(None)], Rotation::Off).is_ok());
        let k = Keyring::new("a.5", vec![dotted(None), plain(None)], Rotation::Off).unwrap();
        assert!(k.verification_key("a.5", 0).is_some());
        // Every key explicitly off overrides a rotating default: nothing rotates.
        let both_off = vec![dotted(Some(Rotation::Off)), plain(Some(Rotation::Off))];
        assert!(Keyring::new("a", both_off, every(60)).is_ok());
        for (keys, default) in [
            (
                vec![dotted(Some(Rotation::Off)), plain(Some(every(60)))],
                Rotation::Off,
            ),
            (vec![dotted(Some(Rotation::Off)), plain(None)], every(60)),
            (
                vec![spec("a.5", 1, true, None), plain(Some(every(60)))],
                Rotation::Off,
            ),
        ] {
            let err = Keyring::new("a", keys, default).unwrap_err().to_string();
            assert!(err.contains("\"a.5\" must not contain '.'"), "{err}");
            assert!(err.contains("key \"a\" rotates"), "{err}");
        }
    }

    /// Keys without their own setting inherit the default, so a keyring built without any
    /// per-key setting behaves as before.
    #[test]
    fn keys_inherit_the_default_and_periods_are_checked() {
        let k = Keyring::new("k", vec![spec("k", 1, false, None)], every(60)).unwrap();
        assert_eq!(k.active_rotation(), every(60));
        assert_eq!(&*k.signing_key(125).keyid, "k.2");
        let k = Keyring::new("k", vec![spec("k", 1, false, None)], Rotation::Off).unwrap();
        assert_eq!(k.active_rotation(), Rotation::Off);
        assert_eq!(&*k.signing_key(125).keyid, "k");
        // A key's own zero period is refused like a zero default.
        let zero = Rotation::Every(Duration::from_millis(500));
        assert!(Keyring::new("k", vec![spec("k", 1, false, Some(zero))], Rotation::Off).is_err());
        assert!(Keyring::new("k", vec![spec("k", 1, false, None)], zero).is_err());
        // Unused zero default with every key set: still refused, as before.
        assert!(Keyring::new("k", vec![spec("k", 1, false, Some(Rotation::Off))], zero).is_err());
    }
}

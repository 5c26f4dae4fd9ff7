//! Keys: secrets that are zeroized on drop and never printed, a keyring with one active key and
//! optional automatic rotation, and a handle that swaps the whole keyring atomically at runtime.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hkdf::Hkdf;
use hmac::digest::KeyInit as _;
use hmac::Hmac;
use parking_lot::RwLock;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// HKDF salt for rotated keys (docs/PROTOCOL.md).
pub const ROTATION_SALT: &[u8] = b"countersign/v1";

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
/// It is as sensitive as the key itself. hmac 0.12 / sha2 0.10 cannot zeroize their state
/// (`zeroize` support arrived with hmac 0.13 / sha2 0.11, which need Rust 1.85 and would move
/// every RustCrypto dependency of the crate), so this is a best-effort wipe: on drop the one heap
/// copy is overwritten with the state of an all-zero key, and `black_box` keeps that store from
/// being optimised away as dead. Unlike `Zeroizing` (volatile writes) this is not a language
/// guarantee. The per-MAC clones live on the stack and are not wiped, exactly like the state
/// `Hmac::new_from_slice` built on every MAC before. No `Debug`: it must never be printed.
#[derive(Clone)]
struct MacKey(Box<HmacSha256>);

impl MacKey {
    fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of every length; the fallback cannot happen and would only yield
        // MACs that verify nowhere.
        let mac = <HmacSha256 as hmac::Mac>::new_from_slice(key)
            .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
        MacKey(Box::new(mac))
    }
}

impl Drop for MacKey {
    fn drop(&mut self) {
        *self.0 = HmacSha256::new(&Default::default());
        std::hint::black_box(&*self.0);
    }
}

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
/// commands, where `k1 ` and `k1` are hard to tell apart. With rotation on, ids also must not
/// contain `.` ([`Keyring::new`] checks that), since rotated keyids are `<id>.<epoch>`.
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// One key as listed in a keyring.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The key id ([`is_valid_key_id`]; must not contain `.` when rotation is on).
    pub id: String,
    /// The secret (at least 32 bytes).
    pub secret: Secret,
    /// Listed but no longer accepted.
    pub retired: bool,
}

/// Automatic key rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Each listed key signs and verifies under its own id.
    Off,
    /// The key that signs at time `t` is derived per epoch `floor(t / period)`.
    Every(Duration),
}

struct KeyEntry {
    secret: Arc<Secret>,
    retired: bool,
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
    rotation: Rotation,
    keys: HashMap<String, KeyEntry>,
    static_signing: Option<SigningKey>,
    derived: RwLock<HashMap<String, Arc<Secret>>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("rotation", &self.rotation)
            .field("key_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a keyring. `active` must name a listed, non-retired key; ids must be unique.
    pub fn new(active: &str, keys: Vec<KeySpec>, rotation: Rotation) -> Result<Self, KeyringError> {
        if let Rotation::Every(period) = rotation {
            if period.as_secs() == 0 {
                return Err(KeyringError::new("rotation period must be at least 1s"));
            }
        }
        let mut map = HashMap::with_capacity(keys.len());
        for spec in keys {
            if !is_valid_key_id(&spec.id) {
                return Err(KeyringError::new(format!(
                    "key id {:?} must be {KEY_ID_RULE}",
                    spec.id
                )));
            }
            if matches!(rotation, Rotation::Every(_)) && spec.id.contains('.') {
                return Err(KeyringError::new(format!(
                    "key id {:?} must not contain '.' when rotation is on",
                    spec.id
                )));
            }
            let entry = KeyEntry {
                secret: Arc::new(spec.secret),
                retired: spec.retired,
            };
            if map.insert(spec.id.clone(), entry).is_some() {
                return Err(KeyringError::new(format!(
                    "key id {:?} is listed twice",
                    spec.id
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
        let static_signing = match rotation {
            Rotation::Off => Some(SigningKey {
                keyid: Arc::from(active),
                secret: entry.secret.clone(),
            }),
            Rotation::Every(_) => None,
        };
        Ok(Keyring {
            active: active.to_owned(),
            rotation,
            keys: map,
            static_signing,
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
            }],
            Rotation::Off,
        )
    }

    /// The active key's id.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// The rotation setting.
    pub fn rotation(&self) -> Rotation {
        self.rotation
    }

    /// The key that signs a request created at `now` (unix seconds).
    pub fn signing_key(&self, now: u64) -> SigningKey {
        match (&self.static_signing, self.rotation) {
            (Some(key), _) => key.clone(),
            (None, Rotation::Every(period)) => {
                let keyid = format!("{}.{}", self.active, now / period.as_secs());
                let secret = self.derived_for(&self.active, &keyid);
                SigningKey {
                    keyid: Arc::from(keyid),
                    secret,
                }
            }
            // Construction guarantees a static key when rotation is off.
            (None, Rotation::Off) => unreachable_static(),
        }
    }

    /// The key that verifies a signature with this `keyid` created at `created`, if any: the id
    /// must be listed and not retired; with rotation, its epoch must be `floor(created/period)`.
    pub fn verification_key(&self, keyid: &str, created: u64) -> Option<Arc<Secret>> {
        match self.rotation {
            Rotation::Off => self
                .keys
                .get(keyid)
                .filter(|k| !k.retired)
                .map(|k| k.secret.clone()),
            Rotation::Every(period) => {
                let (id, epoch) = keyid.rsplit_once('.')?;
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
                if epoch != created / period.as_secs() {
                    return None;
                }
                self.keys.get(id).filter(|k| !k.retired)?;
                Some(self.derived_for(id, keyid))
            }
        }
    }

    fn derived_for(&self, id: &str, keyid: &str) -> Arc<Secret> {
        if let Some(s) = self.derived.read().get(keyid) {
            return s.clone();
        }
        let secret = match self.keys.get(id) {
            Some(entry) => Arc::new(derive_rotated(&entry.secret, keyid)),
            None => Arc::new(Secret::random()),
        };
        let mut cache = self.derived.write();
        if cache.len() >= DERIVED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(keyid.to_owned(), secret.clone());
        secret
    }
}

#[cold]
fn unreachable_static() -> SigningKey {
    // Keyring::new always sets `static_signing` when rotation is off; a random key here would
    // only produce signatures nobody accepts, never a crash.
    SigningKey {
        keyid: Arc::from("invalid"),
        secret: Arc::new(Secret::random()),
    }
}

/// HKDF-SHA256(ikm = secret, salt = `countersign/v1`, info = keyid), 32 bytes.
pub fn derive_rotated(secret: &Secret, keyid: &str) -> Secret {
    let hk = Hkdf::<Sha256>::new(Some(ROTATION_SALT), secret.expose());
    let mut okm = Zeroizing::new(vec![0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
    if hk.expand(keyid.as_bytes(), &mut okm).is_err() {
        return Secret::random();
    }
    Secret::from_zeroizing(okm)
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
            },
            KeySpec {
                id: "b".into(),
                secret: secret(2),
                retired: false,
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
}

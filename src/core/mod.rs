//! The pure signing core: signature base, digests, keys, the countersign profile.
//!
//! No I/O, no clock (callers pass `now`), no tower, no server: everything here is a function of
//! its inputs, so it is tested with fixed vectors.

mod base;
mod components;
mod digest;
mod error;
mod identity;
mod keyring;
mod profile;
#[doc(hidden)]
pub mod sf_fast;

pub use base::SignatureBase;
/// The string type of verified names ([`Identity`], [`Verified`]): re-exported so that callers
/// need no direct dependency on `compact_str`.
pub use compact_str::CompactString;
pub use components::{normalize_authority, ComponentId, RequestView};
pub use digest::{content_digest_sha256, ExpectedDigest};
pub use error::{BaseError, Reason, SignError, VerifyError};
pub use identity::{
    decode_roles, decode_value, encode_roles, encode_value, EncodedIdentity, Identity,
};
pub use keyring::{
    derive_rotated, is_valid_key_id, KeySpec, Keyring, KeyringError, KeyringHandle, Rotation,
    Secret, SigningKey, KEY_ID_RULE, MIN_SECRET_LEN, ROTATION_SALT,
};
#[cfg(feature = "proxy")]
pub(crate) use keyring::{hkdf_sha256_32, keyed_hmac};
pub use profile::{
    signature_base_for, BodyPolicy, HeadersVerified, IdentityHeaders, Nonce, NoncePolicy, Policy,
    Selector, Signer, SignerConfig, Verified, Verifier, ALGORITHM, BASE_COMPONENTS,
    DEFAULT_BODY_LIMIT, DEFAULT_MAX_COMPONENTS, DEFAULT_SKEW, DEFAULT_TAG, DEFAULT_WINDOW, LABEL,
    MAX_NONCE_LEN, MAX_SIGNATURE_FIELD_BYTES, MAX_SIGNATURE_TIME, MIN_NONCE_LEN,
};

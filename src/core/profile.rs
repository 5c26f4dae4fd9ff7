//! The countersign profile of RFC 9421: what a [`Signer`] covers and what a [`Verifier`]
//! demands. docs/PROTOCOL.md describes the same rules byte for byte.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use compact_str::CompactString;
use hmac::Mac as _;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use sfv::{ListEntry, Parser, SerializeValue};

use super::base::{first_duplicate, SignatureBase, SignatureBaseBuilder};
use super::components::{field_text, normalize_authority, ComponentId, RequestView};
use super::digest::{content_digest_sha256, ct_eq, ExpectedDigest, EMPTY_CONTENT_DIGEST};
use super::error::{BaseError, BaseErrorKind, Reason, SignError, VerifyError};
use super::identity::{decode_roles, decode_value, EncodedIdentity, Identity};
use super::keyring::{KeyringHandle, Secret};
use super::sf_fast::{self, Bare, Entry};

/// The label the countersign signer uses for its `Signature-Input`/`Signature` members.
pub const LABEL: &str = "countersign";
/// The default `tag` parameter, by which verifiers select the signature.
pub const DEFAULT_TAG: &str = "countersign";
/// The only algorithm: HMAC-SHA256.
pub const ALGORITHM: &str = "hmac-sha256";
/// Default replay window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Default clock skew allowance.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(2);
/// Default body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// The components every countersign signature covers, in order.
pub const BASE_COMPONENTS: [&str; 5] =
    ["@method", "@authority", "@path", "@query", "content-digest"];

// Field names as constants: a `&str` name is parsed and validated on every map operation.
const SIGNATURE: HeaderName = HeaderName::from_static("signature");
const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");

/// The largest `created` or `expires` a signature can carry: RFC 8941 integers have at most 15
/// decimal digits (§3.3.1), so a larger one makes `Signature-Input` unparsable for every
/// verifier (`malformed_signature`). The signer refuses to write one (year ~31.7 million).
pub const MAX_SIGNATURE_TIME: u64 = 999_999_999_999_999;

/// Default [`Policy::max_components`] and [`SignerConfig::max_components`]: the most covered
/// components a signature may list.
///
/// The countersign signer covers at most 7 plus its extra headers (the 5
/// [`BASE_COMPONENTS`], the user and roles fields, then [`SignerConfig::extra_headers`]), and
/// RFC 9421's own examples cover about ten; 64 leaves room for 57 extra headers. The cap is
/// what bounds a verifier's work before the MAC: an unsigned request could otherwise list
/// thousands of components, each costing a line of the signature base.
pub const DEFAULT_MAX_COMPONENTS: usize = 64;

/// The longest `Signature-Input`, `Signature`, `Content-Digest`, or field covered with `;key`
/// a verifier parses, all its lines joined (`Signature-Input` may be longer when
/// [`Policy::max_components`] allows more than 64 components: 256 bytes per component). A
/// longer one is `malformed_signature`, refused before it is parsed.
///
/// Parsing a structured field materialises every member, item and parameter it holds, at up to
/// ~200 bytes of heap per byte of text (an item with a parameter is a few hundred bytes), and
/// all of it happens before the MAC is checked: without this bound, one unsigned request with a
/// 400 KB `Signature-Input` (hyper's default HTTP/1 head limit) made the verifier allocate
/// 80 MB and spend tens of milliseconds of CPU (tests/verify_review2.rs). The countersign
/// signer's `Signature-Input` is a few hundred bytes, a `Signature` or `Content-Digest` member
/// under 100.
pub const MAX_SIGNATURE_FIELD_BYTES: usize = 16 * 1024;

/// Bytes of `Signature-Input` allowed per covered component beyond the first
/// [`MAX_SIGNATURE_FIELD_BYTES`] (see there).
const SIGNATURE_INPUT_BYTES_PER_COMPONENT: usize = 256;

/// Shortest accepted nonce (22 base64url characters = 128 bits).
pub const MIN_NONCE_LEN: usize = 22;
/// Longest accepted nonce.
pub const MAX_NONCE_LEN: usize = 256;

/// Signing-side and verifying-side names of the identity header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// The user name field (default `x-auth-user`).
    pub user: HeaderName,
    /// The roles field (default `x-auth-roles`).
    pub roles: HeaderName,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            user: HeaderName::from_static("x-auth-user"),
            roles: HeaderName::from_static("x-auth-roles"),
        }
    }
}

/// A replay nonce: at least 128 random bits, base64url without padding.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Nonce(String);

impl Nonce {
    /// 128 bits from a CSPRNG (thread-local ChaCha, seeded from the OS).
    pub fn random() -> Self {
        use rand::RngCore as _;
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        let mut text = String::with_capacity(22);
        sf_fast::push_base64(
            &mut text,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            &bytes,
        );
        Nonce(text)
    }

    /// A caller-chosen nonce (tests, the CLI's `--nonce`): [`MIN_NONCE_LEN`] to
    /// [`MAX_NONCE_LEN`] (22 to 256) visible ASCII characters other than `"` and `\`. Shorter
    /// ones are refused here because every verifier with the default policy refuses them
    /// (`malformed_signature`: fewer than 128 bits); quotes and backslashes, which the field
    /// would have to escape, are refused to keep the nonce the same text in the field and in
    /// the replay cache.
    pub fn new(value: &str) -> Result<Self, SignError> {
        if !(MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&value.len())
            || !value
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(SignError::new(format!(
                "nonce must be at least 22 (128 bits) and at most 256 visible ASCII characters \
                 other than '\"' and '\\'; got {} characters",
                value.len()
            )));
        }
        Ok(Nonce(value.to_owned()))
    }

    /// The nonce text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.0)
    }
}

/// What a signer covers beyond the fixed profile.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// Signature label (default `countersign`): a structured-field key, a lower-case letter or
    /// `*` followed by lower-case letters, digits, `_`, `-`, `.` and `*` (RFC 8941 §3.1.2).
    pub label: String,
    /// `tag` parameter (default `countersign`): printable ASCII (0x20-0x7E) other than `"` and
    /// `\`, so that it is the same text in the field as here.
    pub tag: String,
    /// `expires = created + window`.
    pub window: Duration,
    /// Identity header names.
    pub identity_headers: IdentityHeaders,
    /// Further header fields covered when present on the request.
    pub extra_headers: Vec<HeaderName>,
    /// The most components a signature may cover (default [`DEFAULT_MAX_COMPONENTS`]): the
    /// signer refuses ([`SignError`]) a request whose covered list (7 at most, plus the extra
    /// headers present) would be longer, since verifiers refuse it. Keep it at or below the
    /// verifiers' [`Policy::max_components`].
    pub max_components: usize,
}

impl SignerConfig {
    /// Checks what the signer writes as given: the label must be a structured-field key and the
    /// tag printable ASCII without `"` or `\` (see the fields). Otherwise `Signature-Input`
    /// would be unparsable for every verifier. [`Signer::new`] runs this check once; a signer
    /// built from a config that fails it refuses every request with this error.
    pub fn validate(&self) -> Result<(), SignError> {
        if !is_sf_key(&self.label) {
            return Err(SignError::new(format!(
                "SignerConfig::label {:?} is not a structured-field key (RFC 8941 §3.1.2: a \
                 lower-case letter or '*', then lower-case letters, digits, '_', '-', '.' or \
                 '*')",
                self.label
            )));
        }
        if !self
            .tag
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        {
            return Err(SignError::new(format!(
                "SignerConfig::tag {:?} must be printable ASCII (0x20-0x7E) other than '\"' \
                 and '\\': it is written as it is into the `tag` structured-field string",
                self.tag
            )));
        }
        self.validate_covered_fields()
    }

    /// The header fields the signer covers: a field covered twice fails every request that
    /// carries it (`component ... is covered twice`, and verifiers refuse such a signature),
    /// and the signature's own fields cannot cover themselves. Caught once here rather than
    /// request by request, and for anonymous requests only when a user signs in.
    fn validate_covered_fields(&self) -> Result<(), SignError> {
        let IdentityHeaders { user, roles } = &self.identity_headers;
        let named = [
            ("identity_headers.user", user),
            ("identity_headers.roles", roles),
        ]
        .into_iter()
        .chain(
            self.extra_headers
                .iter()
                .map(|name| ("extra_headers", name)),
        );
        let mut seen: Vec<(&str, &HeaderName)> = Vec::new();
        for (field, name) in named {
            // content-digest is always covered: named again, it is covered twice. An extra
            // header naming signature or signature-input is dropped from the request before
            // the base is built (a stale one is never covered); as an identity field either
            // would be written over by the signature itself.
            let refused = match name.as_str() {
                "content-digest" => true,
                "signature" | "signature-input" => field != "extra_headers",
                _ => false,
            };
            if refused {
                return Err(SignError::new(format!(
                    "SignerConfig::{field} names {name}, which the signer writes itself \
                     (content-digest is always covered; signature and signature-input are the \
                     signature's own fields)"
                )));
            }
            if let Some((other, _)) = seen.iter().find(|(_, seen)| *seen == name) {
                return Err(SignError::new(format!(
                    "SignerConfig::{field} names {name}, already covered as {other}: a field \
                     covered twice fails every request that carries it"
                )));
            }
            seen.push((field, name));
        }
        Ok(())
    }
}

/// Whether `text` is an RFC 8941 key (§3.1.2): `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" /
/// "-" / "." / "*" )`.
fn is_sf_key(text: &str) -> bool {
    let mut bytes = text.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'*'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'))
}

impl Default for SignerConfig {
    fn default() -> Self {
        SignerConfig {
            label: LABEL.to_owned(),
            tag: DEFAULT_TAG.to_owned(),
            window: DEFAULT_WINDOW,
            identity_headers: IdentityHeaders::default(),
            extra_headers: Vec::new(),
            max_components: DEFAULT_MAX_COMPONENTS,
        }
    }
}

/// Signs requests with the keyring's active key.
#[derive(Debug, Clone)]
pub struct Signer {
    keyring: KeyringHandle,
    config: SignerConfig,
    // Component identifiers built once here rather than on every request.
    // The covered lists without extra headers, indexed by how many identity fields are sent
    // (none, user, user and roles): the common case then builds no list per request.
    covered_lists: [Result<Vec<ComponentId>, BaseError>; 3],
    // The same lists serialised (identifiers separated by spaces), as `Signature-Input`
    // carries them.
    covered_texts: [String; 3],
    extra_components: Vec<(HeaderName, Result<ComponentId, BaseError>)>,
    // Where `content-digest` sits in the covered lists (the identity fields follow the base
    // components).
    digest_position: usize,
    // Whether the fields this signer sets (`Content-Digest`, the identity fields) can go into
    // the base as the values it is about to set, before they are in the map: when their names
    // differ from each other, from `Host`, from the signature fields and from the extra
    // covered headers, setting them first could not change anything else the base or the
    // coverage reads. Otherwise they are set first and read back like any field.
    base_before_fields: bool,
    // [`SignerConfig::validate`]'s answer, given by every signing call when it is an error.
    config_error: Option<SignError>,
}

/// The values of the fields a signature sets besides its own two.
struct FieldValues {
    digest: Cow<'static, str>,
    user: Option<HeaderValue>,
    roles: Option<HeaderValue>,
}

impl Signer {
    /// A signer with the given keyring and settings. Settings that fail
    /// [`SignerConfig::validate`] (check them first to fail at startup) make every signing call
    /// fail with that error.
    pub fn new(keyring: KeyringHandle, config: SignerConfig) -> Self {
        let fixed: Vec<ComponentId> = BASE_COMPONENTS
            .iter()
            .filter_map(|n| ComponentId::plain(n).ok())
            .collect();
        let user_component = ComponentId::plain(config.identity_headers.user.as_str());
        let roles_component = ComponentId::plain(config.identity_headers.roles.as_str());
        let with_user = user_component.map(|user| {
            let mut list = fixed.clone();
            list.push(user);
            list
        });
        let with_roles = with_user.clone().and_then(|mut list| {
            list.push(roles_component?);
            Ok(list)
        });
        let covered_lists = [Ok(fixed), with_user, with_roles];
        let covered_texts = covered_lists.each_ref().map(|list| match list {
            Ok(list) => list
                .iter()
                .map(ComponentId::as_serialized)
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => String::new(),
        });
        let extra_components = config
            .extra_headers
            .iter()
            .map(|name| (name.clone(), ComponentId::plain(name.as_str())))
            .collect();
        let digest_position = BASE_COMPONENTS
            .iter()
            .position(|name| *name == CONTENT_DIGEST.as_str())
            .unwrap_or(BASE_COMPONENTS.len());
        let ids = &config.identity_headers;
        let set = [&CONTENT_DIGEST, &ids.user, &ids.roles];
        let base_before_fields = set[0] != set[1]
            && set[0] != set[2]
            && set[1] != set[2]
            && set.iter().all(|name| {
                **name != http::header::HOST
                    && **name != SIGNATURE
                    && **name != SIGNATURE_INPUT
                    && !config.extra_headers.contains(name)
            });
        let config_error = config.validate().err();
        Signer {
            keyring,
            config,
            config_error,
            covered_lists,
            covered_texts,
            extra_components,
            digest_position,
            base_before_fields,
        }
    }

    /// The keyring handle (to swap keys at runtime).
    pub fn keyring(&self) -> &KeyringHandle {
        &self.keyring
    }

    /// The settings.
    pub fn config(&self) -> &SignerConfig {
        &self.config
    }

    /// Signs a request in place: replaces any `Signature`, `Signature-Input`, `Content-Digest`
    /// and identity fields, then adds `Content-Digest` over `body`, the identity fields (when
    /// `identity` is given), `Signature-Input` and `Signature`. `now` is unix seconds.
    ///
    /// Fails, leaving the request unchanged, when the settings fail [`SignerConfig::validate`],
    /// when `identity` has an empty user or role name ([`Identity::validate`]), when `now` or
    /// `now + window` exceeds [`MAX_SIGNATURE_TIME`] (no verifier could parse the signature),
    /// when the request has more than one `Host` line, or when it has both a URI authority and
    /// a `Host` line and the two differ once normalised as `@authority` is (lower-cased, the
    /// scheme's default port dropped): over HTTP/1.1 the server then reads the `Host` line and
    /// over HTTP/2 the URI's authority, so no signature could be right for both
    /// (docs/PROTOCOL.md §3.1, Authority).
    /// Also fails when the covered list would be longer than
    /// [`SignerConfig::max_components`]: unchanged when the base components and identity
    /// fields alone are too many; when the extra headers present make it too long, the
    /// request may already hold its new `Content-Digest` and identity fields and have lost any
    /// earlier signature fields.
    pub fn sign(
        &self,
        parts: &mut http::request::Parts,
        body: &[u8],
        identity: Option<&Identity>,
        now: u64,
        nonce: &Nonce,
    ) -> Result<(), SignError> {
        // Encoded here and moved in: a clone of a freshly encoded value would allocate.
        let (user, roles) = match identity {
            Some(identity) => {
                identity.validate()?;
                let (user, roles) = EncodedIdentity::new(identity).into_values();
                (Some(user), roles)
            }
            None => (None, None),
        };
        self.sign_with_values(parts, body, user, roles, now, nonce)
    }

    /// [`Signer::sign`] with the identity already encoded: its field values are set as they
    /// are (shared, not copied), for a caller that forwards the same identity on many requests.
    /// Fails like [`Signer::sign`] (an [`EncodedIdentity::new`] of an identity with an empty
    /// name, a time past [`MAX_SIGNATURE_TIME`]).
    pub fn sign_encoded(
        &self,
        parts: &mut http::request::Parts,
        body: &[u8],
        identity: Option<&EncodedIdentity>,
        now: u64,
        nonce: &Nonce,
    ) -> Result<(), SignError> {
        if let Some(identity) = identity {
            identity.check_signable()?;
        }
        self.sign_with_values(
            parts,
            body,
            identity.map(|id| id.user_value().clone()),
            identity.and_then(|id| id.roles_value().cloned()),
            now,
            nonce,
        )
    }

    /// Both entry points: the identity fields' values (the roles only with a user).
    fn sign_with_values(
        &self,
        parts: &mut http::request::Parts,
        body: &[u8],
        user: Option<HeaderValue>,
        roles: Option<HeaderValue>,
        now: u64,
        nonce: &Nonce,
    ) -> Result<(), SignError> {
        // Checked before the request is touched: a failed signing leaves it as it was.
        if let Some(e) = &self.config_error {
            return Err(e.clone());
        }
        let expires = signature_expiry(now, self.config.window)?;
        check_host(parts)?;
        // The covered list without extra headers: the base components and the identity fields
        // sent (the roles only with a user).
        let fixed = BASE_COMPONENTS.len()
            + usize::from(user.is_some())
            + usize::from(user.is_some() && roles.is_some());
        if fixed > self.config.max_components {
            return Err(too_many_components(fixed, self.config.max_components));
        }
        // `insert` replaces every earlier line of a field, so a field this method sets needs no
        // `remove` first. The signature fields are set only after the base is built, so they are
        // removed up front when extra covered headers could name one of them.
        if !self.extra_components.is_empty() {
            parts.headers.remove(SIGNATURE);
            parts.headers.remove(SIGNATURE_INPUT);
        }
        let values = FieldValues {
            digest: if body.is_empty() {
                Cow::Borrowed(EMPTY_CONTENT_DIGEST)
            } else {
                Cow::Owned(content_digest_sha256(body))
            },
            roles: roles.filter(|_| user.is_some()),
            user,
        };
        let identity_fields =
            usize::from(values.user.is_some()) + usize::from(values.roles.is_some());
        // Room for every field added below (the digest, the identity fields, the two signature
        // fields), so the map grows at most once.
        parts
            .headers
            .try_reserve(3 + identity_fields)
            .map_err(|_| too_many_fields())?;
        let mut pending = Some(values);
        if !self.base_before_fields {
            if let Some(values) = pending.take() {
                self.set_fields(&mut parts.headers, values)?;
            }
        }
        let base_list = match self.covered_lists.get(identity_fields) {
            Some(Ok(list)) => list,
            Some(Err(e)) => return Err(e.clone().into()),
            None => return Err(SignError::new("identity fields")),
        };
        let list_text = self
            .covered_texts
            .get(identity_fields)
            .map_or("", String::as_str);
        // The lines of the fields about to be set, written from their values (positions as in
        // `covered_lists`: the base components, then user, then roles).
        let known_storage: [(usize, &str); 3];
        let known: &[(usize, &str)] = match &pending {
            Some(values) => {
                known_storage = [
                    (self.digest_position, &values.digest),
                    (
                        BASE_COMPONENTS.len(),
                        identity_field_text(values.user.as_ref()),
                    ),
                    (
                        BASE_COMPONENTS.len() + 1,
                        identity_field_text(values.roles.as_ref()),
                    ),
                ];
                known_storage.get(..1 + identity_fields).unwrap_or_default()
            }
            None => &[],
        };
        let (input, signature) = if self.extra_components.is_empty() {
            self.signature_fields(
                parts,
                base_list,
                list_text,
                &[],
                known,
                (now, expires),
                nonce,
            )?
        } else {
            let mut extra: Vec<&ComponentId> = Vec::with_capacity(self.extra_components.len());
            for (name, component) in &self.extra_components {
                if parts.headers.contains_key(name) {
                    extra.push(component.as_ref().map_err(|e| e.clone())?);
                }
            }
            let count = base_list.len() + extra.len();
            if count > self.config.max_components {
                return Err(too_many_components(count, self.config.max_components));
            }
            let mut covered: Vec<&ComponentId> = Vec::with_capacity(count);
            covered.extend(base_list.iter());
            covered.extend(extra.iter().copied());
            self.signature_fields(
                parts,
                &covered,
                list_text,
                &extra,
                known,
                (now, expires),
                nonce,
            )?
        };
        if let Some(values) = pending.take() {
            self.set_fields(&mut parts.headers, values)?;
        }
        let headers = &mut parts.headers;
        headers
            .try_insert(SIGNATURE_INPUT, input)
            .map_err(|_| too_many_fields())?;
        headers
            .try_insert(SIGNATURE, signature)
            .map_err(|_| too_many_fields())?;
        Ok(())
    }

    /// Sets `Content-Digest` and the identity fields (removing an identity field not sent).
    fn set_fields(&self, headers: &mut HeaderMap, values: FieldValues) -> Result<(), SignError> {
        let ids = &self.config.identity_headers;
        let digest = match values.digest {
            Cow::Borrowed(text) => HeaderValue::from_static(text),
            Cow::Owned(text) => {
                HeaderValue::try_from(text).map_err(|_| SignError::new("digest value"))?
            }
        };
        headers
            .try_insert(CONTENT_DIGEST, digest)
            .map_err(|_| too_many_fields())?;
        match values.user {
            Some(user) => {
                headers
                    .try_insert(&ids.user, user)
                    .map_err(|_| too_many_fields())?;
                match values.roles {
                    None => {
                        headers.remove(&ids.roles);
                    }
                    Some(roles) => {
                        headers
                            .try_insert(&ids.roles, roles)
                            .map_err(|_| too_many_fields())?;
                    }
                }
            }
            None => {
                headers.remove(&ids.user);
                headers.remove(&ids.roles);
            }
        }
        Ok(())
    }

    /// Computes the base over `covered` (`list_text` and `extra` are its serialised form: the
    /// prepared list, then the extra components), MACs it and returns the `Signature-Input` and
    /// `Signature` values. `(now, expires)` are `created` and `expires`, both already checked
    /// by [`signature_expiry`].
    #[allow(clippy::too_many_arguments)]
    fn signature_fields<C: std::borrow::Borrow<ComponentId>>(
        &self,
        parts: &http::request::Parts,
        covered: &[C],
        list_text: &str,
        extra: &[&ComponentId],
        known: &[(usize, &str)],
        (now, expires): (u64, u64),
        nonce: &Nonce,
    ) -> Result<(HeaderValue, HeaderValue), SignError> {
        let key = self.keyring.load().signing_key(now);
        let input = signature_input(
            &self.config.label,
            list_text,
            extra,
            now,
            expires,
            nonce.as_str(),
            &key.keyid,
            &self.config.tag,
        );
        let label = &self.config.label;
        let params = input.get(label.len() + 1..).unwrap_or_default();

        let view = RequestView::from_parts(parts);
        let base = SignatureBaseBuilder::build_known(&view, covered, params, known)?;
        let mac = hmac_sha256(&key.secret, base.as_bytes());

        // Bytes at their exact length, the MAC's base64 encoded in place: the buffer becomes
        // the header value's storage as it is, with no UTF-8 check on the way.
        const MAC_BASE64_LEN: usize = 44;
        let mut signature = Vec::with_capacity(label.len() + 2 + MAC_BASE64_LEN + 1);
        signature.extend_from_slice(label.as_bytes());
        signature.extend_from_slice(b"=:");
        let start = signature.len();
        signature.resize(start + MAC_BASE64_LEN, 0);
        let encoded = signature.get_mut(start..).map(|out| {
            base64::Engine::encode_slice(&base64::engine::general_purpose::STANDARD, mac, out)
        });
        if !matches!(encoded, Some(Ok(MAC_BASE64_LEN))) {
            return Err(SignError::new("Signature value"));
        }
        signature.push(b':');
        let input =
            HeaderValue::try_from(input).map_err(|_| SignError::new("Signature-Input value"))?;
        let signature =
            HeaderValue::try_from(signature).map_err(|_| SignError::new("Signature value"))?;
        Ok((input, signature))
    }
}

/// `expires` for a signature created at `created`: `created + window`, when both fit an RFC 8941
/// integer ([`MAX_SIGNATURE_TIME`]). Two comparisons on the signing path; without them the
/// signer would write a `Signature-Input` that no verifier can parse.
fn signature_expiry(created: u64, window: Duration) -> Result<u64, SignError> {
    match created.checked_add(window.as_secs()) {
        Some(expires) if expires <= MAX_SIGNATURE_TIME => Ok(expires),
        _ => Err(time_out_of_range(created, window)),
    }
}

#[cold]
fn time_out_of_range(created: u64, window: Duration) -> SignError {
    let what = if created > MAX_SIGNATURE_TIME {
        format!("created {created}")
    } else {
        format!("expires (created {created} + window {}s)", window.as_secs())
    };
    SignError::new(format!(
        "{what} exceeds {MAX_SIGNATURE_TIME}: structured-field integers have at most 15 digits \
         (RFC 8941), so no verifier could parse the signature"
    ))
}

/// An identity field's value as the text its base line carries. [`EncodedIdentity`] values
/// are ASCII by construction; an absent value is not looked up (see `known` in
/// [`Signer::sign_encoded`]).
fn identity_field_text(value: Option<&HeaderValue>) -> &str {
    value.and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// The `Signature-Input` value `<label>=<inner list>`: the covered list is `list` (identifiers
/// already serialised and separated) followed by `extra`. The inner list is also the base's
/// `@signature-params` value, so it is written once, after the label, and borrowed from here.
///
/// Allocated at its exact length: a full buffer becomes a header value's storage as it is,
/// while a partly used one costs `Bytes` a second allocation (and atomic reference counting).
#[allow(clippy::too_many_arguments)]
fn signature_input(
    label: &str,
    list: &str,
    extra: &[&ComponentId],
    created: u64,
    expires: u64,
    nonce: &str,
    keyid: &str,
    tag: &str,
) -> String {
    const CREATED: &str = ");created=";
    const EXPIRES: &str = ";expires=";
    const NONCE: &str = ";nonce=\"";
    const KEYID: &str = "\";keyid=\"";
    const ALG: &str = "\";alg=\"";
    const TAG: &str = "\";tag=\"";
    let pieces = usize::from(!list.is_empty()) + extra.len();
    let components: usize = list.len()
        + extra.iter().map(|c| c.as_serialized().len()).sum::<usize>()
        + pieces.saturating_sub(1);
    let len = label.len()
        + 2
        + components
        + CREATED.len()
        + decimal_len(created)
        + EXPIRES.len()
        + decimal_len(expires)
        + NONCE.len()
        + nonce.len()
        + KEYID.len()
        + keyid.len()
        + ALG.len()
        + ALGORITHM.len()
        + TAG.len()
        + tag.len()
        + 1;
    let mut input = String::with_capacity(len);
    input.push_str(label);
    input.push_str("=(");
    input.push_str(list);
    for (i, c) in extra.iter().enumerate() {
        if i > 0 || !list.is_empty() {
            input.push(' ');
        }
        input.push_str(c.as_serialized());
    }
    input.push_str(CREATED);
    sf_fast::write_u64(&mut input, created);
    input.push_str(EXPIRES);
    sf_fast::write_u64(&mut input, expires);
    input.push_str(NONCE);
    input.push_str(nonce);
    input.push_str(KEYID);
    input.push_str(keyid);
    input.push_str(ALG);
    input.push_str(ALGORITHM);
    input.push_str(TAG);
    input.push_str(tag);
    input.push('"');
    input
}

/// Number of decimal digits of `n`.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// The signer's `Host` rule (see [`Signer::sign`]): at most one `Host` line, and when the URI
/// also has an authority, the same one once normalised. The usual requests (an absolute URI
/// and no `Host`, an origin-form URI and `Host`, or the proxy's absolute URI with a `Host` of
/// the same text) cost one map lookup and at most one comparison of bytes.
fn check_host(parts: &http::request::Parts) -> Result<(), SignError> {
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err(BaseError::new(BaseErrorKind::DuplicateHost).into());
    }
    match parts.uri.authority() {
        Some(authority) if authority.as_str().as_bytes() != host.as_bytes() => {
            check_host_normalised(parts, host, authority.as_str())
        }
        _ => Ok(()),
    }
}

/// [`check_host`] for a `Host` whose text differs from the URI authority's: they may still name
/// the same authority (`API.example.com:80` and `api.example.com`).
#[cold]
fn check_host_normalised(
    parts: &http::request::Parts,
    host: &HeaderValue,
    authority: &str,
) -> Result<(), SignError> {
    const ADVICE: &str = "over HTTP/1.1 the server reads the Host header and over HTTP/2 the \
         URI authority, so no signature can cover the one it checks; put the virtual host in \
         the URI and connect to the address yourself, or send an origin-form URI (path and \
         query only) with just the Host header";
    let Ok(host) = host.to_str() else {
        return Err(SignError::new(format!(
            "the Host header is not ASCII and the request also has the URI authority \
             ({authority}); {ADVICE}"
        )));
    };
    let scheme = RequestView::from_parts(parts).scheme_str();
    match (
        normalize_authority(host, &scheme),
        normalize_authority(authority, &scheme),
    ) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        _ => Err(SignError::new(format!(
            "the Host header ({host}) differs from the URI authority ({authority}); {ADVICE}"
        ))),
    }
}

#[cold]
fn too_many_components(count: usize, max: usize) -> SignError {
    SignError::new(format!(
        "the signature would cover {count} components, more than max_components ({max}); \
         verifiers refuse more than their Policy::max_components (default \
         {DEFAULT_MAX_COMPONENTS}): cover fewer extra headers"
    ))
}

#[cold]
fn too_many_fields() -> SignError {
    SignError::new("the request has too many header fields to add the signature")
}

/// The MAC of `data` under `secret`. The tag is not secret (it goes on the wire), so it is
/// read straight out (`finalize_fixed`), not through `Mac::finalize`'s self-wiping wrapper; the
/// keyed state clone wipes itself when consumed (see `keyring::MacKey`).
fn hmac_sha256(secret: &Secret, data: &[u8]) -> [u8; 32] {
    let mut mac = secret.hmac();
    mac.update(data);
    hmac::digest::FixedOutput::finalize_fixed(mac).into()
}

/// How a verifier treats the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPolicy {
    /// `content-digest` must be covered and match the received bytes (the countersign profile).
    RequireDigest,
    /// The body is not checked (only for foreign profiles, e.g. RFC test vectors).
    Unchecked,
}

/// Whether a `nonce` parameter is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoncePolicy {
    /// Required, 22-256 characters (the countersign profile; replay protection needs it).
    Required,
    /// Not required (foreign profiles only; no replay protection without a nonce).
    Optional,
}

/// Which signature to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The one member whose `tag` parameter equals this (countersign: `countersign`). A tag
    /// outside printable ASCII (0x20-0x7E) matches nothing: every request is then
    /// `missing_signature`, its detail naming the tag.
    Tag(String),
    /// The only member present, whatever its label or tag (foreign profiles and test vectors).
    Only,
}

/// What a verifier demands. [`Policy::default`] is the countersign profile.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Signature selection (by `tag`, never by label).
    pub selector: Selector,
    /// Components that must be covered (plain identifiers).
    pub required_components: Vec<String>,
    /// Identity header names: when present on the request, they must be covered.
    pub identity_headers: IdentityHeaders,
    /// Further header fields that must be covered when present.
    pub extra_headers: Vec<HeaderName>,
    /// Body policy.
    pub body: BodyPolicy,
    /// Nonce policy.
    pub nonce: NoncePolicy,
    /// `created` must lie within `[now - window - skew, now + skew]`.
    pub window: Duration,
    /// Allowed clock skew.
    pub skew: Duration,
    /// The authority this verifier serves; `None`: the request's `Host` / `:authority`.
    pub authority: Option<String>,
    /// The scheme the verifier is reached over: `@scheme` and `@target-uri`, and which default
    /// port `@authority` drops (`:80` for `http`, `:443` for `https`). `None`: the request
    /// URI's scheme when it has one (HTTP/2's `:scheme`, an absolute-form target), else `http`.
    pub scheme: Option<String>,
    /// The most components a signature may cover (default [`DEFAULT_MAX_COMPONENTS`], 64):
    /// a longer covered list is `malformed_signature`, decided as soon as the selected
    /// signature's list is read, before any component is looked at. It bounds what an
    /// unauthenticated request can make the verifier do before the MAC check. (What parsing
    /// the fields costs is bounded by their length: [`MAX_SIGNATURE_FIELD_BYTES`], or 256 bytes
    /// per component for `Signature-Input` when that is more.)
    pub max_components: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            selector: Selector::Tag(DEFAULT_TAG.to_owned()),
            required_components: BASE_COMPONENTS.iter().map(|s| (*s).to_owned()).collect(),
            identity_headers: IdentityHeaders::default(),
            extra_headers: Vec::new(),
            body: BodyPolicy::RequireDigest,
            nonce: NoncePolicy::Required,
            window: DEFAULT_WINDOW,
            skew: DEFAULT_SKEW,
            authority: None,
            scheme: None,
            max_components: DEFAULT_MAX_COMPONENTS,
        }
    }
}

impl Policy {
    /// A minimal RFC 9421 policy: exactly one signature, these components covered, no digest,
    /// nonce or tag required. For interoperability checks and test vectors, not for production.
    pub fn rfc9421(required_components: &[&str]) -> Self {
        Policy {
            selector: Selector::Only,
            required_components: required_components
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            body: BodyPolicy::Unchecked,
            nonce: NoncePolicy::Optional,
            ..Policy::default()
        }
    }
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The forwarded identity, when the identity headers are present.
    pub identity: Option<Identity>,
    /// The `keyid` that verified. Like the identity's names, a [`CompactString`]: up to 24
    /// bytes inline, no allocation per request.
    pub keyid: CompactString,
    /// The nonce, if any (inline up to 24 bytes: the 22 of [`Nonce::random`] are).
    pub nonce: Option<CompactString>,
    /// `created` (unix seconds).
    pub created: u64,
    /// Until when (unix seconds) this signature could still be accepted: the replay cache must
    /// remember the nonce until then.
    pub replay_until: u64,
}

/// A request whose headers and MAC checked out; the body digest is still to be checked.
#[derive(Debug, Clone)]
pub struct HeadersVerified {
    verified: Verified,
    digest: Option<ExpectedDigest>,
}

impl HeadersVerified {
    /// Checks the received body against the covered `Content-Digest` (if the policy demands it).
    pub fn check_body(self, body: &[u8]) -> Result<Verified, VerifyError> {
        if let Some(digest) = &self.digest {
            digest.check(body)?;
        }
        Ok(self.verified)
    }

    /// What verified so far (identity, keyid, nonce).
    pub fn verified(&self) -> &Verified {
        &self.verified
    }
}

/// Verifies requests against a [`Policy`] and a keyring.
#[derive(Debug, Clone)]
pub struct Verifier {
    keyring: KeyringHandle,
    policy: Policy,
    // Plain identifiers this policy expects to see covered, built once: a received identifier
    // equal to one of these is borrowed instead of rebuilt on every request.
    known_components: Vec<ComponentId>,
    // Where the names the coverage rules ask about sit in `known_components`, so each rule is a
    // bit test on the mask of covered known components instead of a scan of the covered list.
    required_known: Vec<Option<usize>>,
    digest_known: Option<usize>,
    // The identity fields, then the extra headers.
    present_known: Vec<Option<usize>>,
    // The covered lists the countersign signer writes for this profile (without extra
    // headers), serialised with the closing `)`, for the exact-shape reader: the base
    // components, then the user field, then the roles field. `template_covered[i]` is where
    // list `i`'s components lie in `known_components` (they are listed there in this order).
    template_texts: Vec<String>,
    template_covered: Vec<Range<usize>>,
}

/// Which of a verifier's known components a signature covers: bit `i` for
/// `known_components[i]` (the first 64; beyond that, and for names that are not known, the
/// covered list is scanned).
#[derive(Clone, Copy)]
struct CoveredMask(u64);

impl CoveredMask {
    fn bit(index: usize) -> Option<u64> {
        1u64.checked_shl(u32::try_from(index).ok()?)
    }

    /// Whether the plain component `name`, at `known` among the known components, is covered.
    fn covers<C: std::borrow::Borrow<ComponentId>>(
        self,
        known: Option<usize>,
        name: &str,
        covered: &[C],
    ) -> bool {
        match known.and_then(Self::bit) {
            Some(bit) => self.0 & bit != 0,
            None => covered.iter().any(|c| c.borrow().is_plain(name)),
        }
    }
}

impl Verifier {
    /// A verifier with the given keyring and policy.
    pub fn new(keyring: KeyringHandle, policy: Policy) -> Self {
        let mut known_components: Vec<ComponentId> = Vec::new();
        // In the signer's order (the base components, the identity fields, then the rest), so
        // that a signer's covered list is a run of `known_components` from the start.
        let names = BASE_COMPONENTS
            .iter()
            .copied()
            .chain([
                policy.identity_headers.user.as_str(),
                policy.identity_headers.roles.as_str(),
            ])
            .chain(policy.required_components.iter().map(String::as_str))
            .chain(policy.extra_headers.iter().map(HeaderName::as_str));
        for name in names {
            if known_components.iter().any(|c| c.is_plain(name)) {
                continue;
            }
            if let Ok(c) = ComponentId::plain(name) {
                known_components.push(c);
            }
        }
        let index_of = |name: &str| known_components.iter().position(|c| c.is_plain(name));
        let required_known = policy
            .required_components
            .iter()
            .map(|name| index_of(name))
            .collect();
        let digest_known = index_of("content-digest");
        let present_known = [
            &policy.identity_headers.user,
            &policy.identity_headers.roles,
        ]
        .into_iter()
        .chain(policy.extra_headers.iter())
        .map(|name| index_of(name.as_str()))
        .collect();
        let (template_texts, template_covered) = Self::templates(&known_components, &policy);
        Verifier {
            keyring,
            policy,
            known_components,
            required_known,
            digest_known,
            present_known,
            template_texts,
            template_covered,
        }
    }

    /// The exact-shape reader's covered lists: for none, one and both identity fields, the
    /// serialised list with its `)` and where its components lie in `known_components`. A list
    /// whose names are not the first known components in order (an identity field named like a
    /// base component), or lie beyond the coverage mask, is left out (the scan reads it).
    fn templates(
        known_components: &[ComponentId],
        policy: &Policy,
    ) -> (Vec<String>, Vec<Range<usize>>) {
        let ids = &policy.identity_headers;
        let names: Vec<&str> = BASE_COMPONENTS
            .iter()
            .copied()
            .chain([ids.user.as_str(), ids.roles.as_str()])
            .collect();
        let mut texts = Vec::new();
        let mut ranges = Vec::new();
        for len in BASE_COMPONENTS.len()..=names.len() {
            let Some(names) = names.get(..len) else {
                continue;
            };
            let in_order = names.iter().enumerate().all(|(i, name)| {
                known_components.get(i).is_some_and(|c| c.is_plain(name))
                    && CoveredMask::bit(i).is_some()
            });
            if !in_order {
                continue;
            }
            let mut text = names
                .iter()
                .filter_map(|name| known_components.iter().find(|c| c.is_plain(name)))
                .map(ComponentId::as_serialized)
                .collect::<Vec<_>>()
                .join(" ");
            text.push(')');
            texts.push(text);
            ranges.push(0..len);
        }
        (texts, ranges)
    }

    /// The identifier for a received covered item: the prebuilt one when it is a plain known
    /// name, else built from the item.
    /// Also returns the index of the prebuilt one.
    /// `position` is the item's place in the covered list: signers list the profile's
    /// components in the order they are known here, so that one is tried first.
    fn component<'v>(
        &'v self,
        item: &sf_fast::Item<'_>,
        position: usize,
    ) -> Result<(Cow<'v, ComponentId>, Option<usize>), BaseError> {
        if let (Bare::String(name), true) = (item.bare, item.params.is_empty()) {
            if let Some(known) = self.known_components.get(position) {
                if known.is_plain(name) {
                    return Ok((Cow::Borrowed(known), Some(position)));
                }
            }
            if let Some((index, known)) = self
                .known_components
                .iter()
                .enumerate()
                .find(|(_, c)| c.is_plain(name))
            {
                return Ok((Cow::Borrowed(known), Some(index)));
            }
        }
        ComponentId::from_item(item).map(|c| (Cow::Owned(c), None))
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The keyring handle.
    pub fn keyring(&self) -> &KeyringHandle {
        &self.keyring
    }

    /// Both phases at once (no replay check): headers and MAC, then the body digest.
    pub fn verify(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now: u64,
    ) -> Result<Verified, VerifyError> {
        self.verify_headers(parts, now)?.check_body(body)
    }

    /// Phase one: select the signature, check its parameters, coverage and MAC. Reads no body,
    /// so a forged request costs no body read.
    ///
    /// Two readers of `Signature-Input` give the same answer: a scan that materialises nothing
    /// (for the shape conformant signers write: one canonical inner list of plain names this
    /// verifier knows, with the profile's parameters), and the full parser for everything else.
    /// The scan declines before it decides anything; tests/core_verify_scan.rs checks that
    /// whatever it decides equals the full path's answer.
    pub fn verify_headers(
        &self,
        parts: &http::request::Parts,
        now: u64,
    ) -> Result<HeadersVerified, VerifyError> {
        self.verify_headers_hinting(parts, now, |_| {})
    }

    /// [`Self::verify_headers`], calling `hint` with the nonce as soon as the signature's
    /// parameters (times, nonce, key id) have checked out, before the base is built and the MAC
    /// computed: a replay cache can start loading what recording the nonce will touch
    /// ([`ReplayCache::prefetch`](crate::replay::ReplayCache::prefetch)), so that load overlaps
    /// the MAC. Called at most once; also for a request whose MAC then fails, so `hint` must
    /// not record or decide anything.
    pub fn verify_headers_hinting(
        &self,
        parts: &http::request::Parts,
        now: u64,
        hint: impl FnOnce(&str),
    ) -> Result<HeadersVerified, VerifyError> {
        let mut hint = Some(hint);
        let hint = &mut |nonce: &str| {
            if let Some(hint) = hint.take() {
                hint(nonce);
            }
        };
        let input_raw = self.signature_input_field(&parts.headers)?;
        if let Some(result) = self.verify_template(parts, &input_raw, now, hint) {
            return result;
        }
        match self.verify_scanned(parts, &input_raw, now, hint) {
            Some(result) => result,
            None => self.verify_parsed(parts, &input_raw, now, hint),
        }
    }

    /// [`Self::verify_headers`] by the exact-shape reader alone: `None` when it declines. Not a
    /// stable API.
    #[doc(hidden)]
    pub fn verify_headers_template(
        &self,
        parts: &http::request::Parts,
        now: u64,
    ) -> Option<Result<HeadersVerified, VerifyError>> {
        match self.signature_input_field(&parts.headers) {
            Ok(input_raw) => self.verify_template(parts, &input_raw, now, &mut |_| {}),
            Err(e) => Some(Err(e)),
        }
    }

    /// The exact-shape reader, for the one shape the countersign signer writes (see
    /// [`sf_fast::match_signature_input_template`]): the member is compared with the covered
    /// lists prepared at construction and its six parameters read in place. It decides exactly
    /// what the scan would decide for that text (the same member, list, parameters and
    /// canonical text, then the same steps); `None` (decline) before any check otherwise.
    fn verify_template(
        &self,
        parts: &http::request::Parts,
        input_raw: &str,
        now: u64,
        hint: &mut dyn FnMut(&str),
    ) -> Option<Result<HeadersVerified, VerifyError>> {
        let found = sf_fast::match_signature_input_template(input_raw, &self.template_texts)?;
        // One member: the scan selects it for `Selector::Only`, and for a tag only when it is
        // the tag (else the full path reports that nothing matches).
        if let Selector::Tag(tag) = &self.policy.selector {
            if found.params.tag != Some(tag.as_str()) {
                return None;
            }
        }
        let range = self.template_covered.get(found.list)?;
        let covered = self.known_components.get(range.clone())?;
        let mut mask = CoveredMask(0);
        for index in range.clone() {
            mask.0 |= CoveredMask::bit(index)?;
        }
        Some(self.decide(
            parts,
            found.label,
            covered,
            mask,
            None,
            found.params,
            found.canonical,
            now,
            hint,
        ))
    }

    /// `missing_signature` when no member is selected, naming a policy tag that no member can
    /// carry: a structured-field string holds only printable ASCII (0x20-0x7E), so a tag with
    /// anything else selects nothing, whatever is sent.
    #[cold]
    fn no_signature_matches(&self) -> VerifyError {
        match &self.policy.selector {
            Selector::Tag(tag) if !tag.bytes().all(|b| (0x20..=0x7e).contains(&b)) => {
                VerifyError::new(
                    Reason::MissingSignature,
                    format!(
                        "no signature matches the policy: its tag {tag:?} is not printable ASCII \
                         (0x20-0x7E), which no structured-field string can carry, so no \
                         signature ever matches it"
                    ),
                )
            }
            _ => VerifyError::new(Reason::MissingSignature, "no signature matches the policy"),
        }
    }

    /// [`Self::verify_headers`] by the full parser alone (the reference for the differential
    /// tests). Not a stable API.
    #[doc(hidden)]
    pub fn verify_headers_reference(
        &self,
        parts: &http::request::Parts,
        now: u64,
    ) -> Result<HeadersVerified, VerifyError> {
        let input_raw = self.signature_input_field(&parts.headers)?;
        self.verify_parsed(parts, &input_raw, now, &mut |_| {})
    }

    /// [`Self::verify_headers`] by the scan alone: `None` when it declines. Not a stable API.
    #[doc(hidden)]
    pub fn verify_headers_scanned(
        &self,
        parts: &http::request::Parts,
        now: u64,
    ) -> Option<Result<HeadersVerified, VerifyError>> {
        match self.signature_input_field(&parts.headers) {
            Ok(input_raw) => self.verify_scanned(parts, &input_raw, now, &mut |_| {}),
            Err(e) => Some(Err(e)),
        }
    }

    /// The scan: `None` (decline) only before any check has failed or passed, so the full path
    /// then starts from the same point.
    fn verify_scanned(
        &self,
        parts: &http::request::Parts,
        input_raw: &str,
        now: u64,
        hint: &mut dyn FnMut(&str),
    ) -> Option<Result<HeadersVerified, VerifyError>> {
        let policy = &self.policy;
        // The selected member, and whether a second one matched.
        let mut selected: Option<(&str, sf_fast::ScannedMember<'_>)> = None;
        let mut ambiguous = false;
        sf_fast::scan_signature_input(input_raw, &mut |label, member| {
            let wanted = match &policy.selector {
                Selector::Only => true,
                Selector::Tag(tag) => matches!(
                    &member,
                    sf_fast::ScannedMember::InnerList(list) if list.params.tag == Some(tag.as_str())
                ),
            };
            if wanted {
                if selected.is_some() {
                    ambiguous = true;
                } else {
                    selected = Some((label, member));
                }
            }
        })?;
        // Only the common case is decided here; the rest (ambiguity, no match, an item, other
        // parameters, parameters or names the full path must check one by one, text that is not
        // in serialised form) goes to the full path.
        let (label, list) = match selected {
            Some((label, sf_fast::ScannedMember::InnerList(list))) if !ambiguous => (label, list),
            _ => return None,
        };
        if !list.plain || list.params.other {
            return None;
        }
        let canonical = list.canonical?;
        // Every covered name a plain known component within the mask: then the covered list
        // is references to the prebuilt identifiers and every coverage rule a bit test.
        let mut covered: [&ComponentId; sf_fast::MAX_SCANNED_ITEMS] =
            [self.known_components.first()?; sf_fast::MAX_SCANNED_ITEMS];
        let mut mask = CoveredMask(0);
        let mut duplicate = None;
        for position in 0..list.len() {
            let (index, known) = self.known_named(list.name(position)?, position)?;
            let bit = CoveredMask::bit(index)?;
            if mask.0 & bit != 0 && duplicate.is_none() {
                duplicate = Some(known);
            }
            mask.0 |= bit;
            *covered.get_mut(position)? = known;
        }
        let covered = covered.get(..list.len())?;
        Some(self.decide(
            parts,
            label,
            covered,
            mask,
            duplicate,
            list.params,
            canonical,
            now,
            hint,
        ))
    }

    /// What the scan and the exact-shape reader decide once they have the member: a plain
    /// covered list of known components (`duplicate`: the first repeated one), parameters of
    /// the expected types and the list's serialised text. From here on every step is the full
    /// path's, in its order.
    #[allow(clippy::too_many_arguments)]
    fn decide<C: std::borrow::Borrow<ComponentId>>(
        &self,
        parts: &http::request::Parts,
        label: &str,
        covered: &[C],
        mask: CoveredMask,
        duplicate: Option<&ComponentId>,
        params: sf_fast::SignatureParams<'_>,
        canonical: &str,
        now: u64,
        hint: &mut dyn FnMut(&str),
    ) -> Result<HeadersVerified, VerifyError> {
        self.check_component_count(covered.len())?;
        let mac = received_mac(&parts.headers, label)?;
        // Once every parameter has its expected type, only `alg` can be wrong.
        if let Some(alg) = params.alg {
            if alg != ALGORITHM {
                return Err(VerifyError::new(
                    Reason::UnsupportedAlgorithm,
                    format!("alg {alg:?}"),
                ));
            }
        }
        let received = ReceivedParams {
            created: params.created,
            expires: params.expires,
            nonce: params.nonce,
            keyid: params.keyid,
        };
        let checked = check_params(&self.policy, received, now)?;
        if let Some(dup) = duplicate {
            return Err(duplicate_error(dup));
        }
        if let Some(nonce) = checked.nonce {
            hint(nonce);
        }
        self.verify_covered(
            parts,
            covered,
            mask,
            checked,
            &mac,
            canonical.len(),
            |out: &mut String| {
                out.push_str(canonical);
                Ok(())
            },
        )
    }

    /// The cap on the covered list ([`Policy::max_components`]), checked by every reader of
    /// `Signature-Input` as soon as it has selected the signature, so that the work per covered
    /// component an unauthenticated request can ask for is bounded.
    fn check_component_count(&self, count: usize) -> Result<(), VerifyError> {
        let max = self.policy.max_components;
        if count > max {
            return Err(too_many_covered(count, max));
        }
        Ok(())
    }

    /// The joined `Signature-Input` field, refused when longer than
    /// [`MAX_SIGNATURE_FIELD_BYTES`] (or 256 bytes per component [`Policy::max_components`]
    /// allows, when that is more) before any reader parses it.
    fn signature_input_field<'h>(
        &self,
        headers: &'h HeaderMap,
    ) -> Result<Cow<'h, str>, VerifyError> {
        let input = joined(headers, &SIGNATURE_INPUT)?
            .ok_or_else(|| VerifyError::new(Reason::MissingSignature, "no Signature-Input"))?;
        let limit = MAX_SIGNATURE_FIELD_BYTES.max(
            self.policy
                .max_components
                .saturating_mul(SIGNATURE_INPUT_BYTES_PER_COMPONENT),
        );
        within_limit(input, &SIGNATURE_INPUT, limit)
    }

    /// The prebuilt known component named `name` and its index; `position` (its place in the
    /// covered list) is tried first, as for [`Self::component`].
    fn known_named(&self, name: &str, position: usize) -> Option<(usize, &ComponentId)> {
        if let Some(known) = self.known_components.get(position) {
            if known.is_plain(name) {
                return Some((position, known));
            }
        }
        self.known_components
            .iter()
            .enumerate()
            .find(|(_, c)| c.is_plain(name))
    }

    /// The full path: every shape `sfv` accepts.
    fn verify_parsed(
        &self,
        parts: &http::request::Parts,
        input_raw: &str,
        now: u64,
        hint: &mut dyn FnMut(&str),
    ) -> Result<HeadersVerified, VerifyError> {
        let policy = &self.policy;
        // Select by tag, never by label. Only the selected member is kept.
        #[derive(Default)]
        struct Selection<'a> {
            selected: Option<(&'a str, Entry<'a>)>,
            ambiguous: bool,
        }
        let mut inputs_fallback = None;
        let selection = sf_fast::fold_or_fallback_str(
            input_raw,
            &mut inputs_fallback,
            |sel: &mut Selection<'_>, label, entry| {
                let wanted = match &policy.selector {
                    Selector::Only => true,
                    Selector::Tag(tag) => match &entry {
                        Entry::InnerList(il) => {
                            matches!(sf_fast::param(&il.params, "tag"), Some(Bare::String(t)) if t == tag)
                        }
                        Entry::Item(_) => false,
                    },
                };
                if wanted {
                    if sel.selected.is_some() {
                        sel.ambiguous = true;
                    } else {
                        sel.selected = Some((label, entry));
                    }
                }
            },
        )
        .map_err(|_| {
            VerifyError::new(
                Reason::MalformedSignature,
                "Signature-Input is not a dictionary",
            )
        })?;
        if selection.ambiguous {
            return Err(VerifyError::new(
                Reason::MalformedSignature,
                "more than one signature matches the policy",
            ));
        }
        let (label, entry) = selection
            .selected
            .ok_or_else(|| self.no_signature_matches())?;
        let inner = match entry {
            Entry::InnerList(il) => il,
            Entry::Item(_) => {
                return Err(VerifyError::new(
                    Reason::MalformedSignature,
                    "signature input is not an inner list",
                ))
            }
        };
        // Before anything is done per component; the scan and the exact-shape reader check
        // it at the same step (first thing in `decide`).
        self.check_component_count(inner.items.len())?;

        let mac = received_mac(&parts.headers, label)?;
        {
            // Parameters.
            let mut received = ReceivedParams::default();
            for (name, value) in &inner.params {
                match (*name, value) {
                    ("created", Bare::Integer(v)) => received.created = Some(*v),
                    ("expires", Bare::Integer(v)) => received.expires = Some(*v),
                    ("nonce", Bare::String(v)) => received.nonce = Some(*v),
                    ("keyid", Bare::String(v)) => received.keyid = Some(*v),
                    ("alg", Bare::String(v)) if *v != ALGORITHM => {
                        return Err(VerifyError::new(
                            Reason::UnsupportedAlgorithm,
                            format!("alg {v:?}"),
                        ));
                    }
                    ("alg" | "tag", Bare::String(_)) => {}
                    ("created" | "expires" | "nonce" | "keyid" | "alg" | "tag", _) => {
                        return Err(VerifyError::new(
                            Reason::MalformedSignature,
                            format!("parameter {name} has the wrong type"),
                        ))
                    }
                    // Unknown parameters are covered by the MAC (they are in @signature-params).
                    _ => {}
                }
            }
            let checked = check_params(policy, received, now)?;

            // Coverage.
            let mut covered: Vec<Cow<'_, ComponentId>> = Vec::with_capacity(inner.items.len());
            let mut mask = CoveredMask(0);
            // While every item is a known component in the mask, a repeat shows as a bit
            // already set; otherwise the serialised identifiers are compared.
            let mut duplicate = None;
            let mut all_in_mask = true;
            for (position, item) in inner.items.iter().enumerate() {
                let (component, known) = self.component(item, position)?;
                match known.and_then(CoveredMask::bit) {
                    Some(bit) => {
                        if mask.0 & bit != 0 && duplicate.is_none() {
                            duplicate = Some(covered.len());
                        }
                        mask.0 |= bit;
                    }
                    None => all_in_mask = false,
                }
                covered.push(component);
            }
            let duplicate = if all_in_mask {
                duplicate.and_then(|i| covered.get(i)).map(|c| c.as_ref())
            } else {
                first_duplicate(&covered)
            };
            if let Some(dup) = duplicate {
                return Err(duplicate_error(dup));
            }
            if let Some(nonce) = checked.nonce {
                hint(nonce);
            }
            // The `@signature-params` value goes straight into the base. (Serialising
            // parameters that parsed cannot fail, so checking them after the component lines
            // reports the same reason as checking them first.)
            // When the received inner list is already in serialised form (as every conformant
            // signer writes it), its text is the value, with no re-serialisation.
            let params_len = match inner.canonical {
                Some(text) => text.len(),
                None => {
                    2 + covered
                        .iter()
                        .map(|c| c.as_serialized().len() + 1)
                        .sum::<usize>()
                        + 160
                }
            };
            self.verify_covered(
                parts,
                &covered,
                mask,
                checked,
                &mac,
                params_len,
                |out| match inner.canonical {
                    Some(text) => {
                        out.push_str(text);
                        Ok(())
                    }
                    None => write_signature_params(out, &covered, &inner.params),
                },
            )
        }
    }

    /// Everything after the covered list is known to hold no duplicates: coverage rules, the
    /// digest field, key, base, MAC, identity. Shared by both readers of `Signature-Input`.
    #[allow(clippy::too_many_arguments)]
    fn verify_covered<C: std::borrow::Borrow<ComponentId>>(
        &self,
        parts: &http::request::Parts,
        covered: &[C],
        mask: CoveredMask,
        checked: CheckedParams<'_>,
        mac: &ReceivedMac,
        params_len: usize,
        write_params: impl FnOnce(&mut String) -> Result<(), VerifyError>,
    ) -> Result<HeadersVerified, VerifyError> {
        let headers = &parts.headers;
        let policy = &self.policy;
        for (required, known) in policy.required_components.iter().zip(&self.required_known) {
            if !mask.covers(*known, required, covered) {
                let reason =
                    if required == "content-digest" && policy.body == BodyPolicy::RequireDigest {
                        Reason::MissingDigest
                    } else {
                        Reason::InsufficientCoverage
                    };
                return Err(VerifyError::new(
                    reason,
                    format!("{required} is not covered"),
                ));
            }
        }
        // The joined field is kept: its text is also the base's `content-digest` line.
        let mut digest_value = None;
        let digest = match policy.body {
            BodyPolicy::RequireDigest => {
                if !mask.covers(self.digest_known, "content-digest", covered) {
                    return Err(VerifyError::new(
                        Reason::MissingDigest,
                        "content-digest is not covered",
                    ));
                }
                let value = joined(headers, &CONTENT_DIGEST)?
                    .ok_or_else(|| VerifyError::new(Reason::MissingDigest, "no Content-Digest"))?;
                let value = digest_value.insert(within_limit(
                    value,
                    &CONTENT_DIGEST,
                    MAX_SIGNATURE_FIELD_BYTES,
                )?);
                Some(ExpectedDigest::parse_str(value)?)
            }
            BodyPolicy::Unchecked => None,
        };
        let ids = &policy.identity_headers;
        for (name, known) in [&ids.user, &ids.roles]
            .into_iter()
            .chain(policy.extra_headers.iter())
            .zip(&self.present_known)
        {
            // Coverage first: a covered field (the usual case) needs no map lookup.
            if !mask.covers(*known, name.as_str(), covered) && headers.contains_key(name) {
                return Err(VerifyError::new(
                    Reason::InsufficientCoverage,
                    format!("{name} is present but not covered"),
                ));
            }
        }

        // Key and MAC.
        let CheckedParams {
            created,
            accepted_until,
            keyid,
            nonce,
        } = checked;
        let secret = self
            .keyring
            .load()
            .verification_key(keyid, created)
            .ok_or_else(|| VerifyError::new(Reason::UnknownKey, format!("keyid {keyid:?}")))?;

        let view = RequestView::from_parts(parts)
            .with_authority(policy.authority.as_deref())
            .with_scheme(policy.scheme.as_deref());
        let mut lines: [Range<usize>; RECORDED_LINES] = Default::default();
        // The plain `content-digest` line (the prebuilt identifier, found by address) has the
        // joined field read above as its value: no second lookup.
        let digest_position = self
            .digest_known
            .and_then(|index| self.known_components.get(index))
            .and_then(|prebuilt| {
                covered
                    .iter()
                    .position(|c| std::ptr::eq(c.borrow(), prebuilt))
            });
        let known_digest;
        let known: &[(usize, &str)] = match (digest_position, digest_value.as_deref()) {
            (Some(position), Some(value)) => {
                known_digest = [(position, value)];
                &known_digest
            }
            _ => &[],
        };
        let base = SignatureBaseBuilder::build_recording(
            &view,
            covered,
            params_len,
            write_params,
            &mut lines,
            known,
        )?;
        // Constant-time comparison (`subtle`, a word at a time; another length never matches).
        let computed = hmac_sha256(&secret, base.as_bytes());
        if !ct_eq(&computed, mac.as_slice()) {
            return Err(VerifyError::new(Reason::BadSignature, "MAC mismatch"));
        }

        // Identity (only after the MAC: its fields are now known to be authentic).
        // A present identity field is covered (checked above), and a covered one is present
        // (else the base could not be built): its value is the text of its line in the base,
        // read back from there instead of looked up and joined again.
        // The prebuilt identifier of a plain known component is found by address (the covered
        // list borrows it); anything else is looked up in the map as before.
        let field = |name: &HeaderName,
                     known: Option<&Option<usize>>|
         -> Result<Option<Cow<'_, str>>, VerifyError> {
            let prebuilt = known
                .copied()
                .flatten()
                .and_then(|index| self.known_components.get(index));
            let line = prebuilt
                .and_then(|prebuilt| {
                    covered
                        .iter()
                        .position(|c| std::ptr::eq(c.borrow(), prebuilt))
                })
                .and_then(|position| lines.get(position))
                .and_then(|line| base.as_str().get(line.clone()));
            match line {
                // `"<name>": <value>\n`
                Some(line) => Ok(line
                    .get(name.as_str().len() + 4..line.len().saturating_sub(1))
                    .map(Cow::Borrowed)),
                None => joined(headers, name),
            }
        };
        let identity = match field(&ids.user, self.present_known.first())? {
            Some(user) => {
                // The decoders also refuse an empty user name and an empty role (docs/PROTOCOL.md
                // §4): every reader of `Signature-Input` ends here, so all decide alike.
                let user = decode_value(&user).ok_or_else(|| {
                    VerifyError::new(
                        Reason::MalformedSignature,
                        if user.is_empty() {
                            "user field is empty"
                        } else {
                            "user field is not canonical percent-encoded UTF-8"
                        },
                    )
                })?;
                let roles = match field(&ids.roles, self.present_known.get(1))? {
                    Some(r) => decode_roles(&r).ok_or_else(|| {
                        VerifyError::new(
                            Reason::MalformedSignature,
                            if r.split(',').any(str::is_empty) {
                                "roles field has an empty role"
                            } else {
                                "roles field is not canonical percent-encoded UTF-8"
                            },
                        )
                    })?,
                    None => Vec::new(),
                };
                Some(Identity { user, roles })
            }
            None if headers.contains_key(&ids.roles) => {
                return Err(VerifyError::new(
                    Reason::MalformedSignature,
                    "roles without a user",
                ))
            }
            None => None,
        };
        let replay_until = accepted_until.saturating_add(1);
        Ok(HeadersVerified {
            verified: Verified {
                identity,
                keyid: CompactString::from(keyid),
                nonce: nonce.map(CompactString::from),
                created,
                replay_until,
            },
            digest,
        })
    }
}

/// How many covered components' base lines a verifier records (the profile covers 7).
const RECORDED_LINES: usize = 16;

/// Refuses a signature field longer than `limit` before it is parsed (see
/// [`MAX_SIGNATURE_FIELD_BYTES`]).
fn within_limit<'h>(
    value: Cow<'h, str>,
    name: &HeaderName,
    limit: usize,
) -> Result<Cow<'h, str>, VerifyError> {
    if value.len() > limit {
        return Err(field_too_long(name, value.len(), limit));
    }
    Ok(value)
}

#[cold]
fn field_too_long(name: &HeaderName, len: usize, limit: usize) -> VerifyError {
    VerifyError::new(
        Reason::MalformedSignature,
        format!("{name} is {len} bytes long, more than the {limit} a verifier parses"),
    )
}

#[cold]
fn too_many_covered(count: usize, max: usize) -> VerifyError {
    VerifyError::new(
        Reason::MalformedSignature,
        format!("the signature covers {count} components, more than max_components ({max})"),
    )
}

#[cold]
fn duplicate_error(dup: &ComponentId) -> VerifyError {
    VerifyError::new(
        Reason::MalformedSignature,
        format!("component {} is covered twice", dup.as_serialized()),
    )
}

/// The selected signature's parameters as received (each only when of the expected type).
#[derive(Default)]
struct ReceivedParams<'a> {
    created: Option<i64>,
    expires: Option<i64>,
    nonce: Option<&'a str>,
    keyid: Option<&'a str>,
}

/// The parameters once present, in range and in time.
struct CheckedParams<'a> {
    created: u64,
    /// The last second at which a verifier's clock, within its skew, still accepts the
    /// signature: `min(created + window, expires) + skew`.
    accepted_until: u64,
    keyid: &'a str,
    nonce: Option<&'a str>,
}

/// The parameter checks, in the order both readers apply them.
fn check_params<'a>(
    policy: &Policy,
    received: ReceivedParams<'a>,
    now: u64,
) -> Result<CheckedParams<'a>, VerifyError> {
    let ReceivedParams {
        created,
        expires,
        nonce,
        keyid,
    } = received;
    let keyid = keyid.ok_or_else(|| VerifyError::new(Reason::MalformedSignature, "no keyid"))?;
    let created =
        created.ok_or_else(|| VerifyError::new(Reason::MalformedSignature, "no created"))?;
    let created = u64::try_from(created)
        .map_err(|_| VerifyError::new(Reason::MalformedSignature, "negative created"))?;
    let window = policy.window.as_secs();
    let skew = policy.skew.as_secs();
    if created > now.saturating_add(skew) {
        return Err(VerifyError::new(
            Reason::NotYetValid,
            "created is in the future",
        ));
    }
    if created.saturating_add(window).saturating_add(skew) < now {
        return Err(VerifyError::new(
            Reason::Expired,
            "created is older than the window",
        ));
    }
    if let Some(exp) = expires {
        // In i128: no value of the three (an sf-integer, two u64s) can wrap there, as `as
        // i64` casts could for an absurd skew or clock.
        if i128::from(exp) + i128::from(skew) < i128::from(now) {
            return Err(VerifyError::new(Reason::Expired, "expires has passed"));
        }
    }
    match (policy.nonce, nonce) {
        (NoncePolicy::Required, None) => {
            return Err(VerifyError::new(Reason::MalformedSignature, "no nonce"))
        }
        (_, Some(n)) if n.len() < MIN_NONCE_LEN && policy.nonce == NoncePolicy::Required => {
            return Err(VerifyError::new(
                Reason::MalformedSignature,
                "nonce shorter than 128 bits",
            ))
        }
        (_, Some(n)) if n.len() > MAX_NONCE_LEN => {
            return Err(VerifyError::new(
                Reason::MalformedSignature,
                "nonce too long",
            ))
        }
        _ => {}
    }
    // The signer's own `expires`, when sooner than the window's end, ends acceptance sooner:
    // a body that completes after it is refused, and the nonce need not be kept longer. (A
    // negative `expires` passed the check above only for a clock within the skew of 0: 0.)
    let last = match expires {
        Some(exp) => created
            .saturating_add(window)
            .min(u64::try_from(exp).unwrap_or(0)),
        None => created.saturating_add(window),
    };
    Ok(CheckedParams {
        created,
        accepted_until: last.saturating_add(skew),
        keyid,
        nonce,
    })
}

/// The received MAC, copied to the stack; longer than the buffer means "matches nothing".
struct ReceivedMac {
    len: usize,
    buf: [u8; sf_fast::MAX_INLINE_BYTES],
}

impl ReceivedMac {
    fn new(bytes: &[u8]) -> Self {
        let mut mac = ReceivedMac {
            len: bytes.len(),
            buf: [0; sf_fast::MAX_INLINE_BYTES],
        };
        if let Some(dst) = mac.buf.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        mac
    }

    fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// The `Signature` member of `label`: a byte sequence.
fn received_mac(headers: &HeaderMap, label: &str) -> Result<ReceivedMac, VerifyError> {
    let sig_raw = joined(headers, &SIGNATURE)?
        .ok_or_else(|| VerifyError::new(Reason::MissingSignature, "no Signature field"))?;
    let sig_raw = within_limit(sig_raw, &SIGNATURE, MAX_SIGNATURE_FIELD_BYTES)?;
    // The signer's exact shape (one member, decoded in place); else the scan (nothing
    // materialised, the MAC decoded in place); the parser when that declines.
    let mut buf = [0; sf_fast::MAX_INLINE_BYTES];
    if let Some(len) = sf_fast::match_byte_member(&sig_raw, label, &mut buf) {
        return Ok(ReceivedMac { len, buf });
    }
    let mut scanned = [sf_fast::ScannedBytes::default()];
    if sf_fast::scan_byte_members(&sig_raw, &[label], &mut scanned).is_some() {
        let [member] = scanned;
        return match member.kind {
            sf_fast::ScannedKind::Bytes => Ok(ReceivedMac::new(member.as_slice())),
            sf_fast::ScannedKind::NotBytes => Err(not_byte_sequence()),
            sf_fast::ScannedKind::InnerList => Err(inner_list_member()),
            sf_fast::ScannedKind::Missing => Err(no_member()),
        };
    }
    let mut sigs_fallback = None;
    let member = sf_fast::fold_or_fallback_str(
        &sig_raw,
        &mut sigs_fallback,
        |found: &mut Option<Entry<'_>>, key, entry| {
            // Keys are unique in a parsed dictionary.
            if key == label {
                *found = Some(entry);
            }
        },
    )
    .map_err(|_| VerifyError::new(Reason::MalformedSignature, "Signature is not a dictionary"))?;
    match &member {
        Some(Entry::Item(item)) => match &item.bare {
            Bare::ByteSeq(b) => Ok(ReceivedMac::new(b.as_slice())),
            _ => Err(not_byte_sequence()),
        },
        Some(Entry::InnerList(_)) => Err(inner_list_member()),
        None => Err(no_member()),
    }
}

#[cold]
fn not_byte_sequence() -> VerifyError {
    VerifyError::new(
        Reason::MalformedSignature,
        "Signature member is not a byte sequence",
    )
}

#[cold]
fn inner_list_member() -> VerifyError {
    VerifyError::new(
        Reason::MalformedSignature,
        "Signature member is an inner list",
    )
}

#[cold]
fn no_member() -> VerifyError {
    VerifyError::new(
        Reason::MissingSignature,
        "Signature has no member for the selected label",
    )
}

/// Joins all field lines of `name` with `", "`; `None` when absent. Non-ASCII values are
/// malformed for every field this module parses.
/// A single field line (the usual case) is borrowed, not copied.
fn joined<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<Cow<'h, str>>, VerifyError> {
    let mut out: Option<Cow<'h, str>> = None;
    for value in headers.get_all(name) {
        let text = field_text(value).ok_or_else(|| {
            VerifyError::new(Reason::MalformedSignature, format!("{name} is not ASCII"))
        })?;
        match &mut out {
            Some(s) => {
                let s = s.to_mut();
                s.push_str(", ");
                s.push_str(text);
            }
            None => out = Some(Cow::Borrowed(text)),
        }
    }
    Ok(out)
}

/// Appends the `@signature-params` value: the received inner list as RFC 8941 serialises it,
/// with the covered identifiers (already serialised by [`ComponentId::from_item`]) and the
/// parameters in the order received. Equal to sfv's serialisation of the whole inner list
/// (tests/core_fastpath.rs checks the serialiser against sfv's).
fn write_signature_params(
    out: &mut String,
    covered: &[Cow<'_, ComponentId>],
    params: &[(&str, Bare<'_>)],
) -> Result<(), VerifyError> {
    out.push('(');
    for (i, c) in covered.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(c.as_serialized());
    }
    out.push(')');
    sf_fast::write_params(out, params).map_err(|_| {
        VerifyError::new(
            Reason::MalformedSignature,
            "cannot serialise @signature-params",
        )
    })
}

/// The signature base a verifier computes for this request, for debugging and conformance
/// tests. Returns the base text or why it cannot be built.
pub fn signature_base_for(
    view: &RequestView<'_>,
    signature_input_member: &str,
) -> Result<SignatureBase, VerifyError> {
    let mut list = Parser::parse_list(signature_input_member.as_bytes())
        .map_err(|_| VerifyError::new(Reason::MalformedSignature, "not an inner list"))?;
    // Re-serialised below as the `@signature-params` line: decimals in canonical form.
    sf_fast::canonicalize_decimals(list.iter_mut());
    let inner = match list.as_slice() {
        [ListEntry::InnerList(il)] => il,
        _ => {
            return Err(VerifyError::new(
                Reason::MalformedSignature,
                "not one inner list",
            ))
        }
    };
    let mut covered = Vec::new();
    for item in &inner.items {
        covered.push(ComponentId::from_item(&sf_fast::Item::from_sfv(item))?);
    }
    let params_line = list
        .serialize_value()
        .map_err(|_| VerifyError::new(Reason::MalformedSignature, "cannot serialise"))?;
    Ok(SignatureBaseBuilder::build(view, &covered, &params_line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A covered field named twice, or one of the fields the signer writes, fails every
    /// request that carries it: `validate` says so once (it said `Ok`, and requests failed one
    /// by one, anonymous ones only once a user signed in).
    #[test]
    fn validate_refuses_fields_covered_twice_or_written_by_the_signer() {
        let name = HeaderName::from_static;
        let with_extra = |extra: &[&'static str]| SignerConfig {
            extra_headers: extra.iter().map(|n| name(n)).collect(),
            ..SignerConfig::default()
        };
        let refused = [
            (with_extra(&["content-digest"]), "content-digest"),
            (
                with_extra(&["x-auth-user"]),
                "already covered as identity_headers.user",
            ),
            (
                with_extra(&["x-auth-roles"]),
                "already covered as identity_headers.roles",
            ),
            (
                with_extra(&["date", "x-a", "date"]),
                "already covered as extra_headers",
            ),
            (
                SignerConfig {
                    identity_headers: IdentityHeaders {
                        user: name("x-who"),
                        roles: name("x-who"),
                    },
                    ..SignerConfig::default()
                },
                "already covered as identity_headers.user",
            ),
            (
                SignerConfig {
                    identity_headers: IdentityHeaders {
                        user: name("signature"),
                        roles: name("x-roles"),
                    },
                    ..SignerConfig::default()
                },
                "identity_headers.user names signature",
            ),
        ];
        for (config, needle) in refused {
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(needle), "{message} ({needle})");
            // The signer built from it refuses every request, anonymous ones too.
            let keyring = crate::KeyringHandle::new(
                crate::Keyring::single("k1", crate::Secret::new(vec![7; 32]).unwrap()).unwrap(),
            );
            let signer = Signer::new(keyring, config);
            let (mut parts, ()) = http::Request::get("http://api.example/x")
                .body(())
                .unwrap()
                .into_parts();
            let nonce = Nonce::new("0123456789abcdefghijklmn").unwrap();
            let refused = signer.sign(&mut parts, b"", None, 1_700_000_000, &nonce);
            assert!(refused.is_err(), "{needle}");
        }
        assert!(with_extra(&["date", "x-tenant"]).validate().is_ok());
        // A stale signature field named as an extra header is dropped, never covered: allowed.
        assert!(with_extra(&["date", "signature"]).validate().is_ok());
    }

    #[test]
    fn decimal_lengths() {
        for (n, len) in [(0, 1), (9, 1), (10, 2), (1_700_000_000, 10), (u64::MAX, 20)] {
            assert_eq!(decimal_len(n), len, "{n}");
            let mut text = String::new();
            sf_fast::write_u64(&mut text, n);
            assert_eq!(text.len(), len, "{n}");
        }
    }

    /// The value is allocated at exactly its length (else converting it to a header value
    /// allocates again), for every covered-list shape and number width.
    #[test]
    fn signature_input_has_exact_capacity() {
        let plain = |names: &[&str]| -> Vec<ComponentId> {
            names
                .iter()
                .map(|n| ComponentId::plain(n).unwrap())
                .collect()
        };
        let lists = [
            plain(&[]),
            plain(&["@method"]),
            plain(&BASE_COMPONENTS),
            plain(&["@method", "x-auth-user", "x-auth-roles", "date"]),
        ];
        for covered in &lists {
            for (created, expires) in [
                (0, 10),
                (1_700_000_000, 1_700_000_010),
                (u64::MAX, u64::MAX),
            ] {
                for (label, nonce, keyid, tag) in [
                    ("countersign", "AAAAAAAAAAAAAAAAAAAAAA", "k1", "countersign"),
                    ("s", "n", "key.12345", ""),
                ] {
                    let text = covered
                        .iter()
                        .map(ComponentId::as_serialized)
                        .collect::<Vec<_>>()
                        .join(" ");
                    let extra: Vec<&ComponentId> = covered.iter().collect();
                    let input =
                        signature_input(label, &text, &[], created, expires, nonce, keyid, tag);
                    assert_eq!(input.len(), input.capacity(), "{input}");
                    // The same list given as extra components, alone or after a prepared one.
                    let as_extra =
                        signature_input(label, "", &extra, created, expires, nonce, keyid, tag);
                    assert_eq!(as_extra, input);
                    assert_eq!(as_extra.len(), as_extra.capacity(), "{as_extra}");
                    let split = extra.len() / 2;
                    let (first, rest) = extra.split_at(split);
                    let first_text = first
                        .iter()
                        .map(|c| c.as_serialized())
                        .collect::<Vec<_>>()
                        .join(" ");
                    let mixed = signature_input(
                        label,
                        &first_text,
                        rest,
                        created,
                        expires,
                        nonce,
                        keyid,
                        tag,
                    );
                    assert_eq!(mixed, input);
                    assert_eq!(mixed.len(), mixed.capacity(), "{mixed}");
                    assert_eq!(input.len(), input.capacity(), "{input}");
                    assert!(input.starts_with(&format!("{label}=(")), "{input}");
                    assert!(
                        input.ends_with(&format!(";alg=\"{ALGORITHM}\";tag=\"{tag}\"")),
                        "{input}"
                    );
                }
            }
        }
    }
}

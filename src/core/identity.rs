//! The identity the proxy forwards: a user name and roles, carried in two header fields whose
//! values are percent-encoded UTF-8 (every byte outside `A-Z a-z 0-9 - . _ ~` encoded), so any
//! Unicode name survives a header field and round-trips exactly.
//!
//! The user name and every role name are non-empty (docs/PROTOCOL.md §4): an empty name is no
//! identity, and an empty role has no encoding of its own (a single one would be an empty roles
//! field, which means "no roles"; in a list it would be `a,,b`). The signer refuses them
//! ([`Identity::validate`], checked by `Signer::sign*`) and the decoders reject them, so a
//! verifier answers `malformed_signature`.

use std::fmt;

use bytes::Bytes;
use compact_str::CompactString;
use http::HeaderValue;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::error::SignError;

const IDENTITY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A user and their roles.
///
/// Any value can be built (the fields are public), but only one whose user name and role
/// names are all non-empty can be signed: see [`Identity::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The user name (any non-empty Unicode). A [`CompactString`]: up to 24 bytes are held
    /// inline, so a verified request's names cost no allocation of their own.
    pub user: CompactString,
    /// Role names (any non-empty Unicode), in order; none is fine.
    pub roles: Vec<CompactString>,
}

impl Identity {
    /// An identity with the given user and roles.
    pub fn new(
        user: impl Into<CompactString>,
        roles: impl IntoIterator<Item = impl Into<CompactString>>,
    ) -> Self {
        Identity {
            user: user.into(),
            roles: roles.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether this identity can be sent: the user name and every role name non-empty
    /// (docs/PROTOCOL.md §4). `Signer::sign` checks it and fails with this error; a caller
    /// that receives identities from elsewhere (a login backend) can check them up front.
    pub fn validate(&self) -> Result<(), SignError> {
        if !has_empty_name(self) {
            return Ok(());
        }
        Err(empty_name_error(self))
    }
}

/// Whether the user name or a role name is empty: a few comparisons, no pass over the text.
fn has_empty_name(identity: &Identity) -> bool {
    identity.user.is_empty() || identity.roles.iter().any(|role| role.is_empty())
}

/// What is empty in an identity that [`has_empty_name`].
#[cold]
fn empty_name_error(identity: &Identity) -> SignError {
    if identity.user.is_empty() {
        return SignError::new("the user name is empty (docs/PROTOCOL.md §4)");
    }
    let position = identity
        .roles
        .iter()
        .position(|role| role.is_empty())
        .unwrap_or(0);
    SignError::new(format!(
        "role {} of {} is empty (a role name must be non-empty; an identity without roles has \
         an empty roles list, docs/PROTOCOL.md §4)",
        position + 1,
        identity.roles.len()
    ))
}

/// An identity in its header form: the user's and the roles' values already percent-encoded,
/// as [`HeaderValue`]s that are cheap to clone.
///
/// What a signer that forwards the same identity on every request keeps (the proxy's session
/// store holds identities encoded), so that signing neither decodes nor re-encodes it:
/// [`crate::core::Signer::sign_encoded`]. [`Signer::sign`](crate::core::Signer::sign) with an
/// [`Identity`] encodes it into one of these first.
///
/// [`EncodedIdentity::new`] stays infallible, so it also encodes an identity with an empty
/// user or role name; such a value remembers it and `sign_encoded` refuses it (checking a flag
/// costs the signer nothing, finding `,,` in the roles value would be a pass over it).
/// [`EncodedIdentity::from_encoded`] returns `None` for it.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedIdentity {
    user: HeaderValue,
    /// `None` when there are no roles (the roles field is then not sent).
    roles: Option<HeaderValue>,
    /// The user name or a role name is empty: not signable (docs/PROTOCOL.md §4).
    has_empty_name: bool,
}

impl EncodedIdentity {
    /// Encodes `identity`. One with an empty user or role name is encoded too, but cannot be
    /// signed: [`Signer::sign_encoded`](crate::core::Signer::sign_encoded) then fails with the
    /// error of [`Identity::validate`].
    pub fn new(identity: &Identity) -> EncodedIdentity {
        EncodedIdentity {
            user: encoded_header_value(encode_value(&identity.user)),
            roles: (!identity.roles.is_empty())
                .then(|| encoded_header_value(encode_roles(&identity.roles))),
            has_empty_name: has_empty_name(identity),
        }
    }

    /// From values already encoded (the roles as their comma-separated field value; empty: no
    /// roles), shared rather than copied. `None` unless both decode as a verifier decodes them
    /// (docs/PROTOCOL.md §4) to a signable identity: percent-encodings of UTF-8 text with no
    /// byte outside the unreserved set left bare, a non-empty user, no empty role between,
    /// before or after the commas (so [`EncodedIdentity::decode`] cannot fail and the identity
    /// can be signed). Like the verifier, it accepts an unreserved character that is encoded
    /// (`%41b` is `Ab`): the values are sent as given, so signer and verifier see one text.
    pub fn from_encoded(user: Bytes, roles: Bytes) -> Option<EncodedIdentity> {
        if !is_canonical(&user) || !roles_are_canonical(&roles) {
            return None;
        }
        Some(EncodedIdentity {
            user: HeaderValue::from_maybe_shared(user).ok()?,
            roles: if roles.is_empty() {
                None
            } else {
                Some(HeaderValue::from_maybe_shared(roles).ok()?)
            },
            has_empty_name: false,
        })
    }

    /// `Ok` when this identity can be signed; else the error [`Identity::validate`] gives for
    /// the identity it encodes.
    pub(crate) fn check_signable(&self) -> Result<(), SignError> {
        if !self.has_empty_name {
            return Ok(());
        }
        Err(self.empty_name_error())
    }

    #[cold]
    fn empty_name_error(&self) -> SignError {
        if self.user.is_empty() {
            return SignError::new("the user name is empty (docs/PROTOCOL.md §4)");
        }
        SignError::new(
            "a role name is empty (a role name must be non-empty; an identity without roles \
             has an empty roles list, docs/PROTOCOL.md §4)",
        )
    }

    /// The user field's value.
    pub fn user_value(&self) -> &HeaderValue {
        &self.user
    }

    /// The roles field's value; `None` when there are no roles.
    pub fn roles_value(&self) -> Option<&HeaderValue> {
        self.roles.as_ref()
    }

    /// The two values, moved out.
    pub(crate) fn into_values(self) -> (HeaderValue, Option<HeaderValue>) {
        (self.user, self.roles)
    }

    /// The user name, decoded.
    pub fn user(&self) -> Option<CompactString> {
        decode_value(self.user.to_str().ok()?)
    }

    /// The identity, decoded; `None` for one with an empty name (whose roles value may read as
    /// "no roles" though a role was given).
    pub fn decode(&self) -> Option<Identity> {
        if self.has_empty_name {
            return None;
        }
        Some(Identity {
            user: self.user()?,
            roles: match &self.roles {
                Some(roles) => decode_roles(roles.to_str().ok()?)?,
                None => Vec::new(),
            },
        })
    }
}

impl fmt::Debug for EncodedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedIdentity")
            .field("user", &self.user)
            .field("roles", &self.roles)
            .finish()
    }
}

/// An encoder's output as a field value: only unreserved characters and `%XX` (and `,`
/// between roles), all visible ASCII, so the conversion cannot fail; an empty value stands in
/// if it ever did.
fn encoded_header_value(encoded: String) -> HeaderValue {
    HeaderValue::try_from(encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether `value` is the canonical percent-encoding of some non-empty UTF-8 text: what
/// [`decode_value`] accepts.
fn is_canonical(value: &[u8]) -> bool {
    // Nothing encoded (most names and roles): canonical when every byte is unreserved.
    // Anything else (a name outside ASCII, a role with a comma, or garbage) is decoded to be
    // sure of the UTF-8; rare, so the allocation does not matter.
    !value.is_empty()
        && (value.iter().all(|&b| is_unreserved(b))
            || std::str::from_utf8(value).is_ok_and(|text| decode_value(text).is_some()))
}

/// Whether `value` is a roles field [`decode_roles`] accepts: empty (no roles), or
/// [`is_canonical`] roles separated by single commas (none empty: no comma first, last or
/// next to another).
fn roles_are_canonical(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    // One pass for the usual value (unreserved bytes and commas), empty roles caught on the
    // way; a role with something encoded is checked role by role.
    let mut role_len = 0usize;
    let mut plain = true;
    for &b in value {
        if b == b',' {
            if role_len == 0 {
                return false;
            }
            role_len = 0;
        } else {
            plain &= is_unreserved(b);
            role_len += 1;
        }
    }
    role_len != 0 && (plain || value.split(|&b| b == b',').all(is_canonical))
}

/// Percent-encodes one identity value.
pub fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(encoded_len(value));
    out.extend(utf8_percent_encode(value, IDENTITY_SET));
    out
}

/// The length of a value once percent-encoded, so the header value is allocated once at its
/// exact size.
fn encoded_len(value: &str) -> usize {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                1
            } else {
                3
            }
        })
        .sum()
}

/// Encodes roles as the comma-separated header value.
pub fn encode_roles<S: AsRef<str>>(roles: &[S]) -> String {
    let mut out = String::with_capacity(
        roles.iter().map(|r| encoded_len(r.as_ref())).sum::<usize>()
            + roles.len().saturating_sub(1),
    );
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.extend(utf8_percent_encode(role.as_ref(), IDENTITY_SET));
    }
    out
}

/// Decodes one identity value (a user name or one role). Only canonical encodings of
/// non-empty text are accepted: characters outside the unreserved set must be percent-encoded,
/// the bytes must be UTF-8, and the value must not be empty (no user or role has an empty name,
/// docs/PROTOCOL.md §4).
pub fn decode_value(value: &str) -> Option<CompactString> {
    // Nothing encoded (most role names): canonical when non-empty and every byte is
    // unreserved, and then the text is its own decoding, already known to be UTF-8.
    if !value.as_bytes().contains(&b'%') {
        return (!value.is_empty() && value.bytes().all(is_unreserved))
            .then(|| CompactString::from(value));
    }
    // One pass: check and decode together, into a buffer of the value's length (decoding
    // only shrinks), then check UTF-8 once. On the stack for the usual lengths: an e-mail
    // address as a user name (`alice%40example.com`) then costs no allocation, since its
    // decoding is held inline in the `CompactString`.
    const ON_STACK: usize = 96;
    if value.len() <= ON_STACK {
        let mut buffer = [0u8; ON_STACK];
        let len = percent_decode_into(value, &mut buffer)?;
        return CompactString::from_utf8(buffer.get(..len)?).ok();
    }
    let mut buffer = vec![0u8; value.len()];
    let len = percent_decode_into(value, &mut buffer)?;
    buffer.truncate(len);
    CompactString::from_utf8(buffer).ok()
}

/// Decodes `value` into `out` (at least `value.len()` long); the decoded length, or `None` for
/// a byte outside the unreserved set left bare or a `%` not followed by two hex digits.
fn percent_decode_into(value: &str, out: &mut [u8]) -> Option<usize> {
    let mut len = 0;
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        let decoded = match b {
            b'%' => {
                let high = hex_value(bytes.next()?)?;
                let low = hex_value(bytes.next()?)?;
                high << 4 | low
            }
            b if is_unreserved(b) => b,
            _ => return None,
        };
        *out.get_mut(len)? = decoded;
        len += 1;
    }
    Some(len)
}

/// A byte identity values carry as it is (RFC 3986 unreserved).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The value of one hexadecimal digit (either case).
fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Decodes the roles header value: an empty value means no roles; otherwise the value is split
/// at every `,` and each role decoded by [`decode_value`], so an empty role (`a,,b`, `,a`, `a,`,
/// `,`) makes the whole value invalid.
pub fn decode_roles(value: &str) -> Option<Vec<CompactString>> {
    if value.is_empty() {
        return Some(Vec::new());
    }
    value.split(',').map(decode_value).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_unicode() {
        for name in [
            "alice",
            "Zoë Ünïcødé",
            "名前",
            "a,b;c=d\"e\\f",
            "🦀 crab",
            "%41",
        ] {
            let enc = encode_value(name);
            assert!(enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(decode_value(&enc).as_deref(), Some(name));
        }
        let roles = vec!["admin".to_owned(), "a,b".to_owned(), "ü".to_owned()];
        assert_eq!(decode_roles(&encode_roles(&roles)).unwrap(), roles);
        assert_eq!(decode_roles(""), Some(Vec::new()));
    }

    /// No user or role has an empty name: the decoders refuse one, wherever it sits, and an
    /// empty roles field (no roles) stays distinct from a list with an empty role.
    #[test]
    fn empty_names_are_refused() {
        assert_eq!(decode_value(""), None);
        for roles in [",", "a,", ",a", "a,,b", ",,", "a%2C,", "%C3%BC,,b"] {
            assert_eq!(decode_roles(roles), None, "{roles:?}");
            assert!(!roles_are_canonical(roles.as_bytes()), "{roles:?}");
        }
        assert!(!is_canonical(b""));
        assert!(roles_are_canonical(b""));
        assert!(roles_are_canonical(b"a,b%2C,c"));
        assert_eq!(decode_roles("a,b%2C,c").unwrap(), ["a", "b,", "c"]);

        let ok = || Bytes::from_static(b"admin");
        assert!(EncodedIdentity::from_encoded(Bytes::new(), ok()).is_none());
        for roles in [&b","[..], b"a,", b",a", b"a,,b", b"%C3%BC,"] {
            assert!(EncodedIdentity::from_encoded(ok(), Bytes::from_static(roles)).is_none());
        }

        for identity in [
            Identity::new("", Vec::<String>::new()),
            Identity::new("", ["r"]),
            Identity::new("u", [""]),
            Identity::new("u", ["a", "", "b"]),
            Identity::new("u", ["", ""]),
            Identity::default(),
        ] {
            assert!(identity.validate().is_err(), "{identity:?}");
            let encoded = EncodedIdentity::new(&identity);
            assert!(encoded.check_signable().is_err(), "{identity:?}");
            assert_eq!(encoded.decode(), None, "{identity:?}");
        }
        let message = Identity::new("u", ["a", "", "b"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("role 2 of 3 is empty"), "{message}");
        let message = Identity::new("", ["a"]).validate().unwrap_err().to_string();
        assert!(message.contains("user name is empty"), "{message}");
        assert!(Identity::new("u", Vec::<String>::new()).validate().is_ok());
    }

    #[test]
    fn encoded_identity_matches_the_encoders_and_decodes_back() {
        for identity in [
            Identity::new("alice", ["admin"]),
            Identity::new("Zoë Ünïcødé", ["a,b", "ü", ","]),
            Identity::new("u", Vec::<String>::new()),
            Identity::new("%41 🦀", ["r"]),
        ] {
            let encoded = EncodedIdentity::new(&identity);
            assert!(encoded.check_signable().is_ok());
            assert_eq!(encoded.user_value(), encode_value(&identity.user).as_str());
            match encoded.roles_value() {
                Some(roles) => assert_eq!(roles, encode_roles(&identity.roles).as_str()),
                None => assert!(identity.roles.is_empty()),
            }
            assert_eq!(encoded.decode().as_ref(), Some(&identity));
            // The same values, shared: equal to what `new` builds.
            let from_values = EncodedIdentity::from_encoded(
                Bytes::from(encode_value(&identity.user)),
                Bytes::from(encode_roles(&identity.roles)),
            );
            assert_eq!(from_values.as_ref(), Some(&encoded));
        }
    }

    #[test]
    fn encoded_identity_refuses_what_decoding_would_refuse() {
        let ok = || Bytes::from_static(b"admin");
        for bad in [
            &b"a b"[..],
            b"%zz",
            b"%f",
            b"%ff",
            b"%c3",
            b"a+b",
            b"a:b",
            b"\xc3\xa9",
            b"line\nbreak",
        ] {
            let bad = Bytes::copy_from_slice(bad);
            assert!(EncodedIdentity::from_encoded(bad.clone(), ok()).is_none());
            assert!(EncodedIdentity::from_encoded(ok(), bad.clone()).is_none());
            let roles = [&b"r1,"[..], &bad].concat();
            assert!(EncodedIdentity::from_encoded(ok(), Bytes::from(roles)).is_none());
        }
        // Percent-encoded unreserved characters decode (as `decode_value` accepts them).
        let lenient = EncodedIdentity::from_encoded(Bytes::from_static(b"%41b"), ok()).unwrap();
        assert_eq!(lenient.user().as_deref(), Some("Ab"));
        // Empty roles: no roles field.
        let none = EncodedIdentity::from_encoded(ok(), Bytes::new()).unwrap();
        assert!(none.roles_value().is_none());
        assert_eq!(none.decode().unwrap().roles, Vec::<String>::new());
    }

    #[test]
    fn rejects_non_canonical() {
        assert_eq!(decode_value("a b"), None);
        assert_eq!(decode_value("%zz"), None);
        assert_eq!(decode_value("%f"), None);
        assert_eq!(decode_value("%ff"), None); // not UTF-8
        assert_eq!(decode_value("a+b"), None);
    }
}

//! The identity the proxy forwards: a user name and roles, carried in two header fields whose
//! values are percent-encoded UTF-8 (every byte outside `A-Z a-z 0-9 - . _ ~` encoded), so any
//! Unicode name survives a header field and round-trips exactly.

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

const IDENTITY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A user and their roles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The user name (any Unicode).
    pub user: String,
    /// Role names (any Unicode), in order.
    pub roles: Vec<String>,
}

impl Identity {
    /// An identity with the given user and roles.
    pub fn new(
        user: impl Into<String>,
        roles: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Identity {
            user: user.into(),
            roles: roles.into_iter().map(Into::into).collect(),
        }
    }
}

/// An identity in its header form: the user's and the roles' values already percent-encoded,
/// as [`HeaderValue`]s that are cheap to clone.
///
/// What a signer that forwards the same identity on every request keeps (the proxy's session
/// store holds identities encoded), so that signing neither decodes nor re-encodes it:
/// [`crate::core::Signer::sign_encoded`]. [`Signer::sign`](crate::core::Signer::sign) with an
/// [`Identity`] encodes it into one of these first.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedIdentity {
    user: HeaderValue,
    /// `None` when there are no roles (the roles field is then not sent).
    roles: Option<HeaderValue>,
}

impl EncodedIdentity {
    /// Encodes `identity`.
    pub fn new(identity: &Identity) -> EncodedIdentity {
        EncodedIdentity {
            user: encoded_header_value(encode_value(&identity.user)),
            roles: (!identity.roles.is_empty())
                .then(|| encoded_header_value(encode_roles(&identity.roles))),
        }
    }

    /// From values already encoded (the roles as their comma-separated field value; empty: no
    /// roles), shared rather than copied. `None` unless both are what [`EncodedIdentity::new`]
    /// would produce for some identity: canonical percent-encodings of UTF-8 text (so
    /// [`EncodedIdentity::decode`] cannot fail).
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
        })
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
    pub fn user(&self) -> Option<String> {
        decode_value(self.user.to_str().ok()?)
    }

    /// The identity, decoded.
    pub fn decode(&self) -> Option<Identity> {
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

/// Whether `value` is the canonical percent-encoding of some UTF-8 text: what
/// [`decode_value`] accepts.
fn is_canonical(value: &[u8]) -> bool {
    // Nothing encoded (most names and roles): canonical when every byte is unreserved.
    // Anything else (a name outside ASCII, a role with a comma, or garbage) is decoded to be
    // sure of the UTF-8; rare, so the allocation does not matter.
    value.iter().all(|&b| is_unreserved(b))
        || std::str::from_utf8(value).is_ok_and(|text| decode_value(text).is_some())
}

/// [`is_canonical`] for each of the comma-separated roles.
fn roles_are_canonical(value: &[u8]) -> bool {
    value.iter().all(|&b| is_unreserved(b) || b == b',')
        || value.split(|&b| b == b',').all(is_canonical)
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
pub fn encode_roles(roles: &[String]) -> String {
    let mut out = String::with_capacity(
        roles.iter().map(|r| encoded_len(r)).sum::<usize>() + roles.len().saturating_sub(1),
    );
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.extend(utf8_percent_encode(role, IDENTITY_SET));
    }
    out
}

/// Decodes one identity value. Only canonical encodings are accepted: characters outside the
/// unreserved set must be percent-encoded, and the bytes must be UTF-8.
pub fn decode_value(value: &str) -> Option<String> {
    // Nothing encoded (most role names): canonical when every byte is unreserved, and then the
    // text is its own decoding, already known to be UTF-8.
    if !value.as_bytes().contains(&b'%') {
        return value.bytes().all(is_unreserved).then(|| value.to_owned());
    }
    // One pass: check and decode together, into a buffer of the right size (decoding only
    // shrinks), then check UTF-8 once.
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let high = hex_value(bytes.next()?)?;
                let low = hex_value(bytes.next()?)?;
                out.push(high << 4 | low);
            }
            b if is_unreserved(b) => out.push(b),
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
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

/// Decodes the roles header value (an empty value means no roles).
pub fn decode_roles(value: &str) -> Option<Vec<String>> {
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
            "",
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
    }

    #[test]
    fn encoded_identity_matches_the_encoders_and_decodes_back() {
        for identity in [
            Identity::new("alice", ["admin"]),
            Identity::new("Zoë Ünïcødé", ["a,b", "ü", ""]),
            Identity::new("", Vec::<String>::new()),
            Identity::new("%41 🦀", ["r"]),
        ] {
            let encoded = EncodedIdentity::new(&identity);
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

//! The identity the proxy forwards: a user name and roles, carried in two header fields whose
//! values are percent-encoded UTF-8 (every byte outside `A-Z a-z 0-9 - . _ ~` encoded), so any
//! Unicode name survives a header field and round-trips exactly.

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
    fn rejects_non_canonical() {
        assert_eq!(decode_value("a b"), None);
        assert_eq!(decode_value("%zz"), None);
        assert_eq!(decode_value("%f"), None);
        assert_eq!(decode_value("%ff"), None); // not UTF-8
        assert_eq!(decode_value("a+b"), None);
    }
}

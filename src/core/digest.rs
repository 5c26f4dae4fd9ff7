//! RFC 9530 `Content-Digest`: signers send `sha-256`; verifiers accept `sha-256` and `sha-512`.

use sha2::{Digest as _, Sha256, Sha512};
use subtle::ConstantTimeEq as _;

use super::error::{Reason, VerifyError};
use super::sf_fast::{self, Bare, Entry};

/// SHA-256 of no bytes at all. A constant of the hash function, not a cache of request data:
/// bodiless requests (most GETs) need no hashing to sign or to verify.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The `Content-Digest` value of an empty body (RFC 9530's example): what a signer sends for a
/// bodiless request, as a static header value.
pub(crate) const EMPTY_CONTENT_DIGEST: &str =
    "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:";

/// SHA-256 of `body`, the empty body's from the constant.
fn sha256(body: &[u8]) -> [u8; 32] {
    if body.is_empty() {
        EMPTY_SHA256
    } else {
        Sha256::digest(body).into()
    }
}

/// The `Content-Digest` field value a signer sends for `body`: `sha-256=:<base64>:`.
pub fn content_digest_sha256(body: &[u8]) -> String {
    if body.is_empty() {
        return EMPTY_CONTENT_DIGEST.to_owned();
    }
    let digest = sha256(body);
    // Exact capacity ("sha-256=:", 44 base64 characters, ":"): a full buffer becomes a header
    // value's storage without another allocation.
    let mut out = String::with_capacity(9 + 44 + 1);
    out.push_str("sha-256=:");
    sf_fast::push_base64(
        &mut out,
        &base64::engine::general_purpose::STANDARD,
        &digest,
    );
    out.push(':');
    out
}

/// Constant-time equality of a computed digest or MAC with received bytes: `subtle`'s
/// comparison of each 64-bit word (each byte for a length that is not a multiple of 8), the
/// results combined without branching. Different lengths are unequal (lengths are public).
/// Why words: `subtle` compares a byte slice one byte at a time through an optimisation
/// barrier per byte, several times the cost of the rest of the check for a 32-byte MAC.
pub(crate) fn ct_eq(computed: &[u8], received: &[u8]) -> bool {
    if computed.len() != received.len() {
        return false;
    }
    if computed.len() % 8 != 0 {
        return bool::from(computed.ct_eq(received));
    }
    let word = |chunk: &[u8]| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        u64::from_ne_bytes(bytes)
    };
    let mut equal = subtle::Choice::from(1);
    for (a, b) in computed.chunks_exact(8).zip(received.chunks_exact(8)) {
        equal &= word(a).ct_eq(&word(b));
    }
    bool::from(equal)
}

/// A parsed `Content-Digest`: the members this library can check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDigest {
    sha256: Option<DigestBytes>,
    sha512: Option<DigestBytes>,
}

/// A received digest value, held inline (no allocation per request).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DigestBytes {
    /// The received length; longer than `buf` means "matches no digest".
    len: usize,
    buf: [u8; sf_fast::MAX_INLINE_BYTES],
}

impl DigestBytes {
    fn new(bytes: &[u8]) -> Self {
        let mut buf = [0u8; sf_fast::MAX_INLINE_BYTES];
        if let Some(dst) = buf.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        DigestBytes {
            len: bytes.len(),
            buf,
        }
    }

    /// Constant-time equality with a computed digest.
    fn matches(&self, computed: &[u8]) -> bool {
        match self.buf.get(..self.len) {
            Some(want) => ct_eq(computed, want),
            None => false,
        }
    }
}

impl ExpectedDigest {
    /// Parses the joined field value. No supported algorithm → `missing_digest`; not a valid
    /// dictionary, or a supported member that is not a byte sequence → `malformed_signature`.
    pub fn parse(value: &[u8]) -> Result<Self, VerifyError> {
        Self::parse_input(value, None)
    }

    /// [`Self::parse`] of a value the caller already holds as checked text (a joined field),
    /// which spares the fast path its UTF-8 check.
    pub(crate) fn parse_str(value: &str) -> Result<Self, VerifyError> {
        Self::parse_input(value.as_bytes(), Some(value))
    }

    fn parse_input(value: &[u8], text: Option<&str>) -> Result<Self, VerifyError> {
        // The signer's exact shape (one `sha-256` member); else the scan (nothing
        // materialised, digests decoded in place); the parser when that declines. Same checks,
        // in the same order, whichever decides.
        let mut scanned = [sf_fast::ScannedBytes::default(); 2];
        if let Some(text) = text {
            let mut buf = [0; sf_fast::MAX_INLINE_BYTES];
            if let Some(len) = sf_fast::match_byte_member(text, "sha-256", &mut buf) {
                return Self::checked(Some(DigestBytes { len, buf }), None);
            }
            if sf_fast::scan_byte_members(text, &["sha-256", "sha-512"], &mut scanned).is_some() {
                let [sha256, sha512] = scanned;
                let problem = |m: &sf_fast::ScannedBytes| match m.kind {
                    sf_fast::ScannedKind::NotBytes => {
                        Some("Content-Digest member is not a byte sequence")
                    }
                    sf_fast::ScannedKind::InnerList => {
                        Some("Content-Digest member is an inner list")
                    }
                    _ => None,
                };
                let digest = |m: &sf_fast::ScannedBytes| {
                    (m.kind == sf_fast::ScannedKind::Bytes).then(|| DigestBytes::new(m.as_slice()))
                };
                // The parser reports the first malformed supported member in field order,
                // which the scan does not record: two malformed members are left to it.
                match (problem(&sha256), problem(&sha512)) {
                    (Some(_), Some(_)) => {}
                    (Some(problem), None) | (None, Some(problem)) => {
                        return Err(VerifyError::new(Reason::MalformedSignature, problem))
                    }
                    (None, None) => return Self::checked(digest(&sha256), digest(&sha512)),
                }
            }
        }
        #[derive(Default)]
        struct Fold {
            sha256: Option<DigestBytes>,
            sha512: Option<DigestBytes>,
            // The first malformed supported member, reported after the parse succeeds.
            error: Option<&'static str>,
        }
        let mut fallback = None;
        let mut member = |acc: &mut Fold, alg: &str, entry: Entry<'_>| {
            if acc.error.is_some() {
                return;
            }
            let slot = match alg {
                "sha-256" => &mut acc.sha256,
                "sha-512" => &mut acc.sha512,
                _ => return,
            };
            match entry {
                Entry::Item(item) => match &item.bare {
                    Bare::ByteSeq(bytes) => *slot = Some(DigestBytes::new(bytes.as_slice())),
                    _ => acc.error = Some("Content-Digest member is not a byte sequence"),
                },
                Entry::InnerList(_) => acc.error = Some("Content-Digest member is an inner list"),
            }
        };
        let fold = match text {
            Some(text) => sf_fast::fold_or_fallback_str(text, &mut fallback, &mut member),
            None => sf_fast::fold_or_fallback(value, &mut fallback, &mut member),
        }
        .map_err(|_| {
            VerifyError::new(
                Reason::MalformedSignature,
                "Content-Digest is not a valid dictionary",
            )
        })?;
        if let Some(problem) = fold.error {
            return Err(VerifyError::new(Reason::MalformedSignature, problem));
        }
        Self::checked(fold.sha256, fold.sha512)
    }

    /// The digests found; at least one is required.
    fn checked(
        sha256: Option<DigestBytes>,
        sha512: Option<DigestBytes>,
    ) -> Result<Self, VerifyError> {
        let expected = ExpectedDigest { sha256, sha512 };
        if expected.sha256.is_none() && expected.sha512.is_none() {
            return Err(VerifyError::new(
                Reason::MissingDigest,
                "Content-Digest has no sha-256 or sha-512 member",
            ));
        }
        Ok(expected)
    }

    /// Recomputes every supported digest over the received bytes; all present must match.
    pub fn check(&self, body: &[u8]) -> Result<(), VerifyError> {
        if let Some(want) = &self.sha256 {
            if !want.matches(&sha256(body)) {
                return Err(VerifyError::new(
                    Reason::DigestMismatch,
                    "sha-256 digest mismatch",
                ));
            }
        }
        if let Some(want) = &self.sha512 {
            if !want.matches(Sha512::digest(body).as_slice()) {
                return Err(VerifyError::new(
                    Reason::DigestMismatch,
                    "sha-512 digest mismatch",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn empty_body_constants_are_the_hash_of_nothing() {
        assert_eq!(EMPTY_SHA256.as_slice(), Sha256::digest(b"").as_slice());
        let computed = format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b""))
        );
        assert_eq!(EMPTY_CONTENT_DIGEST, computed);
        assert_eq!(content_digest_sha256(b""), computed);
        // The constant path still rejects a wrong digest for an empty body, and accepts the
        // right one; a one-byte body goes through the hash.
        let expected = ExpectedDigest::parse(EMPTY_CONTENT_DIGEST.as_bytes()).unwrap();
        assert!(expected.check(b"").is_ok());
        assert_eq!(
            expected.check(b"x").unwrap_err().reason(),
            Reason::DigestMismatch
        );
        let for_x = ExpectedDigest::parse(content_digest_sha256(b"x").as_bytes()).unwrap();
        assert!(for_x.check(b"x").is_ok());
        assert_eq!(
            for_x.check(b"").unwrap_err().reason(),
            Reason::DigestMismatch
        );
    }

    #[test]
    fn constant_time_equality() {
        let a: Vec<u8> = (0..64).collect();
        for len in [0, 1, 7, 8, 31, 32, 33, 64] {
            let a = &a[..len];
            assert!(ct_eq(a, a), "{len}");
            for i in 0..len {
                let mut b = a.to_vec();
                b[i] ^= 0x01;
                assert!(!ct_eq(a, &b), "{len} {i}");
                b[i] ^= 0x81;
                assert!(!ct_eq(a, &b), "{len} {i}");
            }
            let longer = [a, &[0][..]].concat();
            assert!(!ct_eq(a, &longer), "{len}");
            assert!(!ct_eq(&longer, a), "{len}");
        }
    }

    #[test]
    fn rfc9530_vectors() {
        assert_eq!(
            content_digest_sha256(br#"{"hello": "world"}"#),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
        assert_eq!(
            content_digest_sha256(b""),
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
        );
    }

    #[test]
    fn sha512_accepted_and_checked() {
        let body = br#"{"hello": "world"}"#;
        let d = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(body));
        let e = ExpectedDigest::parse(format!("sha-512=:{d}:").as_bytes()).unwrap();
        e.check(body).unwrap();
        assert_eq!(e.check(b"x").unwrap_err().reason(), Reason::DigestMismatch);
    }

    #[test]
    fn unsupported_only_is_missing() {
        let e = ExpectedDigest::parse(b"md5=:AAAA:").unwrap_err();
        assert_eq!(e.reason(), Reason::MissingDigest);
        let e = ExpectedDigest::parse(b"sha-256=\"x\"").unwrap_err();
        assert_eq!(e.reason(), Reason::MalformedSignature);
        let e = ExpectedDigest::parse(b"(((").unwrap_err();
        assert_eq!(e.reason(), Reason::MalformedSignature);
    }
}

//! Errors of the signing core.
//!
//! Verification failures carry a [`Reason`]: a stable, machine-readable code that HTTP clients
//! see as `{"error":"<reason>"}` and gRPC clients as the message of their status. The codes are
//! part of the protocol (docs/PROTOCOL.md) and never change meaning. The human-readable detail
//! is for logs only and is never sent to clients.

use std::borrow::Cow;
use std::fmt;

/// Why a request was rejected. The string form (`as_str`) is the stable wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// No `Signature-Input`/`Signature` member selected by the policy.
    MissingSignature,
    /// The signature headers or a covered component could not be parsed or built.
    MalformedSignature,
    /// `keyid` names no key, or a retired one, or is not in the form of the key's rotation
    /// (an epoch on a static key, none on a rotating one, or the wrong epoch).
    UnknownKey,
    /// `alg` is present and is not `hmac-sha256`.
    UnsupportedAlgorithm,
    /// `created` is older than the window (plus skew), or `expires` has passed; or, from the
    /// verify layer, the window closed while the request's body was still arriving, or before
    /// an asynchronous replay cache (Redis) answered.
    Expired,
    /// `created` lies in the future beyond the allowed skew.
    NotYetValid,
    /// The signature does not cover what the policy requires.
    InsufficientCoverage,
    /// The MAC does not match.
    BadSignature,
    /// The body is not covered by a `Content-Digest` the policy accepts.
    MissingDigest,
    /// The `Content-Digest` does not match the received body.
    DigestMismatch,
    /// The nonce was seen before.
    Replayed,
    /// The body exceeds the configured limit.
    BodyTooLarge,
    /// The replay cache cannot record the nonce (full or unreachable): fail closed.
    ReplayCacheUnavailable,
    /// The verify layer is holding as many request bodies at once as its
    /// `max_body_memory` allows: the body was refused before it was read whole (before any
    /// byte of it when its `Content-Length` did not fit). Nothing was recorded; the same
    /// request may be sent again (`Retry-After: 1`).
    BodyMemoryLimit,
}

impl Reason {
    /// Every reason, in documentation order.
    pub const ALL: [Reason; 14] = [
        Reason::MissingSignature,
        Reason::MalformedSignature,
        Reason::UnknownKey,
        Reason::UnsupportedAlgorithm,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::InsufficientCoverage,
        Reason::BadSignature,
        Reason::MissingDigest,
        Reason::DigestMismatch,
        Reason::Replayed,
        Reason::BodyTooLarge,
        Reason::ReplayCacheUnavailable,
        Reason::BodyMemoryLimit,
    ];

    /// The stable wire code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MissingSignature => "missing_signature",
            Reason::MalformedSignature => "malformed_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::UnsupportedAlgorithm => "unsupported_algorithm",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::InsufficientCoverage => "insufficient_coverage",
            Reason::BadSignature => "bad_signature",
            Reason::MissingDigest => "missing_digest",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::Replayed => "replayed",
            Reason::BodyTooLarge => "body_too_large",
            Reason::ReplayCacheUnavailable => "replay_cache_unavailable",
            Reason::BodyMemoryLimit => "body_memory_limit",
        }
    }

    /// The HTTP status a verifier answers with.
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::BodyTooLarge => 413,
            Reason::ReplayCacheUnavailable | Reason::BodyMemoryLimit => 503,
            Reason::MissingSignature
            | Reason::MalformedSignature
            | Reason::UnknownKey
            | Reason::UnsupportedAlgorithm
            | Reason::Expired
            | Reason::NotYetValid
            | Reason::InsufficientCoverage
            | Reason::BadSignature
            | Reason::MissingDigest
            | Reason::DigestMismatch
            | Reason::Replayed => 401,
        }
    }

    /// The gRPC status code a verifier answers a gRPC request with (the numeric codes of
    /// gRPC's `doc/statuscodes.md`): 16 `UNAUTHENTICATED` for every 401 reason, 8
    /// `RESOURCE_EXHAUSTED` for `body_too_large` (413), 14 `UNAVAILABLE` for the 503 reasons,
    /// `replay_cache_unavailable` and `body_memory_limit` (the code gRPC documents as worth
    /// retrying, as the 503's `Retry-After` says). The one mapping of reasons to gRPC: the
    /// tower layer's gRPC rejections (`grpc-status`, with the wire code as `grpc-message`)
    /// come from here.
    pub const fn grpc_status(self) -> u8 {
        match self {
            Reason::BodyTooLarge => 8,
            Reason::ReplayCacheUnavailable | Reason::BodyMemoryLimit => 14,
            Reason::MissingSignature
            | Reason::MalformedSignature
            | Reason::UnknownKey
            | Reason::UnsupportedAlgorithm
            | Reason::Expired
            | Reason::NotYetValid
            | Reason::InsufficientCoverage
            | Reason::BadSignature
            | Reason::MissingDigest
            | Reason::DigestMismatch
            | Reason::Replayed => 16,
        }
    }

    /// Parses a wire code back (for clients and tests).
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verification failure: a stable [`Reason`] plus a detail for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    reason: Reason,
    detail: Cow<'static, str>,
}

impl VerifyError {
    pub(crate) fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Self {
        VerifyError {
            reason,
            detail: detail.into(),
        }
    }

    /// The stable reason code.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// What exactly went wrong (for logs; may name header fields, never secrets).
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl From<Reason> for VerifyError {
    fn from(reason: Reason) -> Self {
        VerifyError::new(reason, reason.as_str())
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for VerifyError {}

/// Why a signature base could not be built from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseError {
    kind: BaseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BaseErrorKind {
    DuplicateComponent(String),
    UnknownDerivedComponent(String),
    MissingField(String),
    InvalidValue(String),
    UnsupportedParameter {
        component: String,
        parameter: String,
    },
    MissingParameter {
        component: String,
        parameter: &'static str,
    },
    MissingDictionaryKey {
        component: String,
        key: String,
    },
    InvalidStructuredField(String),
    /// A field covered with `;key` is longer than a verifier parses
    /// ([`MAX_SIGNATURE_FIELD_BYTES`](super::MAX_SIGNATURE_FIELD_BYTES)).
    FieldTooLong {
        field: String,
        len: usize,
        limit: usize,
    },
    MalformedComponentId(String),
    MissingAuthority,
    /// The authority (the URI's, else `Host`) is not a `host[:port]` (docs/PROTOCOL.md §3).
    InvalidAuthority,
    /// The authority comes from `Host` and the request has more than one `Host` line.
    DuplicateHost,
    /// The request has a URI authority and a `Host` field naming another one.
    HostDiffersFromAuthority,
    MissingQueryParam(String),
}

impl BaseError {
    pub(crate) fn new(kind: BaseErrorKind) -> Self {
        BaseError { kind }
    }
}

impl fmt::Display for BaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BaseErrorKind::DuplicateComponent(c) => write!(f, "component {c} is covered twice"),
            BaseErrorKind::UnknownDerivedComponent(c) => {
                write!(
                    f,
                    "unsupported derived component {c} (an @-name is never read as a header field)"
                )
            }
            BaseErrorKind::MissingField(c) => write!(f, "covered field {c} is absent"),
            BaseErrorKind::InvalidValue(c) => {
                write!(
                    f,
                    "value of {c} holds non-ASCII, control or newline characters"
                )
            }
            BaseErrorKind::UnsupportedParameter {
                component,
                parameter,
            } => write!(f, "unsupported parameter ;{parameter} on {component}"),
            BaseErrorKind::MissingParameter {
                component,
                parameter,
            } => write!(f, "{component} needs the ;{parameter} parameter"),
            BaseErrorKind::MissingDictionaryKey { component, key } => {
                write!(f, "dictionary field {component} has no member {key:?}")
            }
            BaseErrorKind::InvalidStructuredField(c) => {
                write!(f, "field {c} is not a valid structured dictionary")
            }
            BaseErrorKind::FieldTooLong { field, len, limit } => write!(
                f,
                "field {field} is {len} bytes long, more than the {limit} a verifier parses as \
                 a dictionary (for ;key)"
            ),
            BaseErrorKind::MalformedComponentId(c) => write!(f, "malformed component id {c}"),
            BaseErrorKind::MissingAuthority => f.write_str("request has no Host or :authority"),
            BaseErrorKind::InvalidAuthority => f.write_str(
                "the authority (the URI's, else the Host header) is not host[:port]: it is \
                 empty, or holds a space, a control or non-ASCII character, `/`, `?` or `#`, a \
                 second `:` outside an IPv6 literal's brackets, a lone bracket, or no host \
                 before its port",
            ),
            BaseErrorKind::DuplicateHost => f.write_str(
                "request has more than one Host field line (invalid per RFC 9112 §3.2: which \
                 one names the authority is ambiguous)",
            ),
            BaseErrorKind::HostDiffersFromAuthority => f.write_str(
                "the Host field names another authority than the request URI's (:authority or \
                 an absolute-form target): one of them is unsigned",
            ),
            BaseErrorKind::MissingQueryParam(n) => write!(f, "query parameter {n:?} is absent"),
        }
    }
}

impl std::error::Error for BaseError {}

impl From<BaseError> for VerifyError {
    fn from(e: BaseError) -> Self {
        VerifyError::new(Reason::MalformedSignature, e.to_string())
    }
}

/// Why a request could not be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignError {
    detail: Cow<'static, str>,
}

impl SignError {
    pub(crate) fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        SignError {
            detail: detail.into(),
        }
    }
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot sign request: {}", self.detail)
    }
}

impl std::error::Error for SignError {}

impl From<BaseError> for SignError {
    fn from(e: BaseError) -> Self {
        SignError::new(e.to_string())
    }
}

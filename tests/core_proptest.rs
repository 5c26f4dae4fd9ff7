//! Property tests of the countersign profile: whatever the method, path, query, body, user name
//! and roles, a signed request verifies and yields the identity it was signed with; changing any
//! covered part afterwards fails with the reason that part maps to. An identity with an empty
//! user or role name is refused by the signer and, when signed by hand, rejected alike by every
//! reader of the verifier.

use countersign::core::{
    content_digest_sha256, encode_roles, encode_value, EncodedIdentity, Identity, IdentityHeaders,
    Keyring, KeyringHandle, Nonce, Policy, Reason, Secret, Signer, SignerConfig, Verifier,
};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000;

fn handle() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(vec![0x5a; 32]).unwrap()).unwrap())
}

/// Standard methods and arbitrary extension tokens.
fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("PUT".to_owned()),
        Just("PATCH".to_owned()),
        Just("DELETE".to_owned()),
        Just("HEAD".to_owned()),
        Just("OPTIONS".to_owned()),
        "[A-Z][A-Z0-9!#$%&'*+.^_`|~-]{0,11}",
    ]
}

/// An origin-form path: segments of unreserved and sub-delim characters and percent-escapes.
fn path() -> impl Strategy<Value = String> {
    proptest::collection::vec("([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-F]{2}){0,10}", 0..5)
        .prop_map(|segments| format!("/{}", segments.join("/")))
}

/// A query string (without `?`), or none.
fn query() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("([A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-F]{2}){0,40}")
}

/// Host names, in any case, with or without a port (including the default one).
fn authority() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?(\\.[A-Za-z]{2,6}){0,2}",
        proptest::option::of(prop_oneof![Just(80u16), 1u16..=65535]),
    )
        .prop_map(|(host, port)| match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        })
}

/// Any non-empty Unicode text: a user or role name (docs/PROTOCOL.md §4 forbids empty ones).
fn name() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("non-empty", |r| !r.is_empty())
}

/// Any non-empty Unicode user name and up to three non-empty Unicode roles, or no identity.
fn identity() -> impl Strategy<Value = Option<Identity>> {
    proptest::option::of(
        (name(), proptest::collection::vec(name(), 0..4))
            .prop_map(|(user, roles)| Identity::new(user, roles)),
    )
}

/// An identity with an empty user name, or an empty role at some place among valid ones.
fn identity_with_an_empty_name() -> impl Strategy<Value = Identity> {
    (
        name(),
        proptest::collection::vec(name(), 0..4),
        any::<bool>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(user, mut roles, empty_user, at)| {
            if empty_user {
                Identity::new("", roles)
            } else {
                roles.insert(at.index(roles.len() + 1), String::new());
                Identity::new(user, roles)
            }
        })
}

#[derive(Debug, Clone)]
struct Case {
    method: String,
    path: String,
    query: Option<String>,
    authority: String,
    body: Vec<u8>,
    identity: Option<Identity>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        method(),
        path(),
        query(),
        authority(),
        proptest::collection::vec(any::<u8>(), 0..4096),
        identity(),
    )
        .prop_map(|(method, path, query, authority, body, identity)| Case {
            method,
            path,
            query,
            authority,
            body,
            identity,
        })
}

fn uri(path: &str, query: &Option<String>) -> http::Uri {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
    .parse()
    .unwrap()
}

fn signed(case: &Case) -> Parts {
    let mut parts = http::Request::builder()
        .method(case.method.as_str())
        .uri(uri(&case.path, &case.query))
        .header("host", case.authority.as_str())
        .body(())
        .unwrap()
        .into_parts()
        .0;
    Signer::new(handle(), SignerConfig::default())
        .sign(
            &mut parts,
            &case.body,
            case.identity.as_ref(),
            NOW,
            &Nonce::random(),
        )
        .unwrap();
    parts
}

fn verifier() -> Verifier {
    Verifier::new(handle(), Policy::default())
}

fn rejected(parts: &Parts, body: &[u8]) -> Reason {
    match verifier().verify(parts, body, NOW) {
        Ok(v) => panic!("tampered request verified: {v:?}"),
        Err(e) => e.reason(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn sign_then_verify_round_trips(case in case()) {
        let parts = signed(&case);
        let verified = verifier().verify(&parts, &case.body, NOW).unwrap();
        prop_assert_eq!(verified.identity, case.identity.clone());
        prop_assert_eq!(verified.keyid, "k1");
        prop_assert_eq!(verified.created, NOW);
    }

    #[test]
    fn changed_body_byte_is_digest_mismatch(case in case(), index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        prop_assume!(!case.body.is_empty());
        let parts = signed(&case);
        let mut body = case.body.clone();
        let i = index.index(body.len());
        body[i] ^= flip;
        prop_assert_eq!(rejected(&parts, &body), Reason::DigestMismatch);

        // Recomputing the digest changes a covered field: the MAC fails instead.
        let mut recomputed = parts.clone();
        recomputed.headers.insert(
            "content-digest",
            HeaderValue::from_str(&content_digest_sha256(&body)).unwrap(),
        );
        prop_assert_eq!(rejected(&recomputed, &body), Reason::BadSignature);
    }

    #[test]
    fn appended_or_truncated_body_is_digest_mismatch(case in case(), extra in any::<u8>()) {
        let parts = signed(&case);
        let mut longer = case.body.clone();
        longer.push(extra);
        prop_assert_eq!(rejected(&parts, &longer), Reason::DigestMismatch);
        if let Some((_, shorter)) = case.body.split_last() {
            prop_assert_eq!(rejected(&parts, shorter), Reason::DigestMismatch);
        }
    }

    #[test]
    fn changed_method_is_bad_signature(case in case(), other in method()) {
        prop_assume!(other != case.method);
        let mut parts = signed(&case);
        parts.method = other.parse().unwrap();
        prop_assert_eq!(rejected(&parts, &case.body), Reason::BadSignature);
    }

    #[test]
    fn changed_path_is_bad_signature(case in case(), other in path()) {
        prop_assume!(other != case.path);
        let mut parts = signed(&case);
        parts.uri = uri(&other, &case.query);
        prop_assert_eq!(rejected(&parts, &case.body), Reason::BadSignature);
    }

    #[test]
    fn changed_query_is_bad_signature(case in case(), other in query()) {
        // An absent query and an empty one are the same `@query` ("?") by RFC 9421 §2.2.7.
        let normal = |q: &Option<String>| q.clone().unwrap_or_default();
        prop_assume!(normal(&other) != normal(&case.query));
        let mut parts = signed(&case);
        parts.uri = uri(&case.path, &other);
        prop_assert_eq!(rejected(&parts, &case.body), Reason::BadSignature);
    }

    #[test]
    fn changed_authority_is_bad_signature(case in case(), other in authority()) {
        // Equal after normalisation (case, default port) is the same authority.
        let normal = |a: &str| {
            let a = a.to_ascii_lowercase();
            a.strip_suffix(":80").map(str::to_owned).unwrap_or(a)
        };
        prop_assume!(normal(&other) != normal(&case.authority));
        let mut parts = signed(&case);
        parts.headers.insert("host", HeaderValue::from_str(&other).unwrap());
        prop_assert_eq!(rejected(&parts, &case.body), Reason::BadSignature);
    }

    #[test]
    fn changed_user_is_bad_signature(case in case(), other in any::<String>()) {
        let original = case.identity.as_ref().map(|i| i.user.clone());
        prop_assume!(original.as_deref() != Some(other.as_str()));
        let mut parts = signed(&case);
        parts.headers.insert(
            "x-auth-user",
            HeaderValue::from_str(&encode_value(&other)).unwrap(),
        );
        // Replacing a covered user breaks the MAC; adding one to an anonymous request is an
        // uncovered identity header.
        let expected = if original.is_some() {
            Reason::BadSignature
        } else {
            Reason::InsufficientCoverage
        };
        prop_assert_eq!(rejected(&parts, &case.body), expected);
    }

    /// The signer refuses an empty user or role name, through both entry points, and leaves
    /// the request as it was.
    #[test]
    fn empty_name_is_refused_by_the_signer(case in case(), identity in identity_with_an_empty_name()) {
        // Already signed anonymously: a refused re-signing must not touch its fields either.
        let mut without = case.clone();
        without.identity = None;
        let unsigned = signed(&without);
        let signer = Signer::new(handle(), SignerConfig::default());
        let mut parts = unsigned.clone();
        let nonce = Nonce::random();
        prop_assert!(signer.sign(&mut parts, &case.body, Some(&identity), NOW, &nonce).is_err());
        prop_assert_eq!(&parts.headers, &unsigned.headers);
        let encoded = EncodedIdentity::new(&identity);
        prop_assert!(signer
            .sign_encoded(&mut parts, &case.body, Some(&encoded), NOW, &nonce)
            .is_err());
        prop_assert_eq!(&parts.headers, &unsigned.headers);
        prop_assert!(identity.validate().is_err());
        prop_assert_eq!(encoded.decode(), None);
    }

    /// Identity fields with an empty user or role, signed by hand (covered as plain fields, the
    /// covered list the signer writes): `malformed_signature` after the MAC, from the
    /// exact-shape reader, the scan and the full parser alike.
    #[test]
    fn empty_name_in_signed_fields_is_malformed_on_every_path(
        case in case(),
        identity in identity_with_an_empty_name(),
    ) {
        let config = SignerConfig {
            identity_headers: IdentityHeaders {
                user: HeaderName::from_static("x-unused-user"),
                roles: HeaderName::from_static("x-unused-roles"),
            },
            extra_headers: vec![
                HeaderName::from_static("x-auth-user"),
                HeaderName::from_static("x-auth-roles"),
            ],
            ..SignerConfig::default()
        };
        let mut without = case.clone();
        without.identity = None;
        let mut parts = signed(&without);
        parts.headers.insert("x-auth-user", HeaderValue::from_str(&encode_value(&identity.user)).unwrap());
        // A single empty role encodes to an empty field, which means "no roles": that case is
        // the user's (and legal when the user is not empty).
        let roles = encode_roles(&identity.roles);
        parts.headers.insert("x-auth-roles", HeaderValue::from_str(&roles).unwrap());
        Signer::new(handle(), config)
            .sign(&mut parts, &case.body, None, NOW, &Nonce::random())
            .unwrap();
        let verifier = verifier();
        let reference = verifier.verify_headers_reference(&parts, NOW).map(|v| v.verified().clone());
        if identity.user.is_empty() || !roles.is_empty() {
            let err = reference.clone().unwrap_err();
            prop_assert_eq!(err.reason(), Reason::MalformedSignature, "{}", err.detail());
        } else {
            prop_assert_eq!(identity.roles.len(), 1);
            prop_assert_eq!(reference.clone().unwrap().identity.unwrap().roles, Vec::<String>::new());
        }
        let template = verifier.verify_headers_template(&parts, NOW);
        prop_assert!(template.is_some(), "the exact-shape reader should decide");
        let scanned = verifier.verify_headers_scanned(&parts, NOW);
        prop_assert!(scanned.is_some(), "the scan should decide");
        for answer in [template, scanned].into_iter().flatten() {
            prop_assert_eq!(&answer.map(|v| v.verified().clone()), &reference);
        }
        prop_assert_eq!(
            &verifier.verify_headers(&parts, NOW).map(|v| v.verified().clone()),
            &reference
        );
    }

    #[test]
    fn removed_identity_is_rejected(case in case()) {
        prop_assume!(case.identity.is_some());
        let mut parts = signed(&case);
        parts.headers.remove("x-auth-user");
        parts.headers.remove("x-auth-roles");
        // The covered field is now absent: the base cannot be built.
        prop_assert_eq!(rejected(&parts, &case.body), Reason::MalformedSignature);
    }
}

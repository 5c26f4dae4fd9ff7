//! Every reason code of the signing core, produced through the public API, plus the profile
//! rules that decide between them: selection by tag, the time window's exact edges, the
//! verifier's configured authority, field-line joining, and a peer that orders the
//! `Signature-Input` parameters differently. The worked example of docs/PROTOCOL.md is asserted
//! here byte for byte, so the document cannot drift from the code.

use base64::Engine as _;
use countersign::core::{
    content_digest_sha256, encode_value, is_valid_key_id, signature_base_for, EncodedIdentity,
    Identity, KeySpec, Keyring, KeyringHandle, Nonce, Policy, Reason, RequestView, Rotation,
    Secret, Signer, SignerConfig, Verified, Verifier, VerifyError, KEY_ID_RULE, MAX_SIGNATURE_TIME,
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use sha2::Sha256;
use std::time::Duration;

const NOW: u64 = 1_700_000_000;
const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAA";
const SECRET_K1: [u8; 32] = [0x11; 32];
const SECRET_K2: [u8; 32] = [0x22; 32];

fn secret(bytes: [u8; 32]) -> Secret {
    Secret::new(bytes.to_vec()).unwrap()
}

fn handle_k1() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", secret(SECRET_K1)).unwrap())
}

fn signer() -> Signer {
    Signer::new(handle_k1(), SignerConfig::default())
}

fn verifier() -> Verifier {
    Verifier::new(handle_k1(), Policy::default())
}

fn nonce() -> Nonce {
    Nonce::new(NONCE).unwrap()
}

fn request(method: &str, uri: &str, host: &str) -> Parts {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn alice() -> Identity {
    Identity::new("alice", ["admin", "billing"])
}

/// A request signed by the default signer at `NOW` for alice.
fn signed(body: &[u8]) -> Parts {
    signed_with(&signer(), body, Some(&alice()), NOW)
}

fn signed_with(signer: &Signer, body: &[u8], identity: Option<&Identity>, now: u64) -> Parts {
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    signer
        .sign(&mut parts, body, identity, now, &nonce())
        .unwrap();
    parts
}

fn header(parts: &Parts, name: &str) -> String {
    parts.headers[name].to_str().unwrap().to_owned()
}

fn set_header(parts: &mut Parts, name: &str, value: &str) {
    parts.headers.insert(
        HeaderName::from_bytes(name.as_bytes()).unwrap(),
        HeaderValue::from_str(value).unwrap(),
    );
}

/// Rewrites the `Signature-Input` field text (the MAC is left as it was).
fn edit_input(parts: &mut Parts, edit: impl FnOnce(&str) -> String) {
    let edited = edit(&header(parts, "signature-input"));
    set_header(parts, "signature-input", &edited);
}

fn reason(result: Result<Verified, VerifyError>) -> Reason {
    match result {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(e) => e.reason(),
    }
}

fn hmac_b64(key: &[u8], base: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(base.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

// ---------------------------------------------------------------------------------------------
// Accepted

#[test]
fn signed_request_verifies_with_identity_and_replay_expiry() {
    let body = br#"{"item":"book"}"#;
    let parts = signed(body);
    let v = verifier().verify(&parts, body, NOW).unwrap();
    assert_eq!(v.identity, Some(alice()));
    assert_eq!(v.keyid, "k1");
    assert_eq!(v.nonce.as_deref(), Some(NONCE));
    assert_eq!(v.created, NOW);
    // created + window (10) + skew (2) + 1
    assert_eq!(v.replay_until, NOW + 13);
}

#[test]
fn anonymous_request_verifies_without_identity() {
    let parts = signed_with(&signer(), b"", None, NOW);
    assert!(!parts.headers.contains_key("x-auth-user"));
    let v = verifier().verify(&parts, b"", NOW).unwrap();
    assert_eq!(v.identity, None);
}

#[test]
fn two_phase_verification_checks_digest_only_in_phase_two() {
    let parts = signed(b"hello");
    let phase1 = verifier().verify_headers(&parts, NOW).unwrap();
    assert_eq!(phase1.verified().keyid, "k1");
    assert_eq!(
        phase1.clone().check_body(b"hellO").unwrap_err().reason(),
        Reason::DigestMismatch
    );
    assert_eq!(phase1.check_body(b"hello").unwrap().created, NOW);
}

// ---------------------------------------------------------------------------------------------
// missing_signature

#[test]
fn missing_signature_when_no_signature_fields() {
    let parts = request("GET", "/", "api.example.com");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingSignature
    );
}

#[test]
fn missing_signature_when_only_another_tag() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace(r#"tag="countersign""#, r#"tag="other""#)
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingSignature
    );
}

#[test]
fn missing_signature_when_signature_field_absent_or_lacks_the_label() {
    let mut parts = signed(b"");
    parts.headers.remove("signature");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingSignature
    );

    let mut parts = signed(b"");
    let mac = header(&parts, "signature").replace("countersign=", "other=");
    set_header(&mut parts, "signature", &mac);
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingSignature
    );
}

// ---------------------------------------------------------------------------------------------
// malformed_signature

#[test]
fn malformed_signature_for_garbage_signature_input() {
    for garbage in ["(((", "countersign=", "=x", "countersign=(\"@method\""] {
        let mut parts = signed(b"");
        set_header(&mut parts, "signature-input", garbage);
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::MalformedSignature,
            "{garbage}"
        );
    }
}

#[test]
fn malformed_signature_for_garbage_signature_value() {
    let mut parts = signed(b"");
    set_header(&mut parts, "signature", "countersign=:not base64!:");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
    set_header(&mut parts, "signature", r#"countersign="a string""#);
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

#[test]
fn malformed_signature_for_two_members_with_our_tag() {
    let mut parts = signed(b"");
    let input = header(&parts, "signature-input");
    let member = input.strip_prefix("countersign=").unwrap();
    set_header(
        &mut parts,
        "signature-input",
        &format!("{input}, second={member}"),
    );
    let sig = header(&parts, "signature");
    let mac = sig.strip_prefix("countersign=").unwrap();
    set_header(&mut parts, "signature", &format!("{sig}, second={mac}"));
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

/// A validly MACed request whose covered user field is not canonical percent-encoding: the
/// MAC passes, decoding does not. The signer is told to cover `x-auth-user` as an extra header
/// (its own identity fields renamed), so it copies the raw value into the base.
#[test]
fn malformed_signature_for_non_canonical_identity_value_that_is_covered() {
    let config = SignerConfig {
        identity_headers: countersign::core::IdentityHeaders {
            user: HeaderName::from_static("x-unused-user"),
            roles: HeaderName::from_static("x-unused-roles"),
        },
        extra_headers: vec![
            HeaderName::from_static("x-auth-user"),
            HeaderName::from_static("x-auth-roles"),
        ],
        ..SignerConfig::default()
    };
    let signer = Signer::new(handle_k1(), config);
    for (user, roles) in [
        (Some("alice smith"), None),
        (Some("%zz"), None),
        (Some("%ff"), None),
        (Some("alice"), Some("ad min")),
        (None, Some("admin")),
    ] {
        let mut parts = request("POST", "/orders?id=42", "api.example.com");
        if let Some(user) = user {
            set_header(&mut parts, "x-auth-user", user);
        }
        if let Some(roles) = roles {
            set_header(&mut parts, "x-auth-roles", roles);
        }
        signer.sign(&mut parts, b"", None, NOW, &nonce()).unwrap();
        assert!(header(&parts, "signature-input").contains("\"x-auth-"));
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::MalformedSignature,
            "{user:?} {roles:?}"
        );
    }
}

/// Identity fields set by hand and covered as plain fields (the signer's own identity path
/// refuses empty names), so the verifier sees exactly these values under a valid MAC.
fn signed_with_identity_fields(user: &str, roles: Option<&str>) -> Parts {
    let config = SignerConfig {
        identity_headers: countersign::core::IdentityHeaders {
            user: HeaderName::from_static("x-unused-user"),
            roles: HeaderName::from_static("x-unused-roles"),
        },
        extra_headers: vec![
            HeaderName::from_static("x-auth-user"),
            HeaderName::from_static("x-auth-roles"),
        ],
        ..SignerConfig::default()
    };
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    set_header(&mut parts, "x-auth-user", user);
    if let Some(roles) = roles {
        set_header(&mut parts, "x-auth-roles", roles);
    }
    Signer::new(handle_k1(), config)
        .sign(&mut parts, b"", None, NOW, &nonce())
        .unwrap();
    parts
}

/// docs/PROTOCOL.md §4: a user name and every role name are non-empty. An empty user field, or
/// a roles field with an empty role (first, last, between two commas, or `,` alone), is
/// `malformed_signature` under a valid MAC, on every reader of `Signature-Input`; an empty
/// roles field is a user without roles.
#[test]
fn malformed_signature_for_empty_user_or_empty_role() {
    let cases: [(&str, Option<&str>, &str); 7] = [
        ("", None, "user field is empty"),
        ("", Some("admin"), "user field is empty"),
        ("alice", Some(","), "roles field has an empty role"),
        ("alice", Some("a,,b"), "roles field has an empty role"),
        ("alice", Some(",a"), "roles field has an empty role"),
        ("alice", Some("a,"), "roles field has an empty role"),
        ("alice", Some("a%20b,"), "roles field has an empty role"),
    ];
    let verifier = verifier();
    for (user, roles, detail) in cases {
        let parts = signed_with_identity_fields(user, roles);
        let err = verifier.verify(&parts, b"", NOW).unwrap_err();
        assert_eq!(
            err.reason(),
            Reason::MalformedSignature,
            "{user:?} {roles:?}"
        );
        assert_eq!(err.detail(), detail, "{user:?} {roles:?}");
        let reference = verifier.verify_headers_reference(&parts, NOW).unwrap_err();
        assert_eq!(reference, err, "{user:?} {roles:?}");
        for fast in [
            verifier.verify_headers_template(&parts, NOW),
            verifier.verify_headers_scanned(&parts, NOW),
        ] {
            assert_eq!(fast.unwrap().unwrap_err(), err, "{user:?} {roles:?}");
        }
    }
    // No roles field, or an empty one: a user without roles.
    for roles in [None, Some("")] {
        let parts = signed_with_identity_fields("alice", roles);
        let v = verifier.verify(&parts, b"", NOW).unwrap();
        assert_eq!(
            v.identity,
            Some(Identity::new("alice", Vec::<String>::new()))
        );
    }
}

/// The signer refuses an empty user or role name (`Identity`, `EncodedIdentity::new`), and
/// `EncodedIdentity::from_encoded` builds none; a user without roles is fine.
#[test]
fn signer_refuses_empty_user_or_role() {
    for identity in [
        Identity::new("", Vec::<String>::new()),
        Identity::new("", ["admin"]),
        Identity::new("alice", [""]),
        Identity::new("alice", ["", ""]),
        Identity::new("alice", ["a", "", "b"]),
    ] {
        let mut parts = request("POST", "/orders?id=42", "api.example.com");
        let before = parts.headers.clone();
        let err = signer()
            .sign(&mut parts, b"", Some(&identity), NOW, &nonce())
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert_eq!(parts.headers, before, "a refused request is left unchanged");
        let encoded = EncodedIdentity::new(&identity);
        assert!(signer()
            .sign_encoded(&mut parts, b"", Some(&encoded), NOW, &nonce())
            .is_err());
        assert_eq!(parts.headers, before);
    }
    assert!(EncodedIdentity::from_encoded(bytes::Bytes::new(), bytes::Bytes::new()).is_none());
    for roles in [&b","[..], b"a,,b", b",a", b"a,"] {
        assert!(EncodedIdentity::from_encoded(
            bytes::Bytes::from_static(b"alice"),
            bytes::Bytes::from_static(roles)
        )
        .is_none());
    }
    let user_only =
        EncodedIdentity::from_encoded(bytes::Bytes::from_static(b"alice"), bytes::Bytes::new())
            .unwrap();
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    signer()
        .sign_encoded(&mut parts, b"", Some(&user_only), NOW, &nonce())
        .unwrap();
    assert!(!parts.headers.contains_key("x-auth-roles"));
    let v = verifier().verify(&parts, b"", NOW).unwrap();
    assert_eq!(
        v.identity,
        Some(Identity::new("alice", Vec::<String>::new()))
    );
}

/// `created` and `expires` are RFC 8941 integers (at most 15 digits): the signer refuses to
/// write a larger one (or an overflowing `created + window`), up to the edge it signs.
#[test]
fn signer_refuses_times_beyond_15_digits() {
    let edge = MAX_SIGNATURE_TIME - 10;
    let parts = signed_with(&signer(), b"", Some(&alice()), edge);
    assert!(header(&parts, "signature-input")
        .contains(";created=999999999999989;expires=999999999999999;"));
    verifier().verify(&parts, b"", edge).unwrap();

    let huge_window = Signer::new(
        handle_k1(),
        SignerConfig {
            window: Duration::from_secs(u64::MAX),
            ..SignerConfig::default()
        },
    );
    for (signer, created, what) in [
        (
            signer(),
            edge + 1,
            "expires (created 999999999999990 + window 10s)",
        ),
        (
            signer(),
            MAX_SIGNATURE_TIME,
            "expires (created 999999999999999",
        ),
        (
            signer(),
            MAX_SIGNATURE_TIME + 1,
            "created 1000000000000000 exceeds",
        ),
        (signer(), u64::MAX, "created 18446744073709551615 exceeds"),
        (huge_window, NOW, "expires (created 1700000000 + window"),
    ] {
        let mut parts = request("POST", "/orders?id=42", "api.example.com");
        let before = parts.headers.clone();
        let err = signer
            .sign(&mut parts, b"", Some(&alice()), created, &nonce())
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{err}");
        assert!(err.contains("at most 15 digits"), "{err}");
        assert_eq!(parts.headers, before);
    }
}

/// A verifier given a 16-digit `created` or `expires` (a signer without the check above)
/// cannot parse `Signature-Input`: `malformed_signature`, on every reader.
#[test]
fn malformed_signature_for_16_digit_times() {
    for (from, to) in [
        (";created=1700000000", ";created=1000000000000000"),
        (";expires=1700000010", ";expires=1000000000000009"),
        (";created=1700000000", ";created=18446744073709551615"),
    ] {
        let mut parts = signed(b"");
        edit_input(&mut parts, |s| {
            assert!(s.contains(from));
            s.replace(from, to)
        });
        let verifier = verifier();
        let err = verifier.verify(&parts, b"", NOW).unwrap_err();
        assert_eq!(err.reason(), Reason::MalformedSignature, "{to}");
        assert_eq!(
            verifier.verify_headers_reference(&parts, NOW).unwrap_err(),
            err
        );
        // The fast readers may decline such text; whatever they decide is the same answer.
        for answer in [
            verifier.verify_headers_template(&parts, NOW),
            verifier.verify_headers_scanned(&parts, NOW),
        ]
        .into_iter()
        .flatten()
        {
            assert_eq!(answer.unwrap_err(), err, "{to}");
        }
    }
}

/// Key ids: non-empty visible ASCII without `"` or `\` (docs/PROTOCOL.md §5), one rule for
/// keygen, the keyring loader and `Keyring::new`.
#[test]
fn key_id_rule() {
    for ok in ["k1", "a.b", "key-2024_01", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"] {
        assert!(is_valid_key_id(ok), "{ok}");
        Keyring::single(ok, secret(SECRET_K1)).unwrap();
    }
    for bad in [
        "", "a b", " k1", "k1 ", "a\"b", "a\\b", "tab\tid", "zoë", "nl\n",
    ] {
        assert!(!is_valid_key_id(bad), "{bad:?}");
        let err = Keyring::single(bad, secret(SECRET_K1))
            .unwrap_err()
            .to_string();
        assert!(err.contains(KEY_ID_RULE), "{err}");
    }
}

#[test]
fn malformed_signature_for_missing_or_short_nonce() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace(&format!(";nonce=\"{NONCE}\""), "")
    });
    assert!(!header(&parts, "signature-input").contains("nonce"));
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );

    // A nonce shorter than 128 bits: refused as malformed (before the MAC is checked, so the
    // edit's broken MAC is not what decides), and a signer cannot be asked for one.
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace(&format!(";nonce=\"{NONCE}\""), ";nonce=\"short\"")
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
    assert!(Nonce::new("short").is_err());
    assert!(Nonce::new(&"n".repeat(21)).is_err());
    assert!(Nonce::new(&"n".repeat(22)).is_ok());
    assert!(Nonce::new(&"n".repeat(256)).is_ok());
    assert!(Nonce::new(&"n".repeat(257)).is_err());
    assert!(Nonce::new("nnnnnnnnnnnnnnnnnnnnn\"").is_err());
    assert!(Nonce::new("nnnnnnnnnnnnnnnnnnnnn\\").is_err());
    assert!(Nonce::new("nnnnnnnnnnnnnnnnnnnnn ").is_err());
}

#[test]
fn malformed_signature_for_missing_keyid_or_created_or_wrong_types() {
    let cases: [(&str, &str); 5] = [
        (r#";keyid="k1""#, ""),
        (";created=1700000000", ""),
        (";created=1700000000", ";created=\"1700000000\""),
        (";created=1700000000", ";created=-1"),
        (r#";keyid="k1""#, ";keyid=1"),
    ];
    for (from, to) in cases {
        let mut parts = signed(b"");
        edit_input(&mut parts, |s| {
            assert!(s.contains(from));
            s.replace(from, to)
        });
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::MalformedSignature,
            "{from} -> {to}"
        );
    }
}

#[test]
fn malformed_signature_for_duplicated_component() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replacen("(\"@method\"", "(\"@method\" \"@method\"", 1)
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

#[test]
fn malformed_signature_for_unsupported_component_parameter() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace("\"content-digest\"", "\"content-digest\";sf")
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );

    // An @-name that is not a supported derived component is never read as a header.
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace("(\"@method\"", "(\"@status\" \"@method\"")
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

#[test]
fn malformed_signature_for_covered_field_that_is_absent() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace("(\"@method\"", "(\"x-not-here\" \"@method\"")
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

#[test]
fn malformed_signature_for_wrong_shapes_and_bytes() {
    // The Signature member is an inner list, not a byte sequence.
    let mut parts = signed(b"");
    set_header(&mut parts, "signature", "countersign=(:AAAA:)");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );

    // Content-Digest members of the wrong type, or not a dictionary at all.
    for digest in ["sha-256=(:AAAA:)", "sha-256=\"abc\"", "sha-512=1", "((("] {
        let mut parts = signed(b"");
        set_header(&mut parts, "content-digest", digest);
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::MalformedSignature,
            "{digest}"
        );
    }

    // Non-ASCII (obs-text) in a signature field.
    let mut parts = signed(b"");
    let input = header(&parts, "signature-input");
    let mut bytes = input.into_bytes();
    bytes.extend_from_slice(b";x=\"\xe9\"");
    parts
        .headers
        .insert("signature-input", HeaderValue::from_bytes(&bytes).unwrap());
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );

    // `expires` of the wrong type; a nonce longer than 256 characters.
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| {
        s.replace(&format!("expires={}", NOW + 10), "expires=?1")
    });
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
    let mut parts = signed(b"");
    let long = "n".repeat(257);
    edit_input(&mut parts, |s| s.replace(NONCE, &long));
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );
}

#[test]
fn malformed_signature_for_ambiguous_selection_without_tag() {
    // `Selector::Only` (foreign profiles): exactly one member, and it must be an inner list.
    let only = Verifier::new(handle_k1(), Policy::rfc9421(&["@method"]));
    let parts = signed(b"");
    only.verify(&parts, b"", NOW).unwrap();

    let mut two = parts.clone();
    let input = header(&parts, "signature-input");
    set_header(
        &mut two,
        "signature-input",
        &format!(r#"{input}, other=("@method");created={NOW};keyid="k1""#),
    );
    assert_eq!(
        reason(only.verify(&two, b"", NOW)),
        Reason::MalformedSignature
    );

    let mut item = parts.clone();
    set_header(&mut item, "signature-input", "countersign=1");
    assert_eq!(
        reason(only.verify(&item, b"", NOW)),
        Reason::MalformedSignature
    );
}

// ---------------------------------------------------------------------------------------------
// unknown_key

#[test]
fn unknown_key_for_unknown_id() {
    let other = Signer::new(
        KeyringHandle::new(Keyring::single("k9", secret(SECRET_K1)).unwrap()),
        SignerConfig::default(),
    );
    let parts = signed_with(&other, b"", None, NOW);
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::UnknownKey
    );
}

#[test]
fn unknown_key_for_retired_key() {
    let parts = signed(b"");
    let keyring = Keyring::new(
        "k2",
        vec![
            KeySpec {
                id: "k1".into(),
                secret: secret(SECRET_K1),
                retired: true,
                rotation: None,
            },
            KeySpec {
                id: "k2".into(),
                secret: secret(SECRET_K2),
                retired: false,
                rotation: None,
            },
        ],
        Rotation::Off,
    )
    .unwrap();
    let verifier = Verifier::new(KeyringHandle::new(keyring), Policy::default());
    assert_eq!(
        reason(verifier.verify(&parts, b"", NOW)),
        Reason::UnknownKey
    );
}

#[test]
fn unknown_key_for_wrong_rotation_epoch() {
    let handle = KeyringHandle::new(
        Keyring::new(
            "k",
            vec![KeySpec {
                id: "k".into(),
                secret: secret(SECRET_K1),
                retired: false,
                rotation: None,
            }],
            Rotation::Every(Duration::from_secs(3600)),
        )
        .unwrap(),
    );
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let verifier = Verifier::new(handle, Policy::default());
    let parts = signed_with(&signer, b"", None, NOW);
    let epoch = NOW / 3600;
    assert!(header(&parts, "signature-input").contains(&format!("keyid=\"k.{epoch}\"")));
    verifier.verify(&parts, b"", NOW).unwrap();
    for forged in [
        format!("k.{}", epoch - 1),
        format!("k.{}", epoch + 1),
        "k".to_owned(),
    ] {
        let mut forged_parts = parts.clone();
        edit_input(&mut forged_parts, |s| {
            s.replace(
                &format!("keyid=\"k.{epoch}\""),
                &format!("keyid=\"{forged}\""),
            )
        });
        assert_eq!(
            reason(verifier.verify(&forged_parts, b"", NOW)),
            Reason::UnknownKey,
            "{forged}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// unsupported_algorithm

#[test]
fn unsupported_algorithm_for_other_alg() {
    for alg in ["rsa-pss-sha512", "hmac-sha512", "HMAC-SHA256", ""] {
        let mut parts = signed(b"");
        edit_input(&mut parts, |s| {
            s.replace(r#"alg="hmac-sha256""#, &format!("alg=\"{alg}\""))
        });
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::UnsupportedAlgorithm,
            "{alg}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// expired / not_yet_valid and the window's exact edges (window 10 s, skew 2 s)

#[test]
fn window_edges_are_inclusive() {
    let parts = signed(b"");
    // created == now - window - skew: accepted; one second later: expired.
    verifier().verify(&parts, b"", NOW + 12).unwrap();
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW + 13)),
        Reason::Expired
    );
    // created == now + skew: accepted; one second earlier clock: not yet valid.
    verifier().verify(&parts, b"", NOW - 2).unwrap();
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW - 3)),
        Reason::NotYetValid
    );
}

#[test]
fn expired_when_created_too_old() {
    let parts = signed(b"");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW + 3600)),
        Reason::Expired
    );
}

#[test]
fn expired_when_expires_has_passed_though_created_is_in_window() {
    // Signed with a 1 s window: expires = created + 1. The verifier's window is 10 s, so
    // `created` alone would still be fine; `expires` (plus 2 s skew) is what rejects it.
    let short = Signer::new(
        handle_k1(),
        SignerConfig {
            window: Duration::from_secs(1),
            ..SignerConfig::default()
        },
    );
    let parts = signed_with(&short, b"", None, NOW);
    assert!(header(&parts, "signature-input").contains(&format!("expires={}", NOW + 1)));
    verifier().verify(&parts, b"", NOW + 3).unwrap();
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW + 4)),
        Reason::Expired
    );
}

/// The `expires` comparison does not wrap: a skew of 2^63 s (absurd, but a `Duration` a
/// caller can pass) once turned negative in it and made every signature `expired`.
#[test]
fn expires_check_does_not_wrap_for_extreme_skew() {
    let parts = signed(b"");
    let policy = Policy {
        skew: Duration::from_secs(1 << 63),
        ..Policy::default()
    };
    Verifier::new(handle_k1(), policy)
        .verify(&parts, b"", NOW)
        .unwrap();
}

#[test]
fn not_yet_valid_when_created_in_future() {
    let parts = signed(b"");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW - 60)),
        Reason::NotYetValid
    );
}

#[test]
fn window_and_skew_are_configurable() {
    let parts = signed(b"");
    let policy = Policy {
        window: Duration::from_secs(60),
        skew: Duration::from_secs(0),
        ..Policy::default()
    };
    let wide = Verifier::new(handle_k1(), policy);
    // expires = NOW + 10 (the signer's window) still bounds acceptance.
    wide.verify(&parts, b"", NOW + 10).unwrap();
    assert_eq!(reason(wide.verify(&parts, b"", NOW + 11)), Reason::Expired);
    assert_eq!(
        reason(wide.verify(&parts, b"", NOW - 1)),
        Reason::NotYetValid
    );
    // The nonce is kept only while the signature can be accepted: until `expires`, the
    // sooner end (not the verifier's wider window).
    assert_eq!(
        wide.verify(&parts, b"", NOW).unwrap().replay_until,
        NOW + 11
    );
}

// ---------------------------------------------------------------------------------------------
// insufficient_coverage

#[test]
fn insufficient_coverage_when_a_required_component_is_missing() {
    for component in [
        "\"@method\" ",
        "\"@authority\" ",
        "\"@path\" ",
        "\"@query\" ",
    ] {
        let mut parts = signed(b"");
        edit_input(&mut parts, |s| {
            assert!(s.contains(component));
            s.replacen(component, "", 1)
        });
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::InsufficientCoverage,
            "{component}"
        );
    }
}

#[test]
fn insufficient_coverage_when_identity_header_added_to_anonymous_request() {
    let mut parts = signed_with(&signer(), b"", None, NOW);
    verifier().verify(&parts, b"", NOW).unwrap();
    set_header(&mut parts, "x-auth-user", "admin");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::InsufficientCoverage
    );

    let mut parts = signed_with(&signer(), b"", None, NOW);
    set_header(&mut parts, "x-auth-roles", "admin");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::InsufficientCoverage
    );
}

#[test]
fn insufficient_coverage_when_roles_added_to_user_only_request() {
    let mut parts = signed_with(
        &signer(),
        b"",
        Some(&Identity::new("bob", Vec::<String>::new())),
        NOW,
    );
    assert!(!parts.headers.contains_key("x-auth-roles"));
    verifier().verify(&parts, b"", NOW).unwrap();
    set_header(&mut parts, "x-auth-roles", "admin");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::InsufficientCoverage
    );
}

#[test]
fn insufficient_coverage_for_configured_extra_header() {
    let policy = Policy {
        extra_headers: vec![HeaderName::from_static("x-tenant")],
        ..Policy::default()
    };
    let strict = Verifier::new(handle_k1(), policy);
    let mut parts = signed(b"");
    strict.verify(&parts, b"", NOW).unwrap();
    set_header(&mut parts, "x-tenant", "acme");
    assert_eq!(
        reason(strict.verify(&parts, b"", NOW)),
        Reason::InsufficientCoverage
    );

    let covering = Signer::new(
        handle_k1(),
        SignerConfig {
            extra_headers: vec![HeaderName::from_static("x-tenant")],
            ..SignerConfig::default()
        },
    );
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    set_header(&mut parts, "x-tenant", "acme");
    covering.sign(&mut parts, b"", None, NOW, &nonce()).unwrap();
    strict.verify(&parts, b"", NOW).unwrap();
}

// ---------------------------------------------------------------------------------------------
// bad_signature

#[test]
fn bad_signature_for_each_covered_request_part() {
    let body = br#"{"item":"book"}"#;
    type Tamper = fn(&mut Parts);
    let cases: [(&str, Tamper); 8] = [
        ("method", |p| p.method = http::Method::PUT),
        ("path", |p| p.uri = "/orderz?id=42".parse().unwrap()),
        ("query", |p| p.uri = "/orders?id=43".parse().unwrap()),
        ("query removed", |p| p.uri = "/orders".parse().unwrap()),
        ("authority", |p| set_header(p, "host", "evil.example.com")),
        ("authority port", |p| {
            set_header(p, "host", "api.example.com:8080")
        }),
        ("user", |p| set_header(p, "x-auth-user", "mallory")),
        ("roles", |p| {
            set_header(p, "x-auth-roles", "admin,billing,root")
        }),
    ];
    for (what, tamper) in cases {
        let mut parts = signed(body);
        verifier().verify(&parts, body, NOW).unwrap();
        tamper(&mut parts);
        assert_eq!(
            reason(verifier().verify(&parts, body, NOW)),
            Reason::BadSignature,
            "{what}"
        );
    }
}

#[test]
fn bad_signature_for_wrong_mac_or_wrong_key() {
    let mut parts = signed(b"");
    let sig = header(&parts, "signature");
    let mut mac = base64::engine::general_purpose::STANDARD
        .decode(
            sig.strip_prefix("countersign=:")
                .unwrap()
                .strip_suffix(':')
                .unwrap(),
        )
        .unwrap();
    mac[31] ^= 1;
    let tampered = base64::engine::general_purpose::STANDARD.encode(&mac);
    set_header(
        &mut parts,
        "signature",
        &format!("countersign=:{tampered}:"),
    );
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::BadSignature
    );

    // Truncated MAC.
    set_header(&mut parts, "signature", "countersign=:AAAA:");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::BadSignature
    );

    // Same key id, different secret.
    let impostor = Signer::new(
        KeyringHandle::new(Keyring::single("k1", secret(SECRET_K2)).unwrap()),
        SignerConfig::default(),
    );
    let parts = signed_with(&impostor, b"", None, NOW);
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::BadSignature
    );
}

#[test]
fn bad_signature_for_tampered_signature_parameters() {
    // Parameters are inside @signature-params, so changing any of them breaks the MAC.
    for (from, to) in [
        (
            format!("nonce=\"{NONCE}\""),
            "nonce=\"BBBBBBBBBBBBBBBBBBBBBB\"".to_owned(),
        ),
        (format!("created={NOW}"), format!("created={}", NOW + 1)),
        (
            format!("expires={}", NOW + 10),
            format!("expires={}", NOW + 11),
        ),
        (
            ";tag=\"countersign\"".to_owned(),
            ";x=1;tag=\"countersign\"".to_owned(),
        ),
    ] {
        let mut parts = signed(b"");
        edit_input(&mut parts, |s| s.replace(&from, &to));
        assert_eq!(
            reason(verifier().verify(&parts, b"", NOW)),
            Reason::BadSignature,
            "{from}"
        );
    }
}

/// Changing the body while keeping the signed digest is caught by the digest; recomputing the
/// digest to match the new body changes a covered field and is caught by the MAC.
#[test]
fn body_change_is_digest_mismatch_and_recomputed_digest_is_bad_signature() {
    let body = br#"{"item":"book"}"#.to_vec();
    let parts = signed(&body);
    let mut changed = body.clone();
    changed[3] ^= 0x20;
    assert_eq!(
        reason(verifier().verify(&parts, &changed, NOW)),
        Reason::DigestMismatch
    );

    let mut recomputed = parts.clone();
    set_header(
        &mut recomputed,
        "content-digest",
        &content_digest_sha256(&changed),
    );
    assert_eq!(
        reason(verifier().verify(&recomputed, &changed, NOW)),
        Reason::BadSignature
    );
}

// ---------------------------------------------------------------------------------------------
// missing_digest / digest_mismatch

#[test]
fn missing_digest_when_content_digest_not_covered() {
    let mut parts = signed(b"");
    edit_input(&mut parts, |s| s.replace(" \"content-digest\"", ""));
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingDigest
    );
}

#[test]
fn missing_digest_when_field_absent_or_without_supported_algorithm() {
    let mut parts = signed(b"");
    parts.headers.remove("content-digest");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingDigest
    );

    let mut parts = signed(b"");
    set_header(
        &mut parts,
        "content-digest",
        "md5=:1B2M2Y8AsgTpgAmY7PhCfg==:",
    );
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingDigest
    );
}

#[test]
fn digest_mismatch_for_changed_body() {
    let body = vec![7u8; 1024];
    let parts = signed(&body);
    let mut changed = body.clone();
    changed[1023] = 8;
    assert_eq!(
        reason(verifier().verify(&parts, &changed, NOW)),
        Reason::DigestMismatch
    );
    assert_eq!(
        reason(verifier().verify(&parts, &body[..1023], NOW)),
        Reason::DigestMismatch
    );
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::DigestMismatch
    );
}

#[test]
fn reason_codes_and_statuses_are_stable() {
    let expected = [
        ("missing_signature", 401),
        ("malformed_signature", 401),
        ("unknown_key", 401),
        ("unsupported_algorithm", 401),
        ("expired", 401),
        ("not_yet_valid", 401),
        ("insufficient_coverage", 401),
        ("bad_signature", 401),
        ("missing_digest", 401),
        ("digest_mismatch", 401),
        ("replayed", 401),
        ("body_too_large", 413),
        ("replay_cache_unavailable", 503),
        ("body_memory_limit", 503),
    ];
    assert_eq!(Reason::ALL.len(), expected.len());
    for (reason, (code, status)) in Reason::ALL.into_iter().zip(expected) {
        assert_eq!(reason.as_str(), code);
        assert_eq!(reason.http_status(), status, "{code}");
        assert_eq!(Reason::from_code(code), Some(reason));
    }
    assert_eq!(Reason::from_code("nope"), None);
}

// ---------------------------------------------------------------------------------------------
// Selection by tag, never by label

#[test]
fn label_countersign_with_other_tag_is_not_selected() {
    // A member labelled `countersign` but tagged otherwise, beside our real signature under a
    // foreign label: the foreign label is selected and verifies.
    let foreign = Signer::new(
        handle_k1(),
        SignerConfig {
            label: "proxy1".to_owned(),
            ..SignerConfig::default()
        },
    );
    let mut parts = signed_with(&foreign, b"", Some(&alice()), NOW);
    assert!(header(&parts, "signature-input").starts_with("proxy1=("));
    verifier().verify(&parts, b"", NOW).unwrap();

    let decoy_input = r#"countersign=("@method");created=1700000000;keyid="k1";tag="other""#;
    let input = header(&parts, "signature-input");
    set_header(
        &mut parts,
        "signature-input",
        &format!("{decoy_input}, {input}"),
    );
    let sig = header(&parts, "signature");
    set_header(
        &mut parts,
        "signature",
        &format!("countersign=:AAAA:, {sig}"),
    );
    let v = verifier().verify(&parts, b"", NOW).unwrap();
    assert_eq!(v.identity, Some(alice()));

    // Only the decoy: nothing is selected.
    let mut decoy_only = parts.clone();
    set_header(&mut decoy_only, "signature-input", decoy_input);
    assert_eq!(
        reason(verifier().verify(&decoy_only, b"", NOW)),
        Reason::MissingSignature
    );
}

#[test]
fn configured_tag_selects() {
    let tagged = Signer::new(
        handle_k1(),
        SignerConfig {
            tag: "billing-api".to_owned(),
            ..SignerConfig::default()
        },
    );
    let parts = signed_with(&tagged, b"", None, NOW);
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MissingSignature
    );
    let policy = Policy {
        selector: countersign::core::Selector::Tag("billing-api".to_owned()),
        ..Policy::default()
    };
    Verifier::new(handle_k1(), policy)
        .verify(&parts, b"", NOW)
        .unwrap();
}

/// A label that is no structured-field key, or a tag the field cannot carry as written, made
/// `Signature-Input` unparsable for every verifier. Now `SignerConfig::validate` refuses them,
/// and so does every signing call of a signer built with them, leaving the request unchanged.
#[test]
fn signer_refuses_a_label_or_tag_the_field_cannot_carry() {
    let config = |label: &str, tag: &str| SignerConfig {
        label: label.to_owned(),
        tag: tag.to_owned(),
        ..SignerConfig::default()
    };
    let refused = [
        (config("Bad Label", "countersign"), "SignerConfig::label"),
        (config("", "countersign"), "SignerConfig::label"),
        (config("1sig", "countersign"), "SignerConfig::label"),
        (config("sig/1", "countersign"), "SignerConfig::label"),
        (config("sig=1", "countersign"), "SignerConfig::label"),
        (config("countersign", "a\"b"), "SignerConfig::tag"),
        (config("countersign", "a\\b"), "SignerConfig::tag"),
        (config("countersign", "rôle"), "SignerConfig::tag"),
        (config("countersign", "a\nb"), "SignerConfig::tag"),
        (config("countersign", "a\x7fb"), "SignerConfig::tag"),
    ];
    for (config, what) in refused {
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(what), "{config:?}: {err}");
        let signer = Signer::new(handle_k1(), config.clone());
        let mut parts = request("POST", "/orders?id=42", "api.example.com");
        let before = parts.headers.clone();
        let sign_err = signer
            .sign(&mut parts, b"", Some(&alice()), NOW, &nonce())
            .unwrap_err();
        assert_eq!(sign_err.to_string(), err, "{config:?}");
        let encoded = EncodedIdentity::new(&alice());
        assert!(signer
            .sign_encoded(&mut parts, b"", Some(&encoded), NOW, &nonce())
            .is_err());
        assert_eq!(parts.headers, before, "{config:?}");
    }
    // Every key form and printable tag, spaces and all, signs and verifies.
    for (label, tag) in [
        ("*", "countersign"),
        ("a", ""),
        (
            "*a.b-c_d*9",
            "with space and !#$%&'()*+,-./:;<=>?@[]^_`{|}~",
        ),
    ] {
        let config = config(label, tag);
        config.validate().unwrap();
        let parts = signed_with(&Signer::new(handle_k1(), config), b"", None, NOW);
        assert!(header(&parts, "signature-input").starts_with(&format!("{label}=(")));
        let policy = Policy {
            selector: countersign::core::Selector::Tag(tag.to_owned()),
            ..Policy::default()
        };
        Verifier::new(handle_k1(), policy)
            .verify(&parts, b"", NOW)
            .unwrap();
    }
}

/// A verifier's tag that no structured-field string can carry selects nothing: every request
/// is `missing_signature`, and the detail says why rather than only that nothing matched.
#[test]
fn verifier_tag_outside_printable_ascii_is_named() {
    let parts = signed_with(&signer(), b"", None, NOW);
    for tag in ["rôle", "a\nb", "\x7f"] {
        let policy = Policy {
            selector: countersign::core::Selector::Tag(tag.to_owned()),
            ..Policy::default()
        };
        let err = Verifier::new(handle_k1(), policy)
            .verify(&parts, b"", NOW)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::MissingSignature);
        assert!(
            err.detail().contains("not printable ASCII"),
            "{tag:?}: {err}"
        );
        assert!(err.detail().contains(&format!("{tag:?}")), "{err}");
    }
    // A printable tag that matches nothing is only "no signature matches the policy".
    let policy = Policy {
        selector: countersign::core::Selector::Tag("other".to_owned()),
        ..Policy::default()
    };
    let err = Verifier::new(handle_k1(), policy)
        .verify(&parts, b"", NOW)
        .unwrap_err();
    assert_eq!(err.detail(), "no signature matches the policy");
}

// ---------------------------------------------------------------------------------------------
// @authority

#[test]
fn configured_verifier_authority() {
    let policy = Policy {
        authority: Some("api.example.com".to_owned()),
        ..Policy::default()
    };
    let pinned = Verifier::new(handle_k1(), policy);

    // Signed for api.example.com, received with an internal Host (behind a load balancer).
    let mut parts = signed(b"");
    set_header(&mut parts, "host", "10.0.0.7:8080");
    pinned.verify(&parts, b"", NOW).unwrap();
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::BadSignature
    );

    // Signed for another host: the request's own Host is not trusted by the pinned verifier.
    let mut parts = request("POST", "/orders?id=42", "evil.example.com");
    signer().sign(&mut parts, b"", None, NOW, &nonce()).unwrap();
    verifier().verify(&parts, b"", NOW).unwrap();
    assert_eq!(
        reason(pinned.verify(&parts, b"", NOW)),
        Reason::BadSignature
    );
}

#[test]
fn authority_is_lowercased_and_default_port_dropped() {
    let mut parts = request("POST", "/orders?id=42", "API.Example.com:80");
    signer().sign(&mut parts, b"", None, NOW, &nonce()).unwrap();
    let member = header(&parts, "signature-input");
    let member = member.strip_prefix("countersign=").unwrap();
    let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
    assert!(
        base.as_str()
            .contains("\n\"@authority\": api.example.com\n"),
        "{base}"
    );

    for host in ["api.example.com", "api.example.com:80", "API.EXAMPLE.COM"] {
        let mut received = parts.clone();
        set_header(&mut received, "host", host);
        verifier().verify(&received, b"", NOW).unwrap();
    }
    let mut received = parts.clone();
    set_header(&mut received, "host", "api.example.com:443");
    assert_eq!(
        reason(verifier().verify(&received, b"", NOW)),
        Reason::BadSignature
    );

    // Over https, :443 is the default port instead.
    let https = Verifier::new(
        handle_k1(),
        Policy {
            scheme: Some("https".to_owned()),
            ..Policy::default()
        },
    );
    https.verify(&received, b"", NOW).unwrap();
}

#[test]
fn missing_or_duplicate_host_is_malformed() {
    let mut parts = signed(b"");
    parts.headers.remove("host");
    assert_eq!(
        reason(verifier().verify(&parts, b"", NOW)),
        Reason::MalformedSignature
    );

    let mut parts = signed(b"");
    parts
        .headers
        .append("host", HeaderValue::from_static("api.example.com"));
    let err = verifier().verify(&parts, b"", NOW).unwrap_err();
    assert_eq!(err.reason(), Reason::MalformedSignature);
    // Named as what it is, not as a bad value.
    assert!(
        err.detail().contains("more than one Host field line"),
        "{}",
        err.detail()
    );

    // The signer refuses such a request with the same words.
    let mut parts = request("POST", "/", "api.example.com");
    parts
        .headers
        .append("host", HeaderValue::from_static("other.example.com"));
    let err = signer()
        .sign(&mut parts, b"", None, NOW, &nonce())
        .unwrap_err();
    assert!(
        err.to_string().contains("more than one Host field line"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Header fields with several field lines

#[test]
fn multiple_field_lines_are_trimmed_and_joined() {
    let covering = Signer::new(
        handle_k1(),
        SignerConfig {
            extra_headers: vec![HeaderName::from_static("x-trace")],
            ..SignerConfig::default()
        },
    );
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    parts
        .headers
        .append("x-trace", HeaderValue::from_static("  a=1 "));
    parts
        .headers
        .append("x-trace", HeaderValue::from_static("b=2\t"));
    covering.sign(&mut parts, b"", None, NOW, &nonce()).unwrap();
    let member = header(&parts, "signature-input");
    let member = member.strip_prefix("countersign=").unwrap();
    let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
    assert!(
        base.as_str().contains("\n\"x-trace\": a=1, b=2\n"),
        "{base}"
    );
    verifier().verify(&parts, b"", NOW).unwrap();

    // One combined line is the same field value.
    let mut combined = parts.clone();
    set_header(&mut combined, "x-trace", "a=1, b=2");
    verifier().verify(&combined, b"", NOW).unwrap();

    // Reordered lines are a different value.
    let mut reordered = parts.clone();
    reordered.headers.remove("x-trace");
    reordered
        .headers
        .append("x-trace", HeaderValue::from_static("b=2"));
    reordered
        .headers
        .append("x-trace", HeaderValue::from_static("a=1"));
    assert_eq!(
        reason(verifier().verify(&reordered, b"", NOW)),
        Reason::BadSignature
    );

    // A third line.
    let mut extended = parts.clone();
    extended
        .headers
        .append("x-trace", HeaderValue::from_static("c=3"));
    assert_eq!(
        reason(verifier().verify(&extended, b"", NOW)),
        Reason::BadSignature
    );
}

#[test]
fn signature_fields_split_over_several_lines_verify() {
    let parts = signed(b"");
    let mut split = parts.clone();
    let input = header(&parts, "signature-input");
    let sig = header(&parts, "signature");
    split.headers.remove("signature-input");
    split.headers.remove("signature");
    for (name, first, second) in [
        (
            "signature-input",
            r#"other=("@method");created=1;keyid="x""#.to_owned(),
            input,
        ),
        ("signature", "other=:AAAA:".to_owned(), sig),
    ] {
        split
            .headers
            .append(name, HeaderValue::from_str(&first).unwrap());
        split
            .headers
            .append(name, HeaderValue::from_str(&second).unwrap());
    }
    verifier().verify(&split, b"", NOW).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A conformant peer with its own parameter and component order

/// Another RFC 9421 implementation may serialise the parameters (and order the components)
/// differently. The verifier rebuilds `@signature-params` from the received member, so the peer's
/// order is MACed as sent. The expected base is written out by hand and MACed here.
#[test]
fn peer_parameter_order_is_kept() {
    let body = br#"{"item":"book"}"#;
    let digest = content_digest_sha256(body);
    let params = format!(
        r#"("x-auth-user" "content-digest" "@query" "@path" "@authority" "@method");keyid="k1";tag="countersign";alg="hmac-sha256";nonce="{NONCE}";expires={};created={NOW}"#,
        NOW + 10
    );
    let base = [
        "\"x-auth-user\": Zo%C3%AB".to_owned(),
        format!("\"content-digest\": {digest}"),
        "\"@query\": ?id=42".to_owned(),
        "\"@path\": /orders".to_owned(),
        "\"@authority\": api.example.com".to_owned(),
        "\"@method\": POST".to_owned(),
        format!("\"@signature-params\": {params}"),
    ]
    .join("\n");

    let mut parts = request("POST", "/orders?id=42", "api.example.com:80");
    set_header(&mut parts, "x-auth-user", "Zo%C3%AB");
    set_header(&mut parts, "content-digest", &digest);
    set_header(&mut parts, "signature-input", &format!("peer={params}"));
    let mac = hmac_b64(&SECRET_K1, &base);
    set_header(&mut parts, "signature", &format!("peer=:{mac}:"));

    let rebuilt = signature_base_for(&RequestView::from_parts(&parts), &params).unwrap();
    assert_eq!(rebuilt.as_str(), base);

    let v = verifier().verify(&parts, body, NOW).unwrap();
    assert_eq!(v.identity, Some(Identity::new("Zoë", Vec::<String>::new())));
    assert_eq!(v.created, NOW);

    // The same MAC under the canonical (our) parameter order is a different base: rejected.
    let mut reordered = parts.clone();
    let ours = format!(
        r#"peer=("x-auth-user" "content-digest" "@query" "@path" "@authority" "@method");created={NOW};expires={};nonce="{NONCE}";keyid="k1";alg="hmac-sha256";tag="countersign""#,
        NOW + 10
    );
    set_header(&mut reordered, "signature-input", &ours);
    assert_eq!(
        reason(verifier().verify(&reordered, body, NOW)),
        Reason::BadSignature
    );
}

/// Every kind of parameter value (true and false booleans, token, decimal, byte sequence, string
/// with escapes, unknown keys) and components with parameters (`;key`, `;bs`, `;name`): the
/// verifier's `@signature-params` line equals the RFC 8941 serialisation of the received member.
#[test]
fn signature_params_with_every_value_type_verify() {
    let body = b"x";
    let digest = content_digest_sha256(body);
    let params = format!(
        r#"("@method" "@authority" "@path" "@query" "content-digest" "x-dict";key="a" "x-bin";bs "@query-param";name="id");created={NOW};x-flag;x-off=?0;x-tok=abc/d:e;x-dec=1.5;x-bytes=:AQID:;x-str="say \"hi\" \\ ok";nonce="{NONCE}";keyid="k1";tag="countersign""#
    );
    let mut parts = request("POST", "/orders?id=42", "api.example.com");
    set_header(&mut parts, "content-digest", &digest);
    set_header(&mut parts, "x-dict", "a=1;p, b=2");
    // `;bs` carries bytes that are not visible ASCII (here Latin-1 "café").
    parts
        .headers
        .insert("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let rebuilt = signature_base_for(&RequestView::from_parts(&parts), &params).unwrap();
    assert!(rebuilt
        .as_str()
        .ends_with(&format!("\n\"@signature-params\": {params}")));
    assert!(rebuilt.as_str().contains("\n\"x-dict\";key=\"a\": 1;p\n"));
    assert!(rebuilt.as_str().contains("\n\"x-bin\";bs: :Y2Fm6Q==:\n"));
    assert!(rebuilt
        .as_str()
        .contains("\n\"@query-param\";name=\"id\": 42\n"));
    set_header(&mut parts, "signature-input", &format!("peer={params}"));
    let mac = hmac_b64(&SECRET_K1, rebuilt.as_str());
    set_header(&mut parts, "signature", &format!("peer=:{mac}:"));
    verifier().verify(&parts, body, NOW).unwrap();

    // Flip the false boolean to true: a different base.
    let mut flipped = parts.clone();
    edit_input(&mut flipped, |s| s.replace(";x-off=?0", ";x-off"));
    assert_eq!(
        reason(verifier().verify(&flipped, body, NOW)),
        Reason::BadSignature
    );
}

// ---------------------------------------------------------------------------------------------
// The worked example of docs/PROTOCOL.md

const EXAMPLE_SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const EXAMPLE_NONCE: &str = "dGhpcyBpcyBhIG5vbmNlIQ";
const EXAMPLE_CREATED: u64 = 1_700_000_000;
const EXAMPLE_BODY: &[u8] = br#"{"item":"book","qty":1}"#;
const EXAMPLE_CONTENT_DIGEST: &str = "sha-256=:SqTsJBvyNh+ArgZhJK4lNXo+XGqb5zDvy9gHJLvgICE=:";
const EXAMPLE_USER: &str = "Zo%C3%AB%20Smith";
const EXAMPLE_ROLES: &str = "admin,r%26d";
const EXAMPLE_SIGNATURE_INPUT: &str = concat!(
    r#"countersign=("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user" "x-auth-roles")"#,
    r#";created=1700000000;expires=1700000010;nonce="dGhpcyBpcyBhIG5vbmNlIQ";keyid="k1";alg="hmac-sha256";tag="countersign""#,
);
const EXAMPLE_SIGNATURE: &str = "countersign=:w5inAMU+tfmDROq96fWRhHPjU2bBtWVYC1xs+TjQFtE=:";
const EXAMPLE_BASE: &str = r#""@method": POST
"@authority": api.example.com
"@path": /orders
"@query": ?id=42&note=caf%C3%A9
"content-digest": sha-256=:SqTsJBvyNh+ArgZhJK4lNXo+XGqb5zDvy9gHJLvgICE=:
"x-auth-user": Zo%C3%AB%20Smith
"x-auth-roles": admin,r%26d
"@signature-params": ("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user" "x-auth-roles");created=1700000000;expires=1700000010;nonce="dGhpcyBpcyBhIG5vbmNlIQ";keyid="k1";alg="hmac-sha256";tag="countersign""#;

fn example_request() -> Parts {
    http::Request::builder()
        .method("POST")
        .uri("/orders?id=42&note=caf%C3%A9")
        .header("host", "API.Example.com")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn example_keyring() -> KeyringHandle {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(EXAMPLE_SECRET_B64)
        .unwrap();
    assert_eq!(bytes, (0u8..32).collect::<Vec<_>>());
    KeyringHandle::new(Keyring::single("k1", Secret::new(bytes).unwrap()).unwrap())
}

#[test]
fn protocol_worked_example() {
    let mut parts = example_request();
    let identity = Identity::new("Zoë Smith", ["admin", "r&d"]);
    Signer::new(example_keyring(), SignerConfig::default())
        .sign(
            &mut parts,
            EXAMPLE_BODY,
            Some(&identity),
            EXAMPLE_CREATED,
            &Nonce::new(EXAMPLE_NONCE).unwrap(),
        )
        .unwrap();
    let input = header(&parts, "signature-input");
    let member = input.strip_prefix("countersign=").unwrap();
    let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();

    assert_eq!(header(&parts, "content-digest"), EXAMPLE_CONTENT_DIGEST);
    assert_eq!(header(&parts, "x-auth-user"), EXAMPLE_USER);
    assert_eq!(header(&parts, "x-auth-roles"), EXAMPLE_ROLES);
    assert_eq!(input, EXAMPLE_SIGNATURE_INPUT);
    assert_eq!(header(&parts, "signature"), EXAMPLE_SIGNATURE);
    assert_eq!(base.as_str(), EXAMPLE_BASE);
    // The MAC is HMAC-SHA256 over exactly the base text, with the raw secret as key.
    let secret = base64::engine::general_purpose::STANDARD
        .decode(EXAMPLE_SECRET_B64)
        .unwrap();
    assert_eq!(
        format!("countersign=:{}:", hmac_b64(&secret, EXAMPLE_BASE)),
        EXAMPLE_SIGNATURE
    );
    let verifier = Verifier::new(example_keyring(), Policy::default());
    let v = verifier
        .verify(&parts, EXAMPLE_BODY, EXAMPLE_CREATED + 5)
        .unwrap();
    assert_eq!(v.identity, Some(identity));
    assert_eq!(v.replay_until, EXAMPLE_CREATED + 13);
    assert_eq!(encode_value("Zoë Smith"), EXAMPLE_USER);
}

/// The document shows the same strings the test above asserts, so neither can change alone.
#[test]
fn protocol_document_shows_the_worked_example() {
    let doc = include_str!("../docs/PROTOCOL.md");
    for (what, text) in [
        ("secret", EXAMPLE_SECRET_B64),
        ("nonce", EXAMPLE_NONCE),
        ("body", std::str::from_utf8(EXAMPLE_BODY).unwrap()),
        ("request line", "POST /orders?id=42&note=caf%C3%A9 HTTP/1.1"),
        (
            "content-digest",
            &format!("Content-Digest: {EXAMPLE_CONTENT_DIGEST}\n"),
        ),
        ("user", &format!("X-Auth-User: {EXAMPLE_USER}\n")),
        ("roles", &format!("X-Auth-Roles: {EXAMPLE_ROLES}\n")),
        (
            "signature-input",
            &format!("Signature-Input: {EXAMPLE_SIGNATURE_INPUT}\n"),
        ),
        ("signature", &format!("Signature: {EXAMPLE_SIGNATURE}\n")),
        ("base", &format!("```\n{EXAMPLE_BASE}\n```")),
    ] {
        assert!(
            doc.contains(text),
            "docs/PROTOCOL.md lacks the example {what}: {text}"
        );
    }
}

//! The shortcuts the signing core takes for speed give the same answers as the long way:
//!
//! - the verifier takes the received `Signature-Input` inner list as the `@signature-params`
//!   value only when the fast-path parser saw it in serialised form (`InnerList::canonical`):
//!   that text must equal the serialisation, and every other spelling must be re-serialised;
//! - coverage and duplicate checks on a bit mask of known components;
//! - the per-key HMAC state cloned per MAC (plain and rotated keys) equals HMAC over the key;
//! - the signer replaces earlier signature and identity fields with `insert` instead of
//!   `remove` + `insert`.

use base64::Engine as _;
use countersign::core::sf_fast::{self, Entry};
use countersign::core::{
    signature_base_for, Identity, KeySpec, Keyring, KeyringHandle, Nonce, Policy, Reason,
    RequestView, Rotation, Secret, Signer, SignerConfig, Verifier,
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::HeaderValue;
use proptest::prelude::*;
use sha2::Sha256;
use std::time::Duration;

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [0x3c; 32];
const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAAAA";

// ---------------------------------------------------------------------------------------------
// `InnerList::canonical` against the serialiser

/// Bare items, some written other than as serialised (leading zeros, `-0`, byte sequences).
fn bare() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{1,4}",
        "0[0-9]{1,3}",
        Just("-0".to_owned()),
        "\"[ !#-\\[\\]-~]{0,12}\"",
        "[A-Za-z*][A-Za-z0-9:/.*-]{0,8}",
        "\\?[01]",
        proptest::collection::vec(any::<u8>(), 0..8)
            .prop_map(|b| format!(":{}:", base64::engine::general_purpose::STANDARD.encode(b))),
    ]
}

/// Spacing where RFC 8941 serialises none (or one): mostly the serialised choice.
fn gap(serialised: &'static str) -> impl Strategy<Value = &'static str> {
    let other = if serialised.is_empty() { " " } else { "  " };
    prop_oneof![6 => Just(serialised), 1 => Just(other)]
}

fn params() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (gap(""), "[a-z][a-z0-9-]{0,6}", proptest::option::of(bare())),
        0..4,
    )
    .prop_map(|ps| {
        let mut seen = Vec::new();
        let mut out = String::new();
        for (sp, key, value) in ps {
            // Repeated keys make the fast path decline; keep each key once.
            if seen.contains(&key) {
                continue;
            }
            out.push(';');
            out.push_str(sp);
            out.push_str(&key);
            if let Some(v) = value {
                out.push('=');
                out.push_str(&v);
            }
            seen.push(key);
        }
        out
    })
}

fn inner_list() -> impl Strategy<Value = String> {
    (
        gap(""),
        proptest::collection::vec((gap(" "), bare(), params()), 0..6),
        gap(""),
        params(),
    )
        .prop_map(|(lead, items, end, list_params)| {
            let mut out = String::from("(");
            out.push_str(lead);
            for (i, (sep, b, p)) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                out.push_str(b);
                out.push_str(p);
            }
            out.push_str(end);
            out.push(')');
            out.push_str(&list_params);
            out
        })
}

fn serialised(il: &sf_fast::InnerList<'_>) -> String {
    let mut out = String::new();
    sf_fast::write_inner_list(&mut out, il).unwrap();
    out
}

/// Checks one `sig=<list>` input; returns whether the fast path took the received text.
fn check_canonical(list: &str) -> Result<bool, TestCaseError> {
    let input = format!("sig={list}");
    let Some(dict) = sf_fast::parse_dictionary(input.as_bytes()) else {
        return Ok(false);
    };
    let Some((_, Entry::InnerList(il))) = dict.members.first() else {
        return Err(TestCaseError::fail("not an inner list"));
    };
    let reference = serialised(il);
    match il.canonical {
        Some(text) => {
            prop_assert_eq!(text, list);
            prop_assert_eq!(text, reference.as_str());
            Ok(true)
        }
        None => {
            // Declining is always safe; but text in serialised form without byte sequences
            // (which are never taken) should be taken, or the shortcut is dead.
            prop_assert!(
                reference != list || list.contains(':'),
                "serialised text not taken: {list}"
            );
            Ok(false)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn canonical_text_is_the_serialisation(list in inner_list()) {
        check_canonical(&list)?;
    }
}

#[test]
fn canonical_detection_examples() {
    let taken = [
        r#"("@method" "x");created=1;nonce="n";alg="hmac-sha256""#,
        "()",
        "();a;b=?0",
        r#"("a";key="k" "b";bs)"#,
        "(1 -1 0 tok ?1)",
    ];
    for list in taken {
        assert!(check_canonical(list).unwrap(), "not taken: {list}");
    }
    let declined = [
        r#"( "a")"#,
        r#"("a" )"#,
        r#"("a"  "b")"#,
        r#"("a");  created=1"#,
        r#"("a");created=01"#,
        "(-0)",
        "(007)",
        "();flag=?1",
        r#"("a";x=?1)"#,
        "(:AAAA:)",
        "();b=:AAAA:",
    ];
    for list in declined {
        assert!(!check_canonical(list).unwrap(), "taken: {list}");
    }
}

// ---------------------------------------------------------------------------------------------
// Through the verifier

fn handle() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap()).unwrap())
}

fn unsigned() -> http::request::Parts {
    http::Request::builder()
        .method("POST")
        .uri("/api/orders?x=1")
        .header("host", "api.example.com")
        .header("date", "Tue, 20 Apr 2021 02:07:55 GMT")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn hmac_b64(base: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(base);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Adds `Content-Digest` of `body` and signs `member` as a peer would: the base from
/// `signature_base_for` (sfv's serialisation of the member), the MAC with the raw key.
fn peer_signed(member: &str, body: &[u8]) -> http::request::Parts {
    let mut parts = unsigned();
    let digest = countersign::core::content_digest_sha256(body);
    parts
        .headers
        .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
    let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
    let sig = hmac_b64(base.as_bytes());
    parts.headers.insert(
        "signature-input",
        HeaderValue::from_str(&format!("countersign={member}")).unwrap(),
    );
    parts.headers.insert(
        "signature",
        HeaderValue::from_str(&format!("countersign=:{sig}:")).unwrap(),
    );
    parts
}

const COVERED: &str = r#""@method" "@authority" "@path" "@query" "content-digest""#;

fn member(covered: &str, created: &str, sep: &str) -> String {
    format!(
        r#"({covered});{sep}created={created};nonce="{NONCE}";keyid="k1";alg="hmac-sha256";tag="countersign""#
    )
}

/// Other spellings of the same member verify (the verifier re-serialises them), in the
/// serialised spelling and in each non-serialised one. Were the received text taken as the
/// `@signature-params` value for a spelling other than the serialised one, the MAC would differ.
#[test]
fn every_spelling_of_a_member_verifies() {
    let verifier = Verifier::new(handle(), Policy::default());
    let created = NOW.to_string();
    let spellings = [
        member(COVERED, &created, ""),
        member(&format!(" {COVERED}"), &created, ""),
        member(&format!("{COVERED} "), &created, ""),
        member(&COVERED.replace(' ', "  "), &created, ""),
        member(COVERED, &created, " "),
        member(COVERED, &format!("0{created}"), ""),
        format!("{};flag=?1", member(COVERED, &created, "")),
        format!("{};b=:AAAA:", member(COVERED, &created, "")),
    ];
    for m in &spellings {
        let parts = peer_signed(m, b"{}");
        let verified = verifier
            .verify(&parts, b"{}", NOW)
            .unwrap_or_else(|e| panic!("{m}: {e:?}"));
        assert_eq!(verified.created, NOW, "{m}");
    }
}

/// A MAC over the received, non-serialised text (not what RFC 9421 signs) is rejected: the
/// verifier does not take such text as the `@signature-params` value.
#[test]
fn mac_over_unserialised_text_is_rejected() {
    let verifier = Verifier::new(handle(), Policy::default());
    let created = NOW.to_string();
    for m in [
        member(&format!(" {COVERED}"), &created, ""),
        member(COVERED, &created, " "),
        member(COVERED, &format!("0{created}"), ""),
        format!("{};flag=?1", member(COVERED, &created, "")),
    ] {
        let mut parts = peer_signed(&m, b"{}");
        // The base with the member's own text as the last line.
        let canonical = signature_base_for(&RequestView::from_parts(&parts), &m).unwrap();
        let text = canonical.as_str();
        let head = &text[..text.rfind("\"@signature-params\": ").unwrap()];
        let raw_base = format!("{head}\"@signature-params\": {m}");
        assert_ne!(raw_base, text);
        let sig = hmac_b64(raw_base.as_bytes());
        parts.headers.insert(
            "signature",
            HeaderValue::from_str(&format!("countersign=:{sig}:")).unwrap(),
        );
        assert_eq!(
            verifier.verify(&parts, b"{}", NOW).unwrap_err().reason(),
            Reason::BadSignature,
            "{m}"
        );
    }
}

/// Duplicates are found whether the repeated component is one the verifier knows (mask) or
/// not (serialised comparison), and with parameters.
#[test]
fn duplicates_known_and_unknown() {
    let created = NOW.to_string();
    let profile = Verifier::new(handle(), Policy::default());
    let foreign = Verifier::new(handle(), Policy::rfc9421(&["@method"]));
    for (covered, verifier) in [
        (format!("{COVERED} \"@method\""), &profile),
        (format!("{COVERED} \"date\" \"date\""), &profile),
        (format!("\"date\" {COVERED} \"date\""), &profile),
        (
            format!("{COVERED} \"@query-param\";name=\"x\" \"@query-param\";name=\"x\""),
            &profile,
        ),
        ("\"@method\" \"date\" \"@method\"".to_owned(), &foreign),
        ("\"date\" \"@method\" \"date\"".to_owned(), &foreign),
    ] {
        let m = member(&covered, &created, "");
        let mut parts = unsigned();
        let digest = countersign::core::content_digest_sha256(b"{}");
        parts
            .headers
            .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
        parts.headers.insert(
            "signature-input",
            HeaderValue::from_str(&format!("countersign={m}")).unwrap(),
        );
        parts.headers.insert(
            "signature",
            HeaderValue::from_static("countersign=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"),
        );
        let err = verifier.verify(&parts, b"{}", NOW).unwrap_err();
        assert_eq!(err.reason(), Reason::MalformedSignature, "{covered}");
        assert!(err.detail().contains("covered twice"), "{covered}: {err:?}");
    }
}

/// Coverage rules through the mask: a required component missing, an identity field present
/// but not covered, an extra header present but not covered; and the same covered verify.
#[test]
fn coverage_rules_on_the_mask() {
    let extra = http::HeaderName::from_static("x-tenant");
    let policy = Policy {
        extra_headers: vec![extra.clone()],
        ..Policy::default()
    };
    let verifier = Verifier::new(handle(), policy);
    let created = NOW.to_string();
    // (covered components, extra fields on the request, expected outcome)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Result<(), Reason>);
    let cases: [Case<'_>; 5] = [
        (COVERED, &[], Ok(())),
        (
            r#""@method" "@authority" "@path" "content-digest""#,
            &[],
            Err(Reason::InsufficientCoverage),
        ),
        (
            r#""@method" "@authority" "@path" "@query""#,
            &[],
            Err(Reason::MissingDigest),
        ),
        (
            COVERED,
            &[("x-auth-user", "alice")],
            Err(Reason::InsufficientCoverage),
        ),
        (
            COVERED,
            &[("x-tenant", "t1")],
            Err(Reason::InsufficientCoverage),
        ),
    ];
    for (covered, fields, want) in cases {
        let m = member(covered, &created, "");
        let mut parts = unsigned();
        for (name, value) in fields {
            parts
                .headers
                .insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let digest = countersign::core::content_digest_sha256(b"{}");
        parts
            .headers
            .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
        let base = signature_base_for(&RequestView::from_parts(&parts), &m).unwrap();
        let sig = hmac_b64(base.as_bytes());
        parts.headers.insert(
            "signature-input",
            HeaderValue::from_str(&format!("countersign={m}")).unwrap(),
        );
        parts.headers.insert(
            "signature",
            HeaderValue::from_str(&format!("countersign=:{sig}:")).unwrap(),
        );
        let got = verifier
            .verify(&parts, b"{}", NOW)
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, want, "{covered} {fields:?}");
    }
    // Covered, the extra header verifies.
    let m = member(&format!("{COVERED} \"x-tenant\""), &created, "");
    let mut parts = unsigned();
    parts.headers.insert(extra, HeaderValue::from_static("t1"));
    let digest = countersign::core::content_digest_sha256(b"{}");
    parts
        .headers
        .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
    let base = signature_base_for(&RequestView::from_parts(&parts), &m).unwrap();
    parts.headers.insert(
        "signature-input",
        HeaderValue::from_str(&format!("countersign={m}")).unwrap(),
    );
    parts.headers.insert(
        "signature",
        HeaderValue::from_str(&format!("countersign=:{}:", hmac_b64(base.as_bytes()))).unwrap(),
    );
    verifier.verify(&parts, b"{}", NOW).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The signer

/// The `Signature` the signer sends is HMAC-SHA256, keyed with the raw key bytes, over the base
/// a verifier derives from the `Signature-Input` it sends: with a static key and with a rotated
/// (HKDF-derived) key, whose precomputed MAC state is built from the derived secret.
#[test]
fn signer_mac_equals_hmac_over_the_base() {
    let rotating = Keyring::new(
        "r",
        vec![KeySpec {
            id: "r".into(),
            secret: Secret::new(SECRET.to_vec()).unwrap(),
            retired: false,
            rotation: None,
        }],
        Rotation::Every(Duration::from_secs(3600)),
    )
    .unwrap();
    let derived = countersign::core::derive_rotated(
        &Secret::new(SECRET.to_vec()).unwrap(),
        &format!("r.{}", NOW / 3600),
    );
    for (keyring, key) in [
        (
            Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap()).unwrap(),
            SECRET.to_vec(),
        ),
        (rotating, derived.expose().to_vec()),
    ] {
        let handle = KeyringHandle::new(keyring);
        let mut parts = unsigned();
        Signer::new(handle.clone(), SignerConfig::default())
            .sign(
                &mut parts,
                b"body",
                Some(&Identity::new("zoë", ["a", "b"])),
                NOW,
                &Nonce::new(NONCE).unwrap(),
            )
            .unwrap();
        let input = parts.headers["signature-input"].to_str().unwrap();
        let member = input.strip_prefix("countersign=").unwrap();
        let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(base.as_bytes());
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(
            parts.headers["signature"].to_str().unwrap(),
            format!("countersign=:{want}:")
        );
        Verifier::new(handle, Policy::default())
            .verify(&parts, b"body", NOW)
            .unwrap();
    }
}

fn field_lines(parts: &http::request::Parts, name: &str) -> Vec<String> {
    parts
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Earlier lines of every field the signer sets are replaced (all of them), and identity
/// fields it does not set are removed.
#[test]
fn signer_replaces_earlier_fields() {
    let signer = Signer::new(handle(), SignerConfig::default());
    let verifier = Verifier::new(handle(), Policy::default());
    let stale = [
        "signature",
        "signature-input",
        "content-digest",
        "x-auth-user",
        "x-auth-roles",
    ];
    for identity in [
        Some(Identity::new("alice", ["admin"])),
        Some(Identity::new("bob", Vec::<String>::new())),
        None,
    ] {
        let mut parts = unsigned();
        for name in stale {
            parts
                .headers
                .append(name, HeaderValue::from_static("stale1"));
            parts
                .headers
                .append(name, HeaderValue::from_static("stale2"));
        }
        signer
            .sign(
                &mut parts,
                b"{}",
                identity.as_ref(),
                NOW,
                &Nonce::new(NONCE).unwrap(),
            )
            .unwrap();
        for name in ["signature", "signature-input", "content-digest"] {
            let lines = field_lines(&parts, name);
            assert_eq!(lines.len(), 1, "{name}: {lines:?}");
            assert!(!lines[0].contains("stale"), "{name}");
        }
        let user = field_lines(&parts, "x-auth-user");
        let roles = field_lines(&parts, "x-auth-roles");
        match &identity {
            Some(id) => {
                assert_eq!(user, vec![id.user.clone()]);
                if id.roles.is_empty() {
                    assert!(roles.is_empty(), "{roles:?}");
                } else {
                    assert_eq!(roles, vec![id.roles.join(",")]);
                }
            }
            None => assert!(user.is_empty() && roles.is_empty(), "{user:?} {roles:?}"),
        }
        let verified = verifier.verify(&parts, b"{}", NOW).unwrap();
        assert_eq!(verified.identity, identity);
    }
}

/// With extra covered headers, a stale signature field named as an extra header is removed
/// before the base is built, so it is neither covered nor left on the request.
#[test]
fn signer_with_extra_headers_drops_stale_signature_fields() {
    let config = SignerConfig {
        extra_headers: vec![
            http::HeaderName::from_static("date"),
            http::HeaderName::from_static("signature"),
        ],
        ..SignerConfig::default()
    };
    let signer = Signer::new(handle(), config);
    let mut parts = unsigned();
    parts
        .headers
        .insert("signature", HeaderValue::from_static("stale=:AAAA:"));
    signer
        .sign(&mut parts, b"{}", None, NOW, &Nonce::new(NONCE).unwrap())
        .unwrap();
    let input = parts.headers["signature-input"].to_str().unwrap();
    assert!(input.contains("\"date\""), "{input}");
    assert!(!input.contains("\"signature\""), "{input}");
    assert_eq!(field_lines(&parts, "signature").len(), 1);
    Verifier::new(handle(), Policy::default())
        .verify(&parts, b"{}", NOW)
        .unwrap();
}

/// Field values with bytes outside ASCII (obs-text, which a `HeaderValue` may hold) are
/// malformed in every field the verifier reads, before or after the MAC.
#[test]
fn non_ascii_field_values_are_malformed() {
    let verifier = Verifier::new(handle(), Policy::default());
    let signer = Signer::new(handle(), SignerConfig::default());
    for field in [
        "signature-input",
        "signature",
        "content-digest",
        "x-auth-user",
        "x-auth-roles",
    ] {
        let mut parts = unsigned();
        signer
            .sign(
                &mut parts,
                b"{}",
                Some(&Identity::new("alice", ["admin"])),
                NOW,
                &Nonce::new(NONCE).unwrap(),
            )
            .unwrap();
        verifier.verify(&parts, b"{}", NOW).unwrap();
        let mut value = parts.headers[field].as_bytes().to_vec();
        value.push(0xe9);
        parts
            .headers
            .insert(field, HeaderValue::from_bytes(&value).unwrap());
        let err = verifier.verify(&parts, b"{}", NOW).unwrap_err();
        assert_eq!(err.reason(), Reason::MalformedSignature, "{field}: {err:?}");
    }
}

/// The signer writes the fields it sets (`Content-Digest`, the identity fields) into the base
/// from their values, before they are in the map: that base must equal the one read back from
/// the signed request, for every identity shape, body and stale earlier lines.
#[test]
fn signer_base_from_set_values_equals_the_base_read_back() {
    let user_only = Identity::new("alice@example.com", Vec::<String>::new());
    let with_roles = Identity::new("Zoë", ["admin", "a,b"]);
    for identity in [None, Some(&user_only), Some(&with_roles)] {
        for body in [&b""[..], b"body"] {
            for stale in [false, true] {
                let mut parts = unsigned();
                if stale {
                    for (name, value) in [
                        ("content-digest", " sha-256=:AAAA:"),
                        ("x-auth-user", "mallory "),
                        ("x-auth-roles", "root"),
                        ("x-auth-roles", "\tsecond"),
                    ] {
                        parts.headers.append(name, HeaderValue::from_static(value));
                    }
                }
                Signer::new(handle(), SignerConfig::default())
                    .sign(&mut parts, body, identity, NOW, &Nonce::new(NONCE).unwrap())
                    .unwrap();
                let input = parts.headers["signature-input"].to_str().unwrap();
                let member = input.strip_prefix("countersign=").unwrap();
                let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
                assert_eq!(
                    parts.headers["signature"].to_str().unwrap(),
                    format!("countersign=:{}:", hmac_b64(base.as_bytes())),
                    "identity {identity:?}, body {body:?}, stale {stale}"
                );
                let verified = Verifier::new(handle(), Policy::default())
                    .verify(&parts, body, NOW)
                    .unwrap();
                assert_eq!(verified.identity.as_ref(), identity);
            }
        }
    }
}

/// A signer whose extra covered headers name an identity field it sets would cover that
/// field twice whenever a user signs: `SignerConfig::validate` refuses the config, so every
/// request fails with the same error, anonymous ones too (they signed, and the config's fault
/// showed only once a user signed in).
#[test]
fn signer_with_colliding_field_names_is_refused() {
    let nonce = Nonce::new(NONCE).unwrap();
    let config = SignerConfig {
        extra_headers: vec![http::header::HeaderName::from_static("x-auth-user")],
        ..SignerConfig::default()
    };
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("x-auth-user"), "{err}");
    let colliding = Signer::new(handle(), config);
    for identity in [None, Some(Identity::new("alice", ["admin"]))] {
        let mut parts = unsigned();
        let before = parts.headers.clone();
        let err = colliding
            .sign(&mut parts, b"body", identity.as_ref(), NOW, &nonce)
            .unwrap_err();
        assert!(err.to_string().contains("x-auth-user"), "{err}");
        assert_eq!(parts.headers, before, "a refused request is left as it was");
    }
}

/// A signature that cannot be made (no authority to cover) leaves the request as it was.
#[test]
fn failed_signature_leaves_the_request_unchanged() {
    let mut parts = http::Request::builder()
        .method("GET")
        .uri("/no-host")
        .header("x-auth-user", "stale")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let before = parts.headers.clone();
    Signer::new(handle(), SignerConfig::default())
        .sign(
            &mut parts,
            b"",
            Some(&Identity::new("alice", ["admin"])),
            NOW,
            &Nonce::new(NONCE).unwrap(),
        )
        .unwrap_err();
    assert_eq!(parts.headers, before);
}

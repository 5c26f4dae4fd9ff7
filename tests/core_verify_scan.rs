//! The verifier's three readers of `Signature-Input` (the exact-shape reader of what the
//! countersign signer writes, the scan that materialises nothing, and the full parser) must give
//! the same answer: whenever the exact-shape reader or the scan decides (does not decline), its
//! result equals the full path's, down to the reason and the log detail; and the exact-shape
//! reader is the one that decides for what the countersign signer writes.
//!
//! Inputs: signed requests whose `Signature-Input` member is generated from pools of covered
//! names (known, unknown, repeated, with parameters), parameters (every type, in and out of
//! range, unknown ones, repeated), spacing, extra members and tags, each correctly MACed over
//! its base when it has one; and random mutations of real signer output.

mod support_mutation;

use base64::Engine as _;
use countersign::core::{
    signature_base_for, HeadersVerified, Identity, Keyring, KeyringHandle, Nonce, Policy, Reason,
    RequestView, Secret, Selector, Signer, SignerConfig, Verified, Verifier, VerifyError,
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::HeaderValue;
use proptest::prelude::*;
use sha2::Sha256;
use support_mutation::{mutate, mutation};

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [0x5a; 32];
const BODY: &[u8] = b"{}";

fn handle() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap()).unwrap())
}

fn verifiers() -> Vec<Verifier> {
    vec![
        Verifier::new(handle(), Policy::default()),
        Verifier::new(
            handle(),
            Policy {
                selector: Selector::Only,
                ..Policy::default()
            },
        ),
        Verifier::new(handle(), Policy::rfc9421(&["@method", "@path"])),
    ]
}

fn signed(identity: Option<&Identity>) -> http::request::Parts {
    let mut parts = http::Request::builder()
        .method("POST")
        .uri("/api/orders?x=1")
        .header("host", "api.example.com")
        .header("date", "Tue, 20 Apr 2021 02:07:55 GMT")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    Signer::new(handle(), SignerConfig::default())
        .sign(
            &mut parts,
            BODY,
            identity,
            NOW,
            &Nonce::new("AAAAAAAAAAAAAAAAAAAAAA").unwrap(),
        )
        .unwrap();
    parts
}

/// What a verification amounts to, for comparing the two readers.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Headers(Verified, Result<(), (Reason, String)>),
    Rejected(Reason, String),
}

fn outcome(result: Result<HeadersVerified, VerifyError>) -> Outcome {
    match result {
        Ok(headers) => {
            let verified = headers.verified().clone();
            let body = headers
                .check_body(BODY)
                .map(|_| ())
                .map_err(|e| (e.reason(), e.detail().to_owned()));
            Outcome::Headers(verified, body)
        }
        Err(e) => Outcome::Rejected(e.reason(), e.detail().to_owned()),
    }
}

/// Compares the readers on `parts`; returns whether the scan decided.
fn same_answer(verifier: &Verifier, parts: &http::request::Parts) -> Result<bool, TestCaseError> {
    let reference = outcome(verifier.verify_headers_reference(parts, NOW));
    let input = parts.headers.get("signature-input");
    let template = verifier.verify_headers_template(parts, NOW).map(outcome);
    let scanned = verifier.verify_headers_scanned(parts, NOW).map(outcome);
    if let Some(template) = &template {
        prop_assert_eq!(
            template,
            &reference,
            "exact-shape reader, Signature-Input {:?}",
            input
        );
        // The exact shape is a subset of what the scan decides.
        prop_assert!(
            scanned.is_some(),
            "the exact-shape reader decided what the scan declines: {:?}",
            input
        );
    }
    // And the public entry point gives the same.
    prop_assert_eq!(
        outcome(verifier.verify_headers(parts, NOW)),
        reference.clone()
    );
    // So does the hinting one. Its hint comes at most once: for an accepted signature exactly
    // with its nonce, never for one whose times are out of range or that is not there.
    let mut hints = Vec::new();
    let hinted =
        outcome(verifier.verify_headers_hinting(parts, NOW, |nonce| hints.push(nonce.to_owned())));
    prop_assert_eq!(&hinted, &reference);
    prop_assert!(hints.len() <= 1, "hinted {:?}", hints);
    match &reference {
        Outcome::Headers(verified, _) => {
            prop_assert_eq!(hints.first().map(String::as_str), verified.nonce.as_deref());
        }
        Outcome::Rejected(Reason::Expired | Reason::NotYetValid | Reason::MissingSignature, _) => {
            prop_assert!(hints.is_empty(), "hinted {:?} for {:?}", hints, reference);
        }
        Outcome::Rejected(..) => {}
    }
    let Some(scanned) = scanned else {
        return Ok(false);
    };
    prop_assert_eq!(&scanned, &reference, "Signature-Input {:?}", input);
    Ok(true)
}

/// Puts `members` (`label=<inner list>` texts) into `Signature-Input` and a `Signature` with a
/// correct MAC for each member whose base can be built (else a wrong one).
fn install(parts: &mut http::request::Parts, members: &[(String, String)]) {
    let mut inputs = Vec::new();
    let mut signatures = Vec::new();
    for (label, list) in members {
        inputs.push(format!("{label}={list}"));
        let mac = match signature_base_for(&RequestView::from_parts(parts), list) {
            Ok(base) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
                mac.update(base.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            Err(_) => vec![7; 32],
        };
        signatures.push(format!(
            "{label}=:{}:",
            base64::engine::general_purpose::STANDARD.encode(mac)
        ));
    }
    if let Ok(value) = HeaderValue::from_str(&inputs.join(", ")) {
        parts.headers.insert("signature-input", value);
    }
    if let Ok(value) = HeaderValue::from_str(&signatures.join(", ")) {
        parts.headers.insert("signature", value);
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

fn covered_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(vec![
            "\"@method\"",
            "\"@authority\"",
            "\"@path\"",
            "\"@query\"",
            "\"content-digest\"",
            "\"x-auth-user\"",
            "\"x-auth-roles\"",
        ])
        .prop_map(str::to_owned),
        1 => proptest::sample::select(vec![
            "\"date\"",
            "\"@target-uri\"",
            "\"@scheme\"",
            "\"@status\"",
            "\"X-Upper\"",
            "\"host\"",
            "\"absent-field\"",
            "\"@query-param\";name=\"x\"",
            "\"content-digest\";bs",
            "\"x-auth-user\";bs",
            "token",
            "1",
        ])
        .prop_map(str::to_owned),
    ]
}

fn param() -> impl Strategy<Value = String> {
    let created = prop_oneof![
        Just(NOW.to_string()),
        Just((NOW - 5).to_string()),
        Just((NOW + 60).to_string()),
        Just((NOW - 60).to_string()),
        Just("-1".to_owned()),
        Just("\"1700000000\"".to_owned()),
    ];
    let expires = prop_oneof![
        Just((NOW + 10).to_string()),
        Just((NOW - 30).to_string()),
        Just("?1".to_owned()),
    ];
    let nonce = prop_oneof![
        Just("\"AAAAAAAAAAAAAAAAAAAAAA\"".to_owned()),
        Just("\"short\"".to_owned()),
        Just(format!("\"{}\"", "n".repeat(300))),
        Just("nonce-token".to_owned()),
    ];
    let keyid = prop_oneof![
        Just("\"k1\"".to_owned()),
        Just("\"k2\"".to_owned()),
        Just("42".to_owned()),
    ];
    let alg = prop_oneof![
        Just("\"hmac-sha256\"".to_owned()),
        Just("\"rsa-pss-sha512\"".to_owned()),
        Just("hmac-sha256".to_owned()),
    ];
    let tag = prop_oneof![
        Just("\"countersign\"".to_owned()),
        Just("\"other\"".to_owned()),
        Just("countersign".to_owned()),
    ];
    prop_oneof![
        created.prop_map(|v| format!(";created={v}")),
        expires.prop_map(|v| format!(";expires={v}")),
        nonce.prop_map(|v| format!(";nonce={v}")),
        keyid.prop_map(|v| format!(";keyid={v}")),
        alg.prop_map(|v| format!(";alg={v}")),
        tag.prop_map(|v| format!(";tag={v}")),
        Just(";note=\"x\"".to_owned()),
        Just(";flag".to_owned()),
        Just("; created=1700000000".to_owned()),
    ]
}

/// The profile's parameters in the signer's order, most of the time valid.
fn usual_params() -> impl Strategy<Value = String> {
    Just(format!(
        ";created={NOW};expires={};nonce=\"AAAAAAAAAAAAAAAAAAAAAA\";keyid=\"k1\";alg=\"hmac-sha256\";tag=\"countersign\"",
        NOW + 10
    ))
}

fn inner_list() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(covered_name(), 0..9),
        proptest::sample::select(vec![" ", " ", " ", "  "]),
        prop_oneof![
            3 => usual_params(),
            2 => proptest::collection::vec(param(), 0..8).prop_map(|p| p.concat()),
            2 => (usual_params(), proptest::collection::vec(param(), 1..3))
                .prop_map(|(u, p)| format!("{}{u}", p.concat())),
        ],
    )
        .prop_map(|(names, separator, params)| format!("({}){params}", names.join(separator)))
}

/// The profile's covered list (in the signer's order or shuffled, sometimes with a name
/// repeated or dropped) with its usual parameters: the shape the scan decides.
fn profile_list() -> impl Strategy<Value = String> {
    let names = vec![
        "\"@method\"",
        "\"@authority\"",
        "\"@path\"",
        "\"@query\"",
        "\"content-digest\"",
    ];
    (
        Just(names).prop_shuffle(),
        any::<bool>(),
        proptest::option::of(0..5usize),
        proptest::option::of(0..5usize),
        usual_params(),
    )
        .prop_map(|(mut names, shuffled, repeat, drop, params)| {
            if !shuffled {
                names.sort_by_key(|n| {
                    ["\"@method\"", "\"@authority\"", "\"@path\"", "\"@query\""]
                        .iter()
                        .position(|m| m == n)
                        .unwrap_or(9)
                });
            }
            if let Some(i) = repeat.filter(|i| i % 2 == 0) {
                names.push(names[i]);
            }
            if let Some(i) = drop.filter(|i| i % 3 == 0) {
                names.remove(i);
            }
            format!("({}){params}", names.join(" "))
        })
}

fn members() -> impl Strategy<Value = Vec<(String, String)>> {
    prop_oneof![
        1 => profile_list().prop_map(|list| vec![("countersign".to_owned(), list)]),
        2 => any_members(),
    ]
}

fn any_members() -> impl Strategy<Value = Vec<(String, String)>> {
    let label = proptest::sample::select(vec!["countersign", "sig1", "other"]);
    proptest::collection::vec(
        (
            label,
            prop_oneof![
                8 => inner_list(),
                1 => Just("token".to_owned()),
                1 => Just(":AAAA:".to_owned()),
            ],
        ),
        1..3,
    )
    .prop_map(|ms| {
        ms.into_iter()
            .map(|(label, list)| (label.to_owned(), list))
            .collect()
    })
}

/// The exact shape the signer writes, piece by piece, each piece usually right and otherwise a
/// near miss of the exact-shape reader's template (a leading zero, 16 digits, a sign, a decimal,
/// an escape, a token for a string, a missing or extra parameter, another order, spacing,
/// another list, a second member).
fn template_members() -> impl Strategy<Value = Vec<(String, String)>> {
    let base = r#""@method" "@authority" "@path" "@query" "content-digest""#;
    let list = prop_oneof![
        6 => proptest::sample::select(vec![
            format!("({base})"),
            format!(r#"({base} "x-auth-user")"#),
            format!(r#"({base} "x-auth-user" "x-auth-roles")"#),
        ]),
        1 => proptest::sample::select(vec![
            format!(r#"({base} "x-auth-roles")"#),
            format!(r#"({base} "x-auth-user" "x-auth-roles" "date")"#),
            format!(r#"({base} "x-auth-user" "x-auth-user")"#),
            format!(r#"({base}  "x-auth-user")"#),
            format!("( {base})"),
            format!("({base} )"),
            r#"("@method" "@authority" "@path" "@query")"#.to_owned(),
            r#"("@authority" "@method" "@path" "@query" "content-digest")"#.to_owned(),
            format!(r#"({base} "x-auth-user";bs)"#),
            format!("({base}"),
        ]),
    ];
    let integer = |good: u64| {
        prop_oneof![
            6 => Just(good.to_string()),
            1 => proptest::sample::select(vec![
                (NOW - 5).to_string(),
                (NOW + 60).to_string(),
                (NOW - 60).to_string(),
                "0".to_owned(),
                "00".to_owned(),
                format!("0{good}"),
                "999999999999999".to_owned(),
                "1000000000000000".to_owned(),
                format!("-{good}"),
                format!("{good}.5"),
                format!("\"{good}\""),
                String::new(),
                "?1".to_owned(),
            ]),
        ]
    };
    let string = |good: &'static str| {
        prop_oneof![
            6 => Just(format!("\"{good}\"")),
            1 => proptest::sample::select(vec![
                "\"\"".to_owned(),
                format!("\"{good}\\\\\""),
                format!("\"\\\"{good}\""),
                format!("\"{good} x\""),
                format!("\"{good}"),
                // an unfinished escape or a tab where the closing quote belongs
                format!("\"{good}\\"),
                format!("\"{good}\t"),
                good.to_owned(),
                "\"short\"".to_owned(),
                format!("\"{}\"", "n".repeat(300)),
                "42".to_owned(),
            ]),
        ]
    };
    let params = (
        integer(NOW),
        integer(NOW + 10),
        string("AAAAAAAAAAAAAAAAAAAAAA"),
        string("k1"),
        prop_oneof![
            6 => Just("\"hmac-sha256\"".to_owned()),
            1 => proptest::sample::select(vec![
                "\"HMAC-SHA256\"".to_owned(),
                "hmac-sha256".to_owned(),
                "\"rsa-pss-sha512\"".to_owned(),
            ]),
        ],
        string("countersign"),
    )
        .prop_map(|(created, expires, nonce, keyid, alg, tag)| {
            vec![
                format!(";created={created}"),
                format!(";expires={expires}"),
                format!(";nonce={nonce}"),
                format!(";keyid={keyid}"),
                format!(";alg={alg}"),
                format!(";tag={tag}"),
            ]
        });
    let edit = prop_oneof![
        8 => Just(None),
        1 => (0..6usize, 0..6usize).prop_map(Some),
    ];
    let drop = prop_oneof![8 => Just(None), 1 => (0..6usize).prop_map(Some)];
    let trailer = prop_oneof![
        8 => Just(String::new()),
        1 => proptest::sample::select(vec![
            ";note=\"x\"".to_owned(),
            ";tag=\"countersign\"".to_owned(),
            ";flag".to_owned(),
            ", ".to_owned(),
            " ".to_owned(),
        ]),
    ];
    let label = prop_oneof![
        6 => Just("countersign"),
        1 => proptest::sample::select(vec!["sig1", "*x", "a.b-c_d", "Upper", "1x", ""]),
    ];
    let second = prop_oneof![
        8 => Just(None),
        1 => proptest::sample::select(vec![
            format!("({base});created={NOW};nonce=\"AAAAAAAAAAAAAAAAAAAAAA\";keyid=\"k1\";tag=\"countersign\""),
            format!("({base});created={NOW};tag=\"other\""),
        ])
        .prop_map(Some),
    ];
    (list, params, edit, drop, trailer, label, second).prop_map(
        |(list, mut params, swap, drop, trailer, label, second)| {
            if let Some((a, b)) = swap {
                params.swap(a, b);
            }
            if let Some(i) = drop {
                params.remove(i);
            }
            let mut members = vec![(
                label.to_owned(),
                format!("{list}{}{trailer}", params.concat()),
            )];
            if let Some(second) = second {
                members.push(("second".to_owned(), second));
            }
            members
        },
    )
}

/// Bytes that matter to the `Signature-Input` grammar.
fn grammar_byte() -> impl Strategy<Value = u8> + Clone {
    proptest::sample::select(b"()\";=, :*-.0123456789az?\\".to_vec())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn scan_equals_full_path_on_generated_members(
        members in members(),
        with_identity in any::<bool>(),
    ) {
        let identity = Identity::new("alice", ["admin", "ops"]);
        let mut parts = signed(with_identity.then_some(&identity));
        install(&mut parts, &members);
        for verifier in verifiers() {
            same_answer(&verifier, &parts)?;
        }
    }

    #[test]
    fn exact_shape_reader_equals_full_path_on_near_misses(
        members in template_members(),
        identity in proptest::sample::select(vec![0usize, 1, 2]),
    ) {
        let identities = [
            None,
            Some(Identity::new("alice@example.com", Vec::<String>::new())),
            Some(Identity::new("Zoë", ["admin", "a,b"])),
        ];
        let mut parts = signed(identities[identity].as_ref());
        install(&mut parts, &members);
        for verifier in verifiers() {
            same_answer(&verifier, &parts)?;
        }
    }

    #[test]
    fn scan_equals_full_path_on_mutated_signer_output(
        mutations in proptest::collection::vec(mutation(grammar_byte()), 1..4),
        field in proptest::sample::select(vec!["signature-input", "signature", "content-digest"]),
    ) {
        let mut parts = signed(Some(&Identity::new("alice", ["admin"])));
        let value = mutate(parts.headers[field].as_bytes().to_vec(), &mutations);
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            parts.headers.insert(field, value);
        }
        for verifier in verifiers() {
            same_answer(&verifier, &parts)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Examples

/// The scan decides for what the signer writes (with and without identity), and accepts it.
#[test]
fn signer_output_is_decided_by_the_scan() {
    let verifier = Verifier::new(handle(), Policy::default());
    let identity = Identity::new("Zoë", ["admin", "a,b"]);
    for identity in [None, Some(&identity)] {
        let parts = signed(identity);
        let scanned = verifier
            .verify_headers_scanned(&parts, NOW)
            .expect("the scan declined signer output")
            .unwrap();
        assert_eq!(scanned.verified().identity.as_ref(), identity);
        assert!(same_answer(&verifier, &parts).unwrap());
    }
}

/// Every shape the scan leaves to the full path is declined (not decided), and both readers
/// still agree through `verify_headers`.
#[test]
fn unusual_shapes_are_declined() {
    let verifier = Verifier::new(handle(), Policy::default());
    let usual = format!(
        ";created={NOW};nonce=\"AAAAAAAAAAAAAAAAAAAAAA\";keyid=\"k1\";alg=\"hmac-sha256\";tag=\"countersign\""
    );
    let covered = r#""@method" "@authority" "@path" "@query" "content-digest""#;
    let cases = [
        // not in serialised form
        format!("( {covered}){usual}"),
        // a parameter the profile does not read
        format!("({covered}){usual};note=\"x\""),
        // a covered name this verifier does not know
        format!("({covered} \"date\"){usual}"),
        // a covered identifier with parameters
        format!("({covered} \"@query-param\";name=\"x\"){usual}"),
        // a profile parameter of the wrong type
        format!("({covered});created=\"{NOW}\";nonce=\"AAAAAAAAAAAAAAAAAAAAAA\";keyid=\"k1\";tag=\"countersign\""),
    ];
    for list in cases {
        let mut parts = signed(None);
        install(&mut parts, &[("countersign".to_owned(), list.clone())]);
        assert!(
            verifier.verify_headers_scanned(&parts, NOW).is_none(),
            "decided: {list}"
        );
        assert!(!same_answer(&verifier, &parts).unwrap());
    }
    // Two members with the profile's tag: ambiguous, left to the full path, which rejects it.
    let mut parts = signed(None);
    let list = format!("({covered}){usual}");
    install(
        &mut parts,
        &[
            ("countersign".to_owned(), list.clone()),
            ("second".to_owned(), list),
        ],
    );
    assert!(verifier.verify_headers_scanned(&parts, NOW).is_none());
    assert_eq!(
        verifier.verify_headers(&parts, NOW).unwrap_err().reason(),
        Reason::MalformedSignature
    );
}

/// Rejections the scan decides, each with the full path's reason.
#[test]
fn scan_rejections_match() {
    let verifier = Verifier::new(handle(), Policy::default());
    let covered = r#""@method" "@authority" "@path" "@query" "content-digest""#;
    let nonce = "nonce=\"AAAAAAAAAAAAAAAAAAAAAA\"";
    let cases = [
        (
            format!("({covered});created={NOW};{nonce};keyid=\"k1\";alg=\"x\";tag=\"countersign\""),
            Reason::UnsupportedAlgorithm,
        ),
        (
            format!(
                "({covered});created={};{nonce};keyid=\"k1\";tag=\"countersign\"",
                NOW + 60
            ),
            Reason::NotYetValid,
        ),
        (
            format!(
                "({covered});created={};{nonce};keyid=\"k1\";tag=\"countersign\"",
                NOW - 60
            ),
            Reason::Expired,
        ),
        (
            format!("({covered});created={NOW};{nonce};keyid=\"k9\";tag=\"countersign\""),
            Reason::UnknownKey,
        ),
        (
            format!("({covered});created={NOW};keyid=\"k1\";tag=\"countersign\""),
            Reason::MalformedSignature,
        ),
        (
            format!(
                r#"("@method" "@authority" "@path" "@query");created={NOW};{nonce};keyid="k1";tag="countersign""#
            ),
            Reason::MissingDigest,
        ),
        (
            format!(
                r#"("@method" "@authority" "@path" "@method" "@query" "content-digest");created={NOW};{nonce};keyid="k1";tag="countersign""#
            ),
            Reason::MalformedSignature,
        ),
    ];
    for (list, reason) in cases {
        let mut parts = signed(None);
        install(&mut parts, &[("countersign".to_owned(), list.clone())]);
        let scanned = verifier
            .verify_headers_scanned(&parts, NOW)
            .unwrap_or_else(|| panic!("declined: {list}"));
        assert_eq!(scanned.unwrap_err().reason(), reason, "{list}");
        assert!(same_answer(&verifier, &parts).unwrap());
    }
    // A wrong MAC on signer output.
    let mut parts = signed(None);
    parts.headers.insert(
        "signature",
        HeaderValue::from_static("countersign=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"),
    );
    let scanned = verifier.verify_headers_scanned(&parts, NOW).unwrap();
    assert_eq!(scanned.unwrap_err().reason(), Reason::BadSignature);
    assert!(same_answer(&verifier, &parts).unwrap());
}

/// The identity read back from the base equals the fields as sent, including a field sent in
/// two lines (joined with ", " in the base and by the full path alike).
#[test]
fn identity_from_the_base_equals_the_fields() {
    let verifier = Verifier::new(handle(), Policy::default());
    let mut parts = signed(None);
    parts
        .headers
        .append("x-auth-user", HeaderValue::from_static("Zo%C3%AB"));
    parts
        .headers
        .append("x-auth-roles", HeaderValue::from_static("admin"));
    parts
        .headers
        .append("x-auth-roles", HeaderValue::from_static("a%2Cb"));
    let list = format!(
        r#"("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user" "x-auth-roles");created={NOW};nonce="AAAAAAAAAAAAAAAAAAAAAA";keyid="k1";tag="countersign""#
    );
    install(&mut parts, &[("countersign".to_owned(), list)]);
    // Two role lines join as "admin, a%2Cb": the space makes the second role non-canonical,
    // as it does when the full path joins the lines itself.
    let scanned = verifier.verify_headers_scanned(&parts, NOW).unwrap();
    assert_eq!(
        scanned.unwrap_err().detail(),
        "roles field is not canonical percent-encoded UTF-8"
    );
    assert!(same_answer(&verifier, &parts).unwrap());
    let mut parts = signed(None);
    parts
        .headers
        .append("x-auth-user", HeaderValue::from_static("  Zo%C3%AB "));
    let list = format!(
        r#"("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user");created={NOW};nonce="AAAAAAAAAAAAAAAAAAAAAA";keyid="k1";tag="countersign""#
    );
    install(&mut parts, &[("countersign".to_owned(), list)]);
    let verified = verifier
        .verify_headers_scanned(&parts, NOW)
        .unwrap()
        .unwrap();
    assert_eq!(verified.verified().identity.as_ref().unwrap().user, "Zoë");
    assert!(same_answer(&verifier, &parts).unwrap());
}

/// The generator must make the scan decide often (accepting and rejecting) and decline often,
/// or the property above compares little.
#[test]
fn generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let verifier = Verifier::new(handle(), Policy::default());
    let (mut accepted, mut rejected, mut declined) = (0, 0, 0);
    for _ in 0..600 {
        let members = members().new_tree(&mut runner).unwrap().current();
        let mut parts = signed(None);
        install(&mut parts, &members);
        match verifier.verify_headers_scanned(&parts, NOW) {
            Some(Ok(_)) => accepted += 1,
            Some(Err(_)) => rejected += 1,
            None => declined += 1,
        }
    }
    assert!(
        accepted >= 20 && rejected >= 60 && declined >= 60,
        "accepted {accepted}, rejected {rejected}, declined {declined}"
    );
}

/// The exact-shape reader decides for what the signer writes: with no identity, a user without
/// roles and a user with roles, for the profile's verifier and a `Selector::Only` one.
#[test]
fn signer_output_is_decided_by_the_exact_shape_reader() {
    let user_only = Identity::new("alice@example.com", Vec::<String>::new());
    let with_roles = Identity::new("Zoë", ["admin", "a,b"]);
    for verifier in &verifiers()[..2] {
        for identity in [None, Some(&user_only), Some(&with_roles)] {
            let parts = signed(identity);
            let decided = verifier
                .verify_headers_template(&parts, NOW)
                .expect("the exact-shape reader declined signer output")
                .unwrap();
            assert_eq!(decided.verified().identity.as_ref(), identity);
            assert_eq!(decided.verified().keyid, "k1");
            assert!(same_answer(verifier, &parts).unwrap());
        }
    }
}

/// Near misses of the exact shape are declined by the exact-shape reader, and the verifier
/// still gives the full path's answer for each.
#[test]
fn exact_shape_near_misses_are_declined() {
    let verifier = Verifier::new(handle(), Policy::default());
    let covered = r#""@method" "@authority" "@path" "@query" "content-digest""#;
    let tail = r#";nonce="AAAAAAAAAAAAAAAAAAAAAA";keyid="k1";alg="hmac-sha256";tag="countersign""#;
    let cases = [
        // a leading zero: not in serialised form
        format!("({covered});created=0{NOW};expires={}{tail}", NOW + 10),
        // 16 digits: not an RFC 8941 integer
        format!("({covered});created={NOW};expires=1000000000000000{tail}"),
        // a negative integer
        format!("({covered});created={NOW};expires=-1{tail}"),
        // an escape in a string
        format!(
            r#"({covered});created={NOW};expires={};nonce="AAAAAAAAAAAAAAAAAAAAA\\";keyid="k1";alg="hmac-sha256";tag="countersign""#,
            NOW + 10
        ),
        // another tag than the policy's
        format!(
            r#"({covered});created={NOW};expires={};nonce="AAAAAAAAAAAAAAAAAAAAAA";keyid="k1";alg="hmac-sha256";tag="other""#,
            NOW + 10
        ),
        // another order of the parameters
        format!(
            r#"({covered});expires={};created={NOW};nonce="AAAAAAAAAAAAAAAAAAAAAA";keyid="k1";alg="hmac-sha256";tag="countersign""#,
            NOW + 10
        ),
        // a parameter after the tag
        format!(
            "({covered});created={NOW};expires={}{tail};note=\"x\"",
            NOW + 10
        ),
        // another covered list
        format!(
            r#"({covered} "date");created={NOW};expires={}{tail}"#,
            NOW + 10
        ),
    ];
    for list in cases {
        let mut parts = signed(None);
        install(&mut parts, &[("countersign".to_owned(), list.clone())]);
        assert!(
            verifier.verify_headers_template(&parts, NOW).is_none(),
            "decided: {list}"
        );
        same_answer(&verifier, &parts).unwrap();
    }
    // A second member after the signer's.
    let mut parts = signed(None);
    let list = format!("({covered});created={NOW};expires={}{tail}", NOW + 10);
    install(
        &mut parts,
        &[
            ("countersign".to_owned(), list),
            ("other".to_owned(), format!("({covered});tag=\"x\"")),
        ],
    );
    assert!(verifier.verify_headers_template(&parts, NOW).is_none());
    same_answer(&verifier, &parts).unwrap();
}

/// The near-miss generator must make the exact-shape reader accept, reject and decline often,
/// or the property above compares little.
#[test]
fn template_generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let verifier = Verifier::new(handle(), Policy::default());
    let (mut accepted, mut rejected, mut declined) = (0, 0, 0);
    for _ in 0..600 {
        let members = template_members().new_tree(&mut runner).unwrap().current();
        let mut parts = signed(None);
        install(&mut parts, &members);
        match verifier.verify_headers_template(&parts, NOW) {
            Some(Ok(_)) => accepted += 1,
            Some(Err(_)) => rejected += 1,
            None => declined += 1,
        }
    }
    assert!(
        accepted >= 30 && rejected >= 60 && declined >= 100,
        "accepted {accepted}, rejected {rejected}, declined {declined}"
    );
}

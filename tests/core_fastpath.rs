//! The fast-path structured-field parser (`countersign::core::sf_fast`) against its reference,
//! `sfv` 0.10: whenever the fast path accepts an input it must return exactly what `sfv`
//! returns, it must never accept what `sfv` rejects, and the `@signature-params` serialiser must
//! produce sfv's serialisation byte for byte. Inputs are generated valid dictionaries (random
//! members, parameters, spacing), mutations of them, and random byte strings.
//!
//! The verifier-level tests check that both paths (fast, and `sfv` fallback) verify a genuine
//! signature and that the fast path is the one taken for what the countersign signer produces.

mod support_mutation;

use base64::Engine as _;
use countersign::core::sf_fast::{self, Dict, Entry};
use countersign::core::{
    signature_base_for, Identity, Keyring, KeyringHandle, Nonce, Policy, Reason, RequestView,
    Secret, Signer, SignerConfig, Verifier,
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::HeaderValue;
use proptest::prelude::*;
use sfv::{ListEntry, Parser, SerializeValue};
use sha2::Sha256;
use support_mutation::{mutate, mutation};

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [0x5a; 32];

// ---------------------------------------------------------------------------------------------
// Generators

/// Keys from a small pool (so repeats happen) plus random ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("sig".to_owned()),
        Just("countersign".to_owned()),
        Just("sha-256".to_owned()),
        Just("created".to_owned()),
        Just("keyid".to_owned()),
        Just("tag".to_owned()),
        "[a-z*][a-z0-9_.*-]{0,8}",
    ]
}

/// Serialised bare items of every type, including ones the fast path declines (escapes,
/// decimals, long byte sequences) and out-of-range numbers sfv rejects.
fn bare() -> impl Strategy<Value = String> {
    prop_oneof![
        // integers, up to 16 digits (16 is invalid), optionally negative
        ("-?", "[0-9]{1,16}").prop_map(|(s, d)| format!("{s}{d}")),
        // decimals (declined by the fast path), some invalid
        ("-?", "[0-9]{1,13}", "[0-9]{0,4}").prop_map(|(s, i, f)| format!("{s}{i}.{f}")),
        // strings, plain or with escapes, occasionally a bad escape
        "\"[ !#-\\[\\]-~]{0,20}\"",
        "\"([ -!#-\\[\\]-~]|\\\\\\\\|\\\\\"){0,12}\"",
        "\"[a-z]{0,3}\\\\[a-z]\"",
        // tokens
        "[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]{0,10}",
        // booleans, some invalid
        "\\?[012]",
        // byte sequences: canonical, unpadded, and raw random alphabet text
        proptest::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| format!(":{}:", base64::engine::general_purpose::STANDARD.encode(b))),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
        )),
        ":[A-Za-z0-9+/=]{0,12}:",
    ]
}

fn spaces() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => Just(""),
        2 => Just(" "),
        1 => Just("  "),
        1 => Just("\t"),
    ]
}

fn params() -> impl Strategy<Value = String> {
    proptest::collection::vec((spaces(), key(), proptest::option::of(bare())), 0..4).prop_map(
        |ps| {
            let mut out = String::new();
            for (sp, k, v) in ps {
                out.push(';');
                out.push_str(sp);
                out.push_str(&k);
                if let Some(v) = v {
                    out.push('=');
                    out.push_str(&v);
                }
            }
            out
        },
    )
}

fn item() -> impl Strategy<Value = String> {
    (bare(), params()).prop_map(|(b, p)| format!("{b}{p}"))
}

fn inner_list() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec((spaces(), item()), 0..6),
        spaces(),
        params(),
    )
        .prop_map(|(items, end_sp, p)| {
            let mut out = String::from("(");
            for (i, (sp, it)) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(sp);
                out.push_str(it);
            }
            out.push_str(end_sp);
            out.push(')');
            out.push_str(&p);
            out
        })
}

fn member() -> impl Strategy<Value = String> {
    prop_oneof![
        (key(), inner_list()).prop_map(|(k, l)| format!("{k}={l}")),
        (key(), item()).prop_map(|(k, i)| format!("{k}={i}")),
        (key(), params()).prop_map(|(k, p)| format!("{k}{p}")),
    ]
}

/// A dictionary (mostly valid; spacing and values sometimes are not).
fn dictionary() -> impl Strategy<Value = String> {
    (
        spaces(),
        proptest::collection::vec((member(), spaces(), spaces()), 0..5),
        spaces(),
    )
        .prop_map(|(lead, members, trail)| {
            let mut out = lead.replace('\t', " ");
            for (i, (m, before, after)) in members.iter().enumerate() {
                if i > 0 {
                    out.push_str(before);
                    out.push(',');
                    out.push_str(after);
                }
                out.push_str(m);
            }
            out.push_str(&trail.replace('\t', " "));
            out
        })
}

/// Bytes that matter to the grammar, plus some that never may appear.
fn interesting_byte() -> impl Strategy<Value = u8> + Clone {
    prop_oneof![
        proptest::sample::select(
            b"()\"\\:;=,? \t*-.0123456789aAzZ/+!#$%&'^_`|~\x7f\x00\n".to_vec()
        ),
        any::<u8>(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The differential check

/// RFC 8941's serialisation of one inner list (`@signature-params` style): sfv's, given its
/// decimals as RFC 8941 §4.1.5 writes them (rounded to three places, no trailing zeros), which
/// sfv 0.10 does not do itself (it keeps the parsed scale: `1.50`).
fn sfv_inner_list_text(il: &sfv::InnerList) -> Result<String, &'static str> {
    fn canonical(item: &mut sfv::BareItem) {
        if let sfv::BareItem::Decimal(d) = item {
            *d = d.round_dp(3).normalize();
        }
    }
    let mut il = il.clone();
    for item in &mut il.items {
        canonical(&mut item.bare_item);
        item.params.values_mut().for_each(canonical);
    }
    il.params.values_mut().for_each(canonical);
    vec![ListEntry::InnerList(il)].serialize_value()
}

/// Our serialisation of a view's inner list.
fn fast_inner_list_text(il: &sf_fast::InnerList<'_>) -> Result<String, sf_fast::NotSerializable> {
    let mut out = String::new();
    sf_fast::write_inner_list(&mut out, il)?;
    Ok(out)
}

/// The serialiser must agree with sfv's on every inner list of `view`, which equals `reference`.
fn check_serialisation(view: &Dict<'_>, reference: &sfv::Dictionary) -> Result<(), TestCaseError> {
    for ((_, entry), (_, ref_entry)) in view.members.iter().zip(reference.iter()) {
        if let (Entry::InnerList(il), ListEntry::InnerList(ref_il)) = (entry, ref_entry) {
            let ours = fast_inner_list_text(il).ok();
            let theirs = sfv_inner_list_text(ref_il).ok();
            prop_assert_eq!(ours, theirs);
        }
    }
    Ok(())
}

/// What `scan_signature_input` must report for a member the fast parser read as `entry`.
fn check_scanned_member(
    entry: &Entry<'_>,
    scanned: &sf_fast::ScannedMember<'_>,
) -> Result<(), TestCaseError> {
    use sf_fast::{Bare, ScannedMember, SignatureParams};
    match (entry, scanned) {
        (Entry::Item(_), ScannedMember::Item) => Ok(()),
        (Entry::InnerList(il), ScannedMember::InnerList(list)) => {
            let names: Vec<&str> = il
                .items
                .iter()
                .filter_map(|item| match (&item.bare, item.params.is_empty()) {
                    (Bare::String(s), true) => Some(*s),
                    _ => None,
                })
                .collect();
            let plain = names.len() == il.items.len() && names.len() <= sf_fast::MAX_SCANNED_ITEMS;
            prop_assert_eq!(list.plain, plain);
            if plain {
                let scanned_names: Vec<&str> =
                    (0..list.len()).filter_map(|i| list.name(i)).collect();
                prop_assert_eq!(scanned_names, names);
            }
            let mut expected = SignatureParams::default();
            for (name, value) in &il.params {
                match (*name, value) {
                    ("created", Bare::Integer(v)) => expected.created = Some(*v),
                    ("expires", Bare::Integer(v)) => expected.expires = Some(*v),
                    ("nonce", Bare::String(v)) => expected.nonce = Some(*v),
                    ("keyid", Bare::String(v)) => expected.keyid = Some(*v),
                    ("alg", Bare::String(v)) => expected.alg = Some(*v),
                    ("tag", Bare::String(v)) => expected.tag = Some(*v),
                    _ => expected.other = true,
                }
            }
            prop_assert_eq!(list.params, expected);
            prop_assert_eq!(list.canonical, il.canonical);
            Ok(())
        }
        _ => Err(TestCaseError::fail("scanned member of another kind")),
    }
}

/// The verifier's scan of `Signature-Input` accepts exactly what the fast parser accepts and
/// reports the same members, names and parameters.
fn check_scan(input: &[u8], fast: Option<&Dict<'_>>) -> Result<(), TestCaseError> {
    let scanned = std::str::from_utf8(input).ok().and_then(|text| {
        let mut members = Vec::new();
        sf_fast::scan_signature_input(text, &mut |key, member| members.push((key, member)))
            .map(|()| members)
    });
    match (fast, scanned) {
        (None, None) => Ok(()),
        (Some(fast), Some(scanned)) => {
            prop_assert_eq!(fast.members.len(), scanned.len());
            for ((key, entry), (scanned_key, member)) in fast.members.iter().zip(&scanned) {
                prop_assert_eq!(key, scanned_key);
                check_scanned_member(entry, member)?;
            }
            Ok(())
        }
        (fast, scanned) => Err(TestCaseError::fail(format!(
            "fast parser accepted: {}, scan accepted: {}, input {:?}",
            fast.is_some(),
            scanned.is_some(),
            String::from_utf8_lossy(input)
        ))),
    }
}

/// The byte-sequence scan (`Signature`, `Content-Digest`) accepts exactly what the fast parser
/// accepts and classifies each wanted member as the parsed dictionary has it.
fn check_byte_scan(input: &[u8], fast: Option<&Dict<'_>>) -> Result<(), TestCaseError> {
    use sf_fast::{Bare, ScannedBytes, ScannedKind};
    let mut wanted: Vec<&str> = vec!["sha-256", "sig", "no-such-member"];
    if let Some(fast) = fast {
        wanted.extend(fast.members.iter().map(|(k, _)| *k).take(3));
    }
    // Wanted keys are distinct (the scan fills the first slot of a key).
    let mut distinct = Vec::new();
    for key in wanted {
        if !distinct.contains(&key) {
            distinct.push(key);
        }
    }
    let wanted = distinct;
    let mut out = vec![ScannedBytes::default(); wanted.len()];
    let scanned = std::str::from_utf8(input)
        .ok()
        .and_then(|text| sf_fast::scan_byte_members(text, &wanted, &mut out));
    prop_assert_eq!(
        scanned.is_some(),
        fast.is_some(),
        "input {:?}",
        String::from_utf8_lossy(input)
    );
    if let Some(fast) = fast {
        for (key, slot) in wanted.iter().zip(&out) {
            let (kind, bytes): (ScannedKind, &[u8]) = match fast.get(key) {
                None => (ScannedKind::Missing, &[]),
                Some(Entry::InnerList(_)) => (ScannedKind::InnerList, &[]),
                Some(Entry::Item(item)) => match &item.bare {
                    Bare::ByteSeq(b) => (ScannedKind::Bytes, b.as_slice()),
                    _ => (ScannedKind::NotBytes, &[]),
                },
            };
            prop_assert_eq!(slot.kind, kind, "member {}", key);
            prop_assert_eq!(slot.as_slice(), bytes, "member {}", key);
        }
    }
    Ok(())
}

/// The exact-shape reader of byte-sequence fields decides only single `<key>=:<base64>:`
/// members, and then exactly as the byte scan and the fast parser read them.
fn check_byte_member(input: &[u8], fast: Option<&Dict<'_>>) -> Result<bool, TestCaseError> {
    use sf_fast::{Bare, ScannedBytes, ScannedKind};
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(false);
    };
    let mut keys: Vec<&str> = vec!["sha-256", "sig", "countersign", "Upper", ""];
    if let Some(fast) = fast {
        keys.extend(fast.members.iter().map(|(k, _)| *k).take(2));
    }
    if let Some(key) = text.split('=').next() {
        keys.push(key);
    }
    let mut decided = false;
    for key in keys {
        let mut buf = [0u8; sf_fast::MAX_INLINE_BYTES];
        let Some(len) = sf_fast::match_byte_member(text, key, &mut buf) else {
            continue;
        };
        decided = true;
        let bytes = &buf[..len];
        let Some(fast) = fast else {
            return Err(TestCaseError::fail(format!(
                "exact-shape byte reader accepted what the fast parser declines: {text:?}"
            )));
        };
        prop_assert_eq!(fast.members.len(), 1, "input {:?}", text);
        match fast.get(key) {
            Some(Entry::Item(item)) => {
                prop_assert!(item.params.is_empty(), "input {:?}", text);
                match &item.bare {
                    Bare::ByteSeq(b) => prop_assert_eq!(b.as_slice(), bytes, "input {:?}", text),
                    other => {
                        return Err(TestCaseError::fail(format!("{other:?} for {text:?}")));
                    }
                }
            }
            other => return Err(TestCaseError::fail(format!("{other:?} for {text:?}"))),
        }
        let mut out = [ScannedBytes::default()];
        prop_assert!(sf_fast::scan_byte_members(text, &[key], &mut out).is_some());
        prop_assert_eq!(out[0].kind, ScannedKind::Bytes);
        prop_assert_eq!(out[0].as_slice(), bytes);
    }
    Ok(decided)
}

/// Returns whether the fast path accepted `input`.
fn differential(input: &[u8]) -> Result<bool, TestCaseError> {
    let reference = Parser::parse_dictionary(input);
    let fast = sf_fast::parse_dictionary(input);
    check_scan(input, fast.as_ref())?;
    check_byte_scan(input, fast.as_ref())?;
    check_byte_member(input, fast.as_ref())?;
    if let Ok(reference) = &reference {
        // The fallback view round-trips exactly and serialises as sfv does.
        let view = Dict::from_sfv(reference);
        prop_assert_eq!(&view.to_sfv(), reference);
        check_serialisation(&view, reference)?;
    }
    match (fast, &reference) {
        (None, _) => Ok(false),
        (Some(_), Err(e)) => Err(TestCaseError::fail(format!(
            "fast path accepted what sfv rejects ({e}): {:?}",
            String::from_utf8_lossy(input)
        ))),
        (Some(fast), Ok(reference)) => {
            prop_assert_eq!(
                &fast.to_sfv(),
                reference,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
            check_serialisation(&fast, reference)?;
            // parse_or_fallback returns the same dictionary whichever path it takes.
            let mut slot = None;
            let either = sf_fast::parse_or_fallback(input, &mut slot)
                .map(|d| d.to_sfv())
                .ok();
            prop_assert_eq!(either.as_ref(), Some(reference));
            Ok(true)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_equals_sfv_on_generated_dictionaries(input in dictionary()) {
        differential(input.as_bytes())?;
    }

    #[test]
    fn fast_path_equals_sfv_on_mutated_dictionaries(
        input in dictionary(),
        mutations in proptest::collection::vec(mutation(interesting_byte()), 1..4),
    ) {
        differential(&mutate(input.into_bytes(), &mutations))?;
    }

    #[test]
    fn fast_path_equals_sfv_on_random_bytes(
        input in proptest::collection::vec(interesting_byte(), 0..60),
    ) {
        differential(&input)?;
    }

    #[test]
    fn fast_path_equals_sfv_on_mutated_signer_output(
        nonce in "[A-Za-z0-9_-]{22,40}",
        mutations in proptest::collection::vec(mutation(interesting_byte()), 1..3),
    ) {
        let parts = signed(&nonce);
        for name in ["signature-input", "signature", "content-digest"] {
            let value = parts.headers[name].as_bytes().to_vec();
            prop_assert!(differential(&value)?, "fast path declined {}", name);
            if name != "signature-input" {
                let fast = sf_fast::parse_dictionary(&value);
                prop_assert!(
                    check_byte_member(&value, fast.as_ref())?,
                    "exact-shape byte reader declined {}",
                    name
                );
            }
            differential(&mutate(value, &mutations))?;
        }
    }
}

/// The generators must reach the fast path often enough for the properties above to mean
/// something, and must also produce inputs it declines and inputs sfv rejects.
#[test]
fn generators_cover_all_three_outcomes() {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut declined, mut rejected) = (0, 0, 0);
    for _ in 0..2000 {
        let input = dictionary().new_tree(&mut runner).unwrap().current();
        match (
            sf_fast::parse_dictionary(input.as_bytes()).is_some(),
            Parser::parse_dictionary(input.as_bytes()).is_ok(),
        ) {
            (true, _) => accepted += 1,
            (false, true) => declined += 1,
            (false, false) => rejected += 1,
        }
    }
    assert!(accepted > 200, "accepted {accepted}");
    assert!(declined > 100, "declined {declined}");
    assert!(rejected > 100, "rejected {rejected}");
}

// ---------------------------------------------------------------------------------------------
// Fixed cases

#[test]
fn declined_shapes_still_parse_with_sfv() {
    let declined: &[&str] = &[
        r#"a=("x" "y");s="q\"uote""#,                   // string escape
        "a=(\"x\");d=1.5",                                // decimal
        "a=1, a=2",                                       // repeated key
        "a=(\"x\");p=1;p=2",                              // repeated parameter
        "a=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==:", // > 64 bytes
        "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q",              // more than 16 members
        "a;b;c;d;e;f;g;h;i;j;k;l;m;n;o;p;q;r",            // more than 16 parameters
    ];
    for input in declined {
        assert!(
            sf_fast::parse_dictionary(input.as_bytes()).is_none(),
            "fast path accepted {input}"
        );
        let reference = Parser::parse_dictionary(input.as_bytes()).unwrap();
        let mut slot = None;
        let view = sf_fast::parse_or_fallback(input.as_bytes(), &mut slot).unwrap();
        assert_eq!(view.to_sfv(), reference, "{input}");
    }
}

#[test]
fn invalid_inputs_are_never_accepted() {
    let invalid: &[&[u8]] = &[
        b"a=",
        b"a=1,",
        b"a=1,,b=2",
        b"A=1",
        b"a=(\"x\"",
        b"a=(\"x\"\"y\")",
        b"a=\"unterminated",
        b"a=\"bad\\q\"",
        b"a=:not base64!:",
        b"a=:AAA",
        b"a=?2",
        b"a=1234567890123456",
        b"a=-",
        b"a=\"\xc3\xa9\"",
        b"a=\"ctl\x01\"",
        b"\ta=1",
        b"a=1 b=2",
        b"a=1;",
        b"a=1;B=2",
        b"a=(1)x",
    ];
    for input in invalid {
        assert!(Parser::parse_dictionary(input).is_err(), "{input:?}");
        assert!(sf_fast::parse_dictionary(input).is_none(), "{input:?}");
        let mut slot = None;
        assert!(sf_fast::parse_or_fallback(input, &mut slot).is_err());
    }
}

#[test]
fn accepted_shapes_match_sfv() {
    let accepted: &[&str] = &[
        "",
        "   ",
        "a=1",
        "  a=-0 ,\tb=?0;x;y=tok/en:1 , c  ",
        r#"sig=("@method" "@authority" "x";key="a" "y";bs);created=1;keyid="k";alg="hmac-sha256""#,
        "sig=(  \"a\"   \"b\"  );p",
        "sig=()",
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:, sha-512=:AAAA:",
        "a=:YQ:",
        "a=:YR==:",
        "a=*tok;*=\"\"",
        "a=999999999999999;b=-999999999999999",
    ];
    for input in accepted {
        let fast = sf_fast::parse_dictionary(input.as_bytes())
            .unwrap_or_else(|| panic!("fast path declined {input:?}"));
        assert_eq!(
            fast.to_sfv(),
            Parser::parse_dictionary(input.as_bytes()).unwrap(),
            "{input}"
        );
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
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn signed(nonce: &str) -> http::request::Parts {
    let mut parts = unsigned();
    Signer::new(handle(), SignerConfig::default())
        .sign(
            &mut parts,
            b"{}",
            Some(&Identity::new("alice", ["admin"])),
            NOW,
            &Nonce::new(nonce).unwrap(),
        )
        .unwrap();
    parts
}

#[test]
fn signer_output_takes_the_fast_path_and_verifies() {
    let parts = signed("AAAAAAAAAAAAAAAAAAAAAAAA");
    for name in ["signature-input", "signature", "content-digest"] {
        assert!(
            sf_fast::parse_dictionary(parts.headers[name].as_bytes()).is_some(),
            "{name} declined"
        );
    }
    let verified = Verifier::new(handle(), Policy::default())
        .verify(&parts, b"{}", NOW)
        .unwrap();
    assert_eq!(verified.keyid, "k1");
    assert_eq!(verified.identity.unwrap().user, "alice");
}

/// Signs `member` (a `Signature-Input` inner list with parameters) by hand, as a peer would.
fn sign_member(parts: &mut http::request::Parts, member: &str) {
    let base = signature_base_for(&RequestView::from_parts(parts), member).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(base.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    parts.headers.insert(
        "signature-input",
        HeaderValue::from_str(&format!("countersign={member}")).unwrap(),
    );
    parts.headers.insert(
        "signature",
        HeaderValue::from_str(&format!("countersign=:{sig}:")).unwrap(),
    );
}

const COVERED: &str = r#"("@method" "@authority" "@path" "@query" "content-digest")"#;

#[test]
fn fallback_shapes_verify_the_same() {
    let verifier = Verifier::new(handle(), Policy::default());
    let digest = countersign::core::content_digest_sha256(b"{}");
    let base_params = format!(
        r#"{COVERED};created={NOW};nonce="AAAAAAAAAAAAAAAAAAAAAAAA";keyid="k1";alg="hmac-sha256";tag="countersign""#
    );
    // Parameters the fast path declines (an escaped string, a decimal), so the sfv fallback
    // parses Signature-Input; the MAC covers them as RFC 8941 serialises them (`1.50` as
    // `1.5`: `signature_base_for` and the verifier both write the canonical form).
    for extra in [r#";note="a\"b""#, ";weight=1.50", ""] {
        let member = format!("{base_params}{extra}");
        let mut parts = unsigned();
        parts
            .headers
            .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
        sign_member(&mut parts, &member);
        let input = parts.headers["signature-input"].as_bytes().to_vec();
        assert_eq!(
            sf_fast::parse_dictionary(&input).is_none(),
            !extra.is_empty(),
            "{member}"
        );
        let verified = verifier.verify(&parts, b"{}", NOW).unwrap();
        assert_eq!(verified.keyid, "k1");
        // And a changed body still fails on either path.
        assert_eq!(
            verifier.verify(&parts, b"{ }", NOW).unwrap_err().reason(),
            Reason::DigestMismatch
        );
    }
}

#[test]
fn content_digest_fallback_and_long_values() {
    let verifier = Verifier::new(handle(), Policy::default());
    let good = countersign::core::content_digest_sha256(b"{}");
    let long = format!(
        ":{}:",
        base64::engine::general_purpose::STANDARD.encode([7u8; 100])
    );
    for (value, body_ok) in [
        // A repeated key: declined by the fast path; sfv keeps the last value.
        (format!("sha-256=:AAAA:, {good}"), true),
        // A sha-256 member longer than any digest: parses (sfv), never matches.
        (format!("sha-256={long}"), false),
    ] {
        let mut parts = unsigned();
        parts
            .headers
            .insert("content-digest", HeaderValue::from_str(&value).unwrap());
        let member = format!(
            r#"{COVERED};created={NOW};nonce="AAAAAAAAAAAAAAAAAAAAAAAA";keyid="k1";tag="countersign""#
        );
        sign_member(&mut parts, &member);
        let result = verifier.verify(&parts, b"{}", NOW);
        if body_ok {
            result.unwrap();
        } else {
            assert_eq!(result.unwrap_err().reason(), Reason::DigestMismatch);
        }
    }
}

/// The signer's output is byte-for-byte the documented profile, and its `Signature` is the HMAC
/// of the base a verifier derives from that `Signature-Input` member, with and without identity
/// fields and with an extra covered header (the signer's three covered-list paths).
#[test]
fn signer_output_is_the_profile_byte_for_byte() {
    let nonce = "AAAAAAAAAAAAAAAAAAAAAAAA";
    let cases: [(Option<Identity>, Vec<http::HeaderName>, &str); 4] = [
        (None, vec![], ""),
        (
            Some(Identity::new("al ice", Vec::<String>::new())),
            vec![],
            r#" "x-auth-user""#,
        ),
        (
            Some(Identity::new("alice", ["admin", "b,c"])),
            vec![],
            r#" "x-auth-user" "x-auth-roles""#,
        ),
        (
            Some(Identity::new("alice", ["admin"])),
            vec![
                http::HeaderName::from_static("host"),
                http::HeaderName::from_static("x-absent"),
            ],
            r#" "x-auth-user" "x-auth-roles" "host""#,
        ),
    ];
    for (identity, extra_headers, identity_ids) in cases {
        let mut parts = unsigned();
        let config = SignerConfig {
            extra_headers,
            ..SignerConfig::default()
        };
        Signer::new(handle(), config)
            .sign(
                &mut parts,
                b"{}",
                identity.as_ref(),
                NOW,
                &Nonce::new(nonce).unwrap(),
            )
            .unwrap();
        let member = format!(
            r#"("@method" "@authority" "@path" "@query" "content-digest"{identity_ids});created={NOW};expires={};nonce="{nonce}";keyid="k1";alg="hmac-sha256";tag="countersign""#,
            NOW + 10
        );
        assert_eq!(
            parts.headers["signature-input"].to_str().unwrap(),
            format!("countersign={member}")
        );
        let base = signature_base_for(&RequestView::from_parts(&parts), &member).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
        mac.update(base.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(
            parts.headers["signature"].to_str().unwrap(),
            format!("countersign=:{sig}:")
        );
        assert_eq!(
            parts.headers["content-digest"].to_str().unwrap(),
            "sha-256=:RBNvo1WzZ4oRRq0W9+hknpT7T8If536DEMBg9hyq/4o=:"
        );
        let verifier = Verifier::new(handle(), Policy::default());
        verifier.verify(&parts, b"{}", NOW).unwrap();
    }
}

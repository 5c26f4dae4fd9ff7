//! What each fuzz target checks, one function per target (`fn(&[u8])`), panicking on a
//! finding. Compiled twice: by the fuzz package (fuzz/fuzz_targets/*.rs call these) and by the
//! root package's tests/fuzz_corpus.rs (`#[path]`), which replays the committed corpus
//! (fuzz/corpus/<target>/) and regression inputs (fuzz/regressions/<target>/) through them, so
//! CI guards every finding without a fuzzer. Only the root package's dependencies are used.
//!
//! Input layouts (so hand-written seeds stay readable): most targets split the input at `\n`
//! into fields; a header value cannot hold a line break, so every field is a candidate value.

// The CLI's raw HTTP reader lives in the binary, not the library: compiled here from its file.
#[path = "../../src/cli/rawhttp.rs"]
#[allow(dead_code)]
pub mod rawhttp;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use countersign::core::sf_fast::{self, Bare, Dict, Entry, ScannedBytes, ScannedKind};
use countersign::core::{
    decode_roles, decode_value, encode_roles, encode_value, normalize_authority, CompactString,
    ComponentId, EncodedIdentity, ExpectedDigest, HeadersVerified, Identity, Keyring,
    KeyringHandle, Nonce, Policy, Reason, Secret, Signer, SignerConfig, Verified, Verifier,
    VerifyError,
};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// The time every verifier check runs at (unix seconds).
pub const NOW: u64 = 1_700_000_000;
/// The secret of key `k1` (32 bytes of 0x5a, as tests/core_*.rs use).
pub const SECRET: [u8; 32] = [0x5a; 32];
/// The nonce every signed request carries.
pub const NONCE: &str = "fuzz-nonce-0123456789abcdef";

fn handle() -> KeyringHandle {
    let secret = Secret::new(SECRET.to_vec()).expect("32-byte secret");
    KeyringHandle::new(Keyring::single("k1", secret).expect("keyring"))
}

/// The fields of `data` split at `\n`, at most `n` (the last keeps the rest).
fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == b'\n').collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Strips the whitespace RFC 9421 §2.1 strips from a field value.
fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|&b| b != b' ' && b != b'\t');
    let end = value.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &value[s..=e],
        _ => &[],
    }
}

// ---------------------------------------------------------------------------------------------
// Target `verify`: the core verifier on arbitrary header values.

/// What a verifier decided, comparable across its readers (the detail text may differ).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Accepted(Verified),
    Rejected(Reason),
}

fn decision(result: &Result<HeadersVerified, VerifyError>) -> Decision {
    match result {
        Ok(v) => Decision::Accepted(v.verified().clone()),
        Err(e) => Decision::Rejected(e.reason()),
    }
}

/// Every reader of `Signature-Input` (exact shape, scan, full parser, and the combined
/// `verify_headers`) decides the same; returns the full decision including the body check.
fn verify_all_readers(
    verifier: &Verifier,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<Verified, Reason> {
    let combined = verifier.verify_headers(parts, NOW);
    let reference = decision(&verifier.verify_headers_reference(parts, NOW));
    assert_eq!(
        decision(&combined),
        reference,
        "verify_headers vs reference"
    );
    if let Some(scanned) = verifier.verify_headers_scanned(parts, NOW) {
        assert_eq!(decision(&scanned), reference, "scan vs reference");
    }
    if let Some(template) = verifier.verify_headers_template(parts, NOW) {
        assert_eq!(
            decision(&template),
            reference,
            "exact-shape reader vs reference"
        );
    }
    let mut hinted = 0;
    let hinted_result = verifier.verify_headers_hinting(parts, NOW, |_| hinted += 1);
    assert!(hinted <= 1, "hint called {hinted} times");
    assert_eq!(decision(&hinted_result), reference, "hinting vs reference");
    let full = combined
        .and_then(|h| h.check_body(body))
        .map_err(|e| e.reason());
    let again = verifier.verify(parts, body, NOW).map_err(|e| e.reason());
    assert_eq!(full, again, "verify vs verify_headers + check_body");
    full
}

fn request(method: &[u8], target: &str) -> Option<http::request::Parts> {
    let method = http::Method::from_bytes(method).ok()?;
    let uri: http::Uri = target.parse().ok()?;
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .ok()?
        .into_parts();
    Some(parts)
}

const SIGNATURE_INPUT: &str = "signature-input";
const SIGNATURE: &str = "signature";
const CONTENT_DIGEST: &str = "content-digest";
const USER: &str = "x-auth-user";
const ROLES: &str = "x-auth-roles";

/// Target `verify`. Byte 0 picks the mode:
/// - even: raw headers. Fields: `Signature-Input`, `Signature`, `Content-Digest`, user, roles,
///   `Host`, then the body. Every reader must decide alike (bit 1 selects `Policy::rfc9421`
///   instead of the countersign profile).
/// - odd: a request signed by [`Signer`] from fields method, path, query, host, user, roles
///   (separated by 0x1e; bit 5 of byte 0: no identity) and body must verify with its identity;
///   then field `patch` replaces (bit 4: is appended to) the header that bits 1-3 name, after
///   which every reader must still agree, and a covered value that changed must be refused.
pub fn verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        verify_raw(mode, rest);
    } else {
        verify_signed(mode, rest);
    }
}

fn verify_raw(mode: u8, data: &[u8]) {
    let f = fields(data, 7);
    let Some(mut parts) = request(b"POST", "/api/items?x=1") else {
        return;
    };
    let names = [
        SIGNATURE_INPUT,
        SIGNATURE,
        CONTENT_DIGEST,
        USER,
        ROLES,
        "host",
    ];
    for (name, value) in names.iter().zip(&f) {
        // A field containing 0x1f is sent as two lines (split there).
        for line in value.split(|&b| b == 0x1f) {
            if let Ok(v) = HeaderValue::from_bytes(line) {
                parts.headers.append(*name, v);
            }
        }
    }
    let body = f.get(6).copied().unwrap_or_default();
    let policy = if mode & 2 == 0 {
        Policy::default()
    } else {
        Policy::rfc9421(&["@method", "@authority"])
    };
    let verifier = Verifier::new(handle(), policy);
    let _ = verify_all_readers(&verifier, &parts, body);
    if let Some(digest) = f.get(2) {
        if let Ok(expected) = ExpectedDigest::parse(digest) {
            let _ = expected.check(body);
        }
    }
}

fn verify_signed(mode: u8, data: &[u8]) {
    let f = fields(data, 9);
    let get = |i: usize| f.get(i).copied().unwrap_or_default();
    let method = if get(0).is_empty() { b"POST" } else { get(0) };
    let path = text(get(1));
    let query = text(get(2));
    let target = if query.is_empty() {
        format!("/{path}")
    } else {
        format!("/{path}?{query}")
    };
    let Some(mut parts) = request(method, &target) else {
        return;
    };
    let host = get(3);
    if !host.is_empty() {
        match HeaderValue::from_bytes(host) {
            Ok(v) => {
                parts.headers.insert("host", v);
            }
            Err(_) => return,
        }
    }
    let identity = (mode & 32 == 0).then(|| {
        let roles: Vec<String> = if get(5).is_empty() {
            Vec::new()
        } else {
            get(5).split(|&b| b == 0x1e).map(text).collect()
        };
        Identity::new(text(get(4)), roles)
    });
    let body = get(6);
    let patch = get(7);
    let nonce = Nonce::new(NONCE).expect("valid nonce");
    let signer = Signer::new(handle(), SignerConfig::default());
    if signer
        .sign(&mut parts, body, identity.as_ref(), NOW, &nonce)
        .is_err()
    {
        // Refused inputs (an empty name, a Host that differs from the URI's authority...).
        return;
    }
    let verifier = Verifier::new(handle(), Policy::default());
    match verify_all_readers(&verifier, &parts, body) {
        Ok(verified) => assert_eq!(verified.identity, identity, "identity round trip"),
        Err(reason) => panic!("a request the Signer signed was refused: {reason:?}"),
    }

    // The tampering step.
    let which = (mode >> 1) & 7;
    let append = mode & 16 != 0;
    let mut body = body.to_vec();
    let name = match which {
        0 => return,
        1 => SIGNATURE_INPUT,
        2 => SIGNATURE,
        3 => CONTENT_DIGEST,
        4 => USER,
        5 => ROLES,
        6 => "host",
        _ => {
            if append {
                body.extend_from_slice(patch);
            } else {
                body = patch.to_vec();
            }
            let changed = body != get(6);
            let result = verify_all_readers(&verifier, &parts, &body);
            assert!(
                !changed || result.is_err(),
                "a changed body verified: {body:?}"
            );
            return;
        }
    };
    let Ok(value) = HeaderValue::from_bytes(patch) else {
        return;
    };
    let before: Vec<Vec<u8>> = parts
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    if append {
        parts.headers.append(name, value.clone());
    } else {
        parts.headers.insert(name, value.clone());
    }
    let result = verify_all_readers(&verifier, &parts, &body);
    let Ok(verified) = result else {
        return;
    };
    // Accepted after tampering: only an unchanged covered value may still verify.
    match name {
        // Not covered as such: the readers agreeing is the check.
        SIGNATURE_INPUT | SIGNATURE => {}
        "host" => {
            let same = !append
                && match (before.first(), value.to_str()) {
                    (Some(old), Ok(new)) => {
                        let old = String::from_utf8_lossy(old);
                        matches!(
                            (normalize_authority(&old, "http"), normalize_authority(new, "http")),
                            (Ok(a), Ok(b)) if a == b
                        )
                    }
                    _ => false,
                };
            assert!(
                same,
                "a changed Host verified: {before:?} -> {value:?} (append {append})"
            );
        }
        _ => {
            let same =
                !append && before.len() == 1 && trim_ows(&before[0]) == trim_ows(value.as_bytes());
            assert!(
                same,
                "a changed {name} verified: {before:?} -> {value:?} (append {append}), \
                 identity {:?}",
                verified.identity
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target `sf_fields`: the fast structured-field parser and its scans against `sfv`.

/// Target `sf_fields`: the whole input is a dictionary field value. Whatever the fast path
/// (`parse_dictionary`, the two scans, the exact-shape readers) accepts, `sfv` must parse to the
/// same value; the scans accept exactly what the fast parser accepts; the canonical text the
/// fast parser records is the serialisation. Also runs `ExpectedDigest::parse`,
/// `ComponentId::parse` and `normalize_authority` on the input.
pub fn sf_fields(data: &[u8]) {
    let reference = sfv::Parser::parse_dictionary(data);
    let fast = sf_fast::parse_dictionary(data);
    check_scan(data, fast.as_ref());
    check_byte_scan(data, fast.as_ref());
    check_byte_member(data, fast.as_ref());
    check_template(data, fast.as_ref());
    if let Ok(reference) = &reference {
        let view = Dict::from_sfv(reference);
        assert_eq!(&view.to_sfv(), reference, "sfv view round trip");
    }
    if let Some(fast) = &fast {
        let Ok(reference) = &reference else {
            panic!(
                "fast path accepted what sfv rejects: {:?}",
                String::from_utf8_lossy(data)
            );
        };
        assert_eq!(&fast.to_sfv(), reference, "fast parse vs sfv");
        for (_, entry) in &fast.members {
            if let Entry::InnerList(il) = entry {
                if let Some(canonical) = il.canonical {
                    let mut out = String::new();
                    sf_fast::write_inner_list(&mut out, il).expect("serialisable");
                    assert_eq!(canonical, out, "recorded canonical text vs serialisation");
                }
            }
        }
        let mut slot = None;
        let either = sf_fast::parse_or_fallback(data, &mut slot).map(|d| d.to_sfv());
        assert_eq!(either.as_ref().ok(), Some(reference), "parse_or_fallback");
    }
    let _ = ExpectedDigest::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ComponentId::parse(text);
        for scheme in ["http", "https"] {
            if let Ok(once) = normalize_authority(text, scheme) {
                assert_eq!(
                    normalize_authority(&once, scheme).as_deref(),
                    Ok(once.as_str()),
                    "normalize_authority is not idempotent on {text:?}"
                );
            }
        }
    }
}

fn check_scan(input: &[u8], fast: Option<&Dict<'_>>) {
    let scanned = std::str::from_utf8(input).ok().and_then(|text| {
        let mut members = Vec::new();
        sf_fast::scan_signature_input(text, &mut |key, member| members.push((key, member)))
            .map(|()| members)
    });
    match (fast, scanned) {
        (None, None) => {}
        (Some(fast), Some(scanned)) => {
            assert_eq!(fast.members.len(), scanned.len());
            for ((key, entry), (scanned_key, member)) in fast.members.iter().zip(&scanned) {
                assert_eq!(key, scanned_key);
                check_scanned_member(entry, member);
            }
        }
        (fast, scanned) => panic!(
            "fast parser accepted: {}, scan accepted: {}",
            fast.is_some(),
            scanned.is_some()
        ),
    }
}

fn expected_params<'a>(params: &[(&'a str, Bare<'a>)]) -> sf_fast::SignatureParams<'a> {
    let mut expected = sf_fast::SignatureParams::default();
    for (name, value) in params {
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
    expected
}

fn check_scanned_member(entry: &Entry<'_>, scanned: &sf_fast::ScannedMember<'_>) {
    use sf_fast::ScannedMember;
    match (entry, scanned) {
        (Entry::Item(_), ScannedMember::Item) => {}
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
            assert_eq!(list.plain, plain, "scanned list plain");
            if plain {
                let scanned_names: Vec<&str> =
                    (0..list.len()).filter_map(|i| list.name(i)).collect();
                assert_eq!(scanned_names, names, "scanned names");
            }
            assert_eq!(list.params, expected_params(&il.params), "scanned params");
            assert_eq!(list.canonical, il.canonical, "scanned canonical text");
        }
        _ => panic!("scanned member of another kind"),
    }
}

fn check_byte_scan(input: &[u8], fast: Option<&Dict<'_>>) {
    let mut wanted: Vec<&str> = vec!["sha-256", "sha-512", "countersign", "sig"];
    if let Some(fast) = fast {
        for (k, _) in fast.members.iter().take(3) {
            if !wanted.contains(k) {
                wanted.push(k);
            }
        }
    }
    let mut out = vec![ScannedBytes::default(); wanted.len()];
    let scanned = std::str::from_utf8(input)
        .ok()
        .and_then(|text| sf_fast::scan_byte_members(text, &wanted, &mut out));
    assert_eq!(scanned.is_some(), fast.is_some(), "byte scan acceptance");
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
            assert_eq!(slot.kind, kind, "byte scan kind of {key}");
            assert_eq!(slot.as_slice(), bytes, "byte scan bytes of {key}");
        }
    }
}

fn check_byte_member(input: &[u8], fast: Option<&Dict<'_>>) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let mut keys: Vec<&str> = vec!["sha-256", "countersign", "Upper", ""];
    if let Some(key) = text.split('=').next() {
        keys.push(key);
    }
    for key in keys {
        let mut buf = [0u8; sf_fast::MAX_INLINE_BYTES];
        let Some(len) = sf_fast::match_byte_member(text, key, &mut buf) else {
            continue;
        };
        let bytes = &buf[..len];
        let fast = fast.unwrap_or_else(|| {
            panic!("exact-shape byte reader accepted what the fast parser declines")
        });
        assert_eq!(fast.members.len(), 1);
        match fast.get(key) {
            Some(Entry::Item(item)) => {
                assert!(item.params.is_empty());
                match &item.bare {
                    Bare::ByteSeq(b) => assert_eq!(b.as_slice(), bytes),
                    other => panic!("exact-shape byte reader: {other:?}"),
                }
            }
            other => panic!("exact-shape byte reader: {other:?}"),
        }
    }
}

/// The exact-shape `Signature-Input` reader decides only what the scan reads the same way.
fn check_template(input: &[u8], fast: Option<&Dict<'_>>) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let lists = [
        "\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\")",
        "\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\" \"x-auth-user\")",
        "\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\" \"x-auth-user\" \
         \"x-auth-roles\")",
    ];
    let Some(found) = sf_fast::match_signature_input_template(text, &lists) else {
        return;
    };
    let fast = fast.unwrap_or_else(|| panic!("template accepted what the fast parser declines"));
    assert_eq!(fast.members.len(), 1, "template: one member");
    let (label, entry) = &fast.members[0];
    assert_eq!(*label, found.label);
    let Entry::InnerList(il) = entry else {
        panic!("template matched an item");
    };
    assert_eq!(expected_params(&il.params), found.params, "template params");
    assert_eq!(
        il.canonical,
        Some(found.canonical),
        "template canonical text"
    );
    let names: Vec<String> = il
        .items
        .iter()
        .map(|item| match &item.bare {
            Bare::String(s) if item.params.is_empty() => format!("\"{s}\""),
            other => panic!("template matched a list with {other:?}"),
        })
        .collect();
    assert_eq!(format!("{})", names.join(" ")), lists[found.list]);
}

// ---------------------------------------------------------------------------------------------
// Target `identity`: the percent-encoding of the identity fields.

/// Target `identity`. The input as text (lossy UTF-8) is a user name and roles separated by
/// 0x1e: `decode(encode(x)) == x` for every name and the role list, and `EncodedIdentity`
/// round-trips. The input's raw bytes, split at the first `\n`, are also offered to
/// `EncodedIdentity::from_encoded` as received field values: whatever it accepts must decode
/// to a signable identity that re-encodes to itself.
pub fn identity(data: &[u8]) {
    let all = text(data);
    let mut names = all.split('\u{1e}');
    let user = names.next().unwrap_or_default().to_owned();
    let roles: Vec<String> = names.map(str::to_owned).collect();

    let encoded = encode_value(&user);
    assert!(
        encoded.bytes().all(|b| b.is_ascii_graphic()),
        "encode_value wrote {encoded:?}"
    );
    assert_eq!(
        decode_value(&encoded),
        (!user.is_empty()).then(|| CompactString::from(user.as_str())),
        "value round trip"
    );
    let encoded_roles = encode_roles(&roles);
    if roles.iter().all(|r| !r.is_empty()) {
        assert_eq!(
            decode_roles(&encoded_roles),
            Some(
                roles
                    .iter()
                    .map(|role| CompactString::from(role.as_str()))
                    .collect()
            ),
            "roles round trip"
        );
    }
    let identity = Identity::new(user.clone(), roles.clone());
    let enc = EncodedIdentity::new(&identity);
    if identity.validate().is_ok() {
        assert_eq!(
            enc.decode(),
            Some(identity.clone()),
            "EncodedIdentity round trip"
        );
        assert_eq!(enc.user().as_deref(), Some(user.as_str()));
        let again = EncodedIdentity::from_encoded(
            Bytes::copy_from_slice(enc.user_value().as_bytes()),
            enc.roles_value()
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
                .unwrap_or_default(),
        );
        assert!(
            again == Some(enc.clone()),
            "from_encoded refused new()'s output"
        );
    }

    // Raw received values.
    let (raw_user, raw_roles) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    if let Ok(t) = std::str::from_utf8(raw_user) {
        let _ = decode_value(t);
        let _ = decode_roles(t);
    }
    if let Some(received) = EncodedIdentity::from_encoded(
        Bytes::copy_from_slice(raw_user),
        Bytes::copy_from_slice(raw_roles),
    ) {
        let decoded = received
            .decode()
            .expect("from_encoded accepted values that do not decode");
        assert!(
            decoded.validate().is_ok(),
            "from_encoded accepted an empty name"
        );
        // Lenient by design (src/core/identity.rs tests): any spelling that decodes, such as
        // `%73` for `s`, is taken; the identity it stands for must survive a re-encoding.
        let reencoded = EncodedIdentity::new(&decoded);
        assert_eq!(reencoded.decode(), Some(decoded), "re-encoded identity");
    }
}

// ---------------------------------------------------------------------------------------------
// Target `rawhttp`: the CLI's HTTP/1.x reader.

/// Hands out the input in reads of at most `step` bytes (as a pipe may).
struct ChunkedReader<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for ChunkedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A comparable summary of `read_request`'s result.
fn raw_summary(
    result: &Result<rawhttp::RawRequest, rawhttp::RawHttpError>,
) -> Result<String, String> {
    match result {
        Ok(r) => Ok(format!("{r:?}")),
        Err(rawhttp::RawHttpError::Malformed(_)) => Err("malformed".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Target `rawhttp`. Byte 0 sets the read size of a second pass (1 to 256 bytes per read); the
/// rest is the request. Small limits, so the limit paths are reached. Both passes must give the
/// same answer; a request read must respect the limits, its body re-chunked (as `sign` writes
/// a chunked request) must read back to itself, and it must convert with `to_parts` or fail
/// cleanly.
pub fn rawhttp(data: &[u8]) {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let limits = rawhttp::Limits {
        max_header_bytes: 2048,
        max_headers: 16,
        max_body_bytes: 1024,
    };
    let whole = rawhttp::read_request(input, limits);
    let chunked = rawhttp::read_request(
        ChunkedReader {
            data: input,
            step: usize::from(step) + 1,
        },
        limits,
    );
    assert_eq!(
        raw_summary(&whole),
        raw_summary(&chunked),
        "whole vs chunked reads"
    );
    if let Ok(r) = whole {
        assert!(r.body.len() <= limits.max_body_bytes);
        assert!(r.headers.len() <= limits.max_headers);
        // Its body, chunked as `sign` writes a chunked request back, reads back to itself.
        let mut rechunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        rawhttp::encode_chunked(&r.body, &mut rechunked);
        match rawhttp::read_request(rechunked.as_slice(), limits) {
            Ok(back) => assert_eq!(back.body, r.body, "re-chunked body"),
            Err(e) => panic!("a body read within the limits, re-chunked, is refused: {e}"),
        }
        if let Ok(parts) = r.to_parts() {
            // What `verify` then does with it.
            let verifier = Verifier::new(handle(), Policy::default());
            let _ = verifier.verify(&parts, &r.body, NOW);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targets `keyfile` and `proxy_config`: the TOML loaders.

/// Target `keyfile`: the input as a keyring file (UTF-8 only). A keyring it accepts must sign a
/// request that a verifier on the same keyring accepts. Also `parse_duration`.
pub fn keyfile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = countersign::keyfile::parse_duration(text);
    let Ok(keyring) =
        countersign::keyfile::parse_keyring(text, Path::new("/nonexistent-fuzz/keyring.toml"))
    else {
        return;
    };
    let handle = KeyringHandle::new(keyring);
    let Some(mut parts) = request(b"POST", "http://api.example/x") else {
        return;
    };
    let nonce = Nonce::new(NONCE).expect("valid nonce");
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    signer
        .sign(&mut parts, b"body", None, NOW, &nonce)
        .expect("an accepted keyring signs");
    let verifier = Verifier::new(handle, Policy::default());
    if let Err(e) = verifier.verify(&parts, b"body", NOW) {
        panic!("an accepted keyring's signature does not verify: {e}");
    }
}

/// Target `proxy_config`: the input as a proxy config file (UTF-8 only) must load or fail with
/// an error naming the key; a config it accepts must make the session cookie it describes.
pub fn proxy_config(data: &[u8]) {
    use countersign::proxy::config::{parse_positive_duration, parse_size, ProxyConfig};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_size(text);
    let _ = parse_positive_duration(text);
    let _ = countersign::proxy::config::PublicOrigin::parse(text);
    let config = match ProxyConfig::parse(text, Path::new("/nonexistent-fuzz/proxy.toml")) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = config.route("/api/x");
    let cookie = countersign::proxy::auth::CookieSettings::new(
        &config.session.cookie_name,
        config.server.public_origin.is_https(),
        config.session.absolute_timeout,
    );
    let id = countersign::proxy::session::SessionId::generate();
    let set = cookie.set(&id);
    assert!(
        !set.is_empty(),
        "accepted cookie settings make no Set-Cookie: name {:?}, max age {:?}",
        config.session.cookie_name,
        config.session.absolute_timeout
    );
    assert!(!cookie.clear().is_empty(), "no clearing Set-Cookie");
}

// ---------------------------------------------------------------------------------------------
// Target `proxy_headers`: what the proxy reads from browser requests and upstream answers.

/// Target `proxy_headers`. Field 0 is the session cookie's name; each further field is a
/// header line `name:value` (lines that are not valid fields are skipped). Checks the cookie
/// lookup and removal, the session id parser, the CSRF checks and the upstream response
/// filter.
pub fn proxy_headers(data: &[u8]) {
    use countersign::proxy::csrf;
    use countersign::proxy::forward::{
        cookie_values, filter_upstream_response, find_cookie, remove_cookie,
    };
    use countersign::proxy::session::SessionId;

    let f = fields(data, 64);
    let cookie_name = text(f.first().copied().unwrap_or_default());
    let mut headers = HeaderMap::new();
    for line in f.iter().skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(trim_ows(&line[colon + 1..])),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    if let Some(value) = find_cookie(&headers, &cookie_name) {
        if let Some(id) = SessionId::parse(value) {
            assert_eq!(id.as_cookie_value(), value, "one spelling per session id");
        }
        // The pairs the session lookup reads start with the one `find_cookie` finds.
        assert_eq!(cookie_values(&headers, &cookie_name).next(), Some(value));
    }
    for value in cookie_values(&headers, &cookie_name) {
        if let Some(id) = SessionId::parse(value) {
            assert_eq!(id.as_cookie_value(), value, "one spelling per session id");
        }
    }
    let mut removed = headers.clone();
    remove_cookie(&mut removed, &cookie_name);
    if !cookie_name.is_empty() {
        assert_eq!(
            find_cookie(&removed, &cookie_name),
            None,
            "cookie still there after remove_cookie"
        );
        assert_eq!(
            cookie_values(&removed, &cookie_name).next(),
            None,
            "cookie still there after remove_cookie"
        );
    }
    let allowed = vec!["https://app.example.com".to_owned()];
    let token = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
    // The origin rules, restated from docs/FRONTEND.md ("CSRF token") independently of src/proxy/csrf.rs
    // and compared both ways: at most one `Origin` and one `Sec-Fetch-Site`; the site, when
    // there, is `same-origin`; the origin, when there, is the public one (ASCII
    // case-insensitive), or `null` beside `same-origin` (a no-referrer page's own write).
    let origins: Vec<_> = headers.get_all(http::header::ORIGIN).iter().collect();
    let sites: Vec<_> = headers.get_all("sec-fetch-site").iter().collect();
    let site_ok = match sites.as_slice() {
        [] => true,
        [site] => site.as_bytes() == b"same-origin",
        _ => false,
    };
    let is_ours = |o: &HeaderValue| o.as_bytes().eq_ignore_ascii_case(allowed[0].as_bytes());
    let write_origin_ok = site_ok
        && match origins.as_slice() {
            [] => true,
            [o] => is_ours(o) || (o.as_bytes() == b"null" && sites.len() == 1),
            _ => false,
        };
    assert_eq!(
        csrf::check_origin(&headers, &allowed).is_ok(),
        write_origin_ok,
        "check_origin disagrees with the documented rule"
    );
    // A WebSocket handshake needs its real origin: `Origin` present and ours.
    let named_origin_ok = site_ok && matches!(origins.as_slice(), [o] if is_ours(o));
    assert_eq!(
        csrf::check_named_origin(&headers, &allowed).is_ok(),
        named_origin_ok,
        "check_named_origin disagrees with the documented rule"
    );
    // A read of a session route: an `Origin`, when there, is ours (`null` too is refused).
    let read_origin_ok = match origins.as_slice() {
        [] => true,
        [o] => is_ours(o),
        _ => false,
    };
    assert_eq!(
        csrf::check_read_origin(&headers, &allowed).is_ok(),
        read_origin_ok,
        "check_read_origin disagrees with the documented rule"
    );
    let tokens: Vec<_> = headers.get_all(csrf::CSRF_HEADER).iter().collect();
    let token_ok = matches!(tokens.as_slice(), [t] if t.as_bytes() == token.as_bytes());
    assert_eq!(
        csrf::check_request(&headers, token, &allowed).is_ok(),
        write_origin_ok && token_ok,
        "check_request is not origin and token"
    );
    assert!(
        csrf::check_token(&headers, "").is_err(),
        "an empty session token matched"
    );
    let mut answer = headers;
    filter_upstream_response(&mut answer, &cookie_name);
    if !cookie_name.is_empty() {
        for value in answer.get_all(http::header::SET_COOKIE) {
            // What a browser stores (RFC 6265bis §5.7): the name-value pair is the value up to
            // its first `;`; a pair without `=` is a nameless cookie whose value is the pair.
            // A nameless cookie is sent back as its bare value, which a `Cookie` reader takes
            // as `name=value` (or as a name alone). So the name the proxy would read back is
            // the stored name, or for a nameless cookie the name its value starts with.
            let pair = value
                .as_bytes()
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default();
            let (stored_name, stored_value) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()),
                None => (&b""[..], pair.trim_ascii()),
            };
            let read_back_as = if stored_name.is_empty() {
                match stored_value.iter().position(|&b| b == b'=') {
                    Some(eq) => stored_value[..eq].trim_ascii(),
                    None => stored_value,
                }
            } else {
                stored_name
            };
            assert_ne!(
                read_back_as,
                cookie_name.as_bytes(),
                "upstream Set-Cookie of the session cookie passed"
            );
        }
    }
    // No `Clear-Site-Data` that clears cookies (the session cookie) passes.
    for value in answer.get_all("clear-site-data") {
        for directive in value.as_bytes().split(|&b| b == b',') {
            let directive = directive.trim_ascii();
            assert!(
                !matches!(directive, b"\"cookies\"" | b"\"*\""),
                "upstream Clear-Site-Data clearing cookies passed"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target `proxy_protocol`: the PROXY header a TCP load balancer writes before the connection's
// bytes (`server.proxy_protocol`).

/// An `AsyncRead` over bytes, at most `step` of them per read, always ready (so the reader's
/// future completes in one poll).
struct SteppedBytes<'a> {
    rest: &'a [u8],
    step: usize,
}

impl tokio::io::AsyncRead for SteppedBytes<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.step.min(buf.remaining()).min(self.rest.len());
        buf.put_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        std::task::Poll::Ready(Ok(()))
    }
}

/// `read_client` over `stream` read `step` bytes at a time: its answer (None: a header naming
/// no client; the error as its kind) and how many bytes it consumed.
fn read_proxy_header(
    stream: &[u8],
    step: usize,
) -> (Result<Option<std::net::SocketAddr>, String>, usize) {
    use countersign::proxy::proxy_protocol::{
        read_client, ProxyHeaderError, DEFAULT_MAX_V2_PAYLOAD,
    };
    use std::future::Future as _;

    let mut reader = SteppedBytes { rest: stream, step };
    let answer = {
        let future = std::pin::pin!(read_client(&mut reader, DEFAULT_MAX_V2_PAYLOAD));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.poll(&mut cx) {
            std::task::Poll::Ready(answer) => answer,
            std::task::Poll::Pending => panic!("read_client waited on bytes that were there"),
        }
    };
    let answer = answer.map_err(|e| match e {
        ProxyHeaderError::Io(_) => "io".to_owned(),
        ProxyHeaderError::Malformed(_) => "malformed".to_owned(),
        ProxyHeaderError::TooLong { len, .. } => format!("too long {len}"),
    });
    (answer, stream.len() - reader.rest.len())
}

/// Target `proxy_protocol`. Byte 0 sets the read size of a second pass (1 to 64 bytes per
/// read); the rest is what a connection carries. Both passes give the same answer; a header
/// accepted is exactly the bytes the protocol says (a v1 line up to its first CRLF, at most
/// 107 bytes; a v2 header of 16 bytes plus the length it announces, at most
/// `DEFAULT_MAX_V2_PAYLOAD`), nothing after it is consumed, and a v2 header refused as too long is
/// one that announced more.
pub fn proxy_protocol(data: &[u8]) {
    use countersign::proxy::proxy_protocol::DEFAULT_MAX_V2_PAYLOAD;

    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let (whole, consumed) = read_proxy_header(stream, usize::MAX);
    let (stepped, stepped_consumed) = read_proxy_header(stream, step);
    assert_eq!(whole, stepped, "the answer depends on how the bytes arrive");
    let signature: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    match &whole {
        Ok(_) => {
            assert_eq!(consumed, stepped_consumed, "consumed a different length");
            let header = &stream[..consumed];
            if header.starts_with(signature) {
                let announced = usize::from(u16::from_be_bytes([header[14], header[15]]));
                assert_eq!(
                    consumed,
                    16 + announced,
                    "v2: not exactly the announced length"
                );
                assert!(announced <= DEFAULT_MAX_V2_PAYLOAD);
            } else {
                assert!(
                    header.starts_with(b"PROXY "),
                    "accepted without a PROXY prefix"
                );
                assert!(consumed <= 107, "v1 header over 107 bytes");
                let first_crlf = header.windows(2).position(|w| w == b"\r\n");
                assert_eq!(
                    first_crlf,
                    Some(consumed - 2),
                    "v1: not up to its first CRLF"
                );
            }
        }
        Err(kind) if kind.starts_with("too long") => {
            assert!(stream.starts_with(signature) && stream.len() >= 16);
            let announced = usize::from(u16::from_be_bytes([stream[14], stream[15]]));
            assert!(announced > DEFAULT_MAX_V2_PAYLOAD);
            assert_eq!(kind, &format!("too long {announced}"));
        }
        Err(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Target `session_record`: session records read back from Redis.

/// A Redis session store and a fixed session id whose record each input overwrites.
pub struct SessionRecordRig {
    runtime: tokio::runtime::Runtime,
    store: countersign::proxy::session_redis::RedisSessionStore,
    connection: countersign::replay::RedisConnection,
    id: countersign::proxy::session::SessionId,
    key: String,
}

/// The key prefix the rig's store writes under.
pub const SESSION_PREFIX: &str = "fuzz:";

impl SessionRecordRig {
    /// A store on the Redis at `url` (which the rig writes to under [`SESSION_PREFIX`]).
    pub fn new(url: &str) -> SessionRecordRig {
        use countersign::proxy::session::{SessionId, SessionTimeouts};
        use countersign::proxy::session_redis::RedisSessionStore;
        use countersign::replay::RedisConnection;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connection = RedisConnection::open(url).expect("redis url");
        let store = RedisSessionStore::new(
            connection.clone(),
            SESSION_PREFIX,
            SessionTimeouts {
                idle: Duration::from_secs(600),
                absolute: Duration::from_secs(86_400),
            },
            1000,
        )
        .touch_interval(Duration::from_secs(5));
        let id = SessionId::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").expect("an id");
        let key: String = id.store_key().iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{SESSION_PREFIX}session:{key}");
        SessionRecordRig {
            runtime,
            store,
            connection,
            id,
            key,
        }
    }

    /// The record a real login writes (for seeds): JSON text.
    pub fn real_record(&self, identity: &Identity) -> Vec<u8> {
        use countersign::proxy::session::SessionStore;
        self.runtime.block_on(async {
            let (id, _) = self.store.create(identity, NOW).await.expect("create");
            let key: String = id.store_key().iter().map(|b| format!("{b:02x}")).collect();
            let mut get = redis::cmd("GET");
            get.arg(format!("{SESSION_PREFIX}session:{key}"));
            let value: Vec<u8> = self.connection.query(&get).await.expect("GET");
            value
        })
    }

    /// Byte 0: bit 0 touch, bit 1 the request lookup instead of `get`, bits 2-7 how far past
    /// [`NOW`] (in steps of 97 s) the lookup happens. The rest is stored as the session's record;
    /// the lookup must not fail or panic, and a session it returns must be live.
    pub fn check(&self, data: &[u8]) {
        use countersign::proxy::session::SessionStore;
        let Some((&mode, value)) = data.split_first() else {
            return;
        };
        let now = NOW + u64::from(mode >> 2) * 97;
        let touch = mode & 1 != 0;
        self.runtime.block_on(async {
            let mut set = redis::cmd("SET");
            set.arg(&self.key).arg(value).arg("EX").arg(3600);
            let () = self.connection.query(&set).await.expect("SET");
            if mode & 2 == 0 {
                let found = self.store.get(&self.id, now, touch).await;
                let found = lookup_outcome(found);
                if let Some(session) = found {
                    assert!(session.expires_at() > now, "expired session returned");
                    assert!(session.last_seen <= now.max(session.last_seen));
                    let _ = session.identity();
                    let _ = session.csrf_matches("x");
                    let request = countersign::proxy::session::RequestSession::from(session);
                    let _ = request.csrf_matches(b"x");
                    let _ = request.identity.decode();
                }
            } else {
                let found = self.store.get_for_request(&self.id, now, touch).await;
                let found = lookup_outcome(found);
                if let Some(request) = found {
                    let _ = request.csrf_matches(b"x");
                    let _ = request.identity.decode();
                }
            }
        });
    }
}

/// A lookup's answer for a stored `value`, which must not be an error: an undecodable record is
/// no session (the user logs in again), never a store error (503 on every request with that
/// cookie until the record expires). fuzz/regressions/session_record/non-utf8-record guards the
/// one such failure found (a record that was not UTF-8 failed the lookup).
fn lookup_outcome<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("a stored record made the lookup fail: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Target `ws_frames`: the WebSocket relay's frame tracker (src/proxy/websocket/frames.rs).

/// Target `ws_frames`. Byte 0: bit 0 the direction (1: the browser's, masked frames), bits
/// 1–2 the extensions (0: none, 1: permessage-deflate, 2–3: one the proxy does not know),
/// bits 3–7 which read of the third way (below) is scanned with `stop`; byte 1: bits 0–2 how
/// many read sizes follow (1 to 8), bit 3 whether a read stops at all; then the sizes (0 to
/// 255 each, in turn, again and again); the rest is the stream.
///
/// The stream is scanned four ways: in one read, in one read with `stop`, a byte a read, and
/// in reads of the given sizes. Each way: no panic; no scan holds back more than `HELD_ROOM`
/// or relays more than its input; once Malformed or Closed, every later scan relays nothing
/// and says so again; what is relayed is a prefix of the stream, made of whole valid frames
/// (checked here against RFC 6455 §5 / RFC 7692 §6 independently of the tracker) and at most
/// the start of one more frame's payload; a Malformed verdict leaves it at a frame boundary
/// with the next header malformed (or unable to become valid); Closed leaves it right after
/// the first Close frame; otherwise all the stream is relayed but a header's first bytes
/// that can still become valid. All ways relay the same bytes and end in the same state.
pub fn ws_frames(data: &[u8]) {
    use countersign::__fuzz::WebSocketFrames;
    let [mode, split, rest @ ..] = data else {
        return;
    };
    let from_client = mode & 1 != 0;
    let extensions = (mode >> 1) & 3;
    let count = usize::from(split & 7) + 1;
    let stop_at = (split & 8 != 0).then_some(usize::from(mode >> 3));
    let Some((sizes, stream)) = rest.split_at_checked(count.min(rest.len())) else {
        return;
    };
    let mut sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s)).collect();
    if sizes.iter().sum::<usize>() == 0 {
        sizes.push(1);
    }
    let mut ways: Vec<(&str, Vec<WsRead<'_>>)> = vec![
        ("whole", vec![(stream, false)]),
        ("whole, stop", vec![(stream, true)]),
        ("bytes", stream.chunks(1).map(|c| (c, false)).collect()),
    ];
    let mut reads = Vec::new();
    let mut at = 0;
    for (i, &size) in sizes.iter().cycle().enumerate() {
        let end = (at + size).min(stream.len());
        reads.push((&stream[at..end], stop_at == Some(i)));
        at = end;
        if at == stream.len() && i >= sizes.len() {
            break;
        }
    }
    ways.push(("sizes", reads));
    let mut first: Option<(&str, Vec<u8>, WsVerdict)> = None;
    for (way, reads) in &ways {
        let reads = if reads.is_empty() {
            vec![(&stream[..0], false)]
        } else {
            reads.clone()
        };
        let run = WebSocketFrames::run(from_client, extensions, &reads);
        let verdict = ws_check_run(&run, stream, way);
        ws_check_relayed(&run.relayed, stream, verdict, from_client, extensions, way);
        match &first {
            None => first = Some((way, run.relayed, verdict)),
            Some((first_way, relayed, first_verdict)) => {
                assert!(
                    *relayed == run.relayed,
                    "{way} relayed {} bytes, {first_way} {}",
                    run.relayed.len(),
                    relayed.len()
                );
                assert_eq!(verdict, *first_verdict, "{way} vs {first_way}");
            }
        }
    }
}

/// One read of a run: its bytes, and whether it is scanned with `stop`.
type WsRead<'a> = (&'a [u8], bool);

/// How a run ended: the tracker's last state.
type WsVerdict = countersign::__fuzz::ScanState;

/// The per-scan properties of one run; its verdict.
fn ws_check_run(run: &countersign::__fuzz::Run, stream: &[u8], way: &str) -> WsVerdict {
    use countersign::__fuzz::{ScanState, WebSocketFrames};
    let mut last = ScanState::Boundary;
    let mut ended: Option<ScanState> = None;
    for (i, scan) in run.scans.iter().enumerate() {
        assert!(
            scan.held <= WebSocketFrames::HELD_ROOM,
            "{way} scan {i}: {scan:?}"
        );
        assert!(scan.used <= scan.input, "{way} scan {i}: {scan:?}");
        if let Some(state) = ended {
            assert!(
                scan.held == 0 && scan.used == 0 && scan.state == state,
                "{way} scan {i} after {state:?}: {scan:?}"
            );
        }
        if scan.stop {
            // A stop returns at the first boundary: before a header held back is relayed,
            // and never inside a payload unless the input ends there.
            assert_eq!(scan.held, 0, "{way} scan {i}: a stop gave held bytes");
            if scan.state == ScanState::InFrame {
                assert_eq!(
                    scan.used, scan.input,
                    "{way} scan {i}: a stop inside a payload"
                );
            }
        }
        match scan.state {
            ScanState::Malformed => {
                assert!(scan.at_boundary, "{way} scan {i}: Malformed off a boundary");
                ended = Some(ScanState::Malformed);
            }
            ScanState::Closed => {
                assert!(
                    scan.at_boundary && scan.close_seen,
                    "{way} scan {i}: {scan:?}"
                );
                ended = Some(ScanState::Closed);
            }
            ScanState::Boundary => {
                assert!(scan.at_boundary, "{way} scan {i}: Boundary off a boundary");
            }
            ScanState::InFrame => {}
        }
        last = scan.state;
    }
    assert!(
        run.relayed.len() <= stream.len() && run.relayed == stream[..run.relayed.len()],
        "{way}: the relayed bytes are not a prefix of the stream"
    );
    last
}

/// A frame header as RFC 6455 §5.2 lays it out: (first byte, masked, 7-bit length field,
/// declared payload length, header size), or None when `bytes` has not all of it.
fn ws_header(bytes: &[u8]) -> Option<(u8, bool, u8, u64, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let masked = second & 0x80 != 0;
    let field = second & 0x7f;
    let (len, extended) = match field {
        126 => (
            u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            2,
        ),
        127 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 8),
        n => (u64::from(n), 0),
    };
    let size = 2 + extended + if masked { 4 } else { 0 };
    (bytes.len() >= size).then_some((first, masked, field, len, size))
}

/// The RFC 6455 §5 / RFC 7692 §6 rule a whole header breaks, if any: `fragmented` (a data
/// message is open), on a direction whose frames are masked `from_client`.
fn ws_rule(
    header: (u8, bool, u8, u64, usize),
    fragmented: bool,
    from_client: bool,
    extensions: u8,
) -> Option<&'static str> {
    let (first, masked, field, len, _) = header;
    let (fin, rsv, opcode) = (first & 0x80 != 0, first & 0x70, first & 0x0f);
    let control = opcode >= 8;
    if masked != from_client {
        return Some("masking");
    }
    if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        return Some("reserved opcode");
    }
    if control && (!fin || field > 125) {
        return Some("control frame");
    }
    if (opcode == 0) != fragmented && !control {
        return Some("fragmentation");
    }
    let rsv_ok = match extensions {
        0 => rsv == 0,
        1 => rsv == 0 || (rsv == 0x40 && matches!(opcode, 1 | 2)),
        _ => true,
    };
    if !rsv_ok {
        return Some("RSV");
    }
    if (field == 127 && len >> 63 != 0)
        || (field == 126 && len < 126)
        || (field == 127 && len < 1 << 16)
    {
        return Some("length");
    }
    None
}

/// Whether a header's first bytes can still become a valid header: every value of the next
/// byte, the rest zero (frames_model.rs's `can_complete`, which argues why that suffices).
fn ws_can_complete(partial: &[u8], fragmented: bool, from_client: bool, extensions: u8) -> bool {
    (0..=255u8).any(|next| {
        let mut candidate = partial.to_vec();
        candidate.push(next);
        candidate.resize(14, 0);
        ws_header(&candidate)
            .is_some_and(|h| ws_rule(h, fragmented, from_client, extensions).is_none())
    })
}

/// The relayed bytes, walked frame by frame independently of the tracker, against the
/// stream and the run's verdict.
fn ws_check_relayed(
    relayed: &[u8],
    stream: &[u8],
    verdict: WsVerdict,
    from_client: bool,
    extensions: u8,
    way: &str,
) {
    use countersign::__fuzz::{ScanState, WebSocketFrames};
    let mut at = 0usize;
    let mut fragmented = false;
    let mut last_close = false;
    // Whole frames (the last one's payload possibly cut short by the end).
    while at < relayed.len() {
        assert!(!last_close, "{way}: a frame relayed after a Close, at {at}");
        let header = ws_header(&relayed[at..])
            .unwrap_or_else(|| panic!("{way}: a header relayed in part, at {at}"));
        if let Some(rule) = ws_rule(header, fragmented, from_client, extensions) {
            panic!("{way}: a header breaking the {rule} rule relayed, at {at}");
        }
        let (first, _, _, len, size) = header;
        if first & 0x0f < 8 {
            fragmented = first & 0x80 == 0;
        }
        last_close = first & 0x0f == 8;
        let end = (at + size) as u64 + len;
        if end > relayed.len() as u64 {
            // Inside its payload: the relay can only have stopped for the end of the stream.
            assert_eq!(
                relayed.len(),
                stream.len(),
                "{way}: stopped inside a payload"
            );
            assert_eq!(verdict, ScanState::InFrame, "{way}: inside a payload");
            return;
        }
        at = end as usize;
    }
    let next = &stream[at..];
    match verdict {
        ScanState::Closed => assert!(last_close, "{way}: Closed without a Close"),
        ScanState::Malformed => {
            assert!(!last_close, "{way}: Malformed after a Close");
            match ws_header(next) {
                Some(h) => assert!(
                    ws_rule(h, fragmented, from_client, extensions).is_some(),
                    "{way}: a valid header refused, at {at}"
                ),
                None => assert!(
                    !ws_can_complete(next, fragmented, from_client, extensions),
                    "{way}: a header that may still be valid refused, at {at}"
                ),
            }
        }
        ScanState::Boundary | ScanState::InFrame => {
            assert!(!last_close, "{way}: a whole Close, not Closed");
            assert!(
                ws_header(next).is_none(),
                "{way}: a whole header not relayed, at {at}"
            );
            assert!(
                next.len() <= WebSocketFrames::HELD_ROOM,
                "{way}: too much held back"
            );
            if !next.is_empty() {
                assert!(
                    ws_can_complete(next, fragmented, from_client, extensions),
                    "{way}: a malformed header held back, at {at}"
                );
            }
            let boundary = if next.is_empty() {
                ScanState::Boundary
            } else {
                ScanState::InFrame
            };
            assert_eq!(verdict, boundary, "{way}: the last state");
        }
    }
}

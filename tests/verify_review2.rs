//! What an unsigned request can make a verifier allocate before the MAC check by the length of
//! its signature fields (`Signature-Input`, `Signature`, `Content-Digest`) and of a field it
//! covers with `;key`: each is parsed as an RFC 8941 structure, which materialises every
//! member, item and parameter at up to ~200 bytes of heap per byte of text.
//!
//! Before the bound (`MAX_SIGNATURE_FIELD_BYTES`, 16 KiB) one request with a 400 KB field
//! (under hyper's default HTTP/1 head limit) made `verify_headers` allocate 9 to 83 MB and
//! spend tens of milliseconds of CPU (release build), whatever the `max_components` cap: that
//! cap was checked only once the selected list had been parsed whole, and a member with another
//! tag, the `Signature` and `Content-Digest` fields and a `;key` field were never capped at all.
//!
//! The peak is measured per thread by a global allocator that tracks the bytes the test
//! thread holds, so tests running in parallel do not disturb each other.

mod support_layer;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use countersign::core::{
    content_digest_sha256, signature_base_for, RequestView, MAX_SIGNATURE_FIELD_BYTES,
};
use countersign::layer::VerifyLayer;
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, KeyringHandle, Policy, Reason, Secret, Verifier, VerifyError};
use hmac::{KeyInit as _, Mac as _};
use http::request::Parts;
use http::{HeaderValue, Request};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Tracking;

thread_local! {
    /// (tracking, bytes held since tracking began, the most held).
    static HELD: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

fn track(delta: isize) {
    let _ = HELD.try_with(|held| {
        let (on, now, peak) = held.get();
        if on {
            let now = now + delta;
            held.set((on, now, peak.max(now)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a thread-local
// counter (const-initialised, so it never allocates) is updated.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// `f`'s result and the most heap this thread held at once while it ran.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    HELD.with(|held| held.set((true, 0, 0)));
    let result = f();
    let (_, _, peak) = HELD.with(|held| held.replace((false, 0, 0)));
    (result, usize::try_from(peak).unwrap_or(0))
}

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [7; 32];
const PARAMS: &str =
    r#";created=1700000000;nonce="aaaaaaaaaaaaaaaaaaaaaa";keyid="k1";tag="countersign""#;
const REQUIRED: &str = r#""@method" "@authority" "@path" "@query" "content-digest""#;
/// What an oversized field may cost at most: far below what parsing it cost (9 MB and more).
const PEAK_BOUND: usize = 1024 * 1024;
/// About hyper's default HTTP/1 head limit (8 KiB + 400 KiB).
const HUGE: usize = 400_000;

fn verifier(policy: Policy) -> Verifier {
    let keyring: KeyringHandle = Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap())
        .unwrap()
        .into();
    Verifier::new(keyring, policy)
}

/// `count` copies of `item`, separated by single spaces.
fn repeated(item: &str, count: usize) -> String {
    vec![item; count].join(" ")
}

/// A bodiless GET with these fields; `signature-input` is `sig=<member>` and, unless given in
/// `fields`, `signature` is the MAC (with [`SECRET`]) over the base of `member`.
fn request(member: &str, fields: &[(&str, &str)]) -> Parts {
    let mut builder = Request::get("/p").header("host", "h");
    if !fields.iter().any(|(name, _)| *name == "content-digest") {
        builder = builder.header("content-digest", content_digest_sha256(b""));
    }
    for (name, value) in fields {
        builder = builder.header(*name, *value);
    }
    let (mut parts, ()) = builder.body(()).unwrap().into_parts();
    parts.headers.insert(
        "signature-input",
        HeaderValue::try_from(format!("sig={member}")).unwrap(),
    );
    if !parts.headers.contains_key("signature") {
        let encoded = match signature_base_for(&RequestView::from_parts(&parts), member) {
            Ok(base) => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&SECRET).unwrap();
                mac.update(base.as_bytes());
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            }
            Err(_) => "AAAA".to_owned(),
        };
        parts.headers.insert(
            "signature",
            HeaderValue::try_from(format!("sig=:{encoded}:")).unwrap(),
        );
    }
    parts
}

fn verify(verifier: &Verifier, parts: &Parts) -> Result<(), VerifyError> {
    verifier.verify_headers(parts, NOW).map(|_| ())
}

#[test]
fn oversized_signature_fields_are_refused_before_they_are_parsed() {
    let v = verifier(Policy::default());
    let required = format!("({REQUIRED}){PARAMS}");
    let keyed = format!("({REQUIRED} \"x-d\";key=\"zz\"){PARAMS}");
    let big_list = format!("x=({}), zz=1", repeated("a;b", HUGE / 4));
    let many_members = (0..HUGE / 12)
        .map(|i| format!("a{i}=:AA==:"))
        .collect::<Vec<_>>()
        .join(", ");
    let cases: Vec<(&str, Parts)> = vec![
        // The selected member: items with a parameter (the fast parser), decimals (sfv).
        (
            "Signature-Input, our tag",
            request(&format!("({}){PARAMS}", repeated("\"a\";b", HUGE / 6)), &[]),
        ),
        (
            "Signature-Input, decimals",
            request(&format!("({}){PARAMS}", repeated("1.5;b", HUGE / 6)), &[]),
        ),
        // A member no policy selects is parsed all the same.
        (
            "Signature-Input, another tag",
            request(
                &format!("({});tag=\"other\"", repeated("a;b", HUGE / 4)),
                &[],
            ),
        ),
        (
            "Signature",
            request(
                &required,
                &[("signature", &format!("{big_list}, sig=:AAAA:"))],
            ),
        ),
        (
            "Signature, many members",
            request(
                &required,
                &[("signature", &format!("{many_members}, sig=:AAAA:"))],
            ),
        ),
        (
            "Content-Digest",
            request(
                &required,
                &[(
                    "content-digest",
                    &format!("{big_list}, {}", content_digest_sha256(b"")),
                )],
            ),
        ),
        // A field covered with `;key` is parsed while the base is built, before the MAC.
        (
            "a ;key field",
            request(&keyed, &[("x-d", &big_list), ("signature", "sig=:AAAA:")]),
        ),
    ];
    for (what, parts) in cases {
        let (result, peak) = peak_of(|| verify(&v, &parts));
        assert!(
            peak < PEAK_BOUND,
            "{what}: verifying allocated {peak} bytes at once"
        );
        let error = result.expect_err(what);
        assert_eq!(
            error.reason(),
            Reason::MalformedSignature,
            "{what}: {error}"
        );
        assert!(
            error
                .detail()
                .contains(&MAX_SIGNATURE_FIELD_BYTES.to_string()),
            "{what}: {error}"
        );
    }
}

/// `member` padded with a `pad` parameter so that `sig=<member>` is `total` bytes long.
fn padded_member(member: &str, total: usize) -> String {
    let pad = total - "sig=".len() - member.len() - ";pad=\"\"".len();
    format!("{member};pad=\"{}\"", "p".repeat(pad))
}

#[test]
fn fields_up_to_the_bound_still_verify() {
    let v = verifier(Policy::default());
    let limit = MAX_SIGNATURE_FIELD_BYTES;
    let base_member = format!("({REQUIRED}){PARAMS}");

    // Signature-Input: exactly the bound verifies, a byte more is refused unparsed.
    let at = request(&padded_member(&base_member, limit), &[]);
    assert_eq!(at.headers["signature-input"].len(), limit);
    verify(&v, &at).unwrap();
    let over = request(&padded_member(&base_member, limit + 1), &[]);
    assert_eq!(
        verify(&v, &over).unwrap_err().reason(),
        Reason::MalformedSignature
    );
    // A verifier allowing more components allows 256 bytes of `Signature-Input` for each.
    let wide = verifier(Policy {
        max_components: 100,
        ..Policy::default()
    });
    verify(&wide, &over).unwrap();
    let wider = request(&padded_member(&base_member, 100 * 256), &[]);
    verify(&wide, &wider).unwrap();
    let too_wide = request(&padded_member(&base_member, 100 * 256 + 1), &[]);
    assert_eq!(
        verify(&wide, &too_wide).unwrap_err().reason(),
        Reason::MalformedSignature
    );

    // Content-Digest and a `;key` field: the bound verifies, a byte more is refused.
    let digest = content_digest_sha256(b"");
    let keyed = format!("({REQUIRED} \"x-d\";key=\"zz\"){PARAMS}");
    for len in [limit, limit + 1] {
        let padding = |prefix: usize| "p".repeat(len - prefix);
        let digest_field = format!("{digest}, x=\"{}\"", padding(digest.len() + 6));
        assert_eq!(digest_field.len(), len);
        let dict_field = format!("zz=1, x=\"{}\"", padding(10));
        assert_eq!(dict_field.len(), len);
        for parts in [
            request(&base_member, &[("content-digest", &digest_field)]),
            request(&keyed, &[("x-d", &dict_field)]),
        ] {
            let result = verify(&v, &parts);
            if len == limit {
                result.unwrap();
            } else {
                assert_eq!(result.unwrap_err().reason(), Reason::MalformedSignature);
            }
        }
    }
}

/// Through the layer on a real server: an oversized `Signature-Input` is a 401
/// `malformed_signature` (even when no member carries the policy's tag: it is refused before
/// anything is parsed), and the handler is never called.
#[tokio::test]
async fn the_verify_layer_answers_an_oversized_signature_input_malformed() {
    let layer = VerifyLayer::new(
        verifier(Policy::default()),
        Arc::new(MemoryReplayCache::new(1000)),
    );
    let (addr, calls) = support_layer::serve_counting(layer).await;
    let input = format!("sig=({});tag=\"other\"", repeated("\"a\";b", 200_000 / 6));
    let request = format!(
        "GET /p HTTP/1.1\r\nHost: h\r\nSignature-Input: {input}\r\nSignature: sig=:AAAA:\r\n\
         Connection: close\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.ends_with(r#"{"error":"malformed_signature"}"#),
        "{answer}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

//! What an unsigned request can make a verifier do before the MAC check: the cap on covered
//! components (`Policy::max_components`, default 64) and a signature base whose cost is linear
//! in the request (each `;key` field's dictionary and the query's parameters parsed once per
//! base, however many components name them).
//!
//! Before the cap, a `Signature-Input` of N `"x";key="kI"` components over one big dictionary
//! field re-parsed the whole field per component: N=4000 (98 KB) cost 4.7 s of CPU through the
//! VerifyLayer in a release build, N=9000 (223 KB) 23.7 s. Since then the signature fields and a
//! `;key` field are also bounded in length (`MAX_SIGNATURE_FIELD_BYTES`, 16 KiB: what parsing
//! them allocates, tests/verify_review2.rs), so such a request is refused for its length before
//! anything is parsed, and the worst cases here stay under that bound.
//!
//! Run: `cargo test --all-features --test core_limits -- --nocapture` (prints the timings)

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{
    content_digest_sha256, signature_base_for, RequestView, SignError, DEFAULT_MAX_COMPONENTS,
    MAX_SIGNATURE_FIELD_BYTES,
};
use countersign::layer::VerifyLayer;
use countersign::replay::MemoryReplayCache;
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Reason, Secret, Signer, SignerConfig,
    Verifier, VerifyError,
};
use hmac::{KeyInit as _, Mac as _};
use http::header::HeaderName;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tower::{ServiceBuilder, ServiceExt as _};

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [7; 32];
const NONCE: &str = "aaaaaaaaaaaaaaaaaaaaaa";
/// The components the default policy requires; every test list starts with them.
const REQUIRED: &str = r#""@method" "@authority" "@path" "@query" "content-digest""#;
const REQUIRED_COUNT: usize = 5;

/// The bound asserted for the worst cases, in a debug build. Before the fix the N=9000 case
/// took 23.7 s in a release build; with it each case takes milliseconds, up to a few hundred
/// in a debug build with the tests in parallel on a busy 2-core machine: the rest is slack.
/// (Parsing a field once per component instead of once per base is what
/// `one_parse_per_field_and_query_per_base` checks, by a ratio that load does not change.)
const WORST_CASE_BOUND: Duration = Duration::from_secs(5);

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap())
        .unwrap()
        .into()
}

fn verifier(policy: Policy) -> Verifier {
    Verifier::new(keyring(), policy)
}

/// The `Signature-Input` member (the text after `countersign=`) covering the required
/// components and then `extra`, with the parameters in an order no exact-shape reader takes.
fn member(extra: &[String]) -> String {
    let mut list = REQUIRED.to_owned();
    for component in extra {
        list.push(' ');
        list.push_str(component);
    }
    format!("({list});created={NOW};nonce=\"{NONCE}\";keyid=\"k1\";tag=\"countersign\"")
}

/// A bodiless GET of `uri` (origin-form, `Host: api.example.com`) with `headers` and the
/// signature `member`: with a MAC over the base a verifier builds for it (computed with the
/// public `signature_base_for`, which has no cap) when `valid_mac`, else 32 zero bytes.
fn request(uri: &str, headers: &[(&str, &str)], member: &str, valid_mac: bool) -> Parts {
    let mut builder = Request::builder()
        .method("GET")
        .uri(uri)
        .header("host", "api.example.com")
        .header("content-digest", content_digest_sha256(b""));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let (mut parts, ()) = builder.body(()).unwrap().into_parts();
    parts.headers.insert(
        "signature-input",
        HeaderValue::try_from(format!("countersign={member}")).unwrap(),
    );
    let mac: [u8; 32] = if valid_mac {
        let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&SECRET).unwrap();
        mac.update(base.as_bytes());
        mac.finalize().into_bytes().into()
    } else {
        [0; 32]
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(mac);
    parts.headers.insert(
        "signature",
        HeaderValue::try_from(format!("countersign=:{encoded}:")).unwrap(),
    );
    parts
}

fn reason<T: std::fmt::Debug>(result: Result<T, VerifyError>) -> Reason {
    result.unwrap_err().reason()
}

/// `count` components `"x";key="kI"`.
fn key_components(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("\"x\";key=\"k{i}\"")).collect()
}

/// `count` components `"@query-param";name="qI"`.
fn query_param_components(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("\"@query-param\";name=\"q{i}\""))
        .collect()
}

/// The dictionary `k0=1, k1=1, …` with `members` members.
fn dictionary(members: usize) -> String {
    (0..members)
        .map(|i| format!("k{i}=1"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `/q?q0=0&q1=1&…` with `params` parameters.
fn query_uri(params: usize) -> String {
    let query = (0..params)
        .map(|i| format!("q{i}={i}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("/q?{query}")
}

/// Asserts the error is the cap's, naming the count and the cap.
fn assert_cap_error(result: Result<impl std::fmt::Debug, VerifyError>, count: usize, cap: usize) {
    let err = result.unwrap_err();
    assert_eq!(err.reason(), Reason::MalformedSignature, "{err}");
    let detail = err.detail();
    assert!(
        detail.contains(&format!("covers {count} components"))
            && detail.contains(&format!("max_components ({cap})")),
        "{detail}"
    );
}

/// The members of the largest `dictionary` a verifier parses for `;key` (just under
/// `MAX_SIGNATURE_FIELD_BYTES`).
const DICT_MEMBERS: usize = 1800;

/// `dictionary(DICT_MEMBERS)`, checked to be within the bound.
fn largest_dictionary() -> String {
    let dict = dictionary(DICT_MEMBERS);
    assert!(
        dict.len() <= MAX_SIGNATURE_FIELD_BYTES && dict.len() > MAX_SIGNATURE_FIELD_BYTES * 9 / 10,
        "{}",
        dict.len()
    );
    dict
}

/// Asserts the error is the length bound's (the field is refused before it is parsed).
fn assert_too_long(result: Result<impl std::fmt::Debug, VerifyError>) {
    let err = result.unwrap_err();
    assert_eq!(err.reason(), Reason::MalformedSignature, "{err}");
    assert!(
        err.detail()
            .contains(&format!("more than the {MAX_SIGNATURE_FIELD_BYTES}")),
        "{err}"
    );
}

/// Runs `f`, prints how long it took, asserts it took less than [`WORST_CASE_BOUND`].
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    println!("{what}: {took:?}");
    assert!(
        took < WORST_CASE_BOUND,
        "{what} took {took:?} (bound {WORST_CASE_BOUND:?})"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// The cap's value

#[test]
fn default_cap_is_64_for_verifier_and_signer() {
    assert_eq!(DEFAULT_MAX_COMPONENTS, 64);
    assert_eq!(Policy::default().max_components, 64);
    assert_eq!(Policy::rfc9421(&["@method"]).max_components, 64);
    assert_eq!(SignerConfig::default().max_components, 64);
}

/// The default signer's longest list (the required components, both identity fields and 57
/// extra headers, 64 in all) is signed and verifies under the default policy; with a 58th
/// extra header present it is refused.
#[test]
fn default_signer_fits_57_extra_headers() {
    let names: Vec<HeaderName> = (0..58)
        .map(|i| HeaderName::try_from(format!("x-extra-{i}")).unwrap())
        .collect();
    let sign = |extra: usize| {
        let signer = Signer::new(
            keyring(),
            SignerConfig {
                extra_headers: names.clone(),
                ..SignerConfig::default()
            },
        );
        let mut builder = Request::builder()
            .uri("/")
            .header("host", "api.example.com");
        for name in names.iter().take(extra) {
            builder = builder.header(name, "1");
        }
        let mut parts = builder.body(()).unwrap().into_parts().0;
        sign_as_alice(&signer, &mut parts, b"").map(|()| parts)
    };
    let parts = sign(57).unwrap();
    let verifier = verifier(Policy {
        extra_headers: names.clone(),
        ..Policy::default()
    });
    verifier.verify(&parts, b"", NOW).unwrap();
    let err = sign(58).unwrap_err();
    assert!(
        err.to_string().contains("would cover 65 components"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Exactly the cap is processed, one more is refused

/// 64 components of the `;key` kind, correctly MACed, verify; 65, also correctly MACed, are
/// `malformed_signature` (the cap, not the MAC, decides); 64 with a wrong MAC get as far as
/// the MAC (`bad_signature`).
#[test]
fn cap_key_components_verify_and_one_more_is_refused() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let verifier = verifier(Policy::default());
    let dict = dictionary(100);
    let headers = [("x", dict.as_str())];

    let at_cap = member(&key_components(cap - REQUIRED_COUNT));
    let parts = request("/p?a=1", &headers, &at_cap, true);
    let verified = verifier.verify(&parts, b"", NOW).unwrap();
    assert_eq!(verified.keyid, "k1");
    let parts = request("/p?a=1", &headers, &at_cap, false);
    assert_eq!(
        reason(verifier.verify(&parts, b"", NOW)),
        Reason::BadSignature
    );

    let over = member(&key_components(cap + 1 - REQUIRED_COUNT));
    let parts = request("/p?a=1", &headers, &over, true);
    assert_cap_error(verifier.verify(&parts, b"", NOW), cap + 1, cap);
    // The full parser alone decides the same.
    assert_cap_error(verifier.verify_headers_reference(&parts, NOW), cap + 1, cap);
}

/// The same for `@query-param` components.
#[test]
fn cap_query_param_components_verify_and_one_more_is_refused() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let verifier = verifier(Policy::default());
    let uri = query_uri(100);

    let at_cap = member(&query_param_components(cap - REQUIRED_COUNT));
    let parts = request(&uri, &[], &at_cap, true);
    verifier.verify(&parts, b"", NOW).unwrap();
    let parts = request(&uri, &[], &at_cap, false);
    assert_eq!(
        reason(verifier.verify(&parts, b"", NOW)),
        Reason::BadSignature
    );

    let over = member(&query_param_components(cap + 1 - REQUIRED_COUNT));
    let parts = request(&uri, &[], &over, true);
    assert_cap_error(verifier.verify(&parts, b"", NOW), cap + 1, cap);
}

/// The cap is decided where the selected list is read, before the MAC, the key, the times and
/// the components themselves: a list over the cap with an unknown key, a stale `created` and
/// a component that cannot be built is still the cap's `malformed_signature`.
#[test]
fn cap_is_decided_before_anything_per_component() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let mut extra = key_components(cap - REQUIRED_COUNT);
    extra.push("\"@status\"".to_owned());
    let text = member(&extra)
        .replace("keyid=\"k1\"", "keyid=\"nobody\"")
        .replace(&format!("created={NOW}"), "created=1");
    let parts = request("/", &[], &text, false);
    assert_cap_error(
        verifier(Policy::default()).verify(&parts, b"", NOW),
        cap + 1,
        cap,
    );
}

// ---------------------------------------------------------------------------------------------
// A cap configured lower: every reader of Signature-Input applies it

/// A request the default signer signs for a user with roles: 7 components, the exact shape
/// the exact-shape reader takes.
fn signed_for_alice() -> Parts {
    let mut parts = Request::builder()
        .method("POST")
        .uri("/orders?id=1")
        .header("host", "api.example.com")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    sign_as_alice(
        &Signer::new(keyring(), SignerConfig::default()),
        &mut parts,
        b"{}",
    )
    .unwrap();
    parts
}

/// Signs `parts` at `NOW` with `NONCE` for alice with the role admin (user and roles fields: 2
/// of the covered components).
fn sign_as_alice(signer: &Signer, parts: &mut Parts, body: &[u8]) -> Result<(), SignError> {
    signer.sign(
        parts,
        body,
        Some(&Identity::new("alice", ["admin"])),
        NOW,
        &Nonce::new(NONCE).unwrap(),
    )
}

#[test]
fn lower_cap_applies_to_every_reader() {
    let capped = |max_components| {
        verifier(Policy {
            max_components,
            extra_headers: vec![
                HeaderName::from_static("x-a"),
                HeaderName::from_static("x-b"),
            ],
            ..Policy::default()
        })
    };
    let six = capped(6);
    let seven = capped(7);

    // The exact-shape reader (the signer's own 7-component list).
    let alice = signed_for_alice();
    seven.verify(&alice, b"{}", NOW).unwrap();
    seven
        .verify_headers_template(&alice, NOW)
        .expect("the exact-shape reader takes the signer's list")
        .unwrap();
    assert_cap_error(six.verify(&alice, b"{}", NOW), 7, 6);
    assert_cap_error(
        six.verify_headers_template(&alice, NOW)
            .expect("the exact-shape reader decides"),
        7,
        6,
    );
    assert_cap_error(
        six.verify_headers_scanned(&alice, NOW)
            .expect("the scan decides"),
        7,
        6,
    );
    assert_cap_error(six.verify_headers_reference(&alice, NOW), 7, 6);

    // The scan (plain known names, parameters in another order than the signer's).
    let text = member(&["\"x-a\"".to_owned(), "\"x-b\"".to_owned()]);
    let parts = request("/", &[("x-a", "1"), ("x-b", "2")], &text, true);
    assert!(seven.verify_headers_template(&parts, NOW).is_none());
    seven
        .verify_headers_scanned(&parts, NOW)
        .expect("the scan decides")
        .unwrap();
    seven.verify(&parts, b"", NOW).unwrap();
    assert_cap_error(
        six.verify_headers_scanned(&parts, NOW)
            .expect("the scan decides"),
        7,
        6,
    );
    assert_cap_error(six.verify(&parts, b"", NOW), 7, 6);

    // The full parser (a component with parameters).
    let text = member(&["\"x-a\"".to_owned(), "\"x\";key=\"k1\"".to_owned()]);
    let parts = request("/", &[("x-a", "1"), ("x", "k1=2")], &text, true);
    assert!(seven.verify_headers_scanned(&parts, NOW).is_none());
    seven.verify(&parts, b"", NOW).unwrap();
    assert_cap_error(six.verify(&parts, b"", NOW), 7, 6);

    // An anonymous signature (5 components) passes a cap of 5.
    let mut anonymous = Request::builder()
        .uri("/")
        .header("host", "api.example.com")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    Signer::new(keyring(), SignerConfig::default())
        .sign(&mut anonymous, b"", None, NOW, &Nonce::new(NONCE).unwrap())
        .unwrap();
    capped(5).verify(&anonymous, b"", NOW).unwrap();
    assert_cap_error(capped(4).verify(&anonymous, b"", NOW), 5, 4);
}

/// The signer refuses a list longer than its `max_components` (a verifier would refuse it).
#[test]
fn signer_refuses_more_components_than_its_cap() {
    let signer = Signer::new(
        keyring(),
        SignerConfig {
            extra_headers: vec![
                HeaderName::from_static("x-a"),
                HeaderName::from_static("x-b"),
            ],
            max_components: 6,
            ..SignerConfig::default()
        },
    );
    let nonce = Nonce::new(NONCE).unwrap();
    let request = |extra: &[&str]| {
        let mut builder = Request::builder()
            .uri("/")
            .header("host", "api.example.com");
        for name in extra {
            builder = builder.header(*name, "1");
        }
        builder.body(()).unwrap().into_parts().0
    };
    // 5 + x-a = 6: signed.
    let mut parts = request(&["x-a"]);
    signer.sign(&mut parts, b"", None, NOW, &nonce).unwrap();
    assert!(parts.headers.contains_key("signature"));
    // 5 + x-a + x-b = 7: refused.
    let mut parts = request(&["x-a", "x-b"]);
    let err = signer.sign(&mut parts, b"", None, NOW, &nonce).unwrap_err();
    assert!(
        err.to_string().contains("would cover 7 components")
            && err.to_string().contains("max_components (6)"),
        "{err}"
    );
    assert!(!parts.headers.contains_key("signature"));
    // A user with roles: 7 before any extra header.
    let mut parts = request(&[]);
    let err = sign_as_alice(&signer, &mut parts, b"").unwrap_err();
    assert!(
        err.to_string().contains("would cover 7 components"),
        "{err}"
    );
    // Refused before the request is touched.
    assert_eq!(parts.headers, request(&[]).headers);
}

// ---------------------------------------------------------------------------------------------
// The worst cases: cheap now

/// The reported attack: many `"x";key="kI"` components over one big dictionary field. Far
/// over the cap it is refused before any component is read (for its length, at these sizes);
/// at the cap (59 `;key` components over the largest dictionary parsed) the base parses the
/// field once, and the request reaches the MAC.
#[test]
fn worst_case_key_components_are_cheap() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let verifier = verifier(Policy::default());
    let big = dictionary(24_000);
    assert!(big.len() > 200 * 1024, "{}", big.len());

    for n in [4000, 9000] {
        let parts = request("/", &[("x", &big)], &member(&key_components(n)), false);
        let result = timed(
            &format!("{n} ;key components over a {} B field", big.len()),
            || verifier.verify_headers(&parts, NOW),
        );
        assert_too_long(result);
    }
    // Within the cap, over a field too long to parse: refused for the field's length.
    let parts = request(
        "/",
        &[("x", &big)],
        &member(&key_components(cap - REQUIRED_COUNT)),
        false,
    );
    assert_too_long(timed(
        &format!("{cap} components (59 ;key) over a {} B field", big.len()),
        || verifier.verify_headers(&parts, NOW),
    ));

    let dict = largest_dictionary();
    let headers = [("x", dict.as_str())];

    let parts = request(
        "/",
        &headers,
        &member(&key_components(cap - REQUIRED_COUNT)),
        false,
    );
    let result = timed(
        &format!("{cap} components (59 ;key) over a {} B field", dict.len()),
        || verifier.verify_headers(&parts, NOW),
    );
    assert_eq!(reason(result), Reason::BadSignature);
}

/// The same with `@query-param` components over a 3000-parameter query.
#[test]
fn worst_case_query_param_components_are_cheap() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let verifier = verifier(Policy::default());
    let uri = query_uri(3000);

    let parts = request(&uri, &[], &member(&query_param_components(3000)), false);
    let result = timed("3000 @query-param components, 3000-parameter query", || {
        verifier.verify_headers(&parts, NOW)
    });
    assert_too_long(result);
    // As many as fit in the `Signature-Input` bound: the cap decides.
    let parts = request(&uri, &[], &member(&query_param_components(500)), false);
    let result = timed("500 @query-param components, 3000-parameter query", || {
        verifier.verify_headers(&parts, NOW)
    });
    assert_cap_error(result, 500 + REQUIRED_COUNT, cap);

    // The last parameters of the query, so each lookup would have had to pass the others.
    let wanted: Vec<String> = (3000 - (cap - REQUIRED_COUNT)..3000)
        .map(|i| format!("\"@query-param\";name=\"q{i}\""))
        .collect();
    let parts = request(&uri, &[], &member(&wanted), false);
    let result = timed(
        &format!("{cap} components (59 @query-param), 3000-parameter query"),
        || verifier.verify_headers(&parts, NOW),
    );
    assert_eq!(reason(result), Reason::BadSignature);
    // Correctly MACed, it verifies: the lines are the ones the public base builder writes.
    let parts = request(&uri, &[], &member(&wanted), true);
    verifier.verify(&parts, b"", NOW).unwrap();
}

/// The shortest of three runs of `f`.
fn fastest(mut f: impl FnMut()) -> Duration {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// The base's cost does not grow with the number of components that read the same field or
/// query: 59 of them cost less than 10 times one (with the field and the query parsed once per
/// base the ratio is about 1 to 2; when each component parsed them again it was about 59).
/// Relative, so that it holds on a slow or loaded machine.
#[test]
fn one_parse_per_field_and_query_per_base() {
    let verifier = verifier(Policy::default());
    let many = DEFAULT_MAX_COMPONENTS - REQUIRED_COUNT;
    // Both requests are refused for their MAC (the base was built in full), the one with
    // `many` components in less than 10 times the time of the one with a single component.
    let assert_linear = |what: &str, one: &http::request::Parts, all: &http::request::Parts| {
        let time = |parts: &http::request::Parts| {
            fastest(|| {
                assert_eq!(
                    reason(verifier.verify_headers(parts, NOW)),
                    Reason::BadSignature
                )
            })
        };
        let (t_one, t_all) = (time(one), time(all));
        println!("1 {what} component: {t_one:?}, {many}: {t_all:?}");
        assert!(
            t_all < t_one * 10,
            "{what}: 1: {t_one:?}, {many}: {t_all:?}"
        );
    };

    let dict = largest_dictionary();
    let headers = [("x", dict.as_str())];
    assert_linear(
        ";key",
        &request("/", &headers, &member(&key_components(1)), false),
        &request("/", &headers, &member(&key_components(many)), false),
    );

    let uri = query_uri(3000);
    assert_linear(
        "@query-param",
        &request(&uri, &[], &member(&query_param_components(1)), false),
        &request(&uri, &[], &member(&query_param_components(many)), false),
    );
}

/// The reported attack through the real VerifyLayer (its `call` runs phase 1 synchronously):
/// 401 `malformed_signature` for N=9000, 401 `bad_signature` at the cap, each fast.
#[tokio::test]
async fn worst_case_through_the_verify_layer() {
    let cap = DEFAULT_MAX_COMPONENTS;
    let layer = VerifyLayer::new(
        verifier(Policy::default()),
        Arc::new(MemoryReplayCache::new(1000)),
    )
    .clock(Arc::new(ManualClock::new(NOW)));
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_request: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"reached"))))
            });
    let dict = largest_dictionary();
    let headers = [("x", dict.as_str())];
    for (n, expected) in [
        (9000, Reason::MalformedSignature),
        (cap - REQUIRED_COUNT, Reason::BadSignature),
    ] {
        let parts = request("/", &headers, &member(&key_components(n)), false);
        let request = Request::from_parts(parts, Full::new(Bytes::new()));
        let start = Instant::now();
        let response = service.clone().oneshot(request).await.unwrap();
        let took = start.elapsed();
        println!("VerifyLayer, {n} ;key components: {took:?}");
        assert!(took < WORST_CASE_BOUND, "{took:?}");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            format!("{{\"error\":\"{}\"}}", expected.as_str()).as_bytes()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy's configuration

/// The proxy refuses `signing.extra_headers` that would let a signature cover more than the
/// default cap (7 + 57 = 64 is the most), naming the key.
#[cfg(feature = "proxy")]
#[test]
fn proxy_config_refuses_more_extra_headers_than_the_cap_allows() {
    use countersign::proxy::config::ProxyConfig;
    let config = |extra: usize| {
        let names = (0..extra)
            .map(|i| format!("\"x-extra-{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
             [auth]\nusers_file = \"users.toml\"\n\
             [signing]\nkeyring = \"keys.toml\"\nextra_headers = [{names}]\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n"
        )
    };
    let path = std::path::Path::new("/nonexistent/proxy.toml");
    let ok = ProxyConfig::parse(&config(57), path).unwrap();
    assert_eq!(ok.signing.extra_headers.len(), 57);
    let err = ProxyConfig::parse(&config(58), path).unwrap_err();
    assert_eq!(err.key(), "signing.extra_headers", "{err}");
    assert!(
        err.problem().contains("lists 58 headers")
            && err.problem().contains("65 components")
            && err.problem().contains("list at most 57"),
        "{err}"
    );
}

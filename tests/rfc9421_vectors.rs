//! RFC 9421 Appendix B vectors: the signature bases of B.2.1–B.2.3 and the HMAC signature of
//! B.2.5, computed through the public library API.

use base64::Engine as _;
use countersign::core::{
    content_digest_sha256, signature_base_for, Keyring, KeyringHandle, Policy, Reason, RequestView,
    Secret, Verifier,
};

const B2_CONTENT_DIGEST: &str =
    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
const B25_SECRET: &str =
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==";

fn b2_request(extra: &[(&str, &str)]) -> http::request::Parts {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri("/foo?param=Value&Pet=dog")
        .header("Host", "example.com")
        .header("Date", "Tue, 20 Apr 2021 02:07:55 GMT")
        .header("Content-Type", "application/json")
        .header("Content-Digest", B2_CONTENT_DIGEST)
        .header("Content-Length", "18");
    for (k, v) in extra {
        builder = builder.header(*k, *v);
    }
    builder.body(()).unwrap().into_parts().0
}

fn base_of(input: &str) -> String {
    let parts = b2_request(&[]);
    signature_base_for(&RequestView::from_parts(&parts), input)
        .unwrap()
        .to_string()
}

#[test]
fn b21_minimal_base() {
    assert_eq!(
        base_of(r#"();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd""#),
        r#""@signature-params": ();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd""#
    );
}

#[test]
fn b22_selective_base() {
    let expected = [
        r#""@authority": example.com"#.to_owned(),
        format!(r#""content-digest": {B2_CONTENT_DIGEST}"#),
        r#""@query-param";name="Pet": dog"#.to_owned(),
        r#""@signature-params": ("@authority" "content-digest" "@query-param";name="Pet");created=1618884473;keyid="test-key-rsa-pss";tag="header-example""#.to_owned(),
    ]
    .join("\n");
    assert_eq!(
        base_of(
            r#"("@authority" "content-digest" "@query-param";name="Pet");created=1618884473;keyid="test-key-rsa-pss";tag="header-example""#
        ),
        expected
    );
}

#[test]
fn b23_full_coverage_base() {
    let expected = [
        r#""date": Tue, 20 Apr 2021 02:07:55 GMT"#.to_owned(),
        r#""@method": POST"#.to_owned(),
        r#""@path": /foo"#.to_owned(),
        r#""@query": ?param=Value&Pet=dog"#.to_owned(),
        r#""@authority": example.com"#.to_owned(),
        r#""content-type": application/json"#.to_owned(),
        format!(r#""content-digest": {B2_CONTENT_DIGEST}"#),
        r#""content-length": 18"#.to_owned(),
        r#""@signature-params": ("date" "@method" "@path" "@query" "@authority" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-rsa-pss""#.to_owned(),
    ]
    .join("\n");
    assert_eq!(
        base_of(
            r#"("date" "@method" "@path" "@query" "@authority" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-rsa-pss""#
        ),
        expected
    );
}

fn b25_verifier() -> Verifier {
    let secret = base64::engine::general_purpose::STANDARD
        .decode(B25_SECRET)
        .unwrap();
    let keyring = Keyring::single("test-shared-secret", Secret::new(secret).unwrap()).unwrap();
    Verifier::new(
        KeyringHandle::new(keyring),
        Policy::rfc9421(&["date", "@authority", "content-type"]),
    )
}

fn b25_request(signature: &str) -> http::request::Parts {
    http::Request::builder()
        .method("POST")
        .uri("/foo?param=Value&Pet=dog")
        .header("Host", "example.com")
        .header("Date", "Tue, 20 Apr 2021 02:07:55 GMT")
        .header("Content-Type", "application/json")
        .header(
            "Signature-Input",
            r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#,
        )
        .header("Signature", signature)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

#[test]
fn b25_hmac_vector_verifies() {
    let parts = b25_request("sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:");
    let verified = b25_verifier()
        .verify(&parts, br#"{"hello": "world"}"#, 1618884473)
        .expect("B.2.5 must verify");
    assert_eq!(verified.keyid, "test-shared-secret");
    assert_eq!(verified.identity, None);
}

#[test]
fn b25_hmac_vector_tampered_fails() {
    let parts = b25_request("sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtF8=:");
    let err = b25_verifier().verify(&parts, b"", 1618884473).unwrap_err();
    assert_eq!(err.reason(), Reason::BadSignature);
}

#[test]
fn rfc9530_digests() {
    assert_eq!(
        content_digest_sha256(br#"{"hello": "world"}"#),
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    );
    assert_eq!(
        content_digest_sha256(b""),
        "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    );
}

/// RFC 8941 §4.1.5 serialises a decimal rounded to three fractional digits without trailing
/// zeros, so a signature base re-serialises a received `1.50` as `1.5` and `-0.0` as `0.0`,
/// in `@signature-params` and in a `;key` member alike (a conformant peer MACs that text; the
/// base once kept the received scale).
#[test]
fn decimals_are_serialised_canonically() {
    assert_eq!(
        base_of(r#"();created=1618884473;a=1.50;b=-0.0;c=2.000;d=0.125;e=7.0"#),
        r#""@signature-params": ();created=1618884473;a=1.5;b=0.0;c=2.0;d=0.125;e=7.0"#
    );
    let parts = b2_request(&[("X-Dict", "u=1.50, v=(2.250 3.0);w=-0.10")]);
    let base = signature_base_for(
        &RequestView::from_parts(&parts),
        r#"("x-dict";key="u" "x-dict";key="v");created=1"#,
    )
    .unwrap()
    .to_string();
    assert_eq!(
        base,
        [
            r#""x-dict";key="u": 1.5"#,
            r#""x-dict";key="v": (2.25 3.0);w=-0.1"#,
            r#""@signature-params": ("x-dict";key="u" "x-dict";key="v");created=1"#,
        ]
        .join("\n")
    );
}

//! Conformance review of the signature base's derived components against RFC 9421 §2 (and the
//! URI normalisation of RFC 9110 §4.2.3 it refers to): each test here failed before the fix it
//! names, in `src/core/components.rs`.

use base64::Engine as _;
use countersign::core::{
    signature_base_for, Keyring, KeyringHandle, Policy, Reason, RequestView, Secret, Verifier,
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::{HeaderMap, Method, Uri};
use sha2::Sha256;

const NOW: u64 = 1_618_884_473;
const SECRET: [u8; 32] = [0x42; 32];

/// The signature base for `member` over a request `method uri` with the given header lines.
fn base(method: &str, uri: &str, headers: &[(&str, &str)], member: &str) -> Result<String, Reason> {
    let method: Method = method.parse().unwrap();
    let uri: Uri = uri.parse().unwrap();
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    signature_base_for(&RequestView::new(&method, &uri, &map), member)
        .map(|b| b.to_string())
        .map_err(|e| e.reason())
}

/// The value of the single component `id` (its line of the base, without the identifier).
fn value(method: &str, uri: &str, host: &str, id: &str) -> Result<String, Reason> {
    let base = base(method, uri, &[("host", host)], &format!("({id});created=1"))?;
    let line = base.lines().next().unwrap();
    Ok(line
        .strip_prefix(&format!("{id}: "))
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned())
}

/// RFC 9421 §2.2.8: "If a parameter name occurs multiple times in a request, the named query
/// parameter MUST NOT be included." The base used to get one line per occurrence.
#[test]
fn query_param_named_twice_in_the_query_is_an_error() {
    let member = r#"("@query-param";name="a");created=1"#;
    for uri in [
        "/p?a=1&a=2",
        "/p?a=1&b=2&a=1",
        "/p?a&a",
        "/p?a=1&%61=2",
        "/p?a=1&a",
    ] {
        assert_eq!(
            base("GET", uri, &[("host", "h")], member),
            Err(Reason::MalformedSignature),
            "{uri}"
        );
    }
    // A parameter named once is still covered, also when another one is repeated.
    assert_eq!(
        base("GET", "/p?b=1&a=x+y&b=2", &[("host", "h")], member).unwrap(),
        "\"@query-param\";name=\"a\": x%20y\n\
         \"@signature-params\": (\"@query-param\";name=\"a\");created=1"
    );

    // A verifier refuses such a signature, even with a MAC over the lines the base once held.
    let secret = Secret::new(SECRET.to_vec()).unwrap();
    let verifier = Verifier::new(
        KeyringHandle::new(Keyring::single("k", secret).unwrap()),
        Policy::rfc9421(&[]),
    );
    let params = r#"("@query-param";name="a");created=1618884473;keyid="k""#;
    let old_base = format!(
        "\"@query-param\";name=\"a\": 1\n\"@query-param\";name=\"a\": 2\n\"@signature-params\": {params}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(old_base.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let parts = http::Request::builder()
        .uri("/p?a=1&a=2")
        .header("host", "h")
        .header("signature-input", format!("sig={params}"))
        .header("signature", format!("sig=:{signature}:"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let err = verifier.verify(&parts, b"", NOW).unwrap_err();
    assert_eq!(err.reason(), Reason::MalformedSignature, "{err}");
}

/// RFC 9421 §2.2.5: for `CONNECT www.example.com:80 HTTP/1.1` the request target is the
/// authority form as received, `www.example.com:80` (the RFC's own example). It used to be the
/// normalised `@authority` (`www.example.com`: the default port dropped, lower-cased, or the
/// verifier's configured authority).
#[test]
fn request_target_of_connect_is_the_authority_form_as_received() {
    assert_eq!(
        value(
            "CONNECT",
            "www.example.com:80",
            "www.example.com",
            "\"@request-target\""
        )
        .unwrap(),
        "www.example.com:80"
    );
    assert_eq!(
        value(
            "CONNECT",
            "WWW.Example.com:443",
            "www.example.com",
            "\"@request-target\""
        )
        .unwrap(),
        "WWW.Example.com:443"
    );
    // `@authority` is normalised as before.
    assert_eq!(
        value(
            "CONNECT",
            "www.example.com:80",
            "www.example.com",
            "\"@authority\""
        )
        .unwrap(),
        "www.example.com"
    );
}

/// An extended CONNECT (RFC 8441, WebSockets over HTTP/2) has a path: its request target is
/// that path, as `@target-uri` already had it; it used to be the authority.
#[test]
fn request_target_of_extended_connect_is_its_path() {
    assert_eq!(
        value(
            "CONNECT",
            "https://h/chat?room=1",
            "h",
            "\"@request-target\""
        )
        .unwrap(),
        "/chat?room=1"
    );
    assert_eq!(
        value("CONNECT", "https://h/chat?room=1", "h", "\"@target-uri\"").unwrap(),
        "https://h/chat?room=1"
    );
}

/// An absolute-form target with an empty path and a query (`http://h?x=1`): the path is `/`
/// (RFC 9110 §4.2.3, RFC 9112 §3.2.1), as `@path` says; `@request-target` used to be `?x=1`,
/// which is no request target at all, and `@target-uri` `http://h?x=1` (while `http://h` was
/// already `http://h/`).
#[test]
fn empty_path_with_a_query_is_slash() {
    assert_eq!(
        value("GET", "http://h?x=1", "h", "\"@request-target\"").unwrap(),
        "/?x=1"
    );
    assert_eq!(
        value("GET", "http://h?x=1", "h", "\"@target-uri\"").unwrap(),
        "http://h/?x=1"
    );
    assert_eq!(value("GET", "http://h?x=1", "h", "\"@path\"").unwrap(), "/");
    assert_eq!(
        value("GET", "http://h?x=1", "h", "\"@query\"").unwrap(),
        "?x=1"
    );
    assert_eq!(
        value("GET", "http://h", "h", "\"@target-uri\"").unwrap(),
        "http://h/"
    );
}

/// RFC 3986 §6.2.3 (which RFC 9110 §4.2.3 and RFC 9421 §2.2.3 refer to): "normalizers should
/// omit the port component and its ':' delimiter if port is empty". `@authority` of
/// `Host: h:` used to be `h:`, which a conformant peer computes as `h`.
#[test]
fn authority_with_an_empty_port_is_the_host_alone() {
    for (host, expected) in [
        ("api.example:", "api.example"),
        ("API.Example:", "api.example"),
        ("[::1]:", "[::1]"),
        ("u@api.example:", "api.example"),
    ] {
        assert_eq!(
            value("GET", "/p", host, "\"@authority\"").as_deref(),
            Ok(expected),
            "{host}"
        );
    }
    // The URI's own authority is used when it has one (its `Host` must name the same).
    for host in ["API.example", "api.example:"] {
        assert_eq!(
            value("GET", "http://api.example:/p", host, "\"@authority\"").as_deref(),
            Ok("api.example"),
            "{host}"
        );
    }
    // A port that is there is kept, as before.
    assert_eq!(
        value("GET", "/p", "api.example:8080", "\"@authority\"").as_deref(),
        Ok("api.example:8080")
    );
}

/// RFC 9113 §8.3.1: a server should treat a request whose `Host` names another entity than its
/// `:authority` as malformed. The URI authority was used and any `Host` ignored, so a `Host`
/// added or rewritten beside a signed `:authority` (or absolute-form target) passed, and a
/// handler or extractor reading `Host` (virtual hosts, tenants: axum-extra's `Host` prefers
/// the header) acted on a field no signature covered. No conformant signer sends the two
/// differing (the signer refuses to sign that shape).
#[test]
fn a_host_beside_the_uri_authority_must_name_the_same_authority() {
    let uri = "http://api.example/orders";
    for id in ["\"@authority\"", "\"@target-uri\""] {
        let member = format!("({id});created=1");
        for host in ["admin.internal", "api.example:8080", "api.example.evil"] {
            assert_eq!(
                base("GET", uri, &[("host", host)], &member),
                Err(Reason::MalformedSignature),
                "{id} with Host {host}"
            );
        }
        // Two `Host` lines beside it: ambiguous whatever they say.
        assert_eq!(
            base(
                "GET",
                uri,
                &[("host", "api.example"), ("host", "api.example")],
                &member
            ),
            Err(Reason::MalformedSignature),
            "{id} with two Host lines"
        );
    }
    // The same authority spelled another way is the same authority; no `Host` at all (HTTP/2
    // clients send none) is the URI's.
    for host in [
        "api.example",
        "API.Example:80",
        "api.example:",
        " api.example ",
    ] {
        assert_eq!(
            value("GET", uri, host, "\"@authority\""),
            Ok("api.example".to_owned()),
            "Host {host:?}"
        );
    }
    assert_eq!(
        base("GET", uri, &[], "(\"@authority\");created=1").map(|b| b.lines().count()),
        Ok(2)
    );
    // Only the URI's authority decides the value: a verifier configured with the authority it
    // expects (behind a balancer that rewrites `Host`) reads neither.
    let method = Method::GET;
    let parsed: Uri = uri.parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, "lb.internal".parse().unwrap());
    let view = RequestView::new(&method, &parsed, &headers).with_authority(Some("api.example"));
    assert!(
        signature_base_for(&view, "(\"@authority\");created=1").is_ok(),
        "a configured authority"
    );
}

//! The responses the layers answer with when they reject a request.
//!
//! Two shapes: an HTTP request gets its status (401, 413, 503, 400) and the JSON body
//! `{"error":"<code>"}`; a gRPC request ([`is_grpc_request`]) gets a gRPC "Trailers-Only"
//! response, the form gRPC clients read a status from: HTTP 200, `content-type:
//! application/grpc`, `grpc-status` ([`Reason::grpc_status`]), `grpc-message: <code>` and no
//! body. Both carry the same stable wire code.
//!
//! Every HTTP 401 also carries the challenge RFC 9110 §11.6.1 requires of a 401,
//! `WWW-Authenticate: Signature error="<code>"` ([`CHALLENGE_SCHEME`]), and a 401 from
//! [`VerifyLayer`](super::VerifyLayer) an `Accept-Signature` field (RFC 9421 §5.1) naming the
//! signature it accepts. Both are built on the rejection path only (docs/PROTOCOL.md §7).

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use sfv::{BareItem, Dictionary, InnerList, Item, Parameters, SerializeValue as _};

use crate::core::{BodyPolicy, Policy, Reason, Selector, ALGORITHM};

/// The authentication scheme of the challenge on every 401 answer: `Signature`, the scheme
/// name of the draft-cavage HTTP Signatures that RFC 9421 replaced. RFC 9421 registers no
/// scheme (it has no `Authorization` form: the signature travels in `Signature` /
/// `Signature-Input`), and `Signature` is not in the IANA HTTP Authentication Scheme Registry;
/// the challenge only tells a client that this resource wants a signed request, and why its
/// request was refused (the `error` parameter).
pub const CHALLENGE_SCHEME: &str = "Signature";

/// The `Accept-Signature` field name (RFC 9421 §5.1), lower-cased.
pub const ACCEPT_SIGNATURE: &str = "accept-signature";

/// The label of the one member of the layer's `Accept-Signature` (a verifier does not select
/// by label: any label will do for the signature sent).
pub const ACCEPT_SIGNATURE_LABEL: &str = "countersign";

/// Wire code for a request body that could not be read (the client broke off or sent invalid
/// chunked framing). Not a signature [`Reason`]: nothing was verified against it.
pub const BODY_READ_FAILED: &str = "body_read_failed";

/// The HTTP status of [`BODY_READ_FAILED`]: 400.
const BODY_READ_FAILED_HTTP_STATUS: StatusCode = StatusCode::BAD_REQUEST;

/// The gRPC status of [`BODY_READ_FAILED`]: 3 `INVALID_ARGUMENT`, gRPC's counterpart of HTTP 400
/// (the reasons' gRPC statuses are [`Reason::grpc_status`]).
pub const BODY_READ_FAILED_GRPC_STATUS: u8 = 3;

/// The gRPC media type, the only `content-type` a gRPC rejection carries.
const APPLICATION_GRPC: &[u8] = b"application/grpc";

/// What gRPC percent-encodes in `grpc-message`: everything but printable ASCII and space, and
/// `%` itself (non-ASCII bytes are always encoded).
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// The JSON body `{"error":"<code>"}` with its status: `code` is a stable wire code (ASCII
/// `a-z_`, so it needs no JSON escaping). A 401 also gets the challenge
/// `WWW-Authenticate: Signature error="<code>"` ([`challenge`]).
pub fn error_response(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!("{{\"error\":\"{code}\"}}");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // A rejection depends on this very request (its nonce, its time): never reuse it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(WWW_AUTHENTICATE, challenge(code));
    }
    response
}

/// The `WWW-Authenticate` challenge of a 401 for `code`: `Signature error="<code>"` (RFC 9110
/// §11.6.1 `challenge`, one `auth-param` whose value is a `quoted-string`; a `"` or `\` in
/// `code` is escaped with `\`). A `code` that cannot be a field value (a control character)
/// gets the bare scheme, `Signature`.
pub fn challenge(code: &str) -> HeaderValue {
    let mut value = String::with_capacity(CHALLENGE_SCHEME.len() + code.len() + 10);
    value.push_str(CHALLENGE_SCHEME);
    value.push_str(" error=\"");
    for c in code.chars() {
        if c == '"' || c == '\\' {
            value.push('\\');
        }
        value.push(c);
    }
    value.push('"');
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static(CHALLENGE_SCHEME))
}

/// The `Accept-Signature` field (RFC 9421 §5.1, an RFC 8941 Dictionary) describing the
/// signature a verifier with `policy` requires, for the layer's 401 answers: one member,
/// labelled [`ACCEPT_SIGNATURE_LABEL`], whose inner list is the required components in order
/// (and `"content-digest"` when the body must be digested and it is not listed), with the
/// parameters `created` (no value: "include a creation time"), `alg="hmac-sha256"`, and
/// `tag="<tag>"` when the policy selects by tag. The nonce and the key id the policy also
/// requires have no such form (in a signature request `nonce` and `keyid` carry the value to
/// use), so they are not named; neither are the identity fields, covered when present.
/// `None` when the policy holds something RFC 8941 cannot serialise (a component name or tag
/// outside printable ASCII): no field rather than a wrong one. Built once per layer.
pub fn accept_signature(policy: &Policy) -> Option<HeaderValue> {
    let mut components: Vec<Item> = policy
        .required_components
        .iter()
        .map(|name| Item::new(BareItem::String(name.clone())))
        .collect();
    let digest = "content-digest";
    if policy.body == BodyPolicy::RequireDigest
        && !policy.required_components.iter().any(|name| name == digest)
    {
        components.push(Item::new(BareItem::String(digest.to_owned())));
    }
    let mut params = Parameters::new();
    params.insert("created".to_owned(), BareItem::Boolean(true));
    params.insert("alg".to_owned(), BareItem::String(ALGORITHM.to_owned()));
    if let Selector::Tag(tag) = &policy.selector {
        params.insert("tag".to_owned(), BareItem::String(tag.clone()));
    }
    let mut dictionary = Dictionary::new();
    dictionary.insert(
        ACCEPT_SIGNATURE_LABEL.to_owned(),
        InnerList::with_params(components, params).into(),
    );
    let text = dictionary.serialize_value().ok()?;
    HeaderValue::try_from(text).ok()
}

/// The rejection for a verification [`Reason`], with [`Reason::http_status`].
/// `body_memory_limit` also carries `Retry-After: 1`: the bodies holding the memory are given
/// back as their requests complete, and the request changed nothing, so it may be sent again.
pub fn rejection(reason: Reason) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(reason.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error_response(status, reason.as_str());
    if reason == Reason::BodyMemoryLimit {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A gRPC "Trailers-Only" error response: HTTP 200, `content-type: application/grpc`,
/// `grpc-status: <grpc_status>`, `grpc-message: <code>`, `cache-control: no-store` and an empty
/// body (so the headers end the stream: a gRPC client reads them as the call's status). `code`
/// is percent-encoded as `grpc-message` requires; the stable wire codes (ASCII `a-z_`) are sent
/// as they are.
pub fn grpc_error_response(grpc_status: u8, code: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(u16::from(grpc_status)),
    );
    // Percent-encoded, the message holds only visible ASCII and spaces: always a valid value.
    let message = percent_encoding::utf8_percent_encode(code, GRPC_MESSAGE).to_string();
    if let Ok(message) = HeaderValue::try_from(message) {
        headers.insert(HeaderName::from_static("grpc-message"), message);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The gRPC rejection for a verification [`Reason`], with [`Reason::grpc_status`].
pub fn grpc_rejection(reason: Reason) -> Response<Full<Bytes>> {
    grpc_error_response(reason.grpc_status(), reason.as_str())
}

/// Whether a request is a gRPC call, judged by its (first) `content-type`: the media type (the
/// part before any `;` parameters, without surrounding whitespace, compared ignoring ASCII case)
/// is `application/grpc` or `application/grpc+<format>` (`+proto`, `+json`, ...), as gRPC over
/// HTTP/2 defines it. gRPC-Web (`application/grpc-web`, `application/grpc-web-text`, with or
/// without `+proto`) is another wire protocol, read by other clients: it is not gRPC here.
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes();
    let media = match value.iter().position(|&b| b == b';') {
        Some(end) => &value[..end],
        None => value,
    };
    let media = media.trim_ascii();
    let Some((prefix, rest)) = media.split_at_checked(APPLICATION_GRPC.len()) else {
        return false;
    };
    prefix.eq_ignore_ascii_case(APPLICATION_GRPC) && (rest.is_empty() || rest[0] == b'+')
}

/// The rejection a request gets for `reason`: the gRPC form for a gRPC call, else the JSON one.
/// Reads the request's `content-type`, so it belongs on the rejection path only.
pub(crate) fn rejection_for(request_headers: &HeaderMap, reason: Reason) -> Response<Full<Bytes>> {
    if is_grpc_request(request_headers) {
        grpc_rejection(reason)
    } else {
        rejection(reason)
    }
}

/// The [`BODY_READ_FAILED`] rejection a request gets: 400 JSON, or `INVALID_ARGUMENT` for a
/// gRPC call.
pub(crate) fn body_read_failed(request_headers: &HeaderMap) -> Response<Full<Bytes>> {
    if is_grpc_request(request_headers) {
        grpc_error_response(BODY_READ_FAILED_GRPC_STATUS, BODY_READ_FAILED)
    } else {
        error_response(BODY_READ_FAILED_HTTP_STATUS, BODY_READ_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    async fn body_of(response: Response<Full<Bytes>>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    /// Asserts the whole gRPC Trailers-Only shape: exactly these four headers and no body.
    async fn assert_trailers_only(response: Response<Full<Bytes>>, status: &str, code: &str) {
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers.len(), 4, "{headers:?}");
        assert_eq!(headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(headers["grpc-status"], status);
        assert_eq!(headers["grpc-message"], code);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert!(http_body::Body::is_end_stream(response.body()));
        assert!(body_of(response).await.is_empty());
    }

    #[tokio::test]
    async fn every_reason_is_json_with_its_status() {
        for reason in Reason::ALL {
            let response = rejection(reason);
            assert_eq!(response.status().as_u16(), reason.http_status());
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            // Only `body_memory_limit` tells when to try again (the memory is given back
            // within a request's time); the replay cache's recovery is not known.
            let retry = response.headers().get(RETRY_AFTER);
            if reason == Reason::BodyMemoryLimit {
                assert_eq!(retry.unwrap(), "1");
            } else {
                assert!(retry.is_none(), "{reason}");
            }
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("{{\"error\":\"{}\"}}", reason.as_str()));
        }
    }

    #[tokio::test]
    async fn every_reason_is_trailers_only_grpc_with_its_status() {
        for reason in Reason::ALL {
            let expected = match reason.http_status() {
                401 => "16",
                413 => "8",
                503 => "14",
                other => panic!("{reason}: no gRPC status for HTTP {other}"),
            };
            assert_eq!(reason.grpc_status().to_string(), expected, "{reason}");
            assert_trailers_only(grpc_rejection(reason), expected, reason.as_str()).await;
        }
    }

    #[tokio::test]
    async fn the_request_content_type_picks_the_shape() {
        let grpc = [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "Application/GRPC",
            "APPLICATION/GRPC+PROTO",
            "application/grpc; charset=utf-8",
            "application/grpc+proto;x=y",
            " application/grpc ",
        ];
        for value in grpc {
            let headers = content_type(value);
            assert!(is_grpc_request(&headers), "{value}");
            for reason in Reason::ALL {
                let expected = reason.grpc_status().to_string();
                let response = rejection_for(&headers, reason);
                assert_trailers_only(response, &expected, reason.as_str()).await;
            }
            let response = body_read_failed(&headers);
            assert_trailers_only(response, "3", "body_read_failed").await;
        }

        let not_grpc = [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc-web-text",
            "application/grpc-web-text+proto",
            "application/grpcx",
            "application/grp",
            "application/json",
            "text/plain; x=application/grpc",
            "",
        ];
        let mut headers: Vec<HeaderMap> = not_grpc.into_iter().map(content_type).collect();
        headers.push(HeaderMap::new());
        for headers in headers {
            assert!(!is_grpc_request(&headers), "{headers:?}");
            for reason in Reason::ALL {
                let response = rejection_for(&headers, reason);
                assert_eq!(response.status().as_u16(), reason.http_status());
                assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
                assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
                let expected = format!("{{\"error\":\"{}\"}}", reason.as_str());
                assert_eq!(body_of(response).await, expected);
            }
            let response = body_read_failed(&headers);
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            assert_eq!(body_of(response).await, "{\"error\":\"body_read_failed\"}");
        }
    }

    /// A `content-type` with bytes beyond ASCII is judged by the same rule (and never panics).
    #[test]
    fn an_opaque_content_type_is_judged_by_its_bytes() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"application/grpc\xff").unwrap();
        headers.insert(CONTENT_TYPE, value);
        assert!(!is_grpc_request(&headers));
        let value = HeaderValue::from_bytes(b"application/grpc+\xff").unwrap();
        headers.insert(CONTENT_TYPE, value);
        assert!(is_grpc_request(&headers));
    }

    /// A 401 carries the challenge with its code, escaped as a quoted-string; other statuses
    /// carry none; a code that cannot be a field value gets the bare scheme.
    #[test]
    fn only_a_401_carries_the_challenge() {
        for reason in Reason::ALL {
            let response = rejection(reason);
            let challenge = response.headers().get(WWW_AUTHENTICATE);
            if reason.http_status() == 401 {
                let expected = format!("Signature error=\"{}\"", reason.as_str());
                assert_eq!(challenge.unwrap(), expected.as_str(), "{reason}");
                assert_eq!(
                    response.headers().get_all(WWW_AUTHENTICATE).iter().count(),
                    1
                );
            } else {
                assert!(challenge.is_none(), "{reason}");
            }
        }
        let bad_request = error_response(StatusCode::BAD_REQUEST, BODY_READ_FAILED);
        assert!(bad_request.headers().get(WWW_AUTHENTICATE).is_none());
        assert_eq!(challenge(r#"a"b\c"#), r#"Signature error="a\"b\\c""#);
        assert_eq!(challenge("a\nb"), "Signature");
    }

    /// Any other message is percent-encoded as `grpc-message` requires.
    #[test]
    fn a_grpc_message_is_percent_encoded() {
        let response = grpc_error_response(13, "50% é\n ok");
        assert_eq!(response.headers()["grpc-status"], "13");
        assert_eq!(response.headers()["grpc-message"], "50%25 %C3%A9%0A ok");
    }
}

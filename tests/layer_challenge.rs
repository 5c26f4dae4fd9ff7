//! The challenge on the verify layer's 401 answers, on a real server on 127.0.0.1:0: every 401
//! reason carries `WWW-Authenticate: Signature error="<code>"` (RFC 9110 §11.6.1: a 401 MUST
//! carry a challenge) and an `Accept-Signature` (RFC 9421 §5.1) that parses as an RFC 8941
//! Dictionary naming the signature the layer accepts; the JSON body is unchanged; 413, 503,
//! a gRPC rejection and an accepted request carry neither (docs/PROTOCOL.md §7).
//!
//! Run: `cargo test --all-features --test layer_challenge`

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use countersign::core::Reason;
#[cfg(feature = "axum")]
use countersign::layer::VerifiedIdentity;
use countersign::layer::{accept_signature, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sfv::{BareItem, ListEntry, Parser};

/// What the default policy's layer sends, byte for byte (docs/PROTOCOL.md §7).
const ACCEPT: &str = r#"countersign=("@method" "@authority" "@path" "@query" "content-digest");created;alg="hmac-sha256";tag="countersign""#;

fn keyring(id: &str) -> KeyringHandle {
    KeyringHandle::new(Keyring::single(id, Secret::new(vec![7; 32]).unwrap()).unwrap())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The API: `GET /whoami` and `POST /echo` behind `layer`.
async fn serve(layer: VerifyLayer) -> SocketAddr {
    let app = Router::new()
        .route("/whoami", get(|| async { "ok" }))
        .route("/echo", post(|body: Bytes| async move { body }))
        .layer(layer);
    serve_router(app).await
}

async fn serve_router(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn layer(capacity: usize) -> VerifyLayer {
    VerifyLayer::new(
        Verifier::new(keyring("k1"), Policy::default()),
        Arc::new(MemoryReplayCache::new(capacity)),
    )
    .body_limit(64)
}

/// A request signed with `keyid`'s key at `created`, then changed by `tamper`.
fn signed(
    method: &str,
    uri: &str,
    body: &'static [u8],
    keyid: &str,
    user: Option<&Identity>,
    created: u64,
    tamper: impl FnOnce(&mut http::request::Parts),
) -> Request<Full<Bytes>> {
    let (mut parts, ()) = Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap()
        .into_parts();
    let signer = Signer::new(keyring(keyid), SignerConfig::default());
    signer
        .sign(&mut parts, body, user, created, &Nonce::random())
        .unwrap();
    tamper(&mut parts);
    Request::from_parts(parts, Full::new(Bytes::from_static(body)))
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The one field line of `name`, if any (two would be a defect).
fn only<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    assert!(values.next().is_none(), "{name} twice: {headers:?}");
    first
}

/// Parses `Accept-Signature` with sfv and checks every part of it, then the exact bytes.
fn assert_accept_signature(value: &HeaderValue) {
    let dictionary = Parser::parse_dictionary(value.as_bytes()).unwrap();
    assert_eq!(dictionary.len(), 1, "{value:?}");
    let Some(ListEntry::InnerList(list)) = dictionary.get("countersign") else {
        panic!("no inner list labelled countersign: {value:?}");
    };
    let components: Vec<&str> = list
        .items
        .iter()
        .map(|item| {
            assert!(item.params.is_empty(), "{value:?}");
            item.bare_item.as_str().unwrap()
        })
        .collect();
    assert_eq!(
        components,
        ["@method", "@authority", "@path", "@query", "content-digest"]
    );
    let params: Vec<(&str, &BareItem)> = list
        .params
        .iter()
        .map(|(name, value)| (name.as_str(), value))
        .collect();
    assert_eq!(
        params,
        [
            ("created", &BareItem::Boolean(true)),
            ("alg", &BareItem::String("hmac-sha256".into())),
            ("tag", &BareItem::String("countersign".into())),
        ]
    );
    assert_eq!(value, ACCEPT);
}

#[tokio::test]
async fn every_401_reason_carries_the_challenge_and_accept_signature() {
    let addr = serve(layer(10_000)).await;
    let base = format!("http://{addr}");
    let (whoami, echo) = (format!("{base}/whoami"), format!("{base}/echo"));
    let alice = Identity::new("alice", ["admin"]);
    let t = now();
    let keep = |_: &mut http::request::Parts| {};

    let replayed = signed("GET", &whoami, b"", "k1", Some(&alice), t, keep);
    let accepted = send(replayed.clone()).await;
    assert_eq!(accepted.status, StatusCode::OK);
    // An accepted request gets neither field.
    assert!(only(&accepted.headers, "www-authenticate").is_none());
    assert!(only(&accepted.headers, "accept-signature").is_none());

    let cases: Vec<(Reason, Request<Full<Bytes>>)> = vec![
        (
            Reason::MissingSignature,
            Request::get(&whoami).body(Full::new(Bytes::new())).unwrap(),
        ),
        (
            Reason::MalformedSignature,
            signed("GET", &whoami, b"", "k1", None, t, |parts| {
                let bad = HeaderValue::from_static("countersign=(\"@method\"");
                parts.headers.insert("signature-input", bad);
            }),
        ),
        (
            Reason::UnknownKey,
            signed("GET", &whoami, b"", "k9", None, t, keep),
        ),
        (
            Reason::UnsupportedAlgorithm,
            signed("GET", &whoami, b"", "k1", None, t, |parts| {
                let input = parts.headers["signature-input"].to_str().unwrap();
                let input = input.replace("hmac-sha256", "rsa-pss-sha512");
                parts
                    .headers
                    .insert("signature-input", input.parse().unwrap());
            }),
        ),
        (
            Reason::Expired,
            signed("GET", &whoami, b"", "k1", None, t - 100, keep),
        ),
        (
            Reason::NotYetValid,
            signed("GET", &whoami, b"", "k1", None, t + 100, keep),
        ),
        (
            Reason::InsufficientCoverage,
            signed("GET", &whoami, b"", "k1", None, t, |parts| {
                let user = HeaderValue::from_static("mallory");
                parts.headers.insert("x-auth-user", user);
            }),
        ),
        (
            Reason::BadSignature,
            signed("GET", &whoami, b"", "k1", None, t, |parts| {
                parts.uri = format!("{whoami}?admin=1").parse().unwrap();
            }),
        ),
        (
            Reason::MissingDigest,
            signed("POST", &echo, b"{}", "k1", None, t, |parts| {
                parts.headers.remove("content-digest");
            }),
        ),
        (
            Reason::DigestMismatch,
            Request::from_parts(
                signed("POST", &echo, b"{}", "k1", None, t, keep)
                    .into_parts()
                    .0,
                Full::new(Bytes::from_static(b"[]")),
            ),
        ),
        (Reason::Replayed, replayed),
    ];
    // Every 401 reason there is, and only those.
    let covered: BTreeSet<&str> = cases.iter().map(|(reason, _)| reason.as_str()).collect();
    let all_401: BTreeSet<&str> = Reason::ALL
        .into_iter()
        .filter(|reason| reason.http_status() == 401)
        .map(|reason| reason.as_str())
        .collect();
    assert_eq!(covered, all_401);

    for (reason, request) in cases {
        let answer = send(request).await;
        let code = reason.as_str();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{code}");
        assert_eq!(answer.body, format!("{{\"error\":\"{code}\"}}"), "{code}");
        assert_eq!(answer.headers["content-type"], "application/json", "{code}");
        let challenge = only(&answer.headers, "www-authenticate").expect(code);
        assert_eq!(challenge, &format!("Signature error=\"{code}\""), "{code}");
        assert_accept_signature(only(&answer.headers, "accept-signature").expect(code));
    }
}

#[tokio::test]
async fn over_the_limit_unavailable_and_grpc_answers_carry_no_challenge() {
    let addr = serve(layer(1)).await;
    let echo = format!("http://{addr}/echo");
    let t = now();
    let keep = |_: &mut http::request::Parts| {};
    let checks = [
        // 413 `body_too_large` (the limit is 64 bytes).
        (
            signed("POST", &echo, &[b'x'; 100], "k1", None, t, keep),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        // Fills the one-entry cache...
        (
            signed("POST", &echo, b"1", "k1", None, t, keep),
            StatusCode::OK,
            "",
        ),
        // ... so the next nonce cannot be recorded: 503.
        (
            signed("POST", &echo, b"2", "k1", None, t, keep),
            StatusCode::SERVICE_UNAVAILABLE,
            "replay_cache_unavailable",
        ),
    ];
    for (request, status, code) in checks {
        let answer = send(request).await;
        assert_eq!(answer.status, status, "{code}");
        if !code.is_empty() {
            assert_eq!(answer.body, format!("{{\"error\":\"{code}\"}}"));
        }
        assert!(
            only(&answer.headers, "www-authenticate").is_none(),
            "{code}"
        );
        assert!(
            only(&answer.headers, "accept-signature").is_none(),
            "{code}"
        );
    }
    // A gRPC call refused `missing_signature`: HTTP 200 Trailers-Only, no challenge.
    let request = Request::post(&echo)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let answer = send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-message"], "missing_signature");
    assert!(only(&answer.headers, "www-authenticate").is_none());
    assert!(only(&answer.headers, "accept-signature").is_none());
}

/// The axum extractor's 401 (a route without the layer) carries the challenge too; it knows no
/// policy, so no `Accept-Signature`.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_extractor_401_carries_the_challenge() {
    let app = Router::new().route(
        "/whoami",
        get(|identity: VerifiedIdentity| async move { identity.keyid.to_string() }),
    );
    let addr = serve_router(app).await;
    let request = Request::get(format!("http://{addr}/whoami"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body, r#"{"error":"missing_signature"}"#);
    let challenge = only(&answer.headers, "www-authenticate").unwrap();
    assert_eq!(challenge, r#"Signature error="missing_signature""#);
    assert!(only(&answer.headers, "accept-signature").is_none());
}

/// `Accept-Signature` follows the policy: its tag and required components, `content-digest`
/// only when the body is digested, no `tag` when the policy selects no tag; and a policy RFC
/// 8941 cannot express gets no field rather than a broken one.
#[test]
fn accept_signature_follows_the_policy() {
    let mut policy = Policy {
        selector: countersign::core::Selector::Tag("orders-api".into()),
        required_components: vec!["@method".into(), "@target-uri".into(), "x-tenant".into()],
        ..Policy::default()
    };
    let value = accept_signature(&policy).unwrap();
    assert_eq!(
        value,
        r#"countersign=("@method" "@target-uri" "x-tenant" "content-digest");created;alg="hmac-sha256";tag="orders-api""#
    );
    Parser::parse_dictionary(value.as_bytes()).unwrap();

    let value = accept_signature(&Policy::rfc9421(&["@method", "@path"])).unwrap();
    assert_eq!(
        value,
        r#"countersign=("@method" "@path");created;alg="hmac-sha256""#
    );
    Parser::parse_dictionary(value.as_bytes()).unwrap();

    // A tag with a quote and a backslash is escaped as an sf-string...
    policy.selector = countersign::core::Selector::Tag(r#"a"b\c"#.into());
    let value = accept_signature(&policy).unwrap();
    let parsed = Parser::parse_dictionary(value.as_bytes()).unwrap();
    let Some(ListEntry::InnerList(list)) = parsed.get("countersign") else {
        panic!("{value:?}");
    };
    assert_eq!(list.params["tag"], BareItem::String(r#"a"b\c"#.into()));
    // ... one outside printable ASCII cannot be: no field.
    policy.selector = countersign::core::Selector::Tag("é".into());
    assert!(accept_signature(&policy).is_none());
}

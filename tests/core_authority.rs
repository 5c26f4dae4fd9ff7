//! The signer's `@authority` when a request carries both a URI authority and a `Host` header.
//!
//! Which of the two a server sees depends on the protocol the client ends up using (hyper's
//! HTTP/1.1 client sends an origin-form target with the caller's `Host`; HTTP/2 sends
//! `:authority` from the URI), so a signer cannot know which to sign: it refuses when they
//! differ after `@authority`'s normalisation, and signs when they agree. Before, it signed the
//! URI authority and the HTTP/1.1 server answered 401 `bad_signature`.
//!
//! Run: `cargo test --all-features --test core_authority`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::layer::{SignLayer, SignLayerError, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig,
    Verifier,
};
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt as _};

const NOW: u64 = 1_700_000_000;
const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAA";

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![9; 32]).unwrap())
        .unwrap()
        .into()
}

fn signer() -> Signer {
    Signer::new(keyring(), SignerConfig::default())
}

fn nonce() -> Nonce {
    Nonce::new(NONCE).unwrap()
}

fn parts(uri: &str, hosts: &[&str]) -> Parts {
    let mut builder = Request::builder().method("POST").uri(uri);
    for host in hosts {
        builder = builder.header("host", *host);
    }
    builder.body(()).unwrap().into_parts().0
}

/// The verifier for a request sent over `scheme`.
fn verifier(scheme: &str) -> Verifier {
    Verifier::new(
        keyring(),
        Policy {
            scheme: Some(scheme.to_owned()),
            ..Policy::default()
        },
    )
}

/// The request as an HTTP/1.1 server receives it from a client that sends origin-form: the
/// URI reduced to its path and query, the `Host` header kept.
fn as_origin_form(parts: &Parts) -> Parts {
    let mut received = parts.clone();
    received.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .unwrap();
    received
}

// ---------------------------------------------------------------------------------------------
// Signer

/// `Host` and URI authority that name the same authority once normalised (case, the scheme's
/// default port, userinfo) are signed, and the signature verifies whichever of the two the
/// server reads: the URI's (absolute-form, HTTP/2) or the `Host` (origin-form).
#[test]
fn host_agreeing_with_the_uri_authority_signs_and_verifies() {
    for (uri, host, scheme) in [
        (
            "http://api.example.com:8080/x?y=1",
            "api.example.com:8080",
            "http",
        ),
        ("http://API.Example.com:80/x?y=1", "api.example.com", "http"),
        ("http://api.example.com/x", "API.EXAMPLE.COM:80", "http"),
        ("https://api.example.com/x", "api.example.com:443", "https"),
        ("https://Api.Example.com:443/x", "api.example.com", "https"),
        ("http://user@api.example.com/x", "api.example.com", "http"),
        ("http://[::1]:80/x", "[::1]", "http"),
    ] {
        let mut request = parts(uri, &[host]);
        signer()
            .sign(
                &mut request,
                b"{}",
                Some(&Identity::new("alice", ["admin"])),
                NOW,
                &nonce(),
            )
            .unwrap_or_else(|e| panic!("{uri} with Host {host}: {e}"));
        let verifier = verifier(scheme);
        verifier
            .verify(&request, b"{}", NOW)
            .unwrap_or_else(|e| panic!("{uri} with Host {host}, absolute-form: {e}"));
        verifier
            .verify(&as_origin_form(&request), b"{}", NOW)
            .unwrap_or_else(|e| panic!("{uri} with Host {host}, origin-form: {e}"));
    }
}

/// The usual requests: a URI authority alone, or a `Host` alone.
#[test]
fn uri_authority_alone_or_host_alone_signs() {
    let mut absolute = parts("http://api.example.com/x", &[]);
    signer()
        .sign(&mut absolute, b"", None, NOW, &nonce())
        .unwrap();
    verifier("http").verify(&absolute, b"", NOW).unwrap();

    let mut origin = parts("/x", &["api.example.com"]);
    signer()
        .sign(&mut origin, b"", None, NOW, &nonce())
        .unwrap();
    verifier("http").verify(&origin, b"", NOW).unwrap();
}

/// A `Host` that names another authority than the URI is refused, naming both values, and the
/// request is left as it was.
#[test]
fn host_differing_from_the_uri_authority_is_refused() {
    for (uri, host, authority) in [
        (
            "http://127.0.0.1:8080/vhost",
            "api.internal",
            "127.0.0.1:8080",
        ),
        (
            "http://api.example.com/",
            "api.example.com:8080",
            "api.example.com",
        ),
        // :80 is not https's default port, and :443 not http's.
        (
            "https://api.example.com/",
            "api.example.com:80",
            "api.example.com",
        ),
        (
            "http://api.example.com/",
            "api.example.com:443",
            "api.example.com",
        ),
        (
            "http://api.example.com:8080/",
            "api.example.com",
            "api.example.com:8080",
        ),
        (
            "http://api.example.com/",
            "api.example.com.",
            "api.example.com",
        ),
        ("http://api.example.com/", "a b", "api.example.com"),
    ] {
        let mut request = parts(uri, &[host]);
        let before = request.headers.clone();
        let err = signer()
            .sign(&mut request, b"{}", None, NOW, &nonce())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "the Host header ({host}) differs from the URI authority ({authority})"
            )),
            "{text}"
        );
        assert!(
            text.contains("put the virtual host in the URI") && text.contains("origin-form"),
            "{text}"
        );
        assert_eq!(request.headers, before, "{uri} {host}");

        // The same through the entry point that takes an encoded identity.
        let identity = EncodedIdentity::new(&Identity::new("alice", ["admin"]));
        let err = signer()
            .sign_encoded(&mut request, b"", Some(&identity), NOW, &nonce())
            .unwrap_err();
        assert!(
            err.to_string().contains("differs from the URI authority"),
            "{err}"
        );
        assert_eq!(request.headers, before, "{uri} {host}");
    }

    // A Host that is not ASCII cannot be compared, and is refused.
    let mut request = parts("http://api.example.com/", &[]);
    request.headers.insert(
        "host",
        HeaderValue::from_bytes(b"caf\xc3\xa9.example").unwrap(),
    );
    let err = signer()
        .sign(&mut request, b"", None, NOW, &nonce())
        .unwrap_err();
    assert!(
        err.to_string().contains("the Host header is not ASCII")
            && err.to_string().contains("(api.example.com)"),
        "{err}"
    );
}

/// More than one `Host` line is refused, also when the URI has an authority (which used to
/// hide the second line from the signer).
#[test]
fn two_host_lines_are_refused_with_or_without_a_uri_authority() {
    for uri in ["http://api.example.com/", "/"] {
        let mut request = parts(uri, &["api.example.com", "api.example.com"]);
        let err = signer()
            .sign(&mut request, b"", None, NOW, &nonce())
            .unwrap_err();
        assert!(
            err.to_string().contains("more than one Host field line"),
            "{uri}: {err}"
        );
        assert!(!request.headers.contains_key("signature"));
    }
}

// ---------------------------------------------------------------------------------------------
// SignLayer over a real HTTP/1.1 client and server

/// A VerifyLayer server on loopback (HTTP/1.1 only): how many connections it accepted and how
/// many requests passed verification.
async fn start_server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let verified = Arc::new(AtomicUsize::new(0));
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(1000)),
    )
    .clock(Arc::new(ManualClock::new(NOW)));
    let count = Arc::clone(&verified);
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |_request: Request<Full<Bytes>>| {
                count.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
            });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections, verified)
}

/// The QA case: a request to `http://127.0.0.1:PORT/vhost` with `Host: api.internal` used to be
/// signed for `127.0.0.1:PORT` while hyper's HTTP/1.1 client sent `Host: api.internal`, and the
/// server answered 401 `bad_signature`. Now `SignLayer` refuses it as a service error and
/// nothing reaches the server; the same request with only the URI authority (or a `Host` equal
/// to it) passes.
#[tokio::test]
async fn sign_layer_refuses_a_differing_host_before_sending() {
    let (addr, connections, verified) = start_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let service = ServiceBuilder::new()
        .layer(SignLayer::new(signer()).clock(Arc::new(ManualClock::new(NOW))))
        .service(client);

    let request = Request::builder()
        .uri(format!("http://{addr}/vhost"))
        .header("host", "api.internal")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let error = service.clone().oneshot(request).await.unwrap_err();
    match error.downcast_ref::<SignLayerError>() {
        Some(SignLayerError::Sign(e)) => assert!(
            e.to_string().contains(&format!(
                "the Host header (api.internal) differs from the URI authority ({addr})"
            )),
            "{e}"
        ),
        other => panic!("expected SignLayerError::Sign, got {other:?} ({error})"),
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0, "nothing was sent");
    assert_eq!(verified.load(Ordering::SeqCst), 0);

    for host in [None, Some(addr.to_string())] {
        let mut request = Request::builder().uri(format!("http://{addr}/vhost"));
        if let Some(host) = &host {
            request = request.header("host", host);
        }
        let response = service
            .clone()
            .oneshot(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, StatusCode::OK, "Host {host:?}: {body:?}");
    }
    assert_eq!(verified.load(Ordering::SeqCst), 2);
}

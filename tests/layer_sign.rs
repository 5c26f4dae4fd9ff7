//! SignLayer in front of a real hyper client, against a VerifyLayer server on loopback.
//!
//! Run: `cargo test --all-features --test layer_sign`

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::layer::{SignLayer, SignLayerError, VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Policy, Secret, Signer, SignerConfig,
    Verifier,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt as _};

const NOW: u64 = 1_700_000_000;

fn keyring() -> KeyringHandle {
    Keyring::single("svc", Secret::new(vec![42; 32]).unwrap())
        .unwrap()
        .into()
}

type SeenLog = Arc<Mutex<Vec<(VerifiedIdentity, Bytes)>>>;

/// A VerifyLayer server (clock at NOW) whose handler logs what it receives.
async fn start_verifying_server() -> (SocketAddr, SeenLog) {
    let seen: SeenLog = Arc::default();
    let log = Arc::clone(&seen);
    let layer = VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(1000)),
    )
    .clock(Arc::new(ManualClock::new(NOW)));
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |request: Request<Full<Bytes>>| {
                let log = Arc::clone(&log);
                async move {
                    let identity = request
                        .extensions()
                        .get::<VerifiedIdentity>()
                        .cloned()
                        .unwrap();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    log.lock().unwrap().push((identity, body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn sign_layer() -> SignLayer {
    SignLayer::new(Signer::new(keyring(), SignerConfig::default()))
        .clock(Arc::new(ManualClock::new(NOW)))
}

/// A streamed body of unknown length.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn chunks(parts: &[&'static [u8]]) -> Chunks {
    Chunks(parts.iter().map(|p| Bytes::from_static(p)).collect())
}

fn post<B>(addr: SocketAddr, path: &str, body: B) -> Request<B> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn fixed_identity_round_trips_through_verify_layer() {
    let (addr, seen) = start_verifying_server().await;
    let service = ServiceBuilder::new()
        .layer(sign_layer().identity(Identity::new("billing-svc", ["service", "rôle"])))
        .service(client());
    // A request extension does not override the fixed identity.
    let mut request = post(addr, "/charge?id=7", chunks(&[b"{\"cents\":", b"1200}"]));
    request
        .extensions_mut()
        .insert(Identity::new("mallory", ["admin"]));
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0,
        VerifiedIdentity {
            user: Some("billing-svc".into()),
            roles: vec!["service".into(), "rôle".into()],
            keyid: "svc".into(),
        }
    );
    assert_eq!(seen[0].1, Bytes::from_static(b"{\"cents\":1200}"));
}

#[tokio::test]
async fn identity_comes_from_request_extension_else_none() {
    let (addr, seen) = start_verifying_server().await;
    let service = ServiceBuilder::new().layer(sign_layer()).service(client());

    let mut request = post(addr, "/a", Full::new(Bytes::from_static(b"x")));
    request
        .extensions_mut()
        .insert(Identity::new("carol", ["editor"]));
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Same path and body again: a fresh nonce each time, so no `replayed`.
    let request = post(addr, "/a", Full::new(Bytes::from_static(b"x")));
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0.user.as_deref(), Some("carol"));
    assert_eq!(seen[0].0.roles, vec!["editor".to_owned()]);
    assert_eq!(seen[1].0.user, None);
    assert!(seen[1].0.roles.is_empty());
}

#[tokio::test]
async fn encoded_identity_extension_is_signed_and_preferred_over_identity() {
    let (addr, seen) = start_verifying_server().await;
    let service = ServiceBuilder::new().layer(sign_layer()).service(client());

    let mut request = post(addr, "/b", Full::new(Bytes::from_static(b"y")));
    let encoded = EncodedIdentity::new(&Identity::new("Zoë", ["editor", "a,b"]));
    request.extensions_mut().insert(encoded);
    request
        .extensions_mut()
        .insert(Identity::new("mallory", ["admin"]));
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.user.as_deref(), Some("Zoë"));
    assert_eq!(seen[0].0.roles, vec!["editor".to_owned(), "a,b".to_owned()]);
}

/// The QA case: `http://127.0.0.1:0PORT/x` was signed for `127.0.0.1:0PORT` while hyper-util,
/// adding the missing Host from the port's number, sent `Host: 127.0.0.1:PORT`, and the
/// HTTP/1.1 verifier answered bad_signature. The layer now sets the Host it signed.
#[tokio::test]
async fn port_with_a_leading_zero_is_sent_in_the_host_it_was_signed_with() {
    let (addr, seen) = start_verifying_server().await;
    let service = ServiceBuilder::new().layer(sign_layer()).service(client());
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}:0{}/x", addr.ip(), addr.port()))
        .body(Full::new(Bytes::from_static(b"z")))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// The Host set is the signed `@authority` (lower-cased, without userinfo, an empty port or
/// the scheme's default port), and a Host the caller gave is kept as it is.
#[tokio::test]
async fn missing_host_is_set_to_the_signed_authority_and_a_given_one_kept() {
    let captured: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let log = Arc::clone(&captured);
    let service = ServiceBuilder::new().layer(sign_layer()).service_fn(
        move |request: Request<Full<Bytes>>| {
            let host = request
                .headers()
                .get("host")
                .map(|h| h.to_str().unwrap().to_owned());
            log.lock().unwrap().push(host);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        },
    );
    for uri in [
        "http://API.internal:080/x",
        "http://user@api.internal:/x",
        "https://api.internal:0443/x",
        "https://api.internal:443/x",
        "http://[::1]:8080/x",
    ] {
        let request = Request::builder()
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .unwrap();
        service.clone().oneshot(request).await.unwrap();
    }
    let request = Request::builder()
        .uri("http://api.internal:80/x")
        .header("host", "API.internal")
        .body(Full::new(Bytes::new()))
        .unwrap();
    service.oneshot(request).await.unwrap();
    let hosts: Vec<Option<String>> = captured.lock().unwrap().clone();
    assert_eq!(
        hosts,
        [
            "api.internal:080",
            "api.internal",
            "api.internal:0443",
            "api.internal",
            "[::1]:8080",
            "API.internal",
        ]
        .map(|h| Some(h.to_owned()))
    );
}

#[tokio::test]
async fn body_over_the_limit_is_a_service_error_and_nothing_is_sent() {
    let (addr, seen) = start_verifying_server().await;
    let service = ServiceBuilder::new()
        .layer(sign_layer().body_limit(8))
        .service(client());

    // Streamed (no size hint): caught by the limited read.
    let error = service
        .clone()
        .oneshot(post(addr, "/big", chunks(&[b"12345", b"6789"])))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<SignLayerError>(),
            Some(SignLayerError::BodyTooLarge { limit: 8 })
        ),
        "{error:?}"
    );
    // Exact size known up front: refused before reading.
    let error = service
        .clone()
        .oneshot(post(
            addr,
            "/big",
            Full::new(Bytes::from_static(b"123456789")),
        ))
        .await
        .unwrap_err();
    assert!(matches!(
        error.downcast_ref::<SignLayerError>(),
        Some(SignLayerError::BodyTooLarge { limit: 8 })
    ));
    // At the limit it goes through.
    let response = service
        .oneshot(post(
            addr,
            "/ok",
            Full::new(Bytes::from_static(b"12345678")),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unsignable_request_is_a_service_error() {
    let service = ServiceBuilder::new().layer(sign_layer()).service(client());
    // No authority anywhere (relative URI, no Host): @authority cannot be built.
    let request = Request::builder()
        .uri("/relative")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let error = service.oneshot(request).await.unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<SignLayerError>(),
            Some(SignLayerError::Sign(_))
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn inner_service_errors_pass_through() {
    // Nothing listens on this port once the listener is dropped.
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let service = ServiceBuilder::new().layer(sign_layer()).service(client());
    let error = service
        .oneshot(post(addr, "/", Full::new(Bytes::new())))
        .await
        .unwrap_err();
    assert!(
        error.downcast_ref::<SignLayerError>().is_none(),
        "{error:?}"
    );
    assert!(
        error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some(),
        "{error:?}"
    );
}

//! The verify layer as a backend developer mounts it in axum, on real servers on 127.0.0.1:0,
//! for what a QA pass from the docs alone found:
//!
//! - a route that takes `VerifiedIdentity` without the layer in front answers 401
//!   `missing_signature` (documented) and its warning is paced: anyone who can reach the route
//!   triggers it, so one line per request would let them flood the logs;
//! - the layer inside `Router::nest` / `nest_service` sees the path with the prefix stripped;
//!   it verifies the URI the outer router received (axum's `OriginalUri`), so a nested layer
//!   accepts what was signed and still refuses a changed path or query; the other mountings
//!   (on the outer router, or `merge` + `route_layer` to leave some routes open) accept too.
//!
//! Run: `cargo test --all-features --test layer_backend_qa`
#![cfg(feature = "axum")]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn keyring() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap())
}

fn verify_layer() -> VerifyLayer {
    VerifyLayer::new(
        Verifier::new(keyring(), Policy::default()),
        Arc::new(MemoryReplayCache::new(10_000)),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn whoami(identity: VerifiedIdentity) -> String {
    format!(
        "{}:{}",
        identity.user.as_deref().unwrap_or(""),
        identity.roles.join(",")
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A GET to `uri`, signed for alice when `sign` (the URI's authority and path are signed).
fn get_request(uri: &str, sign: bool) -> Request<Full<Bytes>> {
    let (mut parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
    if sign {
        let signer = Signer::new(keyring(), SignerConfig::default());
        let alice = Identity::new("alice", ["admin"]);
        signer
            .sign(&mut parts, b"", Some(&alice), now(), &Nonce::random())
            .unwrap();
    }
    Request::from_parts(parts, Full::new(Bytes::new()))
}

async fn send(request: Request<Full<Bytes>>) -> (StatusCode, Bytes) {
    let response = client().request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Log lines, as the fmt subscriber writes them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The only test of this binary that installs the global subscriber (the pacing is
/// process-wide, so nothing else here may reach the extractor's rejection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_the_layer_refuses_and_its_warning_is_paced() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    // A route forgotten when the layer was mounted: the extractor must not let it run.
    let app = Router::new().route("/whoami", get(whoami));
    let addr = serve(app).await;
    let requests = 40;
    let started = std::time::Instant::now();
    for i in 0..requests {
        // Signed or not: without the layer nothing was verified.
        let (status, body) = send(get_request(&format!("http://{addr}/whoami"), i % 2 == 0)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, r#"{"error":"missing_signature"}"#);
    }
    let logs = captured.text();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("VerifiedIdentity extracted on a route without VerifyLayer"))
        .count();
    // The operator still hears of the misconfiguration, once (once more per 10 s on a machine
    // slow enough to need that long), not once per request.
    let allowed = 1 + usize::try_from(started.elapsed().as_secs() / 10).unwrap();
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} warnings for {requests} requests:\n{logs}"
    );
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains("path=\"/whoami\"") || logs.contains("path=/whoami"),
        "{logs}"
    );
}

/// A request to `path` on `addr`, signed for alice, with its `@path` then changed to
/// `tampered` (the signature still covers `path`).
fn tampered_request(addr: SocketAddr, path: &str, tampered: &str) -> Request<Full<Bytes>> {
    let signed = get_request(&format!("http://{addr}{path}"), true);
    let (mut parts, body) = signed.into_parts();
    parts.uri = format!("http://{addr}{tampered}").parse().unwrap();
    Request::from_parts(parts, body)
}

#[tokio::test]
async fn inside_nest_the_layer_verifies_the_path_as_sent() {
    // The layer on the router that is nested: axum strips `/api` before the nested router's
    // layers run, but the outer `Router` recorded the URI it received (`OriginalUri`), and
    // the layer verifies that one (it was `bad_signature` for every request before).
    let api = Router::new()
        .route("/whoami", get(whoami))
        .route("/other", get(whoami))
        .layer(verify_layer());
    let addr = serve(Router::new().nest("/api", api)).await;
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:admin"[..]));
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami?x=1"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:admin"[..]));
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"missing_signature"}"#);
    // Still bound to the path: signed for one route, sent to another of the same nest.
    let (status, body) = send(tampered_request(addr, "/api/whoami", "/api/other")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);
    // Signed for the stripped path (what the nested router sees), sent with the prefix: the
    // layer verifies the path the client sent, not the stripped one.
    let (status, body) = send(tampered_request(addr, "/whoami", "/api/whoami")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);
    // And the query.
    let (status, body) = send(tampered_request(addr, "/api/whoami?x=1", "/api/whoami?x=2")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);

    // Two levels of nesting: the outermost router's URI counts.
    let inner = Router::new()
        .route("/whoami", get(whoami))
        .layer(verify_layer());
    let addr = serve(Router::new().nest("/api", Router::new().nest("/v1", inner))).await;
    let (status, body) = send(get_request(&format!("http://{addr}/api/v1/whoami"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:admin"[..]));
    let (status, body) = send(tampered_request(addr, "/v1/whoami", "/api/v1/whoami")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);
}

/// A middleware for the outer router that rewrites the URI to the value of `x-rewrite-to`, a
/// header no signature covers (a version mapping, say, or anything a client can steer).
async fn rewrite(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let to = request
        .headers()
        .get("x-rewrite-to")
        .and_then(|to| to.to_str().ok())
        .and_then(|to| to.parse::<http::Uri>().ok());
    if let Some(to) = to {
        *request.uri_mut() = to;
    }
    next.run(request).await
}

/// A middleware on the outer router runs after axum recorded `OriginalUri`: one that rewrites
/// the path or the query (here driven by a header the signature does not cover) must not have
/// the signature checked against the URI received while the nested router routes by the
/// rewritten one. Only a nest's strip is taken for one; any other rewrite is verified as it
/// stands. Before, the rewritten request reached `/other` (200).
#[tokio::test]
async fn a_rewrite_after_the_outer_router_is_not_taken_for_a_nest() {
    async fn which(uri: http::Uri) -> String {
        uri.to_string()
    }
    let api = Router::new()
        .route("/whoami", get(which))
        .route("/other", get(which))
        .layer(verify_layer());
    let app = Router::new()
        .nest("/api", api)
        .layer(axum::middleware::from_fn(rewrite));
    let addr = serve(app).await;
    let signed_with = |rewrite_to: &str| {
        let mut request = get_request(&format!("http://{addr}/api/whoami?x=1"), true);
        request
            .headers_mut()
            .insert("x-rewrite-to", rewrite_to.parse().unwrap());
        request
    };
    // No rewrite: the nest's own strip.
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami?x=1"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"/whoami?x=1"[..]));
    // Another path, another query, or the path of another nest: each verified as it stands.
    for rewritten in ["/api/other?x=1", "/api/whoami?x=2", "/api/whoami"] {
        let (status, body) = send(signed_with(rewritten)).await;
        assert_eq!(
            (status, &body[..]),
            (
                StatusCode::UNAUTHORIZED,
                &br#"{"error":"bad_signature"}"#[..]
            ),
            "{rewritten}"
        );
    }
}

/// A review's repro, under `nest` and `nest_service` alike: a rewrite on the outer router whose
/// target, once the nest strips `/api`, is another `/`-led tail of the signed path, or the
/// nest's root, was taken for the nest's strip (any such tail was): the signature was checked
/// against the path signed and the request ran another handler (`/api/admin/whoami` rewritten
/// to `/api/whoami` ran `/whoami`). Now only the nest's own prefix, as axum records it
/// (`NestedPath`), taken off the path received counts as its strip; these are verified as they
/// stand and refused.
#[tokio::test]
async fn a_rewrite_to_another_tail_of_the_signed_path_is_not_taken_for_a_nest() {
    async fn which(uri: http::Uri) -> String {
        format!("saw {uri}")
    }
    let api = || {
        Router::new()
            .route("/", get(which))
            .route("/whoami", get(which))
            .route("/admin/whoami", get(which))
            .route("/other", get(which))
            .layer(verify_layer())
    };
    for nest_service in [false, true] {
        let app = if nest_service {
            Router::new().nest_service("/api", api())
        } else {
            Router::new().nest("/api", api())
        };
        let addr = serve(app.layer(axum::middleware::from_fn(rewrite))).await;
        let signed_with = |path: &str, rewrite_to: &str| {
            let mut request = get_request(&format!("http://{addr}{path}"), true);
            request
                .headers_mut()
                .insert("x-rewrite-to", rewrite_to.parse().unwrap());
            request
        };
        for (signed, rewritten) in [
            ("/api/admin/whoami", "/api/whoami"),
            ("/api/admin/whoami", "/api"),
            ("/api/admin/whoami", "/api/"),
        ] {
            let (status, body) = send(signed_with(signed, rewritten)).await;
            assert_eq!(
                (status, &body[..]),
                (
                    StatusCode::UNAUTHORIZED,
                    &br#"{"error":"bad_signature"}"#[..]
                ),
                "nest_service {nest_service}: signed {signed}, rewritten to {rewritten}"
            );
        }
        // A "rewrite" to the URI received is no rewrite: the nest's own strip, accepted.
        let (status, body) = send(signed_with("/api/admin/whoami", "/api/admin/whoami")).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"saw /admin/whoami"[..]),
            "nest_service {nest_service}"
        );
    }
}

#[tokio::test]
async fn inside_nest_service_the_layer_verifies_the_path_as_sent() {
    // `nest_service` strips the prefix too; the wrapped service here is a plain tower
    // service, not a router, so only the outer router's `OriginalUri` knows the full path.
    let service = tower::ServiceBuilder::new()
        .layer(verify_layer())
        .service_fn(|request: Request<Full<Bytes>>| async move {
            let identity = request.extensions().get::<VerifiedIdentity>().cloned();
            let user = identity
                .and_then(|identity| identity.user)
                .unwrap_or_default();
            let text = format!("{user}:{}", request.uri().path());
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(text))))
        });
    let addr = serve(Router::new().nest_service("/svc", service)).await;
    let (status, body) = send(get_request(&format!("http://{addr}/svc/orders"), true)).await;
    // The inner service still sees the stripped path: only the verification uses the full one.
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:/orders"[..]));
    let (status, body) = send(tampered_request(addr, "/svc/orders", "/svc/refunds")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);
    let (status, body) = send(tampered_request(addr, "/orders", "/svc/orders")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"bad_signature"}"#);
}

#[tokio::test]
async fn the_documented_mountings_accept() {
    // 1. On the outer router, after `nest`: the layer sees the path as it was signed.
    let api = Router::new().route("/whoami", get(whoami));
    let app = Router::new().nest("/api", api).layer(verify_layer());
    let addr = serve(app).await;
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:admin"[..]));
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"missing_signature"}"#);

    // 2. Some routes open: full paths, the layer as `route_layer`, merged (not nested).
    let api = Router::new()
        .route("/api/whoami", get(whoami))
        .route_layer(verify_layer());
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api);
    let addr = serve(app).await;
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), true)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice:admin"[..]));
    let (status, body) = send(get_request(&format!("http://{addr}/api/whoami"), false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"missing_signature"}"#);
    let (status, body) = send(get_request(&format!("http://{addr}/healthz"), false)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
}

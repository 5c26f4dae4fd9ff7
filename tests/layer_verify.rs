//! VerifyLayer end to end: real hyper servers on 127.0.0.1:0, real TCP clients.
//!
//! Run: `cargo test --all-features --test layer_verify`

mod support_replay;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use countersign::clock::ManualClock;
use countersign::core::{signature_base_for, RequestView};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::{MemoryReplayCache, ReplayCache, ReplayOutcome};
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use hmac::{KeyInit as _, Mac as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use support_replay::AsyncOnlyCache;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [7; 32];

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(SECRET.to_vec()).unwrap())
        .unwrap()
        .into()
}

fn signer() -> Signer {
    Signer::new(keyring(), SignerConfig::default())
}

fn verifier() -> Verifier {
    Verifier::new(keyring(), Policy::default())
}

/// What the inner service saw, per request it was called with.
#[derive(Debug, Clone)]
struct Seen {
    identity: Option<VerifiedIdentity>,
    body: Bytes,
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// A server with `layer` in front of a handler that logs what it receives.
async fn start(layer: VerifyLayer) -> (SocketAddr, SeenLog) {
    let seen: SeenLog = Arc::default();
    let log = Arc::clone(&seen);
    let service = ServiceBuilder::new()
        .layer(layer)
        .layer_fn(|inner| StrictReady {
            inner,
            ready: false,
        })
        .service_fn(move |request: Request<Full<Bytes>>| {
            let log = Arc::clone(&log);
            async move {
                let identity = request.extensions().get::<VerifiedIdentity>().cloned();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                log.lock().unwrap().push(Seen {
                    identity,
                    body: body.clone(),
                });
                Ok::<_, Infallible>(Response::new(Full::new(body)))
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

/// Holds the layer to tower's contract: an inner service is called only after `poll_ready` said
/// ready, once per readiness (a clone starts not ready). A call out of turn answers 500
/// `not_polled_ready`, which every test's status check catches.
struct StrictReady<S> {
    inner: S,
    ready: bool,
}

impl<S: Clone> Clone for StrictReady<S> {
    fn clone(&self) -> Self {
        StrictReady {
            inner: self.inner.clone(),
            ready: false,
        }
    }
}

impl<S> tower::Service<Request<Full<Bytes>>> for StrictReady<S>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let poll = self.inner.poll_ready(cx);
        self.ready = poll.is_ready();
        poll
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        if !std::mem::replace(&mut self.ready, false) {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"{\"error\":\"not_polled_ready\"}",
            )));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}

/// A request body sent whole (with Content-Length) or in chunks of unknown total length
/// (chunked transfer encoding).
struct TestBody {
    chunks: VecDeque<Bytes>,
    announce_length: bool,
}

impl TestBody {
    fn full(bytes: &[u8]) -> Self {
        TestBody {
            chunks: VecDeque::from([Bytes::copy_from_slice(bytes)]),
            announce_length: true,
        }
    }

    fn chunked(bytes: &[u8], chunk: usize) -> Self {
        TestBody {
            chunks: bytes.chunks(chunk).map(Bytes::copy_from_slice).collect(),
            announce_length: false,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .chunks
                .pop_front()
                .map(|c| Ok(Frame::data(c))),
        )
    }

    fn size_hint(&self) -> SizeHint {
        if self.announce_length {
            SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

/// A signed request's head, replayable any number of times.
#[derive(Clone)]
struct Signed {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Signed {
    fn new(
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: &[u8],
        identity: Option<&Identity>,
        now: u64,
    ) -> Self {
        let uri: Uri = format!("http://{addr}{path}").parse().unwrap();
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts();
        signer()
            .sign(&mut parts, body, identity, now, &Nonce::random())
            .unwrap();
        Signed {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
        }
    }

    fn request(&self, body: TestBody) -> Request<TestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

struct Answer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: String,
}

async fn send(request: Request<TestBody>) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<TestBody>();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let content_type = response.headers().get("content-type").cloned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[track_caller]
fn assert_rejected(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status.as_u16(), status, "body: {}", answer.body);
    assert_eq!(answer.body, format!("{{\"error\":\"{code}\"}}"));
    assert_eq!(answer.content_type.as_ref().unwrap(), "application/json");
}

struct Setup {
    cache: Arc<MemoryReplayCache>,
    clock: ManualClock,
}

impl Setup {
    fn new(max_entries: usize) -> Self {
        Setup {
            cache: Arc::new(MemoryReplayCache::new(max_entries)),
            clock: ManualClock::new(NOW),
        }
    }

    fn layer(&self) -> VerifyLayer {
        VerifyLayer::new(verifier(), self.cache.clone() as Arc<dyn ReplayCache>)
            .clock(Arc::new(self.clock.clone()))
    }
}

#[tokio::test]
async fn happy_path_hands_on_identity_and_exact_body() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let body = b"\x00\xff{\"amount\": 12}\r\n\xc3";
    let identity = Identity::new("Zoë Ünïcødé", ["admin", "a,b"]);
    let signed = Signed::new(
        addr,
        Method::POST,
        "/pay?to=bob",
        body,
        Some(&identity),
        NOW,
    );

    let answer = send(signed.request(TestBody::full(body))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_ref(), body);
    assert_eq!(
        seen[0].identity,
        Some(VerifiedIdentity {
            user: Some("Zoë Ünïcødé".into()),
            roles: vec!["admin".into(), "a,b".into()],
            keyid: "k1".into(),
        })
    );
    assert_eq!(setup.cache.len(), 1);
}

#[tokio::test]
async fn chunked_body_within_limit_is_accepted_and_a_request_without_user_has_none() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer().body_limit(64)).await;
    let body = [b'x'; 64];
    let signed = Signed::new(addr, Method::PUT, "/blob", &body, None, NOW);
    let answer = send(signed.request(TestBody::chunked(&body, 5))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].body.as_ref(), &body[..]);
    let identity = seen[0].identity.clone().unwrap();
    assert_eq!(identity.user, None);
    assert!(identity.roles.is_empty());
}

#[tokio::test]
async fn unsigned_request_is_missing_signature() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let mut request = Request::new(TestBody::full(b"hi"));
    *request.uri_mut() = format!("http://{addr}/x").parse().unwrap();
    let answer = send(request).await;
    assert_rejected(&answer, 401, "missing_signature");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn same_request_twice_is_replayed() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::POST, "/once", b"body", None, NOW);
    let first = send(signed.request(TestBody::full(b"body"))).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = send(signed.request(TestBody::full(b"body"))).await;
    assert_rejected(&second, 401, "replayed");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Proof that a too-large request records no nonce: two servers share one replay cache, one
/// with a small body limit. The request refused by the small one is then accepted by the other
/// (had its nonce been recorded, it would be `replayed`), and a second send there is `replayed`
/// (so the cache really is shared).
#[tokio::test]
async fn body_too_large_is_413_and_records_no_nonce() {
    let setup = Setup::new(100);
    let (small, small_seen) = start(setup.layer().body_limit(16)).await;
    let (large, _) = start(setup.layer()).await;
    let body = [b'y'; 17];

    // Announced by Content-Length: refused before reading.
    let signed = Signed::new(small, Method::POST, "/upload", &body, None, NOW);
    let answer = send(signed.request(TestBody::full(&body))).await;
    assert_rejected(&answer, 413, "body_too_large");
    // Not announced (chunked): refused by the limited read.
    let answer = send(signed.request(TestBody::chunked(&body, 4))).await;
    assert_rejected(&answer, 413, "body_too_large");
    assert!(small_seen.lock().unwrap().is_empty());
    assert_eq!(setup.cache.len(), 0);

    // The same signed head, same authority in the signature: send it to the large server with
    // its Host rewritten to the small one's (the signed @authority).
    let mut request = signed.request(TestBody::full(&body));
    *request.uri_mut() = format!("http://{large}/upload").parse().unwrap();
    request
        .headers_mut()
        .insert("host", HeaderValue::from_str(&small.to_string()).unwrap());
    let answer = send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let mut again = signed.request(TestBody::full(&body));
    *again.uri_mut() = format!("http://{large}/upload").parse().unwrap();
    again
        .headers_mut()
        .insert("host", HeaderValue::from_str(&small.to_string()).unwrap());
    assert_rejected(&send(again).await, 401, "replayed");
}

#[tokio::test]
async fn tampered_body_is_digest_mismatch_and_records_no_nonce() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::POST, "/pay", b"amount=1", None, NOW);
    let answer = send(signed.request(TestBody::full(b"amount=9"))).await;
    assert_rejected(&answer, 401, "digest_mismatch");
    assert_eq!(setup.cache.len(), 0);
    assert!(seen.lock().unwrap().is_empty());
    // The untampered original still goes through: the forgery burnt no nonce.
    let answer = send(signed.request(TestBody::full(b"amount=1"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

/// The bodiless fast path checks the digest too: a request signed over a body but sent without
/// one is `digest_mismatch`, and burns no nonce.
#[tokio::test]
async fn body_signed_but_not_sent_is_digest_mismatch_and_records_no_nonce() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::POST, "/pay", b"amount=1", None, NOW);
    let answer = send(signed.request(TestBody::full(b""))).await;
    assert_rejected(&answer, 401, "digest_mismatch");
    assert_eq!(setup.cache.len(), 0);
    assert!(seen.lock().unwrap().is_empty());
    let answer = send(signed.request(TestBody::full(b"amount=1"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

#[tokio::test]
async fn full_cache_is_503_and_keeps_live_entries() {
    let setup = Setup::new(1);
    let (addr, seen) = start(setup.layer()).await;
    let first = Signed::new(addr, Method::GET, "/a", b"", None, NOW);
    assert_eq!(
        send(first.request(TestBody::full(b""))).await.status,
        StatusCode::OK
    );
    let second = Signed::new(addr, Method::GET, "/b", b"", None, NOW);
    assert_rejected(
        &send(second.request(TestBody::full(b""))).await,
        503,
        "replay_cache_unavailable",
    );
    // The live entry was not evicted to make room.
    assert_rejected(
        &send(first.request(TestBody::full(b""))).await,
        401,
        "replayed",
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Once the first entry expires there is room again (the signature of `second` has then
    // expired too, so sign a fresh one).
    setup.clock.advance(13);
    let third = Signed::new(addr, Method::GET, "/c", b"", None, NOW + 13);
    assert_eq!(
        send(third.request(TestBody::full(b""))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn old_signature_is_expired_and_records_no_nonce() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::GET, "/late", b"", None, NOW);
    // Window 10 s + skew 2 s: accepted up to NOW + 12, expired from NOW + 13.
    setup.clock.set(NOW + 13);
    assert_rejected(
        &send(signed.request(TestBody::full(b""))).await,
        401,
        "expired",
    );
    assert_eq!(setup.cache.len(), 0);
    setup.clock.set(NOW + 12);
    assert_eq!(
        send(signed.request(TestBody::full(b""))).await.status,
        StatusCode::OK
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn signature_from_the_future_is_not_yet_valid() {
    let setup = Setup::new(100);
    let (addr, _) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::GET, "/early", b"", None, NOW + 3);
    assert_rejected(
        &send(signed.request(TestBody::full(b""))).await,
        401,
        "not_yet_valid",
    );
    assert_eq!(setup.cache.len(), 0);
}

/// Headers are verified before the body is touched: a forged request announcing a huge body
/// gets the signature verdict, not 413, and nothing is recorded.
#[tokio::test]
async fn forged_request_is_rejected_before_its_body() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer().body_limit(8)).await;
    let identity = Identity::new("alice", ["user"]);
    let body = [b'z'; 64];
    let signed = Signed::new(addr, Method::POST, "/x", &body, Some(&identity), NOW);
    let mut forged = signed.request(TestBody::full(&body));
    forged
        .headers_mut()
        .insert("x-auth-user", HeaderValue::from_static("mallory"));
    assert_rejected(&send(forged).await, 401, "bad_signature");
    assert_eq!(setup.cache.len(), 0);
    assert!(seen.lock().unwrap().is_empty());
}

/// A body whose chunked framing breaks is a 400 `body_read_failed`, not a verdict on the
/// signature, and records nothing.
#[tokio::test]
async fn broken_chunked_body_is_400_body_read_failed() {
    let setup = Setup::new(100);
    let (addr, seen) = start(setup.layer()).await;
    let signed = Signed::new(addr, Method::POST, "/x", b"hello", None, NOW);
    let mut head = format!(
        "POST /x HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
    );
    for (name, value) in &signed.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\nzz\r\nhello\r\n0\r\n\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        response.ends_with("{\"error\":\"body_read_failed\"}"),
        "{response}"
    );
    assert_eq!(setup.cache.len(), 0);
    assert!(seen.lock().unwrap().is_empty());
}

/// Under a policy where the nonce is optional, a signature without one is accepted and nothing
/// is recorded (there is nothing to record); such policies give no replay protection.
#[tokio::test]
async fn optional_nonce_absent_skips_the_replay_cache() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let policy = Policy::rfc9421(&["@method", "@authority", "@path"]);
    let layer = VerifyLayer::new(Verifier::new(keyring(), policy), cache.clone())
        .clock(Arc::new(ManualClock::new(NOW)));
    let (addr, seen) = start(layer).await;

    let uri: Uri = format!("http://{addr}/rfc").parse().unwrap();
    let member = format!("(\"@method\" \"@authority\" \"@path\");created={NOW};keyid=\"k1\"");
    let (parts, ()) = Request::builder()
        .uri(uri.clone())
        .body(())
        .unwrap()
        .into_parts();
    let base = signature_base_for(&RequestView::from_parts(&parts), &member).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(base.as_str().as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());

    for _ in 0..2 {
        let mut request = Request::new(TestBody::full(b""));
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert("signature-input", format!("sig={member}").parse().unwrap());
        headers.insert("signature", format!("sig=:{signature}:").parse().unwrap());
        let answer = send(request).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    assert_eq!(cache.len(), 0);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].identity.as_ref().unwrap().keyid, "k1");
}

/// The verify layer over an [`AsyncOnlyCache`].
impl AsyncOnlyCache {
    fn layer(self: &Arc<Self>) -> VerifyLayer {
        VerifyLayer::new(verifier(), self.clone() as Arc<dyn ReplayCache>)
            .clock(Arc::new(ManualClock::new(NOW)))
    }
}

#[tokio::test]
async fn async_only_cache_accepts_once_then_replayed_with_and_without_body() {
    let cache = AsyncOnlyCache::new(false);
    // The trait's default: no answer without waiting, and nothing recorded by asking.
    assert!(cache
        .try_check_and_record_now("probe", NOW + 10, NOW)
        .is_none());
    assert!(cache.memory.is_empty());
    let (addr, seen) = start(cache.layer()).await;
    let identity = Identity::new("alice", ["user"]);

    let get = Signed::new(addr, Method::GET, "/g", b"", Some(&identity), NOW);
    let answer = send(get.request(TestBody::full(b""))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_rejected(
        &send(get.request(TestBody::full(b""))).await,
        401,
        "replayed",
    );

    let body = b"{\"amount\":12}";
    let post = Signed::new(addr, Method::POST, "/p", body, Some(&identity), NOW);
    let answer = send(post.request(TestBody::chunked(body, 3))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_rejected(
        &send(post.request(TestBody::full(body))).await,
        401,
        "replayed",
    );

    assert_eq!(cache.memory.len(), 2);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body.as_ref(), b"");
    assert_eq!(seen[1].body.as_ref(), body);
    for s in seen.iter() {
        let id = s.identity.as_ref().unwrap();
        assert_eq!(id.user.as_deref(), Some("alice"));
        assert_eq!(id.roles, ["user"]);
        assert_eq!(id.keyid, "k1");
    }
}

/// Once a signature's times check out, and before its MAC, the layer hints the nonce to the
/// cache (so an in-process cache can start loading what the record will touch). An expired
/// signature gets no hint; a forged one is hinted but records nothing, and neither does a
/// hinted request whose body then fails its digest, which can be sent again.
#[tokio::test]
async fn the_layer_hints_the_nonce_before_the_mac_and_a_hint_records_nothing() {
    let cache = AsyncOnlyCache::new(false);
    let (addr, seen) = start(cache.layer()).await;
    let identity = Identity::new("alice", ["user"]);
    let hinted = || cache.prefetched.lock().unwrap().clone();
    let nonce_of = |signed: &Signed| {
        let input = signed.headers["signature-input"].to_str().unwrap();
        let start = input.find(";nonce=\"").unwrap() + ";nonce=\"".len();
        let len = input[start..].find('"').unwrap();
        input[start..start + len].to_owned()
    };

    let old = Signed::new(addr, Method::GET, "/g", b"", Some(&identity), NOW - 3600);
    assert_rejected(
        &send(old.request(TestBody::full(b""))).await,
        401,
        "expired",
    );
    assert!(hinted().is_empty(), "expired GET hinted: {:?}", hinted());

    let body = b"{\"amount\":12}";
    let post = Signed::new(addr, Method::POST, "/p", body, Some(&identity), NOW);
    let mut forged = post.request(TestBody::full(body));
    forged
        .headers_mut()
        .insert("x-auth-user", HeaderValue::from_static("mallory"));
    assert_rejected(&send(forged).await, 401, "bad_signature");
    assert_rejected(
        &send(post.request(TestBody::full(b"{\"amount\":99}"))).await,
        401,
        "digest_mismatch",
    );
    assert_eq!(hinted(), [nonce_of(&post), nonce_of(&post)]);
    assert!(cache.memory.is_empty());
    assert!(seen.lock().unwrap().is_empty());

    let answer = send(post.request(TestBody::chunked(body, 3))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let get = Signed::new(addr, Method::GET, "/g", b"", Some(&identity), NOW);
    let answer = send(get.request(TestBody::full(b""))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        hinted(),
        [
            nonce_of(&post),
            nonce_of(&post),
            nonce_of(&post),
            nonce_of(&get)
        ]
    );
    assert_eq!(cache.memory.len(), 2);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn async_only_cache_unreachable_is_503_with_and_without_body() {
    let cache = AsyncOnlyCache::new(true);
    let (addr, seen) = start(cache.layer()).await;
    let get = Signed::new(addr, Method::GET, "/g", b"", None, NOW);
    assert_rejected(
        &send(get.request(TestBody::full(b""))).await,
        503,
        "replay_cache_unavailable",
    );
    let post = Signed::new(addr, Method::POST, "/p", b"data", None, NOW);
    assert_rejected(
        &send(post.request(TestBody::full(b"data"))).await,
        503,
        "replay_cache_unavailable",
    );
    assert!(seen.lock().unwrap().is_empty());
}

/// The in-process cache answers without waiting, through the same interface.
#[test]
fn memory_cache_answers_without_waiting() {
    let cache = MemoryReplayCache::new(10);
    assert_eq!(
        cache.try_check_and_record_now("n", NOW + 10, NOW),
        Some(Ok(ReplayOutcome::Fresh))
    );
    assert_eq!(
        cache.try_check_and_record_now("n", NOW + 10, NOW),
        Some(Ok(ReplayOutcome::Replayed))
    );
    assert_eq!(cache.len(), 1);
}

#[cfg(feature = "axum")]
mod axum_extractor {
    use super::*;
    use axum::routing::{get, post};
    use axum::Router;

    async fn whoami(identity: VerifiedIdentity, body: Bytes) -> String {
        format!(
            "{}|{}|{}|{}",
            identity.user.unwrap_or_default(),
            identity.roles.join(";"),
            identity.keyid,
            String::from_utf8_lossy(&body)
        )
    }

    async fn maybe(identity: Option<VerifiedIdentity>) -> &'static str {
        if identity.is_some() {
            "verified"
        } else {
            "anonymous"
        }
    }

    async fn start_axum(setup: &Setup) -> SocketAddr {
        let app = Router::new()
            .route("/whoami", post(whoami))
            .layer(setup.layer())
            // Merged after `.layer`: these routes are not behind the VerifyLayer.
            .merge(
                Router::new()
                    .route("/unprotected", get(whoami))
                    .route("/maybe", get(maybe)),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn extractor_sees_identity_behind_the_layer() {
        let setup = Setup::new(100);
        let addr = start_axum(&setup).await;
        let identity = Identity::new("bob", ["reader", "writer"]);
        let signed = Signed::new(
            addr,
            Method::POST,
            "/whoami",
            b"payload",
            Some(&identity),
            NOW,
        );
        let answer = send(signed.request(TestBody::full(b"payload"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "bob|reader;writer|k1|payload");
        // Layer rejections come through axum unchanged.
        assert_rejected(
            &send(signed.request(TestBody::full(b"payload"))).await,
            401,
            "replayed",
        );
    }

    #[tokio::test]
    async fn extractor_without_the_layer_is_missing_signature() {
        let setup = Setup::new(100);
        let addr = start_axum(&setup).await;
        // Even a validly signed request: without the layer nothing verified it.
        let signed = Signed::new(
            addr,
            Method::GET,
            "/unprotected",
            b"",
            Some(&Identity::new("bob", [""; 0])),
            NOW,
        );
        let answer = send(signed.request(TestBody::full(b""))).await;
        assert_rejected(&answer, 401, "missing_signature");
        let mut request = Request::new(TestBody::full(b""));
        *request.uri_mut() = format!("http://{addr}/maybe").parse().unwrap();
        let answer = send(request).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "anonymous");
        assert_eq!(setup.cache.len(), 0);
    }
}

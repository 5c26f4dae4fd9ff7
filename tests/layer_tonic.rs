//! VerifyLayer under tonic: a real gRPC server (`Server::builder().layer(VerifyLayer)`) on
//! 127.0.0.1:0 and real tonic clients, signed by `SignLayer` around a `Channel` (or not). The
//! service and its codec are written by hand: no protoc, no build script. With the `tonic`
//! feature, the layer also wraps one service of a server (`add_service(layer.layer(svc))`)
//! and leaves the others open.
//!
//! Run: `cargo test --all-features --test layer_tonic`

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf as _, BufMut as _, Bytes};
use countersign::clock::ManualClock;
use countersign::core::Reason;
use countersign::layer::{SignLayer, VerifiedIdentity, VerifyLayer};
use countersign::replay::{MemoryReplayCache, ReplayCache};
use countersign::{
    Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, Full};
use tokio::net::TcpListener;
use tonic::client::{Grpc, GrpcService};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::tokio_stream::{self, StreamExt as _};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tower::{Service, ServiceBuilder, ServiceExt as _};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [7; 32];
const SERVICE: &str = "countersign.test.WhoAmI";
const UNARY: &str = "/countersign.test.WhoAmI/Unary";
const STREAM: &str = "/countersign.test.WhoAmI/Stream";

fn keyring(id: &str, secret: [u8; 32]) -> KeyringHandle {
    Keyring::single(id, Secret::new(secret.to_vec()).unwrap())
        .unwrap()
        .into()
}

fn signer() -> Signer {
    Signer::new(keyring("k1", SECRET), SignerConfig::default())
}

fn verifier() -> Verifier {
    Verifier::new(keyring("k1", SECRET), Policy::default())
}

fn alice() -> Identity {
    Identity::new("alice", ["reader", "writer"])
}

/// The client layer used throughout: alice's identity, signed at `created`.
fn sign_layer(signer: Signer, created: u64) -> SignLayer {
    SignLayer::new(signer)
        .identity(alice())
        .clock(Arc::new(ManualClock::new(created)))
}

/// The server's layer: nonces in `cache`, the clock at `NOW`.
fn verify_layer(cache: &Arc<MemoryReplayCache>) -> VerifyLayer {
    VerifyLayer::new(verifier(), cache.clone() as Arc<dyn ReplayCache>)
        .clock(Arc::new(ManualClock::new(NOW)))
}

// --- a hand-written codec: a message is its UTF-8 bytes ---

#[derive(Debug, Clone, Copy, Default)]
struct StringCodec;

impl Codec for StringCodec {
    type Encode = String;
    type Decode = String;
    type Encoder = StringCodec;
    type Decoder = StringCodec;

    fn encoder(&mut self) -> StringCodec {
        *self
    }

    fn decoder(&mut self) -> StringCodec {
        *self
    }
}

impl Encoder for StringCodec {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for StringCodec {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|error| Status::invalid_argument(error.to_string()))
    }
}

// --- a hand-written service: `Unary` and `Stream`, both answering with what they saw ---

/// What the handlers saw: how often they ran, and the identity of each call.
#[derive(Debug, Clone, Default)]
struct Calls {
    count: Arc<AtomicUsize>,
    identities: Arc<Mutex<Vec<Option<VerifiedIdentity>>>>,
}

impl Calls {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn identities(&self) -> Vec<Option<VerifiedIdentity>> {
        self.identities.lock().unwrap().clone()
    }

    /// Records a call and answers with the identity's parts, then the request's message.
    fn answer(&self, request: &tonic::Request<String>) -> Result<Vec<String>, Status> {
        self.count.fetch_add(1, Ordering::SeqCst);
        // tonic hands the http request's extensions on to the handler.
        let identity = request.extensions().get::<VerifiedIdentity>().cloned();
        self.identities.lock().unwrap().push(identity.clone());
        let identity = identity.ok_or_else(|| Status::internal("no VerifiedIdentity"))?;
        Ok(vec![
            identity.user.unwrap_or_default().into_string(),
            identity.roles.join(";"),
            identity.keyid.into_string(),
            request.get_ref().clone(),
        ])
    }
}

#[derive(Debug, Clone)]
struct WhoAmI {
    calls: Calls,
}

impl NamedService for WhoAmI {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<Request<B>> for WhoAmI
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let calls = self.calls.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(StringCodec);
            let response = match request.uri().path() {
                UNARY => {
                    let unary = tower::service_fn(move |request: tonic::Request<String>| {
                        let answer = calls.answer(&request).map(|parts| parts.join("|"));
                        async move { answer.map(tonic::Response::new) }
                    });
                    grpc.unary(unary, request).await
                }
                STREAM => {
                    let stream = tower::service_fn(move |request: tonic::Request<String>| {
                        let answer = calls.answer(&request).map(|parts| {
                            tonic::Response::new(tokio_stream::iter(parts.into_iter().map(Ok)))
                        });
                        async move { answer }
                    });
                    grpc.server_streaming(stream, request).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

// The open service runs only in the per-service test, which needs the `tonic` feature.
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
const OPEN_SERVICE: &str = "countersign.test.Open";
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
const OPEN_UNARY: &str = "/countersign.test.Open/Unary";

/// A second service, never behind the layer: answers `open|<message>|<signed or not>` (whether
/// a `VerifiedIdentity` reached it) and counts its calls.
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
#[derive(Debug, Clone, Default)]
struct Open {
    count: Arc<AtomicUsize>,
}

impl NamedService for Open {
    const NAME: &'static str = OPEN_SERVICE;
}

impl<B> Service<Request<B>> for Open
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let count = self.count.clone();
        Box::pin(async move {
            if request.uri().path() != OPEN_UNARY {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let unary = tower::service_fn(move |request: tonic::Request<String>| {
                count.fetch_add(1, Ordering::SeqCst);
                let verified = request.extensions().get::<VerifiedIdentity>().is_some();
                let answer = format!("open|{}|{verified}", request.get_ref());
                async move { Ok(tonic::Response::new(answer)) }
            });
            Ok(tonic::server::Grpc::new(StringCodec)
                .unary(unary, request)
                .await)
        })
    }
}

/// A tonic server with `layer` in front of [`WhoAmI`], served on 127.0.0.1:0.
async fn start(layer: VerifyLayer) -> (SocketAddr, Calls) {
    let calls = Calls::default();
    let service = WhoAmI {
        calls: calls.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, calls)
}

// --- clients ---

fn origin(addr: SocketAddr) -> http::Uri {
    format!("http://{addr}").parse().unwrap()
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from(origin(addr)).connect().await.unwrap()
}

/// `SignLayer` hands on `Request<Full<Bytes>>`; a `Channel` takes tonic's body.
fn to_tonic_body(request: Request<Full<Bytes>>) -> Request<tonic::body::Body> {
    request.map(tonic::body::Body::new)
}

/// A gRPC client over a channel wrapped in `layer`. The origin goes on every request: the
/// signature covers `@authority`, and the signer sees the request before the channel would add
/// it.
async fn signed_client(
    addr: SocketAddr,
    layer: SignLayer,
) -> Grpc<impl GrpcService<tonic::body::Body, ResponseBody = tonic::body::Body>> {
    let service = ServiceBuilder::new()
        .layer(layer)
        .map_request(to_tonic_body)
        .service(channel(addr).await);
    Grpc::with_origin(service, origin(addr))
}

/// A gRPC client that signs nothing.
async fn plain_client(addr: SocketAddr) -> Grpc<Channel> {
    Grpc::with_origin(channel(addr).await, origin(addr))
}

async fn ready<T>(client: &mut Grpc<T>) -> Result<(), Status>
where
    T: GrpcService<tonic::body::Body>,
{
    client.ready().await.map_err(|error| {
        let error: BoxError = error.into();
        Status::unknown(format!("not ready: {error}"))
    })
}

async fn unary<T>(client: &mut Grpc<T>, message: &str) -> Result<String, Status>
where
    T: GrpcService<tonic::body::Body, ResponseBody = tonic::body::Body>,
{
    ready(client).await?;
    let path = PathAndQuery::from_static(UNARY);
    let request = tonic::Request::new(message.to_owned());
    Ok(client.unary(request, path, StringCodec).await?.into_inner())
}

async fn server_stream<T>(client: &mut Grpc<T>, message: &str) -> Result<Vec<String>, Status>
where
    T: GrpcService<tonic::body::Body, ResponseBody = tonic::body::Body>,
{
    ready(client).await?;
    let path = PathAndQuery::from_static(STREAM);
    let request = tonic::Request::new(message.to_owned());
    let mut stream = client
        .server_streaming(request, path, StringCodec)
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message?);
    }
    Ok(messages)
}

/// The call was refused with `code`, and `reason`'s wire code as the message.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, reason: Reason) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), reason.as_str(), "{status:?}");
    assert_eq!(Reason::from_code(status.message()), Some(reason));
}

fn alice_k1() -> VerifiedIdentity {
    VerifiedIdentity {
        user: Some("alice".into()),
        roles: vec!["reader".into(), "writer".into()],
        keyid: "k1".into(),
    }
}

// --- the tests ---

#[tokio::test]
async fn signed_unary_call_reaches_the_handler_with_the_identity() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let mut client = signed_client(addr, sign_layer(signer(), NOW)).await;

    let answer = unary(&mut client, "hello").await.unwrap();
    assert_eq!(answer, "alice|reader;writer|k1|hello");
    assert_eq!(calls.count(), 1);
    assert_eq!(calls.identities(), [Some(alice_k1())]);
    assert_eq!(cache.len(), 1);

    // The same client again: a fresh nonce each call.
    let answer = unary(&mut client, "again").await.unwrap();
    assert_eq!(answer, "alice|reader;writer|k1|again");
    assert_eq!(calls.count(), 2);
    assert_eq!(cache.len(), 2);
}

#[tokio::test]
async fn signed_server_streaming_call_streams_and_sees_the_identity() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let mut client = signed_client(addr, sign_layer(signer(), NOW)).await;

    let messages = server_stream(&mut client, "stream me").await.unwrap();
    assert_eq!(messages, ["alice", "reader;writer", "k1", "stream me"]);
    assert_eq!(calls.identities(), [Some(alice_k1())]);

    // Unsigned, the stream is refused before it starts.
    let mut plain = plain_client(addr).await;
    assert_refused(
        server_stream(&mut plain, "x").await,
        Code::Unauthenticated,
        Reason::MissingSignature,
    );
    assert_eq!(calls.count(), 1);
}

#[tokio::test]
async fn unsigned_call_is_unauthenticated_missing_signature() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let mut client = plain_client(addr).await;
    assert_refused(
        unary(&mut client, "hello").await,
        Code::Unauthenticated,
        Reason::MissingSignature,
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(cache.len(), 0);
}

#[tokio::test]
async fn call_signed_with_an_unknown_key_is_unknown_key() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let stranger = Signer::new(keyring("k2", [9; 32]), SignerConfig::default());
    let mut client = signed_client(addr, sign_layer(stranger, NOW)).await;
    assert_refused(
        unary(&mut client, "hello").await,
        Code::Unauthenticated,
        Reason::UnknownKey,
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(cache.len(), 0);
}

/// Between `SignLayer` and the channel: keeps the first signed request it sees and sends that
/// very request (same head, same body bytes, same nonce) in place of every later one.
#[derive(Clone)]
struct Replayer<S> {
    inner: S,
    captured: Arc<Mutex<Option<Request<Full<Bytes>>>>>,
    sent: Arc<AtomicUsize>,
}

impl<S> Service<Request<Full<Bytes>>> for Replayer<S>
where
    S: Service<Request<Full<Bytes>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> S::Future {
        let request = self.captured.lock().unwrap().get_or_insert(request).clone();
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.inner.call(request)
    }
}

#[tokio::test]
async fn the_same_signed_request_sent_twice_is_replayed() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let captured = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(sign_layer(signer(), NOW))
        .layer_fn(|inner| Replayer {
            inner,
            captured: Arc::clone(&captured),
            sent: Arc::clone(&sent),
        })
        .map_request(to_tonic_body)
        .service(channel(addr).await);
    let mut client = Grpc::with_origin(service, origin(addr));

    assert_eq!(
        unary(&mut client, "pay bob").await.unwrap(),
        "alice|reader;writer|k1|pay bob"
    );
    // The second call sends the first one's bytes again (its own message is dropped).
    assert_refused(
        unary(&mut client, "ignored").await,
        Code::Unauthenticated,
        Reason::Replayed,
    );
    assert_eq!(sent.load(Ordering::SeqCst), 2);
    assert_eq!(calls.count(), 1, "the replay reached the handler");
    assert_eq!(cache.len(), 1);
}

/// The body limit counts the gRPC frame: 5 bytes of framing plus the message.
#[tokio::test]
async fn body_over_the_limit_is_resource_exhausted_body_too_large() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache).body_limit(64)).await;
    let mut client = signed_client(addr, sign_layer(signer(), NOW)).await;

    let fits = "f".repeat(59);
    let answer = unary(&mut client, &fits).await.unwrap();
    assert_eq!(answer, format!("alice|reader;writer|k1|{fits}"));
    assert_eq!(calls.count(), 1);

    assert_refused(
        unary(&mut client, &"x".repeat(60)).await,
        Code::ResourceExhausted,
        Reason::BodyTooLarge,
    );
    assert_refused(
        unary(&mut client, &"x".repeat(10_000)).await,
        Code::ResourceExhausted,
        Reason::BodyTooLarge,
    );
    // Without a length the channel sends no `content-length`: the limit is then met while the
    // layer reads the body, not up front.
    let service = ServiceBuilder::new()
        .layer(sign_layer(signer(), NOW))
        .map_request(|request: Request<Full<Bytes>>| {
            request.map(|body| tonic::body::Body::new(Unannounced(body)))
        })
        .service(channel(addr).await);
    let mut unannounced = Grpc::with_origin(service, origin(addr));
    assert_refused(
        unary(&mut unannounced, &"x".repeat(60)).await,
        Code::ResourceExhausted,
        Reason::BodyTooLarge,
    );
    assert_eq!(calls.count(), 1, "a refused body reached the handler");
    assert_eq!(cache.len(), 1);
    // Still the same limit: what fits goes through.
    let answer = unary(&mut unannounced, &fits).await.unwrap();
    assert_eq!(answer, format!("alice|reader;writer|k1|{fits}"));
    assert_eq!(calls.count(), 2);
}

/// A body that hides its length (its size hint says nothing).
struct Unannounced(Full<Bytes>);

impl Body for Unannounced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }
}

/// Window 10 s + skew 2 s: signed 12 s before the server's clock still passes, 13 s is expired.
#[tokio::test]
async fn call_signed_by_a_clock_in_the_past_is_expired() {
    let cache = Arc::new(MemoryReplayCache::new(100));
    let (addr, calls) = start(verify_layer(&cache)).await;

    let mut late = signed_client(addr, sign_layer(signer(), NOW - 13)).await;
    assert_refused(
        unary(&mut late, "hello").await,
        Code::Unauthenticated,
        Reason::Expired,
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(cache.len(), 0);

    let mut just_in_time = signed_client(addr, sign_layer(signer(), NOW - 12)).await;
    assert_eq!(
        unary(&mut just_in_time, "hello").await.unwrap(),
        "alice|reader;writer|k1|hello"
    );
    assert_eq!(calls.count(), 1);
}

#[tokio::test]
async fn full_replay_cache_is_unavailable() {
    let cache = Arc::new(MemoryReplayCache::new(1));
    let (addr, calls) = start(verify_layer(&cache)).await;
    let mut client = signed_client(addr, sign_layer(signer(), NOW)).await;
    unary(&mut client, "first").await.unwrap();
    assert_refused(
        unary(&mut client, "second").await,
        Code::Unavailable,
        Reason::ReplayCacheUnavailable,
    );
    assert_eq!(calls.count(), 1);
}

// --- the layer alone: what it answers, header by header ---

/// A body that fails after its first bytes (a client breaking off mid-body).
struct BrokenBody {
    sent: bool,
}

impl Body for BrokenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::replace(&mut self.sent, true) {
            Poll::Ready(Some(Err("connection reset".into())))
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\0\0\0")))))
        }
    }
}

/// Sends `request` through a `VerifyLayer` in front of a handler that counts its calls.
async fn through_layer<B>(request: Request<B>) -> (Response<Bytes>, usize)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let cache = Arc::new(MemoryReplayCache::new(100));
    let called = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&called);
    let service = ServiceBuilder::new()
        .layer(verify_layer(&cache))
        .service(tower::service_fn(move |_request: Request<Full<Bytes>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        }));
    let response = service.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, body),
        called.load(Ordering::SeqCst),
    )
}

#[track_caller]
fn assert_trailers_only(response: &Response<Bytes>, grpc_status: &str, code: &str) {
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["grpc-status"], grpc_status);
    assert_eq!(headers["grpc-message"], code);
    assert_eq!(headers["cache-control"], "no-store");
    assert!(response.body().is_empty());
}

fn unsigned(content_type: &str) -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1:1/countersign.test.WhoAmI/Unary")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

/// gRPC proper gets the gRPC form; gRPC-Web and everything else the JSON one.
#[tokio::test]
async fn the_layer_answers_grpc_only_to_grpc() {
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "Application/GRPC; charset=utf-8",
    ] {
        let (response, called) = through_layer(unsigned(content_type)).await;
        assert_trailers_only(&response, "16", "missing_signature");
        assert_eq!(called, 0);
    }
    for content_type in [
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
        "application/json",
    ] {
        let (response, called) = through_layer(unsigned(content_type)).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{content_type}"
        );
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.body(), "{\"error\":\"missing_signature\"}");
        assert_eq!(called, 0);
    }
}

/// A gRPC call whose body breaks off mid-read is `INVALID_ARGUMENT` `body_read_failed` (a
/// plain HTTP request gets 400, tests/layer_verify.rs).
#[tokio::test]
async fn a_grpc_body_that_breaks_off_is_invalid_argument() {
    let (mut parts, ()) = Request::post("http://127.0.0.1:1/countersign.test.WhoAmI/Unary")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
        .into_parts();
    signer()
        .sign(&mut parts, b"\0\0\0\0\0", None, NOW, &Nonce::random())
        .unwrap();
    let request = Request::from_parts(parts, BrokenBody { sent: false });
    let (response, called) = through_layer(request).await;
    assert_trailers_only(&response, "3", "body_read_failed");
    assert_eq!(called, 0);
}

/// With the `tonic` feature `VerifyService` is a `NamedService`: the layer wraps one service of
/// a `Server` (`add_service(layer.layer(svc))`), and another service of the same server, on the
/// same port, stays open (a health check, say).
#[cfg(feature = "tonic")]
#[tokio::test]
async fn one_service_of_a_server_is_protected_and_the_other_is_open() {
    use tower::Layer as _;

    let cache = Arc::new(MemoryReplayCache::new(100));
    let calls = Calls::default();
    let protected = verify_layer(&cache).layer(WhoAmI {
        calls: calls.clone(),
    });
    // The wrapped service keeps the name tonic routes by.
    assert_eq!(
        <countersign::layer::VerifyService<WhoAmI> as NamedService>::NAME,
        SERVICE
    );
    let open = Open::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .add_service(protected)
        .add_service(open.clone())
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });

    async fn open_call<T>(client: &mut Grpc<T>, message: &str) -> Result<String, Status>
    where
        T: GrpcService<tonic::body::Body, ResponseBody = tonic::body::Body>,
    {
        ready(client).await?;
        let path = PathAndQuery::from_static(OPEN_UNARY);
        let request = tonic::Request::new(message.to_owned());
        Ok(client.unary(request, path, StringCodec).await?.into_inner())
    }

    // Unsigned: the open service answers, the protected one refuses before its handler.
    let mut plain = plain_client(addr).await;
    assert_eq!(open_call(&mut plain, "hi").await.unwrap(), "open|hi|false");
    assert_refused(
        unary(&mut plain, "hi").await,
        Code::Unauthenticated,
        Reason::MissingSignature,
    );
    assert_refused(
        server_stream(&mut plain, "hi").await,
        Code::Unauthenticated,
        Reason::MissingSignature,
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(open.count.load(Ordering::SeqCst), 1);

    // Signed: the protected service accepts, with the identity; a forged signature is refused.
    let mut client = signed_client(addr, sign_layer(signer(), NOW)).await;
    assert_eq!(
        unary(&mut client, "hello").await.unwrap(),
        "alice|reader;writer|k1|hello"
    );
    assert_eq!(calls.identities(), [Some(alice_k1())]);
    let stranger = Signer::new(keyring("k1", [8; 32]), SignerConfig::default());
    let mut forged = signed_client(addr, sign_layer(stranger, NOW)).await;
    assert_refused(
        unary(&mut forged, "hello").await,
        Code::Unauthenticated,
        Reason::BadSignature,
    );
    assert_eq!(calls.count(), 1);
    // The open service is not verified: a signed call reaches it without an identity, and
    // records no nonce.
    assert_eq!(open_call(&mut client, "hi").await.unwrap(), "open|hi|false");
    assert_eq!(cache.len(), 1);
}

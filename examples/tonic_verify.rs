//! A tonic gRPC server behind `VerifyLayer`, and a client that signs its calls with `SignLayer`.
//!
//! The server mounts the layer once, for every service: `Server::builder().layer(..)`. (With
//! the feature `tonic`, one service can be protected on its own and another left open on the
//! same server: `Server::builder().add_service(VerifyLayer::new(..).layer(WhoAmI))`, with
//! `tower::Layer` in scope; tests/layer_tonic.rs.) A handler
//! reads the verified identity from the request extensions. A refused call ends with a gRPC
//! status (`Unauthenticated`, the reason code as its message), never with a JSON body.
//!
//! The service and its codec are written by hand (a message is its UTF-8 text) so that the
//! example needs no protoc and no build script; a generated service is mounted the same way,
//! and a generated client is built with `with_origin` exactly like `Grpc::with_origin` here.
//!
//! ```text
//! COUNTERSIGN_SECRET=$(head -c32 /dev/urandom | base64) LISTEN=127.0.0.1:50051 cargo run --example tonic_verify
//! ```
//!
//! It serves on `LISTEN`, makes one signed and one unsigned call to itself, prints both
//! outcomes, and keeps serving until interrupted.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf as _, BufMut as _, Bytes};
use countersign::layer::{SignLayer, VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{
    Identity, Keyring, KeyringHandle, Policy, Secret, Signer, SignerConfig, Verifier,
};
use http::uri::PathAndQuery;
use http_body_util::Full;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::Status;
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SERVICE: &str = "countersign.example.WhoAmI";
const METHOD: &str = "/countersign.example.WhoAmI/Call";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The key shared with the signer (keyid "k1"): base64 of at least 32 random bytes.
    let secret = std::env::var("COUNTERSIGN_SECRET").map_err(|_| "set COUNTERSIGN_SECRET")?;
    let secret = Secret::new(base64::engine::general_purpose::STANDARD.decode(secret.trim())?)?;
    let keyring = KeyringHandle::new(Keyring::single("k1", secret)?);

    // --- the server: one VerifyLayer in front of every service ---
    let verifier = Verifier::new(keyring.clone(), Policy::default());
    let replay = Arc::new(MemoryReplayCache::new(1_000_000));
    let listener = tokio::net::TcpListener::bind(
        std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:50051".to_owned()),
    )
    .await?;
    let addr = listener.local_addr()?;
    let server = Server::builder()
        .layer(VerifyLayer::new(verifier, replay))
        .add_service(WhoAmI)
        .serve_with_incoming(TcpIncoming::from(listener));
    let server = tokio::spawn(server);

    // --- a client: SignLayer around a Channel; the client is given its origin ---
    // The signature covers `@authority`, which a `Channel` adds only after the layer has run:
    // `Grpc::with_origin` (or a generated client's `with_origin`) puts it on the request first.
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let channel = Endpoint::from(origin.clone()).connect_lazy();
    let signer = Signer::new(keyring, SignerConfig::default());
    let signed = ServiceBuilder::new()
        .layer(SignLayer::new(signer).identity(Identity::new("billing-svc", ["service"])))
        // SignLayer hands on `Full<Bytes>` bodies; a Channel takes `tonic::body::Body`.
        .map_request(|request: http::Request<Full<Bytes>>| request.map(tonic::body::Body::new))
        .service(channel.clone());
    let mut client = tonic::client::Grpc::with_origin(signed, origin.clone());
    client.ready().await?;
    let answer = client
        .unary(
            tonic::Request::new("hello".to_owned()),
            PathAndQuery::from_static(METHOD),
            TextCodec,
        )
        .await?;
    println!("signed call:   {}", answer.get_ref());

    // The same call unsigned: refused with a gRPC status, the reason code as its message.
    let mut unsigned = tonic::client::Grpc::with_origin(channel, origin);
    unsigned.ready().await?;
    let refused = unsigned
        .unary(
            tonic::Request::new("hello".to_owned()),
            PathAndQuery::from_static(METHOD),
            TextCodec,
        )
        .await;
    match refused {
        Err(status) => println!("unsigned call: {:?} {}", status.code(), status.message()),
        Ok(answer) => println!("unsigned call: unexpectedly accepted: {}", answer.get_ref()),
    }

    println!("serving gRPC on {addr}");
    server.await??;
    Ok(())
}

/// The handler: runs only for verified calls; tonic hands the HTTP request's extensions on, so
/// the layer's `VerifiedIdentity` is in `request.extensions()`.
fn who_am_i(request: tonic::Request<String>) -> Result<tonic::Response<String>, Status> {
    let identity = request
        .extensions()
        .get::<VerifiedIdentity>()
        .ok_or_else(|| Status::unauthenticated("missing_signature"))?;
    let user = identity.user.as_deref().unwrap_or("(no user)");
    let roles: Vec<&str> = identity.roles.iter().map(|role| role.as_str()).collect();
    Ok(tonic::Response::new(format!(
        "{user} [{}] said {:?} (key {})",
        roles.join(","),
        request.get_ref(),
        identity.keyid
    )))
}

// --- what protoc would generate: a service with one unary method, and its codec ---

#[derive(Debug, Clone, Copy)]
struct WhoAmI;

impl NamedService for WhoAmI {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for WhoAmI {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() != METHOD {
                return Ok(Status::unimplemented(request.uri().path().to_owned())
                    .into_http::<tonic::body::Body>());
            }
            let handler = tower::service_fn(|request| std::future::ready(who_am_i(request)));
            let mut grpc = tonic::server::Grpc::new(TextCodec);
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// A message is its UTF-8 text.
#[derive(Debug, Clone, Copy, Default)]
struct TextCodec;

impl Codec for TextCodec {
    type Encode = String;
    type Decode = String;
    type Encoder = TextCodec;
    type Decoder = TextCodec;

    fn encoder(&mut self) -> TextCodec {
        *self
    }

    fn decoder(&mut self) -> TextCodec {
        *self
    }
}

impl Encoder for TextCodec {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for TextCodec {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|error| Status::invalid_argument(error.to_string()))
    }
}

//! A plain hyper 1 server behind `VerifyLayer`: answers signed requests with the verified user.
//!
//! ```text
//! COUNTERSIGN_SECRET=$(head -c32 /dev/urandom | base64) LISTEN=127.0.0.1:8080 cargo run --example hyper_verify
//! ```
//!
//! Send it a request signed with the same secret (`countersign sign`, in a shell where the
//! server's `COUNTERSIGN_SECRET` is exported, with a keyring that names that variable; the
//! `Connection: close` has the server end the connection after answering):
//!
//! ```text
//! printf 'active = "k1"\n[[keys]]\nid = "k1"\nsecret_env = "COUNTERSIGN_SECRET"\n' > keys.toml
//! printf 'GET /whoami HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n' \
//!   | countersign sign --keyring keys.toml --user alice - \
//!   | { exec 3<>/dev/tcp/127.0.0.1/8080; cat >&3; cat <&3; }
//! ```
use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, Policy, Secret, Verifier};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The key shared with the signer (keyid "k1"): base64 of at least 32 random bytes.
    let secret = std::env::var("COUNTERSIGN_SECRET").map_err(|_| "set COUNTERSIGN_SECRET")?;
    let secret = Secret::new(base64::engine::general_purpose::STANDARD.decode(secret.trim())?)?;
    let verifier = Verifier::new(Keyring::single("k1", secret)?.into(), Policy::default());
    let replay = Arc::new(MemoryReplayCache::new(1_000_000));

    let service = ServiceBuilder::new()
        .layer(VerifyLayer::new(verifier, replay))
        .service_fn(whoami);

    let listener = tokio::net::TcpListener::bind(
        std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".to_owned()),
    )
    .await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = connection
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}

/// Runs only for verified requests: the layer has put the identity in the extensions.
async fn whoami(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let identity = request.extensions().get::<VerifiedIdentity>();
    let user = identity
        .and_then(|id| id.user.as_deref())
        .unwrap_or("(no user)");
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello, {user}\n"
    )))))
}

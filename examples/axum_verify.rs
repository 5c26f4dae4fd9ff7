//! An axum API behind `VerifyLayer`; handlers take the verified identity as an extractor.
//!
//! ```text
//! COUNTERSIGN_SECRET=$(head -c32 /dev/urandom | base64) LISTEN=127.0.0.1:8080 cargo run --features axum --example axum_verify
//! ```
use std::sync::Arc;

use axum::{routing::get, Router};
use base64::Engine as _;
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use countersign::{Keyring, Policy, Secret, Verifier};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("COUNTERSIGN_SECRET").map_err(|_| "set COUNTERSIGN_SECRET")?;
    let secret = Secret::new(base64::engine::general_purpose::STANDARD.decode(secret.trim())?)?;
    let verifier = Verifier::new(Keyring::single("k1", secret)?.into(), Policy::default());
    let replay = Arc::new(MemoryReplayCache::new(1_000_000));

    let app = Router::new()
        .route("/whoami", get(whoami))
        .layer(VerifyLayer::new(verifier, replay));

    let listener = tokio::net::TcpListener::bind(
        std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".to_owned()),
    )
    .await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn whoami(identity: VerifiedIdentity) -> String {
    format!(
        "hello, {}\n",
        identity.user.as_deref().unwrap_or("(no user)")
    )
}

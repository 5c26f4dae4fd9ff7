//! An axum API behind `VerifyLayer`; handlers take the verified identity as an extractor, and
//! read the (verified) body with axum's extractors as usual. The signed routes are nested under
//! `/api` with the layer on the nested router; `/healthz` beside them stays open.
//!
//! ```text
//! COUNTERSIGN_SECRET=$(head -c32 /dev/urandom | base64) LISTEN=127.0.0.1:8080 cargo run --features axum --example axum_verify
//! ```
//!
//! Send it a request signed with the same secret (`countersign sign`, in a shell where the
//! server's `COUNTERSIGN_SECRET` is exported, with a keyring that names that variable; the
//! `Connection: close` has the server end the connection after answering):
//!
//! ```text
//! printf 'active = "k1"\n[[keys]]\nid = "k1"\nsecret_env = "COUNTERSIGN_SECRET"\n' > keys.toml
//! printf 'POST /api/orders HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{"id":42}' \
//!   | countersign sign --keyring keys.toml --user alice --roles orders - \
//!   | { exec 3<>/dev/tcp/127.0.0.1/8080; cat >&3; cat <&3; }
//! ```
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
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

    // Inside `Router::nest` the nested routes see `/whoami`, while `/api/whoami` was signed:
    // with the `axum` feature the layer verifies the URI the outer router received (axum's
    // `OriginalUri`), so it can sit on the nested router and leave `/healthz` open.
    let api = Router::new()
        .route("/whoami", get(whoami))
        .route("/orders", post(create_order))
        .layer(VerifyLayer::new(verifier, replay));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest("/api", api);

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

/// The body was checked against the signed `Content-Digest` before this runs; a user without
/// the `orders` role is refused here, by the application (the layer knows no roles).
async fn create_order(
    identity: VerifiedIdentity,
    Json(order): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    if !identity.has_role("orders") {
        return Err(StatusCode::FORBIDDEN);
    }
    Ok(Json(serde_json::json!({
        "by": identity.user.as_deref(),
        "order": order,
    })))
}

//! The axum extractor for [`VerifiedIdentity`] (feature `axum`), and what lets the layer work
//! inside `Router::nest`.
//!
//! A handler taking `VerifiedIdentity` only runs behind a [`VerifyLayer`](super::VerifyLayer);
//! without the layer the extractor answers 401 `{"error":"missing_signature"}` rather than
//! letting an unverified request through (and warns, at most once per 10 s, that a route lacks
//! the layer). `Option<VerifiedIdentity>` never rejects.
//!
//! With this feature the layer may be mounted inside `Router::nest` / `nest_service`: a nested
//! router sees the path without its prefix, which is not the path that was signed, so the layer
//! builds `@path`, `@query`, `@target-uri` and `@request-target` (and `@authority` / `@scheme`
//! when the URI carries them) from the URI the outermost `Router` received, which axum records
//! in the request extensions as [`OriginalUri`] (see [`VerifyLayer`](super::VerifyLayer)).

use std::convert::Infallible;

use axum::extract::OriginalUri;
use axum_core::body::Body;
use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::Uri;

use super::response::rejection;
use super::verify::PacedLog;
use super::VerifiedIdentity;
use crate::core::Reason;

/// The warning about a route without the layer: anyone who can reach that route triggers it
/// with every request, so it is paced like the layer's own warnings (at most one line per
/// 10 s, with the count of those not logged), not a line per request.
static MISSING_LAYER_LOG: PacedLog = PacedLog::new();

/// The URI the signature must be checked against when it is not the request's own: the
/// [`OriginalUri`] the outermost axum `Router` recorded, when a nested router has since
/// stripped a prefix from the request's URI (`None`: the request's URI is the one received).
///
/// Trust: only server-side code can put an extension in a request, and axum's `Router` inserts
/// `OriginalUri` (a clone of the URI hyper parsed from the request line or `:path`) only when
/// none is present yet, so it is the URI of the request as this server received it, never a
/// value a client chose apart from that. The request handed on keeps its stripped URI: the
/// nested router routes by it.
///
/// Only a URI that differs from the original as a nest's strip makes it differ is taken for
/// one (see [`is_prefix_stripped`]): a middleware mounted on the outer router runs after
/// `OriginalUri` is recorded, and one that rewrites the path or the query (a version
/// mapping, or a rewrite driven by an unsigned header) would otherwise have the signature
/// checked against the URI received while the nested router routes by the rewritten one.
/// Such a URI is verified as it stands, and refused unless it was signed so.
pub(crate) fn original_uri(parts: &Parts) -> Option<Uri> {
    match parts.extensions.get::<OriginalUri>() {
        Some(OriginalUri(original))
            if *original != parts.uri && is_prefix_stripped(original, &parts.uri) =>
        {
            Some(original.clone())
        }
        _ => None,
    }
}

/// Whether `routed` is `original` with a leading part of its path removed at a `/`, as axum's
/// `nest` and `nest_service` strip their prefix: the same scheme, authority and query, and the
/// routed path a `/`-led tail of the original's, or `/` (the nest's own path: `/api` routed
/// as `/`).
fn is_prefix_stripped(original: &Uri, routed: &Uri) -> bool {
    let routed_path = routed.path();
    routed.scheme() == original.scheme()
        && routed.authority() == original.authority()
        && routed.query() == original.query()
        && routed_path.starts_with('/')
        && (routed_path == "/" || original.path().ends_with(routed_path))
}

/// The extractor's rejection: no [`VerifiedIdentity`] in the request (the layer is not mounted
/// on this route). Answers 401 `{"error":"missing_signature"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingVerifiedIdentity;

impl std::fmt::Display for MissingVerifiedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "no verified identity in the request: VerifyLayer is not in front of this route \
             (missing_signature)",
        )
    }
}

impl std::error::Error for MissingVerifiedIdentity {}

impl IntoResponse for MissingVerifiedIdentity {
    fn into_response(self) -> Response {
        rejection(Reason::MissingSignature).map(Body::new)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for VerifiedIdentity {
    type Rejection = MissingVerifiedIdentity;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<VerifiedIdentity>() {
            Some(identity) => Ok(identity.clone()),
            None => {
                let path = parts.uri.path();
                match MISSING_LAYER_LOG.turn() {
                    Some(suppressed) => tracing::warn!(
                        path,
                        suppressed,
                        "VerifiedIdentity extracted on a route without VerifyLayer; further \
                         ones are logged at most every 10 s, `suppressed` counts those since \
                         the last line"
                    ),
                    None => tracing::debug!(
                        path,
                        "VerifiedIdentity extracted on a route without VerifyLayer"
                    ),
                }
                Err(MissingVerifiedIdentity)
            }
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for VerifiedIdentity {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<VerifiedIdentity>().cloned())
    }
}

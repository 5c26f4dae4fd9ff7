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
//! in the request extensions as [`OriginalUri`] (see [`VerifyLayer`](super::VerifyLayer)), when
//! the request's URI is that one with the nest's prefix ([`NestedPath`]) stripped.

use std::convert::Infallible;

use axum::extract::{NestedPath, OriginalUri};
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
/// Only a URI that is the original with the nest's own prefix stripped is taken for one (see
/// [`is_nest_strip`]): a middleware mounted on the outer router runs after `OriginalUri` is
/// recorded, and one that rewrites the path or the query (a version mapping, or a rewrite
/// driven by an unsigned header) would otherwise have the signature checked against the URI
/// received while the nested router routes by the rewritten one. Such a URI is verified as it
/// stands, and refused unless it was signed so. The prefix is the one axum records beside the
/// strip, [`NestedPath`]; without it (no nest) the request's own URI is verified.
pub(crate) fn original_uri(parts: &Parts) -> Option<Uri> {
    let OriginalUri(original) = parts.extensions.get::<OriginalUri>()?;
    if *original == parts.uri {
        return None;
    }
    let nested_at = parts.extensions.get::<NestedPath>()?;
    is_nest_strip(original, &parts.uri, nested_at.as_str()).then(|| original.clone())
}

/// Whether `routed` is `original` as axum's `nest` / `nest_service` leave it: the same scheme,
/// authority and query, and the path with the nest's prefix `nested_at` (its pattern, as
/// [`NestedPath`] holds it: nests within nests joined, `{name}` segments matching any one
/// segment) taken off at a segment boundary, `/` when nothing is left. Not merely a `/`-led
/// tail of the original path: a rewrite of `/api/admin/whoami` to `/api/whoami` leaves the
/// tail `/whoami` after the strip, and would run another handler than the one signed for.
fn is_nest_strip(original: &Uri, routed: &Uri, nested_at: &str) -> bool {
    routed.scheme() == original.scheme()
        && routed.authority() == original.authority()
        && routed.query() == original.query()
        && after_nest_prefix(original.path(), nested_at).is_some_and(|rest| {
            if rest.is_empty() {
                routed.path() == "/"
            } else {
                routed.path() == rest
            }
        })
}

/// What is left of `path` once the nest pattern `prefix` is matched at its start, segment by
/// segment as axum's router strips it (a `{name}` segment matches any one segment; a prefix
/// ending in `/` matches up to that `/`): empty or `/`-led; `None` when the prefix does not
/// match.
fn after_nest_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let mut path_segments = path.strip_prefix('/')?.split('/');
    let mut matched = 0;
    for pattern in prefix.strip_prefix('/')?.split('/') {
        let Some(segment) = path_segments.next() else {
            // The prefix has more segments than the path.
            return None;
        };
        let capture = pattern.len() >= 2
            && pattern.starts_with('{')
            && pattern.ends_with('}')
            && !pattern.starts_with("{{");
        if capture || segment == pattern {
            matched += 1 + segment.len();
        } else if pattern.is_empty() {
            // The prefix ended in `/`: matched up to that `/`.
            break;
        } else {
            return None;
        }
    }
    path.get(matched..)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The strip as axum's router makes it, for the nest patterns it allows.
    #[test]
    fn after_nest_prefix_matches_whole_segments() {
        for (path, prefix, rest) in [
            ("/api/whoami", "/api", Some("/whoami")),
            ("/api", "/api", Some("")),
            ("/api/", "/api", Some("/")),
            ("/api/x", "/api/", Some("/x")),
            ("/api/", "/api/", Some("")),
            ("/api", "/api/", None),
            ("/apix/whoami", "/api", None),
            ("/v2/api/x", "/{version}/api", Some("/x")),
            ("/api/v1/x/y", "/api/v1", Some("/x/y")),
            ("/other/x", "/api", None),
            ("/", "/api", None),
        ] {
            assert_eq!(after_nest_prefix(path, prefix), rest, "{path} {prefix}");
        }
    }

    /// Only the nest's own strip: a rewrite that leaves another tail of the signed path (or
    /// the nest's root) is not one.
    #[test]
    fn a_nest_strip_is_the_prefix_taken_off_and_nothing_else() {
        let uri = |text: &str| text.parse::<Uri>().unwrap();
        let original = uri("/api/admin/whoami?x=1");
        assert!(is_nest_strip(&original, &uri("/admin/whoami?x=1"), "/api"));
        for routed in ["/whoami?x=1", "/?x=1", "/admin/whoami?x=2", "/admin/whoami"] {
            assert!(!is_nest_strip(&original, &uri(routed), "/api"), "{routed}");
        }
        assert!(!is_nest_strip(
            &original,
            &uri("/whoami?x=1"),
            "/api/admin/x"
        ));
        assert!(is_nest_strip(&uri("/api?x=1"), &uri("/?x=1"), "/api"));
    }
}

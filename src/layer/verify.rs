//! The server-side layer: verify, read the body within a limit, check its digest, record the
//! nonce, then hand the request on with the verified identity attached.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt as _, Either, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

use super::response::{error_response, rejection, BODY_READ_FAILED};
use super::{BoxError, ResponseFuture};
use crate::clock::{SharedClock, SystemClock};
use crate::core::{Reason, Verifier, VerifyError, DEFAULT_BODY_LIMIT};
use crate::replay::{ReplayCache, ReplayOutcome};

/// Who signed a request that passed [`VerifyLayer`]: found in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The forwarded user, when the signer sent one (`None`: a service-to-service request).
    pub user: Option<String>,
    /// The user's roles, in order (empty without a user).
    pub roles: Vec<String>,
    /// The `keyid` whose key verified the signature.
    pub keyid: String,
}

#[derive(Clone)]
struct Settings {
    verifier: Verifier,
    replay: Arc<dyn ReplayCache>,
    body_limit: usize,
    clock: SharedClock,
}

/// Verifies signed requests (see the module docs of [`crate::layer`]).
///
/// Per request: the signature headers and MAC are checked first (a forged request costs no body
/// read); then the body is read within [`body_limit`](Self::body_limit) (413 `body_too_large`
/// beyond it, also up front from `Content-Length`); then its `Content-Digest` is checked; then
/// the nonce is recorded in the replay cache (401 `replayed`, or 503 `replay_cache_unavailable`
/// when the cache cannot record it). A request rejected at any step records nothing. Accepted
/// requests reach the inner service as `Request<Full<Bytes>>` with the exact body bytes and a
/// [`VerifiedIdentity`] extension. Rejections are responses (`{"error":"<reason>"}`, JSON), not
/// service errors.
#[derive(Clone)]
pub struct VerifyLayer {
    settings: Arc<Settings>,
}

impl VerifyLayer {
    /// A layer verifying with `verifier` and recording nonces in `replay`. Body limit 1 MiB,
    /// system clock.
    pub fn new(verifier: Verifier, replay: Arc<dyn ReplayCache>) -> Self {
        VerifyLayer {
            settings: Arc::new(Settings {
                verifier,
                replay,
                body_limit: DEFAULT_BODY_LIMIT,
                clock: Arc::new(SystemClock),
            }),
        }
    }

    /// The largest body accepted, in bytes.
    pub fn body_limit(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.settings).body_limit = limit;
        self
    }

    /// The clock the signature times are checked against.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        Arc::make_mut(&mut self.settings).clock = clock;
        self
    }
}

impl fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("policy", self.settings.verifier.policy())
            .field("body_limit", &self.settings.body_limit)
            .field("clock", &self.settings.clock)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> VerifyService<S> {
        VerifyService {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service [`VerifyLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for VerifyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for VerifyService<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = Arc::clone(&self.settings);
        ResponseFuture::new(async move {
            match verify(&settings, request).await {
                Ok(request) => inner
                    .call(request)
                    .await
                    .map(|response| response.map(Either::Left)),
                Err(response) => Ok(response.map(Either::Right)),
            }
        })
    }
}

/// The whole check; `Err` is the rejection response.
async fn verify<B>(
    settings: &Settings,
    request: Request<B>,
) -> Result<Request<Full<Bytes>>, Response<Full<Bytes>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let fail = |error: VerifyError| reject(&parts, error);

    // (a) Headers and MAC, before any body byte is read.
    let now = settings.clock.now_unix();
    let headers_verified = settings
        .verifier
        .verify_headers(&parts, now)
        .map_err(&fail)?;

    // (b) The body, within the limit: refuse up front what announces itself as too large.
    let limit = settings.body_limit;
    let announced = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = |what: String| fail(VerifyError::new(Reason::BodyTooLarge, what));
    if let Some(length) = announced.filter(|&l| l > limit as u64) {
        return Err(too_large(format!(
            "Content-Length {length} exceeds the limit of {limit} bytes"
        )));
    }
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large(format!(
            "body exceeds the limit of {limit} bytes"
        )));
    }
    // A body that is already over (a GET, or an exact length of 0) needs no limiter, no
    // collecting buffer and no await: the common bodiless request skips straight to the digest.
    let bodiless = body.is_end_stream() || body.size_hint().exact() == Some(0);
    let bytes = if bodiless {
        Bytes::new()
    } else {
        read_body(body, limit, &parts).await?
    };

    // (c) The digest over the exact bytes received.
    let verified = headers_verified.check_body(&bytes).map_err(&fail)?;

    // (d) Only now, for a fully verified request, the nonce.
    if let Some(nonce) = &verified.nonce {
        let now = settings.clock.now_unix();
        match settings
            .replay
            .check_and_record(nonce, verified.replay_until, now)
            .await
        {
            Ok(ReplayOutcome::Fresh) => {}
            Ok(ReplayOutcome::Replayed) => {
                return Err(fail(VerifyError::new(
                    Reason::Replayed,
                    "nonce seen before",
                )))
            }
            Err(error) => return Err(fail(error.into())),
        }
    }

    // (e) Hand on, body intact, identity attached.
    let (user, roles) = match verified.identity {
        Some(identity) => (Some(identity.user), identity.roles),
        None => (None, Vec::new()),
    };
    let mut request = Request::from_parts(parts, Full::new(bytes));
    request.extensions_mut().insert(VerifiedIdentity {
        user,
        roles,
        keyid: verified.keyid,
    });
    Ok(request)
}

/// Collects a body within `limit` bytes; `Err` is the rejection (413 beyond the limit, 400 when
/// the body cannot be read).
async fn read_body<B>(
    body: B,
    limit: usize,
    parts: &http::request::Parts,
) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(reject(
            parts,
            VerifyError::new(
                Reason::BodyTooLarge,
                format!("body exceeds the limit of {limit} bytes"),
            ),
        )),
        Err(error) => {
            let (method, path) = (&parts.method, parts.uri.path());
            tracing::debug!(%error, %method, path, "signed request rejected: body read failed");
            Err(error_response(
                http::StatusCode::BAD_REQUEST,
                BODY_READ_FAILED,
            ))
        }
    }
}

/// Logs a rejection (reason and detail, never secrets) and builds its response.
fn reject(parts: &http::request::Parts, error: VerifyError) -> Response<Full<Bytes>> {
    let (reason, detail) = (error.reason(), error.detail());
    let (method, path) = (&parts.method, parts.uri.path());
    match reason {
        // The service is refusing valid traffic: operators must hear of it.
        Reason::ReplayCacheUnavailable => {
            tracing::warn!(%reason, detail, %method, path, "signed request rejected")
        }
        // A valid signature sent twice: a retrying client, or someone replaying a capture.
        Reason::Replayed => {
            tracing::info!(%reason, detail, %method, path, "signed request rejected")
        }
        _ => tracing::debug!(%reason, detail, %method, path, "signed request rejected"),
    }
    rejection(reason)
}

//! The server-side layer: verify, read the body within a limit, check its digest, record the
//! nonce, then hand the request on with the verified identity attached.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt as _, Either, Full, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::response::{error_response, rejection, BODY_READ_FAILED};
use super::BoxError;
use crate::clock::{SharedClock, SystemClock};
use crate::core::{HeadersVerified, Reason, Verified, Verifier, VerifyError, DEFAULT_BODY_LIMIT};
use crate::replay::{ReplayCache, ReplayError, ReplayFuture, ReplayOutcome};

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
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = VerifyFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        VerifyFuture {
            state: begin(&self.settings, &mut self.inner, request),
        }
    }
}

pin_project! {
    /// The future [`VerifyService`] returns. A request that needs no waiting (no body to read,
    /// and a replay cache that answers at once, as [`MemoryReplayCache`] does) is checked
    /// entirely inside `call`, and this future is then just the inner service's future (or the
    /// rejection): nothing is boxed per request.
    ///
    /// [`MemoryReplayCache`]: crate::replay::MemoryReplayCache
    pub struct VerifyFuture<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B>,
    }
}

impl<S, B> fmt::Debug for VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyFuture").finish_non_exhaustive()
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        // Answered without calling the inner service; `None` once taken.
        Rejected { response: Option<Response<Full<Bytes>>> },
        // Headers and MAC passed; the body is being read within the limit.
        ReadingBody {
            #[pin]
            collect: Collect<Limited<B>>,
            pending: Option<BodyPending<S>>,
        },
        // Verified; an asynchronous replay cache is recording the nonce.
        Recording {
            record: ReplayFuture<'static, Result<ReplayOutcome, ReplayError>>,
            pending: Option<(S, Accepted)>,
        },
        // Accepted and handed on.
        Inner {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, B> State<S, B>
where
    S: Service<Request<Full<Bytes>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn rejected(response: Response<Full<Bytes>>) -> Self {
        State::Rejected {
            response: Some(response),
        }
    }
}

/// What the body reading needs to carry to the end of the check.
struct BodyPending<S> {
    settings: Arc<Settings>,
    /// The inner service that was polled ready (taken out of the `VerifyService`).
    inner: S,
    parts: Parts,
    headers_verified: HeadersVerified,
}

/// A fully verified request, waiting only for its nonce to be recorded.
struct Accepted {
    parts: Parts,
    body: Bytes,
    identity: VerifiedIdentity,
}

impl Accepted {
    fn into_request(self) -> Request<Full<Bytes>> {
        let mut request = Request::from_parts(self.parts, Full::new(self.body));
        request.extensions_mut().insert(self.identity);
        request
    }

    /// (d) settled by the replay cache's answer.
    // The rejection is as large as the request it replaces, and each is moved once, straight
    // into the future's next state: boxing it would only add an allocation per rejection.
    #[allow(clippy::result_large_err)]
    fn recorded(
        self,
        outcome: Result<ReplayOutcome, ReplayError>,
    ) -> Result<Request<Full<Bytes>>, Response<Full<Bytes>>> {
        match outcome {
            Ok(ReplayOutcome::Fresh) => Ok(self.into_request()),
            Ok(ReplayOutcome::Replayed) => Err(reject(
                &self.parts,
                VerifyError::new(Reason::Replayed, "nonce seen before"),
            )),
            Err(error) => Err(reject(&self.parts, error.into())),
        }
    }
}

/// Where a request stands once its body is known.
enum Settled {
    Rejected(Response<Full<Bytes>>),
    Accepted(Request<Full<Bytes>>),
    Recording(
        ReplayFuture<'static, Result<ReplayOutcome, ReplayError>>,
        Accepted,
    ),
}

/// Swaps the polled-ready inner service out for a fresh clone, so the future owns the ready one
/// (tower's contract: call the instance that was polled ready).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// Everything a request allows without waiting: (a) headers and MAC, (b) the limit announced by
/// the body, and for a bodiless request (c) to (e) as well when the replay cache answers at
/// once. The rest (reading a body, an asynchronous cache) continues in [`VerifyFuture`].
fn begin<S, B>(settings: &Arc<Settings>, inner: &mut S, request: Request<B>) -> State<S, B>
where
    S: Service<Request<Full<Bytes>>> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();

    // (a) Headers and MAC, before any body byte is read.
    let now = settings.clock.now_unix();
    let headers_verified = match settings.verifier.verify_headers(&parts, now) {
        Ok(verified) => verified,
        Err(error) => return State::rejected(reject(&parts, error)),
    };

    // (b) The body, within the limit: refuse up front what announces itself as too large.
    let limit = settings.body_limit;
    let announced = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = announced.filter(|&l| l > limit as u64) {
        return State::rejected(too_large(
            &parts,
            format!("Content-Length {length} exceeds the limit of {limit} bytes"),
        ));
    }
    if body.size_hint().lower() > limit as u64 {
        return State::rejected(too_large(
            &parts,
            format!("body exceeds the limit of {limit} bytes"),
        ));
    }
    // A body that is already over (a GET, or an exact length of 0) needs no limiter, no
    // collecting buffer and no await: the common bodiless request goes straight on, with the
    // same clock reading (no time passed waiting for anything).
    let bodiless = body.is_end_stream() || body.size_hint().exact() == Some(0);
    if !bodiless {
        return State::ReadingBody {
            collect: Limited::new(body, limit).collect(),
            pending: Some(BodyPending {
                settings: Arc::clone(settings),
                inner: take_ready(inner),
                parts,
                headers_verified,
            }),
        };
    }
    match settle(settings, parts, headers_verified, Bytes::new(), now) {
        Settled::Rejected(response) => State::rejected(response),
        // The instance polled ready is `inner` itself: called right here, no clone needed.
        Settled::Accepted(request) => State::Inner {
            future: inner.call(request),
        },
        Settled::Recording(record, accepted) => State::Recording {
            record,
            pending: Some((take_ready(inner), accepted)),
        },
    }
}

/// (c) the digest over the exact bytes received, (d) the nonce, and (e) the request to hand on.
fn settle(
    settings: &Settings,
    parts: Parts,
    headers_verified: HeadersVerified,
    body: Bytes,
    now: u64,
) -> Settled {
    // (c)
    let Verified {
        identity,
        keyid,
        nonce,
        replay_until,
        ..
    } = match headers_verified.check_body(&body) {
        Ok(verified) => verified,
        Err(error) => return Settled::Rejected(reject(&parts, error)),
    };
    // (e), built before (d) but handed on only after it.
    let (user, roles) = match identity {
        Some(identity) => (Some(identity.user), identity.roles),
        None => (None, Vec::new()),
    };
    let accepted = Accepted {
        parts,
        body,
        identity: VerifiedIdentity { user, roles, keyid },
    };
    // (d) Only now, for a fully verified request, the nonce: answered at once by an
    // in-process cache, else asynchronously.
    let Some(nonce) = nonce else {
        return Settled::Accepted(accepted.into_request());
    };
    if let Some(outcome) = settings
        .replay
        .try_check_and_record_now(&nonce, replay_until, now)
    {
        return match accepted.recorded(outcome) {
            Ok(request) => Settled::Accepted(request),
            Err(response) => Settled::Rejected(response),
        };
    }
    let replay = Arc::clone(&settings.replay);
    let record = Box::pin(async move { replay.check_and_record(&nonce, replay_until, now).await });
    Settled::Recording(record, accepted)
}

impl<S, B, ResBody> Future for VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Either<ResBody, Full<Bytes>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Inner { future } => {
                    return future
                        .poll(cx)
                        .map(|result| result.map(|response| response.map(Either::Left)))
                }
                StateProj::Rejected { response } => {
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response.map(Either::Right))),
                        // Polled again after completion: like a fused future, never ready.
                        None => Poll::Pending,
                    };
                }
                StateProj::ReadingBody { collect, pending } => {
                    let collected = ready!(collect.poll(cx));
                    let Some(pending) = pending.take() else {
                        return Poll::Pending;
                    };
                    match body_bytes(collected, pending.settings.body_limit, &pending.parts) {
                        Err(response) => State::rejected(response),
                        Ok(body) => {
                            // Time passed while the body arrived: read the clock again.
                            let now = pending.settings.clock.now_unix();
                            let BodyPending {
                                settings,
                                mut inner,
                                parts,
                                headers_verified,
                            } = pending;
                            match settle(&settings, parts, headers_verified, body, now) {
                                Settled::Rejected(response) => State::rejected(response),
                                Settled::Accepted(request) => State::Inner {
                                    future: inner.call(request),
                                },
                                Settled::Recording(record, accepted) => State::Recording {
                                    record,
                                    pending: Some((inner, accepted)),
                                },
                            }
                        }
                    }
                }
                StateProj::Recording { record, pending } => {
                    let outcome = ready!(record.as_mut().poll(cx));
                    let Some((mut inner, accepted)) = pending.take() else {
                        return Poll::Pending;
                    };
                    match accepted.recorded(outcome) {
                        Ok(request) => State::Inner {
                            future: inner.call(request),
                        },
                        Err(response) => State::rejected(response),
                    }
                }
            };
            state.set(next);
        }
    }
}

/// The body read within `limit`; `Err` is the rejection (413 beyond the limit, 400 when the body
/// cannot be read).
// See `Accepted::recorded` for why the rejection is not boxed.
#[allow(clippy::result_large_err)]
fn body_bytes<D: bytes::Buf>(
    collected: Result<http_body_util::Collected<D>, BoxError>,
    limit: usize,
    parts: &Parts,
) -> Result<Bytes, Response<Full<Bytes>>> {
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(
            parts,
            format!("body exceeds the limit of {limit} bytes"),
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

/// The 413 rejection.
fn too_large(parts: &Parts, detail: String) -> Response<Full<Bytes>> {
    reject(parts, VerifyError::new(Reason::BodyTooLarge, detail))
}

/// Logs a rejection (reason and detail, never secrets) and builds its response.
fn reject(parts: &Parts, error: VerifyError) -> Response<Full<Bytes>> {
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

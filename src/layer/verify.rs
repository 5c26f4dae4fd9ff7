//! The server-side layer: verify, read the body within a limit, check its digest, record the
//! nonce, then hand the request on with the verified identity attached.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body_memory::{BodyMemory, BodyMemoryUsage, Metered, OutOfBodyMemory, OwnedBodyShare};
use super::response::{accept_signature, body_read_failed, rejection_for, ACCEPT_SIGNATURE};
use super::BoxError;
use crate::clock::{SharedClock, SystemClock};
use crate::core::CompactString;
use crate::core::{HeadersVerified, Reason, Verified, Verifier, VerifyError, DEFAULT_BODY_LIMIT};
use crate::replay::{ReplayCache, ReplayError, ReplayFuture, ReplayOutcome};

/// Who signed a request that passed [`VerifyLayer`]: found in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The forwarded user, when the signer sent one (`None`: a service-to-service request).
    /// [`CompactString`]s here: names up to 24 bytes are held inline, so an accepted request's
    /// identity costs one allocation (the roles' `Vec`, when there are roles), not one per
    /// name. They read as `&str` (`deref`, `as_str`) and compare with `&str` and `String`.
    pub user: Option<CompactString>,
    /// The user's roles, in order (empty without a user).
    pub roles: Vec<CompactString>,
    /// The `keyid` whose key verified the signature.
    pub keyid: CompactString,
}

impl VerifiedIdentity {
    /// Whether the verified user has `role` (exact, case-sensitive: roles are signed as
    /// given). Always `false` for a request without a user, which has no roles.
    ///
    /// ```
    /// # use countersign::layer::VerifiedIdentity;
    /// fn may_refund(identity: &VerifiedIdentity) -> bool {
    ///     identity.has_role("billing-admin")
    /// }
    /// ```
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|held| held == role)
    }
}

/// The default [`VerifyLayer::max_body_memory`]: 64 MiB, the proxy's `server.max_body_memory`
/// default (raised to the body limit when that is larger).
pub const DEFAULT_MAX_BODY_MEMORY: usize = 64 * 1024 * 1024;

/// The setting the layer's cap is, named in the warning about refusals.
const MAX_BODY_MEMORY_SETTING: &str = "VerifyLayer::max_body_memory";

#[derive(Clone)]
struct Settings {
    verifier: Verifier,
    replay: Arc<dyn ReplayCache>,
    body_limit: usize,
    /// As set ([`VerifyLayer::max_body_memory`]); the cap in force is `body_memory`'s, never
    /// below `body_limit`.
    max_body_memory: usize,
    /// The budget every clone of the layer, and every service it makes, draws on.
    body_memory: Arc<BodyMemory>,
    clock: SharedClock,
    /// The `Accept-Signature` of the 401 answers, built once from the policy.
    accept_signature: Option<HeaderValue>,
}

/// Verifies signed requests (see the module docs of [`crate::layer`]).
///
/// Per request: the signature headers and MAC are checked first (a forged request costs no body
/// read); then the body is read within [`body_limit`](Self::body_limit) (413 `body_too_large`
/// beyond it, also up front from `Content-Length`) and within what is left of
/// [`max_body_memory`](Self::max_body_memory), the memory all the bodies it holds may take
/// together (503 `body_memory_limit` with `Retry-After: 1`, up front too); then its
/// `Content-Digest` is checked; then the nonce is recorded in the replay cache (401
/// `replayed`, or 503 `replay_cache_unavailable` when the cache cannot record it). A request
/// rejected before the replay cache is asked records nothing; once it is asked, the nonce may
/// be recorded although the request is refused: an asynchronous cache (Redis) whose `Fresh`
/// arrives after the signature's window closed (`expired`), or whose call timed out or lost
/// its reply and could not be repeated (503), may have stored it. That nonce was sent once by an authentic signer, which signs each attempt
/// with a fresh one, so nothing legitimate is refused for it (docs/PROTOCOL.md §6). Accepted
/// requests reach the inner service as `Request<Full<Bytes>>` with the exact body bytes and a
/// [`VerifiedIdentity`] extension. Rejections are responses (`{"error":"<reason>"}`, JSON), not
/// service errors; a 401 also carries `WWW-Authenticate: Signature error="<reason>"` and an
/// `Accept-Signature` built from the policy (see [`accept_signature`](super::accept_signature),
/// docs/PROTOCOL.md §7); a gRPC call (`content-type: application/grpc`, see
/// [`is_grpc_request`](super::is_grpc_request)) is refused with a gRPC status instead
/// ([`Reason::grpc_status`], the reason as `grpc-message`).
///
/// The headers are checked when they arrive and the nonce is recorded once the body is
/// complete; a body still arriving when the signature's window closes is refused `expired`
/// (the cache would keep its nonce no longer than that window), and so is a request whose
/// replay cache (Redis) answers only after the window closed (the write may have run after the
/// first copy's nonce expired). The layer has no timer of its own (it runs under any
/// executor): a client sending slowly is bounded by the server's timeouts. Request trailers
/// are not handed on (no signature covers them).
///
/// The signature covers the path as the client sent it. In axum, `Router::nest` and
/// `nest_service` strip the prefix before the nested router's layers run; with the feature
/// `axum` the layer checks the signature against the URI the outermost `Router` received
/// (axum's `OriginalUri` extension, set on the server from the request itself) and hands the
/// request on with the stripped URI, so it may be mounted inside a nest (without the feature a
/// nested layer refuses every request `bad_signature`). Under tonic,
/// `Server::builder().layer(..)` covers every service of that server
/// (`examples/tonic_verify.rs`); with the feature `tonic`, [`VerifyService`] is a
/// `NamedService` and `add_service(layer.layer(svc))` protects that one service.
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
///
/// use bytes::Bytes;
/// use countersign::clock::{Clock as _, SystemClock};
/// use countersign::layer::{VerifiedIdentity, VerifyLayer};
/// use countersign::replay::MemoryReplayCache;
/// use countersign::{
///     Identity, Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier,
/// };
/// use http::{Request, Response, StatusCode};
/// use http_body_util::{BodyExt as _, Full};
/// use tower::{ServiceBuilder, ServiceExt as _};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), countersign::layer::BoxError> {
/// let keyring = KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32])?)?);
/// let verifier = Verifier::new(keyring.clone(), Policy::default());
/// let replay = Arc::new(MemoryReplayCache::new(100_000));
/// let api = ServiceBuilder::new()
///     .layer(VerifyLayer::new(verifier, replay).body_limit(64 * 1024))
///     .service_fn(|request: Request<Full<Bytes>>| async move {
///         // Only verified requests get here, with the signer's identity.
///         let identity = request.extensions().get::<VerifiedIdentity>();
///         let user = identity.and_then(|identity| identity.user.as_deref()).unwrap_or("");
///         Ok::<_, Infallible>(Response::new(Full::new(Bytes::copy_from_slice(user.as_bytes()))))
///     });
///
/// // A signed request, as the proxy or a `SignLayer` sends it.
/// let body = Bytes::from_static(b"{\"item\":1}");
/// let (mut parts, ()) = Request::post("http://api.internal/orders").body(())?.into_parts();
/// let signer = Signer::new(keyring, SignerConfig::default());
/// let alice = Identity::new("alice", ["admin"]);
/// let now = SystemClock.now_unix();
/// signer.sign(&mut parts, &body, Some(&alice), now, &Nonce::random())?;
/// let signed = Request::from_parts(parts, Full::new(body));
/// let response = api.clone().oneshot(signed.clone()).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// assert_eq!(response.into_body().collect().await?.to_bytes(), "alice");
///
/// // The same request again, and one without a signature.
/// let response = api.clone().oneshot(signed).await?;
/// assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
/// let answer = response.into_body().collect().await?.to_bytes();
/// assert_eq!(answer, r#"{"error":"replayed"}"#);
/// let unsigned = Request::get("http://api.internal/orders").body(Full::new(Bytes::new()))?;
/// let answer = api.oneshot(unsigned).await?.into_body().collect().await?.to_bytes();
/// assert_eq!(answer, r#"{"error":"missing_signature"}"#);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct VerifyLayer {
    settings: Arc<Settings>,
}

impl VerifyLayer {
    /// A layer verifying with `verifier` and recording nonces in `replay`. Body limit 1 MiB,
    /// system clock.
    pub fn new(verifier: Verifier, replay: Arc<dyn ReplayCache>) -> Self {
        let accept_signature = accept_signature(verifier.policy());
        VerifyLayer {
            settings: Arc::new(Settings {
                verifier,
                replay,
                body_limit: DEFAULT_BODY_LIMIT,
                max_body_memory: DEFAULT_MAX_BODY_MEMORY,
                body_memory: Arc::new(BodyMemory::new(
                    DEFAULT_MAX_BODY_MEMORY.max(DEFAULT_BODY_LIMIT),
                    MAX_BODY_MEMORY_SETTING,
                )),
                clock: Arc::new(SystemClock),
                accept_signature,
            }),
        }
    }

    /// The largest body accepted, in bytes.
    #[must_use]
    pub fn body_limit(self, limit: usize) -> Self {
        self.with(|settings| settings.body_limit = limit)
    }

    /// The most memory the bodies this layer holds may take together, in bytes: default
    /// [`DEFAULT_MAX_BODY_MEMORY`] (64 MiB), and never below [`body_limit`](Self::body_limit),
    /// so that one body of the largest size accepted can always be read.
    ///
    /// A request's body takes its share once its signature headers have checked out (a
    /// forged request costs none): its whole `Content-Length` before any byte is read, a
    /// body without one frame by frame as it arrives. A body that does not fit beside the
    /// others is refused 503 `body_memory_limit` with `Retry-After: 1` (gRPC: 14
    /// `UNAVAILABLE`), before it is read when its `Content-Length` says so; nothing is
    /// recorded for it, so the same signed request passes once memory is free. The share is
    /// given back when the inner service's response future completes (the layer's future
    /// returns the response), or when the request is refused or dropped before that: the
    /// handler has the body until then. What a handler keeps past its future (a response
    /// body holding the request's bytes, a spawned task) is not counted.
    ///
    /// Every clone of the layer, and every service those make, draws on one budget (a
    /// builder call starts a new one). It is one pool for everyone: it bounds the process's
    /// memory, not each client's part of it (see README, "Memory for bodies").
    #[must_use]
    pub fn max_body_memory(self, bytes: usize) -> Self {
        self.with(|settings| settings.max_body_memory = bytes)
    }

    /// What the bodies held under [`max_body_memory`](Self::max_body_memory) take now, the cap
    /// in force, and how many bodies it refused (503 `body_memory_limit`) so far: one budget
    /// for this layer, its clones and every service they made, so a clone kept beside the
    /// server reads them all (for a metrics gauge; the refusals are also the warning's).
    pub fn body_memory_usage(&self) -> BodyMemoryUsage {
        self.settings.body_memory.usage()
    }

    /// The clock the signature times are checked against.
    #[must_use]
    pub fn clock(self, clock: SharedClock) -> Self {
        self.with(|settings| settings.clock = clock)
    }

    /// Applies a builder call. The body memory budget is made anew for the settings that
    /// result: its limit follows `body_limit` and `max_body_memory`, and a layer derived
    /// from another by a builder call must not draw on (or change the limit of) the other's.
    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        let settings = Arc::make_mut(&mut self.settings);
        change(settings);
        settings.body_memory = Arc::new(BodyMemory::new(
            settings.max_body_memory.max(settings.body_limit),
            MAX_BODY_MEMORY_SETTING,
        ));
        self
    }
}

impl fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("policy", self.settings.verifier.policy())
            .field("body_limit", &self.settings.body_limit)
            .field("body_memory", &self.settings.body_memory)
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

impl<S> VerifyService<S> {
    /// [`VerifyLayer::body_memory_usage`]: the budget this service shares with its layer.
    pub fn body_memory_usage(&self) -> BodyMemoryUsage {
        self.settings.body_memory.usage()
    }
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
            share: None,
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
        // The body's share of `max_body_memory` once it is read whole (while it is read, the
        // reader holds it): kept through the nonce check and the inner service's future, given
        // back when that completes or this future is dropped.
        share: Option<OwnedBodyShare>,
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
        // Headers and MAC passed; the body is being read within the limit. Boxed: the pending
        // request is far larger than the other states, and the whole future is moved several
        // times per request (into hyper's dispatcher, its adapters); boxed, a bodiless request
        // moves a small future, and a request with a body pays one allocation.
        ReadingBody {
            #[pin]
            read: ReadBody<Metered<B, OwnedBodyShare>>,
            pending: Option<Box<BodyPending<S>>>,
        },
        // Verified; an asynchronous replay cache is recording the nonce (boxed for the same
        // reason; this path already allocates the cache's future).
        Recording {
            record: ReplayFuture<'static, Result<ReplayOutcome, ReplayError>>,
            pending: Option<(S, Box<Accepted>)>,
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
    /// A clone of the inner service, not polled ready: the instance `poll_ready` readied was
    /// dropped when the body's reading began, and this one is polled ready once the request
    /// is accepted. An inner service whose readiness is a reservation (tower's
    /// `ConcurrencyLimit`, `Buffer`, a rate limit) would otherwise be held by a client that
    /// sends its body slowly, for as long as the body takes, and a few such clients would
    /// stall every other request, bodiless ones included.
    inner: S,
    /// The body once read whole, while the inner service is polled ready.
    body: Option<Bytes>,
    parts: Parts,
    headers_verified: HeadersVerified,
    /// The clock reading the headers were checked at; read again only if the body made the
    /// request wait.
    now: u64,
    waited: bool,
}

/// A fully verified request, waiting only for its nonce to be recorded.
struct Accepted {
    /// For the `Accept-Signature` of a `replayed` answer, and the clock read when the cache
    /// answers.
    settings: Arc<Settings>,
    parts: Parts,
    body: Bytes,
    identity: VerifiedIdentity,
    /// The end of the signature's window, which the nonce is recorded until: a `Fresh` answer
    /// arriving at or after it is refused (see [`Accepted::recorded`]).
    replay_until: u64,
}

impl Accepted {
    fn into_request(self) -> Request<Full<Bytes>> {
        accepted_request(self.parts, self.body, self.identity)
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
            Ok(ReplayOutcome::Fresh) => {
                // The cache may answer long after it was asked (a Redis paused or slow, within
                // an `op_timeout` longer than what was left of the window). The nonce is kept
                // only until `replay_until`, and so was the first copy's: a write that ran
                // after the window closed may have found that key already expired and answered
                // `Fresh` for a replay. No clock within the skew accepts the signature any
                // more, so the answer is refused `expired`, as a body completed after the
                // window is (tests/layer_replay_late_answer.rs). A `Replayed` or an error needs
                // no such check: it refuses the request already.
                let now = self.settings.clock.now_unix();
                if now >= self.replay_until {
                    let detail = format!(
                        "the signature's window closed (at {}) before the replay cache answered \
                         (now {now})",
                        self.replay_until
                    );
                    let error = VerifyError::new(Reason::Expired, detail);
                    return Err(reject(&self.settings, &self.parts, error));
                }
                Ok(self.into_request())
            }
            Ok(ReplayOutcome::Replayed) => Err(reject(&self.settings, &self.parts, replayed())),
            Err(error) => Err(reject(&self.settings, &self.parts, error.into())),
        }
    }
}

/// The request handed to the inner service: the exact body and the verified identity.
fn accepted_request(parts: Parts, body: Bytes, identity: VerifiedIdentity) -> Request<Full<Bytes>> {
    let mut request = Request::from_parts(parts, Full::new(body));
    request.extensions_mut().insert(identity);
    request
}

/// Where a request stands once its body is known.
enum Settled {
    Rejected(Response<Full<Bytes>>),
    Accepted(Request<Full<Bytes>>),
    Recording(
        ReplayFuture<'static, Result<ReplayOutcome, ReplayError>>,
        Box<Accepted>,
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
    #[cfg_attr(not(feature = "axum"), allow(unused_mut))]
    let (mut parts, body) = request.into_parts();

    // Inside axum's `Router::nest` / `nest_service` the URI has lost its prefix: the signature
    // is checked against the URI the outer router received (its `OriginalUri`), then the
    // request goes on with the URI the nested router routes by. Outside a nest the two are
    // equal and nothing is swapped.
    #[cfg(feature = "axum")]
    let routed_uri = super::axum::original_uri(&parts)
        .map(|original| std::mem::replace(&mut parts.uri, original));

    // (a) Headers and MAC, before any body byte is read. The nonce is recorded last, after
    // the MAC (and a body's digest): the cache starts loading its slot as soon as the
    // signature's times check out, so that memory load overlaps the MAC and digest.
    let now = settings.clock.now_unix();
    let replay = &settings.replay;
    let verified = settings
        .verifier
        .verify_headers_hinting(&parts, now, |nonce| replay.prefetch(nonce));
    let headers_verified = match verified {
        Ok(verified) => verified,
        // Logged with the path that was checked.
        Err(error) => return State::rejected(reject(settings, &parts, error)),
    };
    #[cfg(feature = "axum")]
    if let Some(routed_uri) = routed_uri {
        parts.uri = routed_uri;
    }

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
        // (b') The body's share of `max_body_memory`, taken only now that the signature checked
        // out: a declared length whole, before any byte is read (refused at once when it does
        // not fit), a body without one frame by frame as `Metered` hands it to the reader.
        let mut share = settings.body_memory.owned_share();
        if let Some(length) = announced {
            // Within `limit` (checked above), so it fits a usize.
            let length = usize::try_from(length).unwrap_or(limit);
            if !share.cover(length) {
                return State::rejected(out_of_body_memory(
                    settings,
                    &parts,
                    format!("Content-Length {length} does not fit beside the bodies held"),
                ));
            }
        }
        // The readied instance is let go (its reservation with it) while the body arrives.
        let unready = take_ready(inner).clone();
        return State::ReadingBody {
            read: ReadBody::new(Metered::new(body, share, limit), limit),
            pending: Some(Box::new(BodyPending {
                settings: Arc::clone(settings),
                inner: unready,
                parts,
                headers_verified,
                now,
                waited: false,
                body: None,
            })),
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
    settings: &Arc<Settings>,
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
        Err(error) => return Settled::Rejected(reject(settings, &parts, error)),
    };
    // The headers were checked when they arrived; `now` is read again once a body made the
    // request wait. A signature whose window closed meanwhile is refused: the cache keeps a
    // nonce only until `replay_until`, so one recorded later would be forgotten at once, and
    // a second copy of the request, started within the window and finished after it, would
    // be accepted too (tests/layer_slow_body.rs).
    if now >= replay_until {
        let detail = format!(
            "the signature's window closed (at {replay_until}) before its body was complete \
             (now {now})"
        );
        return Settled::Rejected(reject(
            settings,
            &parts,
            VerifyError::new(Reason::Expired, detail),
        ));
    }
    let (user, roles) = match identity {
        Some(identity) => (Some(identity.user), identity.roles),
        None => (None, Vec::new()),
    };
    let identity = VerifiedIdentity { user, roles, keyid };
    // (d) Only now, for a fully verified request, the nonce: answered at once by an
    // in-process cache, else asynchronously.
    if let Some(nonce) = nonce {
        match settings
            .replay
            .try_check_and_record_now(&nonce, replay_until, now)
        {
            Some(Ok(ReplayOutcome::Fresh)) => {}
            Some(Ok(ReplayOutcome::Replayed)) => {
                return Settled::Rejected(reject(settings, &parts, replayed()));
            }
            Some(Err(error)) => return Settled::Rejected(reject(settings, &parts, error.into())),
            None => {
                let replay = Arc::clone(&settings.replay);
                let record =
                    Box::pin(
                        async move { replay.check_and_record(&nonce, replay_until, now).await },
                    );
                let accepted = Accepted {
                    settings: Arc::clone(settings),
                    parts,
                    body,
                    identity,
                    replay_until,
                };
                return Settled::Recording(record, Box::new(accepted));
            }
        }
    }
    // (e) Built straight into the request handed on (no intermediate `Accepted` to move).
    Settled::Accepted(accepted_request(parts, body, identity))
}

/// The rejection of a nonce the cache has seen.
fn replayed() -> VerifyError {
    VerifyError::new(Reason::Replayed, "nonce seen before")
}

impl<S, B, ResBody> Future for VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Either<ResBody, Full<Bytes>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut state, share) = (this.state, this.share);
        loop {
            let next = match state.as_mut().project() {
                StateProj::Inner { future } => {
                    let result = ready!(future.poll(cx));
                    // The handler is done with the body: its memory is free for others now,
                    // not only when the caller drops this future.
                    *share = None;
                    return Poll::Ready(result.map(|response| response.map(Either::Left)));
                }
                StateProj::Rejected { response } => {
                    *share = None;
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response.map(Either::Right))),
                        // Polled again after completion: like a fused future, never ready.
                        None => Poll::Pending,
                    };
                }
                StateProj::ReadingBody { mut read, pending } => {
                    let Some(waiting) = pending.as_mut() else {
                        return Poll::Pending;
                    };
                    if waiting.body.is_none() {
                        let Poll::Ready(body) = read.as_mut().poll(cx) else {
                            waiting.waited = true;
                            return Poll::Pending;
                        };
                        // What the body took stays taken while it is held (the wait for the
                        // inner service, the nonce, the handler): moved out of the reader,
                        // which this state drops.
                        *share = Some(read.as_mut().body_mut().share_mut().split_off());
                        match body_bytes(body, &waiting.settings, &waiting.parts) {
                            Ok(body) => waiting.body = Some(body),
                            Err(response) => {
                                state.set(State::rejected(response));
                                continue;
                            }
                        }
                    }
                    // The body is complete: only now the inner service's readiness (see
                    // `BodyPending::inner`). A wait for it is a wait like the body's.
                    match waiting.inner.poll_ready(cx) {
                        Poll::Pending => {
                            waiting.waited = true;
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let Some(pending) = pending.take() else {
                        return Poll::Pending;
                    };
                    let BodyPending {
                        settings,
                        mut inner,
                        parts,
                        headers_verified,
                        now,
                        waited,
                        body,
                    } = *pending;
                    let body = body.unwrap_or_default();
                    // Time passed while the body arrived: read the clock again. A body
                    // that was already there (the usual small one) took no time.
                    let now = if waited {
                        settings.clock.now_unix()
                    } else {
                        now
                    };
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
fn body_bytes(
    body: Result<Bytes, ReadBodyError>,
    settings: &Settings,
    parts: &Parts,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let limit = settings.body_limit;
    match body {
        Ok(body) => Ok(body),
        Err(ReadBodyError::TooLarge) => Err(too_large(
            parts,
            format!("body exceeds the limit of {limit} bytes"),
        )),
        // `Metered` found no room for the bytes that arrived.
        Err(ReadBodyError::Body(error)) if error.is::<OutOfBodyMemory>() => {
            Err(out_of_body_memory(
                settings,
                parts,
                "body does not fit beside the bodies held".into(),
            ))
        }
        // A limit in front of the layer (`http_body_util::Limited`, which tower-http's
        // `RequestBodyLimitLayer` uses) ends a body past it with this error: the body is too
        // large, it did not fail to arrive (axum answers it 413 too).
        Err(ReadBodyError::Body(error)) if exceeds_a_limit(&*error) => Err(too_large(
            parts,
            format!("body refused by a length limit in front of the layer: {error}"),
        )),
        Err(ReadBodyError::Body(error)) => {
            let (method, path) = (&parts.method, parts.uri.path());
            tracing::debug!(%error, %method, path, "signed request rejected: body read failed");
            Err(body_read_failed(&parts.headers))
        }
    }
}

/// Whether a body error is, or was caused by, `http_body_util`'s `LengthLimitError` (read on the
/// rejection path only).
fn exceeds_a_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Seconds between two warnings of one paced kind (process-wide).
const PACED_LOG_INTERVAL_SECS: u64 = 10;

/// A warning anyone who can reach the API can trigger (a made-up keyid, a made-up `created`):
/// logged at most once per [`PACED_LOG_INTERVAL_SECS`], with the count of those not logged.
/// Also paces the proxy's warning about upstream answers cut mid-body.
pub(crate) struct PacedLog {
    /// Unix second of the last warning (0: none yet).
    logged_at: AtomicU64,
    /// Rejections not warned about since the last warning.
    suppressed: AtomicU64,
}

impl PacedLog {
    pub(crate) const fn new() -> Self {
        PacedLog {
            logged_at: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this rejection gets the warning line: `Some(rejections not logged since the
    /// last one)`, else `None` (and it is counted). Wall-clock seconds: this only paces a log
    /// line. The distance counts in both directions, so a clock stepped back does not silence
    /// the warning until it has caught up again.
    pub(crate) fn turn(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now.abs_diff(last) >= PACED_LOG_INTERVAL_SECS;
        if due
            && self
                .logged_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `unknown_key` warnings.
static UNKNOWN_KEY_LOG: PacedLog = PacedLog::new();

/// `expired` / `not_yet_valid` warnings.
static CLOCK_LOG: PacedLog = PacedLog::new();

/// The 503 `body_memory_limit` rejection (`Retry-After: 1`). The cap's own paced warning
/// tells the operator; this line is the request's, at debug like other refusals.
fn out_of_body_memory(settings: &Settings, parts: &Parts, detail: String) -> Response<Full<Bytes>> {
    reject(
        settings,
        parts,
        VerifyError::new(Reason::BodyMemoryLimit, detail),
    )
}

/// The 413 rejection.
fn too_large(parts: &Parts, detail: String) -> Response<Full<Bytes>> {
    log_rejection(parts, &VerifyError::new(Reason::BodyTooLarge, detail));
    rejection_for(&parts.headers, Reason::BodyTooLarge)
}

/// Logs a rejection (reason and detail, never secrets) and builds its response: JSON, or the
/// gRPC form for a gRPC call (the request's `content-type` is read here, on rejection only).
/// An HTTP 401 carries `WWW-Authenticate` ([`rejection`](super::rejection)) and the layer's
/// `Accept-Signature`.
fn reject(settings: &Settings, parts: &Parts, error: VerifyError) -> Response<Full<Bytes>> {
    let reason = error.reason();
    log_rejection(parts, &error);
    let mut response = rejection_for(&parts.headers, reason);
    if response.status() == StatusCode::UNAUTHORIZED {
        if let Some(accept) = &settings.accept_signature {
            response
                .headers_mut()
                .insert(HeaderName::from_static(ACCEPT_SIGNATURE), accept.clone());
        }
    }
    response
}

/// The log line of a rejection, at the level its reason calls for.
fn log_rejection(parts: &Parts, error: &VerifyError) {
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
        // A keyid this keyring does not accept (the detail names it): a key rotation done in
        // the wrong order (signers switched before the verifiers loaded the key), a retired
        // key still signing, or mismatched `rotation` settings. Every request then fails, and
        // without this line the operator would see only 401s (docs/OPERATIONS.md). But anyone
        // who can reach the API can send a made-up keyid, so it is a warning at most once per
        // [`PACED_LOG_INTERVAL_SECS`] (with the count of those not logged), not a line
        // per request.
        Reason::UnknownKey => match UNKNOWN_KEY_LOG.turn() {
            Some(suppressed) => tracing::warn!(
                %reason,
                detail,
                %method,
                path,
                suppressed,
                "signed request rejected: the keyring does not accept this keyid (key rotation \
                 out of order?); further ones are logged at most every 10 s, `suppressed` \
                 counts those since the last line"
            ),
            None => tracing::debug!(%reason, detail, %method, path, "signed request rejected"),
        },
        // A signature outside the time window: a capture sent late, or clocks apart. When the
        // signer's and this host's clocks differ by more than the skew (an NTP step, a VM
        // resumed from suspend), every request fails this way, `expired` when this clock is
        // ahead, `not_yet_valid` when it is behind (docs/OPERATIONS.md, Clocks): the operator
        // must hear of it. Anyone can send a made-up `created` (the time is checked before the
        // MAC), so paced like `unknown_key`.
        Reason::Expired | Reason::NotYetValid => match CLOCK_LOG.turn() {
            Some(suppressed) => tracing::warn!(
                %reason,
                detail,
                %method,
                path,
                suppressed,
                "signed request rejected: its time is outside the window (is this host's clock \
                 apart from the signer's by more than the skew?); further ones are logged at \
                 most every 10 s, `suppressed` counts those since the last line"
            ),
            None => tracing::debug!(%reason, detail, %method, path, "signed request rejected"),
        },
        _ => tracing::debug!(%reason, detail, %method, path, "signed request rejected"),
    }
}

/// The most a [`ReadBody`] allocates ahead of the bytes that arrived: the default body limit,
/// so under it a body of announced length is read into one allocation, as before.
const PREALLOCATE_MAX: usize = DEFAULT_BODY_LIMIT;

pin_project! {
    /// Reads a body into one [`Bytes`], refusing it once more than `limit` bytes arrived: the
    /// bounded read [`VerifyLayer`] does before checking a digest (trailers are dropped).
    ///
    /// Why not `http_body_util`'s `Limited` + `collect`: for the common body that arrives in one
    /// frame (a small request with `Content-Length`), this hands on that frame's bytes as they
    /// are, where `collect` first queues them in a freshly allocated list; more frames are
    /// copied into one buffer, as `collect` would.
    pub struct ReadBody<B> {
        #[pin]
        body: B,
        limit: usize,
        received: usize,
        first: Option<Bytes>,
        more: Option<BytesMut>,
    }
}

impl<B> ReadBody<B> {
    /// Reads `body`, at most `limit` bytes.
    pub fn new(body: B, limit: usize) -> Self {
        ReadBody {
            body,
            limit,
            received: 0,
            first: None,
            more: None,
        }
    }
}

impl<B> ReadBody<B> {
    /// The body being read (the layer takes its memory share from it once it is read).
    pub(crate) fn body_mut(self: Pin<&mut Self>) -> Pin<&mut B> {
        self.project().body
    }
}

impl<B> fmt::Debug for ReadBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBody")
            .field("limit", &self.limit)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// Why a [`ReadBody`] failed.
#[derive(Debug)]
pub enum ReadBodyError {
    /// More than the limit arrived (what arrived is dropped).
    TooLarge,
    /// The body itself failed (a broken connection or framing).
    Body(BoxError),
}

impl fmt::Display for ReadBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadBodyError::TooLarge => f.write_str("body exceeds the limit"),
            ReadBodyError::Body(error) => write!(f, "body read failed: {error}"),
        }
    }
}

impl std::error::Error for ReadBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadBodyError::TooLarge => None,
            ReadBodyError::Body(error) => Some(error.as_ref()),
        }
    }
}

impl<B> Future for ReadBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Bytes, ReadBodyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(frame) = ready!(this.body.as_mut().poll_frame(cx)) else {
                let body = match (this.first.take(), this.more.take()) {
                    (_, Some(more)) => more.freeze(),
                    (Some(first), None) => first,
                    (None, None) => Bytes::new(),
                };
                return Poll::Ready(Ok(body));
            };
            let frame = frame.map_err(|error| ReadBodyError::Body(error.into()))?;
            let Ok(mut data) = frame.into_data() else {
                // Trailers: not part of the content, nothing a digest covers.
                continue;
            };
            let length = data.remaining();
            // Checked before anything is kept: a body over the limit is never buffered whole.
            if length > *this.limit - *this.received {
                return Poll::Ready(Err(ReadBodyError::TooLarge));
            }
            *this.received += length;
            if length == 0 {
                continue;
            }
            match (this.first.take(), this.more.as_mut()) {
                // The first bytes: kept as they are (no copy for a `Bytes` frame).
                (None, None) => *this.first = Some(data.copy_to_bytes(length)),
                // A second frame: from now on one growing buffer.
                (Some(first), None) => {
                    let hint = usize::try_from(this.body.size_hint().lower()).unwrap_or(0);
                    // What the body announces (its `Content-Length`, which no signature
                    // covers) is trusted for at most `PREALLOCATE_MAX` bytes: beyond that the
                    // buffer grows with the bytes that arrive. Sized by the announcement alone,
                    // a body announcing `u64::MAX / 2` under `body_limit(usize::MAX)` aborted the
                    // process on the allocation (tests/layer_body_limit.rs). Saturating: a body
                    // may raise its hint after the first frame.
                    let capacity = this
                        .received
                        .saturating_add(hint.min(PREALLOCATE_MAX))
                        .min(*this.limit);
                    let mut more = BytesMut::with_capacity(capacity);
                    more.put(first);
                    more.put(data);
                    *this.more = Some(more);
                }
                (_, Some(more)) => more.put(data),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    use http_body::Frame;
    use http_body_util::BodyExt as _;

    #[test]
    fn has_role_is_an_exact_match_and_false_without_a_user() {
        let identity = VerifiedIdentity {
            user: Some("alice".into()),
            roles: vec!["admin".into(), "billing".into()],
            keyid: "k1".into(),
        };
        assert!(identity.has_role("admin") && identity.has_role("billing"));
        for other in ["Admin", "adm", "admin ", "", "billing,admin"] {
            assert!(!identity.has_role(other), "{other:?}");
        }
        let service = VerifiedIdentity {
            user: None,
            roles: Vec::new(),
            keyid: "k1".into(),
        };
        assert!(!service.has_role("admin"));
    }

    /// Frames handed out one per poll, then the end.
    struct Frames(VecDeque<Result<Frame<Bytes>, &'static str>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|frame| frame.map_err(Into::into)))
        }
    }

    fn data(chunks: &[&'static [u8]]) -> Frames {
        Frames(
            chunks
                .iter()
                .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk))))
                .collect(),
        )
    }

    #[tokio::test]
    async fn one_frame_is_handed_on_without_a_copy() {
        let frame = Bytes::from_static(b"0123456789");
        let body = Frames(VecDeque::from([Ok(Frame::data(frame.clone()))]));
        let read = ReadBody::new(body, 10).await.unwrap();
        assert_eq!(read, frame);
        assert_eq!(read.as_ptr(), frame.as_ptr());
    }

    #[tokio::test]
    async fn frames_are_joined_up_to_exactly_the_limit() {
        let read = ReadBody::new(data(&[b"abc", b"", b"defg", b"hij"]), 10)
            .await
            .unwrap();
        assert_eq!(read.as_ref(), b"abcdefghij");
        assert_eq!(ReadBody::new(data(&[]), 0).await.unwrap(), Bytes::new());
        assert_eq!(
            ReadBody::new(data(&[b"", b""]), 0).await.unwrap(),
            Bytes::new()
        );
    }

    #[tokio::test]
    async fn one_byte_over_the_limit_is_too_large() {
        let whole: &[&'static [u8]] = &[b"abcdefghijk"];
        let split: &[&'static [u8]] = &[b"abcdef", b"ghijk"];
        for chunks in [whole, split] {
            let error = ReadBody::new(data(chunks), 10).await.unwrap_err();
            assert!(matches!(error, ReadBodyError::TooLarge), "{error}");
        }
        let error = ReadBody::new(data(&[b"a"]), 0).await.unwrap_err();
        assert!(matches!(error, ReadBodyError::TooLarge));
    }

    #[tokio::test]
    async fn trailers_are_dropped_and_a_body_error_is_reported() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        let body = Frames(VecDeque::from([
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers)),
        ]));
        assert_eq!(ReadBody::new(body, 2).await.unwrap().as_ref(), b"ab");
        let body = Frames(VecDeque::from([
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("connection reset"),
        ]));
        let error = ReadBody::new(body, 100).await.unwrap_err();
        assert!(matches!(error, ReadBodyError::Body(_)));
        assert_eq!(error.to_string(), "body read failed: connection reset");
    }

    /// An inner service answering at once (the common handler shape).
    #[derive(Clone)]
    struct Answering;

    impl Service<Request<Full<Bytes>>> for Answering {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, std::convert::Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request<Full<Bytes>>) -> Self::Future {
            std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
        }
    }

    #[test]
    fn the_future_stays_small_when_the_request_is_large() {
        // The future is moved several times per request (into hyper's dispatcher and its
        // adapters): the pending request (parts, verified headers: over 500 bytes) is boxed,
        // so the future is the size of a response, not of a request (it was 640 bytes).
        let future = std::mem::size_of::<VerifyFuture<Answering, Full<Bytes>>>();
        let response = std::mem::size_of::<Response<Full<Bytes>>>();
        let pending = std::mem::size_of::<BodyPending<Answering>>();
        assert!(pending > 2 * response, "{pending}");
        assert!(future <= response + 32, "VerifyFuture is {future} bytes");
    }

    #[tokio::test]
    async fn reads_what_collect_reads() {
        let chunks: [&'static [u8]; 3] = [b"{\"a\":", b"1", b"}"];
        let collected = data(&chunks).collect().await.unwrap().to_bytes();
        assert_eq!(ReadBody::new(data(&chunks), 64).await.unwrap(), collected);
    }

    /// The one key ("k1") the body-memory tests sign and verify with.
    fn test_keyring() -> crate::KeyringHandle {
        crate::Keyring::single("k1", crate::Secret::new(vec![3; 32]).unwrap())
            .unwrap()
            .into()
    }

    /// A layer with `body_limit` 100 and a cap of 150 at a fixed clock, its budget, and the
    /// gate its inner service's future waits on.
    fn gated_layer() -> (
        VerifyService<Gated>,
        Arc<BodyMemory>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let keyring = test_keyring();
        let layer = VerifyLayer::new(
            Verifier::new(keyring, crate::Policy::default()),
            Arc::new(crate::replay::MemoryReplayCache::new(10)),
        )
        .body_limit(100)
        .max_body_memory(150)
        .clock(Arc::new(crate::clock::ManualClock::new(NOW)));
        let memory = Arc::clone(&layer.settings.body_memory);
        let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (layer.layer(Gated(Arc::clone(&gate))), memory, gate)
    }

    const NOW: u64 = 1_700_000_000;

    /// A POST signed over `signed`, carrying `sent` (with its `Content-Length` if `declared`).
    fn post(signed: &[u8], sent: &'static [u8], declared: bool) -> Request<Full<Bytes>> {
        let keyring = test_keyring();
        let mut builder = Request::post("http://api.internal/upload");
        if declared {
            builder = builder.header("content-length", sent.len());
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        crate::Signer::new(keyring, crate::SignerConfig::default())
            .sign(&mut parts, signed, None, NOW, &crate::Nonce::random())
            .unwrap();
        Request::from_parts(parts, Full::new(Bytes::from_static(sent)))
    }

    /// An inner service whose future is ready once its gate is open.
    #[derive(Clone)]
    struct Gated(Arc<std::sync::atomic::AtomicBool>);

    impl Service<Request<Full<Bytes>>> for Gated {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future =
            Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, std::convert::Infallible>>>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request<Full<Bytes>>) -> Self::Future {
            let gate = Arc::clone(&self.0);
            Box::pin(std::future::poll_fn(move |_cx| {
                if gate.load(Ordering::SeqCst) {
                    Poll::Ready(Ok(Response::new(Full::new(Bytes::new()))))
                } else {
                    Poll::Pending
                }
            }))
        }
    }

    /// The body's share is held while the inner service's future runs (the handler has the
    /// body) and given back the moment that future completes, before the layer's own future is
    /// dropped; with or without a declared `Content-Length`.
    #[test]
    fn the_share_is_given_back_when_the_inner_future_completes() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for declared in [true, false] {
            let (mut service, memory, gate) = gated_layer();
            gate.store(false, Ordering::SeqCst);
            let mut future =
                std::pin::pin!(service.call(post(b"0123456789", b"0123456789", declared)));
            assert!(future.as_mut().poll(&mut cx).is_pending());
            assert_eq!(memory.held(), 10, "declared: {declared}");
            gate.store(true, Ordering::SeqCst);
            let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut cx) else {
                panic!("not answered");
            };
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(memory.held(), 0, "declared: {declared}");
        }
    }

    /// A body refused once read (its digest does not match) gives its share back with the
    /// refusal; a declared length that does not fit is refused in `call`, taking nothing.
    #[test]
    fn a_refused_body_gives_its_share_back() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (mut service, memory, gate) = gated_layer();
        let mut holder = std::pin::pin!(service.call(post(&[b'a'; 100], &[b'a'; 100], true)));
        assert!(holder.as_mut().poll(&mut cx).is_pending());
        assert_eq!(memory.held(), 100);

        let mut forged = std::pin::pin!(service.call(post(b"0123456789", b"9876543210", false)));
        let Poll::Ready(Ok(response)) = forged.as_mut().poll(&mut cx) else {
            panic!("not answered");
        };
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(memory.held(), 100);

        let mut refused = std::pin::pin!(service.call(post(&[b'b'; 51], &[b'b'; 51], true)));
        let Poll::Ready(Ok(response)) = refused.as_mut().poll(&mut cx) else {
            panic!("not answered");
        };
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(memory.held(), 100);

        gate.store(true, Ordering::SeqCst);
        assert!(holder.as_mut().poll(&mut cx).is_ready());
        assert_eq!(memory.held(), 0);
    }

    /// The cap in force is `max_body_memory`, never below `body_limit` (whatever order they
    /// are set in); clones of a layer and the services they make share one budget, and a
    /// builder call starts a new one.
    #[test]
    fn the_cap_follows_the_builders_and_is_shared_by_clones() {
        let keyring = test_keyring();
        let base = VerifyLayer::new(
            Verifier::new(keyring, crate::Policy::default()),
            Arc::new(crate::replay::MemoryReplayCache::new(10)),
        );
        let limit = |layer: &VerifyLayer| layer.settings.body_memory.limit();
        assert_eq!(limit(&base), DEFAULT_MAX_BODY_MEMORY);
        assert_eq!(limit(&base.clone().body_limit(80 << 20)), 80 << 20);
        assert_eq!(limit(&base.clone().max_body_memory(1).body_limit(100)), 100);
        assert_eq!(limit(&base.clone().body_limit(100).max_body_memory(1)), 100);
        assert_eq!(
            limit(&base.clone().max_body_memory(5000)),
            5000.max(DEFAULT_BODY_LIMIT)
        );
        assert_eq!(
            limit(&base.clone().body_limit(10).max_body_memory(5000)),
            5000
        );

        let layer = base.max_body_memory(1 << 30);
        let clone = layer.clone();
        let service = clone.layer(Answering);
        assert!(Arc::ptr_eq(
            &layer.settings.body_memory,
            &service.settings.body_memory
        ));
        let derived = clone.clock(Arc::new(SystemClock));
        assert!(!Arc::ptr_eq(
            &layer.settings.body_memory,
            &derived.settings.body_memory
        ));
    }

    /// A warning last logged "in the future" (the wall clock has since been stepped back an
    /// hour) is due again at once, not an hour later; within the interval it is paced.
    #[test]
    fn paced_log_is_not_silenced_by_a_clock_stepped_back() {
        let pace = PacedLog::new();
        assert_eq!(pace.turn(), Some(0));
        assert_eq!(pace.turn(), None);
        assert_eq!(pace.turn(), None);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        pace.logged_at.store(now + 3600, Ordering::Relaxed);
        assert_eq!(pace.turn(), Some(2));
        assert_eq!(pace.turn(), None);
    }
}

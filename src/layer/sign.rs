//! The client-side layer: buffer the body, sign the request, send it on.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

use super::{BoxError, ResponseFuture};
use crate::clock::{SharedClock, SystemClock};
use crate::core::{
    EncodedIdentity, Identity, Nonce, RequestView, SignError, Signer, DEFAULT_BODY_LIMIT,
};

/// Signs outgoing requests, for services that call a verifying API directly.
///
/// The body is buffered (up to [`body_limit`](Self::body_limit)) because the signature covers
/// its digest; the inner service receives `Request<Full<Bytes>>`. The identity signed is the one
/// set with [`identity`](Self::identity), else an [`EncodedIdentity`] or an [`Identity`] found
/// in the request extensions (in that order), else none (a service request without user
/// fields). A fixed identity is encoded once, when it is set; a caller that forwards the same
/// identity on many requests can put its `EncodedIdentity` (cheap to clone) in the extensions.
///
/// Failures are **service errors**, not responses: a client must not mistake its own refusal
/// to send for an answer from the server. The error is a [`BoxError`] holding a
/// [`SignLayerError`] (for a body over the limit, an unreadable body, or a signing failure) or
/// the inner service's error.
///
/// The signature covers `@authority`: the request must carry it when it reaches this layer,
/// as an absolute URI (`http://api.internal/orders`) or a `Host` field. A client that adds the
/// authority after the layer (a tonic `Channel`; give the client its origin instead, as
/// `Grpc::with_origin` or a generated `with_origin` does) fails with "request has no Host or
/// :authority". A request with an absolute URI and no `Host` gets a `Host` holding exactly the
/// authority signed, so a client that would add its own spelling (`Host: api` for
/// `http://api:080/`) sends the signed one. Each call is signed with a fresh nonce, so a retry
/// layer belongs outside this one: a request re-sent from inside it would be `replayed`.
///
/// Nothing is sent before the body has ended: a streaming body (a gRPC client stream) is held
/// back until its sender finishes, so an exchange that waits for a reply before it sends more
/// waits for ever (or for the client's timeout), and a stream longer than the limit fails.
/// Request trailers are dropped: the signature does not cover them.
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
///
/// use bytes::Bytes;
/// use countersign::layer::{SignLayer, VerifiedIdentity, VerifyLayer};
/// use countersign::replay::MemoryReplayCache;
/// use countersign::{Identity, Keyring, KeyringHandle, Policy, Secret, Signer, SignerConfig, Verifier};
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{ServiceBuilder, ServiceExt as _};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), countersign::layer::BoxError> {
/// let keyring = KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32])?)?);
/// let signer = Signer::new(keyring.clone(), SignerConfig::default());
/// // In a real client the inner service is an HTTP client (hyper-util's `Client`, a tonic
/// // `Channel`); here it is the verifying API itself.
/// let api = ServiceBuilder::new()
///     .layer(VerifyLayer::new(
///         Verifier::new(keyring, Policy::default()),
///         Arc::new(MemoryReplayCache::new(1000)),
///     ))
///     .service_fn(|request: Request<Full<Bytes>>| async move {
///         let identity = request.extensions().get::<VerifiedIdentity>().cloned();
///         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{identity:?}")))))
///     });
/// let client = ServiceBuilder::new()
///     .layer(SignLayer::new(signer).identity(Identity::new("billing-svc", ["service"])))
///     .service(api);
/// let request = Request::post("http://api.internal/charge?id=7")
///     .body(Full::new(Bytes::from_static(b"{\"cents\":1200}")))?;
/// let response = client.oneshot(request).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SignLayer {
    settings: Arc<Settings>,
}

#[derive(Clone)]
struct Settings {
    signer: Signer,
    identity: Option<EncodedIdentity>,
    body_limit: usize,
    clock: SharedClock,
}

impl SignLayer {
    /// A layer signing with `signer`. Body limit 1 MiB, system clock, identity from the request
    /// extensions.
    pub fn new(signer: Signer) -> Self {
        SignLayer {
            settings: Arc::new(Settings {
                signer,
                identity: None,
                body_limit: DEFAULT_BODY_LIMIT,
                clock: Arc::new(SystemClock),
            }),
        }
    }

    /// Sign every request with this fixed (service) identity, ignoring request extensions.
    #[must_use]
    pub fn identity(mut self, identity: Identity) -> Self {
        Arc::make_mut(&mut self.settings).identity = Some(EncodedIdentity::new(&identity));
        self
    }

    /// The largest body sent, in bytes.
    #[must_use]
    pub fn body_limit(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.settings).body_limit = limit;
        self
    }

    /// The clock that sets `created`.
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        Arc::make_mut(&mut self.settings).clock = clock;
        self
    }
}

impl fmt::Debug for SignLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignLayer")
            .field("signer", &self.settings.signer)
            .field("identity", &self.settings.identity)
            .field("body_limit", &self.settings.body_limit)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for SignLayer {
    type Service = SignService<S>;

    fn layer(&self, inner: S) -> SignService<S> {
        SignService {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service [`SignLayer`] wraps around an inner (client) service.
#[derive(Clone)]
pub struct SignService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for SignService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Why [`SignService`] did not send a request.
#[derive(Debug)]
#[non_exhaustive]
pub enum SignLayerError {
    /// The body is longer than the configured limit.
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body could not be read.
    Body(BoxError),
    /// The request cannot be signed (e.g. an identity or header that cannot be encoded).
    Sign(SignError),
}

impl fmt::Display for SignLayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignLayerError::BodyTooLarge { limit } => {
                write!(f, "request body exceeds the signing limit of {limit} bytes")
            }
            SignLayerError::Body(e) => write!(f, "cannot read request body: {e}"),
            SignLayerError::Sign(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SignLayerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SignLayerError::Body(e) => Some(e.as_ref()),
            SignLayerError::Sign(e) => Some(e),
            SignLayerError::BodyTooLarge { .. } => None,
        }
    }
}

impl<S, B> Service<Request<B>> for SignService<S>
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Response, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = Arc::clone(&self.settings);
        ResponseFuture::new(async move {
            let request = sign(&settings, request).await?;
            inner.call(request).await.map_err(Into::into)
        })
    }
}

async fn sign<B>(settings: &Settings, request: Request<B>) -> Result<Request<Full<Bytes>>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let limit = settings.body_limit;
    if body.size_hint().lower() > limit as u64 {
        return Err(SignLayerError::BodyTooLarge { limit }.into());
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(SignLayerError::BodyTooLarge { limit }.into())
        }
        Err(e) => return Err(SignLayerError::Body(e).into()),
    };
    // Taken out of the extensions (cloned: the request is changed while it is signed) only
    // when no fixed identity overrides them.
    let from_extensions = match settings.identity {
        Some(_) => None,
        None => parts
            .extensions
            .get::<EncodedIdentity>()
            .cloned()
            .or_else(|| parts.extensions.get::<Identity>().map(EncodedIdentity::new)),
    };
    let identity = settings.identity.as_ref().or(from_extensions.as_ref());
    // A Content-Length set by the caller must match the bytes actually sent.
    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts.headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(bytes.len()),
        );
    }
    set_host(&mut parts);
    settings
        .signer
        .sign_encoded(
            &mut parts,
            &bytes,
            identity,
            settings.clock.now_unix(),
            &Nonce::random(),
        )
        .map_err(SignLayerError::Sign)?;
    Ok(Request::from_parts(parts, Full::new(bytes)))
}

/// Without a `Host` header, sets one to exactly the `@authority` signed from the URI.
///
/// A client that adds the missing `Host` itself spells it its own way: hyper-util's writes the
/// port as a number, so `http://api:080/x` (signed as `api:080`) goes out with `Host: api` and
/// `http://api:/x` (signed as `api:`) with `Host: api`, and an HTTP/1.1 verifier, which reads
/// `Host`, answers `bad_signature`. A client keeps a `Host` it is given. Left alone when the
/// authority cannot be built: signing then fails with the reason.
fn set_host(parts: &mut http::request::Parts) {
    if parts.uri.authority().is_none() || parts.headers.contains_key(http::header::HOST) {
        return;
    }
    let Ok(authority) = RequestView::from_parts(parts).authority_value() else {
        return;
    };
    if let Ok(value) = http::HeaderValue::try_from(authority) {
        parts.headers.insert(http::header::HOST, value);
    }
}

//! Tower layers: [`VerifyLayer`] for APIs that accept signed requests, [`SignLayer`] for
//! clients that send them, and (feature `axum`) an extractor for [`VerifiedIdentity`].
//!
//! Neither layer needs a runtime: both only poll the body and the inner service, so they work
//! under any executor (and `cargo build --no-default-features` pulls in no tokio).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The cap on the memory buffered bodies take at once: the layer's `max_body_memory`, and the
/// proxy's `server.max_body_memory` (which re-exports it as `countersign::proxy::body_memory`).
pub(crate) mod body_memory;
mod response;
mod sign;
mod verify;

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "tonic")]
mod tonic;

pub use body_memory::BodyMemoryUsage;
pub use response::{
    accept_signature, challenge, error_response, grpc_error_response, grpc_rejection,
    is_grpc_request, rejection, ACCEPT_SIGNATURE, ACCEPT_SIGNATURE_LABEL, BODY_READ_FAILED,
    BODY_READ_FAILED_GRPC_STATUS, CHALLENGE_SCHEME,
};
pub use sign::{SignLayer, SignLayerError, SignService};
/// The proxy paces its warning about upstream answers cut mid-body with the same helper.
#[cfg(feature = "proxy")]
pub(crate) use verify::PacedLog;
pub use verify::{
    ReadBody, ReadBodyError, VerifiedIdentity, VerifyFuture, VerifyLayer, VerifyService,
    DEFAULT_MAX_BODY_MEMORY,
};

/// A boxed, thread-safe error (the [`SignService`] error type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future [`SignService`] returns ([`VerifyService`] returns a [`VerifyFuture`], which boxes
/// nothing on its fast path).
pub struct ResponseFuture<T, E> {
    inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
}

impl<T, E> ResponseFuture<T, E> {
    fn new(future: impl Future<Output = Result<T, E>> + Send + 'static) -> Self {
        ResponseFuture {
            inner: Box::pin(future),
        }
    }
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().inner.as_mut().poll(cx)
    }
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

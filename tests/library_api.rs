//! The library's public API as a user names it: error types that work with `?`, `Box<dyn
//! Error>` and error reporters (Display, Error, a source where there is a cause), and the types
//! a user writes into a struct field.
//!
//! Run: `cargo test --all-features --test library_api`

use std::error::Error;
use std::sync::Arc;

use bytes::Bytes;
use countersign::core::{BaseError, KeyringError, SignError, VerifyError};
use countersign::layer::{
    ReadBodyError, SignLayer, SignLayerError, SignService, VerifiedIdentity, VerifyFuture,
    VerifyLayer, VerifyService,
};
use countersign::replay::{MemoryReplayCache, ReplayCache, ReplayError};
use countersign::{Keyring, KeyringHandle, Policy, Secret, Signer, SignerConfig, Verifier};
use http::{Request, Response};
use http_body_util::Full;

/// What a user needs of an error type: `?` into `Box<dyn Error + Send + Sync>`, a message.
fn assert_error<E: Error + Send + Sync + 'static>(error: E) -> Box<dyn Error + Send + Sync> {
    assert!(!error.to_string().is_empty());
    Box::new(error)
}

#[test]
fn every_public_error_is_an_error_with_a_message() {
    let keyring_error: KeyringError = Secret::new(vec![1; 3]).unwrap_err();
    let message = assert_error(keyring_error).to_string();
    assert!(message.contains("at least 32"), "{message}");

    let replay_error = ReplayError::new("redis down");
    assert_eq!(
        assert_error(replay_error).to_string(),
        "replay cache unavailable: redis down"
    );

    // A sign error (no authority), a verify error (no signature).
    let keyring =
        KeyringHandle::new(Keyring::single("k1", Secret::new(vec![1; 32]).unwrap()).unwrap());
    let (mut parts, ()) = Request::get("/no-host").body(()).unwrap().into_parts();
    let nonce = countersign::Nonce::random();
    let sign_error: SignError = Signer::new(keyring.clone(), SignerConfig::default())
        .sign(&mut parts, b"", None, 1_700_000_000, &nonce)
        .unwrap_err();
    let message = assert_error(sign_error.clone()).to_string();
    assert!(message.contains("no Host or :authority"), "{message}");
    let layer_error = assert_error(SignLayerError::Sign(sign_error));
    assert!(layer_error.source().is_some());

    let verify_error: VerifyError = Verifier::new(keyring, Policy::default())
        .verify(&parts, b"", 1_700_000_000)
        .unwrap_err();
    assert!(assert_error(verify_error)
        .to_string()
        .starts_with("missing_signature"));

    let base_error: BaseError = countersign::core::ComponentId::parse("\"@status\"").unwrap_err();
    assert_error(base_error);
}

/// A body that failed to arrive keeps its cause: an error reporter walking `source()` shows
/// why (the connection broke), not only that it failed.
#[test]
fn a_body_read_error_keeps_its_cause() {
    let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
    let error = ReadBodyError::Body(Box::new(cause));
    let source = error.source().expect("the cause as source");
    assert_eq!(source.to_string(), "connection reset");
    assert!(ReadBodyError::TooLarge.source().is_none());
    assert_error(ReadBodyError::TooLarge);
}

/// The axum extractor's rejection is an error like axum's own rejections: it can be logged,
/// boxed and matched on by a user's error handling.
#[cfg(feature = "axum")]
#[test]
fn the_extractor_rejection_is_an_error() {
    use countersign::layer::axum::MissingVerifiedIdentity;
    let message = assert_error(MissingVerifiedIdentity).to_string();
    assert!(message.contains("VerifyLayer"), "{message}");
}

type Handler = fn(
    Request<Full<Bytes>>,
) -> std::future::Ready<Result<Response<Full<Bytes>>, std::convert::Infallible>>;

/// The types a user keeps in a struct field (an app state, a client wrapper) can be named.
#[allow(dead_code)]
struct AppParts {
    layer: VerifyLayer,
    service: VerifyService<tower::util::ServiceFn<Handler>>,
    future: Option<VerifyFuture<tower::util::ServiceFn<Handler>, Full<Bytes>>>,
    signing: SignService<tower::util::ServiceFn<Handler>>,
    sign_layer: SignLayer,
    replay: Arc<dyn ReplayCache>,
    identity: VerifiedIdentity,
}

#[test]
fn layer_types_are_nameable_and_thread_safe() {
    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync_clone::<VerifyLayer>();
    assert_send_sync_clone::<SignLayer>();
    assert_send_sync_clone::<VerifiedIdentity>();
    assert_send_sync_clone::<VerifyService<tower::util::ServiceFn<Handler>>>();
    let replay: Arc<dyn ReplayCache> = Arc::new(MemoryReplayCache::new(10));
    let _ = replay;
}

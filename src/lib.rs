//! countersign: RFC 9421 HMAC request signing for a backend-for-frontend proxy and the APIs
//! behind it.
//!
//! - [`core`]: the pure signing core (signature base, Content-Digest, keys, the profile).
//! - [`replay`]: replay caches (in memory; Redis with the `redis` feature).
//! - [`layer`]: tower layers: [`layer::VerifyLayer`] for APIs, [`layer::SignLayer`] for clients.
//!
//! A backend that verifies: `default-features = false`, plus `axum` for the
//! [`layer::VerifiedIdentity`] extractor and a layer that also works inside `Router::nest`,
//! `tonic` to protect single gRPC services (`NamedService` for [`layer::VerifyService`]), and
//! `keyfile` to read the proxy's keyring file. Whole servers in `examples/`:
//! `axum_verify.rs`, `hyper_verify.rs`, `tonic_verify.rs`.
//!
//! Dependencies point one way: core ← replay, layer ← proxy ← CLI.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The library's builder methods: one whose result is dropped (`layer.body_limit(n);`)
// silently changes nothing.
#[warn(clippy::return_self_not_must_use)]
pub mod clock;
#[warn(clippy::return_self_not_must_use)]
pub mod core;
#[warn(clippy::return_self_not_must_use)]
pub mod layer;
#[warn(clippy::return_self_not_must_use)]
pub mod replay;

#[cfg(feature = "keyfile")]
pub mod keyfile;

#[cfg(feature = "proxy")]
pub mod proxy;

pub use crate::core::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Nonce, Policy, Reason, Secret, Signer,
    SignerConfig, Verified, Verifier, VerifyError,
};

/// The README's code blocks compile as doctests, so the example cannot rot.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

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

/// Entry points for the fuzz targets (fuzz/) into code that is not public: not part of the
/// API (hidden from the documentation, no stability promise), for fuzz/ and its replay
/// tests/fuzz_corpus.rs only.
#[cfg(feature = "proxy")]
#[doc(hidden)]
pub mod __fuzz {
    /// The WebSocket relay's frame tracker, driven over one direction's byte stream cut into
    /// reads as the relay feeds it. Its function, `run`, is implemented beside the tracker
    /// (src/proxy/websocket/fuzz.rs), which is private to its module.
    #[derive(Debug)]
    pub struct WebSocketFrames;

    /// Where one scan of the tracker stopped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ScanState {
        /// At a frame boundary.
        Boundary,
        /// Inside a frame's payload, or a header held back.
        InFrame,
        /// A malformed header: nothing more is relayed.
        Malformed,
        /// A whole Close frame: nothing more is relayed.
        Closed,
    }

    /// One scan: `held` bytes held back earlier and `used` bytes of its input relayed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Scan {
        /// The length of the scan's input.
        pub input: usize,
        /// Whether it was asked to stop at the first frame boundary.
        pub stop: bool,
        /// Header bytes held back from earlier scans, relayed before `used`.
        pub held: usize,
        /// Bytes of the input relayed.
        pub used: usize,
        /// Where it stopped.
        pub state: ScanState,
        /// The tracker's `at_boundary` after it.
        pub at_boundary: bool,
        /// The tracker's `close_seen` after it.
        pub close_seen: bool,
    }

    /// A run of the tracker: what it relayed, and each scan.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Run {
        /// The bytes relayed, in order.
        pub relayed: Vec<u8>,
        /// Every scan, in order.
        pub scans: Vec<Scan>,
    }
}

pub use crate::core::{
    EncodedIdentity, Identity, Keyring, KeyringHandle, Nonce, Policy, Reason, Secret, Signer,
    SignerConfig, Verified, Verifier, VerifyError,
};

/// The README's code blocks compile as doctests, so the example cannot rot.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

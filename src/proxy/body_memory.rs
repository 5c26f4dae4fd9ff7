//! One cap on the memory every request body being read (or held for signing) takes at once,
//! across every connection and event loop: `server.max_body_memory`.
//!
//! Why: the proxy reads a request's body whole before it signs it (the signature covers its
//! digest), so each request in flight may hold up to its route's `max_body`. Each route's
//! limit bounds one request; nothing bounded their sum. One HTTP/2 connection may have
//! `http2_max_concurrent_streams` (256) requests in flight, so one client with a session, or
//! with an `Origin` on a public route that takes writes, could make the proxy hold 256 ×
//! `max_body` (256 MiB by default) and a few such connections exhaust the memory limit its
//! deployment runs under. With the cap, a body that would take the proxy's bodies past it
//! is refused at once with 503 `body_memory_limit` (`Retry-After: 1`), before more of it is
//! read; a request whose `Content-Length` says up front that it cannot fit is refused before
//! any byte of it is read.
//!
//! A request takes its share as its bytes arrive (its whole `Content-Length` at once when it
//! declares one, so a refusal comes before the read, not after most of it), and gives it back
//! when the proxy is done with the request: after its forward (or the login check) ends.
//! Bodiless requests (most GETs) never touch it. A lower limit on reload revokes nothing:
//! bodies being read keep their share, and new ones are refused until enough is given back.
//!
//! The accounting is the library's (`src/layer/body_memory.rs`), which the `VerifyLayer`'s own
//! cap uses too: the library builds without the proxy, so the proxy takes it from there.

pub use crate::layer::body_memory::{BodyMemory, BodyShare};

/// The setting the proxy's cap is: [`BodyMemory::new`]'s `setting`, named in the warning about
/// refusals.
pub const SETTING: &str = "server.max_body_memory";

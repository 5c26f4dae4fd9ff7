//! The backend-for-frontend proxy (feature `proxy`).
//!
//! State modules (sessions, users, throttling, config) and the request path (server,
//! forwarding, auth endpoints, CSRF, static files, admin) are separate; the request path is
//! assembled top to bottom in `server.rs`.

// --- state and configuration ---
pub mod config;
pub mod session;
pub mod session_redis;
pub mod session_snapshot;
pub mod throttle;
pub mod throttle_redis;
pub mod users;

// --- request path ---
pub mod admin;
pub mod auth;
pub mod body_memory;
pub mod client_address;
pub mod csrf;
pub mod dev;
pub mod error;
pub mod forward;
mod http2_idle;
pub mod metrics;
pub mod proxy_protocol;
mod reload_check;
pub mod response_headers;
pub mod server;
pub mod static_files;
pub mod upstream_pool;
mod websocket;
mod write_stall;

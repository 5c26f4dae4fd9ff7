//! The proxy server: listeners, connections, and the request path, assembled here top to
//! bottom so one file shows everything a request goes through.
//!
//! Start with [`ProxyServer::start`] (settings + state dependencies), stop with
//! [`ProxyServer::shutdown`] (graceful), reload keys and users with [`ProxyState::reload`]
//! and the TLS certificate with [`ProxyServer::reload_tls`].
//! [`run_until_signalled`] wires SIGTERM/SIGINT (graceful stop) and SIGHUP (reload).

use compact_str::CompactString;
use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::clock::{SharedClock, SystemClock};
use crate::core::{EncodedIdentity, IdentityHeaders, KeyringHandle, Signer, SignerConfig};

use super::admin;
use super::auth::{self, CookieSettings};
use super::body_memory::{BodyMemory, ClientBodyMemory, ClientKey, RequestBodyShare};
use super::client_address::TrustedProxies;
use super::config::{
    live_key_of, live_upstream_key_of, ChangedFile, ConfigFileNow, LoadedText, ProxyConfig,
    RouteAuth, StoreKind, DEFAULT_CONNECT_TIMEOUT, LIVE_ADMIN_KEYS, LIVE_CONNECTION_KEYS,
    LIVE_CONNECTION_LIMIT_KEYS, LIVE_HEADER_KEYS, LIVE_SERVER_KEYS, LIVE_SESSION_KEYS,
    LIVE_STATIC_KEYS, LIVE_THROTTLE_KEYS, LIVE_UPSTREAM_KEYS, LIVE_UPSTREAM_WEBSOCKET_KEYS,
    LIVE_WEBSOCKET_KEYS,
};
use super::csrf;
use super::error::{self, error_response, ProxyBody, ProxyError};
use super::forward::{
    self, AnswerHeadLimits, CrossOriginRedirects, ForwardContext, Forwarder, ForwarderSettings,
    LiveRouteLimits, Route, RouteLimits, RouteSpec, Router, UpstreamConnect, WebSocketRoute,
};
use super::http2_idle::{StreamActivity, TrackedBody};
use super::metrics::{routes, Metrics, RouteId};
use super::proxy_protocol;
use super::reload_check::{ReloadParts, Snapshot, WatchedPaths};
use super::response_headers::{LiveResponseHeaders, ResponseHeaderRules};
use super::session::{MemorySessionStore, SessionStore, SessionTimeouts};
use super::static_files::{Site, StaticDir, StaticLimits};
use super::throttle::{LoginThrottle, MemoryLoginThrottle};
use super::users::{NameList, UserChanges, UserDb, UsersHandle};
use super::websocket;
use super::write_stall::WriteStallLimit;

/// Everything the server needs to know, independent of where it came from (a config file for
/// `run`, built in code for `dev` and tests).
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Main listener.
    pub listen: SocketAddr,
    /// Origins accepted in `Origin` checks; the first is the public origin.
    pub origins: Vec<String>,
    /// The public origin is https: `Secure` cookie with the `__Host-` prefix.
    pub https: bool,
    /// `host[:port]` of the public origin (`X-Forwarded-Host`).
    pub public_host: String,
    /// Certificate chain and key (PEM) for TLS on the main listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The SPA (static directory or built-in page).
    pub site: Option<Site>,
    /// Browser security headers (`[server.response_headers]`); HSTS is added to the defaults
    /// when `https`.
    pub response_headers: ResponseHeaderRules,
    /// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Time a client has to send its request head (and finish the TLS handshake).
    pub header_read_timeout: Duration,
    /// Time a client has to send its request body.
    pub request_timeout: Duration,
    /// Bytes every request body being read or held for signing may take at once, across
    /// every connection (`server.max_body_memory`); a body that does not fit answers 503
    /// `body_memory_limit`.
    pub max_body_memory: usize,
    /// The most of `max_body_memory` one client (a session's user; on public routes and for
    /// the login, the client address) may hold at once
    /// (`server.max_body_memory_per_client`; None: off); a body that would take its client
    /// past it answers 429 `client_body_memory_limit`.
    pub max_body_memory_per_client: Option<usize>,
    /// Longest a write to a client may stay blocked, and an HTTP/2 stream may wait for the
    /// client's flow-control credit, before the connection is closed (hyper has no write
    /// timeout of its own).
    pub send_timeout: Duration,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Concurrent connections accepted on the main listener; more are closed at once.
    pub max_connections: usize,
    /// WebSockets open at once on the whole proxy (`server.websocket_max_open`; each route
    /// has its own limit too); beyond, a handshake answers 503 `websocket_limit`.
    pub websocket_max_open: usize,
    /// WebSockets open at once per user (`server.websocket_max_open_per_user`); beyond, a
    /// handshake answers 429 `websocket_user_limit`.
    pub websocket_max_open_per_user: usize,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`, revoke).
    pub admin_listen: Option<SocketAddr>,
    /// Concurrent connections accepted on the admin listener.
    pub admin_max_connections: usize,
    /// Concurrent streams per HTTP/2 client connection.
    pub http2_max_concurrent_streams: u32,
    /// An HTTP/2 client connection with no stream open this long is closed (GOAWAY).
    pub http2_idle_timeout: Duration,
    /// `server.http2_max_reset_streams`.
    pub http2_max_reset_streams: usize,
    /// Most header field lines in an HTTP/1 request head (hyper answers 431 beyond), and most
    /// distinct field names in an HTTP/2 request (400 `bad_request` beyond, checked as the
    /// request starts).
    pub max_header_count: usize,
    /// Answer an HTTP/1.1 client that shut down its sending side after its request
    /// (`server.http1_half_close`); false closes its connection at its EOF.
    pub http1_half_close: bool,
    /// Session cookie base name.
    pub cookie_name: String,
    /// Most distinct session ids one request's cookies may carry
    /// (`session.max_session_cookies`).
    pub max_session_cookies: usize,
    /// Cookie `Max-Age` (the absolute session lifetime).
    pub session_max_age: Duration,
    /// Signer settings (window, identity header names, extra covered headers).
    pub signer: SignerConfig,
    /// Upstream routes.
    pub routes: Vec<RouteSpec>,
    /// Names of the routes whose upstream `/readyz` probes and reports without answering 503
    /// while it is down (`upstream[].required_for_ready = false`); empty: all are required.
    pub upstreams_not_required_for_ready: Vec<String>,
    /// `[auth] verify_url`.
    pub verify_url: Option<Uri>,
    /// Time limit of a `verify_url` call.
    pub verify_timeout: Duration,
    /// Largest `POST /auth/login` body (larger: 413 `body_too_large`).
    pub max_login_body: usize,
    /// Longest user name accepted at login, in bytes.
    pub max_username_bytes: usize,
    /// Longest password accepted at login, in bytes (`auth.max_password_bytes`).
    pub max_password_bytes: usize,
    /// Whose `X-Forwarded-For` (or other `server.client_address_header`) names the client
    /// (`server.trusted_proxies`; [`TrustedProxies::none`]: nobody's).
    pub trusted_proxies: TrustedProxies,
    /// Every connection of the main listener starts with a PROXY protocol header from one of
    /// `trusted_proxies` (`server.proxy_protocol`): a TCP balancer's name for the client.
    pub proxy_protocol: bool,
    /// The longest address block and TLVs of a v2 PROXY header read
    /// (`server.proxy_protocol_max_bytes`).
    pub proxy_protocol_max_bytes: usize,
    /// Largest `verify_url` answer read (larger: 502).
    pub max_verify_answer: usize,
    /// The `verify_url` answer's head limits (`auth.max_verify_answer_header_bytes` and
    /// `auth.max_verify_answer_header_count`).
    pub verify_answer_head: AnswerHeadLimits,
    /// Connect timeout of the `verify_url` client (each route has its own in
    /// [`RouteSpec::connect`]).
    pub connect_timeout: Duration,
    /// How long a `verify_url` connection is reused (`auth.verify_pool_max_lifetime`;
    /// `None`: no limit).
    pub verify_pool_max_lifetime: Option<Duration>,
    /// Idle `verify_url` connections kept (`auth.verify_pool_max_idle`).
    pub verify_pool_max_idle: usize,
    /// How long an idle `verify_url` connection is kept (`auth.verify_pool_idle_timeout`).
    pub verify_pool_idle_timeout: Duration,
    /// How `/readyz` and `/metrics` probe the upstreams and reuse the answer
    /// (`admin.readiness_probe_timeout`, `admin.readiness_cache`).
    pub readiness: admin::ReadinessTiming,
    /// CAs trusted for every https upstream (and `verify_url`) besides the web PKI roots; a
    /// route adds its own in [`RouteSpec::connect`].
    pub upstream_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// CAs trusted for an https `verify_url` only (`auth.verify_ca_file`), besides the web PKI
    /// roots and `upstream_roots`.
    pub verify_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The config file to reload keys and users from on SIGHUP (None: nothing to reload).
    pub reload_from: Option<Arc<ProxyConfig>>,
}

impl ProxySettings {
    /// Settings from a checked config file.
    pub fn from_config(config: &ProxyConfig) -> Result<ProxySettings, String> {
        let origin = &config.server.public_origin;
        let site = match &config.server.static_dir {
            Some(dir) => Some(Site::Dir(
                StaticDir::new(dir)
                    .map_err(|e| {
                        format!(
                            "{}: server.static_dir: {}: {e}",
                            config.source.display(),
                            dir.display()
                        )
                    })?
                    .max_file_bytes(config.server.max_static_file)
                    .max_cache_bytes(config.server.static_cache_size)
                    .immutable_prefixes(config.server.static_immutable.clone()),
            )),
            None => None,
        };
        let mut routes = Vec::with_capacity(config.upstreams.len());
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let extra_roots = configured_roots(
                config,
                &format!("upstream[{i}].ca_file"),
                upstream.ca_file.as_deref(),
            )?;
            routes.push(RouteSpec {
                name: upstream.name.clone(),
                prefix: upstream.prefix.clone(),
                url: upstream.url.clone(),
                strip_prefix: upstream.strip_prefix,
                timeout: upstream.timeout,
                max_body: upstream.max_body,
                auth_required: matches!(upstream.auth, RouteAuth::Required),
                forward_cookies: upstream.forward_cookies,
                cross_origin_redirects: upstream.cross_origin_redirects,
                connect: UpstreamConnect {
                    connect_timeout: upstream.connect_timeout,
                    pool_idle_timeout: upstream.pool_idle_timeout,
                    pool_max_idle_per_host: upstream.pool_max_idle_per_host,
                    pool_max_lifetime: upstream.pool_max_lifetime,
                    pool_stale_after: upstream.pool_stale_after,
                    body_idle_timeout: upstream.body_idle_timeout,
                    max_response_header_count: upstream.max_response_header_count,
                    max_response_header_bytes: upstream.max_response_header_bytes,
                    extra_roots,
                    client_cert: (upstream.client_cert.as_ref())
                        .map(|files| files.load(&config.source))
                        .transpose()
                        .map_err(|e| e.to_string())?,
                },
                websocket: upstream.websocket.clone(),
            });
        }
        let verify_roots = configured_roots(
            config,
            "auth.verify_ca_file",
            config.auth.verify_ca_file.as_deref(),
        )?;
        let public_host = match origin.port {
            Some(port) => format!("{}:{port}", origin.host),
            None => origin.host.clone(),
        };
        Ok(ProxySettings {
            listen: config.server.listen,
            origins: vec![origin.as_origin()],
            https: origin.is_https(),
            public_host,
            tls: config
                .server
                .tls
                .as_ref()
                .map(|t| (t.cert.clone(), t.key.clone())),
            site,
            response_headers: config.server.response_headers.clone(),
            max_header_bytes: config.server.max_header_bytes,
            header_read_timeout: config.server.header_read_timeout,
            request_timeout: config.server.request_timeout,
            max_body_memory: config.server.max_body_memory,
            max_body_memory_per_client: config.server.max_body_memory_per_client,
            send_timeout: config.server.send_timeout,
            shutdown_grace: config.server.shutdown_grace,
            max_connections: config.server.max_connections,
            websocket_max_open: config.server.websocket_max_open,
            websocket_max_open_per_user: config.server.websocket_max_open_per_user,
            admin_listen: config.admin.listen,
            admin_max_connections: config.admin.max_connections,
            http2_max_concurrent_streams: config.server.http2_max_concurrent_streams,
            http2_idle_timeout: config.server.http2_idle_timeout,
            http2_max_reset_streams: config.server.http2_max_reset_streams,
            max_header_count: config.server.max_header_count,
            http1_half_close: config.server.http1_half_close,
            cookie_name: config.session.cookie_name.clone(),
            max_session_cookies: config.session.max_session_cookies,
            session_max_age: config.session.absolute_timeout,
            signer: SignerConfig {
                window: config.signing.window,
                identity_headers: IdentityHeaders {
                    user: config.signing.user_header.clone(),
                    roles: config.signing.roles_header.clone(),
                },
                extra_headers: config.signing.extra_headers.clone(),
                ..SignerConfig::default()
            },
            routes,
            upstreams_not_required_for_ready: config
                .upstreams
                .iter()
                .filter(|u| !u.required_for_ready)
                .map(|u| u.name.clone())
                .collect(),
            verify_url: config.auth.verify_url.clone(),
            verify_timeout: config.auth.verify_timeout,
            max_login_body: config.auth.max_login_body,
            max_username_bytes: config.auth.max_username_bytes,
            max_password_bytes: config.auth.max_password_bytes,
            trusted_proxies: config.server.trusted_proxies.clone(),
            proxy_protocol: config.server.proxy_protocol,
            proxy_protocol_max_bytes: config.server.proxy_protocol_max_bytes,
            max_verify_answer: config.auth.max_verify_answer,
            verify_answer_head: AnswerHeadLimits {
                max_bytes: config.auth.max_verify_answer_header_bytes,
                max_fields: config.auth.max_verify_answer_header_count,
            },
            // The verify_url call as a whole is bounded by verify_timeout; connecting may take
            // all of it, up to the routes' default.
            connect_timeout: config.auth.verify_timeout.min(DEFAULT_CONNECT_TIMEOUT),
            verify_pool_max_lifetime: config.auth.verify_pool_max_lifetime,
            verify_pool_max_idle: config.auth.verify_pool_max_idle,
            verify_pool_idle_timeout: config.auth.verify_pool_idle_timeout,
            readiness: config.admin.readiness,
            upstream_roots: Vec::new(),
            verify_roots,
            reload_from: Some(Arc::new(config.clone())),
        })
    }
}

/// The stateful parts, injected so tests can use a manual clock and inspect stores.
#[derive(Clone)]
pub struct ProxyDeps {
    /// The clock (sessions, signatures, throttle windows).
    pub clock: SharedClock,
    /// Session store.
    pub sessions: Arc<dyn SessionStore>,
    /// Login throttle.
    pub throttle: Arc<dyn LoginThrottle>,
    /// Users (None when only `verify_url` checks credentials).
    pub users: Option<UsersHandle>,
    /// The signing keys.
    pub keyring: KeyringHandle,
}

impl fmt::Debug for ProxyDeps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyDeps")
            .field("clock", &self.clock)
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl ProxyDeps {
    /// The session store and login throttle named by `config` (in memory, or shared in Redis),
    /// the users file, the keyring, and `clock`. Starts the session sweeper (Redis: the count
    /// pruner), so it must be called inside a tokio runtime.
    pub fn from_config(config: &ProxyConfig, clock: SharedClock) -> Result<ProxyDeps, String> {
        let timeouts = SessionTimeouts {
            idle: config.session.idle_timeout,
            absolute: config.session.absolute_timeout,
        };
        let (sessions, throttle): (Arc<dyn SessionStore>, Arc<dyn LoginThrottle>) =
            match &config.session.store {
                StoreKind::Memory => {
                    let store = Arc::new(
                        MemorySessionStore::new(timeouts, config.session.max_sessions)
                            .with_max_sessions_per_user(config.session.max_sessions_per_user),
                    );
                    let _sweeper =
                        store.spawn_sweeper(config.session.sweep_interval, clock.clone());
                    let throttle = Arc::new(MemoryLoginThrottle::new(
                        config.auth.throttle,
                        config.auth.throttle.max_tracked_keys,
                    ));
                    (store, throttle)
                }
                // Sessions and throttle counters shared by every proxy on this Redis (issue 4).
                StoreKind::Redis { url, key_prefix } => super::session_redis::stores_from_config(
                    config,
                    url,
                    key_prefix,
                    timeouts,
                    clock.clone(),
                )?,
            };
        // The handle keeps this bound across SIGHUP reloads (they swap the database only).
        // Loaded through the config, so the `auth.max_hash_*` bounds apply and an unreadable
        // file is named by its key.
        let users = config.load_users().map_err(|e| e.to_string())?.map(|db| {
            warn_of_mixed_parameters(config, &db);
            UsersHandle::with_max_concurrent_checks(db, config.auth.max_concurrent_password_checks)
        });
        let keyring = KeyringHandle::new(config.load_keyring().map_err(|e| e.to_string())?);
        Ok(ProxyDeps {
            clock,
            sessions,
            throttle,
            users,
            keyring,
        })
    }

    /// [`ProxyDeps::from_config`] with the system clock.
    pub fn from_config_system_clock(config: &ProxyConfig) -> Result<ProxyDeps, String> {
        Self::from_config(config, Arc::new(SystemClock))
    }
}

/// Logs [`UserDb::parameter_warning`] and [`UserDb::weak_hash_warning`] (at start and at each
/// reload of the users file).
fn warn_of_mixed_parameters(config: &ProxyConfig, db: &UserDb) {
    let Some(path) = &config.auth.users_file else {
        return;
    };
    for warning in [db.parameter_warning(), db.weak_hash_warning()]
        .into_iter()
        .flatten()
    {
        tracing::warn!("auth.users_file {}: {warning}", path.display());
    }
}

/// Shared state of the request path.
pub struct ProxyState {
    pub(crate) clock: SharedClock,
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) throttle: Arc<dyn LoginThrottle>,
    pub(crate) users: Option<UsersHandle>,
    pub(crate) keyring: KeyringHandle,
    pub(crate) verify_url: Option<Uri>,
    pub(crate) verify_timeout: Duration,
    pub(crate) max_login_body: usize,
    pub(crate) max_username_bytes: usize,
    pub(crate) max_password_bytes: usize,
    pub(crate) max_verify_answer: usize,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) router: Router,
    pub(crate) forwarder: Forwarder,
    pub(crate) site: Option<Site>,
    /// `[server.response_headers]` as sent now (public and admin sets), shared by every event
    /// loop: a reload that applies an edit of the config file swaps it for all of them.
    pub(crate) response_headers: LiveResponseHeaders,
    /// Each `[[upstream]]`'s live limits (`timeout`, `max_body`, `body_idle_timeout`), in
    /// config order, shared by every event loop's routes: what a reload sets.
    pub(crate) route_limits: Vec<LiveRouteLimits>,
    /// Each `[[upstream]]`'s WebSocket settings (None without `websocket = true`), in config
    /// order; each is shared by every event loop's copy of its route: what a reload sets.
    pub(crate) websocket_routes: Vec<Option<WebSocketRoute>>,
    pub(crate) cookie: CookieSettings,
    pub(crate) public_origin: Vec<String>,
    /// `server.request_timeout`, the connections' timeouts and head limits and the listeners'
    /// connection limits as they are now, shared by every event loop and listener: what a
    /// reload sets.
    pub(crate) server_settings: Arc<LiveServerSettings>,
    pub(crate) reload_from: Option<Arc<ProxyConfig>>,
    /// What the config file's settings running are, as a reload compares the file with them:
    /// `reload_from`'s contents with the live keys a reload applied since. Only the reloads
    /// (one at a time, [`Signals::serve`]) use it.
    pub(crate) config_running: parking_lot::Mutex<LoadedText>,
    pub(crate) readiness: admin::Readiness,
    /// The open WebSockets of the whole proxy (shared by every event loop): their limit and
    /// the shutdown's signal.
    pub(crate) websockets: Arc<websocket::Registry>,
}

impl fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyState")
            .field("router", &self.router)
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

impl ProxyState {
    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `server.request_timeout` now (a reload may change it): one atomic load, for a request
    /// that starts reading its body.
    #[inline]
    pub(crate) fn request_timeout(&self) -> Duration {
        self.server_settings.request_timeout()
    }

    /// The session store.
    pub fn sessions(&self) -> &Arc<dyn SessionStore> {
        &self.sessions
    }

    /// The keyring handle the signer uses.
    pub fn keyring(&self) -> &KeyringHandle {
        &self.keyring
    }

    /// The session cookie name as the browser sees it.
    pub fn cookie_name(&self) -> &str {
        self.cookie.name()
    }

    /// Reloads the keyring and the users file from the config's paths (SIGHUP), each file on
    /// its own: a file that is read and checked is swapped in; a file that fails is reported
    /// (file, key, problem) and the current one stays. Why per file (docs/OPERATIONS.md,
    /// "Signals"): the two are independent, and a broken users file must not silently hold
    /// back a key rotation (nor a broken keyring a user change).
    /// Connections are untouched, and so is the users handle's bound on concurrent password
    /// checks (`auth.max_concurrent_password_checks`): only its database is swapped. Sessions
    /// are untouched here too (this is not async, the session store is): the report's
    /// [`users_changed`](ReloadReport::users_changed) names the users removed or changed,
    /// whose sessions [`ProxyState::end_sessions_of`] ends. SIGHUP and the file-change check
    /// do both; a caller of this method calls that itself.
    pub fn reload_files(&self) -> ReloadReport {
        self.reload_parts(ReloadParts::ALL).0
    }

    /// [`ProxyState::reload_files`] for the chosen parts only (its TLS part is the
    /// server's, not the state's): SIGHUP reloads both files, a file-change check
    /// (`server.reload_check_interval`) only those that changed, so an unchanged users file
    /// costs no argon2 hash and an unchanged broken one is not logged again.
    /// With the report, the parts that failed (the reload gauges keep them per part).
    pub(crate) fn reload_parts(&self, parts: ReloadParts) -> (ReloadReport, ReloadParts) {
        let mut report = ReloadReport::default();
        let mut failed = ReloadParts::NONE;
        if !(parts.keyring || parts.users) {
            return (report, failed);
        }
        let Some(config) = &self.reload_from else {
            report
                .failed
                .push("nothing to reload: not started from a config file".into());
            failed.keyring = parts.keyring;
            failed.users = parts.users;
            return (report, failed);
        };
        if parts.keyring {
            failed.keyring = !self.reload_keyring(config, &mut report);
        }
        if parts.users {
            failed.users = !self.reload_users(config, &mut report);
        }
        (report, failed)
    }

    /// Whether the keyring was swapped in.
    fn reload_keyring(&self, config: &ProxyConfig, report: &mut ReloadReport) -> bool {
        match config.load_keyring() {
            Ok(keyring) => {
                report.loaded.push(format!(
                    "signing.keyring {} (active key {})",
                    config.signing.keyring.display(),
                    keyring.active_id()
                ));
                self.keyring.store(keyring);
                true
            }
            Err(e) => {
                report.failed.push(format!(
                    "signing.keyring not reloaded, keeping the current keys: {e}"
                ));
                false
            }
        }
    }

    /// Whether the users file was swapped in, or there is none to load.
    fn reload_users(&self, config: &ProxyConfig, report: &mut ReloadReport) -> bool {
        // Without a users handle (`verify_url` checks credentials) there is no users file.
        if let (Some(path), Some(handle)) = (&config.auth.users_file, &self.users) {
            match config.load_users() {
                Ok(None) => {}
                Ok(Some(db)) => {
                    warn_of_mixed_parameters(config, &db);
                    report.loaded.push(format!(
                        "auth.users_file {} (users: {})",
                        path.display(),
                        db.len()
                    ));
                    // Compared with the database this one replaces, in the same swap: the
                    // users whose sessions must end (a file that failed to load changes
                    // nobody: this arm is not reached).
                    report.users_changed = handle.replace(db);
                }
                Err(e) => {
                    report.failed.push(format!(
                        "auth.users_file not reloaded, keeping the current users: {e}"
                    ));
                    return false;
                }
            }
        }
        true
    }

    /// Ends every session of the users in `changes` (a reload's
    /// [`ReloadReport::users_changed`]) through the store's `delete_user`: with Redis the
    /// whole fleet sees it at once, and proxies reloading the same file end the same sessions
    /// (deleting twice is harmless).
    ///
    /// One user after the other: with the memory store each is a lock held for microseconds,
    /// with Redis one round trip each.
    /// A store that fails [`MAX_REVOKE_FAILURES`] times is not asked further (Redis down:
    /// each call waits for `redis_timeout`, and the reload holds back the next signal); the
    /// users not reached are reported as failed with the others.
    ///
    /// A session created in the instant between the swap of the users and this call (a user
    /// whose password just changed logging in with the new one) is ended too: that user logs
    /// in once more. Ending it before the swap instead would let a login with the old
    /// password in that instant keep its session, which is what this is for. (A login whose
    /// check began before the swap is refused by the login itself: `users::UsersSeen`.)
    pub async fn end_sessions_of(&self, changes: &UserChanges) -> SessionsEnded {
        let mut ended = SessionsEnded::default();
        let mut names = changes.names();
        for name in names.by_ref() {
            match self.sessions.delete_user(name).await {
                Ok(sessions) => {
                    ended.users += 1;
                    ended.sessions += sessions;
                }
                Err(e) => {
                    ended.failed.push(name.to_owned());
                    ended.error.get_or_insert_with(|| e.to_string());
                    if ended.failed.len() >= MAX_REVOKE_FAILURES {
                        break;
                    }
                }
            }
        }
        ended.failed.extend(names.map(str::to_owned));
        ended
    }

    /// [`ProxyState::reload_files`] then, as SIGHUP does, [`ProxyState::end_sessions_of`] the
    /// users it removed or changed, as one line: Ok when every file was reloaded and those
    /// sessions ended, else Err with every failure and what was done all the same. (It once
    /// reloaded the files only: a user removed from the users file kept working sessions
    /// until they expired, against what docs/CONFIG.md says a reload does.) The files are
    /// read on the calling thread.
    pub async fn reload(&self) -> Result<String, String> {
        let report = self.reload_files();
        let ended = self.end_sessions_of(&report.users_changed).await;
        let mut line = report.to_string();
        if ended.users > 0 {
            line.push_str(&format!(
                "; ended {} session(s) of {} removed or changed user(s)",
                ended.sessions, ended.users
            ));
        }
        if !ended.failed.is_empty() {
            line.push_str(&format!(
                "; the sessions of {} may still be live: {}",
                ended.failed.join(", "),
                ended.error.as_deref().unwrap_or("the session store failed")
            ));
        }
        if report.failed.is_empty() && ended.failed.is_empty() {
            Ok(line)
        } else {
            Err(line)
        }
    }
}

/// Store failures after which [`ProxyState::end_sessions_of`] stops asking the store.
pub const MAX_REVOKE_FAILURES: usize = 3;

/// What a reload ([`ProxyState::reload_files`]) did, file by file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// One line per file swapped in: the config key, the path, what is now active.
    pub loaded: Vec<String>,
    /// One line per file that was not swapped in (the current one stays): the config key,
    /// the file, the key inside it and the problem.
    pub failed: Vec<String>,
    /// The users file was swapped in: the users it removed or whose password or roles it
    /// changed, whose sessions are to end ([`ProxyState::end_sessions_of`]). Empty when the
    /// users file was not reloaded or failed to load.
    pub users_changed: UserChanges,
}

/// What [`ProxyState::end_sessions_of`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionsEnded {
    /// Users whose sessions were ended (those with none count too).
    pub users: usize,
    /// Sessions ended, over all of them.
    pub sessions: usize,
    /// Users whose sessions may still be live: the store failed, or was not asked after
    /// [`MAX_REVOKE_FAILURES`] failures.
    pub failed: Vec<String>,
    /// The store's first error, when any.
    pub error: Option<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for failure in &self.failed {
            write!(f, "{sep}{failure}")?;
            sep = "; ";
        }
        if !self.loaded.is_empty() {
            write!(f, "{sep}reloaded {}", self.loaded.join(", "))?;
        }
        Ok(())
    }
}

/// The server failed to start.
#[derive(Debug)]
pub enum StartError {
    /// A listener could not bind.
    Bind {
        /// Which listener (`server.listen`, `admin.listen`).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// Settings that cannot be served (TLS files, upstream URLs).
    Invalid(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind { what, addr, error } => {
                write!(f, "{what}: cannot listen on {addr}: {error}")
            }
            StartError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StartError {}

/// A running proxy: the main listener, the admin listener, and their connections.
#[derive(Debug)]
pub struct ProxyServer {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<ProxyState>,
    shutdown: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    connections: Arc<ConnectionLimit>,
    /// The main listener's TLS configuration (None: cleartext), shared by every event loop.
    tls: Option<TlsHandle>,
}

/// The main listener's TLS configuration, shared by every event loop of the listener and
/// swapped whole by [`ProxyServer::reload_tls`] (SIGHUP): each accepted connection loads the
/// current one once (an atomic load and a reference count, as cloning the acceptor was), so
/// new connections get the new certificate and established ones keep the one they
/// handshook with.
#[derive(Clone)]
struct TlsHandle {
    current: Arc<ArcSwap<rustls::ServerConfig>>,
    cert: PathBuf,
    key: PathBuf,
}

impl fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsHandle")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsHandle {
    /// Loads the pair for the first time (start): the error names the keys, as
    /// `check-config` does.
    /// Also returns the certificate's `notAfter` (Unix seconds) for the metrics.
    fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<(TlsHandle, i64), StartError> {
        let loaded = read_tls(cert, key)
            .map_err(|e| StartError::Invalid(format!("server.tls_cert/tls_key: {e}")))?;
        Ok((
            TlsHandle {
                current: Arc::new(ArcSwap::new(loaded.config)),
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
            loaded.not_after_unix,
        ))
    }

    /// The acceptor for one new connection.
    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Reads and checks the pair again ([`load_tls`], the same checks and ALPN settings as at
    /// start) and swaps it in only if all of it is valid, then records its `notAfter` in
    /// `metrics`. Blocking (file reads, parsing).
    fn reload(&self, metrics: &Metrics) -> Result<String, String> {
        match read_tls(&self.cert, &self.key) {
            Ok(LoadedTls {
                config,
                chain,
                not_after,
                not_after_unix,
            }) => {
                self.current.store(config);
                metrics.record_tls_cert(not_after_unix);
                let fingerprint = chain
                    .first()
                    .map(|leaf| format!(", SHA-256 fingerprint {}", cert_fingerprint(leaf)))
                    .unwrap_or_default();
                Ok(format!(
                    "server.tls_cert/tls_key {} and {} (certificates in the chain: {}\
                     {fingerprint}, valid until {not_after})",
                    self.cert.display(),
                    self.key.display(),
                    chain.len()
                ))
            }
            Err(e) => Err(format!(
                "server.tls_cert/tls_key not reloaded ({} and {}), keeping the current \
                 certificate: {e}",
                self.cert.display(),
                self.key.display()
            )),
        }
    }
}

/// Triggers a graceful shutdown of a [`ProxyServer`] from anywhere.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Stop accepting; in-flight requests get the grace period.
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

impl ProxyServer {
    /// Binds the listeners and starts serving. Must be called inside a tokio runtime.
    pub async fn start(
        settings: ProxySettings,
        deps: ProxyDeps,
    ) -> Result<ProxyServer, StartError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|error| StartError::Bind {
                    what: "server.listen",
                    addr: settings.listen,
                    error,
                })?;
        Self::start_on(listener, settings, deps).await
    }

    /// Like [`ProxyServer::start`] on an already bound main listener (`settings.listen` is
    /// then ignored): callers that must know the port before building the settings (`dev`
    /// with port 0) bind first.
    pub async fn start_on(
        listener: TcpListener,
        settings: ProxySettings,
        deps: ProxyDeps,
    ) -> Result<ProxyServer, StartError> {
        let admin_listener = match settings.admin_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|error| StartError::Bind {
                            what: "admin.listen",
                            addr,
                            error,
                        })?,
                )
            }
            None => None,
        };
        let tls = match &settings.tls {
            Some((cert, key)) => Some(TlsHandle::load(cert, key)?),
            None => None,
        };
        let state = Arc::new(build_state(&settings, deps, None)?);
        let tls = tls.map(|(tls, not_after)| {
            state.metrics.record_tls_cert(not_after);
            tls
        });
        let addr = listener.local_addr().map_err(|error| StartError::Bind {
            what: "server.listen",
            addr: settings.listen,
            error,
        })?;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let limits = ConnLimits {
            connections: state.server_settings.main_connections.clone(),
            settings: state.server_settings.clone(),
            proxy_protocol: settings
                .proxy_protocol
                .then_some(settings.proxy_protocol_max_bytes),
        };
        let mut tasks = Vec::new();
        let main_state = state.clone();
        tasks.push(tokio::spawn(accept_loop(
            listener,
            tls.clone(),
            limits.clone(),
            shutdown_rx.clone(),
            move |peer, req| handle(main_state.clone(), peer, req),
        )));
        // Open WebSockets are no longer the listeners' connections: closed (1001) and waited
        // for by a task of their own, within the same grace (as it is when the shutdown
        // starts: a reload may have changed it).
        let websockets = state.websockets.clone();
        let live = state.server_settings.clone();
        let mut stopping = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
            let grace = live.shutdown_grace();
            websockets.close_on_shutdown(stopping, grace).await;
        }));
        let mut admin_addr = None;
        if let Some(admin_listener) = admin_listener {
            admin_addr = admin_listener.local_addr().ok();
            let admin_state = state.clone();
            tasks.push(tokio::spawn(accept_loop(
                admin_listener,
                None,
                ConnLimits {
                    connections: state.server_settings.admin_connections.clone(),
                    proxy_protocol: None,
                    ..limits.clone()
                },
                shutdown_rx,
                move |_peer, req| admin::handle(admin_state.clone(), req),
            )));
        }
        // `admin` is the address itself, or no field at all without an admin listener (not
        // the Debug text of an Option, which log collectors would take for the address).
        tracing::info!(
            %addr,
            admin = admin_addr.map(tracing::field::display),
            tls = settings.tls.is_some(),
            "proxy listening"
        );
        Ok(ProxyServer {
            addr,
            admin_addr,
            state,
            shutdown: Arc::new(shutdown_tx),
            tasks,
            threads: Vec::new(),
            connections: limits.connections,
            tls,
        })
    }

    /// Thread-per-core: `threads` event loops, each a single-threaded tokio runtime with its
    /// own `SO_REUSEPORT` listener on the same address and its own upstream connection pool,
    /// sharing sessions, users, keys and metrics. The calling runtime serves the first
    /// listener and the admin listener; `threads - 1` more OS threads serve the others.
    ///
    /// Why: a connection's tasks (client side, upstream side, the pool's connection driver)
    /// then always run on one thread, with no cross-thread wake-ups or work stealing. On a
    /// 2-core machine shared with the load generator and the upstream this measured ~1.5× the
    /// throughput of one work-stealing runtime with 2 workers (docs: `run --workers`).
    pub async fn start_per_core(
        settings: ProxySettings,
        deps: ProxyDeps,
        threads: usize,
    ) -> Result<ProxyServer, StartError> {
        let bind_error = |addr: SocketAddr| {
            move |error| StartError::Bind {
                what: "server.listen",
                addr,
                error,
            }
        };
        // SO_REUSEPORT would let this group share the port with another process already
        // listening there (a second `run` on the same address): the kernel would split the
        // connections between two proxies with separate sessions. So the address must be free
        // first; port 0 becomes the port the probe got, which the whole group then shares.
        let addr = probe_exclusive(settings.listen).map_err(bind_error(settings.listen))?;
        let first = reuseport_socket(addr).map_err(bind_error(addr))?;
        let mut others = Vec::new();
        for _ in 1..threads.max(1) {
            others.push(reuseport_socket(addr).map_err(bind_error(addr))?);
        }
        let listener = first.listen(1024).map_err(bind_error(addr))?;
        let mut server = Self::start_on(listener, settings.clone(), deps.clone()).await?;
        // Every event loop shares the first one's TLS configuration, so one reload swaps it
        // for all of them.
        let tls = server.tls.clone();
        for (i, socket) in others.into_iter().enumerate() {
            let settings = settings.clone();
            let deps = deps.clone();
            let shared = SharedByLoops {
                metrics: server.state.metrics.clone(),
                response_headers: server.state.response_headers.clone(),
                route_limits: server.state.route_limits.clone(),
                websockets: server.state.websockets.clone(),
                server_settings: server.state.server_settings.clone(),
            };
            let shutdown = server.shutdown.subscribe();
            let tls = tls.clone();
            let connections = server.connections.clone();
            let thread = std::thread::Builder::new()
                .name(format!("countersign-{}", i + 1))
                .spawn(move || {
                    serve_thread(socket, settings, deps, shared, tls, connections, shutdown)
                })
                .map_err(|e| StartError::Invalid(format!("cannot start a server thread: {e}")))?;
            server.threads.push(thread);
        }
        Ok(server)
    }

    /// The main listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The shared state (metrics, stores, reload).
    pub fn state(&self) -> Arc<ProxyState> {
        self.state.clone()
    }

    /// Reloads the main listener's TLS certificate chain and key (`server.tls_cert` /
    /// `tls_key`, the paths it started with), as a pair: both files are read and checked as
    /// at start (chain parses, key parses, key matches the certificate; same ALPN), and only
    /// then swapped in for every event loop. New connections get the new certificate;
    /// established ones are untouched. On any problem the current certificate stays and the
    /// error names the keys, the files and the problem. None: the listener has no TLS.
    ///
    /// Blocking (reads and parses files): call it off the event loop, as SIGHUP does.
    pub fn reload_tls(&self) -> Option<Result<String, String>> {
        self.tls.as_ref().map(|tls| tls.reload(&self.state.metrics))
    }

    /// A handle that triggers a graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish within the grace
    /// period, then return. The connections still open at the end of the grace (their
    /// requests unanswered) are closed before it returns: none of this server's is left.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
    }

    /// Waits until the server has stopped (after a shutdown was triggered).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
        for thread in self.threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The process signals the proxy reacts to, installed as early as possible so a SIGTERM that
/// arrives during startup already means "stop gracefully" rather than the default kill.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT: for what runs before [`Signals::serve`] and
    /// may wait (a start waiting for `session.snapshot_file`'s lock), so that a stop asked
    /// for meanwhile is not held until the wait ends.
    pub async fn stop_requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Serves until SIGTERM or SIGINT (then shuts down gracefully); SIGHUP reloads the
    /// keyring, the users file and the TLS certificate and key (a pair), each on its own: a
    /// bad file is logged and the old one kept, the others' new content is loaded all the
    /// same; and applies the live keys of a valid edit of the config file
    /// (`[server.response_headers]`). With `server.reload_check_interval` set in the config
    /// the server was started from, the files are also checked for changes at that interval,
    /// and the parts that changed are reloaded the same way.
    ///
    /// Both triggers run here, one after the other, never two reloads at once: two
    /// overlapping reloads could store an older read after a newer one.
    pub async fn serve(mut self, server: ProxyServer) {
        let state = server.state();
        let tls = server.tls.clone();
        let mut file_check = FileCheck::start(&state, tls.as_ref()).await;
        loop {
            tokio::select! {
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
                _ = self.hup.recv() => {
                    // The files as this reload will find them (or newer) become the baseline,
                    // so the next check does not reload them a second time.
                    if let Some(check) = &mut file_check {
                        check.rebase().await;
                    }
                    reload_and_log(&state, tls.as_ref(), ReloadParts::ALL, "SIGHUP").await;
                }
                changed = FileCheck::next_change(&mut file_check) => {
                    reload_and_log(&state, tls.as_ref(), changed, "file change").await;
                }
            }
        }
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        server.shutdown().await;
        tracing::info!("stopped");
    }
}

/// `server.reload_check_interval` at work in [`Signals::serve`]: the watched files' state at
/// the last check, and the ticks of the next ones.
struct FileCheck {
    ticks: tokio::time::Interval,
    paths: Arc<WatchedPaths>,
    last: Snapshot,
}

impl FileCheck {
    /// Reads the files for a first baseline. None when the check is off, or the server was
    /// not started from a config file (`dev`, servers built in code).
    async fn start(state: &ProxyState, tls: Option<&TlsHandle>) -> Option<FileCheck> {
        let config = state.reload_from.as_ref()?;
        let every = config.server.reload_check_interval?;
        let paths = Arc::new(WatchedPaths {
            keyring: config.signing.keyring.clone(),
            // What a reload reads: no users file without a users handle (`verify_url`).
            users: (state.users.as_ref())
                .and(config.auth.users_file.clone())
                .map(|file| (file, config.auth.max_users_file)),
            tls: tls.map(|tls| (tls.cert.clone(), tls.key.clone())),
            client_certs: (config.client_cert_files())
                .flat_map(|files| [files.cert.clone(), files.key.clone()])
                .collect(),
            config: Some(config.source.clone()),
        });
        // A change between the start's loading and this first read goes unnoticed until the
        // files change again (or SIGHUP): a window of milliseconds, at start only.
        let last = snapshot_off_loop(&paths, None).await?;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A check that took long (a slow disk) is followed by one a full interval later, not
        // by a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            "checking the files SIGHUP reloads for changes every {every:?} \
             (server.reload_check_interval)"
        );
        Some(FileCheck { ticks, paths, last })
    }

    /// Waits for the next check that finds a change: the parts to reload. Never returns when
    /// the check is off. Cancel-safe: dropped half-way (a signal came first), it has at most
    /// left the baseline at an older state, so the next check reloads once more.
    async fn next_change(check: &mut Option<FileCheck>) -> ReloadParts {
        let Some(check) = check else {
            return std::future::pending().await;
        };
        loop {
            check.ticks.tick().await;
            let Some(now) = snapshot_off_loop(&check.paths, Some(&check.last)).await else {
                continue;
            };
            // The new state is the baseline even when its reload fails: a broken file is
            // logged once, not at every check, and reloaded when it changes again (a
            // certificate written before its key: the pair fails, then the key's change
            // reloads it).
            let changed = check.last.changed(&now);
            check.last = now;
            if changed.any() {
                return changed;
            }
        }
    }

    /// The files as they are now become the baseline (before a SIGHUP reload reads them).
    async fn rebase(&mut self) {
        if let Some(now) = snapshot_off_loop(&self.paths, Some(&self.last)).await {
            self.last = now;
        }
    }
}

/// [`WatchedPaths::snapshot`] on the blocking pool (it reads files). None (logged) if that
/// task failed.
async fn snapshot_off_loop(
    paths: &Arc<WatchedPaths>,
    previous: Option<&Snapshot>,
) -> Option<Snapshot> {
    let reading = Arc::clone(paths);
    let previous = previous.cloned();
    match tokio::task::spawn_blocking(move || reading.snapshot(previous.as_ref())).await {
        Ok(snapshot) => Some(snapshot),
        Err(e) => {
            tracing::error!("file change check failed: {e}");
            None
        }
    }
}

/// [`Signals::install`] then [`Signals::serve`].
pub async fn run_until_signalled(server: ProxyServer) -> std::io::Result<()> {
    Signals::install()?.serve(server).await;
    Ok(())
}

/// Builds the request-path state. `metrics` is shared by every thread serving the same proxy;
/// None makes a fresh set.
fn build_state(
    settings: &ProxySettings,
    deps: ProxyDeps,
    shared: Option<SharedByLoops>,
) -> Result<ProxyState, StartError> {
    let websockets =
        (shared.as_ref().map(|shared| shared.websockets.clone())).unwrap_or_else(|| {
            Arc::new(websocket::Registry::new(
                settings.websocket_max_open,
                settings.websocket_max_open_per_user,
            ))
        });
    let server_settings = (shared.as_ref().map(|shared| shared.server_settings.clone()))
        .unwrap_or_else(|| Arc::new(LiveServerSettings::new(settings)));
    let (metrics, response_headers, route_limits) = match shared {
        Some(shared) => (
            Some(shared.metrics),
            Some(shared.response_headers),
            Some(shared.route_limits),
        ),
        None => (None, None, None),
    };
    let metrics = metrics.unwrap_or_else(|| {
        Arc::new(Metrics::new(
            settings.routes.iter().map(|r| r.name.as_str()),
        ))
    });
    let mut routes = Vec::with_capacity(settings.routes.len());
    for (i, spec) in settings.routes.iter().enumerate() {
        let mut route =
            Route::new(spec.clone(), metrics.upstream_route(i)).map_err(StartError::Invalid)?;
        // Every event loop's copy of a route reads the first one's limits: a reload sets them
        // once for all.
        if let Some(shared) = route_limits.as_ref().and_then(|all| all.get(i)) {
            route.limits = shared.clone();
        }
        routes.push(route);
    }
    // In config order, as `upstream[i]` names them (the router sorts by prefix).
    let route_limits: Vec<LiveRouteLimits> = routes.iter().map(|r| r.limits.clone()).collect();
    // Clones of the routes' own (each shared by every event loop already: one spec).
    let websocket_routes: Vec<Option<WebSocketRoute>> =
        routes.iter().map(|r| r.websocket.clone()).collect();
    let cookie = CookieSettings::new(
        &settings.cookie_name,
        settings.https,
        settings.session_max_age,
    )
    .with_max_ids(settings.max_session_cookies);
    let signer = Signer::new(deps.keyring.clone(), settings.signer.clone());
    let forwarder = Forwarder::new(
        signer,
        &ForwarderSettings {
            session_cookie: cookie.name().to_owned(),
            public_scheme: if settings.https { "https" } else { "http" }.to_owned(),
            public_host: settings.public_host.clone(),
            connect_timeout: settings.connect_timeout,
            // Only the verify_url client uses these (each route has its own).
            pool_max_idle_per_host: settings.verify_pool_max_idle,
            pool_idle_timeout: settings.verify_pool_idle_timeout,
            extra_roots: settings.upstream_roots.clone(),
            verify_extra_roots: settings.verify_roots.clone(),
            verify_client_cert: (settings.reload_from.as_deref())
                .and_then(|c| Some((c.auth.verify_client_cert.as_ref()?, &c.source)))
                .map(|(files, source)| files.load(source))
                .transpose()
                .map_err(|e| StartError::Invalid(e.to_string()))?,
            verify_pool_max_lifetime: settings.verify_pool_max_lifetime,
            verify_answer_head: settings.verify_answer_head,
            verify_url: settings.verify_url.clone(),
            metrics: metrics.clone(),
        },
        &routes,
    )
    .map_err(StartError::Invalid)?;
    // In config order (the router may reorder), as the metrics' upstream indices are.
    let readiness = admin::Readiness::new(
        routes
            .iter()
            .map(|r| {
                let required = !settings.upstreams_not_required_for_ready.contains(&r.name);
                admin::UpstreamProbe::new(r.name.clone(), &r.scheme, r.authority.clone(), required)
            })
            .collect(),
        settings.readiness,
    );
    let router = Router::new(routes);
    // Built once (and again by a reload that applies an edit): a response only clones
    // prebuilt values into its map.
    let response_headers = response_headers
        .unwrap_or_else(|| LiveResponseHeaders::new(&settings.response_headers, settings.https));
    // The files the proxy runs on are loaded now: the baseline of the reload gauges.
    metrics.record_loaded(deps.clock.now_unix());
    Ok(ProxyState {
        clock: deps.clock,
        sessions: deps.sessions,
        throttle: deps.throttle,
        users: deps.users,
        keyring: deps.keyring,
        verify_url: settings.verify_url.clone(),
        verify_timeout: settings.verify_timeout,
        max_login_body: settings.max_login_body,
        max_username_bytes: settings.max_username_bytes,
        max_password_bytes: settings.max_password_bytes,
        max_verify_answer: settings.max_verify_answer,
        metrics,
        router,
        forwarder,
        site: settings.site.clone(),
        response_headers,
        route_limits,
        websocket_routes,
        cookie,
        public_origin: settings.origins.clone(),
        server_settings,
        reload_from: settings.reload_from.clone(),
        config_running: parking_lot::Mutex::new(
            (settings.reload_from.as_ref())
                .map(|config| config.as_loaded.clone())
                .unwrap_or_default(),
        ),
        readiness,
        websockets,
    })
}

/// What every event loop of one proxy shares with the first one's state besides the
/// dependencies ([`ProxyDeps`]): the metrics, and the response headers a reload swaps.
struct SharedByLoops {
    metrics: Arc<Metrics>,
    response_headers: LiveResponseHeaders,
    /// Each route's live limits, in config order.
    route_limits: Vec<LiveRouteLimits>,
    websockets: Arc<websocket::Registry>,
    server_settings: Arc<LiveServerSettings>,
}

// ---------------------------------------------------------------------------------------------
// The request path
// ---------------------------------------------------------------------------------------------

/// What the log line and the metrics need to know about a request, filled in as it goes.
struct RequestLog {
    /// The client's address as resolved (`handle`, step 2): known from the start.
    client: IpAddr,
    route: RouteId,
    user: LogUser,
}

/// An error's text for its log line, with control characters and Unicode line separators
/// escaped (`\n` written as `\\n`). The human log format writes a message as it is, and an
/// error's detail can hold text from elsewhere: an upstream's name from `proxy.toml`, a
/// library's or a peer's error text. A line break there would split the line, and a pipeline
/// reading one line per event would take the rest for an event of its own.
struct OneLine<'a>(&'a ProxyError);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, text: &str) -> fmt::Result {
                for c in text.chars() {
                    if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                        write!(self.0, "{}", c.escape_default())?;
                    } else {
                        fmt::Write::write_char(self.0, c)?;
                    }
                }
                Ok(())
            }
        }
        fmt::Write::write_fmt(&mut Escaping(f), format_args!("{}", self.0))
    }
}

/// One access line (target `countersign::access`, INFO).
fn access_line(
    state: &ProxyState,
    request_id: &HeaderValue,
    method: &Method,
    log: &RequestLog,
    status: u16,
    reason: Option<&str>,
    latency: Duration,
) {
    // The user is recorded as a `&str`, not with `%`: the text format then writes it quoted
    // with control characters escaped (as the JSON format always does), so a user name, or a
    // name typed at a failed login, cannot start a forged line or send terminal escapes. It is
    // decoded only when the line is written.
    if tracing::enabled!(target: "countersign::access", tracing::Level::INFO) {
        let user = log.user.text();
        tracing::info!(
            target: "countersign::access",
            request_id = request_id.to_str().unwrap_or("-"),
            // The address the request was handled as coming from (nginx's `$remote_addr`
            // behind `set_real_ip_from`): the one the API got in `X-Forwarded-For` and the
            // login throttle counted, so a line can be matched with both. `%`: the `IpAddr`
            // itself is recorded, formatted only by the writer; no `String` is made for it here.
            client = %log.client,
            route = state.metrics.route_label(log.route),
            method = %LoggedMethod(method),
            status,
            reason,
            // Whole microseconds: a float of milliseconds prints binary noise (0.4255150000003).
            latency_ms = latency.as_micros() as f64 / 1000.0,
            user = &*user,
        );
    }
}

/// The status an abandoned request is logged and counted with: nginx's "client closed
/// request", which no standard answer uses.
const ABANDONED_STATUS: u16 = 499;

/// A request being handled, until [`InFlight::answered`]. Dropped before that, the handling
/// was abandoned before an answer existed: an HTTP/2 client reset the stream (an aborted
/// fetch, a closed tab, or someone hiding requests; hyper then drops the handling at once),
/// or the connection was dropped at the end of `shutdown_grace`. The request may already have
/// reached the upstream, signed with the user's identity, and the API may have acted on it:
/// it must not vanish from the access log and the metrics. So the drop writes its access line
/// (status 499, reason `abandoned`, the route and user known so far) and counts it under
/// 499. Costs the normal path a flag set and tested; no allocation.
struct InFlight<'a> {
    state: &'a ProxyState,
    request_id: &'a HeaderValue,
    method: &'a Method,
    started: Instant,
    log: RequestLog,
    answered: bool,
}

impl InFlight<'_> {
    /// The handling returned an answer (or an error to answer): the caller logs it.
    fn answered(mut self) -> RequestLog {
        self.answered = true;
        let (client, route) = (self.log.client, self.log.route);
        std::mem::replace(
            &mut self.log,
            RequestLog {
                client,
                route,
                user: LogUser::None,
            },
        )
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let latency = self.started.elapsed();
        self.state
            .metrics
            .record_request(self.log.route, ABANDONED_STATUS, latency);
        access_line(
            self.state,
            self.request_id,
            self.method,
            &self.log,
            ABANDONED_STATUS,
            Some("abandoned"),
            latency,
        );
    }
}

/// Longest method written whole in the access line: every registered method is shorter
/// (`UPDATEREDIRECTREF`, 17 bytes).
const MAX_LOGGED_METHOD: usize = 32;

/// A request method as the access line writes it. A method is any token, as long as the
/// request head allows (`server.max_header_bytes`, 16 KiB by default): written whole, one
/// request would make a 16 KiB line, past the line limit of common collectors (Docker's
/// json-file and journald split longer lines, so one line becomes several, the tail of the
/// method starting a line of its own), and a flood of such requests would be a log flood
/// 100 times the size of the normal access lines. So a longer method is cut to its first
/// [`MAX_LOGGED_METHOD`] bytes, followed by `...` and its length in bytes in brackets
/// (`XXXX...[16000]`: no space, which the human format would read as the field's end, and
/// brackets, which no method can hold). A method is ASCII (a token), so the cut never splits
/// a character.
struct LoggedMethod<'a>(&'a Method);

impl fmt::Display for LoggedMethod<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.as_str();
        match text.get(..MAX_LOGGED_METHOD) {
            Some(head) if text.len() > MAX_LOGGED_METHOD => {
                write!(f, "{head}...[{}]", text.len())
            }
            _ => f.write_str(text),
        }
    }
}

/// The user a request is logged with (`-` for none). A proxied request's user stays encoded
/// (a reference count on the session's identity) and is decoded only if the access log line
/// is written.
#[derive(Default)]
pub(crate) enum LogUser {
    #[default]
    None,
    Name(CompactString),
    Encoded(EncodedIdentity),
}

impl LogUser {
    /// The user as logged: the name, or `-`.
    fn text(&self) -> Cow<'_, str> {
        match self {
            LogUser::None => Cow::Borrowed("-"),
            LogUser::Name(name) => Cow::Borrowed(name.as_str()),
            LogUser::Encoded(identity) => identity
                .user()
                .map_or(Cow::Borrowed("-"), |user| Cow::Owned(user.into_string())),
        }
    }
}

/// The client end of one connection, worked out once per connection rather than per request.
struct Peer {
    addr: SocketAddr,
    /// Its address as the `X-Forwarded-For` value.
    forwarded_for: HeaderValue,
    /// `server.trusted_proxies` as it was when the connection was accepted (None: nobody
    /// trusted; an empty list, only its header to remove: a PROXY header naming no client,
    /// see `accept_loop`). Trust is a property of who is at the other end, settled at the
    /// accept: a reload applies a new list to the connections accepted after it, as the
    /// other connection keys.
    trusted_proxies: Option<Arc<TrustedProxies>>,
    /// `server.max_header_count` as it was when the connection was accepted: the most
    /// distinct field names one of its HTTP/2 requests may carry (its HTTP/1 requests' field
    /// lines are counted by hyper, with the same value in the builder taken at the accept).
    max_header_count: usize,
}

impl Peer {
    fn new(
        addr: SocketAddr,
        trusted_proxies: Option<Arc<TrustedProxies>>,
        max_header_count: usize,
    ) -> Peer {
        Peer {
            addr,
            forwarded_for: forward::forwarded_for_value(addr.ip()),
            trusted_proxies,
            max_header_count,
        }
    }
}

/// An HTTP/2 request with more distinct field names than its connection's
/// `server.max_header_count`, refused (None for any other request).
///
/// hyper counts an HTTP/1 head's field lines against that limit (431, empty body); h2 has no
/// count, only `max_header_bytes` as its header-list size, which near 1 MiB lets ~24,000
/// distinct names through. That many fill a `HeaderMap` (24,576 names at most): the fields
/// the proxy, the signer and hyper's HTTP/1 client add to it then have no room, and
/// `HeaderMap::entry` panics in the upstream connection's task. Bounded here (10,000 at
/// most, the config's ceiling), the map always has that room.
///
/// Distinct names (`keys_len`), not field lines (`len`): an HTTP/2 browser sends its cookies
/// as one `cookie` line per cookie (RFC 9113 §8.2.3), hundreds for some sites, and those are
/// one name, held in one entry; a name's further values cost no entry, and their bytes are
/// bounded by `max_header_bytes`. 400 `bad_request` rather than HTTP/1's 431: the proxy's
/// refusals are `{"error":"<code>"}` answers with a stable code, and none names 431.
#[inline]
fn too_many_h2_field_names(peer: &Peer, req: &Request<Incoming>) -> Option<ProxyError> {
    let names = req.headers().keys_len();
    (names > peer.max_header_count && req.version() == Version::HTTP_2).then(|| {
        ProxyError::BadRequest(format!(
            "request head: {names} distinct field names, more than server.max_header_count \
             ({})",
            peer.max_header_count
        ))
    })
}

/// One request, start to finish. Never fails: every error becomes its HTTP answer here.
async fn handle(
    state: Arc<ProxyState>,
    peer: Arc<Peer>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    // 1. Request id: keep a well-formed one from the client so a trace spans the hops; make
    //    one otherwise (a malformed id could inject into logs downstream).
    let request_id = match req.headers().get(forward::X_REQUEST_ID) {
        Some(id) if forward::valid_request_id(id) => id.clone(),
        _ => forward::new_request_id(),
    };
    let method = req.method().clone();
    let unmatched = state
        .metrics
        .route_id(routes::UNMATCHED)
        .unwrap_or_else(|| state.metrics.upstream_route(0));
    // 2. The client: the connection's peer, unless that is a trusted load balancer naming
    //    the browser in its header (then that browser, for the login throttle, the API's
    //    `X-Forwarded-For` and the access line's `client`). Nothing to read when nobody is
    //    trusted (the default). Once read, the header goes: the API is told the client in the
    //    proxy's own `X-Forwarded-For`, never in the text a client (or its balancer) wrote.
    //    Worked out before the guard below (no await in between), so that an abandoned
    //    request's line names the same client as an answered one's.
    let behind_balancer = match &peer.trusted_proxies {
        Some(trusted) => {
            let client = trusted.client(peer.addr.ip(), req.headers());
            req.headers_mut().remove(trusted.header());
            forward::remove_underscore_spellings(req.headers_mut(), trusted.header());
            client.map(|ip| Peer::new(SocketAddr::new(ip, 0), None, peer.max_header_count))
        }
        None => None,
    };
    let client = behind_balancer.as_ref().unwrap_or(&peer);
    // The request's route and user as they become known, for its access line. Kept by a guard
    // that writes the line (status 499) if the handling is dropped before an answer.
    let mut in_flight = InFlight {
        state: &state,
        request_id: &request_id,
        method: &method,
        started,
        log: RequestLog {
            client: client.addr.ip(),
            route: unmatched,
            user: LogUser::None,
        },
        answered: false,
    };

    // The code of the proxy's own refusal, for the access line (absent when the answer is
    // the upstream's or a success).
    let mut reason = None;
    // 3. Route and run; errors carry their context up to here. First an HTTP/2 request's
    //    count of distinct field names, which nothing else bounds (one comparison).
    let result = match too_many_h2_field_names(&peer, &req) {
        Some(refused) => Err(refused),
        None => dispatch(&state, client, req, &request_id, &mut in_flight.log).await,
    };
    // No await after this: the request is answered from here on.
    let log = in_flight.answered();
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            // 4. The one place errors become answers (status + {"error":code}).
            reason = Some(error.code());
            // Counted by that code too: a status alone cannot tell the proxy's 403 `csrf`
            // from an upstream's 403.
            state.metrics.record_refusal(&error);
            let text = OneLine(&error);
            match &error {
                ProxyError::BadGateway { .. }
                | ProxyError::GatewayTimeout { .. }
                | ProxyError::Internal(_) => {
                    tracing::warn!(request_id = request_id.to_str().unwrap_or("-"), "{text}");
                }
                ProxyError::SessionStore(_) => {
                    tracing::error!(request_id = request_id.to_str().unwrap_or("-"), "{text}")
                }
                _ => tracing::debug!(request_id = request_id.to_str().unwrap_or("-"), "{text}"),
            }
            error_response(&error)
        }
    };
    // 5. One metrics update and one log line per request (latency to the response head; a
    //    streamed body may still be flowing). Never cookies, tokens or bodies — and not the
    //    path either, which can carry tokens (reset links, signed URLs): the route label says
    //    where the request went.
    let latency = started.elapsed();
    let status = response.status().as_u16();
    state.metrics.record_request(log.route, status, latency);
    access_line(&state, &request_id, &method, &log, status, reason, latency);
    // 6. An answer to HEAD has no content (RFC 9110 section 9.3.2). hyper drops it for
    //    HTTP/1, not for HTTP/2, where a DATA frame after the HEAD's answer is a stream error
    //    the browser reports as a network failure. Upstream answers are the upstream's to get
    //    right (passed through); the proxy's own (errors, `/auth/session`) lose their body
    //    here and keep its length.
    if method == Method::HEAD {
        error::strip_head_body(&mut response);
    }
    // 7. Browser security headers (`server.response_headers`) on every answer the proxy made
    //    itself, here so that no handler or error path can miss them; proxied answers pass
    //    untouched unless `response_headers_on_upstream`.
    state.response_headers.apply(&mut response);
    // Moved, not cloned, into the answer: a clone of a freshly made id's bytes allocates.
    response
        .headers_mut()
        .insert(forward::X_REQUEST_ID, request_id);
    response
}

/// RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
/// HTTP/1.1 request message that lacks a Host header field and to any request message that
/// contains more than one Host header field line". The proxy sends the upstream its own
/// `Host`, so what is signed does not depend on it; but a request whose `Host` a server in
/// front of the proxy (a WAF, a balancer routing by name, an access log) read one way must
/// not be served as if it had been well formed. One lookup; HTTP/2 names the authority in
/// `:authority` and needs no `Host`.
fn check_host<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(ProxyError::BadRequest(
            "more than one Host field line (RFC 9112 section 3.2)".to_owned(),
        )),
        (None, _) if req.version() == http::Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request without Host (RFC 9112 section 3.2)".to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Chooses the handler: upgrades, `/auth/*`, upstream routes, static site, 404 — in that order.
async fn dispatch(
    state: &Arc<ProxyState>,
    peer: &Peer,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    // a. RFC 9112 §3.2: 400 for an HTTP/1.1 request without `Host`, and for any request
    //    with more than one `Host` line, as nginx answers, before anything else is decided.
    check_host(&req)?;
    //    Upgrades: a WebSocket handshake on a route with `websocket = true` is proxied; any
    //    other upgrade is refused (501) before any work. Boxed: rare, and its future large.
    if is_upgrade(&req) {
        return Box::pin(websocket_request(state, peer, req, request_id, log)).await;
    }
    // b. A path that an upstream could read differently from the router (dot segments,
    //    `//`, encoded separators) is refused before any route or auth decision on it.
    forward::check_target(req.uri())?;
    // c. The proxy's own endpoints win over any upstream prefix.
    if req.uri().path().starts_with("/auth/") {
        // Boxed, as the static site below: these futures are large (login: password check,
        // verify_url call) and, inline, would make every proxied request's future as large,
        // and it is moved (copied) several times before it first runs.
        return Box::pin(auth_endpoint(state, peer.addr.ip(), req, request_id, log)).await;
    }
    // d. Upstream routes, longest prefix first; a path another server would read as one of
    //    another route (`/%61pi/x`, `/api;x/y` under a public `/`) is refused, or that route's
    //    `auth` could be skipped.
    if let Some(route) = state.router.route(req.uri().path()) {
        state.router.check_reading(req.uri().path(), Some(route))?;
        log.route = route.metrics;
        return proxy_request(state, route, peer, req, request_id, log).await;
    }
    // e. The SPA: static files (client routes fall back to index.html).
    if let Some(site) = &state.site {
        if let Some(id) = state.metrics.route_id(routes::STATIC) {
            log.route = id;
        }
        if routed_once_decoded(state, req.uri().path()) {
            return Err(ProxyError::NotFound);
        }
        return Box::pin(site.serve(req.method(), req.uri(), req.headers())).await;
    }
    Err(ProxyError::NotFound)
}

/// Whether `path`, spelled with percent-escapes or `;` parameters, names once decoded a path
/// that `/auth/` or an upstream route owns: `/%61pi/users` is `/api/users` (RFC 3986
/// §6.2.2.2), and `/api;x/users` is too for a server that drops parameters, which the router,
/// matching the path as received, did not route. The static site decodes paths, so it would
/// answer such a URL with the app's `index.html` (200) or a file of the build under the
/// route's folder: an API URL must never get either. Not rerouted (the signature covers the
/// path as sent); no browser writes these spellings.
fn routed_once_decoded(state: &ProxyState, path: &str) -> bool {
    // Read as the router's check reads it: escapes decoded, `;` parameters dropped, the
    // empty segments that leaves merged.
    forward::normalized_reading(path).is_some_and(|reading| {
        reading.starts_with("/auth/") || state.router.route(&reading).is_some()
    })
}

async fn auth_endpoint(
    state: &ProxyState,
    client_ip: IpAddr,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (label, allow) = match req.uri().path() {
        "/auth/login" => (routes::LOGIN, "POST"),
        "/auth/session" => (routes::SESSION, "GET, HEAD"),
        "/auth/logout" => (routes::LOGOUT, "POST"),
        _ => return Err(ProxyError::NotFound),
    };
    if let Some(id) = state.metrics.route_id(label) {
        log.route = id;
    }
    let (parts, body) = req.into_parts();
    match (label, &parts.method) {
        (routes::LOGIN, &Method::POST) => {
            auth::login(
                state,
                &parts.headers,
                body,
                client_ip,
                request_id,
                &mut log.user,
            )
            .await
        }
        (routes::SESSION, &Method::GET | &Method::HEAD) => {
            auth::session(state, &parts.uri, &parts.headers, &mut log.user).await
        }
        (routes::LOGOUT, &Method::POST) => {
            auth::logout(state, &parts.uri, &parts.headers, &mut log.user).await
        }
        _ => Err(ProxyError::MethodNotAllowed { allow }),
    }
}

/// Sign-and-forward for one upstream route.
async fn proxy_request(
    state: &ProxyState,
    route: &Route,
    peer: &Peer,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let now = state.clock.now_unix();
    let safe = csrf::is_safe_method(&parts.method);
    // A write carrying the CSRF token: an upstream's redirect of it to another origin would
    // take the token there (step vi). Reads never carry it, so the hot GET path skips the
    // lookup.
    let guard_redirects = !safe
        && route.cross_origin_redirects == CrossOriginRedirects::Refuse
        && parts.headers.contains_key(csrf::CSRF_HEADER);
    // The route's limits (`timeout`, `max_body`, `body_idle_timeout`) as they are when the
    // request starts: one `arc_swap` load; a reload that changes them meanwhile reaches the
    // requests that start after it.
    let limits = route.limits.get();

    // i. Cross-origin state-changing requests are refused first, before the session is even
    //    looked up: with a `SameSite=Strict` cookie a forged request arrives without a
    //    session, and it must still be answered as what it is (403 csrf), not as a login
    //    prompt.
    if !safe {
        csrf::check_origin(&parts.headers, &state.public_origin)?;
    } else if route.auth_required {
        // A read of a session route from another origin (a same-site sibling page gets the
        // cookie sent): refused before the session is looked up (and extended), so it never
        // reaches the API signed as the user (`csrf::check_read_origin`).
        csrf::check_read_origin(&parts.headers, &state.public_origin)?;
    }
    // A field the signature covers must be signable (ASCII) before the session is touched.
    forward::check_covered_fields(
        &parts.headers,
        &state.forwarder.signer().config().extra_headers,
    )?;
    // So must the body's framing be one the proxy can pass on (`chunked` alone): under
    // `gzip, chunked` the upstream would get the still-gzipped bytes as the content. hyper
    // gives a request with `Transfer-Encoding` a body that is not yet over, so a bodiless
    // request (most GETs) skips the field's lookup.
    if !body.is_end_stream() {
        forward::check_transfer_coding(&parts.headers)?;
    }

    // ii. Session (required routes only; public routes never carry an identity, so they need
    //     no lookup). A rejected request must not extend the session, so the idle timer is
    //     touched in the same lookup only when nothing can reject the request later (a safe
    //     method without a body); otherwise after the checks, in step iv. State-changing
    //     requests must also present the session's CSRF token.
    let touch_now = safe && body.is_end_stream();
    let session = if route.auth_required {
        let (id, session) = auth::current_request_session(state, &parts.headers, now, touch_now)
            .await?
            .ok_or(ProxyError::Unauthenticated)?;
        log.user = LogUser::Encoded(session.identity.clone());
        if !safe {
            csrf::check_token_with(&parts.headers, |token| session.csrf_matches(token))?;
        }
        Some((id, session))
    } else {
        None
    };

    // iii. The body, within the route's limit and the client time limit: the signature covers
    //      its digest, so it is read before anything goes upstream (413 with no upstream
    //      contact).
    //      A request without a body (most GETs) has nothing to wait for: no timer, no
    //      collect, no share of `server.max_body_memory`, no client looked up. A body takes
    //      its share as it arrives and keeps it until the forward is done (`body_share`
    //      lives to the end of this function), so the bodies of all requests in flight stay
    //      within the cap, and each client's within `server.max_body_memory_per_client`:
    //      the session's user on this route if it requires one (known since step ii), else
    //      the client address. A refusal here (413, 429, 503) comes before step iv: the
    //      session is not touched.
    let mut body_share = None;
    let body = if body.is_end_stream() {
        bytes::Bytes::new()
    } else {
        // The name decoded (held inline up to 24 bytes): a session's identity always has one.
        let user = session
            .as_ref()
            .and_then(|(_, session)| session.identity.user());
        let client = match user {
            Some(user) => ClientKey::User(user),
            None => ClientKey::address(peer.addr.ip()),
        };
        let share = body_share.insert(state.server_settings.body_share(client));
        tokio::time::timeout(
            state.request_timeout(),
            forward::read_body(&parts.headers, body, limits.max_body, share),
        )
        .await
        .map_err(|_| ProxyError::RequestTimeout)??
    };

    // The clock again, after the body: reading it can take up to the request timeout, and
    // what follows must see the time it runs at. The re-check (iv) would otherwise judge the
    // session at the request's start, so one whose idle or absolute timeout passed while the
    // body trickled in would still be forwarded, signed as its user; and the signature's
    // `created` (v) is when it is made, not when the request began: dated from before a slow
    // body, it would reach the upstream already older than the window it verifies against.
    // One reading for both, so the signature is dated at the second the session was last
    // found live at. A safe request without a body had its only check (ii) at the first
    // reading and waited for nothing since: that reading stands, for the same reason.
    let now = if touch_now {
        now
    } else {
        state.clock.now_unix()
    };

    // iv. Every check passed: now the session may be extended (and is re-read, at the time
    //     now, so a logout or an expiry that happened while the body arrived is honoured).
    let identity = match session {
        Some((id, _)) if !touch_now => Some(
            auth::request_session(state, &id, now, true)
                .await?
                .ok_or(ProxyError::Unauthenticated)?
                .into_identity(),
        ),
        Some((_, session)) => Some(session.into_identity()),
        None => None,
    };

    // v. Sign and send through the pool; the response body streams back untouched.
    let result = state
        .forwarder
        .forward_within(
            route,
            limits,
            parts,
            body,
            ForwardContext {
                identity: identity.as_ref(),
                forwarded_for: &peer.forwarded_for,
                request_id,
                now,
                clock: &*state.clock,
            },
        )
        .await;

    // vi. A redirect the browser would follow to another origin, taking the write's CSRF
    //     token along (`XMLHttpRequest` cannot refuse to follow): refused, the answer dropped
    //     (its connection closes unless it was already read to its end).
    let result = match result {
        Ok(response) if guard_redirects => {
            match csrf::redirect_leaves_origin(
                response.status(),
                response.headers(),
                &state.public_origin,
            ) {
                Some(origin) => Err(ProxyError::BadGateway {
                    upstream: route.name.clone(),
                    detail: format!(
                        "answered a write that carried X-CSRF-Token with a {} to another \
                         origin ({origin}), where the browser would take the token: refused \
                         (upstream[].cross_origin_redirects = \"pass\" passes it on)",
                        response.status().as_u16()
                    ),
                }),
                None => Ok(response),
            }
        }
        other => other,
    };
    record_forwarded(&state.metrics, &result);
    result
}

/// A WebSocket handshake (`websocket.rs`): the checks of a proxied `GET` (path, session)
/// plus the handshake's own (`Origin`, the route's limit), then signed and sent upstream on a
/// connection of its own; a `101` answer splices the two connections.
async fn websocket_request(
    state: &Arc<ProxyState>,
    peer: &Peer,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    // `/auth/` is the proxy's own, upgrade or not (as in `dispatch`): a route `/` with
    // `websocket = true` must not get a signed handshake for a path it never serves.
    if !websocket::is_websocket_upgrade(&req) || req.uri().path().starts_with("/auth/") {
        return Err(ProxyError::WebSocketUnsupported);
    }
    forward::check_target(req.uri())?;
    let route = (state.router.route(req.uri().path())).ok_or(ProxyError::WebSocketUnsupported)?;
    // As for any proxied request: no other route's path in another spelling.
    state.router.check_reading(req.uri().path(), Some(route))?;
    let settings = route
        .websocket
        .as_ref()
        .ok_or(ProxyError::WebSocketUnsupported)?;
    // A route that proxies WebSockets: a handshake with a body is malformed (400), not an
    // upgrade the route lacks (501, which tells an operator to set `websocket = true`).
    if !req.body().is_end_stream() {
        return Err(ProxyError::BadRequest(
            "a WebSocket handshake carries no body".to_owned(),
        ));
    }
    // A route that proxies WebSockets: the handshake must be RFC 6455's version 13 (426
    // otherwise, naming 13) with a proper key (400).
    websocket::check_version_and_key(req.headers())?;
    log.route = route.metrics;
    websocket::check_origin(req.headers(), &state.public_origin)?;
    forward::check_covered_fields(
        req.headers(),
        &state.forwarder.signer().config().extra_headers,
    )?;
    // Before the session lookup, which touches the session's idle timer: a refused handshake
    // changes no state.
    let limits = settings.limits();
    let mut slot = websocket::OpenSlot::take(settings, &limits, &state.websockets)?;
    let now = state.clock.now_unix();
    let session = if route.auth_required {
        // Looked up untouched first: the user's own limit needs the user, and a handshake it
        // refuses must not extend the session's idle timer either. Once counted, the lookup
        // that touches it (and sees a logout since, as any request would).
        let (id, session) = auth::current_request_session(state, req.headers(), now, false)
            .await?
            .ok_or(ProxyError::Unauthenticated)?;
        log.user = LogUser::Encoded(session.identity.clone());
        slot.take_for_user(session.identity.user_value().as_bytes())?;
        let session = auth::request_session(state, &id, now, true)
            .await?
            .ok_or(ProxyError::Unauthenticated)?;
        Some((id, session.into_identity()))
    } else {
        None
    };
    let client = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    // The upstream's whole answer (a refusal's body included) is due within the route's
    // `timeout` from here.
    let answer_by = tokio::time::Instant::now() + route.limits.get().timeout;
    let result = state
        .forwarder
        .forward_upgrade(
            route,
            parts,
            ForwardContext {
                identity: session.as_ref().map(|(_, identity)| identity),
                forwarded_for: &peer.forwarded_for,
                request_id,
                now,
                clock: &*state.clock,
            },
        )
        .await;
    record_forwarded(&state.metrics, &result);
    let splice = websocket::Splice {
        state: Arc::clone(state),
        settings: limits,
        session: session.map(|(id, _)| id),
        slot,
        route: route.name.clone(),
        answer_by,
    };
    let answered =
        websocket::answer(client, result?, state.forwarder.session_cookie(), splice).await;
    // The upstream answered in time but not usably: a `101` without `Upgrade: websocket`
    // (502), or a refusal whose body stalled past the route's `timeout` (504) or broke (502).
    // As much an upstream failure as a head that never came, which `record_forwarded`
    // counted above: the operator's `countersign_upstream_errors_total` must not miss the
    // WebSocket routes' failures. (Its signature was counted there already.)
    if matches!(
        answered,
        Err(ProxyError::BadGateway { .. } | ProxyError::GatewayTimeout { .. })
    ) {
        state.metrics.record_upstream_error();
    }
    answered
}

/// Counts a forwarding's signature (also when the upstream then failed: it was signed) and an
/// upstream that failed before its answer's head.
fn record_forwarded<T>(metrics: &Metrics, result: &Result<T, ProxyError>) {
    match result {
        Ok(_) => metrics.record_signature(),
        Err(ProxyError::BadGateway { .. } | ProxyError::GatewayTimeout { .. }) => {
            metrics.record_signature();
            metrics.record_upstream_error();
        }
        Err(_) => {}
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    // HTTP/1.1 `Upgrade` (WebSocket and the like), or HTTP/2 extended CONNECT (RFC 8441). An
    // `Upgrade` is only asked for when `Connection` lists `upgrade` (RFC 9110 §7.8: a sender
    // of `Upgrade` must list it; hyper, which hands over the connection only on a 101, agrees)
    // and never over HTTP/1.0 (a server must ignore it there). Without, or as an offer to
    // upgrade to h2c (what `curl --http2` sends over http://), the field is only an offer: the
    // request is answered as it is, and the hop-by-hop field dropped when forwarding.
    // The `Upgrade` field is looked at before `Connection`: almost no request carries it, so
    // the common request pays one lookup and never parses `Connection`'s list.
    let upgrade = req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(http::header::UPGRADE)
            .iter()
            .any(|v| {
                v.to_str().map_or(true, |v| {
                    v.split(',').any(|p| !p.trim().eq_ignore_ascii_case("h2c"))
                })
            })
        && websocket::has_token(req.headers(), http::header::CONNECTION, "upgrade");
    upgrade || req.method() == Method::CONNECT
}

// ---------------------------------------------------------------------------------------------
// Listeners and connections
// ---------------------------------------------------------------------------------------------

/// The reload of SIGHUP and of a file-change check (`trigger`, the first word of each log
/// line): reloads the chosen `parts` of the keyring and the users file
/// ([`ProxyState::reload_files`]) and the TLS certificate and key
/// ([`ProxyServer::reload_tls`]), and logs one line per file (the TLS pair counts as one), so
/// each failure is an error line of its own; then ends the sessions of the users the users
/// file removed or changed ([`ProxyState::end_sessions_of`], on this loop: the store is async).
/// The files are read off the event loop: loading a users file computes an argon2 hash (the
/// dummy one for unknown users), up to `auth.max_hash_memory` and `max_hash_iterations`, and
/// reading and parsing the TLS files is file I/O too; either would stall this loop's
/// connections.
async fn reload_and_log(
    state: &Arc<ProxyState>,
    tls: Option<&TlsHandle>,
    parts: ReloadParts,
    trigger: &'static str,
) {
    let reloading = Arc::clone(state);
    let tls = tls.filter(|_| parts.tls).cloned();
    let reload = move || {
        let (mut report, mut failed_parts) = reloading.reload_parts(parts);
        match tls.as_ref().map(|tls| tls.reload(&reloading.metrics)) {
            Some(Ok(loaded)) => report.loaded.push(loaded),
            Some(Err(failed)) => {
                report.failed.push(failed);
                failed_parts.tls = true;
            }
            None => {}
        }
        // The client certificates presented to upstreams.
        if let (true, Some(config)) = (parts.client_certs, &reloading.reload_from) {
            for reloaded in config.reload_client_certs() {
                match reloaded {
                    Ok(loaded) => report.loaded.push(loaded),
                    Err(failed) => {
                        report.failed.push(failed);
                        failed_parts.client_certs = true;
                    }
                }
            }
        }
        // The config file: compared with the settings running; its live keys are applied
        // below (on the loop, after this read), the others wait for a restart.
        let config_now = (reloading.reload_from.as_ref())
            .filter(|_| parts.config)
            .map(|config| {
                let running = reloading.config_running.lock().clone();
                config.compare_file_with(&running)
            });
        (report, failed_parts, config_now)
    };
    let (report, failed_parts, config_now) = match tokio::task::spawn_blocking(reload).await {
        Ok(done) => done,
        Err(e) => (
            ReloadReport {
                failed: vec![format!(
                    "reload failed, keeping the current keys, users and certificate: {e}"
                )],
                ..ReloadReport::default()
            },
            parts,
            None,
        ),
    };
    // A reload that read no file (only proxy.toml changed) says nothing of the files; one
    // that read some says nothing of the others (a broken keyring stays failing while only
    // the users file is read).
    if parts.reads_files() {
        (state.metrics).record_reload(parts, failed_parts, state.clock.now_unix());
    }
    if let (Some(config), Some(now)) = (&state.reload_from, config_now) {
        report_config_file_now(state, config, now, trigger);
    }
    for loaded in &report.loaded {
        tracing::info!("{trigger}: reloaded {loaded}");
    }
    for failed in &report.failed {
        tracing::error!("{trigger}: {failed}");
    }
    // Back on the runtime: `delete_user` is async (Redis I/O), so the sessions are ended here,
    // after the blocking part computed whose, and before the next reload can start.
    end_sessions_and_log(state, &report.users_changed, trigger).await;
}

/// The most changed keys of the config file one log line names.
const MAX_CHANGED_KEYS_LOGGED: usize = 12;

/// `keys` for a log line: `N key(s): a, b, c` (at most [`MAX_CHANGED_KEYS_LOGGED`] named).
fn key_list(keys: &[String]) -> String {
    let shown = keys
        .get(..MAX_CHANGED_KEYS_LOGGED)
        .unwrap_or(keys)
        .join(", ");
    let more = keys.len().saturating_sub(MAX_CHANGED_KEYS_LOGGED);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "{} key{}: {shown}{more}",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" }
    )
}

/// Acts on what [`ProxyConfig::compare_file_with`] found, then reports it in the config-file
/// gauges and (so a scrape after a line shows what it says) in the log:
/// - the file as the proxy runs it: nothing said;
/// - a valid file with changed keys: the live ones ([`LIVE_KEYS`](super::config::LIVE_KEYS)
///   and each upstream's [`LIVE_UPSTREAM_KEYS`]: [`apply_live_keys`]) are applied on every event
///   loop at once, and an info line names them; a warning names the others, which wait for a
///   restart (the operator who edited the file and sent SIGHUP expects them applied). A mixed
///   edit applies its live part: docs/OPERATIONS.md, "Signals", says why;
/// - a file that would not even start the proxy (found now, not at the next restart): an
///   error, nothing applied, and only the "invalid" gauge set (the "changed" one is 0: a
///   restart would fail, not apply a key).
///
/// Never the values: a key can hold a Redis password.
fn report_config_file_now(
    state: &ProxyState,
    config: &ProxyConfig,
    now: ConfigFileNow,
    trigger: &str,
) {
    let file = config.source.display();
    match now {
        ConfigFileNow::Unchanged => state.metrics.record_config_file(false, false),
        ConfigFileNow::Changed(changed) => {
            let (applied, waiting) = apply_live_keys(state, config, changed);
            state.metrics.record_config_file(!waiting.is_empty(), false);
            // Said apart: the keys a connection takes when it is accepted (the open ones keep
            // theirs), and the upstreams' connect timeouts (for the connections made).
            let (connections, applied): (Vec<String>, Vec<String>) =
                applied.into_iter().partition(|key| {
                    live_key_of(key).is_some_and(|l| LIVE_CONNECTION_KEYS.contains(&l))
                });
            let (connects, applied): (Vec<String>, Vec<String>) =
                applied.into_iter().partition(|key| {
                    live_upstream_key_of(key).is_some_and(|(_, l)| l == "connect_timeout")
                });
            let (limits, applied): (Vec<String>, Vec<String>) =
                applied.into_iter().partition(|key| {
                    live_key_of(key).is_some_and(|l| LIVE_CONNECTION_LIMIT_KEYS.contains(&l))
                });
            if !applied.is_empty() {
                tracing::info!(
                    "{trigger}: {file}: applied {} (from now on)",
                    key_list(&applied)
                );
            }
            if !connections.is_empty() {
                tracing::info!(
                    "{trigger}: {file}: applied {} (applies to connections accepted from now on; \
                     connections already open keep the values they started with)",
                    key_list(&connections)
                );
            }
            if !connects.is_empty() {
                tracing::info!(
                    "{trigger}: {file}: applied {} (applies to upstream connections made from now \
                     on; pooled connections are unaffected)",
                    key_list(&connects)
                );
            }
            if !limits.is_empty() {
                tracing::info!(
                    "{trigger}: {file}: applied {} (applies to connections accepted from now on; \
                     no open connection is closed: below a lower limit, new connections are \
                     refused until fewer than the limit are open)",
                    key_list(&limits)
                );
            }
            if !waiting.is_empty() {
                let also = if applied.is_empty()
                    && connections.is_empty()
                    && connects.is_empty()
                    && limits.is_empty()
                {
                    ""
                } else {
                    " (the keys applied live are not among them)"
                };
                tracing::warn!(
                    "{trigger}: {file} changed since the proxy started ({}): the running proxy \
                     keeps these settings{also}; restart it to apply them, after \
                     `countersign check-config --config {file}` ({RELOAD_APPLIES_ONLY})",
                    key_list(&waiting),
                );
            }
        }
        ConfigFileNow::Invalid(error) => {
            // Not "changed" too: that gauge says a restart would apply something, and a
            // restart now would fail. No key is known to wait until the file is valid again
            // (what the next comparison then says); meanwhile the one to act on is "invalid".
            state.metrics.record_config_file(false, true);
            tracing::error!(
                "{trigger}: {error}: the config file as it is now would not start the proxy; \
                 the running proxy keeps its settings and applies none of the file's"
            );
        }
    }
}

/// Applies the live keys of a valid, changed config file, each group whole: the response
/// headers, swapped for every event loop; the login throttle's limits, set on the throttle all
/// event loops share (from their next login attempt on); the session lifetimes, set on the
/// session store all event loops share (for the sessions already issued too); each upstream's
/// `timeout`, `max_body` and `body_idle_timeout`, swapped for every event loop's copy of the
/// route (for the requests that start from now on); each WebSocket route's `websocket_*`
/// limits (`max_open` for the handshakes from now on; the timeouts for the WebSockets open
/// already too) and `server.websocket_max_open` (for the handshakes from now on); `static_dir`'s
/// limits; the server's timeouts and head limits ([`LiveServerSettings`]: `request_timeout`
/// for the requests from now on, `shutdown_grace` for a shutdown from now on, the others for
/// the connections accepted from now on), the listeners' connection limits (for the
/// connections accepted from now on: none open is closed) and each upstream's
/// `connect_timeout` (for the connections made from now on); and the baseline the next
/// comparison starts from. Returns the keys applied and those waiting for a restart.
///
/// A group whose meaning depends on a key that is not live waits for the restart with it:
/// the headers while `server.public_origin` changed scheme (HSTS is checked against it), an
/// upstream's limits while its `name` or `prefix` changed (the entry may be another upstream
/// now), its WebSocket limits also while `websocket` is turned on or off, the static limits
/// while `server.static_dir` changed, `server.max_connections` while `server.listen` changed,
/// `admin.max_connections` and `admin.allowed_hosts` while `admin.listen` changed, and the
/// server's live keys (with `trusted_proxies`) while `server.proxy_protocol` changed.
/// The throttle's limits and the session lifetimes depend on no other key.
fn apply_live_keys(
    state: &ProxyState,
    running: &ProxyConfig,
    changed: ChangedFile,
) -> (Vec<String>, Vec<String>) {
    let ChangedFile { keys, now } = changed;
    let https = running.server.public_origin.is_https();
    let headers_apply = now.server.public_origin.is_https() == https;
    // `trusted_proxies` names, while `proxy_protocol` is on, the balancers whose PROXY header
    // the listener reads; `proxy_protocol` waits for a restart, so the server group does too
    // when it changed (a list applied alone, emptied with it, refused every connection).
    let server_apply = now.server.proxy_protocol == running.server.proxy_protocol;
    let static_dir = match &state.site {
        Some(Site::Dir(dir)) if now.server.static_dir == running.server.static_dir => Some(dir),
        _ => None,
    };
    // The upstreams whose live limits can apply: the same entry on both sides.
    let same_upstream = |i: usize| match (running.upstreams.get(i), now.upstreams.get(i)) {
        (Some(a), Some(b)) => {
            a.name == b.name && a.prefix == b.prefix && state.route_limits.get(i).is_some()
        }
        _ => false,
    };
    // The upstreams whose live WebSocket limits can apply: the same entry, with
    // `websocket = true` running and in the file.
    let same_websocket_upstream = |i: usize| {
        same_upstream(i)
            && matches!(state.websocket_routes.get(i), Some(Some(_)))
            && now.upstreams.get(i).is_some_and(|u| u.websocket.is_some())
    };
    let (mut headers, mut throttle, mut sessions, mut statics) = (false, false, false, false);
    let (mut websocket_max_open, mut server_keys) = (false, false);
    let (mut max_connections, mut admin_max_connections) = (false, false);
    let mut admin_hosts = false;
    // Each listener's limit while it is the listener running (a limit edited with its
    // `listen` is for the new listener: it waits for the restart with it).
    let main_same = now.server.listen == running.server.listen;
    let admin_same = now.admin.listen == running.admin.listen;
    let mut upstreams: Vec<usize> = Vec::new();
    let mut websocket_upstreams: Vec<usize> = Vec::new();
    let (applied, waiting): (Vec<String>, Vec<String>) =
        keys.into_iter().partition(|key| match live_key_of(key) {
            Some(live) if LIVE_HEADER_KEYS.contains(&live) && headers_apply => {
                headers = true;
                true
            }
            Some(live) if LIVE_THROTTLE_KEYS.contains(&live) => {
                throttle = true;
                true
            }
            Some(live) if LIVE_SESSION_KEYS.contains(&live) => {
                sessions = true;
                true
            }
            Some(live) if LIVE_STATIC_KEYS.contains(&live) && static_dir.is_some() => {
                statics = true;
                true
            }
            Some(live) if LIVE_WEBSOCKET_KEYS.contains(&live) => {
                websocket_max_open = true;
                true
            }
            Some(live) if LIVE_SERVER_KEYS.contains(&live) && server_apply => {
                server_keys = true;
                true
            }
            Some(live) if live == LIVE_CONNECTION_LIMIT_KEYS[0] && main_same => {
                max_connections = true;
                true
            }
            Some(live) if live == LIVE_CONNECTION_LIMIT_KEYS[1] && admin_same => {
                admin_max_connections = true;
                true
            }
            // The names of the listener running (edited with `admin.listen`, they are for the
            // new listener and wait for the restart with it).
            Some(live) if LIVE_ADMIN_KEYS.contains(&live) && admin_same => {
                admin_hosts = true;
                true
            }
            Some(_) => false,
            None => match live_upstream_key_of(key) {
                Some((i, live))
                    if LIVE_UPSTREAM_WEBSOCKET_KEYS.contains(&live)
                        && same_websocket_upstream(i) =>
                {
                    if !websocket_upstreams.contains(&i) {
                        websocket_upstreams.push(i);
                    }
                    true
                }
                Some((i, live)) if LIVE_UPSTREAM_KEYS.contains(&live) && same_upstream(i) => {
                    if !upstreams.contains(&i) {
                        upstreams.push(i);
                    }
                    true
                }
                _ => false,
            },
        });
    let mut taken: Vec<String> = Vec::new();
    let (mut applied, mut waiting) = (applied, waiting);
    if sessions {
        // All three at once (an unchanged one is as running), checked with the rest of the
        // file (`absolute_timeout` >= `idle_timeout`, `redis_touch_interval`).
        let timeouts = SessionTimeouts {
            idle: now.session.idle_timeout,
            absolute: now.session.absolute_timeout,
        };
        if state.sessions.set_timeouts(timeouts)
            && (state.sessions).set_max_sessions_per_user(now.session.max_sessions_per_user)
        {
            taken.extend(LIVE_SESSION_KEYS.map(str::to_owned));
        } else {
            // A store without live lifetimes: they wait for the restart.
            let (stay, wait): (Vec<String>, Vec<String>) = applied
                .into_iter()
                .partition(|key| live_key_of(key).is_none_or(|l| !LIVE_SESSION_KEYS.contains(&l)));
            applied = stay;
            waiting.extend(wait);
            waiting.sort();
        }
    }
    if headers {
        state
            .response_headers
            .replace(&now.server.response_headers, https);
        taken.extend(LIVE_HEADER_KEYS.map(str::to_owned));
    }
    if throttle {
        // All four at once (unchanged ones are as running): the file's `[auth.throttle]`,
        // checked with the rest of the file.
        state.throttle.set_limits(now.auth.throttle);
        taken.extend(LIVE_THROTTLE_KEYS.map(str::to_owned));
    }
    if let (true, Some(dir)) = (statics, static_dir) {
        dir.set_limits(
            StaticLimits {
                max_file_bytes: now.server.max_static_file,
                immutable_prefixes: now.server.static_immutable.clone().into(),
            },
            now.server.static_cache_size,
        );
        taken.extend(LIVE_STATIC_KEYS.map(str::to_owned));
    }
    for i in upstreams {
        if let (Some(live), Some(upstream)) = (state.route_limits.get(i), now.upstreams.get(i)) {
            live.set(RouteLimits {
                timeout: upstream.timeout,
                max_body: upstream.max_body,
                body_idle_timeout: upstream.body_idle_timeout,
                connect_timeout: upstream.connect_timeout,
            });
            taken.extend(LIVE_UPSTREAM_KEYS.map(|key| format!("upstream[{i}].{key}")));
        }
    }
    for i in websocket_upstreams {
        let running = state.websocket_routes.get(i).and_then(Option::as_ref);
        let file = (now.upstreams.get(i)).and_then(|upstream| upstream.websocket.as_ref());
        if let (Some(running), Some(file)) = (running, file) {
            // All at once (unchanged ones are as running), checked with the file.
            running.set_limits(file.limits());
            taken.extend(LIVE_UPSTREAM_WEBSOCKET_KEYS.map(|key| format!("upstream[{i}].{key}")));
        }
    }
    if websocket_max_open {
        // Both at once (an unchanged one is as running), checked with the file.
        (state.websockets).set_max_open(
            now.server.websocket_max_open,
            now.server.websocket_max_open_per_user,
        );
        taken.extend(LIVE_WEBSOCKET_KEYS.map(str::to_owned));
    }
    if server_keys {
        // All at once (unchanged ones are as running), checked with the file.
        state.server_settings.set(&now.server);
        taken.extend(LIVE_SERVER_KEYS.map(str::to_owned));
    }
    if max_connections {
        (state.server_settings.main_connections).set_limit(now.server.max_connections);
        taken.push(LIVE_CONNECTION_LIMIT_KEYS[0].to_owned());
    }
    if admin_max_connections {
        (state.server_settings.admin_connections).set_limit(now.admin.max_connections);
        taken.push(LIVE_CONNECTION_LIMIT_KEYS[1].to_owned());
    }
    if admin_hosts {
        (state.server_settings.admin_allowed_hosts)
            .store(Arc::new(now.admin.allowed_hosts.clone()));
        taken.extend(LIVE_ADMIN_KEYS.map(str::to_owned));
    }
    if !taken.is_empty() {
        let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
        let mut baseline = state.config_running.lock();
        *baseline = baseline.with_keys_from(&now.as_loaded, &taken);
    }
    (applied, waiting)
}

/// Ends the sessions of the users a reload removed or changed ([`ProxyState::end_sessions_of`])
/// and logs it: one info line with the counts and names (never hashes), one error line when
/// the store failed for some (the file stays reloaded: those users cannot log in again as
/// before, and proxies on this file refuse their sessions, but those stay in the store, and
/// valid for proxies on an older file, until they expire unless revoked by hand).
async fn end_sessions_and_log(state: &ProxyState, changes: &UserChanges, trigger: &str) {
    if changes.is_empty() {
        return;
    }
    let ended = state.end_sessions_of(changes).await;
    if ended.users > 0 {
        tracing::info!(
            "{trigger}: auth.users_file changed {} users ({changes}): ended {} sessions of {} \
             users",
            changes.len(),
            ended.sessions,
            ended.users,
        );
    }
    if !ended.failed.is_empty() {
        tracing::error!(
            "{trigger}: auth.users_file is reloaded, but ending the sessions of {} of its {} \
             changed users failed ({}): {}; their sessions stay in the store until they \
             expire (refused by proxies on this file, still accepted by any on an older one): \
             end them with POST /admin/users/{{name}}/revoke",
            ended.failed.len(),
            changes.len(),
            NameList(&ended.failed),
            ended
                .error
                .as_deref()
                .unwrap_or("session store unavailable"),
        );
    }
}

/// Fails with `EADDRINUSE` when any socket holds `addr` (a listener with or without
/// `SO_REUSEPORT`), else returns the address with its port resolved (port 0: the port the
/// kernel gave the probe). The probe is a plain bind without `SO_REUSEPORT`, which the kernel
/// refuses next to any listener on that address, reuseport group or not; with `SO_REUSEADDR`,
/// so that connections of a previous instance left in TIME_WAIT do not count as "in use". It
/// is closed again (without listening) before the group binds.
///
/// The race: between the probe's close and the group's `listen` (a few syscalls, no await)
/// another process could bind the address. A plain listener there makes the group's bind fail
/// with `EADDRINUSE` as it should; only a second reuseport group started in the same instant
/// (two `run`s racing on one address) could join unnoticed. That is acceptable: the kernel has
/// no exclusive reuseport group, so any process of the same user that sets `SO_REUSEPORT` can
/// join a group later anyway; this check is against the accidental second instance, which a
/// supervisor or an operator starts seconds apart, not within microseconds.
fn probe_exclusive(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let probe = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    probe.set_reuseaddr(true)?;
    probe.bind(addr)?;
    probe.local_addr()
}

/// A TCP socket bound to `addr` with `SO_REUSEPORT`, so several event loops can each accept
/// on their own socket and the kernel spreads connections over them.
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// One extra event loop of [`ProxyServer::start_per_core`], on its own OS thread.
fn serve_thread(
    socket: tokio::net::TcpSocket,
    settings: ProxySettings,
    deps: ProxyDeps,
    shared: SharedByLoops,
    tls: Option<TlsHandle>,
    connections: Arc<ConnectionLimit>,
    shutdown: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("server thread: cannot start its runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match socket.listen(1024) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("server thread: cannot listen: {e}");
                return;
            }
        };
        // Same inputs as the first event loop's state, which was built successfully.
        let state = match build_state(&settings, deps, Some(shared)) {
            Ok(state) => Arc::new(state),
            Err(e) => {
                tracing::error!("server thread: {e}");
                return;
            }
        };
        let live = state.server_settings.clone();
        let limits = ConnLimits {
            connections,
            settings: live.clone(),
            proxy_protocol: settings
                .proxy_protocol
                .then_some(settings.proxy_protocol_max_bytes),
        };
        let websockets = state.websockets.clone();
        accept_loop(listener, tls, limits, shutdown, move |peer, req| {
            handle(state.clone(), peer, req)
        })
        .await;
        // This loop's WebSockets run on this runtime: the first loop's shutdown closes them,
        // this one keeps them running until they are closed (or dropped at the grace's end).
        websockets.wait_closed(live.shutdown_grace()).await;
    });
}

#[derive(Debug, Clone)]
struct ConnLimits {
    /// Shared by every event loop of one listener, so the limit is per proxy, not per thread.
    connections: Arc<ConnectionLimit>,
    /// Shared by every event loop and listener of one proxy: each connection takes the
    /// timeouts current when it is accepted, the shutdown its grace when it starts.
    settings: Arc<LiveServerSettings>,
    /// Every connection starts with a PROXY header (`server.proxy_protocol`; never on the
    /// admin listener): Some(the longest v2 address block and TLVs read,
    /// `server.proxy_protocol_max_bytes`).
    proxy_protocol: Option<usize>,
}

/// The server's own timeouts and limits a reload may change (the
/// [`LIVE_SERVER_KEYS`](super::config::LIVE_SERVER_KEYS) and the
/// [`LIVE_CONNECTION_LIMIT_KEYS`](super::config::LIVE_CONNECTION_LIMIT_KEYS)), shared by every
/// event loop and listener of one proxy; [`LiveServerSettings::set`] changes the first all at
/// once, [`ConnectionLimit::set_limit`] each listener's limit.
/// - `request_timeout`: an atomic, loaded when a request starts reading its body (so a
///   request that starts after a reload has the new value);
/// - `shutdown_grace`: an atomic, loaded when the shutdown starts;
/// - `header_read_timeout`, `send_timeout`, `http2_idle_timeout` and the hyper builders
///   `header_read_timeout`, `max_header_bytes`, `max_header_count`,
///   `http2_max_concurrent_streams` and `http1_half_close` are set in ([`ConnSettings`]): one
///   `arc_swap` load per connection accepted, which keeps them for its whole life.
///   Connections open before a reload keep the values they started with (like nginx's old
///   workers after a reload);
/// - each listener's [`ConnectionLimit`], counted when a connection is accepted and closed.
#[derive(Debug)]
pub(crate) struct LiveServerSettings {
    /// Nanoseconds (durations are bounded to 365 days: they fit).
    request_timeout: std::sync::atomic::AtomicU64,
    /// Nanoseconds.
    shutdown_grace: std::sync::atomic::AtomicU64,
    connections: ArcSwap<ConnSettings>,
    /// `server.max_connections`, shared by every event loop of the main listener.
    main_connections: Arc<ConnectionLimit>,
    /// `admin.max_connections`.
    admin_connections: Arc<ConnectionLimit>,
    /// `admin.allowed_hosts`: read per admin request ([`admin::handle`]).
    admin_allowed_hosts: ArcSwap<Vec<String>>,
    /// `server.max_body_memory`: request bodies, shared by every event loop.
    pub(crate) body_memory: BodyMemory,
    /// `server.max_body_memory_per_client`: the bytes of `body_memory` each client holds.
    pub(crate) client_body_memory: ClientBodyMemory,
}

/// What one connection runs with, taken when it is accepted.
#[derive(Debug)]
struct ConnSettings {
    header_read_timeout: Duration,
    http2_idle_timeout: Duration,
    /// `server.http2_max_reset_streams` ([`CancelledStreams`]).
    http2_max_reset_streams: usize,
    /// `server.max_header_count`, for HTTP/2 requests ([`Peer::max_header_count`]); HTTP/1's
    /// is in the builders.
    max_header_count: usize,
    /// The longest a write to a client may stay blocked (`send_timeout`): a client that
    /// stops reading gives its slot back (`write_stall.rs`).
    write_stall_timeout: Duration,
    /// The server builders, with `header_read_timeout` set in them.
    builders: Builders,
    /// `server.trusted_proxies` and `client_address_header` (None: nobody trusted).
    trusted_proxies: Option<Arc<TrustedProxies>>,
}

/// The list a connection is accepted with: None when it trusts nobody (the default), so that
/// a request checks one `Option` and reads no header.
fn trusted(trusted_proxies: &TrustedProxies) -> Option<Arc<TrustedProxies>> {
    trusted_proxies
        .any()
        .then(|| Arc::new(trusted_proxies.clone()))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl LiveServerSettings {
    fn new(settings: &ProxySettings) -> LiveServerSettings {
        LiveServerSettings {
            request_timeout: nanos(settings.request_timeout).into(),
            shutdown_grace: nanos(settings.shutdown_grace).into(),
            connections: ArcSwap::from_pointee(ConnSettings {
                header_read_timeout: settings.header_read_timeout,
                http2_idle_timeout: settings.http2_idle_timeout,
                http2_max_reset_streams: settings.http2_max_reset_streams,
                max_header_count: settings.max_header_count,
                write_stall_timeout: settings.send_timeout,
                builders: Builders::new(
                    settings.header_read_timeout,
                    settings.max_header_bytes,
                    settings.max_header_count,
                    settings.http2_max_concurrent_streams,
                    settings.http1_half_close,
                ),
                trusted_proxies: trusted(&settings.trusted_proxies),
            }),
            main_connections: Arc::new(ConnectionLimit::new(settings.max_connections)),
            body_memory: BodyMemory::new(settings.max_body_memory, super::body_memory::SETTING),
            client_body_memory: ClientBodyMemory::new(settings.max_body_memory_per_client),
            admin_connections: Arc::new(ConnectionLimit::new(settings.admin_max_connections)),
            // Only from a config file: `countersign dev` and the tests' settings allow none.
            admin_allowed_hosts: ArcSwap::from_pointee(
                (settings.reload_from.as_deref())
                    .map(|config| config.admin.allowed_hosts.clone())
                    .unwrap_or_default(),
            ),
        }
    }

    /// An empty share of the request bodies' memory for one request of `client`: of
    /// `server.max_body_memory` and of the client's `server.max_body_memory_per_client`.
    /// Only for a request with a body: a bodiless one takes none (and builds no key).
    pub(crate) fn body_share(&self, client: ClientKey) -> RequestBodyShare<'_> {
        self.client_body_memory.share(&self.body_memory, client)
    }

    /// `admin.allowed_hosts` now.
    pub(crate) fn admin_allowed_hosts(&self) -> arc_swap::Guard<Arc<Vec<String>>> {
        self.admin_allowed_hosts.load()
    }

    /// `server.request_timeout` now.
    #[inline]
    fn request_timeout(&self) -> Duration {
        Duration::from_nanos(
            self.request_timeout
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// `server.shutdown_grace` now.
    fn shutdown_grace(&self) -> Duration {
        Duration::from_nanos(
            self.shutdown_grace
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The connection timeouts now, for a connection being accepted (which keeps them).
    fn connection(&self) -> Arc<ConnSettings> {
        self.connections.load_full()
    }

    /// The `/metrics` families of both listeners' connection counts.
    pub(crate) fn render_connections(&self, out: &mut String) {
        let mut lines: [String; 4] = Default::default();
        self.main_connections.render("server", &mut lines);
        self.admin_connections.render("admin", &mut lines);
        let [open, limit, refused, reset_limit] = lines;
        out.push_str(
            "# HELP countersign_connections_open Client connections open now, by listener \
             (server: the public one; admin).\n# TYPE countersign_connections_open gauge\n",
        );
        out.push_str(&open);
        out.push_str(
            "# HELP countersign_connections_limit The listener's max_connections now (a reload \
             may change it).\n# TYPE countersign_connections_limit gauge\n",
        );
        out.push_str(&limit);
        out.push_str(
            "# HELP countersign_connections_refused_total Connections closed at accept because \
             the listener had max_connections open.\n\
             # TYPE countersign_connections_refused_total counter\n",
        );
        out.push_str(&refused);
        out.push_str(
            "# HELP countersign_connections_reset_limit_total HTTP/2 connections closed because \
             their client reset server.http2_max_reset_streams streams before their answer \
             (rapid reset).\n# TYPE countersign_connections_reset_limit_total counter\n",
        );
        out.push_str(&reset_limit);
    }

    /// A reload's values (`[server]` of a valid file): all at once, the unchanged ones
    /// as they are. The builders are rebuilt with the file's head and stream limits.
    fn set(&self, server: &super::config::ServerConfig) {
        use std::sync::atomic::Ordering::Relaxed;
        self.request_timeout
            .store(nanos(server.request_timeout), Relaxed);
        self.shutdown_grace
            .store(nanos(server.shutdown_grace), Relaxed);
        self.body_memory.set_limit(server.max_body_memory);
        self.client_body_memory
            .set_limit(server.max_body_memory_per_client);
        self.connections.store(Arc::new(ConnSettings {
            header_read_timeout: server.header_read_timeout,
            http2_idle_timeout: server.http2_idle_timeout,
            http2_max_reset_streams: server.http2_max_reset_streams,
            max_header_count: server.max_header_count,
            write_stall_timeout: server.send_timeout,
            builders: Builders::new(
                server.header_read_timeout,
                server.max_header_bytes,
                server.max_header_count,
                server.http2_max_concurrent_streams,
                server.http1_half_close,
            ),
            trusted_proxies: trusted(&server.trusted_proxies),
        }));
    }
}

/// A listener's connection limit (`server.max_connections`, `admin.max_connections`), shared
/// by every event loop of the listener; a reload changes it ([`ConnectionLimit::set_limit`]).
///
/// Two atomics, no lock: a connection accepted takes a slot with one compare-and-swap loop
/// on `open` (what a semaphore's `try_acquire` did), and gives it back with one `fetch_sub`
/// when it closes (a tokio semaphore's release took its waiters' mutex). A lower limit revokes
/// nothing: the connections open stay, and new ones are refused until fewer than the new
/// limit are open (`open` may be above `limit` until then). A higher one admits more at once.
pub(crate) struct ConnectionLimit {
    limit: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicUsize,
    /// Connections closed at accept because `limit` were open (`/metrics`).
    refused: std::sync::atomic::AtomicU64,
    /// Paces the warning about them: a flood of refusals is not a flood of lines.
    refusal_log: crate::layer::PacedLog,
    /// HTTP/2 connections closed for their streams reset before an answer
    /// (`server.http2_max_reset_streams`, [`CancelledStreams`]; `/metrics`).
    reset_closes: std::sync::atomic::AtomicU64,
    /// Paces the line about them: an attacker reconnecting is not a flood of lines.
    reset_log: crate::layer::PacedLog,
}

impl fmt::Debug for ConnectionLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        f.debug_struct("ConnectionLimit")
            .field("limit", &self.limit.load(Relaxed))
            .field("open", &self.open.load(Relaxed))
            .field("refused", &self.refused.load(Relaxed))
            .field("reset_closes", &self.reset_closes.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl ConnectionLimit {
    fn new(limit: usize) -> ConnectionLimit {
        ConnectionLimit {
            limit: limit.into(),
            open: 0.into(),
            refused: 0.into(),
            refusal_log: crate::layer::PacedLog::new(),
            reset_closes: 0.into(),
            reset_log: crate::layer::PacedLog::new(),
        }
    }

    /// Counts an HTTP/2 connection closed for resetting `http2_max_reset_streams` streams;
    /// `Some(closes not logged since the last line)` when this one gets the log line (at most
    /// one per listener every 10 s), else None.
    fn reset_close(&self) -> Option<u64> {
        self.reset_closes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reset_log.turn()
    }

    /// Counts a connection refused over the limit; `Some(refusals not logged since the last
    /// line)` when this one gets the WARN line (at most one per listener every 10 s, shared by
    /// its event loops), else None.
    fn refuse(&self) -> Option<u64> {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.refusal_log.turn()
    }

    /// `countersign_connections_{open,limit,refused_total,reset_limit_total}` lines for this
    /// listener.
    fn render(&self, listener: &str, out: &mut [String; 4]) {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering::Relaxed;
        let figures = [
            self.open.load(Relaxed) as u64,
            self.limit.load(Relaxed) as u64,
            self.refused.load(Relaxed),
            self.reset_closes.load(Relaxed),
        ];
        for ((out, name), value) in out
            .iter_mut()
            .zip(["open", "limit", "refused_total", "reset_limit_total"])
            .zip(figures)
        {
            let _ = writeln!(
                out,
                "countersign_connections_{name}{{listener=\"{listener}\"}} {value}"
            );
        }
    }

    /// A slot for a connection being accepted, held until it is dropped; None when `limit`
    /// connections (or more, after a lower limit) are open.
    fn try_open(this: &Arc<ConnectionLimit>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let limit = this.limit.load(Relaxed);
        this.open
            .fetch_update(AcqRel, Acquire, |open| (open < limit).then_some(open + 1))
            .ok()?;
        Some(ConnectionSlot(this.clone()))
    }

    /// A reload's limit, for the connections accepted from now on.
    fn set_limit(&self, limit: usize) {
        self.limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// The connections holding a slot now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One connection's slot of a [`ConnectionLimit`], given back when dropped.
#[derive(Debug)]
struct ConnectionSlot(Arc<ConnectionLimit>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A listener's two server builders, one per protocol: hyper's own HTTP/1 builder
/// ([`http1_server_builder`]) and [`http_server_builder`] fixed to HTTP/2. Why fixed: the
/// protocol is decided per connection before hyper sees it ([`open_connection`]), within
/// `header_read_timeout`. hyper-util's own detection (the auto builder reading the first bytes
/// to look for the HTTP/2 preface) waits for them with no time limit, and hyper's header timer
/// starts only after it: a client that connected and sent nothing (or a piece of the preface)
/// held its connection slot forever. Why hyper's HTTP/1 builder and not the auto builder set to
/// `http1_only`: the auto builder's `serve_connection_with_upgrades` runs that detection
/// whatever it is set to, and serves HTTP/2 when the preface comes. Over TLS with ALPN
/// `http/1.1` (or none), where only one byte is awaited, a piece of the preface held the slot
/// forever, and a whole preface got HTTP/2 without the proxy's HTTP/2 limits (no idle close,
/// no count of reset streams: rapid reset went unchecked).
#[derive(Debug)]
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: AutoBuilder<TokioExecutor>,
}

impl Builders {
    fn new(
        header_read_timeout: Duration,
        max_header_bytes: usize,
        max_header_count: usize,
        http2_max_concurrent_streams: u32,
        http1_half_close: bool,
    ) -> Builders {
        Builders {
            http1: http1_server_builder(
                header_read_timeout,
                max_header_bytes,
                max_header_count,
                http1_half_close,
            ),
            http2: http_server_builder(
                header_read_timeout,
                max_header_bytes,
                max_header_count,
                http2_max_concurrent_streams,
                http1_half_close,
            )
            .http2_only(),
        }
    }
}

/// The protocol of one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a cleartext connection's first bytes announce, as hyper-util's auto builder
/// decides it: HTTP/2 for the whole preface, HTTP/1 as soon as a byte differs from it; None
/// while they are a strict prefix of the preface (more bytes needed).
fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// A client connection ready for hyper: its first bytes of HTTP have arrived (not read).
enum Opened {
    Plain(tokio::net::TcpStream, Protocol),
    Tls(
        Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        Protocol,
    ),
}

/// Everything between accept and hyper, run within `header_read_timeout` by the caller:
/// cleartext, the first bytes (peeked: hyper reads them as usual, so no extra read); TLS, the
/// handshake, then the protocol by ALPN (RFC 9113, section 3.2: HTTP/2 over TLS is chosen by
/// ALPN, never by sniffing; "http/1.1", "http/1.0" or none is HTTP/1) and its first bytes.
/// Only per connection: a kept-alive connection's later requests pay nothing here. Ok(None):
/// the client closed before sending any.
async fn open_connection(
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<Option<Opened>> {
    let Some(acceptor) = tls else {
        return Ok(sniff_protocol(&stream)
            .await?
            .map(|protocol| Opened::Plain(stream, protocol)));
    };
    let mut stream = acceptor.accept(stream).await?;
    let (protocol, first_bytes) = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        (Protocol::Http2, H2_PREFACE.len())
    } else {
        (Protocol::Http1, 1)
    };
    Ok(tls_plaintext(&mut stream, first_bytes)
        .await?
        .then(|| Opened::Tls(Box::new(stream), protocol)))
}

/// Waits for a cleartext connection's first bytes without reading them (`MSG_PEEK`), and tells
/// HTTP/1 from HTTP/2 by them. Ok(None): closed without a byte.
async fn sniff_protocol(stream: &tokio::net::TcpStream) -> std::io::Result<Option<Protocol>> {
    use std::io::ErrorKind::WouldBlock;
    let mut buf = [0u8; H2_PREFACE.len()];
    // Nearly always done here: one readiness wait, one peek.
    let mut seen = stream.peek(&mut buf).await?;
    if seen == 0 {
        return Ok(None);
    }
    if let Some(protocol) = protocol_of(&buf[..seen]) {
        return Ok(Some(protocol));
    }
    // Rare: a strict prefix of the HTTP/2 preface (an h2c client whose preface came in pieces,
    // or a client stalling on purpose). The bytes stay unread, so the socket stays readable and
    // another `peek` would return at once: wait for new bytes instead. `try_io` clears the
    // readiness only when the peek saw nothing new, and only if no new event arrived since it
    // was read, so bytes that come in between are not missed. tokio has no non-waiting peek,
    // hence a duplicate of the descriptor (same socket, non-blocking) for the syscall.
    let peeker = std::net::TcpStream::from(std::os::fd::AsFd::as_fd(stream).try_clone_to_owned()?);
    loop {
        let ready = stream.ready(tokio::io::Interest::READABLE).await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            match peeker.peek(&mut buf) {
                Ok(n) if n == seen => Err(WouldBlock.into()),
                other => other,
            }
        });
        match peeked {
            Ok(0) => return Ok(None),
            Ok(n) => {
                seen = n;
                if let Some(protocol) = protocol_of(&buf[..seen]) {
                    return Ok(Some(protocol));
                }
            }
            // Nothing new, and the client shut down its sending side (read as `ready` was,
            // before the peek, so every byte sent before it was in the peek): none will come.
            // Its readiness stays set for good (tokio never clears a read-closed socket's), so
            // waiting again would return at once, and this loop never yielded: a worker thread
            // spun at 100% for good, out of reach of `header_read_timeout` and of shutdown,
            // after `PR` and a half-close. Handed to HTTP/1, which refuses the unfinished head.
            Err(e) if e.kind() == WouldBlock && ready.is_read_closed() => {
                return Ok(Some(Protocol::Http1));
            }
            Err(e) if e.kind() == WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until a TLS connection has at least `wanted` bytes of plaintext buffered (nothing is
/// consumed: hyper reads them). Drives rustls directly, as tokio-rustls would on hyper's
/// first read. Ok(false): the client closed first.
async fn tls_plaintext(
    stream: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    wanted: usize,
) -> std::io::Result<bool> {
    /// `std::io::Read` over a non-blocking read of the socket, for `read_tls`.
    struct TryRead<'a>(&'a tokio::net::TcpStream);
    impl std::io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.try_read(buf)
        }
    }
    loop {
        let (tcp, conn) = stream.get_mut();
        let state = conn
            .process_new_packets()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() >= wanted {
            return Ok(true);
        }
        if state.peer_has_closed() {
            return Ok(false);
        }
        tcp.readable().await?;
        match conn.read_tls(&mut TryRead(tcp)) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The proxy's HTTP/1 settings, applied to hyper's own builder ([`http1_server_builder`]) and
/// to hyper-util's auto builder ([`http_server_builder`]) alike: their methods share names.
macro_rules! http1_settings {
    ($builder:expr, $header_read_timeout:expr, $max_header_bytes:expr, $max_header_count:expr,
     $half_close:expr) => {{
        // `mut` for the auto builder's `Http1Builder` (a value borrowing the builder).
        #[allow(unused_mut)]
        let mut builder = $builder;
        builder
            .timer(TokioTimer::new())
            // Copy head and body into one buffer (bounded by `max_buf_size`) and `write` it
            // once, instead of `writev` (hyper's default on TCP): less CPU per small response,
            // measured in docs/BENCHMARKS.md.
            .writev(false)
            .header_read_timeout($header_read_timeout)
            // A client may shut down its sending side once its request is out (`nc -N`,
            // scripted probes) and wait for the answer: with hyper's default, the EOF seen
            // while the answer is being made closed the connection without it. The price:
            // hyper then does not read the connection while answering, so a client that left
            // is noticed at the next write only (a quiet event stream: at
            // `body_idle_timeout`). `server.http1_half_close = false` chooses the other way.
            .half_close($half_close)
            // hyper's minimum buffer is 8 KiB; the head must fit in it.
            .max_buf_size($max_header_bytes.max(8192));
        // Only when it differs from hyper's own default (the same 100): set at all, hyper
        // sizes its parse buffers per request from it (on the heap beyond 100 fields) instead
        // of using its fixed inline ones.
        if $max_header_count != super::config::DEFAULT_MAX_HEADER_COUNT {
            builder.max_headers($max_header_count);
        }
    }};
}

/// The server side of the proxy's HTTP/1 connections: hyper's own HTTP/1 builder, which serves
/// HTTP/1 from the first byte (see `Builders` in this module for why not the auto builder).
pub fn http1_server_builder(
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_header_count: usize,
    http1_half_close: bool,
) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    http1_settings!(
        &mut builder,
        header_read_timeout,
        max_header_bytes,
        max_header_count,
        http1_half_close
    );
    builder
}

/// The server side of every proxy listener: HTTP/1.1 and h2c/HTTP/2 (hyper-util's auto builder)
/// with the proxy's limits. Public so that the benchmarks' plain hyper proxy
/// (`countersign-baseline-proxy`) runs with exactly these settings.
pub fn http_server_builder(
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_header_count: usize,
    http2_max_concurrent_streams: u32,
    http1_half_close: bool,
) -> AutoBuilder<TokioExecutor> {
    let mut builder = AutoBuilder::new(TokioExecutor::new());
    http1_settings!(
        builder.http1(),
        header_read_timeout,
        max_header_bytes,
        max_header_count,
        http1_half_close
    );
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS);
    builder
}

/// Streams a client may reset before hyper has accepted them (rapid reset, CVE-2023-44487:
/// they no longer count against `http2_max_concurrent_streams`) before h2 closes the
/// connection with GOAWAY ENHANCE_YOUR_CALM. h2's own default, set here so that the bound
/// tests/proxy_http2_abuse.rs checks does not depend on a dependency's default. Resets just
/// after acceptance are the proxy's own count (`server.http2_max_reset_streams`,
/// [`CancelledStreams`]).
const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams h2 itself may reset for a client's errors (malformed headers, a stream refused over
/// `http2_max_concurrent_streams`, flow-control violations: "MadeYouReset", CVE-2025-8671)
/// before it closes the connection with GOAWAY ENHANCE_YOUR_CALM. hyper's default, set here
/// for the same reason.
const HTTP2_MAX_LOCAL_ERROR_RESETS: Option<usize> = Some(1024);

async fn accept_loop<H, F>(
    listener: TcpListener,
    tls: Option<TlsHandle>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Arc<Peer>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that the end of the grace really drops what is left (a
    // finished one is reaped as the loop goes: per connection, never per request).
    let mut connections = tokio::task::JoinSet::new();
    let permits = &limits.connections;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = ConnectionLimit::try_open(permits) else {
            if let Some(suppressed) = permits.refuse() {
                tracing::warn!(
                    %peer,
                    suppressed,
                    "connection limit reached; closing new connection (one line per listener \
                     every 10 s at most: countersign_connections_refused_total counts them all)"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        // The timeouts (and builders) current now: this connection keeps them for its life.
        let timeouts = limits.settings.connection();
        // The configuration current now (a SIGHUP may have swapped it since the last one).
        let tls = tls.as_ref().map(TlsHandle::acceptor);
        let handler = handler.clone();
        let mut stop = shutdown.clone();
        let proxy_protocol = limits.proxy_protocol;
        connections.spawn(async move {
            // Held for the connection's life: its slot in the listener's count.
            let slot = permit;
            let ConnSettings {
                header_read_timeout,
                http2_idle_timeout,
                http2_max_reset_streams,
                max_header_count,
                write_stall_timeout,
                ref builders,
                ref trusted_proxies,
            } = *timeouts;
            // The first bytes (and the TLS handshake) within header_read_timeout, so a client
            // that connects and sends nothing gives its slot back (hyper's own header timer
            // covers the rest of the head). A shutdown ends the wait: nothing is in flight yet.
            // Behind a TCP balancer (`server.proxy_protocol`), its PROXY header comes first,
            // before TLS, and names the client; only a trusted balancer may send one.
            let proxy_header = match (proxy_protocol, trusted_proxies) {
                (Some(max), Some(trusted)) if trusted.trusts_peer(peer.ip()) => Some(max),
                (Some(_), _) => {
                    proxy_protocol::refused_untrusted(peer);
                    return;
                }
                (None, _) => None,
            };
            let start = async {
                let mut stream = stream;
                // None: a PROXY header that names no client (`UNKNOWN`, `LOCAL`, a UNIX socket).
                let client = match proxy_header {
                    Some(max_v2_payload) => {
                        proxy_protocol::read_client(&mut stream, max_v2_payload)
                            .await
                            .map_err(|e| {
                                std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                            })?
                    }
                    None => Some(peer),
                };
                let opened = open_connection(stream, tls).await?;
                std::io::Result::Ok(opened.map(|opened| (opened, client)))
            };
            let opened = tokio::select! {
                opened = tokio::time::timeout(header_read_timeout, start) => opened,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let (opened, client) = match opened {
                Ok(Ok(Some(opened))) => opened,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "connection failed before its first request: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no request within header_read_timeout; closing");
                    return;
                }
            };
            let client = match client {
                Some(client) => Peer::new(client, trusted_proxies.clone(), max_header_count),
                // A PROXY header that names no client: the connection (the balancer) is the
                // client, and nobody is trusted. Its address is in `trusted_proxies` (or the
                // header was refused), so with the list its `client_address_header` would be
                // believed; but a TCP pass-through balancer writes no such header, so one here
                // is the browser's, and would choose the address the login throttle counts.
                // An empty list with the same header, not None: the header is still removed
                // on arrival as from any untrusted peer (`handle`), which a custom name
                // (`x-envoy-external-address`) is nowhere else. Rare, so the allocation is too.
                None => Peer::new(
                    peer,
                    trusted_proxies
                        .as_ref()
                        .map(|t| Arc::new(TrustedProxies::new(Vec::new(), t.header().clone()))),
                    max_header_count,
                ),
            };
            let connection = Connection {
                listener: slot.0.clone(),
                peer: Arc::new(client),
                handler,
                watcher,
                stop,
                http2_idle_timeout,
                http2_max_reset_streams,
                goaway_grace: header_read_timeout,
                write_stall_timeout,
            };
            let result = match opened {
                Opened::Plain(stream, protocol) => {
                    connection
                        .serve(
                            builders,
                            protocol,
                            TokioIo::new(WriteStallLimit::new(stream, write_stall_timeout)),
                        )
                        .await
                }
                Opened::Tls(stream, protocol) => {
                    connection
                        .serve(
                            builders,
                            protocol,
                            TokioIo::new(WriteStallLimit::new(*stream, write_stall_timeout)),
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    // The grace as it is now (a reload may have changed it since the start).
    if tokio::time::timeout(limits.settings.shutdown_grace(), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; remaining connections are dropped");
    }
    // Dropped indeed, before the shutdown returns (not merely when the process exits: a
    // library caller's runtime goes on): each task's socket is closed, its request's handling
    // (and upstream request) dropped, and an HTTP/2 connection's streams end with it.
    connections.shutdown().await;
}

/// One accepted client connection, its protocol known, handed to hyper.
struct Connection<H> {
    /// Its listener's connection count, where its closes for resets are counted.
    listener: Arc<ConnectionLimit>,
    peer: Arc<Peer>,
    handler: H,
    /// Counts this connection in the listener's graceful shutdown while held.
    watcher: Watcher,
    stop: watch::Receiver<bool>,
    http2_idle_timeout: Duration,
    /// Streams the client may reset before their answer's head ([`CancelledStreams`]).
    http2_max_reset_streams: usize,
    /// After an idle connection's GOAWAY, how long the client gets to close it.
    goaway_grace: Duration,
    /// How long an HTTP/2 stream may wait for the client's flow-control credit.
    write_stall_timeout: Duration,
}

impl<H, F> Connection<H>
where
    H: Fn(Arc<Peer>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    async fn serve<I>(
        self,
        builders: &Builders,
        protocol: Protocol,
        io: TokioIo<I>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            listener,
            peer,
            handler,
            watcher,
            mut stop,
            http2_idle_timeout,
            http2_max_reset_streams,
            goaway_grace,
            write_stall_timeout,
        } = self;
        let peer_addr = peer.addr;
        match protocol {
            // HTTP/1: hyper's header timer also closes a connection idle between requests.
            // Upgrades on, for the routes that proxy WebSockets (a handshake on any other is
            // answered 501 and the connection goes on).
            //
            // Driven here, as HTTP/2 below: hyper-util's graceful watcher knows hyper's own
            // HTTP/1 connection only without upgrades. The watcher is held so that the
            // shutdown still waits for it.
            Protocol::Http1 => {
                let service = service_fn(move |req| {
                    let response = handler(peer.clone(), req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _counted_in_shutdown = watcher;
                let connection = builders.http1.serve_connection(io, service).with_upgrades();
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => return Ok(result?),
                    _ = stop.wait_for(|stop| *stop) => connection.as_mut().graceful_shutdown(),
                }
                Ok(connection.await?)
            }
            // HTTP/2: every stream is counted until h2 has written the last frame of its
            // answer (`http2_idle.rs`: not merely until the body has handed it over, which for
            // a slow reader can be megabytes earlier), and a connection with none open for
            // `http2_idle_timeout` is closed like a shutdown closes it (GOAWAY; a stream that
            // raced in still completes).
            //
            // A stream the client resets before its answer's head (hyper then drops the
            // handler's future, after the upstream request may have gone out) is counted
            // ([`CancelledStreams`]): past `server.http2_max_reset_streams` the connection is
            // closed.
            Protocol::Http2 => {
                let activity = StreamActivity::new(write_stall_timeout);
                let counted = activity.clone();
                let cancelled = Arc::new(CancelledStreams::default());
                let counted_cancels = cancelled.clone();
                let service = service_fn(move |req| {
                    let stream = counted.open_stream();
                    let unanswered = CancelGuard(Some(counted_cancels.clone()));
                    let response = handler(peer.clone(), req);
                    async move {
                        let response = response.await;
                        unanswered.answered();
                        Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, stream)))
                    }
                });
                // Driven here rather than by `watcher.watch`, which could only close it on
                // shutdown; the watcher is held so that the shutdown still waits for it.
                let _counted_in_shutdown = watcher;
                let connection = builders.http2.serve_connection(io, service);
                tokio::pin!(connection);
                let mut closing = false;
                let mut closing_idle = false;
                let mut closing_cancels = false;
                loop {
                    tokio::select! {
                        result = connection.as_mut() => return result,
                        // Like an idle close: a client that never answers the GOAWAY's PING is
                        // dropped once no stream is left, after the grace below, rather than
                        // keeping the connection until the end of `shutdown_grace`.
                        _ = stop.wait_for(|stop| *stop), if !closing => {
                            closing = true;
                            closing_idle = true;
                            connection.as_mut().graceful_shutdown();
                        }
                        // Rapid reset after acceptance (CVE-2023-44487's second half): closed
                        // like an idle connection (GOAWAY; what is in flight completes; hyper
                        // has no way to send ENHANCE_YOUR_CALM from here). A client that goes on
                        // opening and resetting streams after the GOAWAY (it has not answered
                        // the PING that makes the GOAWAY final) is dropped at twice the limit.
                        () = cancelled.reached(http2_max_reset_streams), if !closing_cancels => {
                            if let Some(suppressed) = listener.reset_close() {
                                tracing::info!(
                                    peer = %peer_addr,
                                    suppressed,
                                    "HTTP/2 client reset {http2_max_reset_streams} streams before \
                                     their answer (rapid reset, server.http2_max_reset_streams); \
                                     closing the connection (one line per listener every 10 s \
                                     at most: countersign_connections_reset_limit_total counts \
                                     them all)"
                                );
                            }
                            closing_cancels = true;
                            if !closing {
                                closing = true;
                                closing_idle = true;
                                connection.as_mut().graceful_shutdown();
                            }
                        }
                        () = cancelled.reached(http2_max_reset_streams.saturating_mul(2)), if closing_cancels => {
                            tracing::debug!(
                                peer = %peer_addr,
                                "HTTP/2 client kept resetting streams after GOAWAY; dropping"
                            );
                            return Ok(());
                        }
                        () = activity.idle_for(http2_idle_timeout), if !closing => {
                            tracing::debug!(peer = %peer_addr, "HTTP/2 connection idle; closing");
                            closing = true;
                            closing_idle = true;
                            connection.as_mut().graceful_shutdown();
                        }
                        // hyper's graceful close waits for the client to answer a PING
                        // after the first GOAWAY; a client that never does (or never reads)
                        // would keep the connection. Still no stream after the grace: drop it.
                        // A stream whose answer h2 is still sending counts as open, so this
                        // never cuts a download short.
                        () = tokio::time::sleep(goaway_grace), if closing_idle => {
                            if activity.is_idle() {
                                tracing::debug!(
                                    peer = %peer_addr,
                                    "HTTP/2 client did not close after GOAWAY; dropping"
                                );
                                return Ok(());
                            }
                        }
                        // A client that never gives flow-control credit stalls its streams
                        // without ever blocking a write: dropped like one that stops reading,
                        // once any one stream has waited that long (even while others move).
                        () = activity.stalled_for() => {
                            tracing::debug!(
                                peer = %peer_addr,
                                "HTTP/2 client gave no flow-control credit for send_timeout; dropping"
                            );
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// The count of an HTTP/2 connection's streams whose handler future was dropped unfinished:
/// the client reset the stream before its answer's head. Past `server.http2_max_reset_streams`
/// (default 100) the connection is closed (GOAWAY), at twice that dropped. hyper drops the
/// handler's future when the client resets a stream, but by then the proxy may have signed
/// and sent the upstream request; a
/// reset stream no longer counts against `http2_max_concurrent_streams`, and h2's own limit
/// (`max_pending_accept_reset_streams`) only counts streams reset before hyper accepted them.
/// So a client opening streams and resetting each just after its acceptance (rapid reset,
/// CVE-2023-44487) made one upstream request per reset, at its own pace, without ever waiting
/// for an answer, on a single connection. nginx bounds this with `keepalive_requests` (1000
/// streams per connection, reset or not); only the resets are counted here, so a browser's
/// long-lived connection is never closed for its ordinary traffic, and one that aborts many
/// fetches merely reconnects (the GOAWAY lets what is in flight finish).
#[derive(Debug, Default)]
struct CancelledStreams {
    count: std::sync::atomic::AtomicUsize,
    /// Woken on each cancelled stream (a permit is kept when nobody waits).
    changed: tokio::sync::Notify,
}

impl CancelledStreams {
    /// Completes once at least `limit` streams were cancelled.
    async fn reached(&self, limit: usize) {
        while self.count.load(std::sync::atomic::Ordering::Acquire) < limit {
            self.changed.notified().await;
        }
    }
}

/// Counts its stream as cancelled when dropped before [`CancelGuard::answered`].
struct CancelGuard(Option<Arc<CancelledStreams>>);

impl CancelGuard {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(cancelled) = self.0.take() {
            cancelled
                .count
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            cancelled.changed.notify_one();
        }
    }
}

/// The CAs of the config key `key` (`upstream[N].ca_file`, `auth.verify_ca_file`) naming
/// `file`, if set; an error names the config file, the key, the file and the problem.
fn configured_roots(
    config: &ProxyConfig,
    key: &str,
    file: Option<&std::path::Path>,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let Some(file) = file else {
        return Ok(Vec::new());
    };
    load_ca_file(file).map_err(|problem| {
        format!(
            "{}: {key}: {}: {problem}",
            config.source.display(),
            file.display()
        )
    })
}

/// The certificates of a PEM bundle (an upstream's `ca_file`); at least one.
pub fn load_ca_file(
    file: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let text =
        super::config::read_text_file(file, "CA file").map_err(|e| e.problem().to_owned())?;
    let certs = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)".into());
    }
    // Each must be usable as a trust anchor, so a bad bundle fails here, not at first use.
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    Ok(certs)
}

/// The ALPN protocols the main listener accepts, in its order of preference (RFC 7301: the
/// server picks the first of these the client offers). `http/1.0` too: rustls refuses a
/// handshake whose offer shares none of them (`no_application_protocol`), and
/// `curl --http1.0` offers `http/1.0` alone; hyper serves HTTP/1.0 as HTTP/1, which is what
/// [`open_connection`] chooses for anything but `h2`.
const TLS_ALPN: [&[u8]; 3] = [b"h2", b"http/1.1", b"http/1.0"];

/// Loads a PEM certificate chain and private key; ALPN offers h2, http/1.1 and http/1.0
/// (`TLS_ALPN`). Checks that the chain parses, that its first certificate is valid now (not
/// expired, not before its `notBefore`: every browser would refuse it), that the key parses
/// and that it matches that certificate.
pub fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    read_tls(cert, key).map(|loaded| loaded.config)
}

/// What [`read_tls`] loaded.
struct LoadedTls {
    config: Arc<rustls::ServerConfig>,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The first certificate's `notAfter`, as text (for the reload's log line).
    not_after: String,
    /// The same, in Unix seconds (`countersign_tls_cert_expiry_timestamp_seconds`).
    not_after_unix: i64,
}

/// [`load_tls`], also returning the certificate chain and its validity (for the reload's log
/// line).
fn read_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<LoadedTls, String> {
    let certs = {
        let pem = read_tls_file(cert)?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?
    };
    let Some(leaf) = certs.first() else {
        return Err(format!("{}: no certificate found", cert.display()));
    };
    let validity = forward::check_validity(leaf, std::time::SystemTime::now())
        .map_err(|problem| format!("{}: {problem}", cert.display()))?;
    // The key's PEM text and DER bytes are zeroized once ring holds the key, as a client
    // certificate's are (`forward::read_client_cert`, whose reader and key parser these are).
    let signing_key = {
        let pem = read_tls_file(key)?;
        forward::parse_private_key(&pem)
            .map_err(|problem| format!("{}: {problem}", key.display()))?
    };
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing_key);
    // What `with_single_cert` checks, naming the file at fault: a key of another certificate,
    // or a certificate that does not parse (the key is checked against it).
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(format!(
                "{}: the private key does not match the certificate in {}",
                key.display(),
                cert.display()
            ))
        }
        Err(e @ rustls::Error::InvalidCertificate(_)) => {
            return Err(format!("{}: {e}", cert.display()))
        }
        Err(e) => return Err(format!("{}: {e}", key.display())),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = TLS_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(LoadedTls {
        config: Arc::new(config),
        chain: certs,
        not_after: validity.not_after_text,
        not_after_unix: validity.not_after,
    })
}

/// A `server.tls_cert` or `tls_key` file ([`forward::read_pem_file`]); the error names it.
fn read_tls_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    forward::read_pem_file(path).map_err(|problem| format!("{}: {problem}", path.display()))
}

/// A DER certificate's SHA-256 fingerprint, as `openssl x509 -noout -fingerprint -sha256`
/// prints it (upper-case hex pairs joined by `:`), so an operator can tell which certificate a
/// reload loaded without the proxy parsing the certificate itself.
pub(crate) fn cert_fingerprint(der: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a reload applies of `proxy.toml`, as the warning about keys waiting for a restart
/// says it: every entry of `config::LIVE_KEYS` and of each upstream's live keys (the unit test
/// `reload_applies_only_names_every_live_key` keeps it so).
const RELOAD_APPLIES_ONLY: &str = "a reload applies only [server.response_headers], \
     server.response_headers_on_upstream and max_response_header_value_bytes, the \
     [auth.throttle] limits, session.idle_timeout, absolute_timeout and max_sessions_per_user, server.max_static_file, static_cache_size \
     and static_immutable, server.websocket_max_open and websocket_max_open_per_user, \
     server.request_timeout, header_read_timeout, send_timeout, http2_idle_timeout, shutdown_grace, max_header_bytes, \
     max_header_count, http2_max_concurrent_streams, http2_max_reset_streams, \
     http1_half_close, trusted_proxies, client_address_header, client_address_max_hops, \
     max_body_memory, max_body_memory_per_client and max_connections, \
     admin.max_connections and allowed_hosts, and each upstream's timeout, max_body, body_idle_timeout, \
     connect_timeout and websocket_* limits; and reads the keyring, users, TLS and client \
     certificate files";

#[cfg(test)]
mod tests {
    use super::*;

    /// Registered methods are logged whole; a longer one is cut, with its length.
    #[test]
    fn logged_methods_are_bounded() {
        for method in ["GET", "UPDATEREDIRECTREF", &"M".repeat(MAX_LOGGED_METHOD)] {
            let parsed = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(LoggedMethod(&parsed).to_string(), method);
        }
        let long = Method::from_bytes("X".repeat(9000).as_bytes()).unwrap();
        assert_eq!(
            LoggedMethod(&long).to_string(),
            format!("{}...[9000]", "X".repeat(MAX_LOGGED_METHOD))
        );
    }

    /// The warning about keys waiting for a restart lists what a reload applies: every live
    /// key by its last name (before, it left out `http2_max_reset_streams`, `trusted_proxies`
    /// and `client_address_header`, which are live, so an operator read them as waiting).
    #[test]
    fn reload_applies_only_names_every_live_key() {
        use super::super::config::{LIVE_KEYS, LIVE_UPSTREAM_KEYS, LIVE_UPSTREAM_WEBSOCKET_KEYS};
        let named = |name: &str| {
            RELOAD_APPLIES_ONLY
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|word| word == name)
        };
        for key in LIVE_KEYS {
            let (section, name) = key.split_once('.').unwrap();
            if section == "auth" || name == "response_headers" {
                continue; // named as tables: "[auth.throttle]", "[server.response_headers]"
            }
            assert!(
                named(name),
                "{key} is live but not named: {RELOAD_APPLIES_ONLY}"
            );
        }
        assert!(RELOAD_APPLIES_ONLY.contains("[auth.throttle]"));
        assert!(RELOAD_APPLIES_ONLY.contains("[server.response_headers]"));
        for name in LIVE_UPSTREAM_KEYS {
            assert!(named(name), "upstream {name} is live but not named");
        }
        for name in LIVE_UPSTREAM_WEBSOCKET_KEYS {
            assert!(name.starts_with("websocket_") && RELOAD_APPLIES_ONLY.contains("websocket_*"));
        }
    }

    /// The fingerprint is the SHA-256 of the DER bytes in openssl's notation.
    #[test]
    fn fingerprint_is_openssls_notation() {
        assert_eq!(
            cert_fingerprint(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:\
             F2:00:15:AD"
        );
    }

    /// How many slots `limit` gives now: opened until refused, then given back.
    fn admits(limit: &Arc<ConnectionLimit>) -> usize {
        let mut slots = Vec::new();
        while let Some(slot) = ConnectionLimit::try_open(limit) {
            slots.push(slot);
            assert!(slots.len() <= 1 << 20, "no limit");
        }
        slots.len()
    }

    /// A lower limit closes nothing: the slots held stay, new ones are refused until fewer
    /// than the new limit are open; a raise admits more at once.
    #[test]
    fn a_lower_connection_limit_keeps_the_open_ones_and_refuses_until_below_it() {
        let limit = Arc::new(ConnectionLimit::new(8));
        let mut held: Vec<ConnectionSlot> = (0..4)
            .map(|_| ConnectionLimit::try_open(&limit).unwrap())
            .collect();
        limit.set_limit(2);
        assert_eq!(limit.open(), 4);
        assert!(ConnectionLimit::try_open(&limit).is_none());
        held.pop();
        held.pop();
        assert!(
            ConnectionLimit::try_open(&limit).is_none(),
            "2 open, limit 2"
        );
        held.pop();
        let again = ConnectionLimit::try_open(&limit).expect("1 open, limit 2");
        assert!(ConnectionLimit::try_open(&limit).is_none());
        assert_eq!(limit.open(), 2);
        limit.set_limit(4);
        assert_eq!(admits(&limit), 2, "raised from 2 to 4 with 2 open");
        drop((again, held));
        assert_eq!(limit.open(), 0);
        assert_eq!(admits(&limit), 4);
    }

    /// Many tasks on several threads opening and closing while the limit moves: never more
    /// held than the highest limit set, and once all are closed the count is exact (a raise
    /// after a lower, with releases in between, gives exactly the new limit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_connection_limit_holds_under_concurrent_opens_closes_and_changes() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let limit = Arc::new(ConnectionLimit::new(5));
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for task in 0..32usize {
            let (limit, held, most) = (limit.clone(), held.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..3000usize {
                    if let Some(slot) = ConnectionLimit::try_open(&limit) {
                        let now = held.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(now, SeqCst);
                        if (task + i) % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                        held.fetch_sub(1, SeqCst);
                        drop(slot);
                    } else if i % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        // Fixed at 5 for the first part, then moving between 2 and 9.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            most.load(SeqCst) <= 5,
            "{} held at limit 5",
            most.load(SeqCst)
        );
        let changer = {
            let limit = limit.clone();
            tokio::spawn(async move {
                for i in 0..2000usize {
                    limit.set_limit([2, 9, 3, 7][i % 4]);
                    tokio::task::yield_now().await;
                }
            })
        };
        changer.await.unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            most.load(SeqCst) <= 9,
            "{} held, limit never above 9",
            most.load(SeqCst)
        );
        assert_eq!(limit.open(), 0);

        // Lowered from 6 to 2 with 6 held, the 6 closed by other threads while it is raised
        // to 4: exactly 4 then.
        limit.set_limit(6);
        let slots: Vec<ConnectionSlot> = (0..6)
            .map(|_| ConnectionLimit::try_open(&limit).unwrap())
            .collect();
        limit.set_limit(2);
        assert_eq!(admits(&limit), 0);
        let closers: Vec<_> = slots
            .into_iter()
            .map(|slot| tokio::spawn(async move { drop(slot) }))
            .collect();
        limit.set_limit(4);
        for closer in closers {
            closer.await.unwrap();
        }
        assert_eq!(admits(&limit), 4);
        assert_eq!(limit.open(), 0);
    }
}

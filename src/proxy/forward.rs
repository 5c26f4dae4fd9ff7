//! Sign-and-forward: routing by longest prefix, building the upstream request (header hygiene,
//! `X-Forwarded-*`, `X-Request-Id`, the signature) and streaming the upstream response back.
//!
//! Each route has its own connection pool ([`UpstreamPool`]: HTTP/1.1 keep-alive over hyper's
//! low-level client, `TCP_NODELAY`; rustls for `https://` upstreams, trusting the web PKI roots
//! plus the route's `ca_file`, presenting its `client_cert_file` if any: [`ClientCert`]), built
//! with that upstream's `connect_timeout`, `pool_idle_timeout` and `pool_max_idle_per_host`.
//! Each event loop builds its own forwarder, so each has its own pools. `verify_url` (logins
//! only) uses a hyper-util pooled client.
//! Request bodies are read once, within the route's limit, because the signature covers their
//! digest; response bodies are never buffered: the upstream `Incoming` is passed through.
//!
//! **WebSockets** are proxied only on routes with `websocket = true` (`websocket.rs`): the
//! handshake is signed like any request ([`Forwarder::forward_upgrade`]) and sent on a
//! connection of its own; the messages that follow are not signed (docs/OPERATIONS.md,
//! "WebSockets"). Every other protocol upgrade is answered
//! `501 {"error":"websocket_unsupported"}` before anything else happens.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::body_memory::RequestBodyShare;
use crate::core::{EncodedIdentity, Nonce, Signer};
use crate::layer::body_memory::{Metered, OutOfBodyMemory};
use crate::layer::{ReadBody, ReadBodyError};

pub use super::config::CrossOriginRedirects;
use super::csrf::CSRF_HEADER;
use super::error::{ProxyBody, ProxyError};
use super::metrics::{Metrics, RouteId, UpstreamBodyErrors};
use super::upstream_pool::{plainly_chunked, PoolSettings, SpareRequest, UpstreamPool};
use crate::clock::Clock;

/// The request header carrying the request id, to the upstream and back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// [`REQUEST_ID_HEADER`] as a header name (a `&str` key is parsed on every map access).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop fields (RFC 9110 §7.6.1) plus the de-facto ones; never forwarded either way.
/// (A `static`, not a `const`: a `const` array is built and dropped at every use, and these
/// are checked for every field of every request and response.)
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Client-supplied fields that would let a browser speak for the proxy; always removed before
/// the proxy adds its own:
/// - the signature fields (every `Signature*` name: RFC 9421's and the drafts' companions such
///   as `Signature-Agent`) and the CSRF token;
/// - who the client is and where it came from (`Forwarded`, every `X-Forwarded-*`, `X-Real-IP`
///   and the other client-address fields CDNs and frameworks read, `Client-IP` among them for
///   Rails and CodeIgniter): an upstream trusts these from its proxy, so a browser must not be
///   able to set them;
/// - identities other proxies forward (`X-Forwarded-User` above, oauth2-proxy's
///   `X-Auth-Request-*`, `Remote-User`, `X-Remote-User`): an API moved from behind such a proxy
///   may still read them;
/// - `X-Original-URL` / `-URI` / `X-Rewrite-URL`, which some frameworks take as the request path
///   instead of the request line's, behind the router's back, and the method overrides
///   (`X-HTTP-Method-Override`, ...), which make a framework run another method than the one
///   the signature covers;
/// - `Authorization`: behind countersign the upstream's caller is the signed identity; a
///   credential of the browser's choosing beside it is one an upstream with a second auth
///   scheme might honour.
///
/// Each also in its `_` spelling (`X_Forwarded_For`): hyper accepts `_` in a name, and
/// CGI-style servers (PHP, Puma before 6.4.2: CVE-2024-45614) read `-` and `_` as one
/// (`HTTP_X_FORWARDED_FOR`), so the browser's `X_Forwarded_For` would stand in for the proxy's
/// `X-Forwarded-For`.
///
/// The request path checks these with [`is_spoofable`]; the list and the prefixes are what the
/// tests check it against.
#[cfg(test)]
static SPOOFABLE: [HeaderName; 27] = [
    HeaderName::from_static("signature"),
    HeaderName::from_static("signature-input"),
    HeaderName::from_static("content-digest"),
    HeaderName::from_static(CSRF_HEADER),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("remote-user"),
    HeaderName::from_static("x-remote-user"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-original-uri"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    header::AUTHORIZATION,
];

/// Name prefixes of whole families of [`SPOOFABLE`] fields (`X-Forwarded-User`,
/// `-Ssl`, `-Uri`, `Signature-Agent`, oauth2-proxy's `X-Auth-Request-User`, ...).
#[cfg(test)]
static SPOOFABLE_PREFIXES: [&str; 3] = ["signature", "x-forwarded-", "x-auth-request-"];

/// Whether `name` is one of the hop-by-hop fields the proxy never forwards (for the config's
/// check of signing header names).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Whether `name` is one of [`SPOOFABLE`] or starts with one of [`SPOOFABLE_PREFIXES`], also
/// when spelled with `_` for `-` (see [`SPOOFABLE`]; [`underscore_spelling_goes`] covers the
/// other names the proxy strips or sets).
pub(crate) fn is_spoofable(name: &HeaderName) -> bool {
    let text = name.as_str();
    spoofable_text(text) || (text.contains('_') && with_dashes(text, spoofable_text))
}

/// [`is_spoofable`] of a name as it is spelled, by one `match` on its text (a switch on the
/// length, then a compare or two) and a prefix check chosen by its first byte, instead of
/// comparing it with each in turn: this runs for every field of every request. The
/// differential test below checks it against the lists.
fn spoofable_text(text: &str) -> bool {
    // By length first: most of a request's names (`accept`, `host`, `user-agent`...) differ
    // from every listed one in length, and each length has at most four candidates. The
    // prefix families are left to the check below.
    let listed = match text.len() {
        9 => matches!(text, "forwarded" | "x-real-ip" | "client-ip"),
        11 => matches!(text, "x-client-ip" | "x-forwarded" | "remote-user"),
        13 => matches!(
            text,
            "authorization" | "x-rewrite-url" | "x-remote-user" | "x-http-method"
        ),
        14 => matches!(
            text,
            "content-digest" | "true-client-ip" | "x-original-url" | "x-original-uri"
        ),
        16 => matches!(text, "cf-connecting-ip" | "fastly-client-ip"),
        17 => text == "x-method-override",
        19 => text == "x-cluster-client-ip",
        22 => text == "x-http-method-override",
        _ => false,
    };
    let family = match text.as_bytes().first() {
        Some(b's') => text.starts_with("signature"),
        Some(b'x') => text.starts_with("x-forwarded-") || text.starts_with("x-auth-request-"),
        _ => false,
    };
    // The CSRF token's name is the proxy's own (a constant, not a length this match knows).
    listed || family || text == CSRF_HEADER
}

/// How many bytes of a name [`with_dashes`] reads: more than any fixed name the proxy strips
/// or sets ([`SPOOFABLE`], [`HOP_BY_HOP`], [`REQUEST_ID_HEADER`], [`CSRF_HEADER`]: 22 at most)
/// and than any prefix of [`SPOOFABLE_PREFIXES`], so a longer name cut to this length still
/// matches a prefix family, and matches no fixed name (their lengths differ), exactly as the
/// whole name would. A test checks the lengths.
const DASHED_MAX: usize = 32;

/// `check` of `text` with each `_` read as `-` (at most its first [`DASHED_MAX`] bytes), on
/// the stack: called only for the rare name that holds a `_`, it costs ordinary requests
/// nothing.
fn with_dashes(text: &str, check: impl FnOnce(&str) -> bool) -> bool {
    let mut buffer = [0u8; DASHED_MAX];
    let mut len = 0;
    for (to, &from) in buffer.iter_mut().zip(text.as_bytes()) {
        *to = if from == b'_' { b'-' } else { from };
        len += 1;
    }
    // A field name is ASCII (`HeaderName` holds token bytes only), so this never fails; if it
    // did, the field is dropped: an unknown spelling is not worth the risk.
    match buffer.get(..len).map(std::str::from_utf8) {
        Some(Ok(dashed)) => check(dashed),
        _ => true,
    }
}

/// Whether two field names are the same with each `_` read as `-` (a configured identity
/// name can be of any length, so it is compared whole, not through [`with_dashes`]).
fn same_dashed(a: &str, b: &str) -> bool {
    let dash = |byte: u8| if byte == b'_' { b'-' } else { byte };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// Removes every field named `dashed` with some `-` written `_` (`X_Envoy_External_Address`
/// for `x-envoy-external-address`): a configured `client_address_header` the proxy reads and
/// removes, whose `_` spellings CGI-style upstreams read as the same variable. Only names
/// holding a `_` are compared; nothing to do for a name without `-`.
pub fn remove_underscore_spellings(headers: &mut HeaderMap, dashed: &HeaderName) {
    if !dashed.as_str().contains('-') {
        return;
    }
    // Collected first: a `HeaderMap` cannot be changed while its names are walked. Rare (a
    // request with such a name), so the allocation costs nothing on the common path.
    let spellings: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_') && same_dashed(name.as_str(), dashed.as_str()))
        .cloned()
        .collect();
    for name in spellings {
        headers.remove(name);
    }
}

/// Whether a request field whose name holds a `_` is, read with `-` for `_`, one the proxy
/// removes or sets: spoofable (the signature's, the forwarding and client-address ones),
/// hop-by-hop, `X-Request-Id`, or the identity fields (configurable: `X_Auth_User` by
/// default). CGI-style upstreams read `X_Auth_User` as `HTTP_X_AUTH_USER`, the signed
/// identity's variable (see [`SPOOFABLE`]). A name with `_` that matches nothing
/// (`X_Trace_Id`) is forwarded.
fn underscore_spelling_goes(text: &str, policy: &HeaderPolicy<'_>) -> bool {
    with_dashes(text, |dashed| {
        spoofable_text(dashed)
            || dashed == REQUEST_ID_HEADER
            || HOP_BY_HOP.iter().any(|name| name.as_str() == dashed)
    }) || same_dashed(text, policy.identity_user.as_str())
        || same_dashed(text, policy.identity_roles.as_str())
}

/// Default `upstream[].body_idle_timeout` (nginx's `proxy_read_timeout`).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `upstream[].pool_max_lifetime` (nginx's `keepalive_time`): 1 hour.
pub const DEFAULT_POOL_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// Default `upstream[].pool_stale_after`: an idle second is longer than a busy connection is
/// ever idle between two requests, and shorter than any common server's keep-alive timeout
/// (gunicorn 2 s; Node, uvicorn and Apache 5 s; nginx 75 s), the idle closes this is for.
pub const DEFAULT_POOL_STALE_AFTER: Duration = Duration::from_secs(1);

/// The limits of one upstream a reload may change (`[[upstream]]` `timeout`, `max_body`,
/// `body_idle_timeout` and `connect_timeout`): plain values, read once per request, so a
/// request runs with the limits of when it started (`connect_timeout`: read by the route's
/// connector, [`LiveConnectTimeout`], once per connection it makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimits {
    /// Time limit for the upstream's response head (504 past it).
    pub timeout: Duration,
    /// Largest request body accepted (413 above it).
    pub max_body: usize,
    /// The longest the upstream's answer body may send nothing while it is waited for.
    pub body_idle_timeout: Duration,
    /// Time to establish a new connection to the upstream (pooled ones are not made again).
    pub connect_timeout: Duration,
}

/// A route's [`RouteLimits`] as they are now, shared by every event loop's copy of the route:
/// a reload swaps all four at once ([`LiveRouteLimits::set`]); a request reads them with one
/// `arc_swap` load ([`LiveRouteLimits::get`]), no lock and no allocation.
#[derive(Debug, Clone)]
pub struct LiveRouteLimits(Arc<arc_swap::ArcSwap<RouteLimits>>);

impl LiveRouteLimits {
    /// These limits.
    pub fn new(limits: RouteLimits) -> Self {
        LiveRouteLimits(Arc::new(arc_swap::ArcSwap::from_pointee(limits)))
    }

    /// The limits now (a copy: the request keeps them, whatever a reload does meanwhile).
    #[inline]
    pub fn get(&self) -> RouteLimits {
        **self.0.load()
    }

    /// Replaces the four limits at once, for the requests that start from now on (and the
    /// connections made from now on).
    pub fn set(&self, limits: RouteLimits) {
        self.0.store(Arc::new(limits));
    }
}

/// One upstream route, resolved once at startup.
#[derive(Debug, Clone)]
pub struct Route {
    /// Upstream name (logs, metrics).
    pub name: String,
    /// Path prefix, starting and ending with `/`.
    pub prefix: String,
    /// Upstream scheme.
    pub scheme: Scheme,
    /// Upstream authority (also the `Host` sent upstream).
    pub authority: Authority,
    /// Path of the upstream URL without its trailing `/` (often empty).
    pub base_path: String,
    /// Remove the prefix before appending the path to the upstream URL.
    pub strip_prefix: bool,
    /// The response-head timeout, the body limit and the body idle timeout, as a reload
    /// may change them (shared by every event loop's copy of this route).
    pub limits: LiveRouteLimits,
    /// A session is required (else 401) and its identity is signed.
    pub auth_required: bool,
    /// Forward the browser's cookies (minus the session cookie).
    pub forward_cookies: bool,
    /// An upstream's redirect of a token-carrying write to another origin: refused (502) or
    /// passed on (`cross_origin_redirects`).
    pub cross_origin_redirects: CrossOriginRedirects,
    /// Metrics label of this route.
    pub metrics: RouteId,
    /// How connections to this upstream are made and pooled.
    pub connect: UpstreamConnect,
    /// WebSocket handshakes proxied on this route (`websocket = true`); None: refused (501).
    pub websocket: Option<WebSocketRoute>,
    host: HeaderValue,
}

/// A route's WebSocket limits (`[[upstream]] websocket_*`), as a reload may change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketLimits {
    /// The longest a WebSocket may carry no byte either way; then both sides are closed.
    pub idle_timeout: Duration,
    /// How often the session behind a WebSocket is looked up again (on routes that require
    /// one): a logout, a revocation or the session's expiry closes it within this time.
    pub session_check: Duration,
    /// Most WebSockets open at once on this route (every event loop together); beyond, the
    /// handshake answers 503 `websocket_limit`.
    pub max_open: usize,
    /// When the proxy closes a WebSocket (idle, session ended, shutdown), the longest it
    /// waits to finish the frame in flight, send its Close frames and get each side's Close;
    /// then it drops both connections.
    pub close_timeout: Duration,
    /// The largest body of an upstream's refusal of a handshake (any answer but `101`) that
    /// is passed on to the browser: the proxy reads it whole before answering, so it is
    /// bounded; a longer one answers 502 `bad_gateway`.
    pub max_refusal_body: usize,
}

/// A route's WebSocket settings (`[[upstream]] websocket = true` and its limits). Clones
/// share the limits and the count of open WebSockets: every event loop's copy of the route
/// is one route.
#[derive(Debug, Clone)]
pub struct WebSocketRoute {
    /// The limits now ([`WebSocketRoute::limits`]): a reload replaces them whole
    /// ([`WebSocketRoute::set_limits`]) and wakes the open WebSockets, each holding a
    /// receiver ([`WebSocketRoute::subscribe`]), which take the new timeouts at once.
    limits: Arc<tokio::sync::watch::Sender<WebSocketLimits>>,
    /// The WebSockets open now on this route, shared by every event loop.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Default `upstream[].websocket_close_timeout`.
pub const DEFAULT_WEBSOCKET_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default `upstream[].websocket_max_refusal_body`: an error page or a JSON problem fits.
pub const DEFAULT_WEBSOCKET_MAX_REFUSAL_BODY: usize = 64 * 1024;

/// The most `upstream[].websocket_max_refusal_body` may be: the body is held in memory for
/// each handshake refused at once.
pub const MAX_WEBSOCKET_MAX_REFUSAL_BODY: usize = 16 * 1024 * 1024;

/// The same limits: the settings a config file gives a route (a reload compares a file's with
/// the running ones). The count of open WebSockets is state, not a setting.
impl PartialEq for WebSocketRoute {
    fn eq(&self, other: &Self) -> bool {
        self.limits() == other.limits()
    }
}

impl WebSocketRoute {
    /// Settings with no WebSocket open yet (and the default close timeout).
    pub fn new(idle_timeout: Duration, session_check: Duration, max_open: usize) -> Self {
        WebSocketRoute {
            limits: Arc::new(tokio::sync::watch::Sender::new(WebSocketLimits {
                idle_timeout,
                session_check,
                max_open,
                close_timeout: DEFAULT_WEBSOCKET_CLOSE_TIMEOUT,
                max_refusal_body: DEFAULT_WEBSOCKET_MAX_REFUSAL_BODY,
            })),
            open: Arc::default(),
        }
    }

    /// The same with `close_timeout` (a route of its own: the limits are no longer shared
    /// with the clones made before).
    pub fn with_close_timeout(self, close_timeout: Duration) -> Self {
        let limits = WebSocketLimits {
            close_timeout,
            ..self.limits()
        };
        self.with_limits(limits)
    }

    /// The same with `max_refusal_body` (a route of its own, as [`Self::with_close_timeout`]).
    pub fn with_max_refusal_body(self, max_refusal_body: usize) -> Self {
        let limits = WebSocketLimits {
            max_refusal_body,
            ..self.limits()
        };
        self.with_limits(limits)
    }

    /// The same route (its count of open WebSockets) with `limits`, no longer shared with the
    /// clones made before.
    fn with_limits(self, limits: WebSocketLimits) -> Self {
        WebSocketRoute {
            limits: Arc::new(tokio::sync::watch::Sender::new(limits)),
            open: self.open,
        }
    }

    /// The limits now (a handshake's copy: its `max_open` and the wait for the upgrade).
    pub fn limits(&self) -> WebSocketLimits {
        *self.limits.borrow()
    }

    /// Follows the limits: an open WebSocket holds one and is woken by each
    /// [`WebSocketRoute::set_limits`] (nothing is polled on a timer or per byte).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<WebSocketLimits> {
        self.limits.subscribe()
    }

    /// Replaces the limits of every copy of this route at once (a reload): handshakes from
    /// now on count against the new `max_open` (the WebSockets already open count too, and
    /// stay open), and every WebSocket, open already or not, follows the new timeouts: its
    /// idle deadline becomes its last byte + the new `idle_timeout`, its next session check
    /// its last one + the new `session_check`, and a close its deadline: its start + the new
    /// `close_timeout` (one already in progress too).
    pub fn set_limits(&self, limits: WebSocketLimits) {
        self.limits.send_replace(limits);
    }
}

/// How the proxy connects to one upstream: every field is a limit from the config's
/// `[[upstream]]` (defaults: the documented ones).
#[derive(Debug, Clone)]
pub struct UpstreamConnect {
    /// Time to establish a connection (TCP connect; the TLS handshake is bounded by the
    /// route's `timeout`).
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per host (0: none, a connection per request).
    pub pool_max_idle_per_host: usize,
    /// How long after it is made a pooled connection stops being reused: past it, not taken
    /// for a new request, and closed after the exchange in flight (never cut). None: no
    /// limit. What makes a busy connection pick up a reloaded client certificate or a DNS
    /// change.
    pub pool_max_lifetime: Option<Duration>,
    /// A pooled connection idle at least this long may have been closed by the upstream's
    /// keep-alive timeout just as a request is written to it: an idempotent request sent on
    /// one is signed again (a fresh nonce) and sent once on a new connection if that one
    /// closes without a byte of answer. None: `"off"`, never resent.
    pub pool_stale_after: Option<Duration>,
    /// The longest the upstream's response body may send nothing while the proxy waits for it
    /// (between the head and the first byte, and between two pieces); longer, the answer is
    /// cut (the browser sees it break) and the connection closed.
    pub body_idle_timeout: Duration,
    /// Most header fields in an answer head (`max_response_header_count`); more: 502.
    pub max_response_header_count: usize,
    /// Largest answer head (`max_response_header_bytes`, at least 8 KiB); larger: 502.
    pub max_response_header_bytes: usize,
    /// CAs trusted for this https upstream besides the web PKI roots (and besides the
    /// proxy-wide [`ForwarderSettings::extra_roots`]).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The client certificate presented to this https upstream (mutual TLS), if any: read at
    /// each new connection's handshake, so a reload ([`ClientCert::reload`]) reaches new
    /// connections while pooled ones keep the certificate they were made with (until
    /// `pool_max_lifetime` retires them).
    pub client_cert: Option<Arc<ClientCert>>,
}

impl Default for UpstreamConnect {
    fn default() -> Self {
        UpstreamConnect {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 1024,
            pool_max_lifetime: Some(DEFAULT_POOL_MAX_LIFETIME),
            pool_stale_after: Some(DEFAULT_POOL_STALE_AFTER),
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_response_header_count: super::config::DEFAULT_MAX_RESPONSE_HEADER_COUNT,
            max_response_header_bytes: super::config::DEFAULT_MAX_RESPONSE_HEADER_BYTES,
            extra_roots: Vec::new(),
            client_cert: None,
        }
    }
}

/// Settings of a route, as the config states them.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Upstream name.
    pub name: String,
    /// Path prefix.
    pub prefix: String,
    /// Upstream base URL (`http://host:port[/base]`).
    pub url: Uri,
    /// Remove the prefix.
    pub strip_prefix: bool,
    /// Response-header timeout.
    pub timeout: Duration,
    /// Body limit.
    pub max_body: usize,
    /// Session required.
    pub auth_required: bool,
    /// Forward cookies.
    pub forward_cookies: bool,
    /// An upstream's redirect of a token-carrying write to another origin: refused or passed.
    pub cross_origin_redirects: CrossOriginRedirects,
    /// Connect timeout, pool limits and extra trusted CAs of this upstream.
    pub connect: UpstreamConnect,
    /// WebSocket handshakes proxied (None: refused with 501).
    pub websocket: Option<WebSocketRoute>,
}

impl Route {
    /// Resolves a route; fails for URLs the client cannot reach (no authority, not `http`).
    pub fn new(spec: RouteSpec, metrics: RouteId) -> Result<Route, String> {
        // Routing slices the path at `prefix.len() - 1`; a prefix of `/…/` keeps that a
        // valid, non-underflowing char boundary.
        if !spec.prefix.starts_with('/') || !spec.prefix.ends_with('/') {
            return Err(format!(
                "upstream {}: prefix {:?} must start and end with /",
                spec.name, spec.prefix
            ));
        }
        let scheme = spec.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!(
                "upstream {}: the url must be http:// or https:// (got {scheme}://)",
                spec.name
            ));
        }
        let authority = spec
            .url
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {}: url has no host", spec.name))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("upstream {}: host is not a valid header value", spec.name))?;
        Ok(Route {
            name: spec.name,
            prefix: spec.prefix,
            scheme,
            authority,
            base_path: spec.url.path().trim_end_matches('/').to_owned(),
            strip_prefix: spec.strip_prefix,
            limits: LiveRouteLimits::new(RouteLimits {
                timeout: spec.timeout,
                max_body: spec.max_body,
                body_idle_timeout: spec.connect.body_idle_timeout,
                connect_timeout: spec.connect.connect_timeout,
            }),
            auth_required: spec.auth_required,
            forward_cookies: spec.forward_cookies,
            cross_origin_redirects: spec.cross_origin_redirects,
            metrics,
            connect: spec.connect,
            websocket: spec.websocket,
            host,
        })
    }

    /// The upstream URI (absolute: the signature covers its authority) of a request's URI.
    fn upstream_uri(&self, request_uri: Uri) -> Result<Uri, ProxyError> {
        let received = request_uri.into_parts().path_and_query;
        let target = if !self.strip_prefix && self.base_path.is_empty() {
            // The target goes upstream unchanged: hyper has parsed it already, so it is
            // reused as is rather than copied to text and parsed again.
            received.unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            let received = received.as_ref().map_or("/", PathAndQuery::as_str);
            self.rewritten_target(received)?
        };
        let mut upstream = http::uri::Parts::default();
        upstream.scheme = Some(self.scheme.clone());
        upstream.authority = Some(self.authority.clone());
        upstream.path_and_query = Some(target);
        Uri::from_parts(upstream).map_err(|_| ProxyError::BadRequest("request target".into()))
    }

    /// The upstream target for `path_and_query` (as received): the prefix stripped if the
    /// route says so, the upstream's base path in front.
    fn rewritten_target(&self, path_and_query: &str) -> Result<PathAndQuery, ProxyError> {
        let stripped;
        let rest = if self.strip_prefix {
            // The prefix ends with '/': keep that slash. `/api` (the prefix without its slash)
            // also routes here and becomes `/`.
            let keep_from = self.prefix.len() - 1;
            stripped = match path_and_query.get(keep_from..) {
                Some(tail) if tail.starts_with('/') => tail.to_owned(),
                Some(tail) => format!("/{tail}"),
                None => "/".to_owned(),
            };
            stripped.as_str()
        } else {
            path_and_query
        };
        if self.base_path.is_empty() {
            PathAndQuery::try_from(rest)
        } else {
            PathAndQuery::try_from(format!("{}{rest}", self.base_path))
        }
        .map_err(|_| ProxyError::BadRequest("request target".into()))
    }
}

/// [`check_path`], and a query without raw non-ASCII bytes (browsers percent-encode them; the
/// signature cannot cover them, RFC 9421 component values being ASCII).
pub fn check_target(uri: &Uri) -> Result<(), ProxyError> {
    if let Some(query) = uri.query() {
        if !query.is_ascii() {
            return Err(ProxyError::BadRequest(
                "query refused: raw non-ASCII byte (percent-encode it)".into(),
            ));
        }
    }
    check_path(uri.path())
}

/// Refuses a request whose fields the signature will cover (`signing.extra_headers`) hold a
/// value with a byte above 0x7F (HTTP's obs-text, which the HTTP layer accepts): RFC 9421
/// component values are ASCII, so the signer cannot cover it. Checked before the session is
/// looked up, so such a request is the client's 400 and changes no state, rather than
/// failing at the signer as 500 `internal_error` after the session was extended.
pub fn check_covered_fields(headers: &HeaderMap, covered: &[HeaderName]) -> Result<(), ProxyError> {
    // Usually no extra headers are configured: nothing to look at.
    for name in covered {
        if headers
            .get_all(name)
            .iter()
            .any(|value| !value.as_bytes().is_ascii())
        {
            return Err(ProxyError::BadRequest(format!(
                "field {name} is signed and holds a non-ASCII byte"
            )));
        }
    }
    Ok(())
}

/// Refuses a request whose body is framed with a transfer coding other than plain `chunked`
/// (`gzip, chunked`, a line `gzip` then a line `chunked`, `chunked, chunked`), by the rule
/// [`plainly_chunked`] holds answers to. hyper's server looks only at the last coding of the
/// last line, decodes the chunk framing and hands over the bytes still gzipped; the proxy
/// then drops `Transfer-Encoding` (hop-by-hop) and would sign and forward them as the
/// content, with a `Content-Length`. RFC 9112 §6.1 has a server answer 501 to a coding it
/// does not understand; no reason code means that (501 `websocket_unsupported` is about
/// upgrades), so it is the client's 400 `bad_request`. Checked before the session is looked
/// up: the refusal changes no state. A request without the field costs one lookup.
pub(crate) fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    if plainly_chunked(headers) {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(
            "transfer coding other than `chunked` (RFC 9112 section 6.1)".to_owned(),
        ))
    }
}

/// Refuses a request path that is not in normal form: a `.` or `..` segment (also written
/// with `%2e`, also with `;` parameters after it, the `;` raw or as `%3b`), an empty segment
/// (`//`) other than a trailing slash, an encoded `/` or NUL (`%2f`, `%00`), a `\` (also
/// `%5c`), or a raw non-ASCII byte.
///
/// Why: routing, the route's `auth` setting and `strip_prefix` act on the path as received,
/// while an upstream (or a server in front of it) may normalise it: `/public/../admin`
/// matches a public prefix here and reaches `/admin` there, unauthenticated. Normalising here
/// instead would sign a path other than the one the browser sent; refusing is simpler and
/// no browser produces these paths (it resolves dot segments itself).
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    // Most paths have none of these bytes: one pass, no segment work.
    let bytes = path.as_bytes();
    let mut previous = 0u8;
    let mut plain = true;
    for &b in bytes {
        if matches!(b, b'.' | b'%' | b'\\' | 0x80..) || (b == b'/' && previous == b'/') {
            plain = false;
            break;
        }
        previous = b;
    }
    if plain {
        return Ok(());
    }
    let refuse = |why: &str| Err(ProxyError::BadRequest(format!("path refused: {why}")));
    if !path.is_ascii() {
        // Browsers percent-encode these; raw ones cannot be signed (RFC 9421 component values
        // are ASCII), so they are refused here rather than failing at the signer as a 500.
        return refuse("raw non-ASCII byte (percent-encode it)");
    }
    if bytes.contains(&b'\\') {
        return refuse("backslash");
    }
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment.is_empty() && !last {
            return refuse("empty segment");
        }
        // A segment's dots, each written as `.` or `%2e`; anything else ends the count. Only
        // the part before any `;`: servlet containers (Tomcat, Jetty, Spring) strip path
        // parameters before resolving, so they read `/..;x/` as `/../`.
        let mut rest = before_parameters(segment);
        let mut dots = 0;
        loop {
            match rest {
                [b'.', tail @ ..] => rest = tail,
                [b'%', b'2', b'e' | b'E', tail @ ..] => rest = tail,
                _ => break,
            }
            dots += 1;
        }
        if rest.is_empty() && (dots == 1 || dots == 2) {
            return refuse("dot segment");
        }
        let encoded = segment.as_bytes().windows(3).any(|w| {
            w[0] == b'%'
                && matches!(
                    (w[1], w[2].to_ascii_lowercase()),
                    (b'2', b'f') | (b'5', b'c') | (b'0', b'0')
                )
        });
        if encoded {
            return refuse("encoded slash, backslash or NUL");
        }
    }
    Ok(())
}

/// The part of a path segment before its `;` parameters, the `;` raw or encoded (`%3b`): an
/// upstream that decodes escapes before it drops parameters and resolves dots reads
/// `/..%3bx/` as `/../` (as [`normalized_reading`] reads it: escapes decoded, then
/// parameters dropped), so the dot check must see `..` there too. An encoded `;` is a
/// parameter's start for [`Router::check_reading`] as well (`/api%3bx/x` reads as `/api/x`).
fn before_parameters(segment: &str) -> &[u8] {
    let bytes = segment.as_bytes();
    let end = (0..bytes.len()).find(|&at| {
        matches!(
            bytes.get(at..),
            Some([b';', ..] | [b'%', b'3', b'b' | b'B', ..])
        )
    });
    end.and_then(|end| bytes.get(..end)).unwrap_or(bytes)
}

/// The routing table: longest prefix wins.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Some prefix holds a capital letter: then an all-lowercase path can name it too.
    capitalised: bool,
}

impl Router {
    /// A router over these routes.
    pub fn new(mut routes: Vec<Route>) -> Self {
        // Longest first, so the first match is the longest.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let capitalised = routes
            .iter()
            .any(|r| r.prefix.bytes().any(|b| b.is_ascii_uppercase()));
        Router {
            routes,
            capitalised,
        }
    }

    /// The route for `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| prefix_matches(&r.prefix, path, |a, b| a == b))
    }

    /// Every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Refuses a path that an upstream normalising it would read as one of another route
    /// than `routed` (what [`Router::route`] gave for it as received). `/%61pi/admin` or
    /// `/api;x/admin` matches a public `/` route here, and a Go `ServeMux` (which decodes
    /// escapes) or a Tomcat or Jetty (which drop `;` parameters) serves it as `/api/admin`:
    /// the `auth = "required"` of `/api/` would be skipped. So does `/API/admin`, which
    /// Express and ASP.NET Core route without regard to letter case: the reading's route is
    /// the longest prefix it matches ignoring ASCII case, and `routed` must be as long (a
    /// route configured as `/Reports/` still takes `/Reports/x`). So does `/;/api/admin`,
    /// which Tomcat, merging the `//` its dropped parameters leave, serves as `/api/admin`
    /// ([`normalized_reading`]). Not rerouted (the signature covers the path as sent); no
    /// browser writes these spellings. The case reading also covers a path in lower case when
    /// a prefix holds a capital: `/reports/x` matches only `/` as sent and is `/Reports/x` to
    /// those upstreams. With no capital in any prefix, a path with no `%`, no `;` and no
    /// capital letter costs one scan.
    pub fn check_reading(&self, path: &str, routed: Option<&Route>) -> Result<(), ProxyError> {
        let normalized = normalized_reading(path);
        let reading = match &normalized {
            Some(reading) => reading.as_str(),
            None if self.capitalised || path.bytes().any(|b| b.is_ascii_uppercase()) => path,
            None => return Ok(()),
        };
        // The proxy's own `/auth/` is no route here, so in another spelling (`/%61uth/x`,
        // `/auth;x/x`, `/;/auth/x`, `/AUTH/x`) it would match only a `/` route and be signed
        // and sent there, and an upstream that normalises serves it as `/auth/x`: refused as
        // `dispatch` keeps `/auth/` itself from every upstream.
        if reading
            .get(..AUTH_PREFIX.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(AUTH_PREFIX))
        {
            return Err(ProxyError::BadRequest(
                "path refused: read as an upstream may read it (escapes decoded, `;` \
                 parameters dropped, `//` merged, letter case ignored) it is the proxy's own \
                 /auth/"
                    .to_owned(),
            ));
        }
        let longest = self
            .routes
            .iter()
            .filter(|r| prefix_matches(&r.prefix, reading, str::eq_ignore_ascii_case))
            .map(|r| r.prefix.len())
            .max();
        let same = match (longest, routed) {
            (Some(longest), Some(routed)) => {
                routed.prefix.len() == longest
                    && prefix_matches(&routed.prefix, reading, str::eq_ignore_ascii_case)
            }
            (None, None) => true,
            _ => false,
        };
        if same {
            Ok(())
        } else {
            Err(ProxyError::BadRequest(
                "path refused: read as an upstream may read it (escapes decoded, `;` \
                 parameters dropped, `//` merged, letter case ignored) it names another route"
                    .to_owned(),
            ))
        }
    }
}

/// The proxy's own endpoints (`/auth/login`, `/auth/session`, `/auth/logout`): never an
/// upstream's, whatever the routes.
const AUTH_PREFIX: &str = "/auth/";

/// Whether `path` falls under the route `prefix`: it starts with the prefix, or is the
/// prefix without its final `/`, each compared by `same` (exact bytes for [`Router::route`],
/// ASCII case ignored for [`Router::check_reading`]).
fn prefix_matches(prefix: &str, path: &str, same: impl Fn(&str, &str) -> bool) -> bool {
    let bare = &prefix[..prefix.len().saturating_sub(1)];
    path.get(..prefix.len())
        .is_some_and(|head| same(head, prefix))
        || same(path, bare)
}

/// `path` as an upstream that normalises it may read it: percent-escapes decoded (invalid
/// UTF-8 replaced), every segment's `;` parameters dropped, and the empty segments left
/// then collapsed (a trailing slash kept). `None` when it has neither an escape nor a `;`, so
/// reads the same everywhere.
///
/// Why collapse: Tomcat drops path parameters and then merges `//`, so it serves `/;/api/x`
/// (or `/%3b/api/x`, `/;x/api/x`) as `/api/x`; read as `//api/x`, that path matched no
/// prefix longer than `/` here, and a public `/` route let it past the `auth` of `/api/`.
/// Every empty segment goes, not only those parameters left: [`check_path`] has refused a
/// path with `//` or `%2f` already, so the others are only the trailing slash, and a server
/// that merges slashes (Tomcat, nginx's `merge_slashes`) merges them all.
pub fn normalized_reading(path: &str) -> Option<String> {
    if !path.bytes().any(|b| b == b'%' || b == b';') {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut reading = String::with_capacity(decoded.len());
    let mut segments = decoded.split('/');
    // What comes before the first `/` (nothing, in a path that starts with one).
    reading.push_str(
        segments
            .next()
            .and_then(|first| first.split(';').next())
            .unwrap_or_default(),
    );
    let mut segments = segments.peekable();
    while let Some(segment) = segments.next() {
        let kept = segment.split(';').next().unwrap_or_default();
        if kept.is_empty() && segments.peek().is_some() {
            continue;
        }
        reading.push('/');
        reading.push_str(kept);
    }
    Some(reading)
}

/// Forwarding settings that don't depend on the route.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// Name of the session cookie (including any `__Host-` prefix), removed even when cookies
    /// are forwarded.
    pub session_cookie: String,
    /// `X-Forwarded-Proto` value (the public origin's scheme).
    pub public_scheme: String,
    /// `X-Forwarded-Host` value (the public origin's `host[:port]`).
    pub public_host: String,
    /// Connect timeout to upstreams.
    pub connect_timeout: Duration,
    /// Idle pooled connections kept per upstream.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Certificate authorities trusted for https upstreams besides the public web PKI roots
    /// (a private CA, or a test certificate).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// CAs the `verify_url` client trusts besides the web PKI roots and `extra_roots`
    /// (`auth.verify_ca_file`).
    pub verify_extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The client certificate the `verify_url` client presents (`auth.verify_client_cert_file`
    /// and `verify_client_key_file`), if any.
    pub verify_client_cert: Option<Arc<ClientCert>>,
    /// How long a `verify_url` connection is reused (`auth.verify_pool_max_lifetime`; `None`:
    /// no limit).
    pub verify_pool_max_lifetime: Option<Duration>,
    /// The `verify_url` answer's head limits (`auth.max_verify_answer_header_bytes` and
    /// `auth.max_verify_answer_header_count`).
    pub verify_answer_head: AnswerHeadLimits,
    /// `auth.verify_url`, whose pool the forwarder keeps (None: the users file checks the
    /// credentials).
    pub verify_url: Option<Uri>,
    /// Where each route's pool counts the answers it cut after their head (by the route's
    /// [`Route::metrics`] id).
    pub metrics: Arc<Metrics>,
}

/// Signs and sends requests upstream: one connection pool per route (each with that
/// upstream's connect timeout, pool limits and trusted CAs), one more for `verify_url`.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// `auth.verify_url` and its connection pool, when the API checks the credentials.
    verify: Option<(Uri, UpstreamPool)>,
    /// Per-route pools, by route prefix (prefixes are unique; a handful of routes, so a scan
    /// is cheaper than hashing the prefix).
    route_pools: Arc<[(String, UpstreamPool)]>,
    signer: Signer,
    session_cookie: String,
    forwarded_proto: HeaderValue,
    forwarded_host: HeaderValue,
}

/// What the forwarder needs to know about the browser's request besides its parts and body.
#[derive(Debug)]
pub struct ForwardContext<'a> {
    /// The identity to sign (None on public routes).
    pub identity: Option<&'a EncodedIdentity>,
    /// The browser's address as the `X-Forwarded-For` value ([`forwarded_for_value`]).
    pub forwarded_for: &'a HeaderValue,
    /// The request id (`X-Request-Id`).
    pub request_id: &'a HeaderValue,
    /// Unix seconds, for the signature's `created`.
    pub now: u64,
    /// The clock `now` was read from: a spare copy of a request lost with a stale pooled
    /// connection is signed when it is sent, at the time then.
    pub clock: &'a dyn Clock,
}

/// The connector of an upstream: plain TCP for http://, rustls for https:// (web PKI roots
/// plus `shared_roots` plus the upstream's own CAs); `TCP_NODELAY`, the connect timeout.
/// Public for the bench baseline (`countersign-baseline-proxy`), which pools upstream
/// connections exactly as the proxy does.
pub fn upstream_connector(
    connect: &UpstreamConnect,
    shared_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<HttpsConnector<LiveConnectTimeout>, String> {
    connector_reading(connect, shared_roots, None)
}

/// [`upstream_connector`] for a route's pool: the connect timeout is the route's live one
/// (`limits`' `connect_timeout`, which a reload sets), read at each connection made.
pub fn route_connector(
    connect: &UpstreamConnect,
    shared_roots: &[rustls::pki_types::CertificateDer<'static>],
    limits: &LiveRouteLimits,
) -> Result<HttpsConnector<LiveConnectTimeout>, String> {
    connector_reading(connect, shared_roots, Some(limits.clone()))
}

fn connector_reading(
    connect: &UpstreamConnect,
    shared_roots: &[rustls::pki_types::CertificateDer<'static>],
    live: Option<LiveRouteLimits>,
) -> Result<HttpsConnector<LiveConnectTimeout>, String> {
    let mut connector = HttpConnector::new();
    // Small request/response exchanges: Nagle's delay would add latency for nothing.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect.connect_timeout));
    // The TLS wrapper below decides per URI: plain TCP for http://, rustls for https://.
    connector.enforce_http(false);
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in shared_roots.iter().chain(&connect.extra_roots) {
        roots
            .add(cert.clone())
            .map_err(|e| format!("upstream CA certificate: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("upstream TLS: {e}"))?
    .with_root_certificates(roots);
    let tls = match &connect.client_cert {
        Some(cert) => {
            // Asked for at each handshake: a reloaded certificate reaches the next connection.
            let mut tls = tls.with_client_cert_resolver(cert.clone());
            // No session resumption: a resumed TLS 1.3 session keeps the identity of the
            // session it resumes (the upstream sees the old certificate, and each resumed
            // connection gets tickets for it again), so after a reload new connections would
            // go on presenting the replaced, possibly expired, certificate. Each new
            // connection makes a full handshake instead; pooled connections make that rare.
            tls.resumption = rustls::client::Resumption::disabled();
            tls
        }
        None => tls.with_no_client_auth(),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(LiveConnectTimeout {
            http: connector,
            built_with: connect.connect_timeout,
            live,
        }))
}

/// An upstream's TCP connector (hyper-util's [`HttpConnector`], `TCP_NODELAY`) whose connect
/// timeout is read at each connection made: a route's comes from its [`LiveRouteLimits`]
/// (one `arc_swap` load per connection made, none per request), so a reload reaches the
/// connections made after it; a pooled connection is not made again, so it keeps going. The
/// timeout means what hyper-util's own means (the TCP connect, shared among the addresses a
/// name resolves to; a route's TLS handshake is bounded by the route's `timeout`, which drops
/// the attempt with the request: a route's pool connects within the request's future), and a
/// connection past it fails with hyper-util's own error: the same 502 `bad_gateway` as before
/// it was live. The `verify_url` pool bounds TCP connect and TLS handshake together by it
/// (`PoolSettings::whole_connect_timeout`).
#[derive(Debug, Clone)]
pub struct LiveConnectTimeout {
    http: HttpConnector,
    /// The connect timeout `http` was built with.
    built_with: Duration,
    /// Where the timeout is now (None: always `built_with`).
    live: Option<LiveRouteLimits>,
}

impl tower_service::Service<Uri> for LiveConnectTimeout {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<Uri>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self.live.as_ref().map(|live| live.get().connect_timeout) {
            Some(now) if now != self.built_with => {
                // A reload changed it: this connection gets a copy of the connector's
                // settings with the new timeout (once per connection made, after a reload).
                let mut http = self.http.clone();
                http.set_connect_timeout(Some(now));
                http.call(uri)
            }
            _ => self.http.call(uri),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client certificates (mutual TLS to upstreams)
// ---------------------------------------------------------------------------------------------

/// Largest PEM file read: the client certificate and key here, the listener's `tls_cert` and
/// `tls_key` (`server.rs`). A chain is a few KiB. Without a bound, a path naming a device
/// (`/dev/zero`, `/dev/urandom`) or a huge file was read until memory ran out (the PEM reader
/// buffers a line until its newline) and the proxy aborted.
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// Which of the two files of a client certificate a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertFile {
    /// The certificate chain (`client_cert_file`).
    Cert,
    /// The private key (`client_key_file`).
    Key,
}

/// Why a client certificate and key could not be used: which file, and the problem (naming
/// the file; never any key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertError {
    /// The file at fault.
    pub file: ClientCertFile,
    /// What is wrong, starting with the file's path.
    pub problem: String,
}

/// The client certificate presented to an https upstream or to `verify_url` (mutual TLS): the
/// chain and private key read from two PEM files, checked (the key matches the certificate,
/// the certificate is within its validity dates) and swapped whole by [`ClientCert::reload`].
/// rustls asks for it at each handshake (a new connection), never per request.
///
/// The key's PEM text and DER bytes are zeroized once parsed; the parsed signing key lives in
/// rustls/ring, which does not zeroize it. `Debug` shows the file paths only.
pub struct ClientCert {
    /// The config keys naming the files, for reload messages (`upstream[0].client_cert_file`,
    /// `upstream[0].client_key_file`).
    settings: (String, String),
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ClientCert {
    /// Reads and checks `cert_file` and `key_file` (see [`read_client_cert`]); `settings`
    /// are the config keys naming them (for reload messages).
    pub fn load(
        settings: (String, String),
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Result<ClientCert, ClientCertError> {
        let key = read_client_cert(cert_file, key_file, std::time::SystemTime::now())?;
        Ok(ClientCert {
            settings,
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: arc_swap::ArcSwap::new(key),
        })
    }

    /// Reads the two files again; when they pass the checks, new connections present the new
    /// certificate (pooled connections keep theirs until they close). A failure keeps the
    /// current one. Ok: what was loaded (config keys, file, SHA-256 fingerprint); Err: why not.
    pub fn reload(&self) -> Result<String, String> {
        match read_client_cert(
            &self.cert_file,
            &self.key_file,
            std::time::SystemTime::now(),
        ) {
            Ok(key) => {
                let fingerprint = key
                    .end_entity_cert()
                    .map(|c| super::server::cert_fingerprint(c))
                    .unwrap_or_default();
                self.current.store(key);
                Ok(format!(
                    "{}/{} ({}, SHA-256 {fingerprint}) for new connections",
                    self.settings.0,
                    self.settings.1,
                    self.cert_file.display()
                ))
            }
            Err(e) => Err(format!(
                "{} not reloaded, keeping the current client certificate: {}",
                match e.file {
                    ClientCertFile::Cert => &self.settings.0,
                    ClientCertFile::Key => &self.settings.1,
                },
                e.problem
            )),
        }
    }

    /// The end-entity certificate presented now (DER).
    pub fn certificate(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        let current = self.current.load();
        current
            .end_entity_cert()
            .ok()
            .map(|c| c.clone().into_owned())
    }
}

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // Always offered (as rustls' own single-certificate resolver does): an upstream that
        // does not trust it refuses the handshake, and says so.
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Reads a PEM certificate chain and a PEM private key (PKCS#8, SEC1 or PKCS#1; RSA, ECDSA
/// P-256/P-384 or Ed25519) and checks them: at least one certificate, the key usable and
/// matching the first certificate, that certificate within its validity dates at `now`.
/// Errors name the file at fault and never quote key material.
pub fn read_client_cert(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
    now: std::time::SystemTime,
) -> Result<Arc<rustls::sign::CertifiedKey>, ClientCertError> {
    let cert_err = |problem: String| ClientCertError {
        file: ClientCertFile::Cert,
        problem: format!("{}: {problem}", cert_file.display()),
    };
    let key_err = |problem: String| ClientCertError {
        file: ClientCertFile::Key,
        problem: format!("{}: {problem}", key_file.display()),
    };
    let cert_pem = read_pem_file(cert_file).map_err(cert_err)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate file: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(
            "not a PEM certificate file (no \"BEGIN CERTIFICATE\" block)".into(),
        ));
    };
    check_validity(leaf, now).map_err(cert_err)?;
    let key_pem = read_pem_file(key_file).map_err(key_err)?;
    let signing_key = parse_private_key(&key_pem).map_err(key_err)?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(key_err(format!(
                "the private key does not match the certificate in {}",
                cert_file.display()
            )))
        }
        Err(e) => return Err(cert_err(format!("unusable certificate: {e}"))),
    }
    Ok(Arc::new(certified))
}

/// A PEM file of at most [`MAX_PEM_FILE_BYTES`], its bytes zeroized when dropped; the error
/// does not name the file (the caller does). The buffer is sized before reading, so a key file
/// is read without the buffer growing: a grown buffer's old allocation, holding the key's first
/// part, would be freed without being zeroized. Sized from the file's length, or to the whole
/// cap when the length is not known in advance (a pipe such as `<(sops -d key.pem)`, a /proc
/// file: their length reads 0), as `keyfile` reads keyrings.
pub(crate) fn read_pem_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let size = match file.metadata().map_or(0, |m| m.len()) {
        0 => MAX_PEM_FILE_BYTES,
        len => len.min(MAX_PEM_FILE_BYTES),
    };
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(
        usize::try_from(size).unwrap_or(0).saturating_add(1),
    ));
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_PEM_FILE_BYTES} bytes: not a PEM file"
        ));
    }
    Ok(bytes)
}

/// The private key of a PEM file (its first PKCS#8, SEC1 or PKCS#1 block, read by
/// `rustls-pemfile`): a client certificate's key, and the listener's `tls_key` (`server.rs`).
/// The key's DER is zeroized once rustls holds it (the parsed key lives in ring, which does not
/// zeroize it); errors never quote the file's content.
pub(crate) fn parse_private_key(pem: &[u8]) -> Result<Arc<dyn rustls::sign::SigningKey>, String> {
    use zeroize::Zeroize as _;
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    let encrypted = || {
        "the private key is encrypted, which is not supported (decrypt it, e.g. \
         `openssl pkey -in <file> -out <new file>`, and protect the file instead)"
            .to_owned()
    };
    // OpenSSL's legacy encryption keeps the usual label and adds RFC 1421 headers.
    if has(b"Proc-Type: 4,ENCRYPTED") {
        return Err(encrypted());
    }
    let mut key = match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(key)) => key,
        Ok(None) if has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") => return Err(encrypted()),
        Ok(None) => {
            return Err(
                "not a PEM private key file (no \"BEGIN PRIVATE KEY\", \"BEGIN EC PRIVATE \
                 KEY\" or \"BEGIN RSA PRIVATE KEY\" block)"
                    .to_owned(),
            )
        }
        Err(_) => return Err("not a PEM private key file (a PEM block is damaged)".to_owned()),
    };
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| {
        "the key block is not a usable private key (RSA of 2048 bits or more, ECDSA P-256 or \
         P-384, or Ed25519)"
            .to_owned()
    });
    key.zeroize();
    signing_key
}

/// Reads the validity of a chain's first certificate and checks that it holds at `now`: every
/// handshake would fail with a certificate that has expired or is not valid yet, so it is
/// refused at load (start, `check-config`, reload), naming the date, rather than failing each
/// connection. Returns the validity (its `notAfter` text for the load's log line).
pub(crate) fn check_validity(leaf: &[u8], now: std::time::SystemTime) -> Result<Validity, String> {
    let validity = x509_validity(leaf)
        .ok_or_else(|| "its first certificate is not a valid X.509 certificate".to_owned())?;
    let now_secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now_secs > validity.not_after {
        return Err(format!(
            "the certificate expired at {} (notAfter); renew it",
            validity.not_after_text
        ));
    }
    if now_secs < validity.not_before {
        return Err(format!(
            "the certificate is not valid before {} (notBefore); check this machine's clock \
             or the certificate",
            validity.not_before_text
        ));
    }
    Ok(validity)
}

/// A certificate's validity (RFC 5280 section 4.1.2.5) as read by `x509-parser`: unix
/// seconds, and as text for messages.
pub(crate) struct Validity {
    not_before: i64,
    pub(crate) not_after: i64,
    not_before_text: String,
    /// `notAfter` as text (`2027-01-31 12:00:00 UTC`).
    pub(crate) not_after_text: String,
}

/// The validity of a DER X.509 certificate; None when the bytes are not one.
fn x509_validity(der: &[u8]) -> Option<Validity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = cert.validity();
    let text = |t: &x509_parser::time::ASN1Time| {
        let t = t.to_datetime();
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    };
    Some(Validity {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        not_before_text: text(&validity.not_before),
        not_after_text: text(&validity.not_after),
    })
}

/// The `verify_url` pool: the routes' pool (`client::conn::http1` keep-alive connections,
/// each driven by its own task), so its head limits are exact (`max_header_size`), a
/// connection past `verify_pool_max_lifetime` is not taken again, and a connection attempt
/// belongs to the login waiting for it (dropped with it: nothing connects in the background).
/// Unlike a route's, its connect timeout bounds the TCP connect and the TLS handshake
/// together.
fn verify_pool(url: &Uri, settings: &ForwarderSettings) -> Result<UpstreamPool, String> {
    let connect = UpstreamConnect {
        connect_timeout: settings.connect_timeout,
        extra_roots: settings.verify_extra_roots.clone(),
        client_cert: settings.verify_client_cert.clone(),
        ..UpstreamConnect::default()
    };
    let connector = upstream_connector(&connect, &settings.extra_roots)?;
    let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
        return Err("auth.verify_url: not an absolute http(s) URL".to_owned());
    };
    let upstream = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("auth.verify_url: {e}"))?;
    let body_errors = Arc::new(UpstreamBodyErrors::new("verify_url".to_owned()));
    Ok(UpstreamPool::reporting_to(
        PoolSettings {
            upstream,
            max_idle: settings.pool_max_idle_per_host,
            idle_timeout: settings.pool_idle_timeout,
            max_lifetime: settings.verify_pool_max_lifetime,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            live_limits: None,
            max_response_header_count: settings.verify_answer_head.max_fields,
            max_response_header_bytes: settings.verify_answer_head.max_bytes,
            // Logins are POSTs, never resent: no spare to decide on.
            stale_after: None,
            whole_connect_timeout: Some(settings.connect_timeout),
        },
        connector,
        body_errors,
    ))
}

/// Bounds on the head of an answer the proxy reads (the `verify_url` answer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHeadLimits {
    /// The head's size, status line included.
    pub max_bytes: usize,
    /// Its number of header fields.
    pub max_fields: usize,
}

impl Default for AnswerHeadLimits {
    /// hyper's own limits, which applied before the keys existed.
    fn default() -> Self {
        AnswerHeadLimits {
            max_bytes: super::config::DEFAULT_MAX_RESPONSE_HEADER_BYTES,
            max_fields: super::config::DEFAULT_MAX_RESPONSE_HEADER_COUNT,
        }
    }
}

impl Forwarder {
    /// A forwarder signing with `signer`, with a connection pool for each of `routes`. Must
    /// be called inside a tokio runtime.
    pub fn new(
        signer: Signer,
        settings: &ForwarderSettings,
        routes: &[Route],
    ) -> Result<Forwarder, String> {
        let verify = match &settings.verify_url {
            Some(url) => Some((url.clone(), verify_pool(url, settings)?)),
            None => None,
        };
        let mut route_pools = Vec::with_capacity(routes.len());
        for route in routes {
            let connector = route_connector(&route.connect, &settings.extra_roots, &route.limits)
                .map_err(|e| format!("upstream {}: {e}", route.name))?;
            let upstream = Uri::builder()
                .scheme(route.scheme.clone())
                .authority(route.authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| format!("upstream {}: {e}", route.name))?;
            let body_errors = settings
                .metrics
                .upstream_body_errors(route.metrics)
                .unwrap_or_else(|| Arc::new(UpstreamBodyErrors::new(route.name.clone())));
            let pool = UpstreamPool::reporting_to(
                PoolSettings {
                    upstream,
                    max_idle: route.connect.pool_max_idle_per_host,
                    idle_timeout: route.connect.pool_idle_timeout,
                    max_lifetime: route.connect.pool_max_lifetime,
                    body_idle_timeout: route.connect.body_idle_timeout,
                    max_response_header_count: route.connect.max_response_header_count,
                    max_response_header_bytes: route.connect.max_response_header_bytes,
                    stale_after: route.connect.pool_stale_after,
                    whole_connect_timeout: None,
                    live_limits: Some(route.limits.clone()),
                },
                connector,
                body_errors,
            );
            route_pools.push((route.prefix.clone(), pool));
        }
        Ok(Forwarder {
            verify,
            route_pools: route_pools.into(),
            signer,
            session_cookie: settings.session_cookie.clone(),
            forwarded_proto: HeaderValue::from_str(&settings.public_scheme)
                .map_err(|_| "public origin scheme is not a header value".to_owned())?,
            forwarded_host: HeaderValue::from_str(&settings.public_host)
                .map_err(|_| "public origin host is not a header value".to_owned())?,
        })
    }

    /// The signer (its keyring handle is what SIGHUP swaps).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Builds, signs and sends the upstream request; returns the upstream response with its
    /// body streaming. The caller has already read `body` within the route's limit.
    pub async fn forward(
        &self,
        route: &Route,
        parts: http::request::Parts,
        body: Bytes,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.forward_within(route, route.limits.get(), parts, body, ctx)
            .await
    }

    /// [`Forwarder::forward`] with the route's `limits` as the request read them when it
    /// started (a reload may have changed the route's since): its `timeout` and
    /// `body_idle_timeout` apply.
    pub async fn forward_within(
        &self,
        route: &Route,
        limits: RouteLimits,
        mut parts: http::request::Parts,
        body: Bytes,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let pool = self.sign_for_upstream(route, &mut parts, &body, &ctx, false)?;
        // What a spare copy of an idempotent request is signed over, should its pooled
        // connection be stale (`pool_stale_after`). Taken only for an idempotent method: a
        // GET's empty body costs nothing to keep; a PUT's is a reference count.
        let resend_body = idempotent(&parts.method).then(|| body.clone());
        let request = Request::from_parts(parts, Full::new(body));
        let spare = |sent: &Request<Full<Bytes>>| -> Option<SpareRequest<'_>> {
            let body = resend_body?;
            let copy = spare_copy(sent);
            let ctx = &ctx;
            Some(Box::new(move || self.resigned(route, copy, body, ctx)))
        };
        let response = in_time(route, limits.timeout, pool.send(request, spare)).await?;
        let (mut parts, mut body) = response.into_parts();
        body.set_idle_timeout(limits.body_idle_timeout);
        // For the line of an answer cut after its head. Cloned after the upstream request's
        // header was (in `prepare_upstream_headers`), so the bytes are shared (the body boxes
        // the clone: UpstreamBody::keep_request_id).
        body.keep_request_id(ctx.request_id.clone());
        strip_hop_by_hop(&mut parts.headers);
        filter_upstream_response(&mut parts.headers, &self.session_cookie);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    /// Builds, signs and sends a WebSocket handshake (a `GET` without a body) upstream on a
    /// connection of its own, with the same header hygiene and signature as any request, plus
    /// the `Upgrade: websocket` and `Connection: upgrade` fields that hygiene removed (they are
    /// hop-by-hop: the proxy asks for the upgrade on its own connection). Returns the
    /// upstream's answer as it came: a `101` to take over, or a refusal to pass on.
    pub async fn forward_upgrade(
        &self,
        route: &Route,
        mut parts: http::request::Parts,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        let pool = self.sign_for_upstream(route, &mut parts, &[], &ctx, true)?;
        let request = Request::from_parts(parts, Full::new(Bytes::new()));
        in_time(
            route,
            route.limits.get().timeout,
            pool.send_upgrade(request),
        )
        .await
    }

    /// Makes `parts` the signed upstream request of `route` (its URI, HTTP/1.1, the header
    /// hygiene, for a WebSocket handshake the upgrade fields, the signature over `body`, then
    /// the origin form for the wire) and returns the route's pool.
    fn sign_for_upstream(
        &self,
        route: &Route,
        parts: &mut http::request::Parts,
        body: &[u8],
        ctx: &ForwardContext<'_>,
        websocket: bool,
    ) -> Result<&UpstreamPool, ProxyError> {
        parts.uri = route.upstream_uri(std::mem::take(&mut parts.uri))?;
        // Upstreams are spoken to over pooled HTTP/1.1 whatever the browser used.
        parts.version = Version::HTTP_11;
        prepare_upstream_headers(&mut parts.headers, route, &self.header_policy(), ctx)?;
        one_content_length(&mut parts.headers, body.len());
        if websocket {
            // Hop-by-hop, so removed above: asked for again on the proxy's own connection.
            let headers = &mut parts.headers;
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        self.signer
            .sign_encoded(parts, body, ctx.identity, ctx.now, &Nonce::random())
            .map_err(|e| ProxyError::Internal(format!("signing failed: {e}")))?;
        // Signed over the absolute URI (its authority is the `Host` sent); on the wire an
        // HTTP/1.1 request to an origin server carries the origin form (RFC 9112 §3.2.1).
        // An absolute-form target with a fragment and no path (`http://app.test#x`) leaves
        // the `http` crate an empty path-and-query: the absolute URI reads its path as `/`
        // (what the signature covers), but a URI without a scheme displays it as nothing,
        // and hyper wrote `GET  HTTP/1.1`. `as_str` gives `/` for it (and for `/` itself,
        // which the static one equals): one length check, no copy.
        parts.uri = match std::mem::take(&mut parts.uri).into_parts().path_and_query {
            Some(target) if target.as_str() != "/" => Uri::from(target),
            _ => Uri::from(PathAndQuery::from_static("/")),
        };
        self.route_pools
            .iter()
            .find(|(prefix, _)| *prefix == route.prefix)
            .map(|(_, pool)| pool)
            .ok_or_else(|| {
                ProxyError::Internal(format!("no connection pool for upstream {}", route.name))
            })
    }

    /// `copy` ([`spare_copy`] of an upstream request as [`Forwarder::sign_for_upstream`] made
    /// it) signed again over `body`, with a fresh nonce and at the time now: the spare sent on
    /// a new connection when the stale pooled one the request went on closes without
    /// answering. Signed anew, not sent as it was: the upstream may have read and recorded the
    /// first one's nonce before its connection closed, and would refuse it as `replayed`; and
    /// dated when it is sent, as the first one was (`server.rs`, v), not when that one was:
    /// a lost exchange may have lasted longer than the API's window. None if it cannot be
    /// signed (it was a moment ago, so never in practice): the request is then not resent.
    fn resigned(
        &self,
        route: &Route,
        copy: http::request::Parts,
        body: Bytes,
        ctx: &ForwardContext<'_>,
    ) -> Option<Request<Full<Bytes>>> {
        let mut parts = copy;
        let sent_uri = parts.uri.clone();
        // Signed over the absolute URI, as the first one was (`sign_for_upstream`).
        let mut absolute = http::uri::Parts::default();
        absolute.scheme = Some(route.scheme.clone());
        absolute.authority = Some(route.authority.clone());
        absolute.path_and_query = sent_uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(absolute).ok()?;
        let now = ctx.clock.now_unix();
        self.signer
            .sign_encoded(&mut parts, &body, ctx.identity, now, &Nonce::random())
            .ok()?;
        parts.uri = sent_uri;
        Some(Request::from_parts(parts, Full::new(body)))
    }

    /// The session cookie's name (removed from what upstreams set).
    pub fn session_cookie(&self) -> &str {
        &self.session_cookie
    }

    /// POSTs a JSON body to `auth.verify_url`, signed without identity (the credential
    /// check); returns the status and the answer (more than `answer_limit` bytes: 502). The
    /// exchange, connecting included, ends at `timeout` (504); an unreachable API, a head over
    /// `auth.max_verify_answer_header_*` or a broken answer is a 502.
    pub async fn post_signed_json(
        &self,
        body: Bytes,
        request_id: &HeaderValue,
        now: u64,
        timeout: Duration,
        answer_limit: usize,
    ) -> Result<(http::StatusCode, Bytes), ProxyError> {
        let upstream = || "verify_url".to_owned();
        let Some((url, pool)) = &self.verify else {
            return Err(ProxyError::Internal(
                "no verify_url to check the login".into(),
            ));
        };
        let authority = url.authority().ok_or_else(|| ProxyError::BadGateway {
            upstream: upstream(),
            detail: "verify_url has no host".into(),
        })?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::Internal("verify_url host".into()))?;
        let (mut parts, ()) = Request::post(url.clone())
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            // The login's id, as every upstream request carries its request's: the API's
            // log line of a failed check can be found from the proxy's (and the client's).
            .header(X_REQUEST_ID, request_id.clone())
            .body(())
            .map_err(|e| ProxyError::Internal(format!("verify request: {e}")))?
            .into_parts();
        self.signer
            .sign(&mut parts, &body, None, now, &Nonce::random())
            .map_err(|e| ProxyError::Internal(format!("signing failed: {e}")))?;
        // Signed over the absolute URI, as a route's request is (`sign_for_upstream`): its
        // scheme decides which port is the default one in `@authority`. On the wire, the
        // origin form the pool sends: the path (`/` when the URL has none) and the query.
        let path = match url.path() {
            "" => "/",
            path => path,
        };
        let target = match url.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        parts.uri = Uri::try_from(target)
            .map_err(|e| ProxyError::Internal(format!("verify_url target: {e}")))?;
        let exchange = async {
            // A POST is never sent twice: no spare, even on a connection idle for long.
            let response = pool
                .send(Request::from_parts(parts, Full::new(body)), |_| None)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let answer = Limited::new(body, answer_limit)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts.status, answer))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(ProxyError::GatewayTimeout {
                upstream: upstream(),
            }),
            Ok(Err(detail)) => Err(ProxyError::BadGateway {
                upstream: upstream(),
                detail,
            }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// The fixed part of the upstream header policy (what does not depend on the route or
    /// the request).
    fn header_policy(&self) -> HeaderPolicy<'_> {
        let identity = &self.signer.config().identity_headers;
        HeaderPolicy {
            identity_user: &identity.user,
            identity_roles: &identity.roles,
            session_cookie: &self.session_cookie,
            forwarded_proto: &self.forwarded_proto,
            forwarded_host: &self.forwarded_host,
        }
    }
}

/// What [`Forwarder::resigned`] signs again: `sent`'s method, version, URI (origin form, as
/// sent) and header fields, taken before `sent` goes to the upstream.
fn spare_copy(sent: &Request<Full<Bytes>>) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = sent.method().clone();
    *copy.version_mut() = sent.version();
    *copy.uri_mut() = sent.uri().clone();
    *copy.headers_mut() = sent.headers().clone();
    copy.into_parts().0
}

/// Whether a request with `method` may be sent twice with the same intended effect
/// (RFC 9110 §9.2.2): the ones a spare may be made for. Not POST or PATCH, nor an unknown
/// method.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An exchange with `route`'s upstream within its `timeout` (the response head): 504 past it,
/// 502 when it failed.
async fn in_time<T>(
    route: &Route,
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<T, super::upstream_pool::PoolError>>,
) -> Result<T, ProxyError> {
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(ProxyError::GatewayTimeout {
            upstream: route.name.clone(),
        }),
        Ok(Err(e)) => Err(ProxyError::BadGateway {
            upstream: route.name.clone(),
            detail: e.to_string(),
        }),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// What [`prepare_upstream_headers`] needs besides the route and the request.
#[derive(Debug, Clone, Copy)]
struct HeaderPolicy<'a> {
    identity_user: &'a HeaderName,
    identity_roles: &'a HeaderName,
    session_cookie: &'a str,
    forwarded_proto: &'a HeaderValue,
    forwarded_host: &'a HeaderValue,
}

/// Requests with at least this many field names are prepared in place (see
/// [`prepare_upstream_headers`]).
const IN_PLACE_FROM: usize = 8;

/// How [`prepare_upstream_headers`] built the upstream's fields (the tests check both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prepared {
    /// The browser's map, with the fields it may not send removed.
    InPlace,
    /// A new map with the fields it may send copied.
    Copied,
}

/// Header hygiene: what the browser may not say (hop-by-hop and the names its `Connection`
/// lists, spoofable, identity, cookies or just the session cookie) is removed, then what the
/// upstream needs is set. The signer then replaces identity and signature fields.
///
/// Two ways to the same set of fields (each name with its values in order; only the order of
/// distinct names can differ, which HTTP gives no meaning to, RFC 9110 §5.3). What they cost
/// (callgrind, per field): a `remove` hashes, probes and shifts, ~300 instructions; copying a
/// field into a new map ~150, plus ~300 for the map itself. A request loses one to three
/// fields (`Cookie`, the CSRF token, `Connection`), so which is cheaper depends on how many
/// it keeps, which its number of names tells without a scan:
/// - in place when it has [`IN_PLACE_FROM`] names or more: a browser's request keeps most
///   (`Accept-*`, `User-Agent`, `Referer`, `Sec-*`);
/// - copied into a new map when it has fewer (a bare client's: `Host`, `Accept`, `Cookie`,
///   the token; removing two fields to keep one costs more than building a map).
fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    route: &Route,
    policy: &HeaderPolicy<'_>,
    ctx: &ForwardContext<'_>,
) -> Result<Prepared, ProxyError> {
    remove_connection_fields(headers);
    // `Host`, `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` are neither removed nor
    // copied: the `insert`s below replace every value a browser sent for them.
    let goes = |name: &HeaderName| {
        let text = name.as_str();
        HOP_BY_HOP.contains(name)
            || spoofable_text(text)
            || name == policy.identity_user
            || name == policy.identity_roles
            || (!route.forward_cookies && name == header::COOKIE)
            // The `_` spellings of all of the above (but `Cookie`, which has no `-`): only
            // for the rare name with a `_`.
            || (text.contains('_') && underscore_spelling_goes(text, policy))
    };
    // Room for the five fields set here and the signer's five (Content-Digest, the two
    // identity fields, Signature-Input, Signature), so the map grows (and rehashes) at most
    // once. `try_reserve`, not `reserve`, which panics ("size overflows MAX_SIZE") past 24,576
    // names. A full map would also make hyper's HTTP/1 client panic in the upstream
    // connection's task as it adds `Transfer-Encoding` (`headers.entry`, any request with a
    // body: it was a 502). Requests reach here with `server.max_header_count` names at most
    // (10,000 at most: hyper counts HTTP/1's field lines, `server::handle` HTTP/2's names), so
    // the map is never near full and this never fails now; if that bound ever goes, such a
    // request is the client's 400, not a panic here.
    let prepared = if headers.keys_len() >= IN_PLACE_FROM {
        remove_fields_where(headers, goes);
        headers.try_reserve(10).map_err(|_| {
            ProxyError::BadRequest("request head: too many fields to forward".to_owned())
        })?;
        Prepared::InPlace
    } else {
        let mut upstream = HeaderMap::with_capacity(headers.keys_len() + 10);
        // The field being copied, if any: `HeaderMap`'s iterator names a field only at its
        // first value, and the decision holds for the values that follow.
        let mut current: Option<HeaderName> = None;
        for (name, value) in std::mem::take(headers) {
            if let Some(name) = name {
                current = (!goes(&name) && name != header::HOST).then_some(name);
            }
            if let Some(name) = &current {
                upstream.append(name, value);
            }
        }
        *headers = upstream;
        Prepared::Copied
    };
    if route.forward_cookies {
        remove_cookie(headers, policy.session_cookie);
    }
    headers.insert(header::HOST, route.host.clone());
    headers.insert(X_FORWARDED_FOR, ctx.forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO, policy.forwarded_proto.clone());
    headers.insert(X_FORWARDED_HOST, policy.forwarded_host.clone());
    headers.insert(X_REQUEST_ID, ctx.request_id.clone());
    Ok(prepared)
}

/// Makes a `Content-Length` sent as several field lines one line: the body's length, the
/// bytes signed and sent. An HTTP/2 request may repeat the field (h2 checks every line against
/// the DATA frames it gets, and hands them all over; hyper's HTTP/1 server keeps only the
/// first), and a strict HTTP/1.1 parser refuses a repeated `Content-Length` even with equal
/// values (Node's llhttp: 400 "Duplicate Content-Length"), so a request the proxy accepted and
/// signed failed at the upstream. The common request, with the field once or not at all,
/// costs one lookup.
fn one_content_length(headers: &mut HeaderMap, body_len: usize) {
    let mut lines = headers.get_all(header::CONTENT_LENGTH).iter();
    let repeated = lines.next().is_some() && lines.next().is_some();
    if repeated {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
}

/// The `X-Forwarded-For` value of a client address (the server computes it once per
/// connection).
pub fn forwarded_for_value(ip: IpAddr) -> HeaderValue {
    // An IP address's text form is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Removes hop-by-hop fields: the fixed list and every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_connection_fields(headers);
    // The fixed names present are found in one pass over the names (a standard name compares
    // as a tag), so only those are removed (usually none once `Connection` is gone), instead
    // of a hash and probe for each of the eight on every response.
    remove_fields_where(headers, |name| HOP_BY_HOP.contains(name));
}

/// Removes the `Connection` field and every field it names (RFC 9110 §7.6.1). Names that are
/// not valid field names are ignored, as is a value that is not visible ASCII.
///
/// Why not collect the listed names as `HeaderName`s first: that allocated per request (a
/// name like `keep-alive` is not one of `http`'s standard names, so parsing it copies it)
/// and so did the list. Here the field's values are taken out of the map, which leaves the
/// map free to be changed while their text is read, and each listed name is removed by its
/// text (`http` parses a `&str` key on the stack).
///
/// Both callers then remove every [`HOP_BY_HOP`] field, so a listed name that is one of those
/// (`Connection: keep-alive`, what most upstreams send with every response) is left to that
/// pass: comparing it with the list is cheaper than a parse, hash and probe for a removal.
fn remove_connection_fields(headers: &mut HeaderMap) {
    let http::header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) else {
        return;
    };
    let (_, mut values) = entry.remove_entry_mult();
    let Some(first) = values.next() else {
        return;
    };
    // Almost always one value; more only allocate here.
    let more: Vec<HeaderValue> = values.collect();
    for value in std::iter::once(&first).chain(&more) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for listed in text.split(',') {
            let listed = listed.trim_ascii();
            if !HOP_BY_HOP
                .iter()
                .any(|name| name.as_str().eq_ignore_ascii_case(listed))
            {
                headers.remove(listed);
            }
        }
    }
}

/// Removes every field whose name matches: the names are found in one pass that neither hashes
/// nor allocates (up to eight at a time, kept on the stack; more take another pass), then each
/// is removed.
fn remove_fields_where(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    const AT_ONCE: usize = 8;
    loop {
        let mut found: [Option<HeaderName>; AT_ONCE] = Default::default();
        let mut count = 0;
        for name in headers.keys().filter(|name| matches(name)) {
            if count == AT_ONCE {
                break;
            }
            found[count] = Some(name.clone());
            count += 1;
        }
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        if count < AT_ONCE {
            return;
        }
    }
}

/// The `name=value` pairs of the request's `Cookie` fields, by bytes, trimmed of ASCII
/// whitespace, empty pairs skipped. By bytes, not text: a browser sends another application's
/// cookie values as it got them (`theme=café` as UTF-8), and one such value in the field must
/// not hide the session cookie beside it, nor be dropped on the way to the upstream.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|field| field.as_bytes().split(|&b| b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// A cookie pair's name, trimmed (the whole pair when it has no `=`).
fn cookie_name(pair: &[u8]) -> &[u8] {
    let name = match pair.iter().position(|&b| b == b'=') {
        Some(eq) => &pair[..eq],
        None => pair,
    };
    name.trim_ascii()
}

/// Removes one cookie by name from every `Cookie` field, keeping the others (joined into one
/// field, as HTTP/1.1 requires) byte for byte.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for pair in cookie_pairs(headers).filter(|pair| cookie_name(pair) != name.as_bytes()) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(pair);
    }
    headers.remove(header::COOKIE);
    if !joined.is_empty() {
        // The pairs are pieces of valid field values (no CR, LF or NUL), so this cannot fail.
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// `Clear-Site-Data` (no constant in `http`).
static CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");

/// What the browser must not get from an upstream, beyond the hop-by-hop fields:
/// - `Proxy-Authenticate`: a challenge for a proxy the browser does not use;
/// - a `Set-Cookie` of the session cookie's name: only the proxy sets that cookie; also a
///   nameless one whose value starts with that name (`=sid=planted`: RFC 6265bis stores it
///   with an empty name and sends it back as its value, `sid=planted`: a second session
///   cookie of the upstream's choosing);
/// - a `Clear-Site-Data` value that clears cookies (`"cookies"`, `"*"`): the browser would
///   delete the session cookie, logging the user out behind the proxy's back (the proxy
///   refuses the header in its own `server.response_headers` for the same reason); other
///   values (`"cache"`, `"storage"`) pass;
/// - a `WWW-Authenticate` challenge the browser answers with its own login dialog (`Basic`,
///   `Digest`, `NTLM`, `Negotiate`): behind countersign the browser's credentials are the
///   session, and the proxy removes any `Authorization` it sends, so such a dialog could only
///   loop. Other challenges (`Bearer error="invalid_token"`, ...) pass, for the SPA to read.
///
/// One pass over the names finds which apply (most responses carry none of them), instead of
/// a hash lookup for each.
pub fn filter_upstream_response(headers: &mut HeaderMap, session_cookie: &str) {
    let (mut proxy_auth, mut set_cookie, mut www_auth) = (false, false, false);
    let mut clear_site_data = false;
    for name in headers.keys() {
        if name == header::PROXY_AUTHENTICATE {
            proxy_auth = true;
        } else if name == header::SET_COOKIE {
            set_cookie = true;
        } else if name == header::WWW_AUTHENTICATE {
            www_auth = true;
        } else if name == CLEAR_SITE_DATA {
            clear_site_data = true;
        }
    }
    if clear_site_data {
        remove_values_where(headers, CLEAR_SITE_DATA.clone(), |value| {
            clears_cookies(value.as_bytes())
        });
    }
    if proxy_auth {
        headers.remove(header::PROXY_AUTHENTICATE);
    }
    if set_cookie {
        // Only the proxy sets the session cookie: an upstream that could would log the
        // browser out, or fix it into a session id of the upstream's choosing.
        remove_values_where(headers, header::SET_COOKIE, |value| {
            sets_cookie(value.as_bytes(), session_cookie.as_bytes())
        });
    }
    if www_auth {
        remove_values_where(headers, header::WWW_AUTHENTICATE, |value| {
            opens_a_login_dialog(value.as_bytes())
        });
    }
}

/// Whether a `Set-Cookie` value sets the cookie `name` in a browser: by its name, or, when
/// its name is empty (`=name=value`), by the name its value starts with, which is what the
/// browser sends back for a nameless cookie.
fn sets_cookie(set_cookie: &[u8], name: &[u8]) -> bool {
    let pair = set_cookie.split(|&b| b == b';').next().unwrap_or_default();
    let own = cookie_name(pair);
    if own == name {
        return true;
    }
    if !own.is_empty() {
        return false;
    }
    match pair.iter().position(|&b| b == b'=') {
        Some(eq) => cookie_name(&pair[eq + 1..]) == name,
        None => false,
    }
}

/// Whether a `Clear-Site-Data` value asks the browser to clear cookies: a `"cookies"` or
/// `"*"` directive (quoted, as the header's grammar has them; unquoted and any case too,
/// which costs nothing and covers a lenient browser).
fn clears_cookies(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|directive| {
        let directive = directive.trim_ascii();
        let directive = directive
            .strip_prefix(b"\"")
            .and_then(|d| d.strip_suffix(b"\""))
            .unwrap_or(directive);
        directive == b"*" || directive.eq_ignore_ascii_case(b"cookies")
    })
}

/// Whether a `WWW-Authenticate` field value holds a challenge whose scheme browsers answer
/// with a login dialog. Any token of the value equal to such a scheme counts (a field can
/// list several challenges: `Bearer realm="a", Basic realm="b"`); a parameter value that
/// happens to be one only costs the field.
fn opens_a_login_dialog(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',' || b == b' ' || b == b'\t')
        .any(|token| {
            [&b"basic"[..], b"digest", b"ntlm", b"negotiate"]
                .iter()
                .any(|scheme| token.eq_ignore_ascii_case(scheme))
        })
}

/// Removes the values of field `name` for which `goes` holds, keeping the others in order.
/// Almost no response has one to remove: the values are looked at before anything is rebuilt.
fn remove_values_where(
    headers: &mut HeaderMap,
    name: HeaderName,
    goes: impl Fn(&HeaderValue) -> bool,
) {
    if !headers.get_all(&name).iter().any(&goes) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .filter(|value| !goes(value))
        .cloned()
        .collect();
    headers.remove(&name);
    for value in kept {
        headers.append(name.clone(), value);
    }
}

/// The value of cookie `name` in the request's `Cookie` fields, if present: the first pair of
/// that name, trimmed; `None` if that value is not UTF-8 (a session id never is).
/// Not for the session cookie: of several pairs of one name the first is not necessarily the
/// browser's own (a sibling subdomain can set one); `auth` reads them all with
/// [`cookie_values`].
pub fn find_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let value = cookie_pairs(headers).find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| &pair[eq + 1..])
    })?;
    std::str::from_utf8(value.trim_ascii()).ok()
}

/// The values of every pair named `name` in the request's `Cookie` fields, in the order sent
/// (field by field), each trimmed; values that are not UTF-8 (a session id never is) are
/// skipped. Lazy and allocation-free: the caller bounds how many it takes.
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    cookie_pairs(headers).filter_map(move |pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        if pair[..eq].trim_ascii() != name.as_bytes() {
            return None;
        }
        std::str::from_utf8(pair[eq + 1..].trim_ascii()).ok()
    })
}

/// Reads a request body of at most `limit` bytes. A declared `Content-Length` over the limit is
/// refused before reading anything.
///
/// The memory a body holds while it is read is bounded by `limit`, however it is framed: the
/// first frame is kept as it is (a body in one frame, the usual POST, is not copied) and every
/// later one is copied into one buffer ([`ReadBody`]), which grows with the bytes that arrive
/// (allocated for the announced `Content-Length` once a second frame comes, at most the limit
/// and 1 MiB, then doubling as needed) and drops the frames it copied. Not `Limited` +
/// `collect`: that keeps each frame's `Bytes`, and each points into the connection's read
/// buffer (h2's for HTTP/2, hyper's for HTTP/1), whose whole chunk then stays allocated. A body of 1-byte DATA frames
/// with 255 bytes of padding (h2 gives the padding back as flow-control credit by itself) or
/// of 1-byte HTTP/1 chunks held what came on the wire, not its length: up to ~4 MB per login
/// stream under the 16 KiB limit, on every stream of every connection, until
/// `request_timeout` (tests/proxy_body_buffering.rs).
///
/// The bytes read are added to `share`, the request's part of `server.max_body_memory` and of
/// its client's `server.max_body_memory_per_client` ([`body_memory`](super::body_memory)): a
/// declared `Content-Length` all at once, before anything is read; otherwise frame by frame.
/// A body that does not fit is refused as soon as that is known: 429
/// `client_body_memory_limit` when its client's share is full, else 503 `body_memory_limit`;
/// the caller holds `share` until it is done with the body.
pub async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
    share: &mut RequestBodyShare<'_>,
) -> Result<Bytes, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(declared) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if declared > limit as u64 {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        // Within `limit`, so it fits a usize.
        if !share.cover(usize::try_from(declared).unwrap_or(limit)) {
            return Err(out_of_body_memory(share));
        }
    }
    match ReadBody::new(Metered::new(body, &mut *share, limit), limit).await {
        Ok(bytes) => Ok(bytes),
        Err(ReadBodyError::TooLarge) => Err(ProxyError::BodyTooLarge { limit }),
        Err(ReadBodyError::Body(e)) if e.is::<OutOfBodyMemory>() => Err(out_of_body_memory(share)),
        Err(ReadBodyError::Body(e)) => Err(ProxyError::BadRequest(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// The refusal of a body that did not fit: its client's share's (429) or the cap's (503).
fn out_of_body_memory(share: &RequestBodyShare<'_>) -> ProxyError {
    if share.refused_by_client() {
        ProxyError::ClientBodyMemoryLimit
    } else {
        ProxyError::BodyMemoryLimit
    }
}

/// A request id the proxy accepts from the client: `[A-Za-z0-9._-]{1,128}`.
pub fn valid_request_id(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// A fresh request id: 96 random bits, base64url (16 characters).
pub fn new_request_id() -> HeaderValue {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Encoded on the stack (12 bytes are always 16 characters), not through a `String`.
    let mut text = [0u8; 16];
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_slice(bytes, &mut text) {
        Ok(16) => {
            HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        }
        _ => HeaderValue::from_static("invalid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The validity is read from rcgen's certificates (UTCTime and GeneralizedTime), and a
    /// cut or damaged certificate is None, not a crash (a truncated download must be an
    /// error).
    #[test]
    fn validity_is_read_and_damaged_certificates_are_none() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = |year: i32, month: u8, day: u8| {
            let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(2020, 2, 29);
            params.not_after = rcgen::date_time_ymd(year, month, day);
            params.self_signed(&key).unwrap().der().to_vec()
        };
        // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280 section 4.1.2.5).
        let found = x509_validity(&cert(2049, 12, 31)).unwrap();
        assert_eq!(found.not_after_text, "2049-12-31 00:00:00 UTC");
        assert_eq!(found.not_after, 2_524_521_600);
        assert_eq!(found.not_before_text, "2020-02-29 00:00:00 UTC");
        assert_eq!(found.not_before, 1_582_934_400);
        let der = cert(2050, 1, 1);
        let found = x509_validity(&der).unwrap();
        assert_eq!(found.not_after_text, "2050-01-01 00:00:00 UTC");
        assert_eq!(found.not_after, 2_524_608_000);
        for cut in 0..der.len() {
            let _ = x509_validity(&der[..cut]);
            let mut damaged = der.clone();
            damaged[cut] ^= 0xff;
            let _ = x509_validity(&damaged);
        }
        assert!(x509_validity(b"").is_none());
        assert!(x509_validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }

    /// A key file is read into a buffer sized before reading, so it never grows: a grown
    /// buffer's old allocation, holding the key's first part, would be freed unzeroized. The
    /// client key file was read into a growing buffer until the listener's reader and this one
    /// became one. Over the cap, and a file that cannot be opened: errors.
    #[test]
    fn pem_files_are_read_without_the_buffer_growing() {
        let dir = std::env::temp_dir().join(format!("countersign-pem-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate()
            .unwrap()
            .serialize_pem()
            .repeat(20);
        assert!(key.len() > 4096, "{}", key.len());
        let path = dir.join("key.pem");
        std::fs::write(&path, &key).unwrap();
        let read = read_pem_file(&path).unwrap();
        assert_eq!(read.as_slice(), key.as_bytes());
        assert_eq!(
            read.capacity(),
            key.len() + 1,
            "the buffer grew while reading"
        );
        // A file whose length reads 0 (a pipe, a /proc file): sized to the whole cap.
        let lengthless = read_pem_file(std::path::Path::new("/proc/self/status")).unwrap();
        assert!(lengthless.starts_with(b"Name:"));
        assert_eq!(lengthless.capacity(), MAX_PEM_FILE_BYTES as usize + 1);
        let large = dir.join("large.pem");
        std::fs::write(&large, vec![b'A'; MAX_PEM_FILE_BYTES as usize + 1]).unwrap();
        let err = read_pem_file(&large).unwrap_err();
        assert!(err.contains("larger than 1048576 bytes"), "{err}");
        let err = read_pem_file(&dir.join("missing.pem")).unwrap_err();
        assert!(err.starts_with("cannot read: "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// PEM key blocks: found among other text, encrypted ones refused, damaged ones an error
    /// that quotes nothing of the file.
    #[test]
    fn private_key_pem_blocks() {
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = key.serialize_pem();
        assert!(parse_private_key(format!("comment\n{pem}").as_bytes()).is_ok());
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(parse_private_key(encrypted.as_bytes())
            .unwrap_err()
            .contains("encrypted"));
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(parse_private_key(legacy.as_bytes())
            .unwrap_err()
            .contains("encrypted"));
        let body_line = pem.lines().nth(1).unwrap();
        for damaged in [
            pem.replace("-----END PRIVATE KEY-----", ""),
            pem.replace(body_line, &body_line.replace('A', "!")),
            pem.replace(body_line, &body_line[..body_line.len() / 2]),
            pem.replace("PRIVATE KEY", "DSA PRIVATE KEY"),
        ] {
            let err = parse_private_key(damaged.as_bytes()).unwrap_err();
            assert!(!err.contains(&body_line[..12]), "{err}");
        }
        assert!(parse_private_key(&[0xff, 0xfe]).is_err());
    }

    /// The upstream's answer loses `Proxy-Authenticate`, the session cookie's `Set-Cookie` and
    /// login-dialog challenges; everything else passes, in order.
    #[test]
    fn upstream_response_filter() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("theme=dark; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("sid=planted; Path=/"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static(" sid =x"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("sidx=1"));
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("=sid=planted; Path=/"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static(" = sid =x"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("=theme=dark"));
        h.append(
            CLEAR_SITE_DATA.clone(),
            HeaderValue::from_static("\"cookies\""),
        );
        h.append(
            CLEAR_SITE_DATA.clone(),
            HeaderValue::from_static("\"cache\", \"*\""),
        );
        h.append(
            CLEAR_SITE_DATA.clone(),
            HeaderValue::from_static("\"cache\", \"storage\""),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"api\""),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"a\", NEGOTIATE"),
        );
        h.append(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic"),
        );
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        filter_upstream_response(&mut h, "sid");
        let all = |name| {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all(header::SET_COOKIE),
            ["theme=dark; Path=/", "sidx=1", "=theme=dark"]
        );
        assert_eq!(all(CLEAR_SITE_DATA.clone()), ["\"cache\", \"storage\""]);
        assert_eq!(
            all(header::WWW_AUTHENTICATE),
            ["Bearer error=\"invalid_token\""]
        );
        assert!(h.get(header::PROXY_AUTHENTICATE).is_none());
        assert_eq!(all(header::CONTENT_TYPE), ["text/plain"]);
        // Nothing to remove: nothing changes.
        let mut plain = HeaderMap::new();
        plain.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        plain.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        let before = plain.clone();
        filter_upstream_response(&mut plain, "sid");
        assert_eq!(plain, before);
        for value in [
            "Basic",
            "digest realm=x",
            "x, NTLM",
            "Negotiate abc==",
            "a,\tbasic",
        ] {
            assert!(opens_a_login_dialog(value.as_bytes()), "{value}");
        }
        for value in ["Bearer", "Basicx", "Bearer realm=\"basic-auth\"", ""] {
            assert!(!opens_a_login_dialog(value.as_bytes()), "{value}");
        }
    }

    fn route(prefix: &str, url: &str, strip: bool) -> Route {
        Route::new(
            RouteSpec {
                name: "t".into(),
                prefix: prefix.into(),
                url: url.parse().unwrap(),
                strip_prefix: strip,
                timeout: Duration::from_secs(1),
                max_body: 10,
                auth_required: true,
                forward_cookies: false,
                cross_origin_redirects: CrossOriginRedirects::Refuse,
                connect: UpstreamConnect::default(),
                websocket: None,
            },
            RouteId::default_for_tests(),
        )
        .unwrap()
    }

    #[test]
    fn upstream_uris() {
        let r = route("/api/", "http://127.0.0.1:3000", false);
        assert_eq!(
            r.upstream_uri("/api/x?y=1".parse().unwrap()).unwrap(),
            "http://127.0.0.1:3000/api/x?y=1"
        );
        let r = route("/api/", "http://127.0.0.1:3000/v1/", true);
        assert_eq!(
            r.upstream_uri("/api/x?y=1".parse().unwrap()).unwrap(),
            "http://127.0.0.1:3000/v1/x?y=1"
        );
        assert_eq!(
            r.upstream_uri("/api?y=1".parse().unwrap()).unwrap(),
            "http://127.0.0.1:3000/v1/?y=1"
        );
        assert_eq!(
            r.upstream_uri("/api".parse().unwrap()).unwrap(),
            "http://127.0.0.1:3000/v1/"
        );
        assert!(Route::new(
            RouteSpec {
                url: "ftp://x".parse().unwrap(),
                ..RouteSpec {
                    name: "t".into(),
                    prefix: "/".into(),
                    url: "http://x".parse().unwrap(),
                    strip_prefix: false,
                    timeout: Duration::from_secs(1),
                    max_body: 1,
                    auth_required: false,
                    forward_cookies: false,
                    cross_origin_redirects: CrossOriginRedirects::Refuse,
                    connect: UpstreamConnect::default(),
                    websocket: None,
                }
            },
            RouteId::default_for_tests()
        )
        .is_err());
    }

    /// A route that forwards the target unchanged reuses the parsed target: the URI must be
    /// the one the text way (copy and parse again) gives, for every form of target.
    #[test]
    fn reused_target_is_the_parsed_one() {
        let r = route("/", "http://127.0.0.1:3000", false);
        for target in [
            "/",
            "/api/x",
            "/api/x?y=1&z=%20",
            "/a//b/../c?",
            "/p?q=a/b?c",
            "*",
            "http://other.example/abs?x=1",
            "http://other.example",
            "https://other.example:8443/p",
        ] {
            let received: Uri = target.parse().unwrap();
            let text = received.path_and_query().map_or("/", |p| p.as_str());
            let mut expected = http::uri::Parts::default();
            expected.scheme = Some(r.scheme.clone());
            expected.authority = Some(r.authority.clone());
            expected.path_and_query = Some(r.rewritten_target(text).unwrap());
            let expected = Uri::from_parts(expected).unwrap();
            let reused = r.upstream_uri(received).unwrap();
            assert_eq!(reused, expected, "{target}");
            assert_eq!(reused.to_string(), expected.to_string(), "{target}");
            assert_eq!(
                reused.path_and_query(),
                expected.path_and_query(),
                "{target}"
            );
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let router = Router::new(vec![
            route("/api/", "http://a", false),
            route("/api/admin/", "http://b", false),
        ]);
        assert_eq!(
            router.route("/api/admin/x").unwrap().authority.as_str(),
            "b"
        );
        assert_eq!(router.route("/api/x").unwrap().authority.as_str(), "a");
        assert!(router.route("/apix").is_none());
        assert_eq!(router.route("/api").unwrap().authority.as_str(), "a");
    }

    #[test]
    fn hop_by_hop_and_cookies() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.append("cookie", HeaderValue::from_static("a=1; sid=secret"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(find_cookie(&h, "sid"), Some("secret"));
        remove_cookie(&mut h, "sid");
        assert!(
            h.get("x-secret-hop").is_none()
                && h.get("keep-alive").is_none()
                && h.get("te").is_none()
        );
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("x-keep").unwrap(), "1");
        assert_eq!(h.get("cookie").unwrap(), "a=1; b=2");
        assert_eq!(find_cookie(&h, "sid"), None);
    }

    #[test]
    fn paths_in_normal_form() {
        for ok in [
            "/",
            "/api",
            "/api/",
            "/api/x",
            "/api/v1.2/app.js",
            "/.well-known/x",
            "/a/.../b",
            "/a/..b/c",
            "/a/b..",
            "/a%20b",
            "/a%2",
            "/a%2e",
            "/a/%2e.x",
            "/a;b/c",
            "*",
            "/a/..x;/b",
            "/a/;../b",
            "/a/x;..",
            "/a/a%3bb",
            "/a/..x%3b/b",
            "/a/%3b../b",
            "/a/x%3b..",
            "/a/..%3",
            "/a/..%3c/b",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for refused in [
            "/a/..;/b",
            "/a/.;x/b",
            "/a/%2e%2e;/b",
            "/..;",
            "/a/..;jsessionid=1/b",
            "//",
            "//api",
            "/api//x",
            "/.",
            "/./",
            "/..",
            "/../",
            "/a/.",
            "/a/..",
            "/a/../b",
            "/a/./b",
            "/a/%2e/b",
            "/a/%2E%2e/b",
            "/a/.%2e/b",
            "/a/%2e./b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%5Cb",
            "/a\\b",
            "/a%00b",
            "/a/;/../b",
            "/a/..%3b/b",
            "/a/..%3B/b",
            "/a/%2e%2e%3b/b",
            "/a/..%3bx/b",
            "/a/.%3b/b",
            "/a/.%3b",
            "/a/%2e%3bx;y/b",
            "/a/..%3b;/b",
            "/a/..;%3b/b",
        ] {
            let error = check_path(refused).unwrap_err();
            assert!(
                matches!(error, ProxyError::BadRequest(_)),
                "{refused}: {error:?}"
            );
        }
    }

    /// A segment that holds only `;` parameters (`;`, `;x`, `%3b`) is empty once they are
    /// dropped, and Tomcat then merges the `//` it leaves: `/;/api/x` is `/api/x` there. The
    /// reading collapses it, so under a public `/` route such a path is refused as naming the
    /// protected `/api/`; it was read as `//api/x`, which matched only `/`, and passed.
    #[test]
    fn parameter_only_segments_collapse_in_the_reading() {
        for (path, reading) in [
            ("/;/api/x", "/api/x"),
            ("/;x/api/x", "/api/x"),
            ("/%3b/api/x", "/api/x"),
            ("/%3Bx=1/api/x", "/api/x"),
            ("/;/;x/api/x", "/api/x"),
            ("/a/;/b", "/a/b"),
            ("/api;x/y", "/api/y"),
            ("/api/x/;", "/api/x/"),
            ("/api/;", "/api/"),
            ("/;", "/"),
            ("/;/", "/"),
            ("/a;b", "/a"),
            ("/%61pi/x", "/api/x"),
        ] {
            assert_eq!(normalized_reading(path).as_deref(), Some(reading), "{path}");
        }
        assert_eq!(normalized_reading("/api/x/"), None);

        let mut public = route("/", "http://a", false);
        public.auth_required = false;
        let router = Router::new(vec![public, route("/api/", "http://a", false)]);
        for path in [
            "/;/api/x",
            "/;x/api/x",
            "/%3b/api/x",
            "/;/api",
            "/;/;/api/x",
        ] {
            assert!(
                check_path(path).is_ok(),
                "{path}: check_path lets it through"
            );
            let routed = router.route(path);
            assert_eq!(routed.map(|r| r.prefix.as_str()), Some("/"), "{path}");
            let error = router.check_reading(path, routed).unwrap_err();
            assert!(matches!(error, ProxyError::BadRequest(_)), "{path}");
        }
        // The proxy's own `/auth/` in another spelling is no upstream's either.
        for path in [
            "/%61uth/session",
            "/auth;x/login",
            "/;/auth/logout",
            "/AUTH/session",
        ] {
            let error = router.check_reading(path, router.route(path)).unwrap_err();
            assert!(matches!(error, ProxyError::BadRequest(_)), "{path}");
        }
        // Still one route's: the parameters name nothing else.
        for path in [
            "/api/;/x",
            "/api/x;y",
            "/docs/;/x",
            "/;",
            "/;/docs",
            "/Authors/x",
        ] {
            assert!(
                router.check_reading(path, router.route(path)).is_ok(),
                "{path}"
            );
        }
    }

    /// Another application's cookie with a UTF-8 value (browsers send such values as set)
    /// neither hides the session cookie nor is lost on the way upstream.
    #[test]
    fn non_ascii_cookie_values_beside_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_bytes("theme=café; sid=secret; x=\u{1F600}".as_bytes()).unwrap(),
        );
        h.append("cookie", HeaderValue::from_bytes(b"raw=\xff\xfe").unwrap());
        assert_eq!(find_cookie(&h, "sid"), Some("secret"));
        assert_eq!(find_cookie(&h, "theme"), Some("café"));
        // Not UTF-8: no value, rather than a lossy one.
        assert_eq!(find_cookie(&h, "raw"), None);
        remove_cookie(&mut h, "sid");
        let mut kept = "theme=café; x=\u{1F600}; raw=".as_bytes().to_vec();
        kept.extend_from_slice(b"\xff\xfe");
        assert_eq!(h.get("cookie").unwrap().as_bytes(), kept.as_slice());
        assert_eq!(find_cookie(&h, "sid"), None);
        // The session cookie alone, removed: no Cookie field at all.
        let mut only = HeaderMap::new();
        only.insert("cookie", HeaderValue::from_static("sid=secret"));
        remove_cookie(&mut only, "sid");
        assert!(only.get("cookie").is_none());
    }

    /// The `match` agrees with the list: every listed name, and near misses of each (a
    /// prefix, an extension, a neighbour), standard names among them.
    #[test]
    fn spoofable_match_agrees_with_the_list() {
        for name in &SPOOFABLE {
            assert!(is_spoofable(name), "{name}");
            let text = name.as_str();
            for near in [
                format!("{text}x"),
                format!("x{text}"),
                text[..text.len() - 1].to_owned(),
            ] {
                let near = HeaderName::from_bytes(near.as_bytes()).unwrap();
                assert_eq!(is_spoofable(&near), spoofable_reference(&near), "{near}");
            }
        }
        for prefix in SPOOFABLE_PREFIXES {
            for name in [
                prefix.to_owned(),
                format!("{prefix}user"),
                format!("{prefix}ssl"),
                format!("{prefix}-"),
            ] {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                assert!(is_spoofable(&name), "{name}");
            }
            // One byte short of the prefix: not a member (unless listed).
            let short = HeaderName::from_bytes(&prefix.as_bytes()[..prefix.len() - 1]).unwrap();
            assert_eq!(is_spoofable(&short), spoofable_reference(&short), "{short}");
        }
        for name in HOP_BY_HOP.iter().chain(&[
            header::ACCEPT,
            header::COOKIE,
            header::HOST,
            header::WWW_AUTHENTICATE,
            header::PROXY_AUTHENTICATE,
            HeaderName::from_static("x-forwardedfor"),
            HeaderName::from_static("x-auth-user"),
            HeaderName::from_static("x-auth-roles"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("sig"),
            HeaderName::from_static("x-method"),
        ]) {
            assert!(!is_spoofable(name), "{name}");
        }
    }

    /// The `_` spelling of every listed name and prefix is spoofable too (CGI-style servers
    /// read `X_Real_IP` as `X-Real-IP`), also past [`DASHED_MAX`]; a `_` name that reads as
    /// none of them is not. And `DASHED_MAX` is longer than every fixed name it is used for.
    #[test]
    fn underscore_spellings_are_spoofable() {
        for name in &SPOOFABLE {
            let underscored = name.as_str().replace('-', "_");
            let underscored = HeaderName::from_bytes(underscored.as_bytes()).unwrap();
            assert!(is_spoofable(&underscored), "{underscored}");
            assert!(name.as_str().len() < DASHED_MAX, "{name}");
        }
        for prefix in SPOOFABLE_PREFIXES {
            assert!(prefix.len() < DASHED_MAX, "{prefix}");
            let long = format!("{}{}", prefix.replace('-', "_"), "u".repeat(2 * DASHED_MAX));
            let long = HeaderName::from_bytes(long.as_bytes()).unwrap();
            assert!(is_spoofable(&long), "{long}");
        }
        for name in HOP_BY_HOP.iter().chain([&X_REQUEST_ID]) {
            assert!(name.as_str().len() < DASHED_MAX, "{name}");
        }
        for name in ["x_trace_id", "x_real_ipx", "client_i", "x_forwarded", "_"] {
            let name = HeaderName::from_static(name);
            assert_eq!(
                is_spoofable(&name),
                name.as_str() == "x_forwarded",
                "{name}"
            );
        }
        // Not a prefix family, and longer than `DASHED_MAX`: no fixed name is that long.
        let long = HeaderName::from_bytes("x_real_ip".repeat(5).as_bytes()).unwrap();
        assert!(!is_spoofable(&long));
    }

    /// What [`is_spoofable`] must answer, from the lists.
    fn spoofable_reference(name: &HeaderName) -> bool {
        SPOOFABLE.contains(name)
            || SPOOFABLE_PREFIXES
                .iter()
                .any(|p| name.as_str().starts_with(p))
    }

    #[test]
    fn request_field_filter() {
        for name in [
            "host",
            "connection",
            "te",
            "signature",
            "x-csrf-token",
            "x-forwarded-for",
        ] {
            assert!(
                !forwardable_request_field(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        for name in ["accept", "content-type", "x-keep"] {
            assert!(
                forwardable_request_field(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        let mut h = HeaderMap::new();
        assert!(connection_listed_names(&h).is_empty());
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.append("connection", HeaderValue::from_static("x-other , bad name"));
        assert_eq!(
            connection_listed_names(&h),
            ["keep-alive", "x-secret-hop", "x-other"].map(HeaderName::from_static)
        );
    }

    /// False for the fixed hop-by-hop and spoofable names (and `Host`, which the proxy sets):
    /// fields the reference preparation never copied from the browser's request.
    fn forwardable_request_field(name: &HeaderName) -> bool {
        name != header::HOST && !HOP_BY_HOP.contains(name) && !spoofable_reference(name)
    }

    /// Whether a name with `_`, read with `-` for `_`, is one the proxy removes or sets (the
    /// reference for `underscore_spelling_goes`: by building the dashed name).
    fn underscore_spelling_goes_reference(name: &HeaderName, policy: &HeaderPolicy<'_>) -> bool {
        if !name.as_str().contains('_') {
            return false;
        }
        let dash = |text: &str| text.replace('_', "-");
        let dashed = HeaderName::from_bytes(dash(name.as_str()).as_bytes()).unwrap();
        HOP_BY_HOP.contains(&dashed)
            || spoofable_reference(&dashed)
            || dashed == X_REQUEST_ID
            || dashed.as_str() == dash(policy.identity_user.as_str())
            || dashed.as_str() == dash(policy.identity_roles.as_str())
    }

    /// The field names a `Connection` field lists, as the reference preparation collected them.
    fn connection_listed_names(headers: &HeaderMap) -> Vec<HeaderName> {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect()
    }

    /// `strip_hop_by_hop` before it removed `Connection`'s names by their text: the reference.
    fn strip_hop_by_hop_reference(headers: &mut HeaderMap) {
        let mut present = connection_listed_names(headers);
        present.extend(headers.keys().filter(|n| HOP_BY_HOP.contains(n)).cloned());
        for name in present {
            headers.remove(name);
        }
    }

    /// The preparation before it worked in place (a second map, every kept field copied):
    /// the reference the in-place one must match.
    fn prepare_into_new_map(
        headers: HeaderMap,
        route: &Route,
        policy: &HeaderPolicy<'_>,
        ctx: &ForwardContext<'_>,
    ) -> HeaderMap {
        let connection_listed = connection_listed_names(&headers);
        let mut upstream = HeaderMap::with_capacity(headers.len() + 10);
        let mut current: Option<HeaderName> = None;
        for (name, value) in headers {
            if let Some(name) = name {
                let keep = forwardable_request_field(&name)
                    && !underscore_spelling_goes_reference(&name, policy)
                    && name != policy.identity_user
                    && name != policy.identity_roles
                    && (route.forward_cookies || name != header::COOKIE)
                    && !connection_listed.contains(&name);
                current = keep.then_some(name);
            }
            if let Some(name) = &current {
                upstream.append(name, value);
            }
        }
        if route.forward_cookies {
            remove_cookie(&mut upstream, policy.session_cookie);
        }
        upstream.insert(header::HOST, route.host.clone());
        upstream.insert(X_FORWARDED_FOR, ctx.forwarded_for.clone());
        upstream.insert(X_FORWARDED_PROTO, policy.forwarded_proto.clone());
        upstream.insert(X_FORWARDED_HOST, policy.forwarded_host.clone());
        upstream.insert(X_REQUEST_ID, ctx.request_id.clone());
        upstream
    }

    /// Every field name with its values in order, sorted by name: what the upstream receives,
    /// independent of the order of distinct names.
    fn field_set(headers: &HeaderMap) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut set: Vec<(String, Vec<Vec<u8>>)> = headers
            .keys()
            .map(|name| {
                let values = headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect();
                (name.as_str().to_owned(), values)
            })
            .collect();
        set.sort();
        set
    }

    #[test]
    fn prepared_fields_match_the_copying_reference() {
        use rand::{Rng as _, SeedableRng as _};
        // Names as a browser (or an attacker) may spell them; `HeaderName` folds case.
        const NAMES: &[&str] = &[
            "Accept",
            "accept-language",
            "Content-Type",
            "content-length",
            "Host",
            "Cookie",
            "cookie",
            "Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Authorization",
            "Proxy-Connection",
            "Signature",
            "Signature-Input",
            "signature-input",
            "Content-Digest",
            "X-Auth-User",
            "x-auth-roles",
            "X-Team-User",
            "X-Team-Roles",
            "X-CSRF-Token",
            "Forwarded",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "X-Forwarded-Host",
            "X-Forwarded-Port",
            "x-forwarded-prefix",
            "X-Real-IP",
            "True-Client-IP",
            "x-client-ip",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-Request-Id",
            "X-Foo",
            "x-bar",
            "X-Baz",
            "Authorization",
            "If-None-Match",
            // `_` spellings: of removed names, of set ones, of both identities, and of none.
            "X_Forwarded_For",
            "x_real_ip",
            "Client_IP",
            "Client-IP",
            "X_Auth_User",
            "X_Team_Roles",
            "X_CSRF_Token",
            "Signature_Input",
            "X_Request_Id",
            "Keep_Alive",
            "X_Trace_Id",
            "x_foo",
        ];
        // What a `Connection` field may list: field names, hop-by-hop ones, case variants,
        // whitespace, empty members and things that are not field names at all.
        const LISTED: &[&str] = &[
            "keep-alive",
            "close",
            "X-Foo",
            " x-bar ",
            "x-baz",
            "Cookie",
            "accept",
            "Host",
            "x-request-id",
            "X-Forwarded-For",
            "signature",
            "X-Auth-User",
            "",
            "bad name",
            "upgrade",
            "x-team-user",
            "Keep-Alive",
            " TE",
            "Transfer-Encoding ",
            "proxy-connection",
        ];
        const COOKIES: &[&str] = &[
            "sid=secret",
            "a=1; sid=s2",
            "b=2",
            " sid = x ;c=3",
            "sidx=1; a=2",
            "",
            ";;",
            "sid",
            "a=1;b=2",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0005);
        let forwarded_for = HeaderValue::from_static("192.0.2.7");
        let request_id = HeaderValue::from_static("req-1");
        let forwarded_proto = HeaderValue::from_static("https");
        let forwarded_host = HeaderValue::from_static("app.example");
        let team_user = HeaderName::from_static("x-team-user");
        let team_roles = HeaderName::from_static("x-team-roles");
        let default_identity = crate::core::IdentityHeaders::default();
        let mut dropped_somewhere = 0;
        let (mut prepared_in_place, mut prepared_by_copy) = (0, 0);
        for case in 0..20_000 {
            let mut route = route("/api/", "http://upstream.test:8080", false);
            route.forward_cookies = rng.gen_bool(0.5);
            let policy = HeaderPolicy {
                identity_user: if case % 3 == 0 {
                    &team_user
                } else {
                    &default_identity.user
                },
                identity_roles: if case % 3 == 0 {
                    &team_roles
                } else {
                    &default_identity.roles
                },
                session_cookie: "sid",
                forwarded_proto: &forwarded_proto,
                forwarded_host: &forwarded_host,
            };
            let ctx = ForwardContext {
                identity: None,
                forwarded_for: &forwarded_for,
                request_id: &request_id,
                now: 0,
                clock: &crate::clock::SystemClock,
            };
            let mut headers = HeaderMap::new();
            for _ in 0..rng.gen_range(0..14) {
                let name = HeaderName::from_bytes(NAMES[rng.gen_range(0..NAMES.len())].as_bytes())
                    .unwrap();
                let value = if name == header::CONNECTION {
                    let members: Vec<&str> = (0..rng.gen_range(1..4))
                        .map(|_| LISTED[rng.gen_range(0..LISTED.len())])
                        .collect();
                    members.join(",")
                } else if name == header::COOKIE {
                    COOKIES[rng.gen_range(0..COOKIES.len())].to_owned()
                } else {
                    format!("v{}", rng.gen_range(0..5))
                };
                let value = HeaderValue::from_str(&value).unwrap();
                // Repeated fields: appended, so a name can carry several values.
                headers.append(name, value);
            }
            let expected = prepare_into_new_map(headers.clone(), &route, &policy, &ctx);
            let mut in_place = headers.clone();
            match prepare_upstream_headers(&mut in_place, &route, &policy, &ctx) {
                Ok(Prepared::InPlace) => prepared_in_place += 1,
                Ok(Prepared::Copied) => prepared_by_copy += 1,
                Err(e) => panic!("case {case}: {e}"),
            }
            assert_eq!(
                field_set(&in_place),
                field_set(&expected),
                "case {case}: {headers:?}"
            );
            assert_eq!(in_place.len(), expected.len(), "case {case}");
            // The same field sets as a response's: hop-by-hop stripping.
            let mut stripped = headers.clone();
            strip_hop_by_hop(&mut stripped);
            let mut reference = headers.clone();
            strip_hop_by_hop_reference(&mut reference);
            assert_eq!(
                field_set(&stripped),
                field_set(&reference),
                "case {case}: {headers:?}"
            );
            assert_eq!(stripped.len(), reference.len(), "case {case}");
            if headers.len() + 5 > expected.len() {
                dropped_somewhere += 1;
            }
        }
        // More names to remove than one pass of `remove_fields_where` holds.
        let mut many = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain(&SPOOFABLE) {
            many.append(name, HeaderValue::from_static("x"));
            many.append(name, HeaderValue::from_static("y"));
        }
        many.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut many);
        assert_eq!(many.len(), 1 + 2 * SPOOFABLE.len());
        remove_fields_where(&mut many, |name| SPOOFABLE.contains(name));
        assert_eq!(
            field_set(&many),
            [("accept".to_owned(), vec![b"*/*".to_vec()])]
        );
        // The generator must exercise removals, not only the fields the proxy sets.
        assert!(dropped_somewhere > 10_000, "{dropped_somewhere}");
        // And both ways of preparing.
        assert!(prepared_in_place > 3_000, "{prepared_in_place}");
        assert!(prepared_by_copy > 3_000, "{prepared_by_copy}");
    }

    /// Up to two `Cookie` fields of up to 12 random `pieces` each: values a client can send
    /// (no CR/LF/NUL; a value `HeaderValue` refuses is left out), some not visible ASCII.
    fn random_cookie_fields(rng: &mut rand::rngs::StdRng, pieces: &[&[u8]]) -> HeaderMap {
        use rand::Rng as _;
        let mut headers = HeaderMap::new();
        for _ in 0..rng.gen_range(0..3) {
            let value: Vec<u8> = (0..rng.gen_range(0..12))
                .flat_map(|_| pieces[rng.gen_range(0..pieces.len())].iter().copied())
                .collect();
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.append(header::COOKIE, value);
            }
        }
        headers
    }

    /// `find_cookie` written the obvious way, field by field and pair by pair: the reference.
    fn find_cookie_reference<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
        for field in headers.get_all(header::COOKIE) {
            for pair in field.as_bytes().split(|&b| b == b';') {
                let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                    continue;
                };
                if pair[..eq].trim_ascii() == name.as_bytes() {
                    return std::str::from_utf8(pair[eq + 1..].trim_ascii()).ok();
                }
            }
        }
        None
    }

    #[test]
    fn find_cookie_matches_the_reference() {
        use rand::SeedableRng as _;
        const PIECES: &[&[u8]] = &[
            b"sid",
            b"SID",
            b"sidx",
            b"xsid",
            b"a",
            b"=",
            b";",
            b" ",
            b"\t",
            b"v",
            b"v=w",
            b"\"q\"",
            b"%20",
            b"sid=x",
            b" sid = y ",
            b"\tsid\t=\tz",
            b"a=1; ",
            b"\xff",
            b"\x01",
            b"\x0b",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_c00c);
        let mut found = 0;
        for case in 0..20_000 {
            let headers = random_cookie_fields(&mut rng, PIECES);
            for name in ["sid", "a", ""] {
                let expected = find_cookie_reference(&headers, name);
                assert_eq!(
                    find_cookie(&headers, name),
                    expected,
                    "case {case}: {headers:?}"
                );
                found += usize::from(expected.is_some());
            }
        }
        assert!(found > 2_000, "{found}");
    }

    /// Every pair of the name, across fields, in order: duplicates are all seen (not only the
    /// first), non-UTF-8 values skipped (not ending the search), other names and name-only
    /// pairs ignored.
    #[test]
    fn cookie_values_finds_every_pair_of_the_name() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_static("sid=one; theme=x; sid ; sidx=no;  sid = two ;sid="),
        );
        h.append(
            "cookie",
            HeaderValue::from_bytes(b"sid=\xff; sid=three").unwrap(),
        );
        h.append("cookie", HeaderValue::from_static("a=1; SID=no; sid=one"));
        let all: Vec<&str> = cookie_values(&h, "sid").collect();
        assert_eq!(all, ["one", "two", "", "three", "one"]);
        assert_eq!(cookie_values(&h, "theme").collect::<Vec<_>>(), ["x"]);
        assert_eq!(cookie_values(&h, "none").count(), 0);
        assert_eq!(cookie_values(&HeaderMap::new(), "sid").count(), 0);
        // The first value is the one `find_cookie` returns, when it is UTF-8.
        assert_eq!(cookie_values(&h, "sid").next(), find_cookie(&h, "sid"));
    }

    #[test]
    fn cookie_values_matches_the_reference() {
        use rand::SeedableRng as _;
        const PIECES: &[&[u8]] = &[
            b"sid",
            b"SID",
            b"sidx",
            b"a",
            b"=",
            b";",
            b" ",
            b"\t",
            b"v",
            b"sid=x",
            b" sid = y ",
            b"a=1; ",
            b"\xff",
            b"sid=\xff",
            b"; sid=z",
            b";sid=",
        ];
        // Field by field, pair by pair, collecting every match.
        fn reference<'h>(headers: &'h HeaderMap, name: &str) -> Vec<&'h str> {
            let mut out = Vec::new();
            for field in headers.get_all(header::COOKIE) {
                for pair in field.as_bytes().split(|&b| b == b';') {
                    let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                        continue;
                    };
                    if pair[..eq].trim_ascii() == name.as_bytes() {
                        if let Ok(value) = std::str::from_utf8(pair[eq + 1..].trim_ascii()) {
                            out.push(value);
                        }
                    }
                }
            }
            out
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xd0b1_c00c);
        let mut several = 0;
        for case in 0..10_000 {
            let headers = random_cookie_fields(&mut rng, PIECES);
            let expected = reference(&headers, "sid");
            let got: Vec<&str> = cookie_values(&headers, "sid").collect();
            assert_eq!(got, expected, "case {case}: {headers:?}");
            several += usize::from(expected.len() > 1);
        }
        assert!(several > 1_000, "{several}");
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-DEF_1.2")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        assert!(!valid_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        let ids: Vec<HeaderValue> = (0..64).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 16, "{id:?}");
            assert!(valid_request_id(id), "{id:?}");
            assert!(id
                .as_bytes()
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(c)));
        }
        let distinct: std::collections::HashSet<&[u8]> =
            ids.iter().map(|id| id.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
    }
}

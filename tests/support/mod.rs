//! Shared helpers for the proxy tests: a real upstream (hyper on loopback behind the real
//! `VerifyLayer`) that records what reaches it, a proxy started in-process with a manual clock,
//! and a small HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::{ManualClock, SharedClock};
use countersign::core::{Keyring, KeyringHandle, Policy, Secret, SignerConfig, Verifier};
use countersign::layer::{VerifiedIdentity, VerifyLayer};
use countersign::proxy::config::ThrottleConfig;
use countersign::proxy::forward::RouteSpec;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use countersign::proxy::session::{MemorySessionStore, SessionStore, SessionTimeouts};
use countersign::proxy::static_files::Site;
use countersign::proxy::throttle::{LoginThrottle, MemoryLoginThrottle};
use countersign::proxy::users::{UserDb, UserRecord, UsersHandle};
use countersign::replay::MemoryReplayCache;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tower::{Layer as _, Service, ServiceExt as _};

// Included by `support` and `support_redis` alike (a test file may use both, or only the
// second, which needs no proxy feature): two copies of the small guard type, never mixed.
#[allow(clippy::duplicate_mod)]
#[path = "../support_tmp/mod.rs"]
mod support_tmp;
pub use support_tmp::TestDir;

// Free and refusing ports (tests/support_ports), with `support_redis`'s copy beside it in a
// file that uses both.
#[allow(clippy::duplicate_mod)]
#[path = "../support_ports/mod.rs"]
mod support_ports;
#[allow(unused_imports)] // some tests need neither
pub use support_ports::{free_port, refusing_addr};

/// A fixed start time for the manual clock.
pub const T0: u64 = 1_800_000_000;
/// The public origin the test proxies serve.
pub const ORIGIN: &str = "http://app.test";
/// Passwords of the test users.
pub const ALICE_PASSWORD: &str = "alice-password";
pub const BOB_PASSWORD: &str = "bob-password";
/// Timeouts of test sessions.
pub const IDLE: Duration = Duration::from_secs(600);
pub const ABSOLUTE: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------------

/// A request as it arrived at the upstream, before verification.
#[derive(Debug, Clone)]
pub struct RawSeen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
}

/// A request the upstream application received after the VerifyLayer accepted it.
#[derive(Debug, Clone)]
pub struct VerifiedSeen {
    pub uri: String,
    pub identity: VerifiedIdentity,
    pub body: Bytes,
}

/// A hyper server on loopback behind the real VerifyLayer.
pub struct Upstream {
    pub addr: SocketAddr,
    pub raw: Arc<Mutex<Vec<RawSeen>>>,
    pub verified: Arc<Mutex<Vec<VerifiedSeen>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn raw_count(&self) -> usize {
        self.raw.lock().len()
    }
    pub fn last_raw(&self) -> RawSeen {
        self.raw
            .lock()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
    pub fn last_verified(&self) -> VerifiedSeen {
        self.verified
            .lock()
            .last()
            .cloned()
            .expect("upstream verified a request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A body of `remaining` zero bytes in 64 KiB chunks of a static buffer (no allocation), so
/// memory measured during a transfer is the proxy's, not the generator's.
pub struct ZeroBody {
    remaining: u64,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl http_body::Body for ZeroBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(ZEROS.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

fn query_u64(uri: &http::Uri, name: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// The upstream application: `/…/slow?ms=N` waits, `/…/big?bytes=N` streams zeros,
/// `/…/hop` answers with hop-by-hop headers, anything else echoes a small JSON.
#[derive(Clone)]
struct App {
    verified: Arc<Mutex<Vec<VerifiedSeen>>>,
}

impl Service<Request<Full<Bytes>>> for App {
    type Response = Response<UpBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<UpBody>, Infallible>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let verified = self.verified.clone();
        Box::pin(async move {
            let identity = req
                .extensions()
                .get::<VerifiedIdentity>()
                .cloned()
                .expect("identity extension");
            let uri = req.uri().clone();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            verified.lock().push(VerifiedSeen {
                uri: uri.to_string(),
                identity: identity.clone(),
                body: body.clone(),
            });
            let path = uri.path();
            if path.ends_with("/verify-credentials") || uri.query() == Some("verify-credentials") {
                // The `[auth] verify_url` endpoint: the proxy posts the credentials, signed
                // without a user identity. (Also at `/?verify-credentials`, for a `verify_url`
                // with a query and no path.)
                let creds: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let ok = identity.user.is_none()
                    && creds["username"] == "vera"
                    && creds["password"] == "vera-pw";
                let (status, answer) = if ok {
                    (
                        StatusCode::OK,
                        serde_json::json!({ "user": "vera", "roles": ["auditor"] }),
                    )
                } else if creds["username"] == "broken" {
                    (StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({}))
                } else if creds["username"] == "empty-role" {
                    // An identity no signer may send (docs/PROTOCOL.md §4).
                    (
                        StatusCode::OK,
                        serde_json::json!({ "user": "empty-role", "roles": ["a", ""] }),
                    )
                } else if creds["username"] == "empty-user" {
                    (
                        StatusCode::OK,
                        serde_json::json!({ "user": "", "roles": [] }),
                    )
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        serde_json::json!({ "error": "no" }),
                    )
                };
                let mut r = Response::new(Full::new(Bytes::from(answer.to_string())).boxed());
                *r.status_mut() = status;
                return Ok(r);
            }
            if path.ends_with("/slow") {
                tokio::time::sleep(Duration::from_millis(query_u64(&uri, "ms").unwrap_or(1000)))
                    .await;
                return Ok(Response::new(
                    Full::new(Bytes::from_static(b"slow done")).boxed(),
                ));
            }
            if path.ends_with("/big") {
                let n = query_u64(&uri, "bytes").unwrap_or(0);
                return Ok(Response::new(ZeroBody { remaining: n }.boxed()));
            }
            if path.ends_with("/redirect") {
                // `?status=302&to=<Location>` (percent-encoded): a redirect as an API (or an
                // open redirect in one) would answer.
                let mut status = StatusCode::FOUND;
                let mut r = Response::new(Full::new(Bytes::from_static(b"moved")).boxed());
                for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
                    match &*key {
                        "status" => status = value.parse().unwrap(),
                        "to" => {
                            r.headers_mut().append(
                                "location",
                                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
                            );
                        }
                        _ => {}
                    }
                }
                *r.status_mut() = status;
                return Ok(r);
            }
            if path.ends_with("/hop") {
                let mut r = Response::new(Full::new(Bytes::from_static(b"hop")).boxed());
                let h = r.headers_mut();
                h.insert("connection", HeaderValue::from_static("x-upstream-hop"));
                h.insert("x-upstream-hop", HeaderValue::from_static("secret"));
                h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
                h.insert("x-upstream-kept", HeaderValue::from_static("1"));
                return Ok(r);
            }
            let answer = serde_json::json!({
                "user": identity.user,
                "roles": identity.roles,
                "keyid": identity.keyid,
                "body_len": body.len(),
            });
            let mut r = Response::new(Full::new(Bytes::from(answer.to_string())).boxed());
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(r)
        })
    }
}

/// Starts an upstream verifying with `keyring` and `clock`.
pub async fn start_upstream(keyring: KeyringHandle, clock: SharedClock) -> Upstream {
    start_upstream_with(keyring, clock, None).await
}

/// An upstream like [`start_upstream`] serving HTTPS (HTTP/1.1 over rustls) with a fresh
/// self-signed certificate for `127.0.0.1`; returns it and that certificate, which is the CA a
/// proxy must trust to reach it.
pub async fn start_tls_upstream(clock: SharedClock) -> (Upstream, rcgen::Certificate) {
    let (acceptor, cert) = loopback_tls_acceptor();
    let upstream = start_upstream_with(test_keyring(), clock, Some(acceptor)).await;
    (upstream, cert)
}

/// A TLS acceptor (HTTP/1.1 by ALPN) with a fresh self-signed certificate for `127.0.0.1`,
/// and that certificate: the CA a client must trust to reach it.
pub fn loopback_tls_acceptor() -> (tokio_rustls::TlsAcceptor, rcgen::Certificate) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.key_pair.serialize_der()).unwrap();
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
        certified.cert,
    )
}

/// [`start_upstream`], over TLS when `tls` is given.
pub async fn start_upstream_with(
    keyring: KeyringHandle,
    clock: SharedClock,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let verified = Arc::new(Mutex::new(Vec::new()));
    let layer = VerifyLayer::new(
        Verifier::new(keyring, Policy::default()),
        Arc::new(MemoryReplayCache::new(100_000)),
    )
    .clock(clock);
    let service = layer.layer(App {
        verified: verified.clone(),
    });
    let raw_log = raw.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            let raw_log = raw_log.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    raw_log.lock().push(RawSeen {
                        method: req.method().clone(),
                        uri: req.uri().to_string(),
                        headers: req.headers().clone(),
                    });
                    service.clone().oneshot(req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        raw,
        verified,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

/// Serves `service` on `listener` over HTTP/1.1 with upgrades (a WebSocket upstream behind
/// the `VerifyLayer`), one task per connection, until the test's runtime ends.
pub fn serve_with_upgrades<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    service.clone().oneshot(req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// A cheap argon2id hash (tests only: real hashes take ~1 s unoptimized).
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

pub fn test_users() -> UserDb {
    UserDb::from_records(vec![
        UserRecord {
            name: "alice".into(),
            password_hash: cheap_hash(ALICE_PASSWORD),
            roles: vec!["admin".into(), "ops team".into()],
        },
        UserRecord {
            name: "bob".into(),
            password_hash: cheap_hash(BOB_PASSWORD),
            roles: vec![],
        },
    ])
    .unwrap()
}

pub fn test_keyring() -> KeyringHandle {
    KeyringHandle::new(Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap())
}

pub fn route(name: &str, prefix: &str, url: &str) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        prefix: prefix.into(),
        url: url.parse().unwrap(),
        strip_prefix: false,
        timeout: Duration::from_secs(10),
        max_body: 64 * 1024,
        auth_required: true,
        forward_cookies: false,
        cross_origin_redirects: countersign::proxy::forward::CrossOriginRedirects::Refuse,
        connect: Default::default(),
        websocket: None,
    }
}

pub fn settings(routes: Vec<RouteSpec>) -> ProxySettings {
    // `server.max_body_memory_per_client` as `proxy.toml`'s defaults make it: never below the
    // largest body a route (or the login, 16 KiB here) takes, which one client could
    // otherwise never send.
    let largest_body = routes
        .iter()
        .map(|route| route.max_body)
        .fold(64 * 1024, usize::max);
    ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        origins: vec![ORIGIN.to_owned()],
        https: false,
        public_host: "app.test".into(),
        tls: None,
        site: None,
        response_headers: Default::default(),
        max_header_bytes: 16 * 1024,
        header_read_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        max_body_memory: countersign::proxy::config::DEFAULT_MAX_BODY_MEMORY,
        max_body_memory_per_client: Some(
            countersign::proxy::config::default_max_body_memory_per_client(
                countersign::proxy::config::DEFAULT_MAX_BODY_MEMORY,
                largest_body,
            ),
        ),
        send_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        max_connections: 1000,
        websocket_max_open: countersign::proxy::config::DEFAULT_WEBSOCKET_MAX_OPEN,
        websocket_max_open_per_user:
            countersign::proxy::config::DEFAULT_WEBSOCKET_MAX_OPEN_PER_USER,
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_max_connections: 64,
        http2_max_concurrent_streams: 256,
        http2_idle_timeout: countersign::proxy::config::DEFAULT_HTTP2_IDLE_TIMEOUT,
        http2_max_reset_streams: countersign::proxy::config::DEFAULT_HTTP2_MAX_RESET_STREAMS,
        max_header_count: countersign::proxy::config::DEFAULT_MAX_HEADER_COUNT,
        http1_half_close: true,
        cookie_name: "countersign_session".into(),
        max_session_cookies: countersign::proxy::config::DEFAULT_MAX_SESSION_COOKIES,
        session_max_age: ABSOLUTE,
        signer: SignerConfig::default(),
        routes,
        upstreams_not_required_for_ready: Vec::new(),
        verify_url: None,
        verify_timeout: Duration::from_secs(5),
        max_login_body: 16 * 1024,
        max_username_bytes: 256,
        max_password_bytes: 1024,
        trusted_proxies: countersign::proxy::client_address::TrustedProxies::none(),
        proxy_protocol: false,
        proxy_protocol_max_bytes: countersign::proxy::proxy_protocol::DEFAULT_MAX_V2_PAYLOAD,
        max_verify_answer: 64 * 1024,
        verify_answer_head: countersign::proxy::forward::AnswerHeadLimits::default(),
        connect_timeout: Duration::from_secs(2),
        verify_pool_max_lifetime: Some(countersign::proxy::forward::DEFAULT_POOL_MAX_LIFETIME),
        verify_pool_max_idle: countersign::proxy::config::DEFAULT_VERIFY_POOL_MAX_IDLE,
        verify_pool_idle_timeout: countersign::proxy::config::DEFAULT_POOL_IDLE_TIMEOUT,
        readiness: countersign::proxy::admin::ReadinessTiming::default(),
        upstream_roots: Vec::new(),
        verify_roots: Vec::new(),
        reload_from: None,
    }
}

/// A proxy in front of an upstream, sharing a manual clock and keyring.
pub struct Harness {
    pub proxy: Option<ProxyServer>,
    pub upstream: Upstream,
    pub clock: ManualClock,
    pub keyring: KeyringHandle,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The files the proxy serves or reads (`HarnessOptions::files`): removed after the proxy
    /// stops (fields drop in order).
    pub files: Option<TestDir>,
}

/// Adjusts the proxy settings once the upstream's address is known.
pub type Tweak = Box<dyn FnOnce(&mut ProxySettings, &Upstream) + Send>;

/// Options of [`Harness::start_with`].
pub struct HarnessOptions {
    /// Extra routes (the default `/api/` route to the upstream is always there).
    pub extra_routes: Vec<RouteSpec>,
    /// Adjusts the settings before start.
    pub tweak: Tweak,
    /// Failures per user before throttling.
    pub max_failures_per_user: u32,
    pub site: Option<Site>,
    /// Replaces the in-memory session store.
    pub sessions: Option<Arc<dyn SessionStore>>,
    /// Replaces the in-memory login throttle (`max_failures_per_user` is then unused).
    pub throttle: Option<Arc<dyn LoginThrottle>>,
    /// A directory the proxy uses (its static site, TLS files), kept as long as the harness.
    pub files: Option<TestDir>,
    /// Replaces the users file's users ([`test_users`]).
    pub users: Option<UserDb>,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            extra_routes: Vec::new(),
            tweak: Box::new(|_, _| {}),
            max_failures_per_user: 5,
            site: None,
            sessions: None,
            throttle: None,
            files: None,
            users: None,
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(HarnessOptions::default()).await
    }

    /// [`Harness::start`] with one more route to the same upstream, after `/api/`: `name` at
    /// `prefix`, public (`auth_required = false`, `auth = "none"` in a file).
    pub async fn start_with_public_route(name: &str, prefix: &str) -> Harness {
        let (name, prefix) = (name.to_owned(), prefix.to_owned());
        Self::start_with(HarnessOptions {
            tweak: Box::new(move |s, up| {
                let mut public = route(&name, &prefix, &up.url());
                public.auth_required = false;
                s.routes.push(public);
            }),
            ..HarnessOptions::default()
        })
        .await
    }

    pub async fn start_with(options: HarnessOptions) -> Harness {
        let clock = ManualClock::new(T0);
        let shared: SharedClock = Arc::new(clock.clone());
        let keyring = test_keyring();
        let upstream = start_upstream(keyring.clone(), shared.clone()).await;
        let mut routes = vec![route("api", "/api/", &upstream.url())];
        routes.extend(options.extra_routes);
        let mut settings = settings(routes);
        settings.site = options.site;
        (options.tweak)(&mut settings, &upstream);
        let deps = ProxyDeps {
            clock: shared.clone(),
            sessions: options.sessions.unwrap_or_else(|| {
                Arc::new(MemorySessionStore::new(
                    SessionTimeouts {
                        idle: IDLE,
                        absolute: ABSOLUTE,
                    },
                    10_000,
                ))
            }),
            throttle: options.throttle.unwrap_or_else(|| {
                Arc::new(MemoryLoginThrottle::new(
                    ThrottleConfig {
                        max_failures_per_ip: 100,
                        max_failures_per_user: options.max_failures_per_user,
                        window: Duration::from_secs(900),
                        max_tracked_keys: 10_000,
                    },
                    10_000,
                ))
            }),
            users: Some(UsersHandle::new(options.users.unwrap_or_else(test_users))),
            keyring: keyring.clone(),
        };
        let proxy = ProxyServer::start(settings, deps)
            .await
            .expect("proxy starts");
        let addr = proxy.local_addr();
        let admin = proxy.admin_addr().expect("admin listener");
        Harness {
            proxy: Some(proxy),
            upstream,
            clock,
            keyring,
            addr,
            admin,
            files: options.files,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn proxy(&self) -> &ProxyServer {
        self.proxy.as_ref().expect("proxy running")
    }

    /// Logs in; returns the session (cookie pair `name=value`, CSRF token).
    pub async fn login(&self, user: &str, password: &str) -> Login {
        let r = self.login_raw(user, password).await;
        assert_eq!(r.status, StatusCode::OK, "login failed: {}", r.text());
        let cookie = r.session_cookie().expect("Set-Cookie");
        let csrf = r.json()["csrf_token"].as_str().unwrap().to_owned();
        Login { cookie, csrf }
    }

    pub async fn login_raw(&self, user: &str, password: &str) -> Reply {
        let body = serde_json::json!({ "username": user, "password": password }).to_string();
        send(
            self.addr,
            Method::POST,
            "/auth/login",
            &[("content-type", "application/json"), ("origin", ORIGIN)],
            body,
        )
        .await
    }
}

/// A logged-in browser's credentials.
#[derive(Debug, Clone)]
pub struct Login {
    /// `name=value` for the `Cookie` header.
    pub cookie: String,
    pub csrf: String,
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
    /// The `Set-Cookie` header value.
    pub fn set_cookie(&self) -> Option<String> {
        self.headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_owned())
    }
    /// The session a successful login's answer carries.
    pub fn login(&self) -> Login {
        Login {
            cookie: self.session_cookie().unwrap(),
            csrf: self.json()["csrf_token"].as_str().unwrap().to_owned(),
        }
    }
    /// `name=value` of the Set-Cookie.
    pub fn session_cookie(&self) -> Option<String> {
        self.set_cookie()
            .map(|c| c.split(';').next().unwrap().trim().to_owned())
    }
}

/// One request on a fresh HTTP/1.1 connection; reads the whole answer.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let response = send_streaming(addr, method, path, headers, body).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// One request; returns the response with its body still streaming.
pub async fn send_streaming(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    sender.send_request(request).await.expect("response")
}

/// The value of the sample `name` (no labels) in a scrape of `/metrics`.
pub async fn gauge(admin: SocketAddr, name: &str) -> u64 {
    let reply = send(admin, Method::GET, "/metrics", &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// GET with a session cookie.
pub async fn get(addr: SocketAddr, path: &str, login: &Login) -> Reply {
    send(
        addr,
        Method::GET,
        path,
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await
}

/// GET `path` with `session`'s cookie (as [`get`]), or with no field at all.
pub async fn get_with(h: &Harness, path: &str, session: Option<&Login>) -> Reply {
    match session {
        Some(login) => get(h.addr, path, login).await,
        None => send(h.addr, Method::GET, path, &[], Bytes::new()).await,
    }
}

/// Each path, with a session and without: 400 `bad_request`; none reached the upstream.
pub async fn assert_refused_before_the_upstream(h: &Harness, login: &Login, paths: &[&str]) {
    for path in paths {
        for session in [None, Some(login)] {
            let r = get_with(h, path, session).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
            assert_eq!(r.error_code(), "bad_request", "{path}");
        }
    }
    assert_eq!(h.upstream.raw_count(), 0, "nothing refused was forwarded");
}

/// A state-changing request as the SPA sends it: cookie, CSRF token, same origin.
pub async fn post_json(addr: SocketAddr, path: &str, login: &Login, body: &str) -> Reply {
    send(
        addr,
        Method::POST,
        path,
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

/// Sends raw bytes and reads until the server closes (or 5 s pass).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer's head and what body came with it, read until the answer is whole (by its
/// `content-length`) or the connection ends.
pub async fn whole_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if n == 0 {
            return text;
        }
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|length| body.len() >= length) {
                return text;
            }
        }
    }
}

/// `GET path` over HTTP/1.1 to `addr` on one connection (std only, blocking: for tests that
/// run no runtime); the whole answer as text.
pub fn blocking_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// `POST /admin/users/{user}/revoke` on the admin listener at `admin`, with no headers (as an
/// operator's curl sends it).
pub async fn admin_revoke(admin: SocketAddr, user: &str) -> Reply {
    send(
        admin,
        Method::POST,
        &format!("/admin/users/{user}/revoke"),
        &[],
        Bytes::new(),
    )
    .await
}

/// Sends `request` (with `connection: close`) on new connections until one is answered, for up
/// to 10 s, and returns that answer ("" if none was). A slot is free again once the server has
/// ended the connection that held it, which it does just after closing its socket: a client
/// that saw the close may connect a moment before that.
pub async fn answered_once_a_slot_is_free(addr: SocketAddr, request: &[u8]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = raw_exchange(addr, request).await;
        if !answer.is_empty() || std::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy serving the build folder `root` from `static_dir`; `base` (the temporary directory
/// holding `root` and whatever the test wrote beside it) lives as long as the harness.
pub async fn start_static(base: TestDir, root: &Path) -> Harness {
    Harness::start_with(HarnessOptions {
        site: Some(Site::Dir(
            countersign::proxy::static_files::StaticDir::new(root).unwrap(),
        )),
        files: Some(base),
        ..HarnessOptions::default()
    })
    .await
}

/// A GET without a session or headers.
pub async fn fetch(h: &Harness, path: &str) -> Reply {
    send(h.addr, Method::GET, path, &[], Bytes::new()).await
}

/// A fresh temporary directory under the system temp dir, removed when the returned guard is
/// dropped (see tests/support_tmp).
pub fn temp_dir(tag: &str) -> TestDir {
    TestDir::new(tag)
}

pub fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A keyring file with keys k1 and k2 (secrets 32×0x07 and 32×0x08), `active` signing.
pub fn keyring_file_text(active: &str) -> String {
    use base64::Engine as _;
    let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    format!(
        "active = \"{active}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{}\"\n[[keys]]\nid = \"k2\"\nsecret = \"{}\"\n",
        b64(7),
        b64(8)
    )
}

/// A keyring with k1 and k2 (same secrets as [`keyring_file_text`]) for verifiers.
pub fn both_keys_keyring() -> KeyringHandle {
    use countersign::core::{KeySpec, Rotation};
    let spec = |id: &str, b: u8| KeySpec {
        id: id.into(),
        secret: Secret::new(vec![b; 32]).unwrap(),
        retired: false,
        rotation: None,
    };
    KeyringHandle::new(
        Keyring::new("k1", vec![spec("k1", 7), spec("k2", 8)], Rotation::Off).unwrap(),
    )
}

/// A users file with alice.
pub fn users_file_text() -> String {
    format!(
        "[[users]]\nname = \"alice\"\npassword = \"{}\"\nroles = [\"admin\"]\n",
        cheap_hash(ALICE_PASSWORD)
    )
}

/// Whether connections to `addr` are refused within `limit` (tried every 20 ms), after its
/// listener was closed. Not at once: a listening socket closes with its last descriptor, and a
/// child process that another test of the same binary is spawning holds a copy of every
/// descriptor from its fork until its exec (close-on-exec closes them only then), so a
/// listener closed meanwhile keeps accepting for that moment. A listener that stays open
/// still fails this.
pub async fn refused_within(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident set size of this process, in KiB, from /proc/self/status.
pub fn rss_kib() -> u64 {
    vm_rss_kib("/proc/self/status")
}

/// Resident set size of process `pid` (one the test started, such as the real binary), in
/// KiB, from its /proc status.
pub fn rss_kib_of(pid: u32) -> u64 {
    vm_rss_kib(&format!("/proc/{pid}/status"))
}

/// `VmRSS` of the /proc status file `path`, in KiB.
fn vm_rss_kib(path: &str) -> u64 {
    let status = std::fs::read_to_string(path).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A proxy serving HTTPS with a self-signed `localhost` certificate made here, and the roots a
/// client needs to trust it.
pub struct TlsHarness {
    pub h: Harness,
    pub roots: rustls::RootCertStore,
}

/// [`Harness::start_with`] over TLS (an https public origin, `localhost`), with `tweak` applied
/// to the settings after the TLS ones.
pub async fn start_tls(
    dir_name: &str,
    tweak: impl FnOnce(&mut ProxySettings) + Send + 'static,
) -> TlsHarness {
    let dir = temp_dir(dir_name);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    write(&cert_path, &certified.cert.pem());
    write(&key_path, &certified.key_pair.serialize_pem());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.tls = Some((cert_path, key_path));
            s.https = true;
            s.origins = vec!["https://localhost".to_owned()];
            s.public_host = "localhost".to_owned();
            tweak(s);
        }),
        files: Some(dir),
        ..HarnessOptions::default()
    })
    .await;
    TlsHarness { h, roots }
}

/// A TLS client trusting `roots` only (ring, the safe default protocol versions, no client
/// certificate), offering `alpn` (none when empty).
pub fn tls_connector(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// Logs in as alice at `addr` (a proxy started outside [`Harness`]) and returns the session.
pub async fn login_alice_at(addr: SocketAddr) -> Login {
    login_alice_reply_at(addr).await.login()
}

/// [`login_alice_at`]'s answer itself (checked to be a 200), for its other fields.
pub async fn login_alice_reply_at(addr: SocketAddr) -> Reply {
    let r = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r
}

/// Connections a test upstream accepted, and those of them still open.
#[derive(Clone, Default)]
pub struct ConnectionCounts {
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnectionCounts {
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Polls `check` every 10 ms for up to `within`; true when it held.
pub async fn eventually(within: Duration, check: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// Accepts connections on `listener` until accepting fails, counting each in `counts`, and runs
/// `serve` on each in a task of its own; a connection counts as open until its `serve` returns.
pub fn serve_counted<S, F>(listener: tokio::net::TcpListener, counts: &ConnectionCounts, serve: S)
where
    S: Fn(tokio::net::TcpStream) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    let counts = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            counts.open.fetch_add(1, Ordering::SeqCst);
            let open = counts.open.clone();
            let connection = serve(stream);
            tokio::spawn(async move {
                connection.await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
}

/// A test server on a new loopback port: runs `serve` on each connection it accepts, in a
/// task of its own, until the test's runtime ends. Returns the port's address.
pub async fn serve_each<S, F>(serve: S) -> SocketAddr
where
    S: Fn(tokio::net::TcpStream) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_counted(listener, &ConnectionCounts::default(), serve);
    addr
}

/// A login attempt at `addr` (a proxy started outside [`Harness`]) as the SPA sends it; the
/// answer unchecked.
pub async fn login_at(addr: SocketAddr, username: &str, password: &str) -> Reply {
    send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        serde_json::json!({ "username": username, "password": password }).to_string(),
    )
    .await
}

/// `POST /auth/logout` as the SPA sends it: cookie, CSRF token, same origin, no body.
pub async fn logout(addr: SocketAddr, session: &Login) -> Reply {
    send(
        addr,
        Method::POST,
        "/auth/logout",
        &[
            ("cookie", &session.cookie),
            ("x-csrf-token", &session.csrf),
            ("origin", ORIGIN),
        ],
        Bytes::new(),
    )
    .await
}

/// A [`Tweak`] body: `[auth] verify_url` set to the test upstream's credential check,
/// `/auth/verify-credentials`.
pub fn check_logins_at_the_upstream(settings: &mut ProxySettings, upstream: &Upstream) {
    settings.verify_url = Some(
        format!("{}/auth/verify-credentials", upstream.url())
            .parse()
            .unwrap(),
    );
}

/// `openssl <args>` with `input` on stdin; its stdout. A test calling it fails without the
/// command (scripts/test.sh installs it): key encodings ring cannot write (SEC1, PKCS#1, RSA,
/// encrypted keys).
pub fn openssl(args: &[&str], input: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is needed by this test (apt-get install openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The start and end of each of a run of requests sent one after the other.
pub type RequestSpans = [(std::time::Instant, std::time::Instant)];

/// The fewest connections that can have served `spans` when a connection is not taken again
/// `lifetime` after it was made: a request that starts `lifetime` after every earlier one
/// ended can take none of their connections (each made before its request ended). Timed by
/// the requests themselves, so a stalled machine can only raise it, never make it wrong.
pub fn fewest_connections(spans: &RequestSpans, lifetime: Duration) -> usize {
    let Some(&(_, first_end)) = spans.first() else {
        return 0;
    };
    let (mut fewest, mut all_retired_at) = (1, first_end + lifetime);
    for &(start, end) in &spans[1..] {
        if start >= all_retired_at {
            fewest += 1;
            all_retired_at = end + lifetime;
        }
    }
    fewest
}

/// The most connections that can have served `spans` when a new one is made only once the
/// one before has reached `lifetime` (requests one after the other, nothing else closing
/// connections): one, and one more per lifetime from the first request's start to the last
/// one's end.
pub fn most_connections(spans: &RequestSpans, lifetime: Duration) -> usize {
    match (spans.first(), spans.last()) {
        (Some(&(first_start, _)), Some(&(_, last_end))) => {
            let span = last_end.duration_since(first_start).as_nanos();
            1 + usize::try_from(span / lifetime.as_nanos().max(1)).unwrap_or(usize::MAX)
        }
        _ => 0,
    }
}

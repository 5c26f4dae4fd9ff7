//! `countersign dev`: the whole product in one process with no files.
//!
//! - an ephemeral keyring (one random key, gone at exit);
//! - in-memory sessions, throttle and replay cache;
//! - one user, `demo`, with a random password (or the one given);
//! - an embedded demo API behind the **real** [`VerifyLayer`], on
//!   its own loopback listener, reached through the proxy like any upstream — so every request
//!   takes the full sign → verify path;
//! - a small page at `/` that logs in, shows the user and calls the API with the CSRF header,
//!   and opens a WebSocket to the API through the proxy (or an SPA build from `--static-dir`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use parking_lot::Mutex;
use rand::Rng as _;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower_layer::Layer as _;
use tower_service::Service;
use zeroize::Zeroizing;

use crate::clock::{SharedClock, SystemClock};
use crate::core::{
    IdentityHeaders, Keyring, KeyringHandle, Policy, Secret, SignerConfig, Verifier,
};
use crate::layer::{VerifiedIdentity, VerifyLayer};
use crate::replay::{MemoryReplayCache, ReplayCache};

use super::config::ThrottleConfig;
use super::forward::{RouteSpec, UpstreamConnect, WebSocketRoute};
use super::http2_idle::{StreamActivity, TrackedBody};
use super::response_headers::ResponseHeaderRules;
use super::server::{ProxyDeps, ProxyServer, ProxySettings, StartError};
use super::session::{MemorySessionStore, SessionTimeouts};
use super::static_files::{EmbeddedPage, Site, StaticDir};
use super::throttle::MemoryLoginThrottle;
use super::users::{hash_password, UserDb, UserRecord, UsersHandle};

/// The demo user's name.
pub const DEMO_USER: &str = "demo";
/// Roles of the demo user.
pub const DEMO_ROLES: [&str; 1] = ["user"];
/// Most notes the demo API keeps.
pub const MAX_NOTES: usize = 1000;
/// Longest note text, in bytes.
pub const MAX_NOTE_BYTES: usize = 4096;
/// Interval between two events of the demo API's `GET /api/events` stream.
pub const DEMO_EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// Events one `GET /api/events` stream sends before it ends (an hour at one a second), so a
/// forgotten tab does not hold a stream forever; an `EventSource` reconnects by itself.
pub const DEMO_EVENTS_PER_STREAM: u64 = 3600;
/// `dev`'s `/api/` route carries WebSockets (`GET /api/ws`): closed after this long without a
/// byte either way (`websocket_idle_timeout`).
pub const DEMO_WS_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How often `dev` looks up the session behind an open WebSocket again
/// (`websocket_session_check`): a logout closes the demo page's WebSocket within this time.
pub const DEMO_WS_SESSION_CHECK: Duration = Duration::from_secs(2);
/// Most WebSockets open at once, on `dev`'s `/api/` route (`websocket_max_open`) and in the
/// demo API itself (beyond, 503 `websocket_limit`).
pub const DEMO_WS_MAX_OPEN: usize = 1000;
/// Largest WebSocket message (and frame) the demo API reads; a larger one closes the
/// WebSocket (1009, message too big).
pub const DEMO_WS_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Time the demo API waits, after its `101`, for hyper to hand over the connection.
const DEMO_WS_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `countersign dev` can be told. `Debug` never shows the password.
#[derive(Clone)]
pub struct DevOptions {
    /// Proxy listener (default 127.0.0.1:8080).
    pub listen: SocketAddr,
    /// Admin listener, if wanted.
    pub admin_listen: Option<SocketAddr>,
    /// The demo user's password (random when None).
    pub password: Option<String>,
    /// Serve this SPA build instead of the built-in page.
    pub static_dir: Option<PathBuf>,
    /// Session idle timeout (default 30 minutes).
    pub idle_timeout: Duration,
    /// Session absolute timeout (default 12 hours).
    pub absolute_timeout: Duration,
    /// Clock (tests); system clock when None.
    pub clock: Option<SharedClock>,
}

impl fmt::Debug for DevOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevOptions")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("static_dir", &self.static_dir)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("clock", &self.clock.as_ref().map(|_| "SharedClock"))
            .finish()
    }
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            admin_listen: None,
            password: None,
            static_dir: None,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            clock: None,
        }
    }
}

/// A running dev setup. `Debug` never shows the password.
pub struct DevServer {
    /// The proxy.
    pub proxy: ProxyServer,
    /// The demo API's own (loopback) address.
    pub api_addr: SocketAddr,
    /// The demo user's password.
    pub password: Zeroizing<String>,
    /// The URL to open.
    pub url: String,
    api_task: JoinHandle<()>,
}

impl fmt::Debug for DevServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevServer")
            .field("proxy", &self.proxy)
            .field("api_addr", &self.api_addr)
            .field("password", &"[redacted]")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl DevServer {
    /// Stops the proxy gracefully, then the demo API.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.api_task.abort();
    }
}

/// Starts the demo API and the proxy in front of it.
pub async fn start(options: DevOptions) -> Result<DevServer, StartError> {
    let clock = options
        .clock
        .clone()
        .unwrap_or_else(|| Arc::new(SystemClock));
    let password = Zeroizing::new(options.password.clone().unwrap_or_else(random_password));
    let password_hash = hash_password(&password).map_err(StartError::Invalid)?;
    let users = UserDb::from_records(vec![UserRecord {
        name: DEMO_USER.to_owned(),
        password_hash,
        roles: DEMO_ROLES.iter().map(|r| (*r).to_owned()).collect(),
    }])
    .map_err(|e| StartError::Invalid(e.to_string()))?;
    let keyring = KeyringHandle::new(
        Keyring::single("dev", Secret::random()).map_err(|e| StartError::Invalid(e.to_string()))?,
    );

    // Bind the proxy first: a busy port is the likeliest failure and must be reported as such.
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|error| StartError::Bind {
            what: "--listen",
            addr: options.listen,
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| StartError::Bind {
        what: "--listen",
        addr: options.listen,
        error,
    })?;
    // Before the demo API starts: an error returned after it would leave its task (and its
    // listener) running with nobody to stop it.
    let site = match &options.static_dir {
        Some(dir) => Site::Dir(
            StaticDir::new(dir)
                .map_err(|e| StartError::Invalid(format!("--static-dir {}: {e}", dir.display())))?,
        ),
        None => Site::Page(EmbeddedPage::new(DEV_PAGE)),
    };
    let (api_addr, api_task) = start_demo_api(keyring.clone(), clock.clone())
        .await
        .map_err(|error| StartError::Bind {
            what: "demo API",
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            error,
        })?;
    // From here every error path aborts the demo API.
    let api_url = match format!("http://{api_addr}").parse() {
        Ok(url) => url,
        Err(e) => {
            api_task.abort();
            return Err(StartError::Invalid(format!("demo API url: {e}")));
        }
    };
    let (url, origins) = dev_origins(addr);
    let timeouts = SessionTimeouts {
        idle: options.idle_timeout,
        absolute: options.absolute_timeout.max(options.idle_timeout),
    };
    let sessions = Arc::new(MemorySessionStore::new(timeouts, 100_000));
    // Sweep at least as often as sessions can expire, so short demo timeouts free memory too.
    let sweep = Duration::from_secs(60)
        .min(timeouts.idle)
        .max(Duration::from_secs(1));
    let _sweeper = sessions.spawn_sweeper(sweep, clock.clone());
    let settings = ProxySettings {
        listen: addr,
        origins,
        https: false,
        public_host: addr.to_string(),
        tls: None,
        site: Some(site),
        // The defaults (no HSTS: `dev` is http).
        response_headers: ResponseHeaderRules::new(),
        max_header_bytes: 16 * 1024,
        header_read_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        max_body_memory: super::config::DEFAULT_MAX_BODY_MEMORY,
        // A quarter of it (16 MiB): above the demo route's 1 MiB bodies.
        max_body_memory_per_client: Some(super::config::default_max_body_memory_per_client(
            super::config::DEFAULT_MAX_BODY_MEMORY,
            1024 * 1024,
        )),
        send_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
        max_connections: 10_000,
        websocket_max_open: super::config::DEFAULT_WEBSOCKET_MAX_OPEN,
        websocket_max_open_per_user: super::config::DEFAULT_WEBSOCKET_MAX_OPEN_PER_USER,
        admin_listen: options.admin_listen,
        admin_max_connections: super::config::DEFAULT_ADMIN_MAX_CONNECTIONS,
        http2_max_concurrent_streams: super::config::DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        http2_idle_timeout: super::config::DEFAULT_HTTP2_IDLE_TIMEOUT,
        http2_max_reset_streams: super::config::DEFAULT_HTTP2_MAX_RESET_STREAMS,
        max_header_count: super::config::DEFAULT_MAX_HEADER_COUNT,
        http1_half_close: true,
        cookie_name: "countersign_session".to_owned(),
        max_session_cookies: super::config::DEFAULT_MAX_SESSION_COOKIES,
        session_max_age: timeouts.absolute,
        signer: SignerConfig::default(),
        routes: vec![RouteSpec {
            name: "demo-api".to_owned(),
            prefix: "/api/".to_owned(),
            url: api_url,
            strip_prefix: false,
            timeout: Duration::from_secs(30),
            max_body: 1024 * 1024,
            auth_required: true,
            forward_cookies: false,
            cross_origin_redirects: super::forward::CrossOriginRedirects::Refuse,
            connect: UpstreamConnect::default(),
            // `GET /api/ws` (the demo API's WebSocket): a logout closes it within seconds.
            // Checked at least twice per idle timeout (`--idle-timeout 2s`: every 999 ms):
            // the checks are what keep a busy WebSocket's session alive, as proxy.toml's
            // `websocket_session_check` must be below half of `session.idle_timeout`.
            websocket: Some(WebSocketRoute::new(
                DEMO_WS_IDLE_TIMEOUT,
                DEMO_WS_SESSION_CHECK
                    .min((options.idle_timeout / 2).saturating_sub(Duration::from_millis(1))),
                DEMO_WS_MAX_OPEN,
            )),
        }],
        upstreams_not_required_for_ready: Vec::new(),
        verify_url: None,
        verify_timeout: Duration::from_secs(10),
        max_login_body: super::config::DEFAULT_MAX_LOGIN_BODY,
        max_username_bytes: super::config::DEFAULT_MAX_USERNAME_BYTES,
        max_password_bytes: super::users::DEFAULT_MAX_PASSWORD_BYTES,
        trusted_proxies: super::client_address::TrustedProxies::none(),
        proxy_protocol: false,
        proxy_protocol_max_bytes: super::proxy_protocol::DEFAULT_MAX_V2_PAYLOAD,
        max_verify_answer: super::config::DEFAULT_MAX_VERIFY_ANSWER,
        verify_answer_head: super::forward::AnswerHeadLimits::default(),
        connect_timeout: Duration::from_secs(5),
        verify_pool_max_lifetime: Some(super::forward::DEFAULT_POOL_MAX_LIFETIME),
        verify_pool_max_idle: super::config::DEFAULT_VERIFY_POOL_MAX_IDLE,
        verify_pool_idle_timeout: super::config::DEFAULT_POOL_IDLE_TIMEOUT,
        readiness: super::admin::ReadinessTiming::default(),
        upstream_roots: Vec::new(),
        verify_roots: Vec::new(),
        reload_from: None,
    };
    let deps = ProxyDeps {
        clock: clock.clone(),
        sessions,
        throttle: Arc::new(MemoryLoginThrottle::new(ThrottleConfig::default(), 100_000)),
        users: Some(UsersHandle::new(users)),
        keyring,
    };
    let proxy = match ProxyServer::start_on(listener, settings, deps).await {
        Ok(proxy) => proxy,
        Err(e) => {
            api_task.abort();
            // `dev` has flags, not config keys: name the flag the address came from.
            return Err(match e {
                StartError::Bind {
                    what: "admin.listen",
                    addr,
                    error,
                } => StartError::Bind {
                    what: "--admin-listen",
                    addr,
                    error,
                },
                other => other,
            });
        }
    };
    Ok(DevServer {
        proxy,
        api_addr,
        password,
        url,
        api_task,
    })
}

/// The URL to print and the origins the browser may use: on loopback, both `127.0.0.1` and
/// `localhost` name this server.
fn dev_origins(addr: SocketAddr) -> (String, Vec<String>) {
    let port = addr.port();
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_loopback() {
        let shown = if ip.is_loopback() {
            ip
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        let url = format!("http://{}", SocketAddr::new(shown, port));
        (url.clone(), vec![url, format!("http://localhost:{port}")])
    } else {
        let url = format!("http://{addr}");
        (url.clone(), vec![url])
    }
}

fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The demo API
// ---------------------------------------------------------------------------------------------

/// Time a client of the demo API has to send its request head; also how long a connection
/// of either protocol may stay without a request in flight (from its start: a client that
/// never sends a byte, or only part of the HTTP/2 preface, gives its connection back too).
pub const DEMO_API_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Nonces the demo API remembers (replay protection within the signature window).
pub const DEMO_API_REPLAY_CAPACITY: usize = 1_000_000;

/// Starts the demo API behind a real [`VerifyLayer`] on `127.0.0.1:0` (what `dev` embeds),
/// accepting signatures up to the default window old.
pub async fn start_demo_api(
    keyring: KeyringHandle,
    clock: SharedClock,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await?;
    let addr = listener.local_addr()?;
    let replay = Arc::new(MemoryReplayCache::new(DEMO_API_REPLAY_CAPACITY));
    let task = serve_demo_api(
        listener,
        keyring,
        replay,
        clock,
        Policy::default().window,
        IdentityHeaders::default(),
    );
    Ok((addr, task))
}

/// Serves the demo API (`GET /api/whoami`, `POST /api/echo`, notes under `/api/notes`, a
/// server-sent event stream at `GET /api/events`, a WebSocket at `GET /api/ws`)
/// behind a real [`VerifyLayer`] on `listener`, until the returned task is aborted. `window`
/// is the signature lifetime the verifier accepts (the signer's `signing.window`), and
/// `identity_headers` the identity fields it reads (`signing.user_header` / `roles_header`).
/// Used by
/// `dev` (embedded, on loopback) and `countersign demo-api` (standalone API tier).
pub fn serve_demo_api(
    listener: TcpListener,
    keyring: KeyringHandle,
    replay: Arc<dyn ReplayCache>,
    clock: SharedClock,
    window: Duration,
    identity_headers: IdentityHeaders,
) -> JoinHandle<()> {
    let policy = Policy {
        window,
        identity_headers,
        ..Policy::default()
    };
    let verify = VerifyLayer::new(Verifier::new(keyring, policy), replay).clock(clock);
    let service = verify.layer(DemoApi::default());
    tokio::spawn(async move {
        let mut builder = AutoBuilder::new(TokioExecutor::new());
        // A standalone demo API may face other hosts: slow clients get the proxy's default
        // head deadline rather than holding a connection open forever.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(DEMO_API_HEADER_READ_TIMEOUT)
            // A client that shuts down its sending side after its request still gets the
            // answer (as on the proxy's listeners).
            .half_close(true);
        let builder = Arc::new(builder);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                // Requests in flight, each until its answer's last frame is out (an event
                // stream for its hour), and when the last one ended.
                let activity = StreamActivity::new(DEMO_API_HEADER_READ_TIMEOUT);
                let counted = activity.clone();
                let hyper_service = service_fn(move |req: Request<Incoming>| {
                    let mut service = service.clone();
                    let stream = counted.open_stream();
                    async move {
                        std::future::poll_fn(|cx| {
                            Service::<Request<Incoming>>::poll_ready(&mut service, cx)
                        })
                        .await?;
                        let response = service.call(req).await?;
                        Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, stream)))
                    }
                });
                // With upgrades: `GET /api/ws` takes the connection over after its 101.
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_service);
                tokio::pin!(connection);
                // hyper's header timer covers an HTTP/1 head once the protocol is known, but
                // nothing bounds the wait for the first bytes (hyper-util reads up to 24 of
                // them to tell HTTP/2's preface from HTTP/1) nor an HTTP/2 connection with no
                // stream: a client holding either kept the connection (a task, a socket)
                // forever. A connection with no request in flight for the limit is closed
                // (HTTP/2: GOAWAY, and dropped a limit later if still without a request).
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = activity.idle_for(DEMO_API_HEADER_READ_TIMEOUT) => {
                        connection.as_mut().graceful_shutdown();
                    }
                }
                loop {
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        () = tokio::time::sleep(DEMO_API_HEADER_READ_TIMEOUT) => {
                            if activity.is_idle() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

#[derive(Debug, Clone, serde::Serialize)]
struct Note {
    id: String,
    text: String,
    author: String,
}

#[derive(Debug, Default)]
struct Notes {
    next_id: u64,
    notes: BTreeMap<u64, Note>,
}

/// The demo API as a tower service; it only ever sees requests the layer verified.
#[derive(Debug, Clone, Default)]
struct DemoApi {
    notes: Arc<Mutex<Notes>>,
    /// WebSockets open now (at most [`DEMO_WS_MAX_OPEN`]).
    websockets: Arc<AtomicUsize>,
}

#[derive(Deserialize)]
struct NewNote {
    text: String,
}

/// The demo API's answers: whole JSON bodies, or the `/api/events` stream.
type DemoBody = Either<Full<Bytes>, DemoEvents>;

impl Service<Request<Full<Bytes>>> for DemoApi {
    type Response = Response<DemoBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let notes = self.notes.clone();
        let websockets = self.websockets.clone();
        Box::pin(async move { Ok(demo_api(&notes, &websockets, request).await) })
    }
}

async fn demo_api(
    notes: &Arc<Mutex<Notes>>,
    websockets: &Arc<AtomicUsize>,
    request: Request<Full<Bytes>>,
) -> Response<DemoBody> {
    if request.method() == Method::GET && request.uri().path() == "/api/ws" {
        return websocket(websockets, request).map(Either::Left);
    }
    // Only the event stream is not a whole JSON body.
    if request.method() == Method::GET && request.uri().path() == "/api/events" {
        let user = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|identity| identity.user.as_ref())
            .map(|user| user.to_string());
        return match user {
            Some(user) => event_stream(DemoEvents::new(user, notes.clone())),
            None => json(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": "user_required" }),
            )
            .map(Either::Left),
        };
    }
    demo_json_api(notes, request).await.map(Either::Left)
}

async fn demo_json_api(
    notes: &Mutex<Notes>,
    request: Request<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let identity = request.extensions().get::<VerifiedIdentity>().cloned();
    let Some(identity) = identity else {
        // Unreachable behind the layer; answer as the layer would.
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "missing_signature" }),
        );
    };
    let Some(user) = identity.user.as_ref().map(|user| user.to_string()) else {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "user_required" }),
        );
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(never) => match never {},
    };
    let roles: Vec<&str> = identity.roles.iter().map(|role| role.as_str()).collect();
    let who = serde_json::json!({ "user": user, "roles": roles, "keyid": identity.keyid.as_str() });
    match (&method, path.as_str()) {
        (&Method::GET, "/api/whoami") => json(StatusCode::OK, who),
        (&Method::POST, "/api/echo") => json(
            StatusCode::OK,
            serde_json::json!({ "identity": who, "body": String::from_utf8_lossy(&body) }),
        ),
        (&Method::GET, "/api/notes") => {
            let notes = notes.lock();
            let list: Vec<&Note> = notes.notes.values().collect();
            json(StatusCode::OK, serde_json::json!({ "notes": list }))
        }
        (&Method::POST, "/api/notes") => {
            let Ok(new) = serde_json::from_slice::<NewNote>(&body) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "bad_request" }),
                );
            };
            if new.text.trim().is_empty() || new.text.len() > MAX_NOTE_BYTES {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "bad_request" }),
                );
            }
            let mut notes = notes.lock();
            if notes.notes.len() >= MAX_NOTES {
                return json(
                    StatusCode::INSUFFICIENT_STORAGE,
                    serde_json::json!({ "error": "too_many_notes" }),
                );
            }
            notes.next_id += 1;
            let id = notes.next_id;
            let note = Note {
                id: id.to_string(),
                text: new.text,
                author: user,
            };
            notes.notes.insert(id, note.clone());
            json(StatusCode::CREATED, serde_json::json!(note))
        }
        (&Method::PUT, p) if p.starts_with("/api/notes/") => {
            // Only a note's author may change it: the API authorizes by the identity the
            // proxy signed, which the browser cannot forge.
            let id = p["/api/notes/".len()..].parse::<u64>().ok();
            let edit = serde_json::from_slice::<NewNote>(&body)
                .ok()
                .filter(|e| !e.text.trim().is_empty() && e.text.len() <= MAX_NOTE_BYTES);
            let mut notes = notes.lock();
            match (id.and_then(|id| notes.notes.get_mut(&id)), edit) {
                (None, _) => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": "not_found" }),
                ),
                (Some(note), _) if note.author != user => json(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({ "error": "not_author" }),
                ),
                (Some(_), None) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "bad_request" }),
                ),
                (Some(note), Some(edit)) => {
                    note.text = edit.text;
                    json(StatusCode::OK, serde_json::json!(note))
                }
            }
        }
        (&Method::DELETE, p) if p.starts_with("/api/notes/") => {
            let id = p["/api/notes/".len()..].parse::<u64>().ok();
            let removed = id.and_then(|id| notes.lock().notes.remove(&id));
            match removed {
                Some(_) => {
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                None => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": "not_found" }),
                ),
            }
        }
        (_, "/api/whoami" | "/api/echo" | "/api/notes" | "/api/events" | "/api/ws") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "method_not_allowed" }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "not_found" }),
        ),
    }
}

/// A `text/event-stream` answer (no caching, no proxy buffering).
fn event_stream(events: DemoEvents) -> Response<DemoBody> {
    let mut response = Response::new(Either::Right(events));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// The `GET /api/events` body: a comment at once (so the browser sees the stream open),
/// then one `tick` event a second with the verified user and the number of notes, up to
/// [`DEMO_EVENTS_PER_STREAM`]. Dropped (the client went away) it stops.
#[derive(Debug)]
struct DemoEvents {
    user: String,
    notes: Arc<Mutex<Notes>>,
    sent: u64,
    opened: bool,
    next: Pin<Box<tokio::time::Sleep>>,
}

impl DemoEvents {
    fn new(user: String, notes: Arc<Mutex<Notes>>) -> Self {
        DemoEvents {
            user,
            notes,
            sent: 0,
            opened: false,
            next: Box::pin(tokio::time::sleep(DEMO_EVENT_INTERVAL)),
        }
    }
}

impl hyper::body::Body for DemoEvents {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if !self.opened {
            self.opened = true;
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                b": signed by the proxy, verified by the demo API\n\n",
            )))));
        }
        if self.sent >= DEMO_EVENTS_PER_STREAM {
            return Poll::Ready(None);
        }
        if self.next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // From now, not from the last deadline: a stream read late gets no burst of ticks.
        let deadline = tokio::time::Instant::now() + DEMO_EVENT_INTERVAL;
        self.next.as_mut().reset(deadline);
        self.sent += 1;
        let data = serde_json::json!({
            "n": self.sent,
            "user": self.user,
            "notes": self.notes.lock().notes.len(),
        });
        let event = format!("event: tick\nid: {}\ndata: {data}\n\n", self.sent);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.opened && self.sent >= DEMO_EVENTS_PER_STREAM
    }
}

// ---------------------------------------------------------------------------------------------
// The demo API's WebSocket (`GET /api/ws`)
// ---------------------------------------------------------------------------------------------

/// `GET /api/ws`: an RFC 6455 handshake (verified by the layer like any request) answered
/// with `101`; then, on the connection hyper hands over, a text message `{"hello":<user>}`
/// and, for every text message, `{"user":<user>,"echo":<text>}`. The user is the one the
/// proxy signed into the handshake. Binary messages close it (1003); the proxy closes it on
/// logout, idleness or its limits.
fn websocket(open: &Arc<AtomicUsize>, mut request: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
    let user = request
        .extensions()
        .get::<VerifiedIdentity>()
        .and_then(|identity| identity.user.as_ref())
        .map(|user| user.to_string());
    let Some(user) = user else {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "user_required" }),
        );
    };
    let headers = request.headers();
    let lists = |name, token| super::websocket::has_token(headers, name, token);
    if !lists(http::header::UPGRADE, "websocket") || !lists(http::header::CONNECTION, "upgrade") {
        return json(
            StatusCode::UPGRADE_REQUIRED,
            serde_json::json!({ "error": "websocket_required" }),
        );
    }
    if headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut refused = json(
            StatusCode::UPGRADE_REQUIRED,
            serde_json::json!({ "error": "websocket_version" }),
        );
        refused.headers_mut().insert(
            http::header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return refused;
    }
    // The key is 16 random bytes in base64 (24 characters); anything else is no handshake.
    let Some(key) = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .filter(|key| key.len() == 24)
    else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "bad_websocket_key" }),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "bad_websocket_key" }),
        );
    };
    let taken = open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < DEMO_WS_MAX_OPEN).then_some(n + 1)
    });
    if taken.is_err() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "websocket_limit" }),
        );
    }
    let slot = WsSlot(open.clone());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match tokio::time::timeout(DEMO_WS_UPGRADE_TIMEOUT, upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => {
                tracing::debug!("demo API WebSocket not started: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("demo API WebSocket not started: upgrade timed out");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(DEMO_WS_MAX_MESSAGE_BYTES))
            .max_frame_size(Some(DEMO_WS_MAX_MESSAGE_BYTES));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        if let Err(e) = echo_websocket(socket, &user).await {
            tracing::debug!("demo API WebSocket ended: {e}");
        }
    });
    let mut switching = Response::new(Full::new(Bytes::new()));
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = switching.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    switching
}

/// One open WebSocket of the demo API, counted until dropped.
struct WsSlot(Arc<AtomicUsize>);

impl Drop for WsSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Greets `user`, then echoes text messages until the peer closes (or breaks) the WebSocket.
/// Pings are answered by tungstenite itself. No timer of its own: the proxy in front closes
/// idle WebSockets (`websocket_idle_timeout`) and those of ended sessions.
async fn echo_websocket<S>(
    mut socket: WebSocketStream<S>,
    user: &str,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt as _, StreamExt as _};
    let hello = serde_json::json!({ "hello": user }).to_string();
    socket.send(Message::text(hello)).await?;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Text(text) => {
                let echo = serde_json::json!({ "user": user, "echo": text.as_str() }).to_string();
                socket.send(Message::text(echo)).await?;
            }
            Message::Binary(_) => {
                socket
                    .close(Some(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "text messages only".into(),
                    }))
                    .await?;
            }
            // Pings are answered, pongs ignored; a close is answered by tungstenite and
            // the stream then ends.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The built-in demo page (no build step, no external resources).
pub const DEV_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>countersign dev</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; } section { border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
  input { padding: .3rem; margin: .2rem 0; } button { padding: .3rem .8rem; margin: .2rem .2rem .2rem 0; }
  pre { background: #f6f6f6; padding: .5rem; overflow: auto; } .error { color: #b00; } [hidden] { display: none; }
</style>
</head>
<body>
<h1>countersign dev</h1>
<p>This page talks only to the proxy. The proxy keeps your session server-side (an HttpOnly cookie),
signs every <code>/api/</code> request with your identity, and the demo API verifies the signature.</p>
<section id="login">
  <form id="login-form">
    <label>User <input id="username" value="demo" autocomplete="username"></label><br>
    <label>Password <input id="password" type="password" autocomplete="current-password"></label><br>
    <button type="submit">Log in</button> <span id="login-error" class="error"></span>
  </form>
</section>
<section id="app" hidden>
  <p>Signed in as <strong id="user"></strong> <button id="logout">Log out</button></p>
  <p><button id="whoami-button">GET /api/whoami</button> (what the API verified)</p>
  <pre id="whoami"></pre>
  <form id="note-form"><input id="note-text" placeholder="New note" maxlength="4096"> <button type="submit">Add note</button></form>
  <ul id="notes"></ul>
  <p><button id="events-button">Start events</button> GET /api/events, a signed server-sent event stream:
    <span id="events">off</span></p>
  <p><button id="ws-button">Open WebSocket</button> GET /api/ws, a WebSocket through the proxy (its handshake signed):
    <span id="ws">closed</span></p>
  <form id="ws-form" hidden><input id="ws-text" placeholder="Message" maxlength="4096"> <button type="submit">Send</button></form>
  <pre id="ws-log"></pre>
  <p id="api-error" class="error"></p>
</section>
<script>
"use strict";
let csrf = null;
const $ = (id) => document.getElementById(id);
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const method = options.method || "GET";
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrf;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, credentials: "same-origin",
    body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (response.status === 401) { show(null); throw new Error("signed out"); }
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((body && body.error) || response.status);
  return body;
}
let events = null;
function stopEvents(why) { if (events) { events.close(); events = null; } $("events").textContent = why; $("events-button").textContent = "Start events"; }
$("events-button").onclick = () => {
  if (events) { stopEvents("off"); return; }
  events = new EventSource("/api/events");
  $("events-button").textContent = "Stop events"; $("events").textContent = "connecting";
  events.addEventListener("tick", (e) => { const t = JSON.parse(e.data); $("events").textContent = "tick " + t.n + " for " + t.user + ", " + t.notes + " notes"; });
  // EventSource hides the status of a refused reconnection: ask the proxy whether the session is over.
  events.onerror = () => { if (events && events.readyState === EventSource.CLOSED) { stopEvents("closed");
    fetch("/auth/session?touch=false", { credentials: "same-origin" }).then((r) => { if (r.status === 401) show(null); }); } };
};
let socket = null;
function closeSocket(why) {
  const s = socket; socket = null; if (s) s.close();
  $("ws").textContent = why; $("ws-button").textContent = "Open WebSocket"; $("ws-form").hidden = true;
}
$("ws-button").onclick = () => {
  if (socket) { closeSocket("closed"); return; }
  // Same origin, ws: or wss: as the page: the browser sends the session cookie and Origin itself.
  const s = new WebSocket(location.origin.replace(/^http/, "ws") + "/api/ws");
  socket = s; $("ws").textContent = "connecting"; $("ws-button").textContent = "Close WebSocket"; $("ws-log").textContent = "";
  s.onopen = () => { if (socket === s) { $("ws").textContent = "open"; $("ws-form").hidden = false; } };
  s.onmessage = (e) => { const m = JSON.parse(e.data);
    $("ws-log").textContent += (m.hello !== undefined ? "hello " + m.hello : "echo for " + m.user + ": " + m.echo) + "\n"; };
  // A refused handshake (401 signed out, 403 Origin) and a closed WebSocket (logout, idle) look
  // alike to the page (code 1006): ask the proxy whether the session is over.
  s.onclose = (e) => { if (socket !== s) return; closeSocket("closed (" + e.code + ")");
    fetch("/auth/session?touch=false", { credentials: "same-origin" }).then((r) => { if (r.status === 401) show(null); }); };
};
$("ws-form").onsubmit = (event) => {
  event.preventDefault(); const text = $("ws-text").value;
  if (text && socket && socket.readyState === WebSocket.OPEN) { socket.send(text); $("ws-text").value = ""; }
};
function show(session) {
  csrf = session ? session.csrf_token : null;
  if (!session) { stopEvents("off"); if (socket) closeSocket("closed"); }
  $("login").hidden = !!session; $("app").hidden = !session;
  if (session) { $("user").textContent = session.user; whoami(); loadNotes(); }
}
async function whoami() {
  try { $("whoami").textContent = JSON.stringify(await api("/api/whoami"), null, 2); } catch (e) { $("api-error").textContent = e.message; }
}
async function loadNotes() {
  try {
    const body = await api("/api/notes");
    const list = $("notes"); list.replaceChildren();
    for (const note of body.notes) {
      const li = document.createElement("li");
      li.textContent = note.text + " (" + note.author + ") ";
      const del = document.createElement("button"); del.textContent = "Delete";
      del.onclick = async () => { await api("/api/notes/" + encodeURIComponent(note.id), { method: "DELETE" }); loadNotes(); };
      const edit = document.createElement("button"); edit.textContent = "Edit";
      edit.onclick = async () => {
        const text = prompt("Note", note.text); if (text === null || !text.trim()) return;
        try { await api("/api/notes/" + encodeURIComponent(note.id), { method: "PUT", body: { text } }); loadNotes(); }
        catch (e) { $("api-error").textContent = e.message; }
      };
      li.append(edit, del); list.append(li);
    }
  } catch (e) { $("api-error").textContent = e.message; }
}
$("login-form").onsubmit = async (event) => {
  event.preventDefault(); $("login-error").textContent = "";
  const response = await fetch("/auth/login", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: $("username").value, password: $("password").value }) });
  if (response.ok) { $("password").value = ""; show(await response.json()); }
  else { const body = await response.json().catch(() => ({})); $("login-error").textContent =
    body.error === "too_many_attempts" ? "Too many attempts, try later." : "Wrong username or password."; }
};
$("logout").onclick = async () => { try { await api("/auth/logout", { method: "POST" }); } catch (e) {} show(null); };
$("whoami-button").onclick = whoami;
$("note-form").onsubmit = async (event) => {
  event.preventDefault(); const text = $("note-text").value.trim(); if (!text) return;
  try { await api("/api/notes", { method: "POST", body: { text } }); $("note-text").value = ""; loadNotes(); }
  catch (e) { $("api-error").textContent = e.message; }
};
fetch("/auth/session", { credentials: "same-origin" }).then((r) => (r.ok ? r.json() : null)).then(show, () => show(null));
</script>
</body>
</html>
"#;

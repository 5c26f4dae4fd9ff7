//! `countersign-baseline-proxy`: the thinnest correct HTTP/1.1 reverse proxy on the stack the
//! countersign proxy runs on, to measure what that stack costs before countersign does any of
//! its own work (bench/run.sh target `hyper-baseline`, docs/BENCHMARKS.md "Where the time
//! goes").
//!
//! ```text
//! countersign-baseline-proxy --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080 [--threads N]
//! ```
//!
//! The same building blocks as `countersign run`: one single-threaded tokio runtime per core,
//! each with its own `SO_REUSEPORT` listener and its own upstream pool
//! ([`countersign::proxy::upstream_pool::UpstreamPool`], HTTP/1.1 keep-alive over
//! `hyper::client::conn::http1`, `TCP_NODELAY`), hyper's HTTP/1 server builder with the
//! proxy's HTTP/1 settings (`http1_server_builder`, what the proxy serves HTTP/1 with), request
//! bodies read within a limit (the proxy reads them to digest
//! them; nginx buffers them too), the route's response timeout. No session, no CSRF check, no
//! signing, no header work beyond dropping the hop-by-hop fields and adding
//! `X-Forwarded-For` / `X-Forwarded-Proto` (what the nginx baseline's config adds). Logs
//! nothing per request. Stopped by SIGTERM / SIGINT (not gracefully: a bench tool).
//!
//! Two switches exist to prototype request-path changes before porting them to the proxy (A/B
//! in one bench run with `BASELINE_ALT_ARGS`):
//! - `--server auto`: hyper-util's auto builder (which reads the first bytes to tell HTTP/2
//!   from HTTP/1 and then wraps the socket; HTTP/1 and h2c) instead of hyper's HTTP/1 builder
//!   (`--server http1`, the default). The proxy served HTTP/1 that way until `21f2970`; it now
//!   reads a cleartext connection's first bytes itself, once per connection, and serves HTTP/1
//!   with hyper's builder.
//! - `--upstream-driver inline`: the upstream connection is driven in the task of the
//!   downstream connection that uses it (kept for that connection's whole life), instead of by
//!   its own spawned task; a request then no longer switches tasks to reach the upstream
//!   socket. Idle connections wait in a per-loop pool, undriven, until a downstream connection
//!   takes them.
//! - `--upstream-driver raw`: hyper's client replaced by one of its own (`raw_client.rs`): per
//!   event loop a pool of keep-alive `TcpStream`s, the request written in one write from the
//!   `HeaderMap` the service prepared, the response head parsed with `httparse` and a
//!   `Content-Length` body read whole, all in the service's future (no driver task). The
//!   downstream side stays hyper's server. Chunked and close-delimited responses get a 502: a
//!   prototype to measure the upstream half of hyper, not a client to deploy.
//!
//! - `--engine raw`: no hyper at all (`raw.rs`): tokio `TcpStream`s and `httparse` directly, one
//!   task per downstream connection that owns its upstream keep-alive connection, heads copied
//!   as byte slices (no `HeaderMap`). Only what a bench sends: `Content-Length` bodies, HTTP/1.1,
//!   no timeouts but the connect one; the other switches do not apply to it. To measure what
//!   hyper costs, not a proxy to deploy (docs/BENCHMARKS.md).
//!
//! Exit status 2 for a usage error or a listener that cannot be bound.
#![forbid(unsafe_code)]

#[path = "baseline_proxy/raw.rs"]
mod raw;
#[path = "baseline_proxy/raw_client.rs"]
mod raw_client;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use countersign::proxy::body_memory::{BodyMemory, ClientBodyMemory, ClientKey};
use countersign::proxy::config::{
    default_max_body_memory_per_client, DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_BODY_MEMORY,
};
use countersign::proxy::forward::{
    forwarded_for_value, read_body, strip_hop_by_hop, upstream_connector, UpstreamConnect,
};
use countersign::proxy::upstream_pool::{PoolSettings, UpstreamBody, UpstreamPool};
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::{TcpSocket, TcpStream};

// The same allocator as the `countersign` binary, so the comparison is of the request path only.
#[global_allocator]
static GLOBAL_ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// How long a kept upstream connection that is not ready at once may take to become ready (the
/// same bound as the proxy's pool).
const READY_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, Parser)]
#[command(
    name = "countersign-baseline-proxy",
    about = "A plain hyper reverse proxy (no session, no signing): the bench baseline of the countersign proxy"
)]
struct Args {
    /// The HTTP engine: hyper's server and client (everything below applies), or a minimal
    /// HTTP/1.1 engine over `httparse` without hyper (`--max-body`, `--max-header-bytes`,
    /// `--connect-timeout` and `--threads` apply).
    #[arg(long, value_enum, default_value_t = Engine::Hyper)]
    engine: Engine,
    /// Where to listen.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The upstream (`http://host:port`); every request path goes to it unchanged.
    #[arg(long, value_name = "URL")]
    upstream: Uri,
    /// Event loops (one single-threaded runtime per core); default: the CPUs available.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Server connection: hyper's HTTP/1 builder with the proxy's settings (what the proxy
    /// serves HTTP/1 with), or hyper-util's auto builder (HTTP/1 and h2c).
    #[arg(long, value_enum, default_value_t = ServerKind::Http1)]
    server: ServerKind,
    /// Who drives an upstream connection: its own spawned task (the proxy's pool), the task
    /// of the downstream connection using it, or no one (`raw`: a client of the baseline's
    /// own, not hyper's, run in the request's service future).
    #[arg(long, value_enum, default_value_t = UpstreamDriver::Task)]
    upstream_driver: UpstreamDriver,
    /// With `--upstream-driver inline`: when the downstream task polls the kept upstream
    /// connection: before and after the server connection, or only after it.
    #[arg(long, value_enum, default_value_t = InlinePolls::Both)]
    inline_polls: InlinePolls,
    /// Largest request body read, in bytes (larger: 413).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    max_body: usize,
    /// Largest request head, in bytes (hyper's minimum buffer, 8 KiB, applies).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// Seconds a client has to send its request head.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds a client has to send its request body.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    request_timeout: u64,
    /// Seconds the upstream has to answer (504 after).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    upstream_timeout: u64,
    /// Seconds to connect to the upstream.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    connect_timeout: u64,
    /// Idle upstream connections kept per event loop.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pool_max_idle: usize,
    /// Seconds an idle upstream connection is kept.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pool_idle_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    Hyper,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    Auto,
    Http1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InlinePolls {
    Both,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UpstreamDriver {
    Task,
    Inline,
    Raw,
}

/// Everything an event loop needs, checked once.
#[derive(Debug, Clone)]
struct Settings {
    engine: Engine,
    server: ServerKind,
    driver: UpstreamDriver,
    inline_polls: InlinePolls,
    upstream: Uri,
    upstream_addr: String,
    upstream_authority: Authority,
    max_body: usize,
    /// The proxy's `server.max_body_memory` at its default, shared by every event loop: the
    /// same cap on bodies being read, so a POST costs what it costs in the proxy.
    body_memory: Arc<BodyMemory>,
    /// And its `server.max_body_memory_per_client` at its default, the client being the
    /// connection's address (as on the proxy's public routes).
    client_body_memory: Arc<ClientBodyMemory>,
    max_header_bytes: usize,
    header_read_timeout: Duration,
    request_timeout: Duration,
    upstream_timeout: Duration,
    connect_timeout: Duration,
    pool_max_idle: usize,
    pool_idle_timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match check(&args) {
        Ok(settings) => settings,
        Err(problem) => {
            eprintln!("countersign-baseline-proxy: {problem}");
            return ExitCode::from(2);
        }
    };
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    // Every listener is bound before any thread starts, so a bad address fails the process.
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads {
        match reuseport_socket(args.listen) {
            Ok(socket) => sockets.push(socket),
            Err(e) => {
                eprintln!(
                    "countersign-baseline-proxy: --listen {}: cannot listen: {e}",
                    args.listen
                );
                return ExitCode::from(2);
            }
        }
    }
    let mut loops = Vec::with_capacity(threads);
    for (i, socket) in sockets.into_iter().enumerate() {
        let settings = settings.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("baseline-{i}"))
            .spawn(move || event_loop(socket, settings));
        match spawned {
            Ok(handle) => loops.push(handle),
            Err(e) => {
                eprintln!("countersign-baseline-proxy: cannot start an event loop: {e}");
                return ExitCode::from(2);
            }
        }
    }
    eprintln!(
        "countersign-baseline-proxy: listening on {} ({threads} event loops, engine {:?}, server {:?}, upstream driver {:?})",
        args.listen, settings.engine, settings.server, settings.driver
    );
    for handle in loops {
        let _ = handle.join();
    }
    ExitCode::from(1)
}

fn check(args: &Args) -> Result<Settings, String> {
    if args.upstream.scheme() != Some(&Scheme::HTTP) {
        return Err(format!(
            "--upstream {}: must be http://host:port",
            args.upstream
        ));
    }
    let authority = args
        .upstream
        .authority()
        .cloned()
        .ok_or_else(|| format!("--upstream {}: has no host", args.upstream))?;
    let upstream_addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let upstream = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("--upstream {}: {e}", args.upstream))?;
    Ok(Settings {
        engine: args.engine,
        server: args.server,
        driver: args.upstream_driver,
        inline_polls: args.inline_polls,
        upstream,
        upstream_addr,
        upstream_authority: authority,
        max_body: args.max_body,
        body_memory: Arc::new(BodyMemory::new(
            DEFAULT_MAX_BODY_MEMORY.max(args.max_body),
            countersign::proxy::body_memory::SETTING,
        )),
        client_body_memory: Arc::new(ClientBodyMemory::new(Some(
            default_max_body_memory_per_client(
                DEFAULT_MAX_BODY_MEMORY.max(args.max_body),
                args.max_body,
            ),
        ))),
        max_header_bytes: args.max_header_bytes,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        request_timeout: Duration::from_secs(args.request_timeout),
        upstream_timeout: Duration::from_secs(args.upstream_timeout),
        connect_timeout: Duration::from_secs(args.connect_timeout),
        pool_max_idle: args.pool_max_idle,
        pool_idle_timeout: Duration::from_secs(args.pool_idle_timeout),
    })
}

/// A TCP socket bound to `addr` with `SO_REUSEPORT` (one per event loop), as the proxy's.
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// How one event loop reaches the upstream.
#[derive(Clone)]
enum Upstreams {
    /// The proxy's pool: each connection driven by its own task.
    Pool(UpstreamPool),
    /// Connections driven by the downstream connection's task; idle ones wait here.
    Inline(Arc<InlinePool>),
    /// The baseline's own HTTP/1.1 client (`--upstream-driver raw`).
    Raw(Arc<raw_client::RawPool>),
}

fn event_loop(socket: TcpSocket, settings: Settings) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("countersign-baseline-proxy: cannot start a runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match socket.listen(1024) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("countersign-baseline-proxy: cannot listen: {e}");
                return;
            }
        };
        if settings.engine == Engine::Raw {
            let config = raw::Config {
                upstream_addr: settings.upstream_addr.clone(),
                max_head: settings.max_header_bytes.max(1024),
                max_body: settings.max_body,
                connect_timeout: settings.connect_timeout,
            };
            raw::run(listener, Arc::new(config)).await;
            return;
        }
        let upstreams = match settings.driver {
            UpstreamDriver::Task => {
                let connector = match upstream_connector(
                    &UpstreamConnect {
                        connect_timeout: settings.connect_timeout,
                        pool_idle_timeout: settings.pool_idle_timeout,
                        pool_max_idle_per_host: settings.pool_max_idle,
                        extra_roots: Vec::new(),
                        ..UpstreamConnect::default()
                    },
                    &[],
                ) {
                    Ok(connector) => connector,
                    Err(e) => {
                        eprintln!("countersign-baseline-proxy: {e}");
                        return;
                    }
                };
                Upstreams::Pool(UpstreamPool::new(
                    PoolSettings {
                        upstream: settings.upstream.clone(),
                        max_idle: settings.pool_max_idle,
                        idle_timeout: settings.pool_idle_timeout,
                        max_lifetime: UpstreamConnect::default().pool_max_lifetime,
                        body_idle_timeout: UpstreamConnect::default().body_idle_timeout,
                        max_response_header_count: UpstreamConnect::default()
                            .max_response_header_count,
                        max_response_header_bytes: UpstreamConnect::default()
                            .max_response_header_bytes,
                        // The baseline does not sign, so it has no spare to send.
                        stale_after: None,
                        whole_connect_timeout: None,
                        live_limits: None,
                    },
                    connector,
                ))
            }
            UpstreamDriver::Inline => Upstreams::Inline(InlinePool::start(&settings)),
            UpstreamDriver::Raw => Upstreams::Raw(raw_client::RawPool::new(
                settings.upstream_addr.clone(),
                settings.pool_max_idle,
                settings.connect_timeout,
                settings.max_header_bytes.max(1024),
            )),
        };
        let settings = Arc::new(settings);
        let auto = Arc::new(auto_builder(&settings));
        loop {
            let (stream, peer) = accept(&listener).await;
            tokio::spawn(serve_connection(
                stream,
                peer,
                settings.clone(),
                auto.clone(),
                upstreams.clone(),
            ));
        }
    });
}

/// The next connection of `listener`, with `TCP_NODELAY` set (both engines' accept loops). A
/// failed accept (usually EMFILE) is logged and retried after a short pause instead of
/// spinning.
async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                eprintln!("countersign-baseline-proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
/// hyper-util's auto builder with the proxy's own HTTP/1 and HTTP/2 settings.
fn auto_builder(settings: &Settings) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    countersign::proxy::server::http_server_builder(
        settings.header_read_timeout,
        settings.max_header_bytes,
        countersign::proxy::config::DEFAULT_MAX_HEADER_COUNT,
        DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        true,
    )
}

/// hyper's HTTP/1 builder with the proxy's HTTP/1 settings, as the proxy builds it.
fn http1_builder(settings: &Settings) -> hyper::server::conn::http1::Builder {
    countersign::proxy::server::http1_server_builder(
        settings.header_read_timeout,
        settings.max_header_bytes,
        countersign::proxy::config::DEFAULT_MAX_HEADER_COUNT,
        true,
    )
}

type BaselineBody = Either<UpstreamBody, Either<InlineBody, Full<Bytes>>>;

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<Settings>,
    auto: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    upstreams: Upstreams,
) {
    let forwarded_for = forwarded_for_value(peer.ip());
    // The upstream connection this downstream connection keeps (inline driver only).
    let kept = Arc::new(Mutex::new(Kept::default()));
    let service = {
        let settings = settings.clone();
        let upstreams = upstreams.clone();
        let kept = kept.clone();
        service_fn(move |req| {
            let settings = settings.clone();
            let upstreams = upstreams.clone();
            let kept = kept.clone();
            let forwarded_for = forwarded_for.clone();
            async move {
                Ok::<_, Infallible>(
                    proxy(&settings, &upstreams, &kept, &forwarded_for, peer.ip(), req).await,
                )
            }
        })
    };
    let io = TokioIo::new(stream);
    let result: Result<(), String> = match (&upstreams, settings.server) {
        (Upstreams::Pool(_) | Upstreams::Raw(_), ServerKind::Auto) => auto
            .serve_connection(io, service)
            .await
            .map_err(|e| e.to_string()),
        (Upstreams::Pool(_) | Upstreams::Raw(_), ServerKind::Http1) => http1_builder(&settings)
            .serve_connection(io, service)
            .await
            .map_err(|e| e.to_string()),
        (Upstreams::Inline(pool), ServerKind::Auto) => {
            let server = Box::pin(auto.serve_connection(io, service));
            let result = DriveTogether {
                server,
                kept: kept.clone(),
                upstream_first: settings.inline_polls == InlinePolls::Both,
            }
            .await
            .map_err(|e| e.to_string());
            pool.give_back(&kept);
            result
        }
        (Upstreams::Inline(pool), ServerKind::Http1) => {
            let server = Box::pin(http1_builder(&settings).serve_connection(io, service));
            let result = DriveTogether {
                server,
                kept: kept.clone(),
                upstream_first: settings.inline_polls == InlinePolls::Both,
            }
            .await
            .map_err(|e| e.to_string());
            pool.give_back(&kept);
            result
        }
    };
    if let Err(e) = result {
        // Not per request; a connection error is rare in a benchmark and worth seeing.
        eprintln!("countersign-baseline-proxy: connection from {peer}: {e}");
    }
}

/// One request: body read within the limit, hop-by-hop fields dropped, forwarded, answered.
async fn proxy(
    settings: &Settings,
    upstreams: &Upstreams,
    kept: &Arc<Mutex<Kept>>,
    forwarded_for: &HeaderValue,
    peer_ip: std::net::IpAddr,
    req: Request<Incoming>,
) -> Response<BaselineBody> {
    let (mut parts, body) = req.into_parts();
    // Only an HTTP/1 downstream connection sends one request at a time from its own task; an
    // HTTP/2 one runs each stream's request in a task of its own.
    let sequential = parts.version <= Version::HTTP_11;
    let mut body_share = None;
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        let share = body_share.insert(
            (settings.client_body_memory).share(&settings.body_memory, ClientKey::address(peer_ip)),
        );
        match tokio::time::timeout(
            settings.request_timeout,
            read_body(&parts.headers, body, settings.max_body, share),
        )
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(countersign::proxy::error::ProxyError::BodyTooLarge { .. })) => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            Ok(Err(countersign::proxy::error::ProxyError::BodyMemoryLimit)) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, "body_memory_limit")
            }
            Ok(Err(countersign::proxy::error::ProxyError::ClientBodyMemoryLimit)) => {
                return error(StatusCode::TOO_MANY_REQUESTS, "client_body_memory_limit")
            }
            Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "bad_request"),
            Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        }
    };
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(http::header::HOST) {
        // HTTP/2 requests carry the authority in the URI, not in `Host`.
        if let Ok(host) = HeaderValue::from_str(settings.upstream_authority.as_str()) {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    parts.headers.insert(X_FORWARDED_FOR, forwarded_for.clone());
    parts
        .headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let answer = match upstreams {
        Upstreams::Raw(pool) => {
            match tokio::time::timeout(settings.upstream_timeout, pool.send(&parts, &body)).await {
                Ok(Ok(response)) => Ok(response.map(|b| Either::Right(Either::Right(b)))),
                Ok(Err(_)) => Err(StatusCode::BAD_GATEWAY),
                Err(_) => Err(StatusCode::GATEWAY_TIMEOUT),
            }
        }
        Upstreams::Pool(pool) => {
            let request = Request::from_parts(parts, Full::new(body));
            match tokio::time::timeout(settings.upstream_timeout, pool.send(request, |_| None))
                .await
            {
                Ok(Ok(response)) => Ok(response.map(Either::Left)),
                Ok(Err(_)) => Err(StatusCode::BAD_GATEWAY),
                Err(_) => Err(StatusCode::GATEWAY_TIMEOUT),
            }
        }
        Upstreams::Inline(pool) => {
            let request = Request::from_parts(parts, Full::new(body));
            match tokio::time::timeout(settings.upstream_timeout, async {
                if sequential {
                    send_inline(pool, kept, request).await
                } else {
                    send_detached(pool, request).await
                }
            })
            .await
            {
                Ok(Ok(response)) => Ok(response.map(|b| Either::Right(Either::Left(b)))),
                Ok(Err(_)) => Err(StatusCode::BAD_GATEWAY),
                Err(_) => Err(StatusCode::GATEWAY_TIMEOUT),
            }
        }
    };
    match answer {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            response
        }
        Err(StatusCode::GATEWAY_TIMEOUT) => error(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout"),
        Err(_) => error(StatusCode::BAD_GATEWAY, "bad_gateway"),
    }
}

fn error(status: StatusCode, code: &'static str) -> Response<BaselineBody> {
    let mut response = Response::new(Either::Right(Either::Right(Full::new(Bytes::from(
        format!("{{\"error\":\"{code}\"}}"),
    )))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---------------------------------------------------------------------------------------------
// Inline driver: the upstream connection runs in the downstream connection's task
// ---------------------------------------------------------------------------------------------

type UpstreamSender = client_http1::SendRequest<Full<Bytes>>;
type UpstreamConnection = client_http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// The upstream connection one downstream connection keeps: its sender while no request is on
/// it, and its `Connection` future, polled by the downstream connection's task.
#[derive(Default)]
struct Kept {
    sender: Option<UpstreamSender>,
    connection: Option<UpstreamConnection>,
    /// The connection is reusable once the current response body ends (false after
    /// `Connection: close`, a broken body, a body dropped early).
    reusable: bool,
}

/// Idle upstream connections of one event loop, not driven by anything while they wait (an
/// idle HTTP/1 client connection has nothing to do but notice the upstream closing it, which
/// is checked with one poll when it is taken).
struct InlinePool {
    idle: Mutex<Vec<IdleConnection>>,
    max_idle: usize,
    idle_timeout: Duration,
    upstream_addr: String,
    connect_timeout: Duration,
}

struct IdleConnection {
    sender: UpstreamSender,
    connection: UpstreamConnection,
    since: Instant,
}

impl InlinePool {
    fn start(settings: &Settings) -> Arc<InlinePool> {
        let pool = Arc::new(InlinePool {
            idle: Mutex::new(Vec::new()),
            max_idle: settings.pool_max_idle,
            idle_timeout: settings.pool_idle_timeout,
            upstream_addr: settings.upstream_addr.clone(),
            connect_timeout: settings.connect_timeout,
        });
        let weak = Arc::downgrade(&pool);
        let period = (settings.pool_idle_timeout / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            loop {
                ticks.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                let now = Instant::now();
                let expired: Vec<IdleConnection> = {
                    let mut idle = pool.idle.lock();
                    let keep_from = idle
                        .iter()
                        .position(|e| now.saturating_duration_since(e.since) < pool.idle_timeout)
                        .unwrap_or(idle.len());
                    idle.drain(..keep_from).collect()
                };
                drop(expired);
            }
        });
        pool
    }

    /// A downstream connection ended: its idle upstream connection (if any) waits here.
    fn give_back(&self, kept: &Mutex<Kept>) {
        let mut kept = kept.lock();
        let (Some(sender), Some(connection)) = (kept.sender.take(), kept.connection.take()) else {
            return;
        };
        if !kept.reusable || !sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(IdleConnection {
                sender,
                connection,
                since: Instant::now(),
            });
        }
    }

    /// The most recently used idle connection still open, if any.
    async fn take(&self) -> Option<(UpstreamSender, UpstreamConnection)> {
        loop {
            let mut entry = {
                let mut idle = self.idle.lock();
                let entry = idle.pop()?;
                if entry.since.elapsed() >= self.idle_timeout {
                    // The rest are older still.
                    idle.clear();
                    return None;
                }
                entry
            };
            // One poll notices an upstream that closed it meanwhile (it then completes).
            let alive = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut entry.connection).poll(cx).is_pending())
            })
            .await;
            if alive && entry.sender.is_ready() {
                return Some((entry.sender, entry.connection));
            }
        }
    }

    async fn connect(&self) -> Result<(UpstreamSender, UpstreamConnection), String> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.upstream_addr.as_str()),
        )
        .await
        .map_err(|_| "connect timeout".to_owned())?
        .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        client_http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Sends on the kept connection (taken from the loop's pool or connected on first use); a
/// kept connection that died before the request was written is replaced once.
async fn send_inline(
    pool: &InlinePool,
    kept: &Arc<Mutex<Kept>>,
    request: Request<Full<Bytes>>,
) -> Result<Response<InlineBody>, String> {
    let (held, busy) = {
        let mut kept = kept.lock();
        (kept.sender.take(), kept.connection.is_some())
    };
    if held.is_none() && busy {
        // Another request is on the kept connection (an HTTP/2 downstream connection sends
        // several at once): this one gets a connection of its own, driven by its own task.
        return send_detached(pool, request).await;
    }
    let (mut sender, reused) = match held {
        Some(mut sender) => {
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout(READY_WAIT, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                (sender, true)
            } else {
                // Still busy (an upstream that answered early and stopped reading) or closed.
                kept.lock().connection = None;
                (install(kept, pool.take_or_connect().await?), true)
            }
        }
        None => {
            let (pair, reused) = match pool.take().await {
                Some(pair) => (pair, true),
                None => (pool.connect().await?, false),
            };
            (install(kept, pair), reused)
        }
    };
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut failed) => match failed.take_message() {
            Some(request) if reused => {
                sender = install(kept, pool.connect().await?);
                sender
                    .try_send_request(request)
                    .await
                    .map_err(|e| e.into_error().to_string())?
            }
            _ => return Err(failed.into_error().to_string()),
        },
    };
    let reusable = !connection_close(response.headers());
    kept.lock().reusable = reusable;
    Ok(response.map(|body| {
        let mut body = InlineBody {
            inner: body,
            give_back: Some((kept.clone(), sender)),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }))
}

/// A request on a connection of its own, closed after its response.
async fn send_detached(
    pool: &InlinePool,
    request: Request<Full<Bytes>>,
) -> Result<Response<InlineBody>, String> {
    let (mut sender, connection) = pool.connect().await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.map(|inner| InlineBody {
        inner,
        give_back: None,
    }))
}

impl InlinePool {
    async fn take_or_connect(&self) -> Result<(UpstreamSender, UpstreamConnection), String> {
        match self.take().await {
            Some(pair) => Ok(pair),
            None => self.connect().await,
        }
    }
}

/// Puts a connection into the downstream connection's slot (its task drives it from now on);
/// returns its sender for this request.
fn install(
    kept: &Mutex<Kept>,
    (sender, connection): (UpstreamSender, UpstreamConnection),
) -> UpstreamSender {
    let mut kept = kept.lock();
    kept.connection = Some(connection);
    kept.reusable = true;
    sender
}

fn connection_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// An upstream response body on a kept connection: at its end the sender goes back to the
/// downstream connection's slot for its next request.
struct InlineBody {
    inner: Incoming,
    give_back: Option<(Arc<Mutex<Kept>>, UpstreamSender)>,
}

impl InlineBody {
    fn release(&mut self) {
        if let Some((kept, sender)) = self.give_back.take() {
            let mut kept = kept.lock();
            if kept.reusable {
                kept.sender = Some(sender);
            } else {
                kept.connection = None;
            }
        }
    }
}

impl Drop for InlineBody {
    fn drop(&mut self) {
        // Dropped before its end: the connection is mid-response and cannot be reused.
        if let Some((kept, _sender)) = self.give_back.take() {
            kept.lock().connection = None;
        }
    }
}

impl Body for InlineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => {
                if let Some((kept, _)) = this.give_back.take() {
                    kept.lock().connection = None;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The downstream connection's server future and its kept upstream connection, polled by one
/// task: upstream first (a response that arrived completes the waiting request), then the
/// server (which may have queued a new request), then upstream again (to write that request
/// at once).
struct DriveTogether<S> {
    server: Pin<Box<S>>,
    kept: Arc<Mutex<Kept>>,
    /// `--inline-polls both`: poll the upstream connection before the server too (a wake-up
    /// by the upstream socket then needs no second pass); `after`: only after it (fewer polls
    /// per wake-up, more wake-ups).
    upstream_first: bool,
}

impl<S, E> Future for DriveTogether<S>
where
    S: Future<Output = Result<(), E>>,
{
    type Output = Result<(), E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.upstream_first {
            self.poll_upstream(cx);
        }
        let served = self.server.as_mut().poll(cx);
        if served.is_pending() {
            self.poll_upstream(cx);
        }
        served
    }
}

impl<S> DriveTogether<S> {
    fn poll_upstream(&self, cx: &mut Context<'_>) {
        let mut kept = self.kept.lock();
        if let Some(connection) = kept.connection.as_mut() {
            if Pin::new(connection).poll(cx).is_ready() {
                // Closed (by either side) or failed: a waiting request sees the error through
                // its response channel.
                kept.connection = None;
                kept.sender = None;
            }
        }
    }
}

//! `countersign-loadgen`: a closed-loop HTTP/1.1 load generator that signs every request with a
//! fresh nonce (wrk cannot sign), and a tiny API server to point it at, with or without the
//! real `VerifyLayer`, so the layer's cost is measured at equal load (bench/verify-api.sh).
//!
//! ```text
//! countersign-loadgen serve --keyring keys.toml --mode verify --port-file port.txt
//! countersign-loadgen load  --keyring keys.toml --url http://127.0.0.1:PORT/api/bench \
//!     --connections 32 --duration 10s [--method POST --body-size 1024] [--user alice]
//! ```
//!
//! `load` prints one JSON line: requests, errors (socket errors and non-2xx answers, by status),
//! seconds, req/s and latency percentiles in ms (from send to the last body byte; signing time
//! is not counted as latency, but it does use the generator's CPU, as it would in a real client).
//! Exit status: 0, 1 when any request failed, 2 for a usage or keyring error.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use countersign::core::{
    EncodedIdentity, Identity, KeyringHandle, Nonce, Policy, Signer, SignerConfig, Verifier,
};
use countersign::layer::{ReadBody, VerifiedIdentity, VerifyLayer};
use countersign::replay::MemoryReplayCache;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower_layer::Layer as _;

#[derive(Debug, Parser)]
#[command(
    name = "countersign-loadgen",
    about = "Signed-request load generator and a bench API with or without the VerifyLayer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send signed requests over N keep-alive connections for a duration; print one JSON line.
    Load(LoadArgs),
    /// Serve a small JSON answer on every path, with or without the VerifyLayer.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Target URL (http only), e.g. http://127.0.0.1:3000/api/bench?x=1.
    #[arg(long)]
    url: String,
    /// Keyring file (the format `countersign keygen` writes); its active key signs.
    #[arg(long)]
    keyring: PathBuf,
    /// Concurrent keep-alive connections, each sending one request at a time.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long to send, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Body size in bytes (a JSON document of exactly this size when >= 11, else zero bytes).
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// User identity to sign into the request (none: a service request without identity).
    #[arg(long)]
    user: Option<String>,
    /// Roles of --user, comma-separated.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Tokio worker threads of the generator (keep it small: it shares the machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Reads the body (within the limit) and answers; checks nothing.
    Plain,
    /// The same handler behind `VerifyLayer` with a `MemoryReplayCache`.
    Verify,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Listen address (port 0: the kernel picks one; see --port-file).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Keyring file the verifier uses (required by --mode verify).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// With or without the VerifyLayer.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Write the bound port to this file once listening (for scripts).
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Largest request body read, in bytes (both modes).
    #[arg(long, default_value_t = 1024 * 1024)]
    body_limit: usize,
    /// Replay cache capacity (verify mode).
    #[arg(long, default_value_t = 10_000_000)]
    replay_max_entries: usize,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Plain mode only: busy-wait this many nanoseconds before answering each request, a
    /// stand-in for per-request work of a known CPU cost (to see what such work costs in this
    /// closed loop, beside what the VerifyLayer costs).
    #[arg(long, default_value_t = 0)]
    spin_ns: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Load(a) => Some(a.threads.max(1)),
        Command::Serve(a) => a.threads,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("countersign-loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Load(args) => runtime.block_on(load(args)),
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("countersign-loadgen: {message}");
    ExitCode::from(2)
}

fn load_keyring(path: &Path) -> Result<KeyringHandle, String> {
    countersign::keyfile::load_keyring(path)
        .map(KeyringHandle::new)
        .map_err(|e| e.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// load

/// What every request of a run looks like before it is signed.
struct RequestTemplate {
    addr: String,
    authority: String,
    path_and_query: String,
    method: Method,
    body: Bytes,
    /// Encoded once: every request carries the same identity.
    identity: Option<EncodedIdentity>,
    signer: Signer,
}

impl RequestTemplate {
    fn signed(&self) -> Result<Request<Full<Bytes>>, String> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path_and_query.as_str())
            .header(HOST, self.authority.as_str());
        if !self.body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let (mut parts, ()) = builder
            .body(())
            .map_err(|e| format!("request: {e}"))?
            .into_parts();
        self.signer
            .sign_encoded(
                &mut parts,
                &self.body,
                self.identity.as_ref(),
                unix_now(),
                &Nonce::random(),
            )
            .map_err(|e| format!("signing: {e}"))?;
        Ok(Request::from_parts(parts, Full::new(self.body.clone())))
    }
}

/// Per-connection tallies, merged at the end.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_insert(0) += 1;
    }
}

fn json_body(size: usize) -> Bytes {
    // {"data":"xxx..."} is 11 bytes of framing around the filler.
    if size < 11 {
        return Bytes::new();
    }
    let mut text = String::with_capacity(size);
    text.push_str("{\"data\":\"");
    text.extend(std::iter::repeat_n('x', size - 11));
    text.push_str("\"}");
    Bytes::from(text)
}

async fn load(args: LoadArgs) -> ExitCode {
    let uri: Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => return usage_error(format!("--url {:?}: {e}", args.url)),
    };
    if uri.scheme_str() != Some("http") {
        return usage_error(format!("--url {:?}: only http:// URLs", args.url));
    }
    let Some(authority) = uri.authority() else {
        return usage_error(format!("--url {:?}: no host", args.url));
    };
    let port = authority.port_u16().unwrap_or(80);
    let duration = match countersign::keyfile::parse_duration(&args.duration) {
        Ok(Some(d)) if !d.is_zero() => d,
        Ok(_) => return usage_error("--duration must be more than zero"),
        Err(e) => return usage_error(format!("--duration: {e}")),
    };
    let method = match Method::from_bytes(args.method.to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => return usage_error(format!("--method {:?} is not a method", args.method)),
    };
    if args.connections == 0 {
        return usage_error("--connections must be at least 1");
    }
    let keyring = match load_keyring(&args.keyring) {
        Ok(k) => k,
        Err(e) => return usage_error(e),
    };
    let template = Arc::new(RequestTemplate {
        addr: format!("{}:{port}", authority.host()),
        authority: authority.as_str().to_owned(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        method,
        body: json_body(args.body_size),
        identity: args
            .user
            .map(|u| EncodedIdentity::new(&Identity::new(u, args.roles))),
        signer: Signer::new(keyring, SignerConfig::default()),
    });
    // Fail fast on a template that cannot be signed, before any connection is made.
    if let Err(e) = template.signed() {
        return usage_error(e);
    }

    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(connection_loop(Arc::clone(&template), deadline)))
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(t) => {
                total.latencies_us.extend(t.latencies_us);
                for (k, v) in t.errors {
                    *total.errors.entry(k).or_insert(0) += v;
                }
            }
            Err(e) => total.error(format!("task: {e}")),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = report_json(&mut total, seconds);
    println!("{report}");
    if total.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One keep-alive connection sending requests back to back until the deadline; reconnects
/// after a connection error (counted).
async fn connection_loop(template: Arc<RequestTemplate>, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    'connect: while Instant::now() < deadline {
        let stream = match tokio::net::TcpStream::connect(&template.addr).await {
            Ok(s) => s,
            Err(e) => {
                tally.error(format!("connect: {}", e.kind()));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(e) => {
                    tally.error(format!("handshake: {e}"));
                    continue;
                }
            };
        let driver = tokio::spawn(connection);
        while Instant::now() < deadline {
            let request = match template.signed() {
                Ok(r) => r,
                Err(e) => {
                    tally.error(e);
                    break 'connect;
                }
            };
            let sent = Instant::now();
            if sender.ready().await.is_err() {
                tally.error("connection closed");
                driver.abort();
                continue 'connect;
            }
            let response = match sender.send_request(request).await {
                Ok(r) => r,
                Err(e) => {
                    tally.error(format!("send: {e}"));
                    driver.abort();
                    continue 'connect;
                }
            };
            let status = response.status();
            if let Err(e) = response.into_body().collect().await {
                tally.error(format!("response body: {e}"));
                driver.abort();
                continue 'connect;
            }
            let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
            tally.latencies_us.push(micros);
            if !status.is_success() {
                tally.error(format!("status {}", status.as_u16()));
            }
        }
        driver.abort();
        break;
    }
    tally
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    f64::from(sorted[index])
}

fn report_json(tally: &mut Tally, seconds: f64) -> String {
    tally.latencies_us.sort_unstable();
    let l = &tally.latencies_us;
    let requests = l.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    let ms = |p: f64| percentile(l, p) / 1000.0;
    let by_kind: serde_json::Map<String, serde_json::Value> = tally
        .errors
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "requests": requests,
        "errors": errors,
        "error_kinds": by_kind,
        "seconds": seconds,
        "rps": if seconds > 0.0 { requests as f64 / seconds } else { 0.0 },
        "p50_ms": ms(50.0),
        "p90_ms": ms(90.0),
        "p99_ms": ms(99.0),
        "max_ms": l.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// serve

const ANSWER_LIMIT_EXCEEDED: &str = "{\"error\":\"body_too_large\"}";

/// The API handler: a small JSON answer naming the verified user (null in plain mode).
#[derive(Clone)]
struct BenchApi;

impl tower_service::Service<Request<Full<Bytes>>> for BenchApi {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(BenchApi::respond(request)))
    }
}

impl BenchApi {
    fn respond(request: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        let user = request
            .extensions()
            .get::<VerifiedIdentity>()
            .and_then(|id| id.user.clone());
        let body = serde_json::json!({"ok": true, "service": "bench-api", "user": user});
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        response.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Plain mode's stand-in for the layer: read the body exactly as `VerifyLayer` does (nothing for
/// a bodiless request, else the layer's own bounded read, `ReadBody`, 413 beyond the limit),
/// then answer. Both
/// modes run behind the same [`HyperAdapter`], so the only difference measured is the layer.
#[derive(Clone)]
struct PlainService {
    body_limit: usize,
    spin: Duration,
}

impl tower_service::Service<Request<Incoming>> for PlainService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = PlainFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> PlainFuture {
        let (parts, body) = request.into_parts();
        if body.is_end_stream() || body.size_hint().exact() == Some(0) {
            return PlainFuture::Answered {
                response: Some(answer(parts, Bytes::new(), self.spin)),
            };
        }
        PlainFuture::Reading {
            read: ReadBody::new(body, self.body_limit),
            parts: Some(parts),
            spin: self.spin,
        }
    }
}

fn answer(parts: http::request::Parts, body: Bytes, spin: Duration) -> Response<Full<Bytes>> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    BenchApi::respond(Request::from_parts(parts, Full::new(body)))
}

pin_project_lite::pin_project! {
    #[project = PlainFutureProj]
    enum PlainFuture {
        Answered { response: Option<Response<Full<Bytes>>> },
        Reading {
            #[pin]
            read: ReadBody<Incoming>,
            parts: Option<http::request::Parts>,
            spin: Duration,
        },
    }
}

impl Future for PlainFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PlainFutureProj::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            PlainFutureProj::Reading { read, parts, spin } => {
                let body = std::task::ready!(read.poll(cx));
                let Some(parts) = parts.take() else {
                    return Poll::Pending;
                };
                Poll::Ready(Ok(match body {
                    Ok(body) => answer(parts, body, *spin),
                    Err(_) => {
                        let mut response = Response::new(Full::new(Bytes::from_static(
                            ANSWER_LIMIT_EXCEEDED.as_bytes(),
                        )));
                        *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                        response
                    }
                }))
            }
        }
    }
}

/// hyper's `Service` over a tower service, for both modes alike (hyper calls through `&self`,
/// tower through `&mut self` after `poll_ready`, so each call drives its own clone). Unboxed:
/// the adapter adds the same small, fixed cost to both modes.
#[derive(Clone)]
struct HyperAdapter<S> {
    inner: S,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for HyperAdapter<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = Oneshot<S>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Oneshot::NotReady {
            service: self.inner.clone(),
            request: Some(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// Polls a service ready, then calls it once.
    #[project = OneshotProj]
    enum Oneshot<S>
    where
        S: tower_service::Service<Request<Incoming>>,
    {
        NotReady { service: S, request: Option<Request<Incoming>> },
        Called { #[pin] future: S::Future },
    }
}

impl<S> Future for Oneshot<S>
where
    S: tower_service::Service<Request<Incoming>>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let future = match self.as_mut().project() {
                OneshotProj::Called { future } => return future.poll(cx),
                OneshotProj::NotReady { service, request } => {
                    std::task::ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        return Poll::Pending;
                    };
                    service.call(request)
                }
            };
            self.set(Oneshot::Called { future });
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return usage_error(format!("--listen {}: {e}", args.listen)),
    };
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return usage_error(format!("--listen {}: {e}", args.listen)),
    };
    match args.mode {
        Mode::Plain => {
            announce(&args, local);
            accept_loop(
                listener,
                HyperAdapter {
                    inner: PlainService {
                        body_limit: args.body_limit,
                        spin: Duration::from_nanos(args.spin_ns),
                    },
                },
            )
            .await
        }
        Mode::Verify => {
            if args.spin_ns > 0 {
                return usage_error("--spin-ns is for --mode plain (it stands in for the layer)");
            }
            let Some(path) = &args.keyring else {
                return usage_error("--mode verify needs --keyring");
            };
            let keyring = match load_keyring(path) {
                Ok(k) => k,
                Err(e) => return usage_error(e),
            };
            let verifier = Verifier::new(keyring, Policy::default());
            let replay = Arc::new(MemoryReplayCache::new(args.replay_max_entries));
            let layer = VerifyLayer::new(verifier, replay).body_limit(args.body_limit);
            announce(&args, local);
            accept_loop(
                listener,
                HyperAdapter {
                    inner: layer.layer(BenchApi),
                },
            )
            .await
        }
    }
}

fn announce(args: &ServeArgs, local: SocketAddr) {
    if let Some(file) = &args.port_file {
        if let Err(e) = std::fs::write(file, format!("{}\n", local.port())) {
            eprintln!(
                "countersign-loadgen: cannot write --port-file {}: {e}",
                file.display()
            );
            std::process::exit(2);
        }
    }
    println!("listening on http://{local} ({:?} mode)", args.mode);
}

async fn accept_loop<S, B>(listener: tokio::net::TcpListener, service: S) -> ExitCode
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("countersign-loadgen: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_has_the_requested_size() {
        assert_eq!(json_body(0).len(), 0);
        assert_eq!(json_body(10).len(), 0);
        assert_eq!(json_body(11).as_ref(), b"{\"data\":\"\"}");
        assert_eq!(json_body(1024).len(), 1024);
        assert_eq!(json_body(65536).len(), 65536);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}

//! The upstream connection pool of one route: HTTP/1.1 keep-alive connections driven by hyper's
//! low-level client (`hyper::client::conn::http1`), without hyper-util's legacy `Client`.
//!
//! Why not the legacy client: it checks a connection out of a shared `Arc<Mutex>` pool, boxes
//! each request future, and spawns a task per response to watch for the connection becoming
//! idle again; on the proxy's hot path (small GETs) that bookkeeping showed in the profile. The
//! proxy runs one single-threaded event loop per core, each with its own forwarder and so its
//! own pools, so the pool here is a plain stack of idle senders behind an uncontended mutex
//! (the mutex only makes the pool `Sync` for the multi-threaded runtimes of `dev` and tests).
//!
//! Life of a connection:
//! - **take**: the most recently used idle sender (LIFO keeps few connections hot and lets the
//!   rest reach the idle timeout); expired or closed ones are dropped on the way. None idle:
//!   connect (TCP with `TCP_NODELAY` and the connect timeout; rustls for `https://`), hand
//!   shake, and spawn the connection's driver task.
//! - **send**: `try_send_request`. When hyper hands the request back unsent (the connection
//!   failed before the request was written: `TrySendError::take_message`), and the connection
//!   came from the pool, the request is sent once more on a *fresh* connection.
//! - **a stale connection** (`stale_after`, the config's `pool_stale_after`): an upstream
//!   closes a keep-alive connection it has left idle for its own keep-alive timeout (Node's and
//!   uvicorn's 5 s, gunicorn's 2 s), and a request written at that moment is lost with it: the
//!   connection closes without a byte of answer. When the connection taken had been idle at
//!   least `stale_after`, the caller is asked for a spare copy of the request, before it is
//!   sent (the request itself is consumed by hyper once written); the forwarder gives one only
//!   for an idempotent method (RFC 9110 §9.2.2). If the connection then closes or resets
//!   before a byte of the answer arrived (its reads are watched: `AnswerSeen`), the spare is
//!   signed again, with a fresh nonce and the time then, and sent once on a fresh connection
//!   (nginx does the same for idempotent requests). An answer cut after its first bytes is
//!   not repeated: the upstream had the request and acted on it. Under load connections are
//!   reused within microseconds, so the spare is never made on the hot path. Any other
//!   failure is final: the request may have reached the upstream, and is never resent.
//! - **refuse**: an answer head the browser must not get (`unusable_answer`: a `101` to a
//!   request that asked for no upgrade, a `Content-Length` beside `Transfer-Encoding`, a
//!   `Transfer-Encoding` other than `chunked`) is a [`PoolError::Answer`] (502) and its
//!   connection is dropped, never given back. A 204 whose head announces a body is passed on
//!   without one, and its connection is not given back either.
//! - **give back**: when the response body has been read to its end ([`UpstreamBody`]), unless
//!   the upstream said `Connection: close`, the pool already holds `max_idle` senders, or the
//!   connection is closed. A body dropped early, a failed body, or a timed-out exchange drops
//!   the sender instead, and hyper closes the connection.
//! - **a quiet answer**: a response body that sends nothing for `body_idle_timeout` while the
//!   proxy waits for it fails ([`UpstreamBodyError`]): the browser sees the answer break, and
//!   the connection is dropped, not pooled. The timer is made only when the body first makes
//!   the proxy wait, so an answer that arrives with its head (most API answers) costs none.
//! - **a cut answer is reported**: a quiet answer cut, or a body whose connection broke after
//!   the head, is counted in the upstream's [`UpstreamBodyErrors`] (shared with `/metrics`)
//!   and logged at WARN, paced, where the error is produced, with the request's id. Nothing
//!   is counted, timed or copied for an answer that is not cut: the body holds the pool's
//!   `Arc` (as it did to give the connection back), and the counters are reached through it;
//!   the id it holds is a reference count on the bytes the upstream request already shares,
//!   boxed so the body stays within 128 bytes (see the size test below).
//! - **a request the upstream stops taking**: a write to the upstream blocked for
//!   `body_idle_timeout` fails (`write_stall.rs`'s `WriteStallLimit`, as the client connections'
//!   `send_timeout`), and the connection with it. hyper goes on writing a request body after
//!   an early answer has ended (the pool has let go of the connection by then), with no
//!   timer of its own: an upstream that stopped reading and kept the connection open held
//!   it, its driver task and the unsent body forever.
//! - **idle timeout**: a sweeper task (one per pool, holding only a weak reference) drops
//!   senders idle longer than the timeout; hyper then closes their connections.
//! - **max lifetime** (`pool_max_lifetime`, nginx's `keepalive_time`): a connection made more
//!   than `max_lifetime` ago is not taken for a new request and not given back after its
//!   exchange (it closes); an exchange in flight is never cut. A connection kept busy never
//!   goes idle, so without this it would live forever: with the client certificate it was
//!   made with (mutual TLS), the address the name resolved to then, and past any age limit
//!   of the upstream. Its deadline is read from the clock once, when it is made; per request
//!   it costs a comparison with the clock reading that taking and giving back already make
//!   (the idle timeout's), no clock read of its own. The sweeper drops idle ones past it too.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tower_service::Service as _;

use super::config::{DEFAULT_MAX_RESPONSE_HEADER_BYTES, DEFAULT_MAX_RESPONSE_HEADER_COUNT};
use super::error::error_chain;
use super::forward::{
    filter_upstream_response, strip_hop_by_hop, LiveConnectTimeout, LiveRouteLimits,
};
use super::metrics::{UpstreamBodyErrorKind, UpstreamBodyErrors};
use super::write_stall::WriteStallLimit;

type Sender = SendRequest<Full<Bytes>>;

/// How long a pooled connection that is not ready at once may take to become ready.
const READY_WAIT: Duration = Duration::from_millis(20);

/// How one route's pool connects and how long it keeps connections.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// `scheme://authority/` of the upstream: what is connected to.
    pub upstream: Uri,
    /// Idle senders kept (0: a connection per request).
    pub max_idle: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// How long after it is made a connection stops being reused (None: no limit).
    pub max_lifetime: Option<Duration>,
    /// The longest a response body may send nothing while it is waited for, and a write to
    /// the upstream may stay blocked (unless `live_limits` is given).
    pub body_idle_timeout: Duration,
    /// The route's live limits, which a reload sets: each connection made takes its write
    /// limit from their `body_idle_timeout` then (one `arc_swap` load per connection made,
    /// none per request), as the connector takes its `connect_timeout`. A pooled connection
    /// keeps the limit it was made with. None: `body_idle_timeout` above, always.
    pub live_limits: Option<LiveRouteLimits>,
    /// Most header fields in an answer head (`max_response_header_count`); more: 502.
    pub max_response_header_count: usize,
    /// Largest answer head, status line included (`max_response_header_bytes`, at least
    /// 8 KiB); larger: 502.
    pub max_response_header_bytes: usize,
    /// A pooled connection idle at least this long may have been closed by the upstream's
    /// keep-alive timeout: a request sent on it gets a spare (see [`UpstreamPool::send`]).
    /// None: never (`pool_stale_after = "off"`).
    pub stale_after: Option<Duration>,
    /// Bounds a connection attempt as a whole (TCP connect, TLS handshake and HTTP/1
    /// handshake); past it the attempt fails ([`PoolError::Connect`]) and its socket closes.
    /// None: only the connector's own timeout (the TCP connect), as for the routes, whose
    /// handshake the request's `timeout` bounds.
    pub whole_connect_timeout: Option<Duration>,
}

/// Why an exchange with the upstream failed (all map to 502; the route timeout, 504, is the
/// caller's).
#[derive(Debug)]
pub enum PoolError {
    /// No connection: refused, unreachable, connect timeout, TLS handshake failed.
    Connect(String),
    /// The connection failed during the exchange (the request may have been received).
    Exchange(hyper::Error),
    /// The answer's head cannot be passed on (`unusable_answer` says why); its connection
    /// is closed.
    Answer(&'static str),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(why) => write!(f, "connecting: {why}"),
            PoolError::Exchange(e) => f.write_str(&error_chain(e)),
            PoolError::Answer(why) => f.write_str(why),
        }
    }
}

/// A connection's sender and what the pool knows of the connection. The state is behind one
/// `Arc` (8 bytes), shared with the connection's reader: an answer's body holds a `Pooled`
/// until it gives the connection back, and kept inline the state would take the body past
/// 128 bytes (`the_body_grows_only_as_stated`).
struct Pooled {
    sender: Sender,
    state: Arc<ConnectionState>,
}

/// What the pool knows of one connection.
struct ConnectionState {
    /// When it stops being reused (its deadline: when it was made plus `max_lifetime`; None
    /// without a limit).
    expires: Option<Instant>,
    /// Set by the connection's reader whenever it reads bytes ([`AnswerSeen`]); cleared before
    /// a request with a spare is sent, so that a lost exchange tells whether any of the answer
    /// had arrived.
    answered: AtomicBool,
}

impl Pooled {
    /// True once the connection has reached its `max_lifetime`: not to be reused.
    #[inline]
    fn expired(&self, now: Instant) -> bool {
        self.state.expires.is_some_and(|deadline| now >= deadline)
    }
}

struct IdleSender {
    pooled: Pooled,
    since: Instant,
}

struct Shared {
    settings: PoolSettings,
    /// This upstream's answers cut after their head (shared with the metrics and the other
    /// threads' pools of the same upstream).
    body_errors: Arc<UpstreamBodyErrors>,
    connector: HttpsConnector<LiveConnectTimeout>,
    handshake: http1::Builder,
    /// Idle senders, oldest first.
    idle: Mutex<Vec<IdleSender>>,
}

/// One route's pool. Cheap to clone (shared).
#[derive(Clone)]
pub struct UpstreamPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("upstream", &self.shared.settings.upstream)
            .field("max_idle", &self.shared.settings.max_idle)
            .field("idle_timeout", &self.shared.settings.idle_timeout)
            .field("max_lifetime", &self.shared.settings.max_lifetime)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl UpstreamPool {
    /// A pool connecting through `connector` (which carries the connect timeout, read at each
    /// connection made, TCP_NODELAY and the TLS settings). Inside a tokio runtime, starts the idle sweeper on it. Answers
    /// cut after their head are logged (naming the upstream by its URI) and counted nowhere:
    /// [`UpstreamPool::reporting_to`] counts them.
    pub fn new(
        settings: PoolSettings,
        connector: HttpsConnector<LiveConnectTimeout>,
    ) -> UpstreamPool {
        let body_errors = Arc::new(UpstreamBodyErrors::new(settings.upstream.to_string()));
        UpstreamPool::reporting_to(settings, connector, body_errors)
    }

    /// [`UpstreamPool::new`], counting answers cut after their head in `body_errors` (the
    /// upstream's, from [`super::metrics::Metrics::upstream_body_errors`]; its name is the one
    /// logged).
    pub fn reporting_to(
        settings: PoolSettings,
        connector: HttpsConnector<LiveConnectTimeout>,
        body_errors: Arc<UpstreamBodyErrors>,
    ) -> UpstreamPool {
        // The head limits are keys (`max_response_header_count`, `_bytes`), not hyper's
        // defaults: an upstream whose answers carry more than 100 fields was a 502 no setting
        // could lift. Each is set only when it is not hyper's default: a `max_headers` of
        // any value makes hyper parse every head into a heap allocation (about 5% per
        // answer, hyper's docs), where its default of 100 uses the stack. A head larger
        // than the read buffer's limit (hyper's default, 408 KiB) also needs the buffer
        // raised, which never goes below the 8 KiB hyper panics under.
        let mut handshake = http1::Builder::new();
        if settings.max_response_header_count != DEFAULT_MAX_RESPONSE_HEADER_COUNT {
            handshake.max_headers(settings.max_response_header_count.max(1));
        }
        let head_bytes = settings.max_response_header_bytes;
        if head_bytes != DEFAULT_MAX_RESPONSE_HEADER_BYTES {
            handshake.max_header_size(head_bytes);
            if head_bytes > DEFAULT_MAX_RESPONSE_HEADER_BYTES {
                handshake.max_buf_size(head_bytes);
            }
        }
        let shared = Arc::new(Shared {
            settings,
            body_errors,
            connector,
            handshake,
            idle: Mutex::new(Vec::new()),
        });
        if shared.settings.max_idle > 0 {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep_idle(Arc::downgrade(&shared)));
            }
        }
        UpstreamPool { shared }
    }

    /// Idle connections currently pooled.
    pub fn idle_count(&self) -> usize {
        self.shared.idle.lock().len()
    }

    /// Sends `request` (origin-form URI, `Host` set) and returns the response with its body
    /// streaming; the connection returns to the pool when that body ends.
    ///
    /// `spare` is called, before `request` is sent, only when the connection taken from the
    /// pool had been idle at least `stale_after`. What it returns makes a copy of the request
    /// (signed anew, when it is called: its `created` is the time it is sent), which is sent
    /// once on a fresh connection if this one closes, resets or refuses the write before a
    /// byte of the answer arrived (RFC 9110 section 9.2.2: an idempotent request may be
    /// repeated after a failure "before the client is able to read the server's response";
    /// an answer cut after its first bytes is the upstream's, and is not repeated). `None`:
    /// the request is never resent.
    pub async fn send<'a>(
        &self,
        request: Request<Full<Bytes>>,
        spare: impl FnOnce(&Request<Full<Bytes>>) -> Option<SpareRequest<'a>>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let (mut pooled, reused, spare) = match self.take_idle().await {
            Some((pooled, idle_for)) => {
                let stale = (self.shared.settings.stale_after).is_some_and(|s| idle_for >= s);
                let spare = if stale { spare(&request) } else { None };
                if spare.is_some() {
                    pooled.state.answered.store(false, Ordering::Relaxed);
                }
                (pooled, true, spare)
            }
            // Boxed: connecting (TLS handshake included) is rare and its future is large;
            // inline it would be copied with every request's future.
            None => (Box::pin(self.connect()).await?, false, None),
        };
        let response = match pooled.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // Handed back unsent: the pooled connection died before a byte of this
                // request was written, so nothing reached the upstream. Once, on a fresh
                // connection (a second failure there is the upstream's, not staleness).
                Some(request) if reused => {
                    pooled = Box::pin(self.connect()).await?;
                    pooled
                        .sender
                        .try_send_request(request)
                        .await
                        .map_err(|e| PoolError::Exchange(e.into_error()))?
                }
                _ => {
                    let error = failed.into_error();
                    match spare {
                        Some(spare)
                            if lost_with_a_stale_connection(&error)
                                && !pooled.state.answered.load(Ordering::Relaxed) =>
                        {
                            let (fresh, response) = Box::pin(self.resend(spare, error)).await?;
                            pooled = fresh;
                            response
                        }
                        _ => return Err(PoolError::Exchange(error)),
                    }
                }
            },
        };
        // Refused before its body is made, so the connection is never given back: dropped
        // here, hyper closes it (the rest of such an answer is not to be read as the next).
        if let Some(why) = unusable_answer(&response, false) {
            return Err(PoolError::Answer(why));
        }
        let reusable =
            !connection_close(response.headers()) && !no_content_announcing_a_body(&response);
        Ok(response.map(|body| {
            let mut body = UpstreamBody {
                inner: body,
                pool: self.shared.clone(),
                sender: reusable.then_some(pooled),
                quiet: None,
                waiting: false,
                idle_limit: IdleLimit::new(self.shared.settings.body_idle_timeout),
                request_id: None,
            };
            // hyper's server never polls a body that is already at its end (HEAD, 204, 304,
            // `Content-Length: 0`), so that case is settled here.
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        }))
    }

    /// Sends a WebSocket handshake on a connection of its own (never pooled: once upgraded it
    /// belongs to that WebSocket) and returns the upstream's answer. Its connection is driven
    /// with upgrades on, so a `101` answer can be taken over with `hyper::upgrade::on`; any
    /// other answer closes the connection once its body is read or dropped.
    pub async fn send_upgrade(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut connector = self.shared.connector.clone();
        let io = connector
            .call(self.shared.settings.upstream.clone())
            .await
            .map_err(|e| PoolError::Connect(error_chain(&*e)))?;
        let (mut sender, connection) = self
            .shared
            .handshake
            .handshake::<_, Full<Bytes>>(io)
            .await
            .map_err(|e| PoolError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("upstream WebSocket handshake connection ended: {e}");
            }
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(PoolError::Exchange)?;
        match unusable_answer(&response, true) {
            Some(why) => Err(PoolError::Answer(why)),
            None => Ok(response),
        }
    }

    /// The most recently used live idle sender, ready for a request, and how long it had been
    /// idle; None when there is none.
    async fn take_idle(&self) -> Option<(Pooled, Duration)> {
        loop {
            let (mut pooled, idle_for) = self.pop_idle()?;
            if pooled.sender.is_ready() {
                return Some((pooled, idle_for));
            }
            // Given back at the end of its response body, the connection's driver may not
            // have run since (on a multi-threaded runtime); `ready` then resolves on its next
            // poll, or fails when the connection is closed. A connection still busy after
            // that short wait (an upstream that answered before reading the whole request
            // body and stopped reading) is dropped, so a request never waits on it; the next
            // idle one is tried.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, pooled.sender.ready()).await {
                return Some((pooled, idle_for));
            }
        }
    }

    fn pop_idle(&self) -> Option<(Pooled, Duration)> {
        // The one clock reading of taking: the idle timeout's, the max lifetime's and the
        // staleness's.
        let now = Instant::now();
        let timeout = self.shared.settings.idle_timeout;
        let mut idle = self.shared.idle.lock();
        while let Some(entry) = idle.pop() {
            let idle_for = now.saturating_duration_since(entry.since);
            if idle_for >= timeout {
                // The rest are older still: all expired.
                idle.clear();
                return None;
            }
            // Past its max lifetime: dropped (it closes), the next one is tried.
            if !entry.pooled.expired(now) && !entry.pooled.sender.is_closed() {
                return Some((entry.pooled, idle_for));
            }
        }
        None
    }

    /// Sends `spare` on a fresh connection after the stale one it was meant for closed
    /// without an answer (`lost`, logged, and counted in the upstream's
    /// `countersign_upstream_resends_total`: they tell the operator the pool keeps connections
    /// longer than the upstream does). A failure here is final.
    async fn resend(
        &self,
        spare: SpareRequest<'_>,
        lost: hyper::Error,
    ) -> Result<(Pooled, Response<hyper::body::Incoming>), PoolError> {
        // Connected first: the count and the line say the request was sent again, which a
        // connection that cannot be made (the upstream gone) does not do; that failure is the
        // 502's, logged as any connect error. Signed once connected, so dated when it is sent.
        let mut pooled = self.connect().await?;
        let Some(spare) = spare() else {
            return Err(PoolError::Exchange(lost));
        };
        self.shared.body_errors.record_resend();
        // The spare carries the request's id (`X-Request-Id`, sent to every upstream), so the
        // line can be matched with the request's access line and the API's logs.
        let request_id = spare
            .headers()
            .get(super::forward::X_REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        tracing::info!(
            request_id,
            upstream = self.shared.body_errors.upstream(),
            method = spare.method().as_str(),
            error = error_chain(&lost).as_str(),
            "a pooled upstream connection closed without answering (the upstream's keep-alive \
             timeout is likely shorter than pool_idle_timeout); the request was signed again \
             and sent once on a new connection"
        );
        let response = pooled
            .sender
            .try_send_request(spare)
            .await
            .map_err(|e| PoolError::Exchange(e.into_error()))?;
        Ok((pooled, response))
    }

    async fn connect(&self) -> Result<Pooled, PoolError> {
        match self.shared.settings.whole_connect_timeout {
            Some(limit) => tokio::time::timeout(limit, self.connect_unbounded())
                .await
                .map_err(|_| {
                    PoolError::Connect(format!(
                        "no connection (TCP connect and TLS handshake) within the connect \
                         timeout ({} ms)",
                        limit.as_millis()
                    ))
                })?,
            None => self.connect_unbounded().await,
        }
    }

    /// [`connect`](Self::connect) without the whole attempt's timeout.
    async fn connect_unbounded(&self) -> Result<Pooled, PoolError> {
        let mut connector = self.shared.connector.clone();
        let io = connector
            .call(self.shared.settings.upstream.clone())
            .await
            .map_err(|e| PoolError::Connect(error_chain(&*e)))?;
        // A write the upstream leaves blocked for `body_idle_timeout` fails, and the
        // connection with it: hyper goes on writing a request body after an early answer, when
        // the pool has let go of the connection, and has no timer of its own.
        let write_limit = match &self.shared.settings.live_limits {
            Some(live) => live.get().body_idle_timeout,
            None => self.shared.settings.body_idle_timeout,
        };
        // The only clock reading the max lifetime adds: one per connection made. Beyond what
        // an `Instant` can hold (not with durations bounded to 365 days): no limit.
        let state = Arc::new(ConnectionState {
            expires: (self.shared.settings.max_lifetime)
                .and_then(|lifetime| Instant::now().checked_add(lifetime)),
            answered: AtomicBool::new(false),
        });
        let io = TokioIo::new(AnswerSeen {
            io: TokioIo::new(WriteStallLimit::new(io, write_limit)),
            state: Arc::clone(&state),
        });
        let (sender, connection) = self
            .shared
            .handshake
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(error_chain(&e)))?;
        // The driver ends when the connection closes or every sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(Pooled { sender, state })
    }
}

/// A spare copy of a request for [`UpstreamPool::send`], made (and signed) only when it is
/// sent; `None` if it cannot be (then the request is not resent).
pub type SpareRequest<'a> = Box<dyn FnOnce() -> Option<Request<Full<Bytes>>> + Send + 'a>;

/// A pooled connection's I/O, above TLS (the bytes hyper reads): sets `answered` whenever a
/// read returns bytes, so that a request lost with a stale connection is resent only when
/// nothing of its answer arrived (`ConnectionState::answered`). A relaxed store per read that
/// returns bytes; hyper-util's `TokioIo` adapts it to and from hyper's I/O traits, without a
/// copy.
struct AnswerSeen<I> {
    io: I,
    state: Arc<ConnectionState>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AnswerSeen<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.answered.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AnswerSeen<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Shared {
    fn give_back(&self, pooled: Pooled) {
        if self.settings.max_idle == 0 || pooled.sender.is_closed() {
            return;
        }
        // The idle timeout's clock reading, which the max lifetime shares: a connection past
        // it is dropped (hyper closes it) instead of pooled.
        let since = Instant::now();
        if pooled.expired(since) {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.settings.max_idle {
            idle.push(IdleSender { pooled, since });
        }
    }

    /// Drops the senders idle for longer than the timeout, and the idle ones past their max
    /// lifetime (their connections close).
    fn drop_expired(&self, now: Instant) {
        let timeout = self.settings.idle_timeout;
        let (expired, past_lifetime): (Vec<IdleSender>, Vec<IdleSender>) = {
            let mut idle = self.idle.lock();
            // Oldest first: the expired ones are a prefix.
            let keep_from = idle
                .iter()
                .position(|e| now.saturating_duration_since(e.since) < timeout)
                .unwrap_or(idle.len());
            let expired = idle.drain(..keep_from).collect();
            // Not ordered by age (an entry's place is when it last went idle): a scan, and
            // a split, order kept, only when one is past its lifetime.
            let past_lifetime = if idle.iter().any(|e| e.pooled.expired(now)) {
                let (past, keep) = idle.drain(..).partition(|e| e.pooled.expired(now));
                *idle = keep;
                past
            } else {
                Vec::new()
            };
            (expired, past_lifetime)
        };
        // Dropped outside the lock.
        drop((expired, past_lifetime));
    }
}

/// Closes idle connections within a quarter of the idle timeout (or of the max lifetime, when
/// shorter) after it passes; ends with the pool.
async fn sweep_idle(pool: Weak<Shared>) {
    let period = match pool.upgrade() {
        Some(shared) => {
            let settings = &shared.settings;
            let shortest = (settings.max_lifetime)
                .map_or(settings.idle_timeout, |l| l.min(settings.idle_timeout));
            (shortest / 4).max(Duration::from_millis(10))
        }
        None => return,
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = pool.upgrade() else { return };
        shared.drop_expired(Instant::now());
    }
}

/// Whether `error` is what a connection closed by the upstream under a request looks like:
/// the connection ended (or was reset, or refused the write) before a complete answer head.
/// Not a timeout, not a malformed or refused answer (those come from an upstream that is
/// there and answering: sending again would not help and could repeat an effect).
fn lost_with_a_stale_connection(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    false
}

/// Why an upstream's answer head must not reach the browser, if it must not (then 502, and
/// the connection is closed). Cheap checks on every answer, no header scan in the common
/// case (an answer of known length):
/// - a `101 Switching Protocols` to a request that asked for no upgrade (`upgrade: false`;
///   hyper passes other 1xx on to nobody: `100 Continue`, `103 Early Hints` are dropped
///   before the final answer): the browser would get a protocol switch it never asked for,
///   without the `Upgrade` field (hop-by-hop, removed), which it cannot follow;
/// - a `Content-Length` on an answer whose body is framed otherwise (`Transfer-Encoding`:
///   hyper then reads the chunks, so the body's size is not known in advance). RFC 9112
///   §6.3: such a message is a smuggling or response-splitting attempt, to be handled as an
///   error. Passed on, the browser got the length field beside a body of another length:
///   hyper's server trusts the field and cut the body at it, a clean, complete-looking
///   answer with part of the body (and in debug builds a length that disagrees with a
///   re-read body panicked in hyper);
/// - a `Transfer-Encoding` other than exactly `chunked` as hyper decodes it (`gzip, chunked`,
///   or a coding hyper reads to the close: `gzip`, or `chunked,` whose last element is
///   empty): the field is hop-by-hop and removed, so the browser would get the still-encoded
///   bytes (or the chunk framing itself) as the content. nginx answers 502 too.
fn unusable_answer<B: Body>(response: &Response<B>, upgrade: bool) -> Option<&'static str> {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS && !upgrade {
        return Some("answered 101 Switching Protocols to a request that asked for no upgrade");
    }
    // A body whose length hyper knows (from `Content-Length`, or none at all: HEAD, 204,
    // 304) has an exact size; only then is checking the headers needed.
    if response.body().size_hint().exact().is_none()
        && response
            .headers()
            .contains_key(http::header::CONTENT_LENGTH)
    {
        return Some(
            "answered with both Content-Length and Transfer-Encoding (RFC 9112 section 6.3: \
             a smuggling or response-splitting attempt)",
        );
    }
    if response.body().size_hint().exact().is_none() && !plainly_chunked(response.headers()) {
        return Some(
            "answered with a Transfer-Encoding other than `chunked` (the field is hop-by-hop \
             and removed, so the client would get encoded bytes it cannot decode)",
        );
    }
    None
}

/// True when the answer has no `Transfer-Encoding`, or exactly `chunked` (one coding, in any
/// case) as hyper's client decodes it: the only framing whose decoded bytes are the content
/// itself. nginx refuses the others the same way.
///
/// hyper decodes chunks only when the last element (trimmed) of the last `Transfer-Encoding`
/// line is `chunked` (`headers.rs`, `is_chunked_`); anything else it reads to the close,
/// un-decoded. So `chunked,`, `chunked ,` or a second line `chunked,` (a last element that
/// is empty) is refused here: passed on, the browser got the chunk framing itself as the
/// content. Empty elements before it are ignored (RFC 9110 §5.6.1, and hyper still decodes
/// `, chunked`); any other coding anywhere is refused.
pub(crate) fn plainly_chunked(headers: &http::HeaderMap) -> bool {
    let lines = headers.get_all(http::header::TRANSFER_ENCODING);
    let Some(last) = lines.iter().next_back() else {
        return true;
    };
    // hyper's test, as it makes it: a line that is not visible ASCII is not chunked.
    let decoded_as_chunks = last
        .to_str()
        .ok()
        .and_then(|line| line.rsplit(',').next())
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
    decoded_as_chunks
        && lines
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .filter(|coding| !coding.trim_ascii().is_empty())
            .count()
            == 1
}

/// A 204 whose head announces a body (`Content-Length` above 0, or `Transfer-Encoding`):
/// hyper reads no body after a 204, so those bytes, if they come, would be read as the
/// answer to the connection's next request. Such a connection is not pooled. (A 304's or a
/// HEAD answer's `Content-Length` describes the representation, not bytes on the wire.)
fn no_content_announcing_a_body<B>(response: &Response<B>) -> bool {
    if response.status() != http::StatusCode::NO_CONTENT {
        return false;
    }
    let headers = response.headers();
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|length| length.as_bytes().iter().any(|&b| b != b'0' && b != b' '))
}

/// True when the upstream announced it closes the connection after this response.
fn connection_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// An upstream response body, its data streamed through untouched (its trailers, if any,
/// cleaned as the head is: `trailers_for_the_browser`); when it has been read to its end
/// the connection goes back to its pool. One that makes the proxy wait for `body_idle_timeout`
/// without sending anything fails instead. A failure is counted in the upstream's
/// [`UpstreamBodyErrors`] and logged (paced) where it is made.
pub struct UpstreamBody {
    inner: Incoming,
    /// The pool: where the connection goes back, `body_idle_timeout`, the error counters.
    pool: Arc<Shared>,
    /// The connection, while it may still go back to the pool (not after `Connection: close`,
    /// a failure, or once given back), with its max-lifetime deadline.
    sender: Option<Pooled>,
    /// Made the first time the body makes the proxy wait (an answer that arrives whole with
    /// its head never needs one), then reset at each wait that follows a frame.
    quiet: Option<QuietClock>,
    /// Whether `quiet` is running for the current wait.
    waiting: bool,
    /// `body_idle_timeout` for this answer: the pool's, or the route's as the request read
    /// it when it started ([`UpstreamBody::set_idle_timeout`]; a reload may change it). 32
    /// bits, which fit beside `waiting`: the body stays at 128 bytes.
    idle_limit: IdleLimit,
    /// The request's id (`X-Request-Id`), for the line of a cut answer
    /// ([`UpstreamBody::keep_request_id`]); None when the caller set none (logged as `-`).
    request_id: Option<Box<HeaderValue>>,
}

/// A `body_idle_timeout` in 32 bits: milliseconds below 2^31 (24.8 days, exact), else whole
/// seconds with the top bit set (up to 68 years; the config allows 365 days). Only a limit
/// above 24.8 days that is not whole seconds loses its milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IdleLimit(u32);

impl IdleLimit {
    const SECONDS: u32 = 1 << 31;

    fn new(limit: Duration) -> IdleLimit {
        match u32::try_from(limit.as_millis()) {
            Ok(ms) if ms < Self::SECONDS => IdleLimit(ms),
            _ => IdleLimit(
                Self::SECONDS
                    | u32::try_from(limit.as_secs())
                        .unwrap_or(u32::MAX)
                        .min(Self::SECONDS - 1),
            ),
        }
    }

    fn get(self) -> Duration {
        if self.0 & Self::SECONDS == 0 {
            Duration::from_millis(u64::from(self.0))
        } else {
            Duration::from_secs(u64::from(self.0 & !Self::SECONDS))
        }
    }
}

/// The `body_idle_timeout` timer and when it was made: the first time the body made the proxy
/// wait, normally right after the head. That instant is what a cut answer's log line counts
/// its streaming time from: it costs no clock read beyond the one the timer needs, where a
/// start time taken for every answer would cost one per request.
struct QuietClock {
    timer: Pin<Box<tokio::time::Sleep>>,
    since: tokio::time::Instant,
}

/// Why an upstream response body failed: the connection broke, or the upstream sent nothing
/// for `body_idle_timeout`.
#[derive(Debug)]
pub struct UpstreamBodyError {
    kind: BodyErrorKind,
}

#[derive(Debug)]
enum BodyErrorKind {
    Broken(hyper::Error),
    Quiet(Duration),
}

impl std::fmt::Display for UpstreamBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            BodyErrorKind::Broken(e) => write!(f, "upstream body: {}", error_chain(e)),
            BodyErrorKind::Quiet(limit) => write!(
                f,
                "upstream body: nothing received for {limit:?} (body_idle_timeout)"
            ),
        }
    }
}

impl std::error::Error for UpstreamBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            BodyErrorKind::Broken(e) => Some(e),
            BodyErrorKind::Quiet(_) => None,
        }
    }
}

impl UpstreamBodyError {
    /// True when the upstream sent nothing for `body_idle_timeout` (else its connection broke).
    pub fn is_idle_timeout(&self) -> bool {
        matches!(self.kind, BodyErrorKind::Quiet(_))
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("inner", &self.inner)
            .field("pooled", &self.sender.is_some())
            .finish()
    }
}

impl UpstreamBody {
    /// Keeps the request's id (`X-Request-Id`, the one sent upstream and to the client) for
    /// the log line of a cut answer. Pass a clone of the id the upstream request's header
    /// was cloned from: that first clone made its bytes shared (a generated id's bytes are
    /// copied into a buffer of their own, promoted to a reference-counted one on its first
    /// clone), so this one costs an atomic increment and the box that keeps the body small.
    #[inline]
    pub fn keep_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(Box::new(id));
    }

    /// Sets this answer's `body_idle_timeout` (the route's as its request read it when it
    /// started; without it, the pool's).
    #[inline]
    pub fn set_idle_timeout(&mut self, limit: Duration) {
        self.idle_limit = IdleLimit::new(limit);
    }

    /// The body has nothing yet: the quiet clock runs (started, or restarted after a frame);
    /// once it has run for `body_idle_timeout` the body fails and its connection is dropped.
    /// Only waits for the upstream count: while the client is slow to take bytes the body is
    /// not polled (that is `send_timeout`'s).
    fn wait_quietly(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let limit = self.idle_limit.get();
        let quiet = match &mut self.quiet {
            Some(quiet) => {
                if !self.waiting {
                    quiet
                        .timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limit);
                }
                quiet
            }
            None => {
                let since = tokio::time::Instant::now();
                self.quiet.insert(QuietClock {
                    timer: Box::pin(tokio::time::sleep_until(since + limit)),
                    since,
                })
            }
        };
        self.waiting = true;
        match quiet.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(self.fail(BodyErrorKind::Quiet(limit))))),
        }
    }

    fn release(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.give_back(sender);
        }
    }

    /// The body failed: its connection is not reused (dropping the sender closes it), and the
    /// failure is reported.
    fn fail(&mut self, kind: BodyErrorKind) -> UpstreamBodyError {
        self.sender = None;
        let error = UpstreamBodyError { kind };
        self.report(&error);
        error
    }

    /// Counts a cut answer in its upstream's counters and logs it at WARN, at most one line
    /// per upstream and kind every 10 s (a misbehaving upstream can cut thousands a second);
    /// the line's `suppressed` counts the cuts not logged since the previous one, which the
    /// counter has all. Each line (the DEBUG ones of the cuts not logged at WARN too) carries
    /// the request's `request_id`, as its access line and the upstream's request do.
    #[cold]
    #[inline(never)]
    fn report(&self, error: &UpstreamBodyError) {
        let errors = &self.pool.body_errors;
        let kind = match error.kind {
            BodyErrorKind::Quiet(_) => UpstreamBodyErrorKind::IdleTimeout,
            BodyErrorKind::Broken(_) => UpstreamBodyErrorKind::Broken,
        };
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        let Some(suppressed) = errors.record(kind) else {
            tracing::debug!(
                request_id,
                upstream = errors.upstream(),
                kind = kind.label(),
                "{error}"
            );
            return;
        };
        // From the first wait for the body (normally right after the head); 0 when the body
        // broke before the proxy ever waited for it.
        let streamed_ms = self
            .quiet
            .as_ref()
            .map_or(0, |q| q.since.elapsed().as_millis());
        let body_idle_timeout_ms = self.idle_limit.get().as_millis();
        let detail = error.to_string();
        tracing::warn!(
            request_id,
            upstream = errors.upstream(),
            kind = kind.label(),
            streamed_ms = u64::try_from(streamed_ms).unwrap_or(u64::MAX),
            body_idle_timeout_ms = u64::try_from(body_idle_timeout_ms).unwrap_or(u64::MAX),
            suppressed,
            error = detail.as_str(),
            "upstream answer cut after its head (the client saw it break); further cuts of \
             this upstream and kind are logged at most every 10 s, `suppressed` counts those \
             since the last line"
        );
    }
}

/// An upstream's trailers as the browser may get them (the trailers frame in, None when
/// nothing is left: the body then simply ends). The head's hygiene, which `forward.rs` applies
/// to the head only, applied to them too:
/// - the hop-by-hop fields ([`strip_hop_by_hop`]): over HTTP/2 hyper hands trailers to h2's
///   `send_trailers`, which refuses a connection-specific field (`Connection`, `Keep-Alive`,
///   `Transfer-Encoding`, `Upgrade`, a `TE` other than `trailers`) and resets the stream
///   after its data, so the browser's fetch failed where the same answer over HTTP/1.1
///   (hyper drops trailers there) worked;
/// - what the browser never gets from an upstream ([`filter_upstream_response`]), and every
///   `Set-Cookie`: a cookie is a response control, never valid in trailers (RFC 9110
///   §6.5.1), so none is lost; and so the body need not hold the session cookie's name,
///   which the head's filter compares with (it stays within 128 bytes: the size test
///   below).
///
/// Data frames never come here: trailers are at most one frame per answer.
fn trailers_for_the_browser(frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
    let mut trailers = match frame.into_trailers() {
        Ok(trailers) => trailers,
        Err(frame) => return Some(frame),
    };
    strip_hop_by_hop(&mut trailers);
    trailers.remove(http::header::SET_COOKIE);
    // No `Set-Cookie` is left, so the filter compares no cookie name.
    filter_upstream_response(&mut trailers, "");
    (!trailers.is_empty()).then(|| Frame::trailers(trailers))
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                // Trailers are a chunked body's last frame, and hyper's server stops polling
                // once it has them: released here, or the connection would close on drop.
                if frame.is_trailers() {
                    this.release();
                    return Poll::Ready(trailers_for_the_browser(frame).map(Ok));
                }
                if this.inner.is_end_stream() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(this.fail(BodyErrorKind::Broken(e)))))
            }
            Poll::Pending => this.wait_quietly(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reporting cut answers added nothing to a body: the pool's `Arc` it holds replaced the
    /// one it held to give its connection back, and the first-wait instant took the place of
    /// the idle limit (now read through that `Arc`, on the waiting path only). 104 bytes
    /// before the counters, 104 after (hyper 1, 64-bit). `pool_max_lifetime` added the
    /// connection's deadline (an `Option<Instant>`, 16 bytes) to the sender the body holds
    /// until it gives the connection back: 120. The request id of a cut answer's line is a
    /// boxed `HeaderValue` (8 bytes): 128. Held inline (40 bytes, 160 in all) it went past
    /// 128 bytes, the largest move LLVM writes inline on x86-64, so every move of a body
    /// called `memcpy`: +423 instructions per proxied GET under callgrind, against +140 for
    /// the box's allocation and free (fourteenth round, docs/BENCHMARKS.md). The connection's
    /// deadline and the flag of an answer begun (a stale connection's resend) went behind one
    /// `Arc`, `ConnectionState`: 120 (the flag beside the inline deadline made 136).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_body_grows_only_as_stated() {
        assert_eq!(std::mem::size_of::<UpstreamBody>(), 120);
    }

    /// An answer's `body_idle_timeout` (live, from its request's start) kept in 32 bits:
    /// exact in milliseconds up to 24.8 days, whole seconds beyond, up to the config's 365d.
    #[test]
    fn an_idle_limit_keeps_its_value() {
        for limit in [
            Duration::from_millis(1),
            Duration::from_millis(1500),
            Duration::from_secs(60),
            Duration::from_millis((1 << 31) - 1),
            Duration::from_secs(30 * 86400),
            Duration::from_secs(365 * 86400),
        ] {
            assert_eq!(IdleLimit::new(limit).get(), limit, "{limit:?}");
        }
        assert_eq!(
            IdleLimit::new(Duration::from_millis(30 * 86_400_000 + 5)).get(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(
            IdleLimit::new(Duration::MAX).get(),
            Duration::from_secs(u64::from(IdleLimit::SECONDS - 1))
        );
    }
}

//! WebSocket proxying on the routes that allow it (`[[upstream]] websocket = true`).
//!
//! What is signed and what is not: the handshake (an HTTP/1.1 `GET` with `Upgrade: websocket`)
//! goes through the same checks and gets the same signature as any request: session, header
//! hygiene, the user's identity, a fresh nonce. The upstream's `VerifyLayer` checks it like
//! any request, so only a handshake the proxy made for a logged-in user is accepted, once.
//! The messages that follow are not signed: after the `101` the proxy copies bytes both ways
//! on that one upstream connection, which carries nothing but this user's WebSocket. Their
//! integrity between proxy and API is the connection's: use an `https://` upstream where
//! that network is not trusted (docs/OPERATIONS.md, "WebSockets").
//!
//! What the proxy adds to a plain byte pipe:
//! - **Cross-site WebSocket hijacking**: a browser's handshake cannot carry the CSRF header,
//!   and browsers send cookies on cross-site WebSocket handshakes, so the handshake must
//!   carry an `Origin` equal to the public origin (every browser sends one).
//! - **Sessions end WebSockets**: every `websocket_session_check` the session is looked up
//!   again (and its idle timer touched when the WebSocket carried bytes since the last look),
//!   beside the relay (a slow store does not hold the messages back); a logout, a revocation
//!   or the session's expiry closes the WebSocket.
//! - **Limits**: `websocket_idle_timeout` (no byte either way), `websocket_max_open` per
//!   route and `server.websocket_max_open` for the whole proxy (503 `websocket_limit` beyond
//!   either), since an upgraded connection is no longer counted by the listener's
//!   `max_connections`. A reload's timeouts reach the WebSockets open already: each holds a
//!   receiver of its route's limits ([`WebSocketRoute::subscribe`]) and recomputes its
//!   deadlines when they change (woken by the reload, never by a timer or a byte).
//! - **Frame headers checked**: [`frames::Frames`] follows and checks each direction's frame
//!   headers (RFC 6455 §5: masking direction, reserved opcodes, control frame rules,
//!   fragmentation, RSV bits against the extensions the API's `101` negotiated, the 64-bit
//!   length's top bit, minimal length encodings), never the payloads. A malformed header ends
//!   the WebSocket with 1002 `protocol_error` to both sides; a header not yet whole at the
//!   end of a read is held back until it is, so none of a malformed one is ever relayed.
//!   Nothing a side sends after its own Close frame is relayed (§5.5.1): it is discarded.
//! - **Closing properly**: when the proxy ends a WebSocket itself (idle, session ended or
//!   unverifiable, shutdown, a malformed frame header) it sends each side a Close frame with
//!   a code and a stable reason ([`frames::CloseReason`]), at a frame boundary: the bytes are
//!   relayed as read, never changed (only a header's first bytes may wait for its last),
//!   so that the frame in flight is finished first ([`splice`]). Each side's Close is then
//!   awaited, all within `websocket_close_timeout`; past it, both connections are dropped.
//! - **Shutdown**: every open WebSocket holds a receiver of its [`Registry`]'s signal; a
//!   shutdown sends 1001 `shutting_down` through it and waits for them within
//!   `shutdown_grace`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use tokio::sync::watch;

use self::frames::{CloseReason, Extensions};
use super::error::{ProxyBody, ProxyError};
use super::forward::{self, WebSocketLimits, WebSocketRoute};
use super::response_headers::UpstreamAnswer;
use super::server::ProxyState;
use super::session::SessionId;

mod frames;
/// The fuzz targets' entry into the frame tracker (no item of its own: an impl).
mod fuzz;
mod splice;

/// Whether `req` asks for a WebSocket: HTTP/1.1 `GET` with `Upgrade: websocket` and
/// `Connection: upgrade` (RFC 6455 §4.1). Other upgrades, and WebSockets over HTTP/2 (RFC 8441
/// extended `CONNECT`, never offered by this proxy), are not forwarded.
pub(crate) fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), header::UPGRADE, "websocket")
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// The handshake's `Sec-WebSocket-Version` and `Sec-WebSocket-Key` (RFC 6455 §4.1, §4.2.1):
/// version 13, the only framing [`frames::Frames`] follows, and a key of 16 bytes in base64
/// (24 characters, padded). A handshake without either is no browser's: neither is signed,
/// sent upstream or spliced.
///
/// - no version, or one other than 13: 426 `websocket_version` with `Sec-WebSocket-Version:
///   13`, what RFC 6455 §4.4 asks a server to answer a version it does not speak, so that a
///   client that speaks several can retry with 13;
/// - the version given twice, or a missing, repeated or malformed key: 400 `bad_request`
///   (§4.2.1: a handshake the server cannot read).
pub(crate) fn check_version_and_key(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    use base64::Engine as _;
    // The field's only value; `Err(())` when it is repeated.
    let one = |name| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (value, None) => Ok(value.map(http::HeaderValue::as_bytes)),
            (Some(_), Some(_)) | (None, Some(_)) => Err(()),
        }
    };
    match one(header::SEC_WEBSOCKET_VERSION) {
        Ok(Some(version)) if version.trim_ascii() == b"13" => {}
        Ok(_) => return Err(ProxyError::WebSocketVersion),
        Err(()) => {
            return Err(ProxyError::BadRequest(
                "WebSocket handshake with Sec-WebSocket-Version twice".into(),
            ))
        }
    }
    let key_ok = one(header::SEC_WEBSOCKET_KEY).is_ok_and(|key| {
        key.is_some_and(|key| {
            let key = key.trim_ascii();
            let mut decoded = [0u8; 18];
            key.len() == 24
                && base64::engine::general_purpose::STANDARD
                    .decode_slice(key, &mut decoded)
                    .is_ok_and(|n| n == 16)
        })
    });
    if key_ok {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(
            "WebSocket handshake without one Sec-WebSocket-Key of 16 bytes in base64".into(),
        ))
    }
}

/// Whether a comma-separated field lists `token` (case-insensitive).
pub(crate) fn has_token(headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// The browser's handshake must come from the public origin: `Origin` present (browsers always
/// send it on a WebSocket handshake, their real one whatever the referrer policy) and equal to
/// it, and `Sec-Fetch-Site` `same-origin` when present. Stricter than a write's check: a
/// write's `Origin: null` beside `same-origin` (a `no-referrer` page) never applies here.
pub(crate) fn check_origin(
    headers: &http::HeaderMap,
    public_origin: &[String],
) -> Result<(), ProxyError> {
    if !headers.contains_key(header::ORIGIN) {
        return Err(ProxyError::Csrf("WebSocket handshake without Origin"));
    }
    super::csrf::check_named_origin(headers, public_origin)
}

/// The WebSockets of one proxy (every event loop together): the proxy-wide limit
/// (`server.websocket_max_open`), the per-user one (`server.websocket_max_open_per_user`) and
/// the shutdown's signal to close them.
#[derive(Debug)]
pub(crate) struct Registry {
    /// `server.websocket_max_open`, as a reload may change it.
    max_open: AtomicUsize,
    open: AtomicUsize,
    /// `server.websocket_max_open_per_user`, as a reload may change it.
    max_open_per_user: AtomicUsize,
    /// WebSockets open per user (the encoded user name, as signed), entries at zero
    /// removed: without it one account could take every one of `max_open`'s places. A
    /// plain mutex: it is taken twice per WebSocket (handshake, close), never per frame.
    open_per_user: std::sync::Mutex<HashMap<Box<[u8]>, usize>>,
    /// Every open WebSocket (and handshake in progress) holds a receiver: the shutdown
    /// signals them through it and waits until none is left.
    stop: watch::Sender<Stop>,
}

/// What a shutdown asks of the open WebSockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Run,
    /// Close with 1001 `shutting_down`.
    Close,
    /// `shutdown_grace` is over: drop what is left.
    Drop,
}

impl Registry {
    pub(crate) fn new(max_open: usize, max_open_per_user: usize) -> Registry {
        Registry {
            max_open: AtomicUsize::new(max_open),
            open: AtomicUsize::new(0),
            max_open_per_user: AtomicUsize::new(max_open_per_user),
            open_per_user: std::sync::Mutex::new(HashMap::new()),
            stop: watch::Sender::new(Stop::Run),
        }
    }

    /// On `shutdown` (or once its sender is gone): every open WebSocket is closed with
    /// 1001 `shutting_down`, and this returns once all are closed, or at the end of `grace`
    /// (then the rest are dropped). Run beside the listeners' own graceful shutdown, so one
    /// grace period covers both.
    pub(crate) async fn close_on_shutdown(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) {
        let _ = shutdown.wait_for(|stop| *stop).await;
        self.stop.send_replace(Stop::Close);
        if tokio::time::timeout(grace, self.stop.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.open.load(Ordering::Relaxed),
                "shutdown grace period over; remaining WebSockets are dropped"
            );
            self.stop.send_replace(Stop::Drop);
            // Each WebSocket's task drops both sockets at its next poll, then its receiver:
            // the shutdown returns once they are closed, as it does for the listeners'
            // connections (bounded: a task whose runtime is gone never answers).
            let _ = tokio::time::timeout(DROP_BOUND, self.stop.closed()).await;
        }
    }
}

/// How long a shutdown waits, after `shutdown_grace`, for the WebSockets it told to drop
/// their sockets to have done so.
const DROP_BOUND: Duration = Duration::from_secs(1);

impl Registry {
    /// A new `server.websocket_max_open` and `websocket_max_open_per_user` (a reload):
    /// handshakes from now on count against them; the WebSockets open already count too, and
    /// stay open.
    pub(crate) fn set_max_open(&self, max_open: usize, max_open_per_user: usize) {
        self.max_open.store(max_open, Ordering::Release);
        self.max_open_per_user
            .store(max_open_per_user, Ordering::Release);
    }

    /// The per-user count, poisoning ignored: every update under the lock is one insert or
    /// one arithmetic step, which a panic elsewhere cannot leave half done.
    fn open_per_user(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, usize>> {
        self.open_per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many WebSockets `user` (encoded, as signed) has open through this proxy.
    #[cfg(test)]
    fn open_of(&self, user: &[u8]) -> usize {
        self.open_per_user().get(user).copied().unwrap_or(0)
    }

    /// Until no WebSocket is open, at most `grace` (an event loop's runtime ending after
    /// [`Registry::close_on_shutdown`] has signalled them).
    pub(crate) async fn wait_closed(&self, grace: Duration) {
        let _ = tokio::time::timeout(grace, self.stop.closed()).await;
    }
}

/// One open WebSocket counted on its route and in the proxy until dropped.
#[derive(Debug)]
pub(crate) struct OpenSlot {
    route: Arc<AtomicUsize>,
    registry: Arc<Registry>,
    stop: watch::Receiver<Stop>,
    /// The route's limits as a reload changes them (the open WebSocket follows them).
    limits: watch::Receiver<WebSocketLimits>,
    /// The user the WebSocket is counted for (on a route that requires a session).
    user: Option<UserSlot>,
}

/// One open WebSocket counted for its user until dropped.
#[derive(Debug)]
struct UserSlot {
    /// The encoded user name, as the session's identity field carries it.
    user: Box<[u8]>,
}

impl OpenSlot {
    /// Counts one more WebSocket on the route and in the proxy, or fails when either limit
    /// is reached (the route's as in `limits`, the handshake's copy of them).
    pub(crate) fn take(
        route: &WebSocketRoute,
        limits: &WebSocketLimits,
        registry: &Arc<Registry>,
    ) -> Result<OpenSlot, ProxyError> {
        let take = |open: &AtomicUsize, max: usize| {
            open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
        };
        if !take(&registry.open, registry.max_open.load(Ordering::Acquire)) {
            return Err(ProxyError::WebSocketLimit);
        }
        if !take(&route.open, limits.max_open) {
            registry.open.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::WebSocketLimit);
        }
        Ok(OpenSlot {
            route: route.open.clone(),
            registry: registry.clone(),
            stop: registry.stop.subscribe(),
            limits: route.subscribe(),
            user: None,
        })
    }

    /// Counts this WebSocket for `user` (the session's encoded user name) too, or fails with
    /// 429 `websocket_user_limit` when the user has `server.websocket_max_open_per_user` open
    /// already (then dropping the slot frees its route and proxy places as well).
    pub(crate) fn take_for_user(&mut self, user: &[u8]) -> Result<(), ProxyError> {
        let max = self.registry.max_open_per_user.load(Ordering::Acquire);
        let mut open = self.registry.open_per_user();
        match open.get_mut(user) {
            Some(n) if *n >= max => return Err(ProxyError::WebSocketUserLimit),
            Some(n) => *n += 1,
            None if max == 0 => return Err(ProxyError::WebSocketUserLimit),
            None => {
                open.insert(user.into(), 1);
            }
        }
        drop(open);
        self.user = Some(UserSlot { user: user.into() });
        Ok(())
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.route.fetch_sub(1, Ordering::AcqRel);
        self.registry.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(UserSlot { user }) = self.user.take() {
            let mut open = self.registry.open_per_user();
            if let Some(n) = open.get_mut(&user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&user);
                }
            }
        }
    }
}

/// What the splice needs besides the two connections.
pub(crate) struct Splice {
    pub(crate) state: Arc<ProxyState>,
    /// The route's limits as the handshake found them: they bound the wait for the
    /// upgrade; once spliced, the WebSocket follows the route's limits now (`slot.limits`).
    pub(crate) settings: WebSocketLimits,
    /// The session to look up again (None on a route that requires none).
    pub(crate) session: Option<SessionId>,
    pub(crate) slot: OpenSlot,
    /// For the log lines.
    pub(crate) route: String,
    /// When the upstream's answer must be complete: the route's `timeout` from the start of
    /// the handshake, as for the head ([`answer`] reads a refusal's body by then).
    pub(crate) answer_by: Instant,
}

/// Turns the upstream's answer to a handshake into the browser's: a `101` is passed on (its
/// hop-by-hop fields replaced by the upgrade's own) and the two connections are spliced in
/// a task of their own once both sides have switched; any other answer is passed on as an
/// ordinary answer (its body read within the route's `websocket_max_refusal_body`) and
/// nothing is spliced.
pub(crate) async fn answer(
    client: OnUpgrade,
    mut upstream: Response<Incoming>,
    session_cookie: &str,
    splice: Splice,
) -> Result<Response<ProxyBody>, ProxyError> {
    let switched = upstream.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switched && !has_token(upstream.headers(), header::UPGRADE, "websocket") {
        return Err(ProxyError::BadGateway {
            upstream: splice.route,
            detail: "answered 101 without Upgrade: websocket".into(),
        });
    }
    if !switched {
        let (mut parts, body) = upstream.into_parts();
        // Within the route's `timeout` (the head's deadline): an upstream that sends its
        // refusal's body slowly, or part of it and then nothing, held the browser's handshake
        // and one of the route's `websocket_max_open` slots for as long as it liked.
        let body = tokio::time::timeout_at(
            splice.answer_by,
            Limited::new(body, splice.settings.max_refusal_body).collect(),
        )
        .await
        .map_err(|_| ProxyError::GatewayTimeout {
            upstream: splice.route.clone(),
        })?
        .map_err(|e| ProxyError::BadGateway {
            upstream: splice.route.clone(),
            detail: format!("reading its refusal of a WebSocket handshake: {e}"),
        })?
        .to_bytes();
        // The body is passed on whole: its length is the one hyper sends, not a field of the
        // upstream's (which described the upstream's framing).
        parts.headers.remove(header::CONTENT_LENGTH);
        forward::strip_hop_by_hop(&mut parts.headers);
        forward::filter_upstream_response(&mut parts.headers, session_cookie);
        // Still the upstream's answer, though the proxy now holds its body.
        parts.extensions.insert(UpstreamAnswer);
        return Ok(Response::from_parts(parts, Either::Right(Full::new(body))));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut upstream);
    let (mut parts, _) = upstream.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    forward::filter_upstream_response(&mut parts.headers, session_cookie);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // What the RSV bits may mean: the extensions the browser is told were negotiated.
    let extensions = Extensions::negotiated(
        parts
            .headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    tokio::spawn(run(client, upstream_upgrade, splice, extensions));
    parts.extensions.insert(UpstreamAnswer);
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}

/// Why a spliced WebSocket ended (debug log lines), and the Close the proxy sends for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Both sides ended it (their own close handshake, passed through, or EOF) or a
    /// connection failed: nothing of the proxy's to send.
    Closed,
    Idle,
    SessionEnded,
    SessionUnverifiable,
    ShuttingDown,
    Malformed {
        from_client: bool,
    },
    /// One side's connection failed while relaying: the other side is closed.
    Failed(splice::Side),
}

impl Why {
    fn close(self) -> Option<CloseReason> {
        match self {
            Why::Closed => None,
            Why::Idle => Some(CloseReason::IDLE_TIMEOUT),
            Why::SessionEnded => Some(CloseReason::SESSION_ENDED),
            Why::SessionUnverifiable => Some(CloseReason::SESSION_UNVERIFIABLE),
            Why::ShuttingDown => Some(CloseReason::SHUTTING_DOWN),
            Why::Malformed { .. } => Some(CloseReason::PROTOCOL_ERROR),
            Why::Failed(splice::Side::Upstream) => Some(CloseReason::UPSTREAM_FAILED),
            Why::Failed(splice::Side::Client) => Some(CloseReason::CLIENT_GONE),
        }
    }
}

async fn run(client: OnUpgrade, upstream: OnUpgrade, splice: Splice, extensions: Extensions) {
    let Splice {
        state,
        settings: handshake,
        session,
        slot,
        route,
        answer_by: _,
    } = splice;
    let mut stop = slot.stop.clone();
    let mut live = slot.limits.clone();
    // Both switches happen within moments of the 101 (hyper writes it, then hands over the
    // connection); bounded anyway, as every wait is.
    let switched = tokio::time::timeout(handshake.idle_timeout, async {
        tokio::try_join!(client, upstream)
    })
    .await;
    let (client, upstream) = match switched {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(route = %route, "WebSocket not started: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(route = %route, "WebSocket not started: upgrade timed out");
            return;
        }
    };
    let started = Instant::now();
    // The route's limits now (a reload since the handshake's copy included), then again at
    // each reload: the deadlines below are recomputed from them at every turn of the loop.
    let mut settings = *live.borrow_and_update();
    // False once the route is gone (no reload can reach it any more): the last limits stay.
    let mut follow = true;
    let activity = Arc::new(AtomicU64::new(0));
    let client = Active::new(TokioIo::new(client), started, activity.clone());
    let upstream = Active::new(TokioIo::new(upstream), started, activity.clone());
    let mut pipe = splice::Splice::new(client, upstream, extensions);
    // Far enough to be never (durations in code, unlike the config's, are unbounded).
    let never = started + Duration::from_secs(100 * 365 * 86_400);
    let after = |from: Instant, wait: Duration| from.checked_add(wait).unwrap_or(never);
    // Wakes only when something is due: the idle deadline (from the last byte read, which the
    // relay notes without waking this loop), the next session check (from the last one) or a
    // reload of the limits. An open WebSocket so costs one timer per `session_check`, not one
    // per tick.
    let mut last_check = started;
    let mut seen_at_check = 0u64;
    // The session lookup in flight, polled beside the relay: a slow store (a Redis round
    // trip, up to its timeout) does not hold the messages back meanwhile.
    let mut check: Option<SessionCheck<'_>> = None;
    let ended = loop {
        let idle_timeout = settings.idle_timeout;
        let next_check = after(last_check, settings.session_check);
        let idle_deadline =
            |seen: u64| after(after(started, Duration::from_millis(seen)), idle_timeout);
        let wake = match (&session, &check) {
            (Some(_), None) => idle_deadline(activity.load(Ordering::Relaxed)).min(next_check),
            _ => idle_deadline(activity.load(Ordering::Relaxed)),
        };
        tokio::select! {
            result = std::future::poll_fn(|cx| pipe.poll(cx)) => {
                match result {
                    Ok(splice::Event::Done) => break Why::Closed,
                    Ok(splice::Event::Malformed { from_client }) => {
                        break Why::Malformed { from_client };
                    }
                    Err(e) => {
                        tracing::debug!(route = %route, "WebSocket connection failed: {e}");
                        match pipe.failed() {
                            Some(side) => break Why::Failed(side),
                            None => break Why::Closed,
                        }
                    }
                }
            }
            _ = wait_for(&mut stop, Stop::Close) => break Why::ShuttingDown,
            changed = live.changed(), if follow => match changed {
                // A reload: the new timeouts, for this WebSocket too (a lowered idle timeout
                // already passed, or a check now overdue, is due at the next turn).
                Ok(()) => settings = *live.borrow_and_update(),
                Err(_) => follow = false,
            },
            found = std::future::poll_fn(|cx| match check.as_mut() {
                Some(lookup) => lookup.as_mut().poll(cx),
                None => Poll::Pending,
            }) => {
                check = None;
                last_check = Instant::now();
                match found {
                    Ok(Some(_)) => {}
                    // Gone (logout, revocation, expiry): close.
                    Ok(None) => break Why::SessionEnded,
                    // A store that cannot answer closes it too: the session cannot be shown
                    // to be alive (a code the page retries on).
                    Err(_) => break Why::SessionUnverifiable,
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let seen = activity.load(Ordering::Relaxed);
                if now >= idle_deadline(seen) {
                    break Why::Idle;
                }
                if let (Some(id), None) = (&session, &check) {
                    if now >= next_check {
                        // Bytes since the last look keep the session's idle timer fresh.
                        let touch = seen != seen_at_check;
                        seen_at_check = seen;
                        let unix_now = state.clock.now_unix();
                        check = Some(Box::pin(super::auth::request_session(
                            &state, id, unix_now, touch,
                        )));
                    }
                }
            }
        }
    };
    let Some(close) = ended.close() else {
        tracing::debug!(route = %route, reason = ?ended, "WebSocket closed");
        return;
    };
    // The frame in flight each way is finished, a Close goes to each side (after the other
    // side's Close if that one was relayed already), each side's Close is awaited: all within
    // `websocket_close_timeout`, or within what is left of `shutdown_grace` on a shutdown.
    // After a side failed, only the other one is closed so (the failed one gets nothing).
    // The close timeout is the route's now, and follows a reload during the close as the
    // other timeouts do: the deadline is the close's start plus the current value (a value
    // lowered below the time the close has taken already ends it at once).
    match ended {
        Why::Failed(side) => pipe.begin_close_after_failure(side, close),
        _ => pipe.begin_close(close),
    }
    let closing = Instant::now();
    let mut close_timeout = live.borrow_and_update().close_timeout;
    let outcome = loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| pipe.poll(cx)) => break match result {
                Ok(_) => "complete",
                Err(_) => "failed",
            },
            () = tokio::time::sleep_until(after(closing, close_timeout)) => {
                break "timed out (dropped)";
            }
            () = wait_for(&mut stop, Stop::Drop) => break "cut by the end of shutdown_grace",
            changed = live.changed(), if follow => match changed {
                Ok(()) => close_timeout = live.borrow_and_update().close_timeout,
                Err(_) => follow = false,
            },
        }
    };
    match ended {
        Why::Malformed { from_client } => tracing::info!(
            route = %route,
            code = close.code,
            reason = close.reason,
            from = if from_client { "browser" } else { "upstream" },
            close = outcome,
            "WebSocket closed: malformed frame header"
        ),
        _ => tracing::debug!(
            route = %route,
            code = close.code,
            reason = close.reason,
            close = outcome,
            "WebSocket closed"
        ),
    }
    drop(pipe);
    drop(slot);
}

/// A session lookup of a WebSocket's periodic check, in flight.
type SessionCheck<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Option<super::session::RequestSession>, ProxyError>>
            + Send
            + 'a,
    >,
>;

/// Until the shutdown asks for `at_least` (`Close`, then `Drop`), or the registry is gone.
async fn wait_for(stop: &mut watch::Receiver<Stop>, at_least: Stop) {
    let reached = |now: &Stop| match at_least {
        Stop::Run => true,
        Stop::Close => *now != Stop::Run,
        Stop::Drop => *now == Stop::Drop,
    };
    let _ = stop.wait_for(reached).await.map(|_| ());
}

/// A connection that notes, in milliseconds since `started` (at least 1), when it last read a
/// byte.
struct Active<T> {
    io: T,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, started: Instant, last: Arc<AtomicU64>) -> Self {
        Active { io, started, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // At least 1: 0 is "no byte yet" for the session check's comparison.
            let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(millis.max(1), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A user's WebSockets are counted apart from other users' and from the proxy's: at
    /// `websocket_max_open_per_user` the next is refused 429 (and frees the route's and the
    /// proxy's places it took), another user is not, a closed one frees its place, and a
    /// user with none open leaves no entry behind. A reload's new per-user limit applies to
    /// the next handshake.
    #[test]
    fn websockets_are_counted_per_user() {
        let registry = Arc::new(Registry::new(100, 2));
        let route = WebSocketRoute::new(Duration::from_secs(60), Duration::from_secs(60), 100);
        let slot_for = |user: &[u8]| -> Result<OpenSlot, ProxyError> {
            let mut slot = OpenSlot::take(&route, &route.limits(), &registry)?;
            slot.take_for_user(user)?;
            Ok(slot)
        };
        let first = slot_for(b"alice").unwrap();
        let second = slot_for(b"alice").unwrap();
        let refused = slot_for(b"alice").unwrap_err();
        assert_eq!(refused.code(), "websocket_user_limit");
        assert_eq!(refused.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            registry.open.load(Ordering::SeqCst),
            2,
            "the refusal's place kept"
        );
        assert_eq!(route.open.load(Ordering::SeqCst), 2);
        let bob = slot_for(b"bob").unwrap();
        assert_eq!(registry.open_of(b"alice"), 2);
        assert_eq!(registry.open_of(b"bob"), 1);
        drop(first);
        let third = slot_for(b"alice").unwrap();
        drop((second, third, bob));
        assert!(
            registry.open_per_user().is_empty(),
            "entries at zero removed"
        );
        assert_eq!(registry.open.load(Ordering::SeqCst), 0);
        registry.set_max_open(100, 1);
        let only = slot_for(b"alice").unwrap();
        assert!(slot_for(b"alice").is_err(), "the lowered limit applies");
        drop(only);
        // A slot never counted for a user (a route without sessions) leaves no entry.
        drop(OpenSlot::take(&route, &route.limits(), &registry).unwrap());
        assert!(registry.open_per_user().is_empty());
    }

    /// At the end of `shutdown_grace` the WebSockets still open are told to drop their
    /// sockets; the shutdown returns only once they have (here a WebSocket that takes 200 ms
    /// to), not as soon as it has told them.
    #[tokio::test]
    async fn a_shutdown_returns_once_the_dropped_websockets_are_gone() {
        let registry = Arc::new(Registry::new(10, 10));
        let mut stop = registry.stop.subscribe();
        let gone = Arc::new(AtomicBool::new(false));
        let websocket = tokio::spawn({
            let gone = gone.clone();
            async move {
                wait_for(&mut stop, Stop::Drop).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                gone.store(true, Ordering::SeqCst);
                drop(stop);
            }
        });
        let (shutdown, stopping) = watch::channel(true);
        registry
            .clone()
            .close_on_shutdown(stopping, Duration::from_millis(50))
            .await;
        assert!(
            gone.load(Ordering::SeqCst),
            "returned before the WebSocket dropped its sockets"
        );
        drop(shutdown);
        websocket.await.unwrap();
    }
}

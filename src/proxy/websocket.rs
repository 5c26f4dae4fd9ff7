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
//!   again (and its idle timer touched when the WebSocket carried bytes since the last look);
//!   a logout, a revocation or the session's expiry closes the WebSocket.
//! - **Limits**: `websocket_idle_timeout` (no byte either way) and `websocket_max_open` per
//!   route (503 `websocket_limit` beyond it), since an upgraded connection is no longer
//!   counted by the listener's `max_connections`.
//!
//! Closing is by closing both TCP connections (the browser sees code 1006): the proxy does not
//! parse WebSocket frames, so it cannot send a close frame without risking one mid-frame.

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

use super::error::{ProxyBody, ProxyError};
use super::forward::{self, WebSocketRoute};
use super::server::ProxyState;
use super::session::SessionId;

/// Largest body of an upstream's refusal of a handshake passed on to the browser.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Whether `req` is a WebSocket handshake the proxy can forward: HTTP/1.1 `GET` with
/// `Upgrade: websocket` and `Connection: upgrade` (RFC 6455 §4.1). Other upgrades, and
/// WebSockets over HTTP/2 (RFC 8441 extended `CONNECT`, never offered by this proxy), are
/// not.
pub(crate) fn is_handshake(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), header::UPGRADE, "websocket")
        && has_token(req.headers(), header::CONNECTION, "upgrade")
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
/// send it on a WebSocket handshake) and equal to it, checked like a state-changing request's.
pub(crate) fn check_origin(
    headers: &http::HeaderMap,
    public_origin: &[String],
) -> Result<(), ProxyError> {
    if !headers.contains_key(header::ORIGIN) {
        return Err(ProxyError::Csrf("WebSocket handshake without Origin"));
    }
    super::csrf::check_origin(headers, public_origin)
}

/// One open WebSocket counted on its route until dropped.
#[derive(Debug)]
pub(crate) struct OpenSlot(Arc<AtomicUsize>);

impl OpenSlot {
    /// Counts one more WebSocket on the route, or fails when its limit is reached.
    pub(crate) fn take(route: &WebSocketRoute) -> Result<OpenSlot, ProxyError> {
        let taken = route
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < route.max_open).then_some(open + 1)
            });
        match taken {
            Ok(_) => Ok(OpenSlot(route.open.clone())),
            Err(_) => Err(ProxyError::WebSocketLimit),
        }
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the splice needs besides the two connections.
pub(crate) struct Splice {
    pub(crate) state: Arc<ProxyState>,
    pub(crate) settings: WebSocketRoute,
    /// The session to look up again (None on a route that requires none).
    pub(crate) session: Option<SessionId>,
    pub(crate) slot: OpenSlot,
    /// For the log lines.
    pub(crate) route: String,
}

/// Turns the upstream's answer to a handshake into the browser's: a `101` is passed on (its
/// hop-by-hop fields replaced by the upgrade's own) and the two connections are spliced in
/// a task of their own once both sides have switched; any other answer is passed on as an
/// ordinary answer (its body read within [`MAX_REFUSAL_BODY`]) and nothing is spliced.
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
        let body = Limited::new(body, MAX_REFUSAL_BODY)
            .collect()
            .await
            .map_err(|e| ProxyError::BadGateway {
                upstream: splice.route.clone(),
                detail: format!("reading its refusal of a WebSocket handshake: {e}"),
            })?
            .to_bytes();
        forward::strip_hop_by_hop(&mut parts.headers);
        forward::filter_upstream_response(&mut parts.headers, session_cookie);
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
    tokio::spawn(run(client, upstream_upgrade, splice));
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}

/// Why a spliced WebSocket ended (debug log lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Closed,
    Idle,
    Session,
}

async fn run(client: OnUpgrade, upstream: OnUpgrade, splice: Splice) {
    let Splice {
        state,
        settings,
        session,
        slot,
        route,
    } = splice;
    // Both switches happen within moments of the 101 (hyper writes it, then hands over the
    // connection); bounded anyway, as every wait is.
    let switched = tokio::time::timeout(settings.idle_timeout, async {
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
    let activity = Arc::new(AtomicU64::new(0));
    let mut client = Active::new(TokioIo::new(client), started, activity.clone());
    let mut upstream = Active::new(TokioIo::new(upstream), started, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // Far enough to be never (durations in code, unlike the config's, are unbounded).
    let never = started + Duration::from_secs(100 * 365 * 86_400);
    let after = |from: Instant, wait: Duration| from.checked_add(wait).unwrap_or(never);
    // Wakes only when something is due: the idle deadline (from the last byte read, which the
    // copy notes without waking this loop) or the next session check. An open WebSocket so
    // costs one timer per `session_check`, not one per tick.
    let mut next_check = after(started, settings.session_check);
    let mut seen_at_check = 0u64;
    let ended = loop {
        let idle_deadline = |seen: u64| {
            after(
                after(started, Duration::from_millis(seen)),
                settings.idle_timeout,
            )
        };
        let wake = match &session {
            Some(_) => idle_deadline(activity.load(Ordering::Relaxed)).min(next_check),
            None => idle_deadline(activity.load(Ordering::Relaxed)),
        };
        tokio::select! {
            result = &mut copy => {
                if let Err(e) = result {
                    tracing::debug!(route = %route, "WebSocket connection ended: {e}");
                }
                break Ended::Closed;
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let seen = activity.load(Ordering::Relaxed);
                if now >= idle_deadline(seen) {
                    break Ended::Idle;
                }
                if let Some(id) = &session {
                    if now >= next_check {
                        next_check = after(now, settings.session_check);
                        // Bytes since the last look keep the session's idle timer fresh.
                        let touch = seen != seen_at_check;
                        seen_at_check = seen;
                        let unix_now = state.clock.now_unix();
                        match super::auth::request_session(&state, id, unix_now, touch).await {
                            Ok(Some(_)) => {}
                            // Gone (logout, revocation, expiry): close. A store that cannot
                            // answer closes it too: the session cannot be shown to be alive.
                            Ok(None) | Err(_) => break Ended::Session,
                        }
                    }
                }
            }
        }
    };
    tracing::debug!(route = %route, reason = ?ended, "WebSocket closed");
    drop(slot);
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

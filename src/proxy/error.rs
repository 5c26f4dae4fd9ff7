//! Every way the request path can refuse or fail, and the one function that turns each into an
//! HTTP answer. Each variant carries context for the log line; the client only ever sees the
//! stable code (`{"error":"<code>"}`), never the detail.

use std::fmt;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, RETRY_AFTER, SEC_WEBSOCKET_VERSION, UPGRADE, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Full};

use super::session::StoreError;

/// The body type of every response the proxy sends: an upstream body streamed through
/// untouched (`Left`), or a small body the proxy produced itself (`Right`).
pub type ProxyBody = Either<super::upstream_pool::UpstreamBody, Full<Bytes>>;

/// Why the proxy refused a request or could not complete it.
#[derive(Debug)]
pub enum ProxyError {
    /// No valid session on a route that needs one.
    Unauthenticated,
    /// The request's cookies name more than one live session (cookies of the session cookie's
    /// name set by a sibling subdomain, or left with another `Path`), or more distinct session
    /// ids than `session.max_session_cookies`: which one the browser means cannot be told, so
    /// neither is used (nor touched).
    AmbiguousSessionCookie,
    /// Login with a wrong password or an unknown user (one answer for both).
    InvalidCredentials,
    /// Login throttled for this client address or user name.
    TooManyAttempts {
        /// Seconds until the window ends (`Retry-After`).
        retry_after: u64,
    },
    /// CSRF token or Origin / Sec-Fetch-Site check failed; the text says which (logs only).
    Csrf(&'static str),
    /// The request body is larger than the route allows.
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The upstream refused the connection or broke the exchange.
    BadGateway {
        /// Upstream name from the config.
        upstream: String,
        /// What went wrong (logs only).
        detail: String,
    },
    /// The upstream did not answer within the route's timeout.
    GatewayTimeout {
        /// Upstream name from the config.
        upstream: String,
    },
    /// The session store (or throttle store) failed.
    SessionStore(StoreError),
    /// No route, file or endpoint for this path.
    NotFound,
    /// The path exists but not for this method.
    MethodNotAllowed {
        /// The `Allow` header value.
        allow: &'static str,
    },
    /// Login without a JSON body.
    UnsupportedMediaType,
    /// The request is malformed; the text says how (logs only).
    BadRequest(String),
    /// The client took longer than the request time limit to send its request.
    RequestTimeout,
    /// A WebSocket (or other protocol) upgrade on a route without `websocket = true`, or not a
    /// WebSocket handshake over HTTP/1.1.
    WebSocketUnsupported,
    /// A route's `websocket_max_open` WebSockets are open already.
    WebSocketLimit,
    /// The session's user has `server.websocket_max_open_per_user` WebSockets open through
    /// this proxy already (429: the user's own doing, not the proxy's capacity).
    WebSocketUserLimit,
    /// A WebSocket handshake, on a route that proxies them, without `Sec-WebSocket-Version:
    /// 13` (RFC 6455 §4.4: 426, naming the version the proxy speaks).
    WebSocketVersion,
    /// A `static_dir` file asked for with an `If-Match` that lists neither its current ETag
    /// nor `*` (RFC 9110 §13.1.1: a download resumed after a deploy changed the file).
    PreconditionFailed,
    /// A `static_dir` file asked for with a byte range that starts past its end (RFC 9110
    /// §15.5.17).
    RangeNotSatisfiable {
        /// The representation's length, for `Content-Range: bytes */<length>`.
        length: u64,
    },
    /// The proxy itself failed to build a request (e.g. signing); never the client's fault.
    Internal(String),
    /// The request's body did not fit in `server.max_body_memory` beside the bodies of the
    /// other requests in flight (503, `Retry-After: 1`: the proxy's capacity, not the
    /// request's fault; the same request may pass a moment later).
    BodyMemoryLimit,
    /// The request's body would take its client (the session's user, or the client address
    /// on a public route and for the login) past `server.max_body_memory_per_client`: 429,
    /// `Retry-After: 1`. The client's own bodies in flight hold its share; the bodies of
    /// other clients still pass.
    ClientBodyMemoryLimit,
}

/// Every code [`ProxyError::code`] can return, in a fixed order: the `reason` label values of
/// `countersign_refusals_total` (all present from the start, so `increase()` sees the first).
pub const REASON_CODES: [&str; 23] = [
    "unauthenticated",
    "ambiguous_session_cookie",
    "invalid_credentials",
    "too_many_attempts",
    "csrf",
    "body_too_large",
    "bad_gateway",
    "gateway_timeout",
    "session_store_unavailable",
    "not_found",
    "method_not_allowed",
    "unsupported_media_type",
    "bad_request",
    "request_timeout",
    "websocket_unsupported",
    "websocket_limit",
    "websocket_version",
    "websocket_user_limit",
    "precondition_failed",
    "range_not_satisfiable",
    "internal_error",
    "body_memory_limit",
    "client_body_memory_limit",
];

impl ProxyError {
    /// The position of [`Self::code`] in [`REASON_CODES`] (the refusal counter's slot).
    pub fn reason_index(&self) -> usize {
        match self {
            ProxyError::Unauthenticated => 0,
            ProxyError::AmbiguousSessionCookie => 1,
            ProxyError::InvalidCredentials => 2,
            ProxyError::TooManyAttempts { .. } => 3,
            ProxyError::Csrf(_) => 4,
            ProxyError::BodyTooLarge { .. } => 5,
            ProxyError::BadGateway { .. } => 6,
            ProxyError::GatewayTimeout { .. } => 7,
            ProxyError::SessionStore(_) => 8,
            ProxyError::NotFound => 9,
            ProxyError::MethodNotAllowed { .. } => 10,
            ProxyError::UnsupportedMediaType => 11,
            ProxyError::BadRequest(_) => 12,
            ProxyError::RequestTimeout => 13,
            ProxyError::WebSocketUnsupported => 14,
            ProxyError::WebSocketLimit => 15,
            ProxyError::WebSocketVersion => 16,
            ProxyError::WebSocketUserLimit => 17,
            ProxyError::PreconditionFailed => 18,
            ProxyError::RangeNotSatisfiable { .. } => 19,
            ProxyError::Internal(_) => 20,
            ProxyError::BodyMemoryLimit => 21,
            ProxyError::ClientBodyMemoryLimit => 22,
        }
    }

    /// The stable error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthenticated => "unauthenticated",
            ProxyError::AmbiguousSessionCookie => "ambiguous_session_cookie",
            ProxyError::InvalidCredentials => "invalid_credentials",
            ProxyError::TooManyAttempts { .. } => "too_many_attempts",
            ProxyError::Csrf(_) => "csrf",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadGateway { .. } => "bad_gateway",
            ProxyError::GatewayTimeout { .. } => "gateway_timeout",
            ProxyError::SessionStore(_) => "session_store_unavailable",
            ProxyError::NotFound => "not_found",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::UnsupportedMediaType => "unsupported_media_type",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::WebSocketUnsupported => "websocket_unsupported",
            ProxyError::WebSocketLimit => "websocket_limit",
            ProxyError::WebSocketUserLimit => "websocket_user_limit",
            ProxyError::WebSocketVersion => "websocket_version",
            ProxyError::PreconditionFailed => "precondition_failed",
            ProxyError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ProxyError::Internal(_) => "internal_error",
            ProxyError::BodyMemoryLimit => "body_memory_limit",
            ProxyError::ClientBodyMemoryLimit => "client_body_memory_limit",
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthenticated
            | ProxyError::AmbiguousSessionCookie
            | ProxyError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ProxyError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Csrf(_) => StatusCode::FORBIDDEN,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::SessionStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::WebSocketUnsupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::WebSocketLimit => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::WebSocketUserLimit => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            ProxyError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ProxyError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::BodyMemoryLimit => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientBodyMemoryLimit => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::TooManyAttempts { retry_after } => {
                write!(f, "too_many_attempts (retry after {retry_after}s)")
            }
            ProxyError::Csrf(why) => write!(f, "csrf: {why}"),
            ProxyError::BodyTooLarge { limit } => write!(f, "body_too_large (limit {limit} bytes)"),
            ProxyError::BadGateway { upstream, detail } => {
                write!(f, "bad_gateway: upstream {upstream}: {detail}")
            }
            ProxyError::GatewayTimeout { upstream } => {
                write!(f, "gateway_timeout: upstream {upstream}")
            }
            ProxyError::SessionStore(e) => write!(f, "session_store_unavailable: {e}"),
            ProxyError::BadRequest(why) => write!(f, "bad_request: {why}"),
            ProxyError::Internal(why) => write!(f, "internal_error: {why}"),
            other => f.write_str(other.code()),
        }
    }
}

impl std::error::Error for ProxyError {}

impl From<StoreError> for ProxyError {
    fn from(e: StoreError) -> Self {
        ProxyError::SessionStore(e)
    }
}

/// The challenge on the proxy's own 401s (`unauthenticated`, `ambiguous_session_cookie`,
/// `invalid_credentials`).
pub const SESSION_CHALLENGE: &str = "Cookie realm=\"countersign\"";

/// The one mapping from an error to what the client sees: status, `{"error":"<code>"}`, and the
/// headers some statuses require (`Retry-After` on 429, `Allow` on 405, `WWW-Authenticate` on
/// 401).
pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let body = format!("{{\"error\":\"{}\"}}", error.code());
    let mut response = json_response(error.status(), Bytes::from(body));
    match error {
        ProxyError::TooManyAttempts { retry_after } => {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        ProxyError::MethodNotAllowed { allow } => {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        ProxyError::Unauthenticated
        | ProxyError::AmbiguousSessionCookie
        | ProxyError::InvalidCredentials => {
            // RFC 9110 section 15.5.2: a 401 MUST carry a challenge. The session cookie is
            // the credential here; `Cookie` (the scheme of draft-broyer-http-cookie-auth)
            // says so, and is no scheme a browser answers with a login dialog.
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(SESSION_CHALLENGE),
            );
        }
        ProxyError::WebSocketVersion => {
            // RFC 6455 §4.4 names the versions the server speaks; RFC 9110 §15.5.22: a 426
            // carries `Upgrade` (and so `Connection: upgrade`, §7.8) naming the protocol.
            let headers = response.headers_mut();
            headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        ProxyError::RangeNotSatisfiable { length } => {
            // RFC 9110 §15.5.17: the representation's length, so the client can ask again
            // for what exists; `Accept-Ranges` as on every answer for the file.
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::try_from(format!("bytes */{length}")) {
                headers.insert(CONTENT_RANGE, value);
            }
            headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        ProxyError::BodyMemoryLimit | ProxyError::ClientBodyMemoryLimit => {
            // The bodies in flight free their share within `request_timeout` at most, most
            // within a round trip to the upstream: worth trying again soon (the client's
            // own, for its share).
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        ProxyError::PreconditionFailed => {
            response
                .headers_mut()
                .insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        ProxyError::Csrf(_)
        | ProxyError::BodyTooLarge { .. }
        | ProxyError::BadGateway { .. }
        | ProxyError::GatewayTimeout { .. }
        | ProxyError::SessionStore(_)
        | ProxyError::NotFound
        | ProxyError::UnsupportedMediaType
        | ProxyError::BadRequest(_)
        | ProxyError::RequestTimeout
        | ProxyError::WebSocketUnsupported
        | ProxyError::WebSocketLimit
        | ProxyError::WebSocketUserLimit
        | ProxyError::Internal(_) => {}
    }
    response
}

/// A JSON response produced by the proxy itself; never cached by the browser or a CDN, since
/// these bodies are per-session.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A response with no body.
pub fn empty_response(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response
}

/// An error and its sources, `": "`-joined: the detail logged for 502s (hyper's own message
/// alone, "error trying to connect", hides the cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors repeat their cause in their own text: say it once.
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// Empties a proxy-made answer's body for a HEAD request, keeping its `Content-Length`
/// (RFC 9110 section 9.3.2; hyper drops it for HTTP/1 but sends it over HTTP/2). Upstream
/// answers (`Either::Left`) pass as they are.
pub fn strip_head_body(response: &mut Response<ProxyBody>) {
    let Either::Right(body) = response.body() else {
        return;
    };
    let Some(length) = body.size_hint().exact().filter(|&n| n > 0) else {
        return;
    };
    response
        .headers_mut()
        .entry(CONTENT_LENGTH)
        .or_insert_with(|| HeaderValue::from(length));
    *response.body_mut() = Either::Right(Full::new(Bytes::new()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each variant's slot in [`REASON_CODES`] holds its own code, so the counter and the
    /// answer's `{"error":…}` (and the access line's `reason`) always agree.
    #[test]
    fn reason_codes_list_every_code_at_its_index() {
        let all = [
            ProxyError::Unauthenticated,
            ProxyError::AmbiguousSessionCookie,
            ProxyError::InvalidCredentials,
            ProxyError::TooManyAttempts { retry_after: 1 },
            ProxyError::Csrf("x"),
            ProxyError::BodyTooLarge { limit: 1 },
            ProxyError::BadGateway {
                upstream: String::new(),
                detail: String::new(),
            },
            ProxyError::GatewayTimeout {
                upstream: String::new(),
            },
            ProxyError::SessionStore(StoreError::new("x")),
            ProxyError::NotFound,
            ProxyError::MethodNotAllowed { allow: "GET" },
            ProxyError::UnsupportedMediaType,
            ProxyError::BadRequest(String::new()),
            ProxyError::RequestTimeout,
            ProxyError::WebSocketUnsupported,
            ProxyError::WebSocketLimit,
            ProxyError::WebSocketVersion,
            ProxyError::WebSocketUserLimit,
            ProxyError::PreconditionFailed,
            ProxyError::RangeNotSatisfiable { length: 1 },
            ProxyError::Internal(String::new()),
            ProxyError::BodyMemoryLimit,
            ProxyError::ClientBodyMemoryLimit,
        ];
        assert_eq!(all.len(), REASON_CODES.len());
        for error in &all {
            assert_eq!(
                REASON_CODES[error.reason_index()],
                error.code(),
                "{error:?}"
            );
        }
    }
}

//! `--upstream-driver raw`: the hyper engine's downstream side (hyper's HTTP/1 server and the
//! same service) with an upstream client of its own instead of hyper's, to measure what the
//! upstream half of hyper costs (docs/BENCHMARKS.md "Forty-fourth round" estimated it). Bench
//! only:
//!
//! - per event loop, a pool of idle keep-alive `TcpStream`s to the upstream (a `Vec` behind an
//!   uncontended `parking_lot::Mutex`, since hyper's server futures must be `Send` for
//!   `tokio::spawn`; the last one returned is taken first); a request takes one (or connects),
//!   runs in the service's own future (no driver task, no channel) and returns it when the
//!   whole response is read;
//! - the request head (method, path, the `HeaderMap` the service prepared: hop-by-hop fields
//!   already dropped, `X-Forwarded-For`/`-Proto` already added) and the body go out in one
//!   write from a buffer the connection keeps;
//! - the response head is parsed with `httparse`; its field values and a body that came with
//!   it are copied once into one `Bytes` that the `HeaderMap` values and the body share; a
//!   `Content-Length` body is read whole (answers are small); 1xx answers are skipped;
//! - a kept connection that fails before any byte of an answer is replaced once (for any
//!   request when the write failed, for an idempotent one when the read did).
//!
//! What it skips: chunked or close-delimited response bodies (a 502 in this prototype), idle
//! expiry of pooled connections and any check that a pooled one is still open before it is
//! used (a non-idempotent request on one the upstream closed gets a 502), upgrades (502),
//! response bodies above [`MAX_RESPONSE_BODY`] (502). Timeouts are the service's: the
//! upstream-response timeout wraps the whole exchange, the connect timeout the connect.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{parse_length, tokens, Buf, MAX_HEADERS};

/// Largest response body read (larger: 502).
const MAX_RESPONSE_BODY: u64 = 16 * 1024 * 1024;

/// Idle upstream connections of one event loop.
pub(crate) struct RawPool {
    idle: Mutex<Vec<UpConn>>,
    max_idle: usize,
    upstream_addr: String,
    connect_timeout: Duration,
    /// Size of each connection's read buffer: the largest response head.
    max_head: usize,
}

/// One upstream keep-alive connection and its buffers.
struct UpConn {
    stream: TcpStream,
    read: Buf,
    /// The request being sent (head and body), reused.
    write: Vec<u8>,
}

/// Why a request got no response (the service answers 502).
#[derive(Debug)]
pub(crate) enum ClientError {
    Connect,
    Io,
    Malformed,
    /// A response this prototype does not read (chunked, close-delimited, too large, 101).
    Unsupported,
}

/// What one exchange on one connection came to.
enum Exchange {
    /// The request could not be written.
    WriteFailed,
    /// The connection ended before any byte of an answer.
    Nothing,
    Failed(ClientError),
}

impl RawPool {
    pub(crate) fn new(
        upstream_addr: String,
        max_idle: usize,
        connect_timeout: Duration,
        max_head: usize,
    ) -> Arc<RawPool> {
        Arc::new(RawPool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            upstream_addr,
            connect_timeout,
            max_head,
        })
    }

    /// Sends the request (`parts` as the service prepared them, `body` read whole) and reads
    /// its response whole.
    pub(crate) async fn send(
        &self,
        parts: &Parts,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ClientError> {
        let head_method = parts.method == Method::HEAD;
        let idempotent = parts.method.is_idempotent();
        let taken = self.idle.lock().pop();
        let (mut conn, mut reused) = match taken {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        write_request(&mut conn.write, parts, body);
        loop {
            match exchange(&mut conn, head_method).await {
                Ok((response, reusable)) => {
                    if reusable {
                        let mut idle = self.idle.lock();
                        if idle.len() < self.max_idle {
                            idle.push(conn);
                        }
                    }
                    return Ok(response);
                }
                Err(Exchange::WriteFailed) if reused => {}
                Err(Exchange::Nothing) if reused && idempotent => {}
                Err(Exchange::WriteFailed | Exchange::Nothing) => return Err(ClientError::Io),
                Err(Exchange::Failed(e)) => return Err(e),
            }
            // A kept connection the upstream closed meanwhile: once more on a new one.
            let mut fresh = self.connect().await?;
            std::mem::swap(&mut fresh.write, &mut conn.write);
            conn = fresh;
            reused = false;
        }
    }

    async fn connect(&self) -> Result<UpConn, ClientError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.upstream_addr.as_str()),
        )
        .await
        .map_err(|_| ClientError::Connect)?
        .map_err(|_| ClientError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(UpConn {
            stream,
            read: Buf::new(self.max_head),
            write: Vec::with_capacity(2048),
        })
    }
}

/// The request head and body into `out`, ready for one write.
fn write_request(out: &mut Vec<u8>, parts: &Parts, body: &[u8]) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length_field = false;
    for (name, value) in &parts.headers {
        // The body is sent whole, so its length is the framing (as hyper's client does with a
        // `Full` body).
        if name == CONTENT_LENGTH {
            length_field = true;
            continue;
        }
        if name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if length_field || !body.is_empty() {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Writes the request in `conn.write` and reads the response. `Ok((response, reusable))`.
async fn exchange(
    conn: &mut UpConn,
    head_method: bool,
) -> Result<(Response<Full<Bytes>>, bool), Exchange> {
    if conn.stream.write_all(&conn.write).await.is_err() {
        return Err(Exchange::WriteFailed);
    }
    let mut received = !conn.read.is_empty();
    let head = loop {
        if !conn.read.is_empty() {
            match parse_response(conn.read.filled(), head_method).map_err(Exchange::Failed)? {
                Parsed::Partial if conn.read.is_full() => {
                    return Err(Exchange::Failed(ClientError::Malformed))
                }
                Parsed::Partial => {}
                Parsed::Informational(len) => {
                    conn.read.consume(len);
                    continue;
                }
                Parsed::Final(head) => break head,
            }
        }
        match conn.read.fill(&mut conn.stream).await {
            Ok(0) | Err(_) if !received => return Err(Exchange::Nothing),
            Ok(0) | Err(_) => return Err(Exchange::Failed(ClientError::Io)),
            Ok(_) => received = true,
        }
    };
    let body = match head.body {
        Some(body) => {
            conn.read.consume(head.len + body.len());
            body
        }
        None => {
            // Only part of the body came with the head: the rest is read into a buffer of its
            // own (the length is checked against `MAX_RESPONSE_BODY`).
            conn.read.consume(head.len);
            let length = head.length as usize;
            let mut whole = Vec::with_capacity(length);
            whole.extend_from_slice(conn.read.filled());
            conn.read.clear();
            let old = whole.len();
            whole.resize(length, 0);
            conn.stream
                .read_exact(&mut whole[old..])
                .await
                .map_err(|_| Exchange::Failed(ClientError::Io))?;
            Bytes::from(whole)
        }
    };
    let reusable = !head.close && conn.read.is_empty();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    Ok((response, reusable))
}

enum Parsed {
    Partial,
    Informational(usize),
    Final(Head),
}

/// A final response head, its fields in a `HeaderMap`.
struct Head {
    /// Bytes of the head.
    len: usize,
    status: StatusCode,
    headers: HeaderMap,
    /// The body's length.
    length: u64,
    /// The body, when all of it came with the head.
    body: Option<Bytes>,
    /// The connection cannot carry another request.
    close: bool,
}

/// The response head at the start of `bytes` (and its body if all there).
fn parse_response(bytes: &[u8], head_method: bool) -> Result<Parsed, ClientError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(ClientError::Malformed),
    };
    let (Some(version), Some(code)) = (response.version, response.code) else {
        return Err(ClientError::Malformed);
    };
    if code == 101 {
        return Err(ClientError::Unsupported);
    }
    if (100..200).contains(&code) {
        return Ok(Parsed::Informational(len));
    }
    let status = StatusCode::from_u16(code).map_err(|_| ClientError::Malformed)?;
    let fields = &*response.headers;
    let mut content_length: Option<u64> = None;
    let mut coded = false;
    let mut close = version == 0;
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(field.value).ok_or(ClientError::Malformed)?;
            if content_length.is_some_and(|seen| seen != value) {
                return Err(ClientError::Malformed);
            }
            content_length = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in tokens(field.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let length = if head_method || code == 204 || code == 304 {
        0
    } else {
        match content_length {
            Some(length) if !coded && length <= MAX_RESPONSE_BODY => length,
            // Chunked, close-delimited or too large: not in this prototype.
            _ => return Err(ClientError::Unsupported),
        }
    };
    // One copy of the head (and of the body, when all of it is here) that the field values
    // and the body share, as hyper's client shares its read buffer.
    let whole = len + length as usize;
    let complete = whole <= bytes.len();
    let shared = Bytes::copy_from_slice(&bytes[..if complete { whole } else { len }]);
    let base = bytes.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| ClientError::Malformed)?;
        let value = if field.value.is_empty() {
            HeaderValue::from_static("")
        } else {
            let start = field.value.as_ptr() as usize - base;
            HeaderValue::from_maybe_shared(shared.slice(start..start + field.value.len()))
                .map_err(|_| ClientError::Malformed)?
        };
        headers.append(name, value);
    }
    Ok(Parsed::Final(Head {
        len,
        status,
        headers,
        length,
        body: complete.then(|| shared.slice(len..whole)),
        close,
    }))
}

//! `--engine raw`: an HTTP/1.1 reverse proxy without hyper, to measure what hyper costs in the
//! baseline (docs/BENCHMARKS.md). tokio `TcpStream`s and `httparse` directly:
//!
//! - one task per downstream connection, which owns its upstream keep-alive connection (opened
//!   on its first request, reopened once when a reused one fails before answering, closed with
//!   the downstream connection: no pool shared between downstream connections);
//! - one request at a time, in order (pipelined requests wait in the read buffer);
//! - request heads parsed with `httparse` from a fixed buffer (the head limit, 431 beyond),
//!   copied field by field as byte slices into the upstream request (no `HeaderMap`), without
//!   the hop-by-hop fields and the names `Connection` lists, with `X-Forwarded-For` /
//!   `X-Forwarded-Proto` added, as the hyper engine does;
//! - request bodies only by `Content-Length`, read whole (within `--max-body`, 413 beyond) and
//!   sent with the head in one write; `Transfer-Encoding` is answered 501, a malformed head
//!   400, HTTP/1.0 505 (each then closes the connection);
//! - response bodies by `Content-Length`, chunked (passed through verbatim, the chunk sizes
//!   parsed only to find the end) or delimited by the upstream's close (the downstream
//!   connection then closes too).
//!
//! What it does not do (the hyper engine does): timeouts other than the upstream connect
//! timeout, chunked request bodies, HTTP/2, upgrades, HTTP/1.0 clients, a shared upstream pool,
//! the body memory cap, graceful shutdown. A bench tool, not a proxy to deploy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Fields per head, as the proxy's `DEFAULT_MAX_HEADER_COUNT` (more: 431).
pub(crate) const MAX_HEADERS: usize = countersign::proxy::config::DEFAULT_MAX_HEADER_COUNT;

/// Longest chunk-size line or trailer section of a chunked response.
const MAX_CHUNK_LINE: usize = 4096;

/// What every connection of the engine needs.
#[derive(Debug)]
pub(crate) struct Config {
    /// `host:port` of the upstream.
    pub(crate) upstream_addr: String,
    /// Largest request (and response) head in bytes: the size of each read buffer.
    pub(crate) max_head: usize,
    /// Largest request body in bytes.
    pub(crate) max_body: usize,
    pub(crate) connect_timeout: Duration,
}

/// Accepts connections forever, one task each.
pub(crate) async fn run(listener: TcpListener, config: Arc<Config>) {
    loop {
        let (stream, peer) = crate::accept(&listener).await;
        let connection = Connection::new(stream, peer, config.clone());
        tokio::spawn(connection.serve());
    }
}

/// A read buffer of fixed capacity: `data[start..end]` holds bytes not yet consumed.
pub(crate) struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    pub(crate) fn new(capacity: usize) -> Buf {
        Buf {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.data.len()
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.clear();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// One read from `stream` after what is buffered (moved to the front when the end is
    /// reached). `Ok(0)`: end of stream. Never called on a full buffer.
    pub(crate) async fn fill(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        if self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = stream.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Why a connection ends (or a request fails).
enum Failure {
    /// Answer this status, then close.
    Reject(u16),
    /// Close without answering (downstream gone, or a response cut midway).
    Close,
}

/// What the upstream exchange of one request came to.
enum UpstreamError {
    /// Nothing forwarded downstream yet: the client gets a 502.
    BadGateway,
    /// The response was cut after its head went downstream: close.
    Cut,
}

/// How a response body ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A request head checked and copied into the upstream request.
struct RequestHead {
    /// Bytes of the head in the read buffer.
    len: usize,
    body: usize,
    close: bool,
    idempotent: bool,
    head_method: bool,
    expect_continue: bool,
}

/// A response head checked and copied into the downstream response.
struct ResponseHead {
    len: usize,
    framing: Framing,
    /// The upstream connection cannot carry another request after this response.
    close_upstream: bool,
}

struct Connection {
    down: TcpStream,
    down_buf: Buf,
    /// `x-forwarded-for: <peer>\r\nx-forwarded-proto: http\r\n`, built once.
    forwarded: Vec<u8>,
    /// The upstream request being sent (head and body), reused.
    request: Vec<u8>,
    /// The downstream response head (and the body bytes that came with it), reused.
    response: Vec<u8>,
    up: Option<TcpStream>,
    up_buf: Buf,
    config: Arc<Config>,
}

impl Connection {
    fn new(down: TcpStream, peer: SocketAddr, config: Arc<Config>) -> Connection {
        let forwarded = format!(
            "x-forwarded-for: {}\r\nx-forwarded-proto: http\r\n",
            peer.ip()
        )
        .into_bytes();
        Connection {
            down,
            down_buf: Buf::new(config.max_head),
            forwarded,
            request: Vec::with_capacity(2048),
            response: Vec::with_capacity(2048),
            up: None,
            up_buf: Buf::new(config.max_head),
            config,
        }
    }

    async fn serve(mut self) {
        loop {
            match self.one_request().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(Failure::Reject(status)) => {
                    let _ = self.down.write_all(&status_only(status)).await;
                    break;
                }
                Err(Failure::Close) => break,
            }
        }
        let _ = self.down.shutdown().await;
    }

    /// One request and its response. `Ok(true)`: the connection stays open for the next one.
    async fn one_request(&mut self) -> Result<bool, Failure> {
        let Some(head) = self.read_request_head().await? else {
            return Ok(false);
        };
        self.down_buf.consume(head.len);
        self.read_body(&head).await?;
        match self.exchange(&head).await {
            Ok(keep) => Ok(keep && !head.close),
            Err(UpstreamError::BadGateway) => Err(Failure::Reject(502)),
            Err(UpstreamError::Cut) => Err(Failure::Close),
        }
    }

    /// Reads until a whole head is buffered and copies it into `self.request`. `None`: the
    /// client closed the connection between requests.
    async fn read_request_head(&mut self) -> Result<Option<RequestHead>, Failure> {
        loop {
            if !self.down_buf.is_empty() {
                if let Some(head) = parse_request(
                    self.down_buf.filled(),
                    &self.forwarded,
                    self.config.max_body,
                    &mut self.request,
                )? {
                    return Ok(Some(head));
                }
                if self.down_buf.is_full() {
                    return Err(Failure::Reject(431));
                }
            }
            match self.down_buf.fill(&mut self.down).await {
                Ok(0) if self.down_buf.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(Failure::Close),
                Ok(_) => {}
            }
        }
    }

    /// Appends the request body (`Content-Length` bytes) to `self.request`.
    async fn read_body(&mut self, head: &RequestHead) -> Result<(), Failure> {
        if head.body == 0 {
            return Ok(());
        }
        let buffered = head.body.min(self.down_buf.filled().len());
        self.request
            .extend_from_slice(&self.down_buf.filled()[..buffered]);
        self.down_buf.consume(buffered);
        let missing = head.body - buffered;
        if missing == 0 {
            return Ok(());
        }
        if head.expect_continue {
            self.down
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| Failure::Close)?;
        }
        let old = self.request.len();
        self.request.resize(old + missing, 0);
        self.down
            .read_exact(&mut self.request[old..])
            .await
            .map_err(|_| Failure::Close)?;
        Ok(())
    }

    /// Sends `self.request` upstream and forwards the response. `Ok(false)`: the response was
    /// delimited by the upstream's close, so the downstream connection closes too.
    async fn exchange(&mut self, request: &RequestHead) -> Result<bool, UpstreamError> {
        let mut reused = self.up.is_some();
        let head = loop {
            let up = match self.up.as_mut() {
                Some(up) => up,
                None => {
                    reused = false;
                    self.up_buf.clear();
                    self.up.insert(self.connect().await?)
                }
            };
            if up.write_all(&self.request).await.is_err() {
                self.up = None;
                if reused {
                    continue;
                }
                return Err(UpstreamError::BadGateway);
            }
            match self.read_response_head(request).await {
                Ok(head) => break head,
                // A kept connection the upstream closed meanwhile: once more on a new one,
                // only for a request that may be repeated (RFC 9110 §9.2.2).
                Err(Silent::Nothing) if reused && request.idempotent => {
                    self.up = None;
                }
                Err(_) => {
                    self.up = None;
                    return Err(UpstreamError::BadGateway);
                }
            }
        };
        self.up_buf.consume(head.len);
        let forwarded = self.forward_body(head.framing).await;
        if forwarded.is_err() || head.close_upstream || !self.up_buf.is_empty() {
            // Broken, closing, or bytes beyond the response: not reusable.
            self.up = None;
            self.up_buf.clear();
        }
        forwarded?;
        Ok(head.framing != Framing::UntilClose)
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            TcpStream::connect(self.config.upstream_addr.as_str()),
        )
        .await
        .map_err(|_| UpstreamError::BadGateway)?
        .map_err(|_| UpstreamError::BadGateway)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Reads until a final (non-1xx) response head is buffered and copies it into
    /// `self.response`.
    async fn read_response_head(&mut self, request: &RequestHead) -> Result<ResponseHead, Silent> {
        let Some(up) = self.up.as_mut() else {
            return Err(Silent::Broken);
        };
        let mut received = !self.up_buf.is_empty();
        loop {
            if !self.up_buf.is_empty() {
                match parse_response(self.up_buf.filled(), request, &mut self.response) {
                    Err(()) => return Err(Silent::Broken),
                    Ok(Parsed::Partial) if self.up_buf.is_full() => return Err(Silent::Broken),
                    Ok(Parsed::Partial) => {}
                    Ok(Parsed::Informational(len)) => {
                        // 100 Continue, 103 Early Hints: not forwarded.
                        self.up_buf.consume(len);
                        continue;
                    }
                    Ok(Parsed::Final(head)) => return Ok(head),
                }
            }
            match self.up_buf.fill(up).await {
                Ok(0) | Err(_) if !received => return Err(Silent::Nothing),
                Ok(0) | Err(_) => return Err(Silent::Broken),
                Ok(_) => received = true,
            }
        }
    }

    /// Writes `self.response` (the head) and the body after it downstream.
    async fn forward_body(&mut self, framing: Framing) -> Result<(), UpstreamError> {
        let Some(up) = self.up.as_mut() else {
            return Err(UpstreamError::BadGateway);
        };
        match framing {
            Framing::Empty => write_down(&mut self.down, &self.response).await,
            Framing::Length(length) => {
                let buffered = (self.up_buf.filled().len() as u64).min(length) as usize;
                self.response
                    .extend_from_slice(&self.up_buf.filled()[..buffered]);
                self.up_buf.consume(buffered);
                write_down(&mut self.down, &self.response).await?;
                let mut left = length - buffered as u64;
                while left > 0 {
                    fill_up(&mut self.up_buf, up).await?;
                    let n = (self.up_buf.filled().len() as u64).min(left) as usize;
                    write_down(&mut self.down, &self.up_buf.filled()[..n]).await?;
                    self.up_buf.consume(n);
                    left -= n as u64;
                }
                Ok(())
            }
            Framing::Chunked => {
                let mut chunks = Chunks::default();
                let n = chunks.advance(self.up_buf.filled())?;
                self.response.extend_from_slice(&self.up_buf.filled()[..n]);
                self.up_buf.consume(n);
                write_down(&mut self.down, &self.response).await?;
                while !chunks.done() {
                    fill_up(&mut self.up_buf, up).await?;
                    let n = chunks.advance(self.up_buf.filled())?;
                    write_down(&mut self.down, &self.up_buf.filled()[..n]).await?;
                    self.up_buf.consume(n);
                }
                Ok(())
            }
            Framing::UntilClose => {
                self.response.extend_from_slice(self.up_buf.filled());
                self.up_buf.clear();
                write_down(&mut self.down, &self.response).await?;
                loop {
                    match self.up_buf.fill(up).await {
                        Ok(0) => return Ok(()),
                        Ok(_) => {
                            write_down(&mut self.down, self.up_buf.filled()).await?;
                            self.up_buf.clear();
                        }
                        Err(_) => return Err(UpstreamError::Cut),
                    }
                }
            }
        }
    }
}

/// Why no response head came.
enum Silent {
    /// The connection ended before any byte of a response: a request on a kept connection
    /// may be repeated on a new one.
    Nothing,
    Broken,
}

async fn write_down(down: &mut TcpStream, bytes: &[u8]) -> Result<(), UpstreamError> {
    down.write_all(bytes).await.map_err(|_| UpstreamError::Cut)
}

/// One read of more response body; the end of the stream here cuts the response.
async fn fill_up(buf: &mut Buf, up: &mut TcpStream) -> Result<(), UpstreamError> {
    match buf.fill(up).await {
        Ok(0) | Err(_) => Err(UpstreamError::Cut),
        Ok(_) => Ok(()),
    }
}

/// A response of one status and no body, closing the connection.
fn status_only(status: u16) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .into_bytes()
}

/// The request head at the start of `bytes`, checked and copied into `out` as the upstream
/// request's head. `Ok(None)`: not all of it is there yet.
fn parse_request(
    bytes: &[u8],
    forwarded: &[u8],
    max_body: usize,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, Failure> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Failure::Reject(431)),
        Err(_) => return Err(Failure::Reject(400)),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return Err(Failure::Reject(400));
    };
    if version != 1 {
        return Err(Failure::Reject(505));
    }
    let fields = &*request.headers;
    let mut content_length: Option<u64> = None;
    let mut close = false;
    let mut listed = false;
    let mut host = false;
    let mut expect_continue = false;
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(Failure::Reject(501));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(field.value).ok_or(Failure::Reject(400))?;
            if content_length.is_some_and(|seen| seen != value) {
                return Err(Failure::Reject(400));
            }
            content_length = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            listed = true;
            close |= tokens(field.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"host") {
            if host {
                return Err(Failure::Reject(400));
            }
            host = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = field.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if !host {
        return Err(Failure::Reject(400));
    }
    let body = match content_length {
        Some(length) if length > max_body as u64 => return Err(Failure::Reject(413)),
        Some(length) => length as usize,
        None => 0,
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for field in fields {
        let name = field.name.as_bytes();
        if request_drops(name) || (listed && listed_in_connection(fields, name)) {
            continue;
        }
        push_field(out, name, field.value);
    }
    if let Some(length) = content_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(length.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(forwarded);
    out.extend_from_slice(b"\r\n");
    Ok(Some(RequestHead {
        len,
        body,
        close,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        head_method: method == "HEAD",
        expect_continue,
    }))
}

enum Parsed {
    Partial,
    Informational(usize),
    Final(ResponseHead),
}

/// The response head at the start of `bytes` (the answer to `request`), checked and (unless
/// 1xx) copied into `out` as the downstream response's head. `Err`: malformed, or one the
/// engine does not forward.
fn parse_response(bytes: &[u8], request: &RequestHead, out: &mut Vec<u8>) -> Result<Parsed, ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(()),
    };
    let (Some(version), Some(code)) = (response.version, response.code) else {
        return Err(());
    };
    if code == 101 {
        // Upgrades are not forwarded (the request's `Upgrade` was dropped anyway).
        return Err(());
    }
    if (100..200).contains(&code) {
        return Ok(Parsed::Informational(len));
    }
    let fields = &*response.headers;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut close_upstream = version == 0;
    let mut listed = false;
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            // Chunked only when it is the last coding applied.
            chunked = tokens(field.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(field.value).ok_or(())?;
            if content_length.is_some_and(|seen| seen != value) {
                return Err(());
            }
            content_length = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            listed = true;
            for token in tokens(field.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close_upstream = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    close_upstream = false;
                }
            }
        }
    }
    let framing = if request.head_method || code == 204 || code == 304 {
        Framing::Empty
    } else if coded && chunked {
        Framing::Chunked
    } else if coded {
        Framing::UntilClose
    } else if let Some(length) = content_length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    if coded && content_length.is_some() {
        // Both: `Transfer-Encoding` wins (RFC 9112 §6.3), and the connection is suspect.
        close_upstream = true;
    }
    if framing == Framing::UntilClose {
        close_upstream = true;
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for field in fields {
        let name = field.name.as_bytes();
        // The body's framing is passed through as it came, so its fields stay.
        let framing_field = name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"content-length");
        if framing_field {
            if coded && name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
        } else if response_drops(name) || (listed && listed_in_connection(fields, name)) {
            continue;
        }
        push_field(out, name, field.value);
    }
    if framing == Framing::UntilClose || request.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(ResponseHead {
        len,
        framing,
        close_upstream,
    }))
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The hop-by-hop fields (and `Proxy-*`), the fields the engine sets itself, and `Expect`
/// (the engine reads the body before forwarding, so it answers `100-continue` itself).
fn request_drops(name: &[u8]) -> bool {
    hop_by_hop(name)
        || name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"expect")
        || name.eq_ignore_ascii_case(b"x-forwarded-for")
        || name.eq_ignore_ascii_case(b"x-forwarded-proto")
}

fn response_drops(name: &[u8]) -> bool {
    hop_by_hop(name)
}

/// Connection, Keep-Alive, TE, Trailer, Upgrade, Transfer-Encoding and every `Proxy-*` name.
fn hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => name.eq_ignore_ascii_case(b"trailer") || name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => name.len() > 6 && name[..6].eq_ignore_ascii_case(b"proxy-"),
    }
}

/// Whether a `Connection` field among `fields` lists `name` (never the framing fields: the
/// engine frames bodies itself).
fn listed_in_connection(fields: &[httparse::Header<'_>], name: &[u8]) -> bool {
    if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"host") {
        return false;
    }
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .any(|f| tokens(f.value).any(|t| t.eq_ignore_ascii_case(name)))
}

/// The comma-separated tokens of a field value, trimmed, empty ones skipped.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits only (at most 18, so no overflow).
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

/// Where a chunked body stands, parsed only to find its end (the bytes pass through as
/// they came).
#[derive(Default)]
struct Chunks {
    state: ChunkState,
    /// Bytes of the current size line or trailer section so far.
    line: usize,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    /// In a chunk-size line: its value so far, its digits, past the digits (an extension).
    #[default]
    SizeStart,
    Size {
        value: u64,
        digits: u8,
        extension: bool,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

impl Chunks {
    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }

    /// Reads `bytes` up to the end of the body at most; returns how many belong to it.
    fn advance(&mut self, bytes: &[u8]) -> Result<usize, UpstreamError> {
        let mut at = 0;
        while at < bytes.len() {
            if let ChunkState::Data(left) = self.state {
                let n = (bytes.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                at += n;
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            if matches!(self.state, ChunkState::Done) {
                break;
            }
            let b = bytes[at];
            at += 1;
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(UpstreamError::Cut);
            }
            self.state = match self.state {
                ChunkState::SizeStart => match hex(b) {
                    Some(d) => ChunkState::Size {
                        value: d,
                        digits: 1,
                        extension: false,
                    },
                    None => return Err(UpstreamError::Cut),
                },
                ChunkState::Size {
                    value,
                    digits,
                    extension,
                } => match (b, hex(b)) {
                    (b'\r', _) => ChunkState::SizeLf { value },
                    (_, Some(d)) if !extension => {
                        if digits >= 15 {
                            return Err(UpstreamError::Cut);
                        }
                        ChunkState::Size {
                            value: value * 16 + d,
                            digits: digits + 1,
                            extension,
                        }
                    }
                    (b'\n', _) => return Err(UpstreamError::Cut),
                    (b';' | b' ' | b'\t', _) => ChunkState::Size {
                        value,
                        digits,
                        extension: true,
                    },
                    _ if extension => ChunkState::Size {
                        value,
                        digits,
                        extension,
                    },
                    _ => return Err(UpstreamError::Cut),
                },
                ChunkState::SizeLf { value } => {
                    if b != b'\n' {
                        return Err(UpstreamError::Cut);
                    }
                    self.line = 0;
                    if value == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data(value)
                    }
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => {
                    self.line = 0;
                    ChunkState::SizeStart
                }
                ChunkState::TrailerStart if b == b'\r' => ChunkState::FinalLf,
                ChunkState::TrailerStart | ChunkState::Trailer if b != b'\r' => ChunkState::Trailer,
                ChunkState::Trailer => ChunkState::TrailerLf,
                ChunkState::TrailerLf if b == b'\n' => ChunkState::TrailerStart,
                ChunkState::FinalLf if b == b'\n' => ChunkState::Done,
                _ => return Err(UpstreamError::Cut),
            };
        }
        Ok(at)
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

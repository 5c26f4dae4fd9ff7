//! One raw HTTP/1.x request read from a file or stdin, for `sign` and `verify`.
//!
//! The request line and header block are parsed with `httparse`; the body is `Content-Length`
//! bytes, or everything up to EOF when there is no `Content-Length`. The header fields are kept
//! exactly as received (order, name case, value bytes) so that `sign` can write them back
//! unchanged. Every size is bounded by [`Limits`], so a huge or endless input costs bounded
//! memory and ends in a clear error.

use std::fmt;
use std::io::Read;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Uri, Version};

/// Input size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of request line plus header block, including the empty line.
    pub max_header_bytes: usize,
    /// Number of header field lines.
    pub max_headers: usize,
    /// Body bytes.
    pub max_body_bytes: usize,
}

/// Default header-block limit: 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default number of header field lines.
pub const DEFAULT_MAX_HEADERS: usize = 256;
/// Default body limit: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum RawHttpError {
    /// Reading the input failed.
    Io(std::io::Error),
    /// The input is not an HTTP/1.x request (no request line, bad syntax, truncated headers).
    Malformed(String),
    /// The request line and headers exceed the limit.
    HeadersTooLarge(usize),
    /// More header lines than allowed.
    TooManyHeaders(usize),
    /// The body exceeds the limit.
    BodyTooLarge(usize),
}

impl fmt::Display for RawHttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawHttpError::Io(e) => write!(f, "cannot read the request: {e}"),
            RawHttpError::Malformed(why) => write!(f, "not an HTTP/1.1 request: {why}"),
            RawHttpError::HeadersTooLarge(max) => {
                write!(
                    f,
                    "request line and headers exceed {max} bytes (--max-header-bytes)"
                )
            }
            RawHttpError::TooManyHeaders(max) => write!(f, "more than {max} header lines"),
            RawHttpError::BodyTooLarge(max) => {
                write!(f, "body exceeds {max} bytes (--max-body-bytes)")
            }
        }
    }
}

impl std::error::Error for RawHttpError {}

/// A request as read: request line and header fields verbatim, and the body.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The method token as received.
    pub method: String,
    /// The request target as received (origin-form `/path?query` or absolute-form).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Header fields in order, names in their original case, values as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the body length came from `Content-Length` (else: read to EOF).
    pub has_content_length: bool,
    /// The body.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The request as `http` parts (header names lower-cased by `http`, order per name kept).
    pub fn to_parts(&self) -> Result<http::request::Parts, RawHttpError> {
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| RawHttpError::Malformed(format!("invalid method {:?}", self.method)))?;
        let uri: Uri = self.target.parse().map_err(|_| {
            RawHttpError::Malformed(format!("invalid request target {:?}", self.target))
        })?;
        let mut builder =
            http::Request::builder()
                .method(method)
                .uri(uri)
                .version(if self.minor_version == 0 {
                    Version::HTTP_10
                } else {
                    Version::HTTP_11
                });
        let headers = builder
            .headers_mut()
            .ok_or_else(|| RawHttpError::Malformed("invalid request line".into()))?;
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RawHttpError::Malformed(format!("invalid header name {name:?}")))?;
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| RawHttpError::Malformed(format!("invalid value of header {name}")))?;
            headers.append(name, value);
        }
        builder
            .body(())
            .map(|r| r.into_parts().0)
            .map_err(|e| RawHttpError::Malformed(e.to_string()))
    }
}

/// Reads one request from `input` within `limits`.
pub fn read_request(mut input: impl Read, limits: Limits) -> Result<RawRequest, RawHttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut chunk = [0u8; 8 * 1024];
    let mut eof = false;
    loop {
        // Parse what is there; a complete header block ends the loop. The slots borrow from
        // `buf`, so they are made afresh for each attempt.
        let mut header_slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
        let mut req = httparse::Request::new(&mut header_slots);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                if head_len > limits.max_header_bytes {
                    return Err(RawHttpError::HeadersTooLarge(limits.max_header_bytes));
                }
                let method = req.method.unwrap_or_default().to_owned();
                let target = req.path.unwrap_or_default().to_owned();
                let minor_version = req.version.unwrap_or(1);
                let headers: Vec<(String, Vec<u8>)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect();
                let rest = buf.split_off(head_len);
                return read_body(
                    method,
                    target,
                    minor_version,
                    headers,
                    rest,
                    eof,
                    input,
                    limits,
                );
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > limits.max_header_bytes {
                    return Err(RawHttpError::HeadersTooLarge(limits.max_header_bytes));
                }
                if eof {
                    return Err(RawHttpError::Malformed(
                        if buf.iter().all(u8::is_ascii_whitespace) {
                            "empty input (expected a request line such as `GET / HTTP/1.1`)".into()
                        } else {
                            "truncated: no empty line after the headers".into()
                        },
                    ));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RawHttpError::TooManyHeaders(limits.max_headers))
            }
            Err(e) => {
                return Err(RawHttpError::Malformed(match e {
                    httparse::Error::Version => "bad HTTP version in the request line".to_owned(),
                    httparse::Error::Token | httparse::Error::NewLine => {
                        "bad request line (expected `METHOD target HTTP/1.1`)".to_owned()
                    }
                    other => format!("{other}"),
                }))
            }
        }
        // Read no further than one byte past the limit: enough to know it was exceeded.
        let room = limits
            .max_header_bytes
            .saturating_add(1)
            .saturating_sub(buf.len())
            .min(chunk.len());
        let n = read_some(&mut input, &mut chunk[..room.max(1)])?;
        if n == 0 {
            eof = true;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[allow(clippy::too_many_arguments)]
fn read_body(
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
    mut body: Vec<u8>,
    eof: bool,
    input: impl Read,
    limits: Limits,
) -> Result<RawRequest, RawHttpError> {
    if headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(RawHttpError::Malformed(
            "Transfer-Encoding is not supported here; give the body with Content-Length".into(),
        ));
    }
    let mut content_length: Option<usize> = None;
    for (name, value) in &headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let text = std::str::from_utf8(value).unwrap_or("").trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RawHttpError::Malformed(format!(
                "invalid Content-Length {:?}",
                String::from_utf8_lossy(value)
            )));
        }
        let n: u64 = text
            .parse()
            .map_err(|_| RawHttpError::BodyTooLarge(limits.max_body_bytes))?;
        let n =
            usize::try_from(n).map_err(|_| RawHttpError::BodyTooLarge(limits.max_body_bytes))?;
        if content_length.is_some_and(|prev| prev != n) {
            return Err(RawHttpError::Malformed(
                "conflicting Content-Length fields".into(),
            ));
        }
        content_length = Some(n);
    }
    let has_content_length = content_length.is_some();
    match content_length {
        Some(n) => {
            if n > limits.max_body_bytes {
                return Err(RawHttpError::BodyTooLarge(limits.max_body_bytes));
            }
            if body.len() < n && !eof {
                let want = (n - body.len()) as u64;
                input
                    .take(want)
                    .read_to_end(&mut body)
                    .map_err(RawHttpError::Io)?;
            }
            if body.len() < n {
                return Err(RawHttpError::Malformed(format!(
                    "body is {} bytes, shorter than Content-Length {n}",
                    body.len()
                )));
            }
            // Bytes after Content-Length belong to no request of ours (as on a connection).
            body.truncate(n);
        }
        None => {
            if body.len() > limits.max_body_bytes {
                return Err(RawHttpError::BodyTooLarge(limits.max_body_bytes));
            }
            if !eof {
                let room = (limits.max_body_bytes.saturating_add(1) - body.len()) as u64;
                input
                    .take(room)
                    .read_to_end(&mut body)
                    .map_err(RawHttpError::Io)?;
                if body.len() > limits.max_body_bytes {
                    return Err(RawHttpError::BodyTooLarge(limits.max_body_bytes));
                }
            }
        }
    }
    Ok(RawRequest {
        method,
        target,
        minor_version,
        headers,
        has_content_length,
        body,
    })
}

fn read_some(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, RawHttpError> {
    loop {
        match input.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RawHttpError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &[u8]) -> Result<RawRequest, RawHttpError> {
        read_request(input, Limits::default())
    }

    #[test]
    fn content_length_body_and_verbatim_headers() {
        let r = read(b"POST /a?b=c HTTP/1.1\r\nHost: Example.com\r\nX-Thing: One\r\nx-thing: two\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, "/a?b=c");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.headers[1], ("X-Thing".to_owned(), b"One".to_vec()));
        assert_eq!(r.headers[2], ("x-thing".to_owned(), b"two".to_vec()));
        let parts = r.to_parts().unwrap();
        let all: Vec<_> = parts.headers.get_all("x-thing").iter().collect();
        assert_eq!(all, ["One", "two"]);
    }

    #[test]
    fn body_to_eof_without_content_length() {
        let r = read(b"PUT / HTTP/1.1\r\nHost: h\r\n\r\nrest of it").unwrap();
        assert!(!r.has_content_length);
        assert_eq!(r.body, b"rest of it");
    }

    #[test]
    fn rejections() {
        assert!(matches!(read(b""), Err(RawHttpError::Malformed(_))));
        assert!(matches!(
            read(b"\x00\x01garbage\xff"),
            Err(RawHttpError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nHost: h\r\n"),
            Err(RawHttpError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort"),
            Err(RawHttpError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(RawHttpError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            Err(RawHttpError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Err(RawHttpError::Malformed(_))
        ));
        let small = Limits {
            max_header_bytes: 64,
            max_headers: 2,
            max_body_bytes: 4,
        };
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert!(matches!(
            read_request(long.as_bytes(), small),
            Err(RawHttpError::HeadersTooLarge(64))
        ));
        assert!(matches!(
            read_request(
                &b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"[..],
                small
            ),
            Err(RawHttpError::TooManyHeaders(2))
        ));
        assert!(matches!(
            read_request(
                &b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
                small
            ),
            Err(RawHttpError::BodyTooLarge(4))
        ));
        assert!(matches!(
            read_request(&b"GET / HTTP/1.1\r\n\r\nhello"[..], small),
            Err(RawHttpError::BodyTooLarge(4))
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(RawHttpError::BodyTooLarge(_))
        ));
    }
}

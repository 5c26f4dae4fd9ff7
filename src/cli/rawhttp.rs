//! One raw HTTP/1.x request read from a file or stdin, for `sign` and `verify`.
//!
//! The request line and header block are parsed with `httparse`; the body is `Content-Length`
//! bytes, or everything up to EOF when there is no `Content-Length` (except a lone line break,
//! `\n` or `\r\n`: an editor's final newline after the header block, not a body). One request
//! per input: after a `Content-Length` body only one line break (an editor's final newline) may
//! follow. A request line or header line that cannot be parsed is named by its line number and
//! its problem (never quoting a header value, which may hold a credential).
//! The header fields are kept exactly as received (order, name case, value bytes) so that
//! `sign` can write them back unchanged. Every size is bounded by [`Limits`], so a huge or
//! endless input costs bounded memory and ends in a clear error.

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
                return Err(RawHttpError::Malformed(diagnose(&buf).unwrap_or_else(
                    || match e {
                        httparse::Error::Version => {
                            "bad HTTP version in the request line".to_owned()
                        }
                        httparse::Error::Token | httparse::Error::NewLine => {
                            "bad request line (expected `METHOD target HTTP/1.1`)".to_owned()
                        }
                        other => format!("{other}"),
                    },
                )))
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

/// Bytes tolerated after a `Content-Length` body: one line break (`\n` or `\r\n`), as a text
/// editor leaves at the end of a file. (RFC 9112 §2.2 has servers ignore an empty line before
/// a request line, so it starts no second request.)
const MAX_TRAILING: usize = 2;

#[allow(clippy::too_many_arguments)]
fn read_body(
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
    mut body: Vec<u8>,
    eof: bool,
    mut input: impl Read,
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
            // The body and at most `MAX_TRAILING + 1` bytes after it: enough to tell whether
            // only a line break follows, without reading (or waiting for) more.
            if !eof {
                let want = n
                    .saturating_add(MAX_TRAILING + 1)
                    .saturating_sub(body.len()) as u64;
                (&mut input)
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
            // Anything else after the body would be a second (pipelined) request or a wrong
            // Content-Length: `verify` could not check it and `sign` would drop it, so both
            // refuse rather than answer for part of the input.
            let trailing = body.split_off(n);
            if !matches!(trailing.as_slice(), b"" | b"\n" | b"\r\n") {
                return Err(RawHttpError::Malformed(format!(
                    "input continues after the {n}-byte body that Content-Length gives (one \
                     request per input; a second, pipelined request cannot be signed or \
                     verified here)"
                )));
            }
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
            // A lone line break after the header block is an editor's final newline (or a
            // second empty line), not a body: read as one, a `GET` would be signed with a
            // one-byte body and a `Content-Length: 1` it never had, and a saved signed `GET`
            // would verify as `digest_mismatch`. (A request with neither `Content-Length` nor
            // `Transfer-Encoding` has no body at all on the wire, RFC 9112 §6.3.)
            if matches!(body.as_slice(), b"\n" | b"\r\n") {
                body.clear();
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

/// Names the line of `head` (the input read so far, which `httparse` refused) that is at fault,
/// and why, for the usual hand-written mistakes: a byte order mark, a space inside the target, a
/// missing or unknown version, a folded or indented header line, a space before a header's `:`,
/// a line without `:`, a control character in a value. Header values are never quoted (they may
/// hold credentials); a header name is, escaped and cut short. `None` when none of these is
/// found (the caller then gives `httparse`'s own reason).
fn diagnose(head: &[u8]) -> Option<String> {
    if head.starts_with(b"\xEF\xBB\xBF") {
        return Some(
            "the input starts with a UTF-8 byte order mark (an editor's \"UTF-8 with BOM\"); \
             save it without one"
                .to_owned(),
        );
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        // Empty lines before the request line are skipped, as httparse does (RFC 9112 §2.2).
        .skip_while(|(_, line)| line.is_empty());
    let (number, request_line) = lines.next()?;
    let words: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    if words.len() > 3 {
        return Some(format!(
            "line {number}: the request line has more than two spaces (expected `METHOD target \
             HTTP/1.1`; a space inside the target is written %20)"
        ));
    }
    if words.len() < 3 {
        return Some(format!(
            "line {number}: the request line is not `METHOD target HTTP/1.1` (no HTTP version)"
        ));
    }
    if !matches!(words.get(2), Some(&(b"HTTP/1.1" | b"HTTP/1.0"))) {
        return Some(format!(
            "line {number}: bad HTTP version in the request line (expected HTTP/1.1 or HTTP/1.0)"
        ));
    }
    for (number, line) in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Some(format!(
                "line {number}: a header line starting with whitespace (a folded or indented \
                 line, obsolete and refused: RFC 9112 §5.2); write each field on one line"
            ));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Some(format!("line {number}: a header line without `:`"));
        };
        let (name, value) = line.split_at(colon);
        let shown: String = String::from_utf8_lossy(name)
            .chars()
            .take(64)
            .flat_map(char::escape_debug)
            .collect();
        if name.is_empty() {
            return Some(format!("line {number}: a header line with an empty name"));
        }
        // Not quoted: what stands before the first `:` of such a line may be a credential
        // (`Authorization Basic user:password`, its `:` forgotten).
        if name
            .trim_ascii_end()
            .iter()
            .any(|&b| b == b' ' || b == b'\t')
        {
            return Some(format!(
                "line {number}: whitespace inside a header name (a header line is `Name: value`)"
            ));
        }
        if name.ends_with(b" ") || name.ends_with(b"\t") {
            return Some(format!(
                "line {number}: whitespace between the header name \"{}\" and its `:` (not \
                 allowed: RFC 9112 §5.1)",
                shown.trim_end()
            ));
        }
        if HeaderName::from_bytes(name).is_err() {
            return Some(format!(
                "line {number}: invalid header name \"{shown}\" (letters, digits and \
                 !#$%&'*+-.^_`|~ only)"
            ));
        }
        if let Some(&bad) = value
            .iter()
            .skip(1)
            .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Some(format!(
                "line {number}: the value of header \"{shown}\" holds a control character \
                 (byte 0x{bad:02x}{})",
                if bad == b'\r' {
                    ": a carriage return that does not end the line"
                } else {
                    ""
                }
            ));
        }
    }
    None
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
        let r = read(b"POST /a?b=c HTTP/1.1\r\nHost: Example.com\r\nX-Thing: One\r\nx-thing: two\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, "/a?b=c");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.headers[1], ("X-Thing".to_owned(), b"One".to_vec()));
        assert_eq!(r.headers[2], ("x-thing".to_owned(), b"two".to_vec()));
        let parts = r.to_parts().unwrap();
        let all: Vec<_> = parts.headers.get_all("x-thing").iter().collect();
        assert_eq!(all, ["One", "two"]);
    }

    /// After a Content-Length body only one line break may follow (also when the rest arrives
    /// in later reads than the header block).
    #[test]
    fn bytes_after_the_content_length_body() {
        let head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n".to_vec();
        for tail in [&b""[..], b"\n", b"\r\n"] {
            let input = [&head[..], b"hello", tail].concat();
            assert_eq!(read(&input).unwrap().body, b"hello", "{tail:?}");
            let slow = SlowReader(&input);
            assert_eq!(
                read_request(slow, Limits::default()).unwrap().body,
                b"hello"
            );
        }
        for tail in [
            &b"X"[..],
            b"\n\n",
            b"\r\n\r\n",
            b" ",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let input = [&head[..], b"hello", tail].concat();
            let err = read(&input).unwrap_err();
            assert!(
                err.to_string().contains("continues after the 5-byte body"),
                "{tail:?}: {err}"
            );
            let slow = SlowReader(&input);
            assert!(read_request(slow, Limits::default()).is_err(), "{tail:?}");
        }
    }

    /// Hands out one byte per read, as a pipe may.
    struct SlowReader<'a>(&'a [u8]);

    impl Read for SlowReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
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

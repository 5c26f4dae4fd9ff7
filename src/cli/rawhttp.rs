//! One raw HTTP/1.x request read from a file or stdin, for `sign` and `verify`.
//!
//! The request line and header block are parsed with `httparse`; the body is `Content-Length`
//! bytes, the chunks of `Transfer-Encoding: chunked` decoded, or everything up to EOF when there
//! is neither (except a lone line break, `\n` or `\r\n`: an editor's final newline after the
//! header block, not a body). One request per input: after a `Content-Length` or chunked body
//! only one line break (an editor's final newline) may follow. A request line or header line
//! that cannot be parsed is named by its line number and its problem (never quoting a header
//! value, which may hold a credential).
//! What is kept, for `sign` to write back: the method, request target and version as received;
//! the header fields in their order, each name in its case and each value's bytes, minus the
//! whitespace around the value (`httparse` drops it); the body's content. Not kept, so `sign`'s
//! output is a normalised form of its input, not a byte-for-byte copy: the layout of each line
//! (`sign` writes `Name: value` and CRLF, so `Host:h` becomes `Host: h` and a bare-LF line ends
//! in CRLF), empty lines before the request line and a final line break after the message, and
//! the framing of the body (a chunked body is written as one chunk, its chunk boundaries and
//! extensions dropped; a body read to EOF gets a `Content-Length`). Every size is bounded by
//! [`Limits`], so a huge or endless input costs bounded memory and ends in a clear error.

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
            RawHttpError::TooManyHeaders(max) => {
                write!(f, "more than {max} header lines (--max-headers)")
            }
            RawHttpError::BodyTooLarge(max) => {
                write!(f, "body exceeds {max} bytes (--max-body-bytes)")
            }
        }
    }
}

impl std::error::Error for RawHttpError {}

/// A request as read: the request line's parts and the header fields as received (values
/// without the whitespace around them), and the body's content.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The method token as received.
    pub method: String,
    /// The request target as received (origin-form `/path?query` or absolute-form).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Header fields in order, names in their original case, values as received minus the
    /// whitespace around them.
    pub headers: Vec<(String, Vec<u8>)>,
    /// How the body was delimited in the input.
    pub framing: BodyFraming,
    /// The body (for [`BodyFraming::Chunked`], the chunks' data joined: the content that
    /// `Content-Digest` covers, RFC 9530 §2).
    pub body: Vec<u8>,
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// `Content-Length` bytes.
    ContentLength,
    /// `Transfer-Encoding: chunked`: chunks, ended by a zero-size chunk.
    Chunked,
    /// Neither field: everything up to the end of the input.
    UntilEof,
}

impl RawRequest {
    /// The request as `http` parts (header names lower-cased by `http`, order per name kept).
    /// Malformed: a request target that is not a URI (one `http` cannot represent, one with
    /// bytes that are not ASCII, one with a fragment), and a header block with more distinct
    /// field names than an `http` header map holds.
    pub fn to_parts(&self) -> Result<http::request::Parts, RawHttpError> {
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| RawHttpError::Malformed(format!("invalid method {:?}", self.method)))?;
        // `http::Uri` drops a fragment without a word, so `/x#f` would be signed as `/x` and
        // written back with its `#f`, which no server receives as sent.
        if self.target.contains('#') {
            return Err(RawHttpError::Malformed(format!(
                "request target {:?} has a fragment (`#...`), which is never sent in a request \
                 target (RFC 9112 §3.2): remove it",
                self.target
            )));
        }
        // `http::Uri` takes UTF-8 in a path or query, which no URI holds (RFC 3986 §2): the
        // signer would refuse such a `@path` later, the verifier answer `malformed_signature`.
        if !self.target.is_ascii() {
            return Err(RawHttpError::Malformed(format!(
                "invalid request target {:?}: not ASCII, as a URI is (RFC 3986 §2): \
                 percent-encode its UTF-8 bytes (`é` as %C3%A9)",
                self.target
            )));
        }
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
            // `append` panics past the map's size limit (24,576 distinct names), which
            // --max-headers and --max-header-bytes can let through.
            headers.try_append(name, value).map_err(|_| {
                RawHttpError::Malformed(format!(
                    "more than {} distinct header field names (the most this tool can hold)",
                    headers.keys_len()
                ))
            })?;
        }
        builder
            .body(())
            .map(|r| r.into_parts().0)
            .map_err(|e| RawHttpError::Malformed(e.to_string()))
    }
}

/// Reads one request from `input` within `limits`. The binary calls
/// [`read_request_keeping_head`]; this is for the fuzz target (fuzz/src/checks.rs includes this
/// file) and the tests.
#[allow(dead_code)]
pub fn read_request(input: impl Read, limits: Limits) -> Result<RawRequest, RawHttpError> {
    read_request_keeping_head(input, limits, &mut None)
}

/// [`read_request`], which also leaves in `head` the request as its header block gives it (the
/// body empty) once that block is read: `verify` checks the signature of a request whose body
/// is over the limit before it answers `body_too_large`, as the VerifyLayer does (headers and
/// MAC first: the first failure decides, docs/PROTOCOL.md §6).
pub fn read_request_keeping_head(
    mut input: impl Read,
    limits: Limits,
    head: &mut Option<RawRequest>,
) -> Result<RawRequest, RawHttpError> {
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
                *head = Some(RawRequest {
                    method: method.clone(),
                    target: target.clone(),
                    minor_version,
                    headers: headers.clone(),
                    framing: BodyFraming::UntilEof,
                    body: Vec::new(),
                });
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
    let chunked = is_chunked(&headers, minor_version)?;
    let mut content_length: Option<usize> = None;
    for (name, value) in &headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let text = std::str::from_utf8(value).unwrap_or("").trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            // The value is not quoted (header values never are here: one may hold a
            // credential); what is wrong with it is said instead.
            return Err(RawHttpError::Malformed(
                "invalid Content-Length (not a decimal number)".to_owned(),
            ));
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
    if chunked && content_length.is_some() {
        // RFC 9112 §6.3: a server may take either framing, and a request read one way here and
        // the other way by the server it is sent to is the request smuggling pattern.
        return Err(RawHttpError::Malformed(
            "both Content-Length and Transfer-Encoding (ambiguous framing, RFC 9112 §6.3): \
             give only one"
                .into(),
        ));
    }
    let framing = match (chunked, content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(_)) => BodyFraming::ContentLength,
        (false, None) => BodyFraming::UntilEof,
    };
    if chunked {
        // The bytes already read after the header block first, then the rest of the input
        // (unless it already ended: a terminal would wait for more).
        let start = std::io::Cursor::new(body);
        let body = if eof {
            read_chunked(start, limits)?
        } else {
            read_chunked(start.chain(input), limits)?
        };
        return Ok(RawRequest {
            method,
            target,
            minor_version,
            headers,
            framing,
            body,
        });
    }
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
        framing,
        body,
    })
}

/// Whether the request's body is chunked: `Transfer-Encoding` present (all its field lines
/// together) and exactly `chunked`. Any other transfer coding is refused, as is the field in an
/// HTTP/1.0 request (RFC 9112 §6.1: its framing cannot be trusted there).
fn is_chunked(headers: &[(String, Vec<u8>)], minor_version: u8) -> Result<bool, RawHttpError> {
    let mut codings = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, value)| value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .peekable();
    if codings.peek().is_none() {
        return Ok(false);
    }
    if minor_version == 0 {
        return Err(RawHttpError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1: not HTTP/1.0 framing); \
             give the body with Content-Length"
                .into(),
        ));
    }
    let codings: Vec<&[u8]> = codings.collect();
    if !matches!(codings.as_slice(), [only] if only.eq_ignore_ascii_case(b"chunked")) {
        // Not quoted, as no header value is.
        return Err(RawHttpError::Malformed(
            "Transfer-Encoding other than `chunked` alone (no other transfer coding is \
             supported here; the body's content is what is signed)"
                .into(),
        ));
    }
    Ok(true)
}

/// Appends `body` to `out` as a chunked body: one chunk holding all of it (none when it is
/// empty), then the last chunk and the empty line; no extensions, no trailer fields. What
/// [`read_request`] decodes back to `body`.
pub fn encode_chunked(body: &[u8], out: &mut Vec<u8>) {
    if !body.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
}

/// Longest chunk-size line (size, extensions, line end) read: chunk extensions are skipped,
/// never kept, and a longer line is refused rather than buffered.
pub const MAX_CHUNK_LINE: usize = 4096;

/// The chunked body (RFC 9112 §7.1) from `input`: the chunks' data, joined, within
/// `limits.max_body_bytes`. Chunk extensions are skipped; trailer fields are refused (they could
/// be neither signed nor verified here); after the last chunk only one line break may follow.
/// Line ends are CRLF or bare LF, as in the header block.
fn read_chunked(input: impl Read, limits: Limits) -> Result<Vec<u8>, RawHttpError> {
    let mut reader = std::io::BufReader::new(input);
    let mut body = Vec::new();
    let mut line = Vec::new();
    for number in 1usize.. {
        read_chunk_line(&mut reader, &mut line, || {
            format!("the size line of chunk {number}")
        })?;
        let size_text = match line.iter().position(|&b| b == b';') {
            // Whitespace may stand before an extension's `;` (BWS), nowhere else.
            Some(semicolon) => line[..semicolon].trim_ascii_end(),
            None => &line[..],
        };
        if size_text.is_empty()
            || size_text.len() > 16
            || !size_text.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(RawHttpError::Malformed(format!(
                "chunk {number}: the size line is not a hexadecimal size (1 to 16 digits, then \
                 optional `;extensions`)"
            )));
        }
        // At most 16 hex digits: fits a u64.
        let size = std::str::from_utf8(size_text)
            .ok()
            .and_then(|text| u64::from_str_radix(text, 16).ok())
            .ok_or_else(|| RawHttpError::Malformed(format!("chunk {number}: invalid size")))?;
        if size == 0 {
            break;
        }
        let room = limits.max_body_bytes - body.len();
        if usize::try_from(size).map_or(true, |size| size > room) {
            return Err(RawHttpError::BodyTooLarge(limits.max_body_bytes));
        }
        let before = body.len();
        (&mut reader)
            .take(size)
            .read_to_end(&mut body)
            .map_err(RawHttpError::Io)?;
        let got = body.len() - before;
        if (got as u64) < size {
            return Err(RawHttpError::Malformed(format!(
                "truncated: chunk {number} ends after {got} of its {size} bytes"
            )));
        }
        read_chunk_line(&mut reader, &mut line, || {
            format!("the line end after chunk {number}'s data")
        })?;
        if !line.is_empty() {
            return Err(RawHttpError::Malformed(format!(
                "chunk {number}: more data than its size line gives ({size} bytes)"
            )));
        }
    }
    read_chunk_line(&mut reader, &mut line, || {
        "the empty line after the last chunk".to_owned()
    })?;
    if !line.is_empty() {
        return Err(RawHttpError::Malformed(
            "trailer fields after the last chunk are not supported here (they could be neither \
             signed nor verified)"
                .into(),
        ));
    }
    let mut trailing = Vec::new();
    reader
        .take(MAX_TRAILING as u64 + 1)
        .read_to_end(&mut trailing)
        .map_err(RawHttpError::Io)?;
    if !matches!(trailing.as_slice(), b"" | b"\n" | b"\r\n") {
        return Err(RawHttpError::Malformed(
            "input continues after the chunked body's last chunk (one request per input; a \
             second, pipelined request cannot be signed or verified here)"
                .into(),
        ));
    }
    Ok(body)
}

/// One line of the chunked framing into `line`, without its line end (CRLF or LF); `what`
/// names it in the error when the input ends first or the line exceeds [`MAX_CHUNK_LINE`].
fn read_chunk_line(
    reader: &mut impl std::io::BufRead,
    line: &mut Vec<u8>,
    what: impl Fn() -> String,
) -> Result<(), RawHttpError> {
    line.clear();
    let read =
        std::io::BufRead::read_until(&mut Read::take(reader, MAX_CHUNK_LINE as u64), b'\n', line)
            .map_err(RawHttpError::Io)?;
    if line.pop() != Some(b'\n') {
        // No line end within the limit: the line goes on (all of it read), or the input ended.
        return Err(RawHttpError::Malformed(if read == MAX_CHUNK_LINE {
            format!("{}: longer than {MAX_CHUNK_LINE} bytes", what())
        } else {
            format!("truncated chunked body: the input ends in {}", what())
        }));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(())
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

    /// A chunked body is decoded (extensions skipped, CRLF or bare LF line ends), the same
    /// whether the input comes at once or a byte per read.
    #[test]
    fn chunked_body_is_decoded() {
        let head = "POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (chunks, expected) in [
            (
                "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                &b"hello world"[..],
            ),
            ("5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
            ("5 ;a ;b=\"c d\"\r\nhello\r\n000\r\n\r\n", b"hello"),
            ("5\nhello\n0\n\n", b"hello"),
            ("A\r\n0123456789\r\n0\r\n\r\n\r\n", b"0123456789"),
            ("00000a\r\n0123456789\r\n0\r\n\r\n\n", b"0123456789"),
            ("0\r\n\r\n", b""),
        ] {
            let input = format!("{head}{chunks}");
            let r = read(input.as_bytes()).unwrap();
            assert_eq!(r.framing, BodyFraming::Chunked, "{chunks:?}");
            assert_eq!(r.body, expected, "{chunks:?}");
            let slow = read_request(SlowReader(input.as_bytes()), Limits::default()).unwrap();
            assert_eq!(slow.body, expected, "{chunks:?}");
        }
        // The coding's name is case-insensitive.
        let r = read(b"PUT / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(r.body, b"x");
    }

    proptest::proptest! {
        /// Any body, cut into chunks anywhere (with or without extensions, CRLF or LF line
        /// ends), decodes to itself; so does [`encode_chunked`]'s single chunk. Whole or a
        /// byte per read alike.
        #[test]
        fn chunked_bodies_round_trip(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            cuts in proptest::collection::vec(0usize..2048, 0..8),
            extensions in proptest::bool::ANY,
            bare_lf in proptest::bool::ANY,
        ) {
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.push(0);
            cuts.push(body.len());
            cuts.sort_unstable();
            cuts.dedup();
            let head = b"PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
            let mut cut_up = head.to_vec();
            for pair in cuts.windows(2) {
                let chunk = &body[pair[0]..pair[1]];
                let ext = if extensions { ";n=\"v\"" } else { "" };
                cut_up.extend_from_slice(format!("{:X}{ext}{eol}", chunk.len()).as_bytes());
                cut_up.extend_from_slice(chunk);
                cut_up.extend_from_slice(eol.as_bytes());
            }
            cut_up.extend_from_slice(format!("0{eol}{eol}").as_bytes());
            let mut single = head.to_vec();
            encode_chunked(&body, &mut single);
            for input in [&cut_up, &single] {
                let whole = read(input).unwrap();
                proptest::prop_assert_eq!(&whole.body, &body);
                proptest::prop_assert_eq!(whole.framing, BodyFraming::Chunked);
                let slow = read_request(SlowReader(input), Limits::default()).unwrap();
                proptest::prop_assert_eq!(&slow.body, &body);
            }
        }
    }

    /// Every way a chunked request can be wrong is refused with a message naming it.
    #[test]
    fn broken_chunked_bodies_are_refused() {
        let te = "Transfer-Encoding: chunked\r\n";
        for (head_fields, chunks, message) in [
            (
                "Transfer-Encoding: gzip, chunked\r\n",
                "0\r\n\r\n",
                "other than `chunked`",
            ),
            (
                "Transfer-Encoding: chunked, identity\r\n",
                "0\r\n\r\n",
                "other than",
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
                "other than",
            ),
            ("Transfer-Encoding: identity\r\n", "", "other than"),
            ("Transfer-Encoding:\r\n", "", "other than"),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
                "both Content-Length",
            ),
            (te, "", "ends in the size line of chunk 1"),
            (te, "5\r\nhel", "chunk 1 ends after 3 of its 5 bytes"),
            (te, "5\r\nhello", "ends in the line end after chunk 1"),
            (
                te,
                "5\r\nhello world\r\n0\r\n\r\n",
                "chunk 1: more data than its size line",
            ),
            (te, "5\r\nhello\r\n", "ends in the size line of chunk 2"),
            (te, "0\r\n", "ends in the empty line after the last chunk"),
            (
                te,
                "x\r\n",
                "chunk 1: the size line is not a hexadecimal size",
            ),
            (te, "\r\n", "chunk 1: the size line is not"),
            (te, "-5\r\nhello\r\n0\r\n\r\n", "not a hexadecimal size"),
            (te, "+5\r\nhello\r\n0\r\n\r\n", "not a hexadecimal size"),
            (te, "5 \r\nhello\r\n0\r\n\r\n", "not a hexadecimal size"),
            (te, "0x5\r\nhello\r\n0\r\n\r\n", "not a hexadecimal size"),
            (
                te,
                "00000000000000005\r\nhello\r\n0\r\n\r\n",
                "1 to 16 digits",
            ),
            (te, "0\r\nX-Auth-User: mallory\r\n\r\n", "trailer fields"),
            (te, "0\r\n\r\nX", "continues after the chunked body"),
            (te, "0\r\n\r\nGET / HTTP/1.1\r\n\r\n", "continues after"),
        ] {
            let input = format!("POST / HTTP/1.1\r\nHost: h\r\n{head_fields}\r\n{chunks}");
            for result in [
                read(input.as_bytes()),
                read_request(SlowReader(input.as_bytes()), Limits::default()),
            ] {
                let err = result.unwrap_err();
                assert!(
                    matches!(err, RawHttpError::Malformed(_)) && err.to_string().contains(message),
                    "{chunks:?}: {err}"
                );
            }
        }
        // HTTP/1.0 has no chunked framing.
        let err =
            read(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").unwrap_err();
        assert!(err.to_string().contains("HTTP/1.0"), "{err}");
        // A size line with endless extensions is cut at the limit, not buffered.
        let endless = format!(
            "POST / HTTP/1.1\r\n{te}\r\n5;{}",
            "x".repeat(MAX_CHUNK_LINE * 4)
        );
        let err = read(endless.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("longer than 4096 bytes"), "{err}");
        // One byte short of the limit when the input ends: truncated, not too long.
        let cut = format!(
            "POST / HTTP/1.1\r\n{te}\r\n5;{}",
            "x".repeat(MAX_CHUNK_LINE - 3)
        );
        let err = read(cut.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("ends in the size line"), "{err}");
    }

    /// The body limit holds for the chunks' total, checked before a chunk is read: a huge size
    /// line costs nothing.
    #[test]
    fn chunked_body_limit() {
        let small = Limits {
            max_body_bytes: 8,
            ..Limits::default()
        };
        let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let fits = format!("{head}4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n");
        assert_eq!(
            read_request(fits.as_bytes(), small).unwrap().body,
            b"abcdefgh"
        );
        for chunks in [
            "4\r\nabcd\r\n5\r\nefghi\r\n0\r\n\r\n",
            "9\r\n",
            "ffffffffffffffff\r\n",
        ] {
            let input = format!("{head}{chunks}");
            assert!(
                matches!(
                    read_request(input.as_bytes(), small),
                    Err(RawHttpError::BodyTooLarge(8))
                ),
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn body_to_eof_without_content_length() {
        let r = read(b"PUT / HTTP/1.1\r\nHost: h\r\n\r\nrest of it").unwrap();
        assert_eq!(r.framing, BodyFraming::UntilEof);
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

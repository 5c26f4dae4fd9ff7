//! What the browser gets when the upstream misbehaves on the wire: a raw, scripted HTTP/1.1
//! upstream on loopback (a tokio `TcpListener` writing exactly the bytes each test chooses)
//! behind the real proxy (in-process, `Harness::start_with`).
//!
//! Covered: malformed and oversized response heads, a head that never ends (the route
//! `timeout` bounds the head: 504), a body framed by both `Content-Length` and
//! `Transfer-Encoding` (502, never a body cut at the length and passed on as complete), a
//! transfer coding other than plain `chunked` as hyper decodes it (`chunked,`: 502, never the
//! chunk framing as content), an answer's trailers cleaned as its head (over HTTP/2), a
//! `101 Switching Protocols` the proxy did not ask for (502), 1xx informational answers
//! before the real one, a body on a 204, and that the proxy keeps serving afterwards on a
//! fresh upstream connection. On a WebSocket route: an upstream refusal of the handshake
//! whose body stalls (504 within the route `timeout`, the route's slot freed) or is framed
//! by both `Content-Length` and chunks (502); every WebSocket handshake the upstream fails
//! (no answer, a stalled or broken refusal, a `101` to another protocol, a refused
//! connection) counted once in `countersign_upstream_errors_total`. An upstream cannot clear
//! the session cookie (`Clear-Site-Data: "cookies"`) nor plant one under an empty name
//! (`Set-Cookie: =name=v`).
//! The answer head's limits are the keys `max_response_header_count` and
//! `max_response_header_bytes` (parsed, applied, refused when out of range).
//! Run: `cargo test --all-features --test proxy_upstream_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use parking_lot::Mutex;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One thing the scripted upstream does after reading a request.
#[derive(Clone)]
enum Step {
    /// Writes these bytes.
    Write(&'static [u8]),
    /// Waits.
    Sleep(Duration),
    /// Closes the connection.
    Close,
    /// Keeps the connection open, reading nothing more, for this long, then closes it.
    Hang(Duration),
}

/// The requests a [`scripted_upstream`] received (path, connection number).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, usize)>>>);

impl Seen {
    fn paths(&self) -> Vec<String> {
        self.0.lock().iter().map(|(p, _)| p.clone()).collect()
    }
    fn connections(&self) -> usize {
        self.0
            .lock()
            .iter()
            .map(|(_, c)| *c)
            .max()
            .map_or(0, |c| c + 1)
    }
}

/// A raw HTTP/1.1 upstream: reads each request (head, and a body by its `Content-Length`),
/// records its path, and runs `script(path)`; after the steps the connection serves the next
/// request (keep-alive) unless a step closed it.
async fn scripted_upstream(script: fn(&str) -> Vec<Step>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut number = 0;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_scripted(stream, number, s.clone(), script));
            number += 1;
        }
    });
    (format!("http://{addr}"), seen)
}

async fn serve_scripted(
    mut stream: TcpStream,
    connection: usize,
    seen: Seen,
    script: fn(&str) -> Vec<Step>,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while pending.len() < end + length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        pending.drain(..end + length);
        seen.0.lock().push((path.clone(), connection));
        for step in script(&path) {
            match step {
                Step::Write(bytes) => {
                    if stream.write_all(bytes).await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => return,
                Step::Hang(d) => {
                    tokio::time::sleep(d).await;
                    return;
                }
            }
        }
    }
}

/// A proxy with a public route `/up/` to `url` (head timeout 2 s, body idle timeout 2 s).
async fn proxy_to(url: &str) -> Harness {
    let mut spec = route("up", "/up/", url);
    spec.auth_required = false;
    spec.timeout = Duration::from_secs(2);
    spec.connect.body_idle_timeout = Duration::from_secs(2);
    Harness::start_with(HarnessOptions {
        extra_routes: vec![spec],
        ..HarnessOptions::default()
    })
    .await
}

/// GET through the proxy; the whole answer, within 10 s.
async fn get_up(h: &Harness, path: &str) -> Reply {
    tokio::time::timeout(
        Duration::from_secs(10),
        send(h.addr, Method::GET, path, &[], Bytes::new()),
    )
    .await
    .expect("the proxy answers without hanging")
}

/// GET over a raw connection (`Connection: close`): every byte the proxy sends, until it
/// closes.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
    tokio::time::timeout(
        Duration::from_secs(10),
        raw_exchange(addr, request.as_bytes()),
    )
    .await
    .expect("the proxy answers without hanging")
}

/// The proxy's own refusal: `status` with `{"error":code}`.
fn assert_refused(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.text(), format!("{{\"error\":\"{code}\"}}"));
}

/// An answer with 150 header fields (more than hyper's default of 100) and an 18 KiB head.
static MANY_HEADERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut answer = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..150 {
        answer += &format!("x-field-{i:03}: {}\r\n", "v".repeat(100));
    }
    answer + "content-length: 2\r\n\r\nok"
});

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

fn script(path: &str) -> Vec<Step> {
    use Step::*;
    match path {
        "/up/bad-status" => vec![
            Write(b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n"),
            Close,
        ],
        "/up/garbage" => vec![Write(b"\x16\x03\x01\x00\xa5hello\r\n\r\n"), Close],
        "/up/bad-header" => vec![
            Write(b"HTTP/1.1 200 OK\r\nx bad: 1\r\ncontent-length: 0\r\n\r\n"),
            Close,
        ],
        "/up/huge-head" => vec![
            Write(b"HTTP/1.1 200 OK\r\n"),
            Write(&[b'x'; 1024 * 1024]),
            Close,
        ],
        "/up/endless-head" => {
            let mut steps = vec![Write(b"HTTP/1.1 200 OK\r\n")];
            for _ in 0..100 {
                steps.push(Write(b"x-slow: 1\r\n"));
                steps.push(Sleep(Duration::from_millis(100)));
            }
            steps.push(Close);
            steps
        }
        "/up/cl-and-te" => vec![
            Write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
                  b\r\nhello world\r\n0\r\n\r\n",
            ),
            Hang(Duration::from_secs(1)),
        ],
        "/up/short-body" => vec![
            Write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"),
            Close,
        ],
        "/up/bad-chunk" => vec![
            Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
            Hang(Duration::from_secs(1)),
        ],
        "/up/early-hints" => vec![
            Write(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"),
            Write(OK),
        ],
        "/up/switch" => vec![
            Write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
            ),
            Hang(Duration::from_secs(1)),
        ],
        "/up/no-content-with-body" => vec![Write(
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
        )],
        "/ws/refuse-slowly" => vec![
            Write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 100\r\n\r\n{\"no\""),
            Hang(Duration::from_secs(30)),
        ],
        // Reads the handshake and never answers it.
        "/ws/never-answers" => vec![Hang(Duration::from_secs(30))],
        // A refusal whose connection ends before the body its length announced.
        "/ws/refuse-broken" => vec![
            Write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 100\r\n\r\n{\"no\""),
            Close,
        ],
        // A switch, but not to the protocol asked for.
        "/ws/switch-to-other" => vec![
            Write(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                  upgrade: h2c\r\n\r\n",
            ),
            Hang(Duration::from_secs(1)),
        ],
        "/ws/refuse-cl-and-te" => vec![
            Write(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n\
                  b\r\nhello world\r\n0\r\n\r\n",
            ),
            Hang(Duration::from_secs(1)),
        ],
        "/up/logout" => vec![Write(
            b"HTTP/1.1 200 OK\r\nclear-site-data: \"cookies\"\r\nclear-site-data: \"cache\", \"*\"\r\n\
              clear-site-data: \"cache\"\r\nset-cookie: =countersign_session=planted; Path=/\r\n\
              set-cookie: = countersign_session =x\r\nset-cookie: =theme=dark\r\n\
              content-length: 2\r\n\r\nok",
        )],
        "/up/no-content-late-body" => vec![
            Write(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            Sleep(Duration::from_millis(300)),
            Write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"),
        ],
        "/up/gzip-chunked" => vec![Write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )],
        "/up/gzip-to-close" => vec![
            Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello"),
            Close,
        ],
        "/up/chunked-upper" => vec![Write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )],
        // hyper decodes chunks only when the last element of the last line is `chunked`:
        // these it reads to the close, chunk framing and all.
        "/up/chunked-comma" => vec![
            Write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\nConnection: close\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            ),
            Close,
        ],
        "/up/chunked-space-comma" => vec![
            Write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked ,\r\nConnection: close\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            ),
            Close,
        ],
        "/up/chunked-two-lines" => vec![
            Write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked,\r\n\
                  Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
            Close,
        ],
        // An empty element first: hyper decodes the chunks (the last element is `chunked`).
        "/up/comma-chunked" => vec![Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )],
        "/up/trailer-connection" => vec![Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: connection\r\n\r\n\
              5\r\nhello\r\n0\r\nConnection: close\r\n\r\n",
        )],
        "/up/trailer-cookies" => vec![Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
              Trailer: set-cookie, proxy-authenticate, x-checksum\r\n\r\n\
              5\r\nhello\r\n0\r\nSet-Cookie: countersign_session=planted; Path=/\r\n\
              Proxy-Authenticate: Basic realm=\"up\"\r\nx-checksum: 1\r\n\r\n",
        )],
        "/up/trailers" => vec![Write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
              5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n",
        )],
        "/up/many-headers" | "/small/many-headers" => vec![Write(MANY_HEADERS.as_bytes())],
        _ => vec![Write(OK)],
    }
}

#[tokio::test]
async fn malformed_and_oversized_heads_are_502_and_the_proxy_keeps_serving() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    for path in [
        "/up/bad-status",
        "/up/garbage",
        "/up/bad-header",
        "/up/huge-head",
    ] {
        let r = get_up(&h, path).await;
        assert_refused(&r, StatusCode::BAD_GATEWAY, "bad_gateway");
        let r = get_up(&h, "/up/fine").await;
        assert_eq!(r.status, StatusCode::OK, "after {path}: {}", r.text());
    }
    let started = Instant::now();
    let r = get_up(&h, "/up/endless-head").await;
    assert_refused(&r, StatusCode::GATEWAY_TIMEOUT, "gateway_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(get_up(&h, "/up/fine").await.status, StatusCode::OK);
    // Each failure closed its connection (five), the good answers shared one.
    assert_eq!(seen.connections(), 6, "{:?}", seen.paths());
}

/// Defect: an answer with both `Content-Length: 5` and `Transfer-Encoding: chunked` (11 bytes
/// in chunks) reached the browser as `content-length: 5` and `hello`: the length field passed
/// on, the chunked body was cut at it and the browser got a clean, complete-looking 200 with
/// half the body (over a keep-alive connection the rest would have been dropped silently).
/// RFC 9112 §6.3: such a message is a smuggling or splitting attempt to be handled as an
/// error. Now 502 `bad_gateway`, the upstream connection is not reused, and the proxy keeps
/// serving.
#[tokio::test]
async fn a_body_framed_by_both_length_and_chunks_is_502_not_cut_at_the_length() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let r = get_up(&h, "/up/cl-and-te").await;
    assert_refused(&r, StatusCode::BAD_GATEWAY, "bad_gateway");
    let raw = raw_get(h.addr, "/up/cl-and-te").await;
    assert!(raw.starts_with("HTTP/1.1 502 "), "{raw}");
    assert!(!raw.contains("hello"), "{raw}");
    let r = get_up(&h, "/up/fine").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(seen.connections(), 3, "{:?}", seen.paths());
}

/// Defect: a `101 Switching Protocols` to a request that asked for no upgrade reached the
/// browser as a `101` without `Upgrade` (hop-by-hop, removed), a protocol switch nobody
/// asked for that no browser can follow. Now 502 `bad_gateway`, and the connection is not
/// kept.
#[tokio::test]
async fn an_unasked_for_switching_protocols_is_502() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let r = get_up(&h, "/up/switch").await;
    assert_refused(&r, StatusCode::BAD_GATEWAY, "bad_gateway");
    let r = get_up(&h, "/up/fine").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(seen.connections(), 2, "{:?}", seen.paths());
}

/// Already right, kept as a guard: `100 Continue` and `103 Early Hints` before the answer are
/// dropped (the browser gets the final answer only); a 204 carrying a body gets none to the
/// browser, and the bytes after it are not read as the next request's answer (that
/// connection is dropped, the next request gets its own answer); a body cut short of its
/// `Content-Length` is not passed on as complete (the client sees the answer break).
#[tokio::test]
async fn informational_answers_a_204_with_a_body_and_a_short_body() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let r = get_up(&h, "/up/early-hints").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "{\"ok\":true}");
    assert!(r.headers.get("link").is_none());
    let r = get_up(&h, "/up/no-content-with-body").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    let r = get_up(&h, "/up/fine").await;
    assert_eq!(r.text(), "{\"ok\":true}");
    let response = send_streaming(h.addr, Method::GET, "/up/short-body", &[], Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await
    .expect("no hang");
    assert!(body.is_err(), "a cut body must not end cleanly");
}

/// Defect: a 204 whose head announced a body (`Content-Length: 5`) went back to the pool at
/// once (hyper reads no body after a 204), so bytes the upstream sent after it were read as
/// the answer to the connection's next request: the next browser got a forged 200. Now such
/// a connection is dropped, and the next request gets its own answer on a new one.
#[tokio::test]
async fn a_204_announcing_a_body_is_not_pooled_so_late_bytes_answer_nobody() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let r = get_up(&h, "/up/no-content-late-body").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    let r = get_up(&h, "/up/fine").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "{\"ok\":true}");
    assert_eq!(seen.connections(), 2, "{:?}", seen.paths());
}

/// Defect: a `Transfer-Encoding` other than `chunked` (`gzip, chunked`, or `gzip` read to the
/// close) was removed (hop-by-hop) and the still-encoded bytes reached the browser as the
/// content, with nothing saying they were encoded. Now 502 `bad_gateway`, as nginx answers,
/// and the connection is not reused; `Chunked` in another case is still plain chunking.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_502() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    for path in ["/up/gzip-chunked", "/up/gzip-to-close"] {
        let r = get_up(&h, path).await;
        assert_refused(&r, StatusCode::BAD_GATEWAY, "bad_gateway");
    }
    let r = get_up(&h, "/up/chunked-upper").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "hello");
    let r = get_up(&h, "/up/fine").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(seen.connections(), 3, "{:?}", seen.paths());
}

/// Defect: `Transfer-Encoding: chunked,` passed as plain chunking (the check skipped empty
/// elements), but hyper decodes chunks only when the last element of the last line is
/// `chunked`: it read this body to the close, undecoded, and the browser got the chunk
/// framing (`5\r\nhello\r\n0\r\n\r\n`) as the content, with 200. Now 502 as any coding
/// other than plain `chunked`, as is `chunked ,` and a second line `chunked,`; an empty
/// element before `chunked`, which hyper decodes, still passes.
#[tokio::test]
async fn chunked_with_an_empty_last_element_is_502_not_the_framing_as_content() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    for path in [
        "/up/chunked-comma",
        "/up/chunked-space-comma",
        "/up/chunked-two-lines",
    ] {
        let r = get_up(&h, path).await;
        assert_refused(&r, StatusCode::BAD_GATEWAY, "bad_gateway");
    }
    let r = get_up(&h, "/up/comma-chunked").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "hello");
}

/// GET `path` through the proxy over HTTP/2 (h2c): status, the whole body and its trailers,
/// within 10 s; a reset stream fails the test.
async fn h2_get(addr: SocketAddr, path: &str) -> (StatusCode, Bytes, Option<http::HeaderMap>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut sender = support_h2::h2c(addr).await;
        let request = Request::builder()
            .uri(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .expect("an HTTP/2 answer");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the whole body, not a reset stream");
        let trailers = body.trailers().cloned();
        (status, body.to_bytes(), trailers)
    })
    .await
    .expect("the proxy answers without hanging")
}

/// Defect: an upstream's trailers skipped the head's hygiene. Over HTTP/2 hyper hands them to
/// h2, which refuses a connection-specific field (`Connection: close` here) and resets the
/// stream after its data: the browser's fetch failed, where over HTTP/1.1 (hyper drops
/// trailers) the same answer worked. And a trailer `Set-Cookie` of the session cookie's name,
/// or a `Proxy-Authenticate`, reached the browser. Now trailers are cleaned as the head is
/// (and keep no `Set-Cookie`); other trailers pass.
#[tokio::test]
async fn upstream_trailers_get_the_heads_hygiene_over_http2() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let (status, body, trailers) = h2_get(h.addr, "/up/trailer-connection").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello");
    assert!(
        trailers
            .as_ref()
            .is_none_or(|t| t.get("connection").is_none()),
        "{trailers:?}"
    );
    let (status, body, trailers) = h2_get(h.addr, "/up/trailer-cookies").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello");
    let trailers = trailers.expect("the ordinary trailer");
    assert_eq!(trailers.get("x-checksum").unwrap(), "1", "{trailers:?}");
    assert!(trailers.get("set-cookie").is_none(), "{trailers:?}");
    assert!(trailers.get("proxy-authenticate").is_none(), "{trailers:?}");
    // The same answers over HTTP/1.1 (trailers dropped by hyper there).
    let r = get_up(&h, "/up/trailer-connection").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "hello");
}

/// Defect: an answer ending in trailers never gave its connection back (hyper's server stops
/// polling the body at the trailers, before it reports its end), so every such answer cost
/// the upstream a new connection. Now it is pooled like any answer read to its end.
#[tokio::test]
async fn an_answer_with_trailers_gives_its_connection_back() {
    let (url, seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    for _ in 0..3 {
        let r = get_up(&h, "/up/trailers").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "hello");
    }
    assert_eq!(seen.connections(), 1, "{:?}", seen.paths());
}

/// A proxy with a WebSocket route `/ws/` to `url` (one WebSocket at most, head timeout 2 s).
async fn ws_proxy_to(url: &str) -> Harness {
    let mut spec = route("ws", "/ws/", url);
    spec.auth_required = false;
    spec.timeout = Duration::from_secs(2);
    spec.websocket = Some(countersign::proxy::forward::WebSocketRoute::new(
        Duration::from_secs(30),
        Duration::from_secs(30),
        1,
    ));
    Harness::start_with(HarnessOptions {
        extra_routes: vec![spec],
        ..HarnessOptions::default()
    })
    .await
}

/// Sends `request` on a new connection and reads one answer: its head and a body of its
/// `Content-Length` (the connection may stay open), within 10 s.
async fn one_answer(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    String::from_utf8_lossy(&got).into_owned()
}

fn ws_handshake(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: {ORIGIN}\r\n\r\n"
    )
}

/// Defect: an upstream that refused a WebSocket handshake with a head and then sent its body
/// slowly, or part of it and then nothing, held the browser's handshake (and one of the
/// route's `websocket_max_open` slots) for as long as it liked: the refusal's body was read
/// with no time limit. Now the whole refusal must arrive within the route's `timeout`, else
/// 504 `gateway_timeout`, and the slot is free again.
#[tokio::test]
async fn a_websocket_refusal_whose_body_stalls_is_504_within_the_route_timeout() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = ws_proxy_to(&url).await;
    for _ in 0..2 {
        let started = Instant::now();
        let answer = one_answer(h.addr, &ws_handshake("/ws/refuse-slowly")).await;
        assert!(
            answer.starts_with("HTTP/1.1 504 "),
            "after {:?}: {answer:?}",
            started.elapsed()
        );
        assert!(
            answer.contains("{\"error\":\"gateway_timeout\"}"),
            "{answer}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        gauge(h.admin, "countersign_websockets_open{upstream=\"ws\"}").await,
        0
    );
}

/// Defect: a refusal of a WebSocket handshake with both `Content-Length` and chunked framing
/// was passed on with the upstream's `Content-Length` beside the body the proxy had read
/// (debug builds: hyper's assertion panicked; release: a length that is not the body's on
/// the browser's connection). Now 502 `bad_gateway`, like any proxied answer framed so.
#[tokio::test]
async fn a_websocket_refusal_framed_by_both_length_and_chunks_is_502() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = ws_proxy_to(&url).await;
    let answer = one_answer(h.addr, &ws_handshake("/ws/refuse-cl-and-te")).await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer:?}");
    assert!(answer.contains("{\"error\":\"bad_gateway\"}"), "{answer}");
}

/// Defect: a WebSocket handshake the upstream failed after its connection was made (no
/// answer within the route's `timeout`, a refusal whose body stalled or broke, a `101` to
/// another protocol) was answered 504 or 502 but not counted in
/// `countersign_upstream_errors_total`, while the same failure of an ordinary request is:
/// an operator alerting on that counter did not see a WebSocket route's upstream hang or
/// break. Now each such handshake counts exactly one, as does one whose upstream refuses the
/// connection.
#[tokio::test]
async fn websocket_upstream_failures_count_as_upstream_errors() {
    const ERRORS: &str = "countersign_upstream_errors_total";
    let (url, _seen) = scripted_upstream(script).await;
    let h = ws_proxy_to(&url).await;
    for (path, status, code) in [
        ("/ws/never-answers", 504, "gateway_timeout"),
        ("/ws/refuse-slowly", 504, "gateway_timeout"),
        ("/ws/refuse-broken", 502, "bad_gateway"),
        ("/ws/switch-to-other", 502, "bad_gateway"),
    ] {
        let before = gauge(h.admin, ERRORS).await;
        let answer = one_answer(h.addr, &ws_handshake(path)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {answer:?}"
        );
        assert!(
            answer.contains(&format!("{{\"error\":\"{code}\"}}")),
            "{path}: {answer}"
        );
        assert_eq!(gauge(h.admin, ERRORS).await, before + 1, "{path}");
    }
    // An upstream refusing the connection: 502, counted once per handshake.
    let (_refusing, dead) = refusing_addr();
    let h = ws_proxy_to(&format!("http://{dead}")).await;
    for expected in 1..=2 {
        let answer = one_answer(h.addr, &ws_handshake("/ws/any")).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer:?}");
        assert_eq!(gauge(h.admin, ERRORS).await, expected);
    }
}

/// Defect: the upstream could still end the browser's session cookie, which only the proxy
/// may set or clear: `Clear-Site-Data: "cookies"` (or `"*"`) makes the browser delete every
/// cookie of the origin, the session cookie included (the proxy refuses that header in its
/// own `server.response_headers` for that reason), and a nameless `Set-Cookie:
/// =countersign_session=planted` is stored with an empty name and sent back as
/// `countersign_session=planted` (RFC 6265bis: a nameless cookie is serialised as its value),
/// a second session cookie of the upstream's choosing. Both are now removed; other
/// `Clear-Site-Data` values and other nameless cookies pass.
#[tokio::test]
async fn an_upstream_cannot_clear_or_plant_the_session_cookie() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    let r = get_up(&h, "/up/logout").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let all = |name: &str| {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("clear-site-data"), ["\"cache\""]);
    assert_eq!(all("set-cookie"), ["=theme=dark"]);
}

/// Defect: the limits on an upstream's answer head were hyper's defaults (100 fields, a
/// 408 KiB read buffer) with no config key, against CONFIG.md's "every limit has a key": an
/// API whose answers carry more than 100 fields was a 502 nothing could lift. Now
/// `[[upstream]] max_response_header_count` and `max_response_header_bytes` (defaults those
/// values): raised, the answer passes; lowered, a head over them is a 502 and the proxy keeps
/// serving.
#[tokio::test]
async fn response_head_limits_are_the_upstreams_keys() {
    let (url, _seen) = scripted_upstream(script).await;
    let h = proxy_to(&url).await;
    assert_refused(
        &get_up(&h, "/up/many-headers").await,
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
    );
    let mut raised = route("raised", "/up/", &url);
    raised.auth_required = false;
    raised.connect.max_response_header_count = 200;
    let mut small = route("small", "/small/", &url);
    small.auth_required = false;
    small.connect.max_response_header_bytes = 16 * 1024;
    small.connect.max_response_header_count = 200;
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![raised, small],
        ..HarnessOptions::default()
    })
    .await;
    // Raw: hyper's client (the test's) has the same default of 100 fields.
    let raw = raw_get(h.addr, "/up/many-headers").await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(raw.contains(&format!("x-field-149: {}\r\n", "v".repeat(100))));
    assert!(raw.ends_with("\r\n\r\nok"), "{raw}");
    // 18 KiB of head over a 16 KiB limit.
    assert_refused(
        &get_up(&h, "/small/many-headers").await,
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
    );
    assert_eq!(get_up(&h, "/small/fine").await.status, StatusCode::OK);
}

fn config_with(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
         [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
         [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n{extra}\n"
    )
}

/// The two keys: defaults (hyper's, as before), values reaching the route's settings, and
/// refusals naming file, key and problem.
#[test]
fn response_head_limit_keys() {
    use countersign::proxy::config::ProxyConfig;
    let parse = |extra: &str| {
        ProxyConfig::parse(
            &config_with(extra),
            std::path::Path::new("/etc/countersign/proxy.toml"),
        )
    };
    let config = parse("").unwrap();
    assert_eq!(config.upstreams[0].max_response_header_count, 100);
    assert_eq!(config.upstreams[0].max_response_header_bytes, 408 * 1024);
    let config =
        parse("max_response_header_count = 300\nmax_response_header_bytes = \"1MiB\"").unwrap();
    let settings = countersign::proxy::server::ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.routes[0].connect.max_response_header_count, 300);
    assert_eq!(
        settings.routes[0].connect.max_response_header_bytes,
        1 << 20
    );
    for (line, key, problem) in [
        (
            "max_response_header_count = 0",
            "max_response_header_count",
            "between 1 and 10000",
        ),
        (
            "max_response_header_count = 10001",
            "max_response_header_count",
            "between 1 and 10000",
        ),
        (
            "max_response_header_bytes = \"4KiB\"",
            "max_response_header_bytes",
            "between 8KiB and 16MiB",
        ),
        (
            "max_response_header_bytes = \"17MiB\"",
            "max_response_header_bytes",
            "between 8KiB and 16MiB",
        ),
        (
            "max_response_header_bytes = \"lots\"",
            "max_response_header_bytes",
            "",
        ),
    ] {
        let err = parse(line).expect_err(line);
        assert!(
            err.to_string().starts_with("/etc/countersign/proxy.toml: "),
            "{line}: {err}"
        );
        assert_eq!(err.key(), format!("upstream[0].{key}"), "{line}: {err}");
        assert!(err.problem().contains(problem), "{line}: {err}");
    }
}

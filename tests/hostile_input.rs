//! Hostile bytes on the wire, as an attacker with a TCP socket sends them (not a well-behaved
//! HTTP client): random and mutated raw requests, request-smuggling shapes, HTTP/2 frame abuse
//! and clients that never read, against the proxy's public listener, its admin listener and an
//! API behind the `VerifyLayer` on hyper. Invariants checked after each: the server answers
//! with well-formed HTTP (or closes), never 500 for malformed input, its own refusals are
//! `{"error":"<documented code>"}`, nothing hangs past the configured timeouts, and a refused
//! request changes no state (no session created or extended, nothing reaches the upstream).
//!
//! Defects this pass found, each with its test: a field covered by `signing.extra_headers`
//! holding a non-ASCII byte was a 500 `internal_error` after the session was extended (now 400
//! before the session is looked up); a client that asked for a large answer and never read it
//! held its connection slot and upstream connection forever, over HTTP/1 (blocked writes) and
//! over HTTP/2 (no flow-control credit), in clear text and over TLS (now dropped after
//! `send_timeout` without progress).
//! Run: `cargo test --all-features --test hostile_input`.
#![cfg(feature = "proxy")]
#![forbid(unsafe_code)]

mod support;
mod support_h2;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{HeaderName, Method, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use support::*;
use support_h2::{
    h2_frame, hpack_int, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PREFACE,
    RST_STREAM, SETTINGS,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 exchange and response parsing
// ---------------------------------------------------------------------------------------------

/// The error codes the proxy documents (docs/FRONTEND.md), but `internal_error`: malformed
/// input is the client's fault, never "the proxy failed".
const PROXY_CODES: [&str; 18] = [
    "unauthenticated",
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
    "websocket_version",
    "websocket_user_limit",
    "precondition_failed",
    "range_not_satisfiable",
];

/// How long one raw exchange may take before it counts as a hang: well past anything the
/// servers here are configured to wait for (their `header_read_timeout` is 2 s).
const EXCHANGE_LIMIT: Duration = Duration::from_secs(15);

/// Sends `request`, shuts the sending side (the server knows nothing more comes, so an
/// incomplete head is answered or closed at once, not after a timeout) and reads until the
/// server closes. Panics if that takes longer than [`EXCHANGE_LIMIT`]. A reset after some bytes
/// keeps those bytes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close early (and reset) on a bad head: later writes may fail.
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(EXCHANGE_LIMIT, read)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no close within {EXCHANGE_LIMIT:?} after {:?}",
                String::from_utf8_lossy(request)
            )
        });
    out
}

/// One HTTP/1 response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The `error` of a `{"error":"<code>"}` body, if it is one.
    fn error_code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json.get("error")?.as_str().map(str::to_owned)
    }
}

/// Decodes a chunked body; Err if malformed. Returns the body and the bytes after it.
fn dechunk(mut rest: &[u8]) -> Result<(Vec<u8>, &[u8]), String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // No trailers from these servers: the final CRLF.
            return rest
                .strip_prefix(b"\r\n")
                .map(|after| (body, after))
                .ok_or_else(|| "last chunk".to_owned());
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return Err("chunk data".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Every response in `bytes` (interim 1xx ones skipped); Err if the bytes are not a sequence
/// of complete, well-formed HTTP/1.1 responses. `head`: answers to HEAD (no body).
fn parse_responses(mut bytes: &[u8], head: bool) -> Result<Vec<RawResponse>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        let head_len = match response.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
            Err(e) => return Err(format!("malformed response head: {e}")),
        };
        let status = response.code.ok_or("no status")?;
        if response.version != Some(1) {
            return Err(format!("HTTP/1.{:?} response", response.version));
        }
        let headers: Vec<(String, Vec<u8>)> = response
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        let rest = &bytes[head_len..];
        if (100..200).contains(&status) {
            bytes = rest;
            continue;
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or("bad content-length")
            })
            .transpose()?;
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
        let (body, after) = if head || status == 204 || status == 304 {
            (Vec::new(), rest)
        } else if chunked {
            dechunk(rest)?
        } else if let Some(length) = length {
            if rest.len() < length {
                return Err(format!("body shorter than its {length} bytes"));
            }
            (rest[..length].to_vec(), &rest[length..])
        } else {
            // Delimited by the close.
            (rest.to_vec(), &rest[rest.len()..])
        };
        out.push(RawResponse {
            status,
            headers,
            body,
        });
        bytes = after;
    }
    Ok(out)
}

/// Checks what a countersign server answered to hostile bytes: nothing (closed) or well-formed
/// responses, none of them a 500; the server's own refusals carry a code of `codes`; an empty
/// body is allowed only on a refusal hyper makes itself (400, 408, 413, 414, 431, 501, 505: its
/// parser's answers, with no body).
fn check_answers(request: &[u8], answer: &[u8], codes: &[&str]) -> Vec<RawResponse> {
    let shown = || {
        format!(
            "request {:?}\nanswer {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(answer)
        )
    };
    let head = request.starts_with(b"HEAD ");
    let responses = parse_responses(answer, head).unwrap_or_else(|e| panic!("{e}\n{}", shown()));
    for response in &responses {
        assert_ne!(response.status, 500, "500 to malformed input\n{}", shown());
        // An answer to HEAD has no body to look at.
        if response.status >= 400 && !head {
            match response.error_code() {
                Some(code) => {
                    assert!(
                        codes.contains(&code.as_str()),
                        "undocumented code {code:?}\n{}",
                        shown()
                    );
                    assert_eq!(
                        response.header("content-type"),
                        Some(&b"application/json"[..]),
                        "{}",
                        shown()
                    );
                }
                None => assert!(
                    response.body.is_empty()
                        && [400, 408, 413, 414, 431, 501, 505].contains(&response.status),
                    "a refusal that is neither {{\"error\":code}} nor hyper's own\n{}",
                    shown()
                ),
            }
        }
    }
    responses
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

/// Byte strings that hurt HTTP parsers: line endings, NUL, folding, framing fields, chunk
/// sizes, dot segments, a second request line.
const POISON: [&[u8]; 24] = [
    b"\r",
    b"\n",
    b"\0",
    b"\r\n",
    b" ",
    b":",
    b"\r\n\tfolded",
    b"\r\n folded: x",
    b"\r\nTransfer-Encoding: chunked",
    b"\r\nTransfer-Encoding: chunked, identity",
    b"\r\nTransfer-Encoding: identity",
    b"\r\nContent-Length: 7",
    b"\r\nContent-Length: -1",
    b"\r\nContent-Length: 99999999999999999999",
    b"\r\nExpect: 100-continue",
    b"\r\nUpgrade: websocket\r\nConnection: upgrade",
    b"\r\nSignature: sig1=:AAAA:",
    b"\r\nX-Forwarded-User: root",
    b"\x80\xff",
    b"%2e%2e/",
    b"//",
    b"\r\n\r\n",
    b"ffffffffffffffffffff\r\n",
    b"GET /api/items HTTP/1.1\r\nHost: x\r\n\r\n",
];

/// A random mutation of `base`.
fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    let rounds = rng.gen_range(1..=3);
    for _ in 0..rounds {
        let at = rng.gen_range(0..=out.len());
        match rng.gen_range(0..9) {
            0 if !out.is_empty() => {
                let i = rng.gen_range(0..out.len());
                out[i] = rng.gen();
            }
            1 => {
                let poison = POISON[rng.gen_range(0..POISON.len())];
                out.splice(at..at, poison.iter().copied());
            }
            2 if at < out.len() => {
                let end = rng.gen_range(at..=out.len().min(at + 24));
                out.drain(at..end);
            }
            3 if at < out.len() => {
                let end = rng.gen_range(at..=out.len().min(at + 40));
                let piece = out[at..end].to_vec();
                out.splice(end..end, piece);
            }
            4 => out.truncate(at),
            5 => {
                // Bare LF line endings.
                out = String::from_utf8_lossy(&out)
                    .replace("\r\n", "\n")
                    .into_bytes();
            }
            6 => {
                let methods: [&[u8]; 7] = [
                    b"CONNECT", b"TRACE", b"get", b"PRI", b"OPTIONS", b"DELETE", b"G\x00T",
                ];
                let space = out.iter().position(|&b| b == b' ').unwrap_or(0);
                out.splice(
                    ..space,
                    methods[rng.gen_range(0..methods.len())].iter().copied(),
                );
            }
            7 => {
                let targets: [&[u8]; 6] = [
                    b"http://evil.test/api/items",
                    b"app.test:80",
                    b"*",
                    b"/api/../auth/login",
                    b"/api/items?q=\x80",
                    b"//api/items",
                ];
                let first = out.iter().position(|&b| b == b' ');
                if let Some(first) = first {
                    let second = out[first + 1..]
                        .iter()
                        .position(|&b| b == b' ')
                        .map_or(out.len(), |p| first + 1 + p);
                    out.splice(
                        first + 1..second,
                        targets[rng.gen_range(0..targets.len())].iter().copied(),
                    );
                }
            }
            _ => {
                let noise: Vec<u8> = (0..rng.gen_range(1..32)).map(|_| rng.gen()).collect();
                out.splice(at..at, noise);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Proxy state
// ---------------------------------------------------------------------------------------------

/// `expires_at` of the session as `GET /auth/session?touch=false` reports it.
async fn expires_at(h: &Harness, login: &Login) -> u64 {
    let r = get(h.addr, "/auth/session?touch=false", login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["expires_at"].as_u64().expect("expires_at")
}

async fn session_count(h: &Harness) -> usize {
    h.proxy()
        .state()
        .sessions()
        .count()
        .await
        .expect("session count")
}

/// The value of one sample of the admin listener's `/metrics`, 0 when absent.
async fn metric(h: &Harness, sample: &str) -> u64 {
    let r = send(h.admin, Method::GET, "/metrics", &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A proxy whose clients get 2 s to send a head or a body (the defaults are 10 s and 60 s).
async fn quick_proxy() -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.header_read_timeout = Duration::from_secs(2);
            s.request_timeout = Duration::from_secs(2);
        }),
        ..HarnessOptions::default()
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Fuzzing the public listener
// ---------------------------------------------------------------------------------------------

/// Raw requests a browser would send, as templates of the mutations below.
fn proxy_corpus(login: &Login) -> Vec<Vec<u8>> {
    let body = r#"{"name":"x"}"#;
    let login_body = format!(r#"{{"username":"alice","password":"{ALICE_PASSWORD}"}}"#);
    vec![
        format!(
            "GET /api/items?q=1 HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n",
            login.cookie
        ),
        format!(
            "POST /api/items HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nX-CSRF-Token: {}\r\n\
             Origin: {ORIGIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            login.cookie,
            login.csrf,
            body.len()
        ),
        format!(
            "PUT /api/items/7 HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nX-CSRF-Token: {}\r\n\
             Origin: {ORIGIN}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            login.cookie, login.csrf
        ),
        format!(
            "POST /auth/login HTTP/1.1\r\nHost: app.test\r\nOrigin: {ORIGIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{login_body}",
            login_body.len()
        ),
        format!(
            "GET /auth/session HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n",
            login.cookie
        ),
        "GET /api/items HTTP/1.1\r\nHost: app.test\r\n\r\n".to_owned(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// A few hundred random mutations of browser requests (seeded: a failure names its case and
/// replays), each on a fresh connection. After each: well-formed answers (see
/// [`check_answers`]), answered or closed within [`EXCHANGE_LIMIT`], and when every answer was a
/// refusal, no state changed: nothing reached the upstream, no signature was issued, no
/// session was created and alice's was not extended. At the end the proxy still serves alice.
#[tokio::test]
async fn mutated_requests_to_the_public_listener_are_refused_cleanly_and_change_nothing() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let corpus = proxy_corpus(&login);
    let mut rng = StdRng::seed_from_u64(0x00c0_47e5_1960);
    let started = Instant::now();
    let mut refused_cases = 0;
    for case in 0..400 {
        let base = &corpus[case % corpus.len()];
        let request = mutate(&mut rng, base);
        // Every case moves the clock, so an extension of the session would show.
        h.clock.advance(1);
        let (upstream_before, sessions_before, expiry_before, signatures_before) = (
            h.upstream.raw_count(),
            session_count(&h).await,
            expires_at(&h, &login).await,
            metric(&h, "countersign_signatures_issued_total").await,
        );
        let answer = exchange(h.addr, &request).await;
        let responses = check_answers(&request, &answer, &PROXY_CODES);
        if responses.iter().all(|r| r.status >= 400) {
            refused_cases += 1;
            let shown = String::from_utf8_lossy(&request);
            assert_eq!(
                h.upstream.raw_count(),
                upstream_before,
                "case {case}: refused, yet forwarded: {shown:?}"
            );
            assert_eq!(
                metric(&h, "countersign_signatures_issued_total").await,
                signatures_before,
                "case {case}: refused, yet signed: {shown:?}"
            );
            assert_eq!(
                session_count(&h).await,
                sessions_before,
                "case {case}: refused, yet a session was made: {shown:?}"
            );
            assert_eq!(
                expires_at(&h, &login).await,
                expiry_before,
                "case {case}: refused, yet alice's session was extended: {shown:?}"
            );
        }
    }
    assert!(
        refused_cases > 100,
        "only {refused_cases} cases were refused"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let r = get(h.addr, "/api/items", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Fuzzing the admin listener
// ---------------------------------------------------------------------------------------------

/// The admin listener under the same mutations: well-formed answers, no hang, no 500, and it
/// still reports healthy afterwards; a refused revoke revokes nothing.
#[tokio::test]
async fn mutated_requests_to_the_admin_listener_are_refused_cleanly() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // `Host: [::1]`: an address, which the admin listener answers (a DNS name such as `admin`
    // is refused at once, 403 `csrf`, and the mutations would not reach the endpoints).
    let corpus: Vec<&[u8]> = vec![
        b"GET /metrics HTTP/1.1\r\nHost: [::1]\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: [::1]\r\n\r\n",
        b"HEAD /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n",
        b"POST /admin/users/bob/revoke HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 0\r\n\r\n",
    ];
    let mut rng = StdRng::seed_from_u64(0xad31);
    for case in 0..200 {
        let request = mutate(&mut rng, corpus[case % corpus.len()]);
        let answer = exchange(h.admin, &request).await;
        check_answers(&request, &answer, &PROXY_CODES);
    }
    let r = send(h.admin, Method::GET, "/healthz", &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(h.addr, "/auth/session?touch=false", &login).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "alice's session is gone: {}",
        r.text()
    );
}

// ---------------------------------------------------------------------------------------------
// Covered fields the browser controls
// ---------------------------------------------------------------------------------------------

/// With `signing.extra_headers = ["content-type"]` (a field the browser sets), a request whose
/// `Content-Type` carries a byte above 0x7F (HTTP's obs-text, which hyper accepts) cannot be
/// signed: RFC 9421 component values are ASCII. That is the client's malformed input: 400
/// `bad_request`, nothing forwarded, the session not extended; not 500 `internal_error` ("the
/// proxy failed", docs/FRONTEND.md).
#[tokio::test]
async fn a_covered_field_with_a_non_ascii_value_is_bad_request_not_internal_error() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.signer.extra_headers = vec![HeaderName::from_static("content-type")];
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let before = expires_at(&h, &login).await;
    h.clock.advance(100);
    let requests = [
        [
            format!(
                "GET /api/items HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\
                 Content-Type: text/plain; charset=",
                login.cookie
            )
            .as_bytes(),
            b"\xff\r\n\r\n",
        ]
        .concat(),
        [
            format!(
                "POST /api/items HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nX-CSRF-Token: {}\r\n\
                 Origin: {ORIGIN}\r\nContent-Length: 2\r\nContent-Type: application/json; x=",
                login.cookie, login.csrf
            )
            .as_bytes(),
            b"caf\xc3\xa9\r\n\r\n{}",
        ]
        .concat(),
    ];
    for request in &requests {
        let answer = exchange(h.addr, request).await;
        let responses = check_answers(request, &answer, &PROXY_CODES);
        assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(&answer));
        assert_eq!(
            (responses[0].status, responses[0].error_code().as_deref()),
            (400, Some("bad_request")),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(h.upstream.raw_count(), 0);
    assert_eq!(expires_at(&h, &login).await, before);
    // The same field in ASCII is signed and verified.
    let r = send(
        h.addr,
        Method::GET,
        "/api/items",
        &[("cookie", &login.cookie), ("content-type", "text/plain")],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Fuzzing an API behind the VerifyLayer
// ---------------------------------------------------------------------------------------------

/// A request signed for alice by the proxy's signer, written out as raw HTTP/1.1 to `addr`.
fn signed_raw_request(addr: SocketAddr, now: u64) -> (Vec<u8>, &'static str, &'static [u8]) {
    use countersign::core::{Identity, Nonce, Signer, SignerConfig};
    const TARGET: &str = "/api/items?page=2&sort=name";
    const BODY: &[u8] = br#"{"name":"widget","qty":3}"#;
    let (mut parts, ()) = http::Request::post(format!("http://{addr}{TARGET}"))
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("user-agent", "hostile-test")
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(test_keyring(), SignerConfig::default())
        .sign(
            &mut parts,
            BODY,
            Some(&Identity {
                user: "alice".into(),
                roles: vec!["admin".into()],
            }),
            now,
            &Nonce::random(),
        )
        .unwrap();
    let mut raw = format!("POST {TARGET} HTTP/1.1\r\n").into_bytes();
    for (name, value) in &parts.headers {
        raw.extend_from_slice(name.as_str().as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value.as_bytes());
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(format!("content-length: {}\r\n\r\n", BODY.len()).as_bytes());
    raw.extend_from_slice(BODY);
    (raw, TARGET, BODY)
}

/// Mutations of one signed request sent to an API behind the real `VerifyLayer` on hyper:
/// every answer well-formed, refusals `{"error":"<Reason>"}` with the documented status, no
/// 500, no hang. And what the application receives is exactly what was signed: of all the
/// mutants (they share the signature's nonce) at most one passes, and it has the signed
/// target, body and identity; a changed method, target, authority, body or identity field, a
/// reframed body (a chunked or shorter length) never reaches the application.
#[tokio::test]
async fn mutated_signed_requests_never_reach_the_application_changed() {
    use countersign::clock::SharedClock;
    use countersign::core::Reason;
    use std::sync::Arc;
    let clock = countersign::clock::ManualClock::new(T0);
    let shared: SharedClock = Arc::new(clock.clone());
    let upstream = start_upstream(test_keyring(), shared).await;
    let (signed, target, body) = signed_raw_request(upstream.addr, T0);
    // The reasons, and `body_read_failed` (docs/PROTOCOL.md: a body that cannot be read).
    let mut codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    codes.push("body_read_failed");
    let mut rng = StdRng::seed_from_u64(0x5167);
    for _ in 0..400 {
        let request = mutate(&mut rng, &signed);
        let answer = exchange(upstream.addr, &request).await;
        for response in check_answers(&request, &answer, &codes) {
            if let Some(reason) = response.error_code().as_deref().and_then(Reason::from_code) {
                assert_eq!(response.status, reason.http_status(), "{reason}");
            }
        }
    }
    let verified = upstream.verified.lock().clone();
    assert!(
        verified.len() <= 1,
        "one signature verified twice: {verified:?}"
    );
    for seen in &verified {
        assert_eq!(seen.uri, target);
        assert_eq!(&seen.body[..], body);
        assert_eq!(seen.identity.user.as_deref(), Some("alice"));
        assert_eq!(seen.identity.roles, vec!["admin".to_owned()]);
    }
    // The unchanged request still passes if no mutant used its nonce, else it is a replay.
    let answer = exchange(upstream.addr, &signed).await;
    let responses = check_answers(&signed, &answer, &codes);
    let expected = if verified.is_empty() { 200 } else { 401 };
    assert_eq!(responses[0].status, expected, "{responses:?}");
}

// ---------------------------------------------------------------------------------------------
// Request smuggling shapes on the public listener
// ---------------------------------------------------------------------------------------------

/// A POST to `/api/items` as the SPA sends it, with `framing` (the body's length fields, each
/// ending in CRLF) and `body` as given.
fn spa_post(login: &Login, framing: &str, body: &[u8]) -> Vec<u8> {
    [
        format!(
            "POST /api/items HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\nX-CSRF-Token: {}\r\n\
             Origin: {ORIGIN}\r\nContent-Type: application/json\r\n{framing}\r\n",
            login.cookie, login.csrf
        )
        .as_bytes(),
        body,
    ]
    .concat()
}

/// Body framing conflicts (RFC 9112 §6.3): what the upstream application gets is the body
/// hyper decoded, signed as such (verified by the real `VerifyLayer`), never the other
/// reading; conflicting or malformed framing is refused; and trailers cannot add a signature,
/// a cookie or an identity.
#[tokio::test]
async fn framing_conflicts_reach_the_upstream_as_signed_or_not_at_all() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // Content-Length and Transfer-Encoding: the chunked reading wins; the length is dropped.
    let request = spa_post(
        &login,
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"7\r\n{\"a\":1}\r\n0\r\n\r\n",
    );
    let answer = exchange(h.addr, &request).await;
    let responses = check_answers(&request, &answer, &PROXY_CODES);
    assert_eq!(responses.len(), 1);
    if responses[0].status == 200 {
        assert_eq!(&h.upstream.last_verified().body[..], b"{\"a\":1}");
        let raw = h.upstream.last_raw();
        assert!(raw.headers.get("transfer-encoding").is_none());
        assert_eq!(raw.headers.get_all("content-length").iter().count(), 1);
        assert_eq!(raw.headers["content-length"], "7");
    }
    let forwarded = h.upstream.raw_count();
    // Refused outright: differing lengths, TE not ending in chunked, chunk sizes that
    // overflow, a bad chunk. Nothing reaches the upstream.
    let refused: [(&str, &[u8]); 6] = [
        ("Content-Length: 4\r\nContent-Length: 5\r\n", b"{}{}{"),
        ("Content-Length: 4, 5\r\n", b"{}{}{"),
        (
            "Transfer-Encoding: chunked, identity\r\n",
            b"2\r\n{}\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            b"10000000000000002\r\n{}\r\n0\r\n\r\n",
        ),
        ("Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n"),
        ("Content-Length: +2\r\n", b"{}"),
    ];
    for (framing, body) in refused {
        let request = spa_post(&login, framing, body);
        let answer = exchange(h.addr, &request).await;
        let responses = check_answers(&request, &answer, &PROXY_CODES);
        assert!(
            responses.iter().all(|r| r.status == 400),
            "{framing:?}: {responses:?}"
        );
    }
    assert_eq!(
        h.upstream.raw_count(),
        forwarded,
        "a malformed body was forwarded"
    );
    // Trailers: not forwarded, and none of them speaks for the proxy.
    let request = spa_post(
        &login,
        "Transfer-Encoding: chunked\r\nTrailer: Signature, X-Auth-User\r\n",
        b"2\r\n{}\r\n0\r\nSignature: sig1=:AAAA:\r\nX-Auth-User: root\r\nCookie: x=1\r\n\r\n",
    );
    let answer = exchange(h.addr, &request).await;
    let responses = check_answers(&request, &answer, &PROXY_CODES);
    assert_eq!(responses[0].status, 200, "{responses:?}");
    let seen = h.upstream.last_verified();
    assert_eq!(seen.identity.user.as_deref(), Some("alice"));
    assert_eq!(&seen.body[..], b"{}");
    let raw = h.upstream.last_raw();
    assert_eq!(raw.headers.get_all("signature").iter().count(), 1);
    assert!(raw.headers.get("trailer").is_none());
}

/// Pipelined requests after a refused one: the body the proxy refused without reading (a
/// declared length over the route limit, with and without `Expect: 100-continue`) is never
/// read as a request, and a request that follows a refused one is judged on its own (no
/// session carried over from the one before).
#[tokio::test]
async fn a_refused_request_lends_nothing_to_the_one_pipelined_after_it() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let smuggled = format!(
        "GET /api/smuggled HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n",
        login.cookie
    );
    for expect in ["", "Expect: 100-continue\r\n"] {
        // Declared over the 64 KiB route limit: 413 before reading; the "body" is a request.
        let request = spa_post(
            &login,
            &format!("{expect}Content-Length: 70000\r\n"),
            smuggled.as_bytes(),
        );
        let answer = exchange(h.addr, &request).await;
        let responses = check_answers(&request, &answer, &PROXY_CODES);
        assert_eq!(
            responses
                .iter()
                .map(|r| (r.status, r.error_code()))
                .collect::<Vec<_>>(),
            vec![(413, Some("body_too_large".to_owned()))],
            "{expect:?}"
        );
    }
    // A CSRF refusal then a request without a cookie: the second is unauthenticated.
    let request = [
        spa_post(&login, "Content-Length: 2\r\n", b"{}").as_slice(),
        b"GET /api/items HTTP/1.1\r\nHost: app.test\r\n\r\n",
    ]
    .concat();
    // The first request's CSRF token is broken, so it is refused.
    let request = String::from_utf8(request)
        .unwrap()
        .replacen(&login.csrf, "wrong-token", 1)
        .into_bytes();
    let answer = exchange(h.addr, &request).await;
    let responses = check_answers(&request, &answer, &PROXY_CODES);
    assert_eq!(
        responses
            .iter()
            .map(|r| (r.status, r.error_code()))
            .collect::<Vec<_>>(),
        vec![
            (403, Some("csrf".to_owned())),
            (401, Some("unauthenticated".to_owned()))
        ]
    );
    assert_eq!(
        h.upstream.raw_count(),
        0,
        "the smuggled request was forwarded"
    );
}

/// Request targets other than origin form: CONNECT (authority form) is 501; `OPTIONS *` is
/// refused; an absolute-form target naming another host is routed by its path and signed for
/// the upstream's authority (the upstream verifies it), never for the host it named.
#[tokio::test]
async fn unusual_request_targets_are_refused_or_signed_for_the_upstream() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let cases: [(&str, u16); 4] = [
        (
            "CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n",
            501,
        ),
        ("OPTIONS * HTTP/1.1\r\nHost: app.test\r\n", 404),
        (
            "GET http://evil.test/api/items HTTP/1.1\r\nHost: evil.test\r\n",
            200,
        ),
        (
            "GET http://evil.test/api/items HTTP/1.1\r\nHost: app.test\r\n",
            200,
        ),
    ];
    for (head, status) in cases {
        let request = format!("{head}Cookie: {}\r\n\r\n", login.cookie).into_bytes();
        let answer = exchange(h.addr, &request).await;
        let responses = check_answers(&request, &answer, &PROXY_CODES);
        assert_eq!(responses.len(), 1, "{head:?}");
        assert_eq!(responses[0].status, status, "{head:?}: {responses:?}");
        if status == 200 {
            let raw = h.upstream.last_raw();
            assert_eq!(raw.headers["host"], h.upstream.addr.to_string().as_str());
            assert_eq!(raw.uri, "/api/items");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c prior knowledge) frame abuse
// ---------------------------------------------------------------------------------------------

/// An HPACK block of literal fields without indexing, new names, no Huffman.
fn hpack_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The request fields of a GET of `path`, with alice's cookie.
fn h2_get<'a>(path: &'a str, login: &'a Login) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.test"),
        (":path", path),
        ("cookie", &login.cookie),
    ]
}

/// A frame received: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// What an h2c exchange ended with.
#[derive(Debug)]
struct H2Outcome {
    frames: Vec<Frame>,
    /// The server closed the connection (or reset it) within the limit.
    closed: bool,
}

impl H2Outcome {
    fn goaway(&self) -> bool {
        self.frames.iter().any(|f| f.0 == GOAWAY)
    }
    /// The `:status` of each response HEADERS, by stream (the proxy's answers are short
    /// literal or indexed fields; the status is decoded from the static table or a literal).
    fn statuses(&self) -> Vec<(u32, u16)> {
        self.frames
            .iter()
            .filter(|f| f.0 == HEADERS)
            .filter_map(|f| Some((f.2, hpack_status(&f.3)?)))
            .collect()
    }
    fn resets(&self) -> Vec<u32> {
        self.frames
            .iter()
            .filter(|f| f.0 == RST_STREAM)
            .map(|f| f.2)
            .collect()
    }
}

/// The `:status` of a response header block: its first field, which hyper writes first,
/// indexed (static table entries 8-14) or a literal with the indexed name `:status`.
fn hpack_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return match first & 0x7f {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    // Literal with an indexed name (any of the three literal kinds), name index 8..=14.
    let (name_index, rest) = match first {
        b if b & 0xc0 == 0x40 => (b & 0x3f, &block[1..]),
        b => (b & 0x0f, &block[1..]),
    };
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let len = usize::from(*rest.first()? & 0x7f);
    let value = rest.get(1..1 + len)?;
    if rest.first()? & 0x80 == 0 {
        return std::str::from_utf8(value).ok()?.parse().ok();
    }
    huffman_digits(value)?.parse().ok()
}

/// Decodes a Huffman-coded string of decimal digits (RFC 7541 Appendix B: `0`-`2` are the
/// 5-bit codes 00000-00010, `3`-`9` the 6-bit codes 011001-011111; the padding is ones).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |range: &[u8]| range.iter().fold(0u8, |v, b| v << 1 | b);
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        let rest = &bits[at..];
        if rest.iter().all(|&b| b == 1) && rest.len() < 8 {
            return Some(out); // padding
        }
        if rest.len() >= 5 && value(&rest[..5]) <= 2 {
            out.push(char::from(b'0' + value(&rest[..5])));
            at += 5;
        } else if rest.len() >= 6 && (0b011001..=0b011111).contains(&value(&rest[..6])) {
            out.push(char::from(b'3' + value(&rest[..6]) - 0b011001));
            at += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

/// Sends the preface, an empty SETTINGS and `frames`, acknowledges the server's SETTINGS, and
/// reads frames until `done` holds for the frames so far, the server closes, or `limit`
/// passes. Writes are best effort (the server may close mid-way).
async fn h2_exchange(
    addr: SocketAddr,
    frames: &[u8],
    limit: Duration,
    done: impl Fn(&[Frame]) -> bool,
) -> H2Outcome {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend_from_slice(frames);
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&out).await;
        writer
    });
    let mut received = Vec::new();
    let mut closed = false;
    let mut acks = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if reader.read_exact(&mut head).await.is_err() {
                closed = true;
                break;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | head[2] as usize;
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                closed = true;
                break;
            }
            if head[3] == SETTINGS && head[4] & 0x1 == 0 {
                acks.push(h2_frame(SETTINGS, 0x1, 0, &[]));
            }
            received.push((head[3], head[4], id, payload));
            if done(&received) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    if let Ok(mut writer) = writing.await {
        for ack in acks {
            let _ = writer.write_all(&ack).await;
        }
    }
    H2Outcome {
        frames: received,
        closed,
    }
}

/// The proxy still answers a plain HTTP/1.1 request and its admin `/healthz`.
async fn still_serving(h: &Harness, login: &Login) {
    let r = get(h.addr, "/api/items", login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(h.admin, Method::GET, "/healthz", &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Connection-level abuse after a valid preface: garbage, a HEADERS on stream 0 or on an even
/// (server-initiated) stream, a CONTINUATION flood far past `max_header_bytes`, a RST_STREAM
/// flood (rapid reset, CVE-2023-44487). Each connection ends with GOAWAY or a close within
/// the limit, without 500s, and the proxy keeps serving.
#[tokio::test]
async fn http2_connection_abuse_ends_the_connection_and_the_proxy_keeps_serving() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let request = hpack_block(&h2_get("/api/items", &login));
    let mut rng = StdRng::seed_from_u64(0x42);
    let garbage: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    let mut continuation_flood = h2_frame(HEADERS, 0, 1, &request);
    let filler = hpack_block(&[("x-filler", &"a".repeat(1000))]);
    for _ in 0..2000 {
        continuation_flood.extend(h2_frame(CONTINUATION, 0, 1, &filler));
    }
    let mut rapid_reset = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        rapid_reset.extend(h2_frame(HEADERS, END_HEADERS | END_STREAM, id, &request));
        rapid_reset.extend(h2_frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let cases: [(&str, Vec<u8>); 5] = [
        ("garbage", garbage),
        (
            "HEADERS on stream 0",
            h2_frame(HEADERS, END_HEADERS | END_STREAM, 0, &request),
        ),
        (
            "HEADERS on an even stream",
            h2_frame(HEADERS, END_HEADERS | END_STREAM, 2, &request),
        ),
        ("CONTINUATION flood", continuation_flood),
        ("rapid reset", rapid_reset),
    ];
    let forwarded = h.upstream.raw_count();
    for (what, frames) in cases {
        let started = Instant::now();
        let outcome = h2_exchange(h.addr, &frames, EXCHANGE_LIMIT, |_| false).await;
        assert!(
            outcome.closed,
            "{what}: still open after {EXCHANGE_LIMIT:?} ({} frames)",
            outcome.frames.len()
        );
        assert!(
            outcome.statuses().iter().all(|(_, s)| *s != 500),
            "{what}: {:?}",
            outcome.statuses()
        );
        // hyper answers each with GOAWAY (PROTOCOL_ERROR, COMPRESSION_ERROR, or
        // ENHANCE_YOUR_CALM after 20 resets), then closes.
        assert!(outcome.goaway(), "{what}: closed without GOAWAY");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    // Of the 2000 reset requests, at most the few before the GOAWAY went upstream.
    assert!(
        h.upstream.raw_count() - forwarded <= 32,
        "{}",
        h.upstream.raw_count()
    );
    still_serving(&h, &login).await;
}

/// Stream-level misuse, each on its own connection: a missing or duplicate `:path`, an
/// uppercase field name, connection-specific fields (`connection`, `te: gzip`,
/// `transfer-encoding`), a pseudo-field after a regular one, a `content-length` the DATA does
/// not match, a header block over `max_header_bytes`, `:authority` and `host` naming different
/// hosts. Each is refused (RST_STREAM, GOAWAY, or a 4xx), or for the host conflict served
/// signed for the upstream; never a 500, never forwarded unless served.
#[tokio::test]
async fn http2_malformed_streams_are_refused_and_never_forwarded() {
    let h = quick_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let cookie = login.cookie.as_str();
    let big = "b".repeat(20 * 1024);
    let base = |extra: &[(&'static str, &'static str)]| {
        let mut fields: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "app.test"),
            (":path", "/api/items"),
            ("cookie", cookie),
        ];
        fields.extend_from_slice(extra);
        fields
    };
    let no_path: Vec<(&str, &str)> = base(&[])
        .into_iter()
        .filter(|(n, _)| *n != ":path")
        .collect();
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no :path", no_path),
        ("two :path", base(&[(":path", "/api/other")])),
        ("uppercase name", base(&[("X-Upper", "1")])),
        ("connection field", base(&[("connection", "keep-alive")])),
        ("te: gzip", base(&[("te", "gzip")])),
        (
            "transfer-encoding",
            base(&[("transfer-encoding", "chunked")]),
        ),
        ("pseudo after regular", base(&[(":status", "200")])),
        ("unknown pseudo", base(&[(":protocol", "websocket")])),
        ("empty :path", {
            let mut f = base(&[]);
            f[3].1 = "";
            f
        }),
        ("path without slash", {
            let mut f = base(&[]);
            f[3].1 = "api/items";
            f
        }),
        ("header list over the limit", {
            let mut f = base(&[]);
            f.push(("x-big", big.as_str()));
            f
        }),
    ];
    for (what, fields) in cases {
        let block = hpack_block(&fields);
        let frames = h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &block);
        let outcome = h2_exchange(h.addr, &frames, EXCHANGE_LIMIT, |f| {
            f.iter()
                .any(|f| f.2 == 1 && (f.0 == RST_STREAM || f.1 & END_STREAM != 0) || f.0 == GOAWAY)
        })
        .await;
        let statuses = outcome.statuses();
        let refused = outcome.goaway()
            || outcome.resets().contains(&1)
            || statuses
                .iter()
                .any(|(id, s)| *id == 1 && (400..500).contains(s));
        assert!(refused, "{what}: not refused: {outcome:?}");
        assert!(
            statuses.iter().all(|(_, s)| *s != 500),
            "{what}: {statuses:?}"
        );
        assert_eq!(h.upstream.raw_count(), 0, "{what}: forwarded");
    }
    // A body longer than its content-length: the stream is reset, nothing forwarded.
    let post = hpack_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "app.test"),
        (":path", "/api/items"),
        ("cookie", cookie),
        ("x-csrf-token", &login.csrf),
        ("origin", ORIGIN),
        ("content-length", "2"),
    ]);
    let mut frames = h2_frame(HEADERS, END_HEADERS, 1, &post);
    frames.extend(h2_frame(DATA, END_STREAM, 1, b"{}{}"));
    let outcome = h2_exchange(h.addr, &frames, EXCHANGE_LIMIT, |f| {
        f.iter()
            .any(|f| f.2 == 1 && (f.0 == RST_STREAM || f.1 & END_STREAM != 0) || f.0 == GOAWAY)
    })
    .await;
    assert!(
        outcome.resets().contains(&1)
            || outcome.goaway()
            || outcome
                .statuses()
                .iter()
                .any(|(_, s)| (400..500).contains(s)),
        "{outcome:?}"
    );
    assert_eq!(
        h.upstream.raw_count(),
        0,
        "a body over its length was forwarded"
    );
    // `:authority` and `host` disagree: routed by path, signed for the upstream's authority.
    let block = hpack_block(&base(&[("host", "evil.test")]));
    let frames = h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &block);
    let outcome = h2_exchange(h.addr, &frames, EXCHANGE_LIMIT, |f| {
        f.iter()
            .any(|f| f.2 == 1 && (f.0 == RST_STREAM || f.1 & END_STREAM != 0) || f.0 == GOAWAY)
    })
    .await;
    let statuses = outcome.statuses();
    assert!(statuses.iter().all(|(_, s)| *s != 500), "{statuses:?}");
    if statuses.contains(&(1, 200)) {
        let raw = h.upstream.last_raw();
        assert_eq!(raw.headers["host"], h.upstream.addr.to_string().as_str());
        assert_eq!(raw.headers.get_all("host").iter().count(), 1);
    }
    still_serving(&h, &login).await;
}

/// `http2_max_concurrent_streams = 4`: a client that opens ten streams at once (each a POST
/// whose body never comes) gets at most four served; the rest are refused (RST_STREAM),
/// and the four end with 408 once `request_timeout` passes, nothing forwarded.
#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.request_timeout = Duration::from_secs(1);
            s.http2_max_concurrent_streams = 4;
        }),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let post = hpack_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "app.test"),
        (":path", "/api/items"),
        ("cookie", &login.cookie),
        ("x-csrf-token", &login.csrf),
        ("origin", ORIGIN),
        ("content-length", "2"),
    ]);
    let mut frames = Vec::new();
    for i in 0..10u32 {
        frames.extend(h2_frame(HEADERS, END_HEADERS, 2 * i + 1, &post));
    }
    let outcome = h2_exchange(h.addr, &frames, EXCHANGE_LIMIT, |f| {
        f.iter()
            .filter(|f| f.0 == RST_STREAM || f.0 == HEADERS)
            .count()
            >= 10
            || f.iter().any(|f| f.0 == GOAWAY)
    })
    .await;
    // Later answers index the first one's `:status` in the dynamic table: counted by frame.
    let answered = outcome.frames.iter().filter(|f| f.0 == HEADERS).count();
    assert!(
        answered <= 4,
        "more streams served than allowed: {outcome:?}"
    );
    let statuses = outcome.statuses();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|(_, s)| *s == 408),
        "{statuses:?}"
    );
    assert!(
        outcome.resets().len() + answered >= 10 || outcome.goaway(),
        "{outcome:?}"
    );
    assert_eq!(h.upstream.raw_count(), 0);
    still_serving(&h, &login).await;
}

// ---------------------------------------------------------------------------------------------
// Clients that never read
// ---------------------------------------------------------------------------------------------

/// A proxy with two connection slots and 2 s client time limits.
async fn two_slot_proxy() -> Harness {
    two_slot_proxy_serving(None).await
}

/// [`two_slot_proxy`] with a static site.
async fn two_slot_proxy_serving(site: Option<countersign::proxy::static_files::Site>) -> Harness {
    Harness::start_with(HarnessOptions {
        site,
        tweak: Box::new(|s, _| {
            s.max_connections = 2;
            s.header_read_timeout = Duration::from_secs(2);
            s.request_timeout = Duration::from_secs(2);
            s.send_timeout = Duration::from_secs(2);
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// Waits (up to 10 s) until the upstream has seen `n` requests.
async fn upstream_saw(h: &Harness, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.upstream.raw_count() < n {
        assert!(
            Instant::now() < deadline,
            "the upstream saw {}",
            h.upstream.raw_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// docs/CONFIG.md `send_timeout` (like nginx's): a client that
/// asks for a large answer (1 GiB from the upstream) and then never reads it stalls the
/// proxy's writes once the socket buffers are full; such a connection must give its
/// `max_connections` slot back (and its upstream connection) once `send_timeout` passes
/// without the client taking any bytes, or a few unauthenticated-looking sockets (the answer
/// could as well be a large static file) hold every slot forever.
#[tokio::test]
async fn http1_clients_that_never_read_a_large_answer_give_their_slots_back() {
    let h = two_slot_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let request = format!(
        "GET /api/big?bytes={} HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n",
        1u64 << 30,
        login.cookie
    );
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut stream = answered_slot(h.addr).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        hogs.push(stream);
    }
    upstream_saw(&h, 2).await;
    assert_a_slot_comes_free(h.addr, "two clients did not read").await;
    drop(hogs);
}

/// Asserts that a new client is served (its `/auth/session` answered) once a slot comes free,
/// while `hogs` (what holds the slots) is said in the message.
async fn assert_a_slot_comes_free(addr: SocketAddr, hogs: &str) {
    let answer = answered_once_a_slot_is_free(
        addr,
        b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "no slot came free while {hogs}: {answer:?}"
    );
}

/// Waits (at most 10 s each) for the stalled clients' tasks to see their connections closed.
async fn all_closed(hogs: Vec<tokio::task::JoinHandle<()>>) {
    for hog in hogs {
        tokio::time::timeout(Duration::from_secs(10), hog)
            .await
            .expect("the stalled connection is closed")
            .unwrap();
    }
}

/// A connection that the proxy has accepted (a slot it holds): connected and still open after
/// a moment (a connection over the limit is closed at once).
async fn answered_slot(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await {
            Err(_) => return stream,
            Ok(_) => assert!(Instant::now() < deadline, "no slot for the client"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An h2c client that asks for `path` and then reads every frame the proxy sends (so its
/// socket never fills) but never opens a flow-control window: the stream stalls after the
/// first 64 KiB. Resolves when the proxy closes the connection.
async fn h2_client_that_never_opens_its_window(
    addr: SocketAddr,
    path: &str,
    login: &Login,
) -> tokio::task::JoinHandle<()> {
    let mut stream = answered_slot(addr).await;
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &hpack_block(&h2_get(path, login)),
    ));
    stream.write_all(&out).await.unwrap();
    tokio::spawn(async move {
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | head[2] as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[3] == SETTINGS && head[4] & 0x1 == 0 {
                let _ = stream.write_all(&h2_frame(SETTINGS, 0x1, 0, &[])).await;
            }
        }
    })
}

/// The HTTP/2 form of the client that never reads: it reads the socket but never sends a
/// WINDOW_UPDATE, so hyper's stream waits for flow-control credit forever and no write ever
/// blocks. Its connection must still give the slot back once `send_timeout` passes
/// without the stream taking any bytes (one such connection could otherwise hold
/// `http2_max_concurrent_streams` upstream connections and answers, forever).
#[tokio::test]
async fn http2_clients_that_never_open_their_window_give_their_slots_back() {
    let h = two_slot_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let path = format!("/api/big?bytes={}", 1u64 << 30);
    let mut hogs = Vec::new();
    for _ in 0..2 {
        hogs.push(h2_client_that_never_opens_its_window(h.addr, &path, &login).await);
    }
    upstream_saw(&h, 2).await;
    assert_a_slot_comes_free(h.addr, "two HTTP/2 clients kept their window shut").await;
    all_closed(hogs).await;
}

/// The same for static files, which hyper gets as one frame of the whole file: the stream must
/// count as waiting for the client until h2 has sent all of it, not only until the body has
/// handed it over. A file of exactly 64 KiB is handed over whole (its last slice once the ones
/// before have credit) with its last byte still lacking credit (the window is 65,535): it
/// stalled with its body already ended, and its connection held its slot until
/// `http2_idle_timeout` (60 s here). A 1 MiB file stalls with its body still running.
#[tokio::test]
async fn http2_clients_that_never_open_their_window_for_a_static_file_give_their_slots_back() {
    let dir = temp_dir("h2-static-stall");
    let root = dir.join("dist");
    write(&root.join("index.html"), "<!doctype html>");
    std::fs::write(root.join("window-and-a-byte.bin"), vec![1u8; 65_536]).unwrap();
    std::fs::write(root.join("big.bin"), vec![1u8; 1 << 20]).unwrap();
    let site = countersign::proxy::static_files::Site::Dir(
        countersign::proxy::static_files::StaticDir::new(&root).unwrap(),
    );
    let h = two_slot_proxy_serving(Some(site)).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut hogs = Vec::new();
    for path in ["/window-and-a-byte.bin", "/big.bin"] {
        hogs.push(h2_client_that_never_opens_its_window(h.addr, path, &login).await);
    }
    assert_a_slot_comes_free(h.addr, "two HTTP/2 clients kept their window shut").await;
    all_closed(hogs).await;
}

/// The other side of the two tests above: a client that reads slowly but steadily keeps its
/// download well past `send_timeout` (2 s here), over HTTP/1 (taking up to 64 KiB every 200 ms)
/// and over HTTP/2 (granting 16 KiB of credit every 200 ms). Only a client that takes nothing
/// for the whole limit is cut off.
#[tokio::test]
async fn slow_but_steady_readers_keep_their_downloads() {
    let h = two_slot_proxy().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let path = format!("/api/big?bytes={}", 1u64 << 30);
    let run_for = Duration::from_secs(4);

    let mut http1 = answered_slot(h.addr).await;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n",
        login.cookie
    );
    http1.write_all(request.as_bytes()).await.unwrap();

    let mut http2 = answered_slot(h.addr).await;
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &hpack_block(&h2_get(&path, &login)),
    ));
    http2.write_all(&out).await.unwrap();

    let reading1 = async {
        let started = Instant::now();
        let mut taken = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while started.elapsed() < run_for {
            let n = http1.read(&mut buf).await.expect("HTTP/1 download cut off");
            assert!(n > 0, "HTTP/1 download closed after {taken} bytes");
            taken += n;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        taken
    };
    let reading2 = async {
        let started = Instant::now();
        let mut data = 0usize;
        let mut last_credit = Instant::now();
        while started.elapsed() < run_for {
            let mut head = [0u8; 9];
            let frame =
                tokio::time::timeout(Duration::from_millis(200), http2.read_exact(&mut head));
            if let Ok(read) = frame.await {
                read.expect("HTTP/2 download cut off");
                let len =
                    (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | head[2] as usize;
                let mut payload = vec![0u8; len];
                http2
                    .read_exact(&mut payload)
                    .await
                    .expect("HTTP/2 download cut off");
                assert_ne!(head[3], GOAWAY, "HTTP/2 download ended by GOAWAY");
                assert_ne!(head[3], RST_STREAM, "HTTP/2 download reset");
                if head[3] == SETTINGS && head[4] & 0x1 == 0 {
                    http2
                        .write_all(&h2_frame(SETTINGS, 0x1, 0, &[]))
                        .await
                        .unwrap();
                }
                if head[3] == DATA {
                    data += len;
                }
            }
            if last_credit.elapsed() >= Duration::from_millis(200) {
                last_credit = Instant::now();
                let credit = (16u32 * 1024).to_be_bytes();
                // WINDOW_UPDATE for the connection and for the stream.
                http2
                    .write_all(&h2_frame(0x8, 0, 0, &credit))
                    .await
                    .unwrap();
                http2
                    .write_all(&h2_frame(0x8, 0, 1, &credit))
                    .await
                    .unwrap();
            }
        }
        data
    };
    let (taken1, taken2) = tokio::join!(reading1, reading2);
    // Beyond the first window / socket buffers: the reads and credit kept it moving.
    assert!(taken1 > 0, "{taken1}");
    assert!(taken2 > 65_535 + 16 * 1024, "{taken2}");
}

// ---------------------------------------------------------------------------------------------
// The same over TLS (ALPN http/1.1 and h2)
// ---------------------------------------------------------------------------------------------

/// A TLS connection to `tls`'s proxy offering `alpn`; Err when the server closed it during
/// the handshake (it does at once when every slot is taken).
async fn try_tls(
    tls: &TlsHarness,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = support::tls_connector(tls.roots.clone(), &[alpn]);
    let tcp = TcpStream::connect(tls.h.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Logs alice in over TLS (HTTP/1.1) and returns her session cookie pair.
async fn tls_login(tls: &TlsHarness) -> Login {
    let stream = try_tls(tls, b"http/1.1").await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let body = format!(r#"{{"username":"alice","password":"{ALICE_PASSWORD}"}}"#);
    let request = http::Request::post("/auth/login")
        .header("host", "localhost")
        .header("origin", "https://localhost")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    let pair = cookie.split(';').next().unwrap().to_owned();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Login {
        cookie: pair,
        csrf: json["csrf_token"].as_str().unwrap().to_owned(),
    }
}

/// Over TLS, one client on HTTP/1.1 that never reads a large answer and one on h2 that never
/// gives flow-control credit: both slots come free once `send_timeout` passes, and a new
/// client is served again.
#[tokio::test]
async fn tls_clients_that_never_read_give_their_slots_back() {
    let tls = start_tls("hostile-tls", |s| {
        s.max_connections = 2;
        s.header_read_timeout = Duration::from_secs(2);
        s.request_timeout = Duration::from_secs(2);
        s.send_timeout = Duration::from_secs(2);
    })
    .await;
    let login = tls_login(&tls).await;
    let path = format!("/api/big?bytes={}", 1u64 << 30);
    // Connects until a slot is free (the login's connection closes a moment after its answer).
    let connect = |alpn: &'static [u8]| {
        let tls = &tls;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match try_tls(tls, alpn).await {
                    Ok(stream) => return stream,
                    Err(e) => assert!(Instant::now() < deadline, "no TLS slot: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut http1 = connect(b"http/1.1").await;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {}\r\n\r\n",
        login.cookie
    );
    http1.write_all(request.as_bytes()).await.unwrap();
    let mut http2 = connect(b"h2").await;
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    let mut fields = h2_get(&path, &login);
    fields[1].1 = "https";
    fields[2].1 = "localhost";
    out.extend(h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &hpack_block(&fields),
    ));
    http2.write_all(&out).await.unwrap();
    // The h2 client reads everything (acknowledging SETTINGS), never sends WINDOW_UPDATE.
    let h2_reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut acked = false;
        loop {
            match http2.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) if !acked => {
                    acked = true;
                    let _ = http2.write_all(&h2_frame(SETTINGS, 0x1, 0, &[])).await;
                }
                Ok(_) => {}
            }
        }
    });
    upstream_saw(&tls.h, 2).await;
    // Both slots held now; served again once the stalled connections are closed.
    let served = async {
        loop {
            if let Ok(stream) = try_tls(&tls, b"http/1.1").await {
                let mut stream = stream;
                let probe =
                    b"GET /auth/session HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                if stream.write_all(probe).await.is_ok() {
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer).await;
                    if answer.starts_with(b"HTTP/1.1 401") {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(12), served)
        .await
        .expect("no TLS client served while two clients did not read");
    tokio::time::timeout(Duration::from_secs(10), h2_reader)
        .await
        .expect("the stalled h2 connection is closed")
        .unwrap();
    drop(http1);
}

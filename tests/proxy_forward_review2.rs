//! Findings of a review of the request path's HTTP parsing (`src/proxy/server.rs`,
//! `src/proxy/forward.rs`), each against a real proxy and an upstream on loopback that records
//! the raw bytes it receives (what a strict HTTP/1.1 parser such as Node's llhttp reads):
//! - an HTTP/2 request may carry `content-length` more than once (h2 checks every line
//!   against the DATA frames and passes them all on); the proxy forwarded each line, and Node
//!   refuses a repeated `Content-Length` even with equal values (400 "Duplicate
//!   Content-Length"), so a request the proxy accepted and signed failed at the upstream.
//!
//! Run: `cargo test --all-features --test proxy_forward_review2`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// An upstream that keeps the raw bytes of each request head it reads (to the blank line),
/// reads the body its first `Content-Length` announces, answers `200` with an empty body and
/// closes the connection.
struct RawUpstream {
    url: String,
    heads: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let kept = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let mut buffer = [0u8; 4096];
                    let head_end = loop {
                        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
                    let length = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while bytes.len() < head_end + length {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                        }
                    }
                    kept.lock().push(head);
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        RawUpstream { url, heads }
    }

    fn last_head(&self) -> String {
        self.heads
            .lock()
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
}

/// The `Content-Length` field lines of a raw head, their values as written.
fn content_length_lines(head: &str) -> Vec<String> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim().to_owned())
        .collect()
}

/// A proxy with the test harness's `/api/` route and a public `/raw/` route to `upstream`.
async fn proxy_before(upstream: &RawUpstream) -> Harness {
    let url = upstream.url.clone();
    Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            let mut raw = route("raw", "/raw/", &url);
            raw.auth_required = false;
            s.routes.push(raw);
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// An h2c `POST` of `hello` whose head says `content-length: 5` twice (equal values, which
/// h2 accepts and checks against the DATA): the upstream gets one `Content-Length: 5` line,
/// as it does for the same request over HTTP/1.1 (hyper's server keeps the first). Before the
/// fix both lines went upstream, and Node's parser answered 400 "Duplicate Content-Length".
#[tokio::test]
async fn a_repeated_h2_content_length_reaches_the_upstream_as_one_line() {
    let upstream = RawUpstream::start().await;
    let h = proxy_before(&upstream).await;

    let mut sender = support_h2::h2c(h.addr).await;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/raw/items", h.addr))
        .header("origin", ORIGIN)
        .header("content-length", "5")
        .header("content-length", "5")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.version(), Version::HTTP_2);
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let head = upstream.last_head();
    assert_eq!(content_length_lines(&head), ["5"], "{head}");

    // The same over HTTP/1.1: one line too.
    let r = send(
        h.addr,
        Method::POST,
        "/raw/items",
        &[
            ("origin", ORIGIN),
            ("content-length", "5"),
            ("content-length", "5"),
        ],
        Bytes::from_static(b"hello"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let head = upstream.last_head();
    assert_eq!(content_length_lines(&head), ["5"], "{head}");
}

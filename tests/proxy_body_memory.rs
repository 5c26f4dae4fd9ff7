//! `server.max_body_memory`: one cap on the memory all request bodies being read (or held
//! for signing) take at once, over every connection. Before it, each route's `max_body`
//! bounded one request and nothing bounded their sum: one HTTP/2 connection with 256 streams
//! could make the proxy hold 256 × `max_body` (docs/DEPLOYMENT.md named it as a gap).
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_reload;
mod support_run;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use support::*;
use support_reload::*;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const CAP: usize = 64 * 1024;

/// A proxy whose bodies may take [`CAP`] bytes at once; `/api/` takes bodies up to `CAP`.
async fn capped() -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.max_body_memory = CAP;
            for route in &mut s.routes {
                route.max_body = CAP;
            }
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// Waits until the held-bytes gauge reads `expected` (the proxy reads what it is sent on its
/// own schedule).
async fn held_becomes(h: &Harness, expected: u64) {
    for _ in 0..500 {
        if gauge(h.admin, "countersign_body_memory_bytes").await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "countersign_body_memory_bytes stayed {} (expected {expected})",
        gauge(h.admin, "countersign_body_memory_bytes").await
    );
}

/// A POST to `/api/notes` whose head (with `framing`) is sent, and `first` bytes of body.
async fn start_post(h: &Harness, login: &Login, framing: &str, first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /api/notes HTTP/1.1\r\nhost: app.test\r\norigin: {ORIGIN}\r\ncookie: {}\r\n\
         x-csrf-token: {}\r\ncontent-type: application/json\r\n{framing}\r\n",
        login.cookie, login.csrf
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// A body declared by `Content-Length` takes its whole length when its head arrives; another
/// that cannot fit beside it is answered 503 `body_memory_limit` (`Retry-After: 1`) at once,
/// before any of its bytes are sent, and nothing reaches the upstream. Once the first is
/// forwarded its share is given back, and the same request passes.
#[tokio::test]
async fn a_declared_body_that_cannot_fit_is_refused_before_it_is_read() {
    let h = capped().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_limit_bytes").await,
        CAP as u64
    );
    assert_eq!(gauge(h.admin, "countersign_body_memory_bytes").await, 0);

    let body = vec![b'a'; 40_000];
    let mut first = start_post(&h, &login, "content-length: 40000\r\n", &body[..1000]).await;
    held_becomes(&h, 40_000).await;

    // 40000 + 30000 > 65536: refused on its head alone (no byte of body sent).
    let mut second = start_post(&h, &login, "content-length: 30000\r\n", b"").await;
    let refused = whole_answer(&mut second).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains(r#"{"error":"body_memory_limit"}"#),
        "{refused}"
    );
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{refused}"
    );
    assert_eq!(h.upstream.raw_count(), 0, "nothing forwarded");
    // 40000 + 25536 = 65536 fits exactly.
    let exact = post_json(h.addr, "/api/notes", &login, &"b".repeat(25_536)).await;
    assert_eq!(exact.status, StatusCode::OK, "{}", exact.text());
    assert_eq!(h.upstream.raw_count(), 1);

    // The first body ends: forwarded, and its share given back.
    first.write_all(&body[1000..]).await.unwrap();
    let done = whole_answer(&mut first).await;
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    held_becomes(&h, 0).await;
    let again = post_json(h.addr, "/api/notes", &login, &"c".repeat(30_000)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_refused_total").await,
        1
    );
    let scrape = send(h.admin, Method::GET, "/metrics", &[], "").await.text();
    assert!(
        scrape.contains("countersign_refusals_total{reason=\"body_memory_limit\"} 1\n"),
        "{scrape}"
    );
}

/// A chunked body (no length announced) takes its bytes as they arrive; the chunk that would
/// take the bodies past the cap is refused 503 then, mid-body, and the bytes it held are given
/// back. A refused write changes no state: the session is not extended by it.
#[tokio::test]
async fn a_chunked_body_is_refused_when_its_bytes_pass_the_cap() {
    let h = capped().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut holder = start_post(&h, &login, "content-length: 50000\r\n", b"x").await;
    held_becomes(&h, 50_000).await;

    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b'y', n));
        c.extend_from_slice(b"\r\n");
        c
    };
    let mut chunked =
        start_post(&h, &login, "transfer-encoding: chunked\r\n", &chunk(10_000)).await;
    held_becomes(&h, 60_000).await;
    // The session's idle timer before the refused write.
    h.clock.advance(60);
    chunked.write_all(&chunk(10_000)).await.unwrap();
    let refused = whole_answer(&mut chunked).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains(r#"{"error":"body_memory_limit"}"#),
        "{refused}"
    );
    held_becomes(&h, 50_000).await;
    assert_eq!(h.upstream.raw_count(), 0);
    drop(holder.shutdown().await);
    drop(holder);
    held_becomes(&h, 0).await;
    // Not touched by the refused write: the session ends at its idle timeout counted from
    // the login (now one second past it), not from the refusal.
    h.clock.advance(IDLE.as_secs() - 59);
    let after = get(h.addr, "/api/x", &login).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{}", after.text());
}

/// The login's body counts too while it is read, and its share is given back once read.
#[tokio::test]
async fn a_login_body_counts_while_it_is_read() {
    let h = capped().await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    let head = format!(
        "POST /auth/login HTTP/1.1\r\nhost: app.test\r\norigin: {ORIGIN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..5]).await.unwrap();
    held_becomes(&h, body.len() as u64).await;
    stream.write_all(&body.as_bytes()[5..]).await.unwrap();
    let answered = whole_answer(&mut stream).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    held_becomes(&h, 0).await;
}

/// The case the cap is for: one HTTP/2 connection opening many streams, each with a body
/// sent in part and held. Only what fits is read; the other streams are answered 503 at once
/// (here 16 bodies of 8 KiB against a 64 KiB cap: 8 held, 8 refused), and none is forwarded.
#[tokio::test]
async fn one_http2_connection_cannot_hold_more_than_the_cap() {
    let h = capped().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut sender = support_h2::h2c(h.addr).await;
    let mut feeds = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..16 {
        let (feed, frames) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        feed.send(Ok(http_body::Frame::data(Bytes::from(vec![b'z'; 1024]))))
            .await
            .unwrap();
        let request = Request::post("http://app.test/api/notes")
            .header("origin", ORIGIN)
            .header("cookie", &login.cookie)
            .header("x-csrf-token", &login.csrf)
            .header("content-type", "application/json")
            .header("content-length", "8192")
            .body(StreamBody::new(tokio_stream_of(frames)))
            .unwrap();
        sender.ready().await.unwrap();
        answers.push(tokio::spawn(sender.send_request(request)));
        feeds.push(feed);
    }
    let mut refused = 0;
    let mut pending = Vec::new();
    for answer in answers {
        match tokio::time::timeout(Duration::from_millis(500), answer).await {
            Ok(done) => {
                let response = done.unwrap().unwrap();
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], br#"{"error":"body_memory_limit"}"#);
                refused += 1;
            }
            Err(_) => pending.push(()),
        }
    }
    assert_eq!(refused, 8, "8 of 16 streams refused");
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_bytes").await,
        8 * 8192
    );
    assert_eq!(h.upstream.raw_count(), 0);
    drop(feeds);
    held_becomes(&h, 0).await;
}

/// A `futures` stream over a tokio channel's receiver.
fn tokio_stream_of<T>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// `server.max_body_memory` is live: a reload's value is the limit at once (`/metrics`), and a
/// file that sets it below a route's `max_body` is refused whole, the running limit kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_cap_and_a_cap_below_a_route_body_is_refused() {
    let upstream = serve_each(|_stream| async {}).await;
    let running = start_reloadable(
        "body-memory-reload",
        "shutdown_grace = \"2s\"\nmax_body_memory = \"1MiB\"",
        "",
        &format!("http://{upstream}"),
        "max_body = \"512KiB\"",
    );
    let limit = "countersign_body_memory_limit_bytes";
    assert_eq!(gauge(running.admin, limit).await, 1 << 20);
    running.reload(
        "shutdown_grace = \"2s\"\nmax_body_memory = \"2MiB\"",
        "",
        "max_body_memory",
    );
    assert_eq!(gauge(running.admin, limit).await, 2 << 20);
    // Below the route's 512 KiB: the file is invalid, nothing of it applied.
    running.reload_text(&running.text("shutdown_grace = \"2s\"\nmax_body_memory = \"256KiB\"", ""));
    assert_eq!(gauge(running.admin, limit).await, 2 << 20);
    let log = running.proxy.log();
    assert!(
        log.contains("server.max_body_memory") && log.contains("less than upstream[0].max_body"),
        "{log}"
    );
}

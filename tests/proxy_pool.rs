//! The per-route upstream connection pool (`proxy::upstream_pool`), observed from a real
//! upstream on loopback that counts the connections it accepts and how many are still open:
//! reuse, the idle timeout, the idle limit, concurrency beyond the pool, `Connection: close`,
//! upstreams that close pooled connections or drop a request, a connection still sending a body
//! the upstream stopped reading (not waited on), and that a request that may have
//! reached the upstream is never sent twice.
//! Run: `cargo test --all-features --test proxy_pool`.
#![cfg(feature = "proxy")]

mod support;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::proxy::forward::RouteSpec;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

struct CountingUpstream {
    url: String,
    counts: ConnectionCounts,
}

/// A hyper HTTP/1.1 upstream: `/pool/big` answers 256 KiB, `/pool/huge` 8 MiB, `/pool/empty`
/// 204; anything else a small JSON body, each after `delay`. `keep_alive: false` makes it
/// answer `Connection: close` and close.
async fn counting_upstream(delay: Duration, keep_alive: bool) -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = ConnectionCounts::default();
    serve_counted(listener, &counts, move |stream| async move {
        let service = service_fn(move |req: Request<Incoming>| async move {
            let path = req.uri().path().to_owned();
            // Read the request body, as an API would.
            let _ = req.into_body().collect().await;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let response = match path.as_str() {
                "/pool/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 256 * 1024]))),
                "/pool/huge" => Response::new(Full::new(Bytes::from(vec![b'x'; 8 * 1024 * 1024]))),
                "/pool/empty" => {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                _ => Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
            };
            Ok::<_, Infallible>(response)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(keep_alive)
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    CountingUpstream {
        url: format!("http://{addr}"),
        counts,
    }
}

/// A raw upstream that reads one request head per connection, then either answers it with a
/// keep-alive response and closes its side anyway (`answer: true`), or closes without
/// answering (`answer: false`). With `answer: true` a connection counts as open until the
/// proxy has closed its side too, i.e. until the proxy noticed the close.
async fn closing_upstream(answer: bool) -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = ConnectionCounts::default();
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
            let open = c.open.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if answer {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")
                        .await;
                    let _ = stream.flush().await;
                    // Close this side (FIN, what the proxy sees of any close), then read (and
                    // drop) until the proxy closes its side: no request is answered any more.
                    let _ = stream.shutdown().await;
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                open.fetch_sub(1, Ordering::SeqCst);
                // Dropping the stream closes the connection.
            });
        }
    });
    CountingUpstream {
        url: format!("http://{addr}"),
        counts,
    }
}

/// A public route (no session needed) under `prefix` to `url`.
fn pool_route(prefix: &str, url: &str, max_idle: usize, idle_timeout: Duration) -> RouteSpec {
    let mut spec = route("pool", prefix, url);
    spec.auth_required = false;
    spec.timeout = Duration::from_secs(3);
    spec.connect.pool_max_idle_per_host = max_idle;
    spec.connect.pool_idle_timeout = idle_timeout;
    spec
}

async fn proxy_with(routes: Vec<RouteSpec>) -> Harness {
    Harness::start_with(HarnessOptions {
        extra_routes: routes,
        ..HarnessOptions::default()
    })
    .await
}

async fn get_public(h: &Harness, path: &str) -> Reply {
    tokio::time::timeout(
        Duration::from_secs(10),
        send(h.addr, Method::GET, path, &[], Bytes::new()),
    )
    .await
    .expect("the proxy answers without hanging")
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = counting_upstream(Duration::ZERO, true).await;
    let h = proxy_with(vec![pool_route(
        "/pool/",
        &up.url,
        8,
        Duration::from_secs(30),
    )])
    .await;
    for i in 0..10 {
        // Small bodies, a streamed 256 KiB body and a bodiless 204: each gives the connection
        // back when its body ends.
        let path = ["/pool/x", "/pool/big", "/pool/empty"][i % 3];
        let r = get_public(&h, path).await;
        assert!(r.status.is_success(), "{path}: {} {}", r.status, r.text());
        if path == "/pool/big" {
            assert_eq!(r.body.len(), 256 * 1024);
        }
    }
    let r = send(
        h.addr,
        Method::POST,
        "/pool/x",
        &[("origin", ORIGIN), ("content-type", "application/json")],
        "{\"a\":1}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        up.counts.accepted(),
        1,
        "every request went over one connection"
    );
    assert_eq!(up.counts.open(), 1);
}

#[tokio::test]
async fn each_route_has_its_own_pool() {
    let up = counting_upstream(Duration::ZERO, true).await;
    let h = proxy_with(vec![
        pool_route("/pool/", &up.url, 8, Duration::from_secs(30)),
        RouteSpec {
            name: "pool2".into(),
            ..pool_route("/pool2/", &up.url, 8, Duration::from_secs(30))
        },
    ])
    .await;
    for _ in 0..3 {
        assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
        assert_eq!(get_public(&h, "/pool2/x").await.status, StatusCode::OK);
    }
    assert_eq!(up.counts.accepted(), 2, "one connection per route");
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let up = counting_upstream(Duration::ZERO, true).await;
    let idle_timeout = Duration::from_secs(1);
    let h = proxy_with(vec![pool_route("/pool/", &up.url, 8, idle_timeout)]).await;
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    let answered = Instant::now();
    // Kept while younger than the idle timeout: polled from the answer on, so a close before
    // the timeout shows as a `closed_after` below it (no fixed pause that a busy machine could
    // stretch past the timeout).
    assert_eq!(up.counts.open(), 1, "kept after the answer");
    assert!(
        eventually(Duration::from_secs(10), || up.counts.open() == 0).await,
        "the idle connection was not closed"
    );
    let closed_after = answered.elapsed();
    // The sweeper closes it within a quarter of the timeout after it passes; the rest of the
    // bound is slack for a loaded machine (the default timeout is 60 s).
    assert!(
        closed_after >= idle_timeout && closed_after < idle_timeout * 5,
        "closed after {closed_after:?}, idle timeout {idle_timeout:?}"
    );
    // The next request connects again.
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    assert_eq!(up.counts.accepted(), 2);
}

#[tokio::test]
async fn the_pool_keeps_at_most_max_idle_connections() {
    // Each answer waits long enough that the five requests of the burst all reach the upstream
    // before the first ends, also on a loaded machine (else one could reuse its connection).
    let up = counting_upstream(Duration::from_secs(1), true).await;
    let h = Arc::new(
        proxy_with(vec![pool_route(
            "/pool/",
            &up.url,
            2,
            Duration::from_secs(30),
        )])
        .await,
    );
    let burst: Vec<_> = (0..5)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get_public(&h, "/pool/x").await.status })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        up.counts.accepted(),
        5,
        "five concurrent requests, five connections"
    );
    assert!(
        eventually(Duration::from_secs(3), || up.counts.open() == 2).await,
        "{} connections open, expected the 2 pooled ones",
        up.counts.open()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.counts.open(), 2);
    // The two pooled connections serve the next requests.
    for _ in 0..4 {
        assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    }
    assert_eq!(up.counts.accepted(), 5);
}

#[tokio::test]
async fn concurrency_beyond_the_pool_opens_new_connections_without_queueing() {
    // Queued behind the pool the burst would take 4 × delay; in parallel about 1 ×. The bound
    // is 3 ×, so the delay is long enough for a loaded machine's slack to fit in 2 ×.
    let delay = Duration::from_secs(1);
    let up = counting_upstream(delay, true).await;
    let h = Arc::new(
        proxy_with(vec![pool_route(
            "/pool/",
            &up.url,
            1,
            Duration::from_secs(30),
        )])
        .await,
    );
    // Warm: one pooled connection.
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    let started = Instant::now();
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get_public(&h, "/pool/x").await.status })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    let took = started.elapsed();
    assert_eq!(
        up.counts.accepted(),
        4,
        "the pooled connection plus three new ones"
    );
    assert!(
        took < delay * 3,
        "the burst queued behind the pool: {took:?}"
    );
}

#[tokio::test]
async fn max_idle_zero_uses_a_connection_per_request() {
    let up = counting_upstream(Duration::ZERO, true).await;
    let h = proxy_with(vec![pool_route(
        "/pool/",
        &up.url,
        0,
        Duration::from_secs(30),
    )])
    .await;
    for _ in 0..3 {
        assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    }
    assert_eq!(up.counts.accepted(), 3);
    assert!(eventually(Duration::from_secs(3), || up.counts.open() == 0).await);
}

#[tokio::test]
async fn connection_close_from_the_upstream_is_not_pooled() {
    let up = counting_upstream(Duration::ZERO, false).await;
    let h = proxy_with(vec![pool_route(
        "/pool/",
        &up.url,
        8,
        Duration::from_secs(30),
    )])
    .await;
    for _ in 0..3 {
        let r = get_public(&h, "/pool/x").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // Hop-by-hop: the upstream's `Connection: close` is not passed on.
        assert!(r.headers.get("connection").is_none());
    }
    assert_eq!(up.counts.accepted(), 3);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    let up = closing_upstream(true).await;
    let h = proxy_with(vec![pool_route(
        "/pool/",
        &up.url,
        8,
        Duration::from_secs(30),
    )])
    .await;
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    // Wait until the proxy has seen the close of the idle connection (it closed its side).
    assert!(
        eventually(Duration::from_secs(10), || up.counts.open() == 0).await,
        "the proxy never closed its side of the connection the upstream closed"
    );
    let r = get_public(&h, "/pool/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.counts.accepted(), 2);
    // Right after a close the proxy may not have noticed it yet: the request then either
    // succeeds on a new connection or fails cleanly with 502 — never hangs.
    for _ in 0..5 {
        let r = get_public(&h, "/pool/x").await;
        assert!(
            r.status == StatusCode::OK
                || (r.status == StatusCode::BAD_GATEWAY && r.error_code() == "bad_gateway"),
            "{} {}",
            r.status,
            r.text()
        );
    }
}

#[tokio::test]
async fn a_request_the_upstream_dropped_is_a_502_and_never_resent() {
    let up = closing_upstream(false).await;
    // A route timeout far beyond the bound below, so that waiting for it shows.
    let mut spec = pool_route("/pool/", &up.url, 8, Duration::from_secs(30));
    spec.timeout = Duration::from_secs(30);
    let h = proxy_with(vec![spec]).await;
    let started = Instant::now();
    let r = send(
        h.addr,
        Method::POST,
        "/pool/x",
        &[("origin", ORIGIN), ("content-type", "application/json")],
        "{\"pay\":1}",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.text(), r#"{"error":"bad_gateway"}"#);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no wait for the route timeout: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The request reached the upstream: sending it again could repeat its effect.
    assert_eq!(up.counts.accepted(), 1, "the request was resent");
}

#[tokio::test]
async fn a_response_body_abandoned_by_the_client_does_not_return_its_connection() {
    let up = counting_upstream(Duration::ZERO, true).await;
    let h = proxy_with(vec![pool_route(
        "/pool/",
        &up.url,
        8,
        Duration::from_secs(30),
    )])
    .await;
    let response = send_streaming(h.addr, Method::GET, "/pool/huge", &[], Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK);
    // Read a little, then hang up mid-body.
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    // The half-read upstream connection is closed, not pooled.
    assert!(
        eventually(Duration::from_secs(3), || up.counts.open() == 0).await,
        "{} upstream connections still open",
        up.counts.open()
    );
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    assert_eq!(up.counts.accepted(), 2);
}

/// A raw upstream that answers every request as soon as its head has arrived. On the first
/// connection it then stops reading (the request body is left unread, the socket kept open),
/// like an API that rejects an upload early; later connections are served normally, one
/// request head after another.
async fn early_answering_upstream() -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = ConnectionCounts::default();
    let c = counts.clone();
    tokio::spawn(async move {
        let mut stalled = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let first = c.accepted.fetch_add(1, Ordering::SeqCst) == 0;
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
            if first {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
                // Never read again, never close: the rest of the body stays in flight.
                stalled.push(stream);
                continue;
            }
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    CountingUpstream {
        url: format!("http://{addr}"),
        counts,
    }
}

#[tokio::test]
async fn a_connection_still_sending_an_unread_body_is_not_waited_on() {
    let up = early_answering_upstream().await;
    let mut spec = pool_route("/pool/", &up.url, 8, Duration::from_secs(30));
    spec.max_body = 64 * 1024 * 1024;
    // A route timeout far beyond the bound below, so that waiting on the stalled connection
    // until it ends shows.
    spec.timeout = Duration::from_secs(30);
    let h = proxy_with(vec![spec]).await;
    // 32 MiB: far more than the loopback socket buffers hold, so the proxy is still writing
    // the body to the first connection when the upstream's answer has arrived and ended.
    let upload = tokio::time::timeout(
        Duration::from_secs(10),
        send(
            h.addr,
            Method::POST,
            "/pool/upload",
            &[("origin", ORIGIN)],
            Bytes::from(vec![b'u'; 32 * 1024 * 1024]),
        ),
    )
    .await
    .expect("the early answer is passed on without waiting for the body to be sent");
    assert_eq!(upload.status, StatusCode::OK, "{}", upload.text());
    // The next request must not queue behind that connection (it will never be ready again):
    // it gets a fresh one, promptly.
    let started = Instant::now();
    let r = get_public(&h, "/pool/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.counts.accepted(), 2);
    // And that one is reused as usual.
    assert_eq!(get_public(&h, "/pool/x").await.status, StatusCode::OK);
    assert_eq!(up.counts.accepted(), 2);
}

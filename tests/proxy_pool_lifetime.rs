//! `[[upstream]] pool_max_lifetime` (nginx's `keepalive_time`): a pooled upstream connection
//! made longer ago than the lifetime is not taken for a new request and not given back after
//! its exchange (it closes), while an exchange in flight is never cut. Observed from a real
//! hyper upstream on loopback that counts the connections it accepts and how many are open.
//! The config key's parsing (default, `"off"`, bad values naming file and key) is checked
//! here too, with `pool_stale_after`'s (the same kind of key; its behaviour is in
//! `tests/proxy_pool_stale.rs`). The mutual-TLS consequence (a busy connection picks up a reloaded client
//! certificate) is in `tests/proxy_upstream_mtls.rs`.
//! Run: `cargo test --all-features --test proxy_pool_lifetime`.
#![cfg(feature = "proxy")]

mod support;

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::forward::RouteSpec;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

/// The lifetime the tests give connections.
const LIFETIME: Duration = Duration::from_millis(300);

/// How many pieces `/life/slow` sends, and the pause before each.
const SLOW_PIECES: usize = 8;
const SLOW_PAUSE: Duration = Duration::from_millis(100);

struct CountingUpstream {
    url: String,
    counts: ConnectionCounts,
}

/// A body of `SLOW_PIECES` pieces of 1 KiB, each after `SLOW_PAUSE`: an answer that takes
/// longer than [`LIFETIME`] to stream.
struct SlowBody {
    left: usize,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.left -= 1;
                let next = tokio::time::Instant::now() + SLOW_PAUSE;
                self.pause.as_mut().reset(next);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b's'; 1024])))))
            }
        }
    }
}

/// A keep-alive hyper HTTP/1.1 upstream: `/life/slow` streams [`SlowBody`], anything else
/// answers a small JSON body at once.
async fn counting_upstream() -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = ConnectionCounts::default();
    serve_counted(listener, &counts, move |stream| async move {
        let service = service_fn(move |req: Request<Incoming>| async move {
            let slow = req.uri().path() == "/life/slow";
            let _ = req.into_body().collect().await;
            let body = if slow {
                Either::Left(SlowBody {
                    left: SLOW_PIECES,
                    pause: Box::pin(tokio::time::sleep(SLOW_PAUSE)),
                })
            } else {
                Either::Right(Full::new(Bytes::from_static(b"{\"ok\":true}")))
            };
            Ok::<_, Infallible>(Response::new(body))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    CountingUpstream {
        url: format!("http://{addr}"),
        counts,
    }
}

/// A public route under `/life/` to `url` with this max lifetime (and a long idle timeout,
/// so only the lifetime retires connections).
fn lifetime_route(url: &str, lifetime: Option<Duration>) -> RouteSpec {
    let mut spec = route("life", "/life/", url);
    spec.auth_required = false;
    spec.timeout = Duration::from_secs(5);
    spec.connect.pool_idle_timeout = Duration::from_secs(30);
    spec.connect.pool_max_lifetime = lifetime;
    spec
}

async fn proxy_with(spec: RouteSpec) -> Harness {
    Harness::start_with(HarnessOptions {
        extra_routes: vec![spec],
        ..HarnessOptions::default()
    })
    .await
}

/// One keep-alive client connection to the proxy, as a browser holds one.
async fn client(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// GET `path` on the client connection `sender`; status and whole body.
async fn get_on(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, Bytes) {
    let exchange = async {
        sender.ready().await.expect("client connection ready");
        let request = Request::get(path)
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.expect("response");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (status, body.to_bytes())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the proxy answers without hanging")
}

/// Sends GETs back to back on one client connection, more than 20, until `done(the requests
/// so far)`; every one must be a 200. Returns when each started and ended.
async fn back_to_back(
    addr: SocketAddr,
    done: impl Fn(&RequestSpans) -> bool,
) -> Vec<(Instant, Instant)> {
    let mut sender = client(addr).await;
    let mut sent = Vec::new();
    while sent.len() <= 20 || !done(&sent) {
        let started = Instant::now();
        let (status, body) = get_on(&mut sender, addr, "/life/x").await;
        assert_eq!(status, StatusCode::OK, "request {}: {body:?}", sent.len());
        assert_eq!(&body[..], b"{\"ok\":true}");
        sent.push((started, Instant::now()));
    }
    sent
}

#[tokio::test]
async fn a_busy_connection_is_replaced_after_its_lifetime_and_no_request_fails() {
    let up = counting_upstream().await;
    let h = proxy_with(lifetime_route(&up.url, Some(LIFETIME))).await;
    // Requests with no pause (the connection never goes idle) until they needed 4 connections
    // at least (timed by the requests themselves, so a stalled machine only makes the run
    // longer): never retired would be 1, a connection per request as many as the requests
    // (over 20).
    let sent = back_to_back(h.addr, |sent| fewest_connections(sent, LIFETIME) >= 4).await;
    let accepted = up.counts.accepted();
    // One connection per lifetime, never one per request; one more than a lifetime each
    // allows: a margin.
    let (fewest, most) = (
        fewest_connections(&sent, LIFETIME),
        most_connections(&sent, LIFETIME) + 1,
    );
    assert!(
        (fewest..=most).contains(&accepted) && accepted < sent.len(),
        "{accepted} upstream connections for {} requests over {:?} ({fewest}..={most} \
         expected)",
        sent.len(),
        sent[sent.len() - 1].1 - sent[0].0
    );
    // The retired ones were closed, not left open (the idle timeout is 30 s).
    assert!(
        eventually(Duration::from_secs(10), || up.counts.open() <= 1).await,
        "{} upstream connections still open",
        up.counts.open()
    );
}

#[tokio::test]
async fn without_a_lifetime_one_connection_serves_every_request() {
    let up = counting_upstream().await;
    let h = proxy_with(lifetime_route(&up.url, None)).await;
    // Over 4 lifetimes' time.
    let sent = back_to_back(h.addr, |sent| sent[0].0.elapsed() >= LIFETIME * 4).await;
    assert_eq!(up.counts.accepted(), 1, "{} requests", sent.len());
    assert_eq!(up.counts.open(), 1);
}

#[tokio::test]
async fn an_answer_streaming_past_the_lifetime_completes_and_its_connection_then_closes() {
    let up = counting_upstream().await;
    let h = proxy_with(lifetime_route(&up.url, Some(LIFETIME))).await;
    let mut sender = client(h.addr).await;
    let start = Instant::now();
    let (status, body) = get_on(&mut sender, h.addr, "/life/slow").await;
    let took = start.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(
        took > LIFETIME * 2,
        "the answer took {took:?}: it must outlive the lifetime for this test"
    );
    assert_eq!(body.len(), SLOW_PIECES * 1024, "the answer arrived whole");
    assert!(body.iter().all(|&b| b == b's'));
    assert_eq!(up.counts.accepted(), 1);
    // Past its lifetime, the connection was not given back: it closes, and the next request
    // gets a new one.
    assert!(
        eventually(Duration::from_secs(10), || up.counts.open() == 0).await,
        "the retired connection is still open"
    );
    let (status, _) = get_on(&mut sender, h.addr, "/life/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.counts.accepted(), 2);
}

#[tokio::test]
async fn an_idle_connection_past_its_lifetime_is_closed_before_the_idle_timeout() {
    let up = counting_upstream().await;
    let h = proxy_with(lifetime_route(&up.url, Some(LIFETIME))).await;
    let mut sender = client(h.addr).await;
    let (status, _) = get_on(&mut sender, h.addr, "/life/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.counts.open(), 1);
    // The idle timeout is 30 s; the lifetime closes it (the sweeper runs every quarter of
    // the shorter of the two).
    assert!(
        eventually(Duration::from_secs(10), || up.counts.open() == 0).await,
        "the idle connection outlived its lifetime"
    );
    let (status, _) = get_on(&mut sender, h.addr, "/life/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.counts.accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// The config key
// ---------------------------------------------------------------------------------------------

fn config_with(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
         [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
         [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n{extra}\n"
    )
}

fn parse(text: &str) -> Result<ProxyConfig, countersign::proxy::config::ConfigError> {
    ProxyConfig::parse(text, Path::new("/etc/countersign/proxy.toml"))
}

#[test]
fn pool_max_lifetime_defaults_to_an_hour_takes_durations_and_off() {
    let lifetime = |extra: &str| parse(&config_with(extra)).unwrap().upstreams[0].pool_max_lifetime;
    assert_eq!(lifetime(""), Some(Duration::from_secs(3600)));
    assert_eq!(
        lifetime("pool_max_lifetime = \"30s\""),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        lifetime("pool_max_lifetime = \"300ms\""),
        Some(Duration::from_millis(300))
    );
    assert_eq!(lifetime("pool_max_lifetime = \"off\""), None);
    // It reaches the forwarder's settings.
    let config = parse(&config_with("pool_max_lifetime = \"2h\"")).unwrap();
    let settings = countersign::proxy::server::ProxySettings::from_config(&config).unwrap();
    assert_eq!(
        settings.routes[0].connect.pool_max_lifetime,
        Some(Duration::from_secs(7200))
    );
}

#[test]
fn pool_stale_after_defaults_to_a_second_takes_durations_and_off() {
    let stale = |extra: &str| parse(&config_with(extra)).unwrap().upstreams[0].pool_stale_after;
    assert_eq!(stale(""), Some(Duration::from_secs(1)));
    assert_eq!(
        stale("pool_stale_after = \"250ms\""),
        Some(Duration::from_millis(250))
    );
    assert_eq!(stale("pool_stale_after = \"off\""), None);
    let config = parse(&config_with("pool_stale_after = \"3s\"")).unwrap();
    let settings = countersign::proxy::server::ProxySettings::from_config(&config).unwrap();
    assert_eq!(
        settings.routes[0].connect.pool_stale_after,
        Some(Duration::from_secs(3))
    );
}

#[test]
fn bad_pool_max_lifetime_and_pool_stale_after_values_name_file_key_and_problem() {
    for key in ["pool_max_lifetime", "pool_stale_after"] {
        for (value, problem) in [
            ("\"soon\"", "invalid duration"),
            ("\"0s\"", "greater than zero"),
            ("\"400d\"", "maximum of 365d"),
            ("\"\"", "invalid duration"),
            ("3600", "invalid type"),
        ] {
            let err = parse(&config_with(&format!("{key} = {value}"))).expect_err(value);
            assert!(
                err.to_string().starts_with("/etc/countersign/proxy.toml: "),
                "{key} = {value}: {err}"
            );
            if problem == "invalid type" {
                // A TOML type error: serde's message, which names the key.
                assert!(err.to_string().contains(key), "{err}");
                continue;
            }
            assert_eq!(err.key(), format!("upstream[0].{key}"), "{value}: {err}");
            assert!(err.problem().contains(problem), "{key} = {value}: {err}");
            assert!(err.problem().contains("\"off\""), "{key} = {value}: {err}");
        }
    }
}

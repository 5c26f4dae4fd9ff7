//! Streaming answers through the proxy, as an SPA using server-sent events (`text/event-stream`)
//! or long downloads sees them: each event arrives promptly (HTTP/1.1 chunked and h2c), a
//! stream outlives the route's `timeout`, `send_timeout` and `http2_idle_timeout`, a quiet
//! upstream is cut after `body_idle_timeout`, a browser that leaves frees the upstream
//! connection and its slot, an upstream that ends or dies ends the browser's stream (and the
//! broken connection is not pooled), a logout leaves an open stream running, many streams do not
//! starve API calls, and the event-stream headers pass untouched.
//! Run: `cargo test --all-features --test proxy_streaming`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How soon an event must reach the client after the upstream sent it. An event held back
/// until more data comes never arrives at all here (the next is sent only after it), so this
/// bound is for a delayed flush; 1 s leaves room for a loaded machine's scheduling stalls.
const PROMPT: Duration = Duration::from_secs(1);

type EventSender = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;
type UpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
type H2Client = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An upstream (hyper, HTTP/1.1 on loopback) whose `/events/...` answers are event streams the
/// test drives: each such request hands the test the stream's sender (send a frame to emit it,
/// an `Err` to break the connection mid-body, drop it to end the body cleanly). `/events/api`
/// answers a small JSON body at once.
struct EventUpstream {
    url: String,
    counts: ConnectionCounts,
    streams: mpsc::UnboundedReceiver<EventSender>,
}

impl EventUpstream {
    async fn start() -> EventUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = ConnectionCounts::default();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        serve_counted(listener, &counts, move |stream| {
            let streams_tx = streams_tx.clone();
            async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let streams_tx = streams_tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if path == "/events/api" {
                            let body: UpBody = Full::new(Bytes::from_static(b"{\"ok\":true}"))
                                .map_err(|e: Infallible| match e {})
                                .boxed();
                            return Ok::<_, Infallible>(Response::new(body));
                        }
                        let (tx, rx) = mpsc::channel(16);
                        let _ = streams_tx.send(tx);
                        let body: UpBody = ChannelBody(rx).boxed();
                        let mut response = Response::new(body);
                        let h = response.headers_mut();
                        h.insert("content-type", "text/event-stream".parse().unwrap());
                        h.insert("cache-control", "no-cache".parse().unwrap());
                        h.insert("x-accel-buffering", "no".parse().unwrap());
                        if path == "/events/gzip" {
                            h.insert("content-encoding", "gzip".parse().unwrap());
                        }
                        Ok(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        EventUpstream {
            url: format!("http://{addr}"),
            counts,
            streams,
        }
    }

    /// The sender of the next stream the upstream was asked for.
    async fn next_stream(&mut self) -> EventSender {
        tokio::time::timeout(Duration::from_secs(5), self.streams.recv())
            .await
            .expect("the upstream was asked for a stream")
            .expect("upstream running")
    }
}

/// A response body whose frames the test sends through a channel; ends when the sender is
/// dropped.
struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx)
    }
}

fn event(n: usize) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from(format!("data: event {n}\n\n"))))
}

/// A proxy with the default `/api/` route and `/events/` to `upstream`, logged in as alice;
/// `tweak` adjusts the settings (the events route is the last one).
async fn proxy_for(
    upstream: &EventUpstream,
    tweak: impl FnOnce(&mut countersign::proxy::server::ProxySettings) + Send + 'static,
) -> (Harness, Login) {
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("events", "/events/", &upstream.url)],
        tweak: Box::new(move |s, _| tweak(s)),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    (h, login)
}

fn events_route(
    s: &mut countersign::proxy::server::ProxySettings,
) -> &mut countersign::proxy::forward::RouteSpec {
    s.routes
        .iter_mut()
        .find(|r| r.name == "events")
        .expect("events route")
}

/// The next data frame of `body` within `within`; None at the body's end; panics on a body
/// error or when nothing came in time.
async fn next_data<B>(body: &mut B, within: Duration) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes> + Unpin + ?Sized,
    B::Error: std::fmt::Debug,
{
    loop {
        let frame = tokio::time::timeout(within, body.frame())
            .await
            .expect("a frame in time")?
            .expect("no body error");
        // An empty DATA frame may end an HTTP/2 stream: not an event.
        match frame.into_data() {
            Ok(data) if !data.is_empty() => return Some(data),
            _ => {}
        }
    }
}

/// Opens an h2c (prior knowledge) connection to the proxy.
async fn h2_client(addr: SocketAddr) -> H2Client {
    support_h2::h2c(addr).await
}

fn h2_get(addr: SocketAddr, path: &str, login: &Login) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .header("cookie", &login.cookie)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Sends events `1..=count` with `gap` between them and checks each reaches the client within
/// [`PROMPT`] of being sent.
async fn events_arrive_promptly<B>(tx: &EventSender, body: &mut B, count: usize, gap: Duration)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    for n in 1..=count {
        tokio::time::sleep(gap).await;
        let sent = Instant::now();
        tx.send(event(n)).await.unwrap();
        let data = next_data(body, Duration::from_secs(5))
            .await
            .expect("stream still open");
        let took = sent.elapsed();
        assert_eq!(data, format!("data: event {n}\n\n"), "event {n}");
        assert!(took < PROMPT, "event {n} took {took:?}");
    }
}

/// Asks the proxy for `/events/feed` over a new HTTP/1.1 connection; returns the answer (its
/// body still streaming) and the upstream's sender for that stream.
async fn open_http1_stream(
    h: &Harness,
    upstream: &mut EventUpstream,
    login: &Login,
) -> (Response<Incoming>, EventSender) {
    let response = send_streaming(
        h.addr,
        Method::GET,
        "/events/feed",
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    (response, upstream.next_stream().await)
}

/// As [`open_http1_stream`], as a new stream on the h2c connection `client`.
async fn open_http2_stream(
    client: &mut H2Client,
    h: &Harness,
    upstream: &mut EventUpstream,
    login: &Login,
) -> (Response<Incoming>, EventSender) {
    let response = client
        .send_request(h2_get(h.addr, "/events/feed", login))
        .await
        .unwrap();
    (response, upstream.next_stream().await)
}

/// `/events/api` is answered 200 on the h2c connection `client`: the connection still works.
async fn h2_api_call_succeeds(client: &mut H2Client, h: &Harness, login: &Login) {
    let response = client
        .send_request(h2_get(h.addr, "/events/api", login))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Sends event `n` and checks that it reaches `body` within 2 s.
async fn event_gets_through(tx: &EventSender, body: &mut Incoming, n: usize) {
    tx.send(event(n)).await.unwrap();
    assert!(
        next_data(body, Duration::from_secs(2)).await.is_some(),
        "event {n}"
    );
}

/// What `body` yields next, within `within`, is an error: the browser sees its stream break,
/// neither a hang nor a clean end it could take for a complete answer.
async fn assert_stream_breaks(body: &mut Incoming, within: Duration) {
    let end = tokio::time::timeout(within, body.frame())
        .await
        .expect("the stream broke in time");
    assert!(
        matches!(end, Some(Err(_))),
        "the browser must see a broken stream, got {end:?}"
    );
}

/// The upstream breaks its connection mid-body: the browser's stream breaks within 2 s.
async fn upstream_dies_and_the_stream_breaks(tx: &EventSender, body: &mut Incoming) {
    tx.send(Err(std::io::Error::other("upstream died")))
        .await
        .unwrap();
    assert_stream_breaks(body, Duration::from_secs(2)).await;
}

/// docs/FRONTEND.md (server-sent events): over HTTP/1.1 each event reaches the browser as the
/// upstream sends it (a chunk, not held for more data), with the event-stream headers as the
/// upstream sent them and no `Content-Length` made up; the upstream's end is the browser's end.
#[tokio::test]
async fn http1_events_arrive_promptly_with_their_headers() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let response = send_streaming(
        h.addr,
        Method::GET,
        "/events/feed",
        &[("cookie", &login.cookie), ("accept", "text/event-stream")],
        Bytes::new(),
    )
    .await;
    let tx = upstream.next_stream().await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert!(headers.get("content-encoding").is_none(), "{headers:?}");
    let mut body = response.into_body();
    events_arrive_promptly(&tx, &mut body, 3, Duration::from_millis(300)).await;
    drop(tx);
    assert_eq!(next_data(&mut body, Duration::from_secs(5)).await, None);

    // `Content-Encoding` passes as the upstream set it, and the bytes untouched: the proxy
    // neither compresses nor decodes.
    let response = send_streaming(
        h.addr,
        Method::GET,
        "/events/gzip",
        &[("cookie", &login.cookie), ("accept-encoding", "gzip")],
        Bytes::new(),
    )
    .await;
    let tx = upstream.next_stream().await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut body = response.into_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"\x1f\x8b\x08raw"))))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut body, Duration::from_secs(5)).await.unwrap(),
        Bytes::from_static(b"\x1f\x8b\x08raw")
    );
}

/// The same over HTTP/2 (h2c prior knowledge): each event is a DATA frame sent at once.
#[tokio::test]
async fn http2_events_arrive_promptly_with_their_headers() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let mut client = h2_client(h.addr).await;
    let (response, tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    assert!(response.headers().get("content-length").is_none());
    let mut body = response.into_body();
    events_arrive_promptly(&tx, &mut body, 3, Duration::from_millis(300)).await;
    drop(tx);
    assert_eq!(next_data(&mut body, Duration::from_secs(5)).await, None);
}

/// docs/CONFIG.md `timeout`, `send_timeout`, `http2_idle_timeout`, `body_idle_timeout`: a
/// healthy stream (an event more often than `body_idle_timeout`) lasts far longer than the
/// route's `timeout` (which bounds the wait for the answer's head only), than `send_timeout`
/// and than `http2_idle_timeout`, with gaps longer than each of them, over HTTP/1.1 and
/// HTTP/2.
#[tokio::test]
async fn a_healthy_stream_outlives_every_other_timeout() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| {
        s.send_timeout = Duration::from_millis(300);
        s.http2_idle_timeout = Duration::from_millis(300);
        s.header_read_timeout = Duration::from_millis(300);
        let events = events_route(s);
        events.timeout = Duration::from_millis(300);
        events.connect.body_idle_timeout = Duration::from_secs(2);
    })
    .await;
    let (response, h1_tx) = open_http1_stream(&h, &mut upstream, &login).await;
    let mut h1_body = response.into_body();
    let mut client = h2_client(h.addr).await;
    let (response, h2_tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
    let mut h2_body = response.into_body();
    // 6 events 700 ms apart: 4 s in all, each gap over twice every limit but the idle one.
    for n in 1..=6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        h1_tx.send(event(n)).await.unwrap();
        h2_tx.send(event(n)).await.unwrap();
        for body in [&mut h1_body, &mut h2_body] {
            let data = next_data(body, Duration::from_secs(2))
                .await
                .expect("stream open");
            assert_eq!(data, format!("data: event {n}\n\n"));
        }
    }
}

/// docs/CONFIG.md `body_idle_timeout`: an upstream that sends nothing for that long in the
/// middle of its answer (hung, or an event stream without keep-alive comments) has its answer
/// cut: the browser sees the stream break (HTTP/1.1: the connection closes without the final
/// chunk; HTTP/2: the stream is reset), not a clean end it could take for a complete answer,
/// and the upstream connection is closed, not pooled.
#[tokio::test]
async fn a_quiet_upstream_is_cut_after_body_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(800);
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| {
        events_route(s).connect.body_idle_timeout = IDLE;
    })
    .await;
    let (response, tx) = open_http1_stream(&h, &mut upstream, &login).await;
    let mut body = response.into_body();
    // Events just inside the limit keep it going.
    for n in 1..=3 {
        tokio::time::sleep(IDLE / 2).await;
        event_gets_through(&tx, &mut body, n).await;
    }
    let quiet_from = Instant::now();
    assert_stream_breaks(&mut body, Duration::from_secs(5)).await;
    let cut_after = quiet_from.elapsed();
    assert!(
        cut_after >= IDLE - Duration::from_millis(50) && cut_after < IDLE * 3,
        "{cut_after:?}"
    );
    // The upstream connection is closed (its stream's receiver is gone), not pooled.
    tokio::time::timeout(Duration::from_secs(2), tx.closed())
        .await
        .expect("the upstream saw its stream end");
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);

    // HTTP/2: the stream is reset.
    let mut client = h2_client(h.addr).await;
    let (response, _tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
    let mut body = response.into_body();
    assert_stream_breaks(&mut body, Duration::from_secs(5)).await;
    // The connection itself stays usable.
    h2_api_call_succeeds(&mut client, &h, &login).await;
}

/// docs/FRONTEND.md: a browser that closes its HTTP/2 stream (RST_STREAM, what
/// `EventSource.close()` does over HTTP/2) frees the upstream connection at once, even while
/// the upstream is quiet; the client connection keeps working.
#[tokio::test]
async fn an_http2_client_reset_releases_the_upstream_at_once() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let mut client = h2_client(h.addr).await;
    let (response, tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
    let mut body = response.into_body();
    event_gets_through(&tx, &mut body, 1).await;
    drop(body); // RST_STREAM(CANCEL)
                // At once, not at the route's body_idle_timeout (60 s) or never; 10 s leaves room for a
                // loaded machine.
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("the upstream saw the stream end");
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);
    h2_api_call_succeeds(&mut client, &h, &login).await;
}

/// Opens an event stream over a raw HTTP/1.1 connection and reads up to its first event; returns
/// the connection and the upstream's sender.
async fn open_raw_http1_stream(
    h: &Harness,
    upstream: &mut EventUpstream,
    login: &Login,
) -> (TcpStream, EventSender) {
    let request = format!(
        "GET /events/feed HTTP/1.1\r\nhost: app.test\r\ncookie: {}\r\n\r\n",
        login.cookie
    );
    // The login's connection may hold the only slot for a moment after it closed.
    let (mut stream, tx) = loop {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        if let Ok(Some(tx)) =
            tokio::time::timeout(Duration::from_millis(500), upstream.streams.recv()).await
        {
            break (stream, tx);
        }
    };
    tx.send(event(1)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("event 1") {
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    (stream, tx)
}

/// The only connection slot of `h` is free again: a request on a new connection is answered.
async fn the_slot_is_free(h: &Harness, login: &Login) {
    let answer = answered_once_a_slot_is_free(
        h.addr,
        format!(
            "GET /events/api HTTP/1.1\r\nhost: app.test\r\ncookie: {}\r\nconnection: close\r\n\r\n",
            login.cookie
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// docs/FRONTEND.md (closing a stream): a browser that closes its HTTP/1.1 connection (what
/// `EventSource.close()`, or leaving the page, does over HTTP/1.1) is noticed at the proxy's
/// next writes to it: the upstream's next events (a keep-alive comment will do) end the
/// upstream connection and free the connection slot.
#[tokio::test]
async fn an_http1_client_close_is_noticed_at_the_next_events() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| s.max_connections = 1).await;
    let (stream, tx) = open_raw_http1_stream(&h, &mut upstream, &login).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed_at = Instant::now();
    // The first write after the close is taken by the kernel (the client answers it with a
    // reset); the one after fails.
    for n in 2..=4 {
        if tx
            .send(Ok(Frame::data(Bytes::from(format!(
                ": keep-alive {n}\n\n"
            )))))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(Duration::from_secs(2), tx.closed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the upstream stream is still open {:?} after the client left",
                closed_at.elapsed()
            )
        });
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);
    the_slot_is_free(&h, &login).await;
}

/// docs/FRONTEND.md (closing a stream), docs/CONFIG.md `body_idle_timeout`: when the upstream
/// of a closed HTTP/1.1 client sends nothing more, the stream, its upstream connection and the
/// connection slot are freed after `body_idle_timeout`.
#[tokio::test]
async fn a_quiet_stream_of_a_closed_http1_client_ends_at_body_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(1);
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| {
        s.max_connections = 1;
        events_route(s).connect.body_idle_timeout = IDLE;
    })
    .await;
    let (stream, tx) = open_raw_http1_stream(&h, &mut upstream, &login).await;
    let closed_at = Instant::now();
    drop(stream);
    tokio::time::timeout(IDLE * 4, tx.closed())
        .await
        .expect("the upstream stream ended");
    assert!(closed_at.elapsed() < IDLE * 4);
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);
    the_slot_is_free(&h, &login).await;
}

/// docs/CONFIG.md `http1_half_close = false`: the proxy reads an HTTP/1.1 connection while
/// answering on it, so a client that leaves a quiet event stream is noticed at once (its EOF),
/// and the stream, its upstream connection and the connection slot are freed without waiting
/// for an event or for `body_idle_timeout` (60 s here).
#[tokio::test]
async fn without_half_close_a_closed_http1_client_frees_a_quiet_stream_at_once() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| {
        s.max_connections = 1;
        s.http1_half_close = false;
    })
    .await;
    let (stream, tx) = open_raw_http1_stream(&h, &mut upstream, &login).await;
    drop(stream);
    // At once, not at body_idle_timeout (60 s); 10 s leaves room for a loaded machine.
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("the upstream stream ended at the client's EOF");
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);
    the_slot_is_free(&h, &login).await;
}

/// An upstream that breaks its connection mid-stream: the browser sees the stream break at
/// once (not a hang, not a clean end), over HTTP/1.1 and HTTP/2, and the next request goes to a
/// fresh upstream connection (the broken one was not pooled) and succeeds.
#[tokio::test]
async fn an_upstream_dying_mid_stream_breaks_the_browsers_stream() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let (response, tx) = open_http1_stream(&h, &mut upstream, &login).await;
    let mut body = response.into_body();
    event_gets_through(&tx, &mut body, 1).await;
    upstream_dies_and_the_stream_breaks(&tx, &mut body).await;

    let mut client = h2_client(h.addr).await;
    let (response, tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
    let mut body = response.into_body();
    event_gets_through(&tx, &mut body, 1).await;
    upstream_dies_and_the_stream_breaks(&tx, &mut body).await;

    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() == 0).await);
    let accepted = upstream.counts.accepted();
    let r = get(h.addr, "/events/api", &login).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(upstream.counts.accepted(), accepted + 1);
}

/// A stream the upstream ends cleanly gives its connection back to the pool: the next request
/// reuses it.
#[tokio::test]
async fn a_stream_that_ends_returns_its_connection_to_the_pool() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let (response, tx) = open_http1_stream(&h, &mut upstream, &login).await;
    let mut body = response.into_body();
    event_gets_through(&tx, &mut body, 1).await;
    drop(tx);
    assert_eq!(next_data(&mut body, Duration::from_secs(2)).await, None);
    let r = get(h.addr, "/events/api", &login).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(upstream.counts.accepted(), 1);
}

/// docs/FRONTEND.md (session end): a stream is authorized when it starts; a logout (or the
/// session's expiry) does not cut a stream already open, but the browser's next request,
/// including its `EventSource` reconnect, is refused 401.
#[tokio::test]
async fn a_logout_leaves_an_open_stream_running_and_refuses_the_reconnect() {
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |_| {}).await;
    let (response, tx) = open_http1_stream(&h, &mut upstream, &login).await;
    let mut body = response.into_body();
    let r = logout(h.addr, &login).await;
    assert!(r.status.is_success(), "{}", r.status);
    tx.send(event(1)).await.unwrap();
    assert_eq!(
        next_data(&mut body, Duration::from_secs(2)).await.unwrap(),
        "data: event 1\n\n"
    );
    let r = get(h.addr, "/events/feed", &login).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// docs/FRONTEND.md (many streams): each open stream holds one upstream connection (there is
/// no cap on connections per upstream, `pool_max_idle_per_host` only limits idle ones kept),
/// so API calls beside many open streams still get a connection at once; when the streams end,
/// at most `pool_max_idle_per_host` of their connections stay pooled.
#[tokio::test]
async fn many_open_streams_do_not_starve_api_calls() {
    const STREAMS: usize = 8;
    let mut upstream = EventUpstream::start().await;
    let (h, login) = proxy_for(&upstream, |s| {
        events_route(s).connect.pool_max_idle_per_host = 2;
    })
    .await;
    let mut client = h2_client(h.addr).await;
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let (response, tx) = open_http2_stream(&mut client, &h, &mut upstream, &login).await;
        open.push((tx, response.into_body()));
    }
    assert_eq!(upstream.counts.open(), STREAMS);
    for _ in 0..5 {
        let started = Instant::now();
        h2_api_call_succeeds(&mut client, &h, &login).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    for (n, (tx, body)) in open.iter_mut().enumerate() {
        event_gets_through(tx, body, n).await;
    }
    for (tx, mut body) in open {
        drop(tx);
        assert_eq!(next_data(&mut body, Duration::from_secs(2)).await, None);
    }
    assert!(eventually(Duration::from_secs(2), || upstream.counts.open() <= 2).await);
}

const CONFIG: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
     [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
     [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n";

fn parse(
    text: &str,
) -> Result<countersign::proxy::config::ProxyConfig, countersign::proxy::config::ConfigError> {
    countersign::proxy::config::ProxyConfig::parse(
        text,
        std::path::Path::new("/etc/countersign/proxy.toml"),
    )
}

/// docs/CONFIG.md `body_idle_timeout`: 60s by default, set per upstream, reaches the route;
/// a zero or malformed value is refused naming the file and the key.
#[test]
fn body_idle_timeout_defaults_to_60s_and_reaches_the_route() {
    use countersign::proxy::server::ProxySettings;
    let config = parse(CONFIG).unwrap();
    assert_eq!(
        config.upstreams[0].body_idle_timeout,
        Duration::from_secs(60)
    );
    let config = parse(&format!("{CONFIG}body_idle_timeout = \"25s\"\n")).unwrap();
    assert_eq!(
        config.upstreams[0].body_idle_timeout,
        Duration::from_secs(25)
    );
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(
        settings.routes[0].connect.body_idle_timeout,
        Duration::from_secs(25)
    );
    for value in ["\"0s\"", "\"soon\"", "60"] {
        let error = parse(&format!("{CONFIG}body_idle_timeout = {value}\n"))
            .expect_err(value)
            .to_string();
        assert!(
            error.contains("/etc/countersign/proxy.toml") && error.contains("body_idle_timeout"),
            "{value}: {error}"
        );
    }
}

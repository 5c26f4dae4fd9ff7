//! Raw WebSocket frames for the proxy's WebSocket tests (`proxy_websocket*.rs`): building a
//! frame as a browser (masked) or a server (unmasked) sends it, reading one back, and the
//! bounded waits around them. Each test file uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The masking key the tests' browsers use.
pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// `future`, which must finish within 10 s.
pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("within 10 s")
}

/// A frame's bytes: masked with `key` (a browser's) or not (a server's), with the shortest
/// length encoding.
pub fn frame(first: u8, key: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let m = if key.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match key {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// One frame as read raw.
#[derive(Debug, PartialEq)]
pub struct RawFrame {
    pub first: u8,
    pub masked: bool,
    /// Unmasked.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The Close's (code, reason); fails on any other frame.
    pub fn close(&self) -> (u16, String) {
        assert_eq!(self.first, 0x88, "a Close frame: {self:?}");
        assert!(self.payload.len() >= 2, "a Close with a code: {self:?}");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        )
    }
}

/// The next frame `s` carries (within 10 s), unmasked.
pub async fn read_frame<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> RawFrame {
    within(async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.expect("a frame header");
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(s.read_u16().await.unwrap()),
            127 => s.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut key = [0u8; 4];
        if masked {
            s.read_exact(&mut key).await.unwrap();
        }
        let mut payload = vec![0u8; usize::try_from(len).unwrap()];
        s.read_exact(&mut payload).await.expect("a frame's payload");
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        RawFrame {
            first: head[0],
            masked,
            payload,
        }
    })
    .await
}

/// What `s` carries until it ends (which must happen within 5 s).
pub async fn rest_of<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection ends");
    got
}

/// A browser's WebSocket handshake (offering permessage-deflate, as browsers do) on a new
/// connection to `addr` (`TCP_NODELAY`, so that each later write is its own segment) with
/// the session `cookie` and `origin`: the connection, with nothing read past the answer's
/// head, and that head (read byte by byte for that reason).
pub async fn browser_handshake(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: &str,
    origin: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate\r\nCookie: {cookie}\r\nOrigin: {origin}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within(stream.read_u8()).await.expect("answer head"));
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// The next Close a tungstenite peer gets, as (code, reason), within `limit` (other messages
/// before it are skipped).
pub async fn next_close<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    limit: Duration,
) -> (u16, String)
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let got = tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => panic!("a Close without a code"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("no Close frame: {e}"),
                None => panic!("no Close frame: the connection ended"),
            }
        }
    })
    .await;
    got.expect("a Close frame in time")
}

/// An upstream's `101 Switching Protocols` to a WebSocket handshake, with `accept` as its
/// `Sec-WebSocket-Accept` (more fields may be added to it).
pub fn switching_protocols(accept: &str) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut switching = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
    *switching.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = switching.headers_mut();
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    h.insert("connection", http::HeaderValue::from_static("Upgrade"));
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    switching
}

/// The test harness (the in-process proxy) with `/ws/` routed to `upstream` with these
/// WebSocket `limits`, beside its default routes. Include after `mod support;`.
pub async fn harness_with_ws_route(
    upstream: std::net::SocketAddr,
    limits: countersign::proxy::forward::WebSocketRoute,
) -> crate::support::Harness {
    let mut ws = crate::support::route("ws", "/ws/", &format!("http://{upstream}"));
    ws.websocket = Some(limits);
    crate::support::Harness::start_with(crate::support::HarnessOptions {
        extra_routes: vec![ws],
        ..Default::default()
    })
    .await
}

/// The API's raw end of an upgraded WebSocket connection.
pub type RawUpstream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// An upstream behind the real `VerifyLayer` (the tests' keyring, clock at `T0`) that takes
/// every WebSocket upgrade and hands the raw connection to the test; its `101` carries the
/// `Sec-WebSocket-Extensions` lines `extensions` gives for the request's path.
pub async fn raw_ws_upstream(
    extensions: fn(&str) -> Vec<&'static str>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<RawUpstream>,
) {
    use std::sync::Arc;
    use tower::Layer as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (raw_tx, raw) = tokio::sync::mpsc::unbounded_channel();
    let layer = countersign::layer::VerifyLayer::new(
        countersign::core::Verifier::new(
            crate::support::test_keyring(),
            countersign::core::Policy::default(),
        ),
        Arc::new(countersign::replay::MemoryReplayCache::new(10_000)),
    )
    .clock(Arc::new(countersign::clock::ManualClock::new(
        crate::support::T0,
    )));
    let app = tower::service_fn(
        move |mut req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let raw_tx = raw_tx.clone();
            async move {
                let key = req
                    .headers()
                    .get("sec-websocket-key")
                    .map(|k| {
                        tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes())
                    })
                    .unwrap_or_default();
                let lines = extensions(req.uri().path());
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        let _ = raw_tx.send(hyper_util::rt::TokioIo::new(upgraded));
                    }
                });
                let mut switching = switching_protocols(&key);
                let h = switching.headers_mut();
                for line in lines {
                    h.append("sec-websocket-extensions", line.parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(switching)
            }
        },
    );
    crate::support::serve_with_upgrades(listener, layer.layer(app));
    (addr, raw)
}

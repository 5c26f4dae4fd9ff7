//! Adversarial checks of the server settings a reload applies live (`server.request_timeout`,
//! `shutdown_grace`, the connection timeouts and head limits, `http1_half_close`,
//! `server.max_connections` / `admin.max_connections`, each upstream's `connect_timeout`):
//! docs/OPERATIONS.md, "Signals" and the live keys after it.
//!
//! Against the real binary (`countersign run --workers 2`: two event loops sharing each
//! listener's count), raw TCP and TLS clients, and a raw upstream on loopback:
//! - every way a connection can end (no byte, a reset, a head or an HTTP/2 preface cut short
//!   and timed out, a bad head, a head over the limit, an HTTP/2 connection with many streams,
//!   a WebSocket upgrade, a refusal over the limit, a failed or unfinished TLS handshake) gives
//!   its `max_connections` slot back exactly once: afterwards exactly the limit is admitted
//!   again, one more is refused;
//! - the admin listener's count is its own;
//! - a reload that changes several live keys at once applies each group and says so (one line
//!   per kind), and one with an invalid value applies none of them;
//! - connections accepted while reloads change the limit leave the count right;
//! - `http1_half_close` and a raised `shutdown_grace` through a reload, and a lowered one
//!   bounding the WebSockets at shutdown; a lowered `max_header_bytes` over HTTP/2 (431);
//!   `max_connections` through the file-change check (`server.reload_check_interval`); the
//!   largest and smallest values the config takes, through a reload.
//!
//! None of these found a defect of the server (they pin behaviour no other test covered);
//! writing them showed that hyper's HTTP/2 client can keep its socket open after its driver
//! is done, which the tests close themselves ([`close_h2`]).
//!
//! Run: `cargo test --all-features --test proxy_reload_server_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_reload;
mod support_run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use support::*;
use support_reload::*;
use support_run::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An upstream on loopback speaking raw HTTP/1.1: a WebSocket handshake is answered 101 (the
/// upgraded connection then held open, read until EOF); any other request, after its body
/// (`content-length`), `200 ok` after `delay`, keep-alive.
async fn raw_upstream(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(end) = find(&buf, b"\r\n\r\n") {
                            break end + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let field = |name: &str| {
                        head.lines().find_map(|line| {
                            let (n, v) = line.split_once(':')?;
                            n.trim()
                                .eq_ignore_ascii_case(name)
                                .then(|| v.trim().to_owned())
                        })
                    };
                    if let Some(key) = field("sec-websocket-key") {
                        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                            key.as_bytes(),
                        );
                        let answer = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let length = field("content-length")
                        .and_then(|n| n.parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                    tokio::time::sleep(delay).await;
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

const SESSION: &[u8] = b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\n\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// A new connection to `addr` once one is admitted (not closed at once as over the limit:
/// the proxy waits for its first bytes), retried for up to 10 s as [`hold`] is. A refused
/// connection is closed as soon as it is accepted; 1 s of silence tells the two apart even
/// when a loaded machine delays that close.
async fn admitted(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut probe = [0u8; 1];
        if tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut probe))
            .await
            .is_err()
        {
            return stream;
        }
        assert!(
            Instant::now() < deadline,
            "no slot for a connection to {addr} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a new connection to `addr` is refused (closed without an answer to `request`).
async fn refused(addr: SocketAddr, request: &[u8]) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    exchange(&mut stream, request).await.is_empty()
}

/// Exactly `limit` connections to `addr` are admitted (held at once), and while they are
/// open, new ones are refused (probed several times: either event loop); the held ones are
/// still served.
async fn exactly_admitted(addr: SocketAddr, request: &[u8], expect: &str, limit: usize) {
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(hold(addr, request, expect).await);
    }
    for _ in 0..6 {
        assert!(
            refused(addr, request).await,
            "admitted over {limit} open connections: a slot was given back twice"
        );
    }
    for stream in &mut held {
        let status = exchange(stream, request).await;
        assert!(status.starts_with(expect), "{status:?}");
    }
}

/// Waits until the proxy closes `stream` (panics after `limit`).
async fn closed_by_proxy<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "not closed within {limit:?}");
}

/// `n` requests at once on one HTTP/2 connection over `io` (`scheme` for the URI), each
/// answered `expect`; then the connection is dropped.
async fn h2_streams<I>(io: I, closer: Closer, scheme: &str, n: usize, expect: StatusCode)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, driver) = support_h2::client(io).await;
    // One first: the proxy's SETTINGS (its stream limit) are known to the client after it,
    // so the others wait for a free stream instead of being refused (REFUSED_STREAM) when
    // the limit is 1.
    let mut first = sender.clone();
    let request = Request::get(format!("{scheme}://app.test/auth/session"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    first.ready().await.unwrap();
    let status = first
        .send_request(request)
        .await
        .expect("answered")
        .status();
    assert_eq!(status, expect);
    drop(first);
    let mut requests = Vec::new();
    for _ in 1..n {
        let mut sender = sender.clone();
        let request = Request::get(format!("{scheme}://app.test/auth/session"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        requests.push(tokio::spawn(async move {
            sender.ready().await.unwrap();
            sender.send_request(request).await.map(|r| r.status())
        }));
    }
    for request in requests {
        assert_eq!(request.await.unwrap().expect("answered"), expect);
    }
    close_h2(sender, driver, closer).await;
}

/// A second handle on a client socket, to close it whatever holds the first.
struct Closer(std::net::TcpStream);

/// `stream` and a [`Closer`] of it.
fn closable(stream: TcpStream) -> (TcpStream, Closer) {
    let std = stream.into_std().unwrap();
    let closer = Closer(std.try_clone().unwrap());
    (TcpStream::from_std(std).unwrap(), closer)
}

/// Closes a client HTTP/2 connection: its last sender dropped, its driver awaited, and its
/// socket shut down through `closer`. The last step is needed: hyper's client runs the
/// connection in a task of its own, which can keep the socket open after the driver is done
/// (seen while writing these tests: the proxy then rightly counted the connection as open).
async fn close_h2<B>(
    sender: hyper::client::conn::http2::SendRequest<B>,
    driver: tokio::task::JoinHandle<hyper::Result<()>>,
    closer: Closer,
) {
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let _ = closer.0.shutdown(std::net::Shutdown::Both);
}

/// A WebSocket handshake on a new connection, without a session (the route has
/// `auth = "none"`): the connection, switched (101), with nothing read past the head. Retried
/// for up to 10 s while refused (as [`hold`]).
async fn websocket(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /api/ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n\r\n"
        );
        let mut head = Vec::new();
        if stream.write_all(request.as_bytes()).await.is_ok() {
            while !head.ends_with(b"\r\n\r\n") {
                let byte = tokio::time::timeout(Duration::from_secs(10), stream.read_u8())
                    .await
                    .expect("the handshake's answer within 10 s");
                match byte {
                    Ok(byte) => head.push(byte),
                    Err(_) => break,
                }
            }
        }
        if !head.is_empty() {
            let head = String::from_utf8_lossy(&head);
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            return stream;
        }
        assert!(
            Instant::now() < deadline,
            "no slot for a WebSocket handshake within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One key's `max_connections` line, as the tests of the other files check it.
const LIMIT_LINE: &str = "(applies to connections accepted from now on; no open connection \
                          is closed: below a lower limit, new connections are refused until \
                          fewer than the limit are open)";

/// Every way a cleartext connection can end gives its `server.max_connections` slot back
/// exactly once, with reloads lowering and raising the limit between them: closed before a
/// byte, reset, a head or an HTTP/2 preface cut short and closed by `header_read_timeout`, a
/// bad head (400), a head over `max_header_bytes` (431), an HTTP/2 connection with 16
/// streams, refusals over the limit, and WebSocket upgrades (an open WebSocket holds no slot:
/// docs/CONFIG.md `websocket_max_open`). Afterwards exactly 3 are admitted, a 4th refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_connection_ends_gives_its_slot_back_exactly_once() {
    let upstream = raw_upstream(Duration::ZERO).await;
    // `header_read_timeout` short only while the cut heads wait for it: it also closes a
    // kept-alive connection idle that long, which would free the slot of a held one.
    let server_with = |n: usize, header_read_timeout: &str| {
        format!(
            "shutdown_grace = \"2s\"\nheader_read_timeout = \"{header_read_timeout}\"\n\
             max_header_bytes = \"8KiB\"\nmax_connections = {n}"
        )
    };
    let server = |n: usize| server_with(n, "60s");
    let running = start_reloadable(
        "qa-slots-plain",
        &server(3),
        "",
        &format!("http://{upstream}"),
        "auth = \"none\"\nwebsocket = true",
    );
    let addr = running.addr;
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;

    // Closed before a byte; reset (SO_LINGER 0).
    for i in 0..8 {
        let stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            stream.set_zero_linger().unwrap();
        }
        drop(stream);
    }
    // Half a head, half a preface: closed by header_read_timeout (500 ms for the connections
    // accepted after this reload).
    running.reload_text(&running.text(&server_with(3, "500ms"), ""));
    let mut cut = Vec::new();
    for first in [
        &b"GET /auth/session HTTP/1.1\r\nHo"[..],
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(first).await.unwrap();
        cut.push(stream);
    }
    for stream in &mut cut {
        closed_by_proxy(stream, Duration::from_secs(5)).await;
    }
    running.reload_text(&running.text(&server(3), ""));
    // A bad head, a head over 8 KiB.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let status = exchange(&mut stream, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(status.is_empty() || status.contains("400"), "{status:?}");
    let mut big = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    big.push_str(&format!("X-Pad: {}\r\n\r\n", "x".repeat(10 * 1024)));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let status = exchange(&mut stream, big.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
    drop(stream);
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;

    // HTTP/2 (prior knowledge) with 16 streams, twice, and the limit lowered to 1 with one
    // such connection and two HTTP/1 ones open: all stay served, new ones are refused.
    let (stream, closer) = closable(admitted(addr).await);
    h2_streams(stream, closer, "http", 16, StatusCode::UNAUTHORIZED).await;
    let mut open = vec![
        hold(addr, SESSION, "HTTP/1.1 401").await,
        hold(addr, SESSION, "HTTP/1.1 401").await,
    ];
    let (h2, h2_closer) = closable(admitted(addr).await);
    let (mut h2_sender, h2_driver) = support_h2::client(h2).await;
    running.reload_text(&running.text(&server(1), ""));
    for _ in 0..4 {
        assert!(refused(addr, SESSION).await, "admitted over 1");
    }
    for stream in &mut open {
        assert!(exchange(stream, SESSION).await.starts_with("HTTP/1.1 401"));
    }
    let request = Request::get("http://app.test/auth/session")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h2_sender.ready().await.unwrap();
    let answer = h2_sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    // Raised back to 3 with 3 open: still none admitted.
    running.reload_text(&running.text(&server(3), ""));
    for _ in 0..4 {
        assert!(refused(addr, SESSION).await, "admitted over 3");
    }
    drop(open);
    close_h2(h2_sender, h2_driver, h2_closer).await;
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;

    // WebSockets: an open one holds no slot; closing it gives back nothing more.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(websocket(addr).await);
    }
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;
    drop(sockets);
    tokio::time::sleep(Duration::from_millis(300)).await;
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;

    let log = running.proxy.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// A TLS connection to `addr` through a handshake with `client`, retried every 50 ms while
/// the listener is full (a slot given back a moment late), for at most 10 s.
async fn tls_admitted(
    addr: SocketAddr,
    client: &tokio_rustls::TlsConnector,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Closer) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (tcp, closer) = closable(TcpStream::connect(addr).await.unwrap());
        if let Ok(tls) = client.connect(name.clone(), tcp).await {
            return (tls, closer);
        }
        assert!(Instant::now() < deadline, "no slot within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`exactly_admitted`] on the TLS listener at `addr`: `limit` connections each through a
/// handshake (with `client`) and an answer, held at once; then a handshake fails (refused).
async fn tls_exactly_admitted(addr: SocketAddr, client: &tokio_rustls::TlsConnector, limit: usize) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let session = b"GET /auth/session HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < limit {
        let tcp = TcpStream::connect(addr).await.unwrap();
        if let Ok(mut tls) = client.connect(name.clone(), tcp).await {
            if exchange(&mut tls, session)
                .await
                .starts_with("HTTP/1.1 401")
            {
                held.push(tls);
                continue;
            }
        }
        assert!(Instant::now() < deadline, "no slot within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let handshake = client.connect(name.clone(), tcp).await;
        assert!(handshake.is_err(), "admitted over {limit} open connections");
    }
}

/// The same on a TLS listener, where a connection takes its slot before its handshake:
/// garbage instead of a ClientHello, a client that connects and sends nothing (closed by
/// `header_read_timeout`), a client that refuses the certificate (its alert ends the
/// handshake), a handshake finished and then nothing sent, HTTP/1.1 and HTTP/2 (ALPN, 16
/// streams) served. Afterwards exactly 2 are admitted, a 3rd refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_tls_connection_ends_gives_its_slot_back_exactly_once() {
    let dir = temp_dir("qa-slots-tls");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    write(&dir.join("cert.pem"), &certified.cert.pem());
    write(&dir.join("key.pem"), &certified.key_pair.serialize_pem());
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let server = "shutdown_grace = \"2s\"\nheader_read_timeout = \"500ms\"\nmax_connections = 2\n\
                  tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"";
    let (mut proxy, addr, _admin) = start_on_free_ports(|addr, admin| {
        let file = dir.join("proxy.toml");
        let text = config(addr, admin, "http://127.0.0.1:9", server, "", "")
            .replace("http://app.test", "https://localhost");
        write(&file, &text);
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let http1 = support::tls_connector(roots.clone(), &[b"http/1.1"]);

    tls_exactly_admitted(addr, &http1, 2).await;
    // The proxy ends the held connections a moment after they close: each path below is
    // then admitted, not refused.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Garbage instead of a ClientHello.
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        closed_by_proxy(&mut stream, Duration::from_secs(5)).await;
    }
    // Connected, nothing sent: closed by header_read_timeout.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for stream in &mut silent {
        closed_by_proxy(stream, Duration::from_secs(5)).await;
    }
    // A client that does not trust the certificate.
    let distrustful = support::tls_connector(rustls::RootCertStore::empty(), &[b"http/1.1"]);
    for _ in 0..4 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(distrustful.connect(name.clone(), tcp).await.is_err());
    }
    // A handshake finished, then no request: closed by header_read_timeout. The proxy
    // frees a distrustful client's slot when it reads the alert, a moment after the client
    // has given up: until then this handshake may be refused, so it is retried.
    for _ in 0..2 {
        let (mut tls, _closer) = tls_admitted(addr, &http1).await;
        closed_by_proxy(&mut tls, Duration::from_secs(5)).await;
    }
    tls_exactly_admitted(addr, &http1, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // HTTP/2 by ALPN, 16 streams, twice.
    let h2 = support::tls_connector(roots.clone(), &[b"h2"]);
    for _ in 0..2 {
        let (tls, closer) = tls_admitted(addr, &h2).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        h2_streams(tls, closer, "https", 16, StatusCode::UNAUTHORIZED).await;
    }
    tls_exactly_admitted(addr, &http1, 2).await;
    let log = proxy.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The admin listener's count is its own: the main listener full leaves the admin one
/// admitting its own limit, and the other way round; a reload of one limit leaves the other
/// listener's as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_counts_its_own_connections() {
    let server = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = 2";
    let running = start_reloadable(
        "qa-admin-count",
        server,
        "max_connections = 2",
        "http://127.0.0.1:9",
        "",
    );
    let main = vec![
        hold(running.addr, SESSION, "HTTP/1.1 401").await,
        hold(running.addr, SESSION, "HTTP/1.1 401").await,
    ];
    // Main full: the admin listener still admits its 2, then refuses.
    exactly_admitted(running.admin, HEALTHZ, "HTTP/1.1 200", 2).await;
    drop(main);
    let admin = vec![
        hold(running.admin, HEALTHZ, "HTTP/1.1 200").await,
        hold(running.admin, HEALTHZ, "HTTP/1.1 200").await,
    ];
    // Admin full: the main listener admits its 2, then refuses.
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 2).await;
    // The admin limit raised to 3: one more admin connection, the main limit still 2.
    running.reload_text(&running.text(server, "max_connections = 3"));
    let lines = running.file_lines();
    assert!(
        lines.applied.len() == 1
            && lines.applied[0].contains(&format!(
                "applied 1 key: admin.max_connections {LIMIT_LINE}"
            )),
        "{lines:?}"
    );
    let _third = hold(running.admin, HEALTHZ, "HTTP/1.1 200").await;
    assert!(refused(running.admin, HEALTHZ).await, "admitted over 3");
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 2).await;
    drop(admin);
}

/// A reload changing several live keys of different kinds at once (plus one that waits)
/// applies every live one, each kind on its line (per request, per connection, per upstream
/// connection, connection limits), names the waiting one in a warning that says the live ones
/// are not among them, and sets `countersign_config_file_changed` to 1; each new value is in
/// force: `max_connections`, `admin.max_connections` and `max_header_count` checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_several_kinds_of_live_keys_applies_each_and_says_so() {
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_reloadable(
        "qa-several-kinds",
        &format!("{base}\nmax_connections = 8"),
        "max_connections = 8",
        "http://127.0.0.1:9",
        "",
    );
    let mut text = running.text(
        &format!(
            "{base}\nmax_connections = 2\nrequest_timeout = \"30s\"\nmax_header_count = 20\n\
             log_queue_lines = 1000"
        ),
        "max_connections = 3",
    );
    text = text.replace(
        "url = \"http://127.0.0.1:9\"",
        "url = \"http://127.0.0.1:9\"\nconnect_timeout = \"2s\"",
    );
    running.reload_text(&text);
    let lines = running.file_lines();
    assert!(lines.invalid.is_empty(), "{lines:?}");
    let applied = lines.applied.join("\n");
    for line in [
        "applied 1 key: server.request_timeout (from now on)",
        "applied 1 key: server.max_header_count (applies to connections accepted from now on; \
         connections already open keep the values they started with)",
        "applied 1 key: upstream[0].connect_timeout (applies to upstream connections made from \
         now on; pooled connections are unaffected)",
    ] {
        assert!(applied.contains(line), "no {line:?} in {applied}");
    }
    assert!(
        lines
            .applied
            .iter()
            .any(|l| l.contains("admin.max_connections")
                && l.contains("server.max_connections")
                && l.contains(LIMIT_LINE)),
        "{applied}"
    );
    assert_eq!(lines.applied.len(), 4, "{applied}");
    assert!(
        lines.waiting.len() == 1
            && lines.waiting[0].contains("(1 key: server.log_queue_lines)")
            && lines.waiting[0].contains("(the keys applied live are not among them)"),
        "{lines:?}"
    );
    assert_eq!(
        gauge(running.admin, "countersign_config_file_changed").await,
        1
    );
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 2).await;
    exactly_admitted(running.admin, HEALTHZ, "HTTP/1.1 200", 3).await;
    let mut many = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-Pad-{i}: x\r\n"));
    }
    many.push_str("\r\n");
    // The connections exactly_admitted held give their slots back a moment after closing.
    hold(running.addr, many.as_bytes(), "HTTP/1.1 431").await;
}

/// A reload whose file changes live keys of every kind but holds one invalid value applies
/// none of them (the limits, the head limits, the admin limit), sets
/// `countersign_config_file_invalid` to 1 and leaves `countersign_config_file_changed` at 0 (a
/// restart would fail, not apply the edit), and the same edit made valid then applies them all
/// and clears the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_applies_no_live_key_of_any_kind() {
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_reloadable(
        "qa-invalid-mix",
        &format!("{base}\nmax_connections = 1"),
        // 2: the gauges' scrapes take one (their connection may not be ended yet).
        "max_connections = 2",
        "http://127.0.0.1:9",
        "",
    );
    let edit = |streams: u32| {
        running.text(
            &format!(
                "{base}\nmax_connections = 3\nmax_header_count = 20\nrequest_timeout = \"5s\"\n\
                 http2_max_concurrent_streams = {streams}"
            ),
            "max_connections = 3",
        )
    };
    running.reload_text(&edit(0));
    let lines = running.file_lines();
    assert!(
        lines.applied.is_empty() && lines.waiting.is_empty() && lines.invalid.len() == 1,
        "{lines:?}"
    );
    assert!(
        lines.invalid[0].contains("server.http2_max_concurrent_streams"),
        "{lines:?}"
    );
    assert_eq!(
        gauge(running.admin, "countersign_config_file_invalid").await,
        1
    );
    assert_eq!(
        gauge(running.admin, "countersign_config_file_changed").await,
        0
    );
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 1).await;
    // 25 fields: within the running 100.
    let mut many = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-Pad-{i}: x\r\n"));
    }
    many.push_str("\r\n");
    let status = exchange(
        &mut hold(running.addr, SESSION, "HTTP/1.1 401").await,
        many.as_bytes(),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");

    running.reload_text(&edit(5));
    let lines = running.file_lines();
    assert!(lines.waiting.is_empty(), "{lines:?}");
    assert_eq!(lines.applied.len(), 3, "{lines:?}");
    assert_eq!(
        gauge(running.admin, "countersign_config_file_invalid").await,
        0
    );
    assert_eq!(
        gauge(running.admin, "countersign_config_file_changed").await,
        0
    );
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 3).await;
}

/// Connections accepted (and closed) without pause while 12 reloads switch
/// `max_connections` between 2 and 64: once they are all closed, exactly the limit of the
/// last reload is admitted again (no slot lost or counted twice in a race with the reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_accepted_during_reloads_leave_the_count_right() {
    let server = |n: usize| {
        format!("shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = {n}")
    };
    let running = start_reloadable(
        "qa-during-reload",
        &server(64),
        "",
        "http://127.0.0.1:9",
        "",
    );
    let addr = running.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut served = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    continue;
                };
                if exchange(&mut stream, SESSION)
                    .await
                    .starts_with("HTTP/1.1 401")
                {
                    served += 1;
                }
                // Not a flood: the ports each connection leaves in TIME_WAIT add up.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            served
        }));
    }
    for round in 0..12 {
        let n = if round % 2 == 0 { 2 } else { 64 };
        // Blocking waits for the log: off the runtime's threads.
        let text = running.text(&server(n), "");
        tokio::task::block_in_place(|| running.reload_text(&text));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for client in clients {
        served += client.await.unwrap();
    }
    assert!(served > 0, "no request served during the reloads");
    // The last reload set 64; back to 3 for a count that can be checked.
    let text = running.text(&server(3), "");
    tokio::task::block_in_place(|| running.reload_text(&text));
    exactly_admitted(addr, SESSION, "HTTP/1.1 401", 3).await;
}

/// A half-closing client (`nc -N`: its request, then EOF) asking a slow upstream (1 s).
/// Returns the status line it gets ("" when closed without an answer).
async fn half_closed_request(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /api/slow HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes)).await;
    String::from_utf8_lossy(&bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// `server.http1_half_close` turned off by a reload (docs/CONFIG.md: live, as
/// `header_read_timeout`): a connection accepted after it that half-closes while its answer
/// is made is closed without it; one accepted before (kept alive) still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_http1_half_close_applies_to_connections_accepted_after_it() {
    let upstream = raw_upstream(Duration::from_secs(1)).await;
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_reloadable(
        "qa-half-close",
        base,
        "",
        &format!("http://{upstream}"),
        "auth = \"none\"",
    );
    let mut fresh = TcpStream::connect(running.addr).await.unwrap();
    let status = half_closed_request(&mut fresh).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let mut before = hold(running.addr, SESSION, "HTTP/1.1 401").await;

    running.reload_text(&running.text(&format!("{base}\nhttp1_half_close = false"), ""));
    let lines = running.file_lines();
    assert!(
        lines.applied.len() == 1
            && lines.applied[0].contains(
                "applied 1 key: server.http1_half_close (applies to connections accepted from \
                 now on; connections already open keep the values they started with)"
            ),
        "{lines:?}"
    );
    for _ in 0..4 {
        let mut after = TcpStream::connect(running.addr).await.unwrap();
        let status = half_closed_request(&mut after).await;
        assert_eq!(status, "", "answered after its EOF with half_close off");
    }
    let status = half_closed_request(&mut before).await;
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "the connection accepted before the reload lost half_close: {status:?}"
    );
}

/// `shutdown_grace` raised by a reload: a SIGTERM with a request in flight waits for the new,
/// longer grace (the value running when the shutdown starts), not the 1 s it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_shutdown_grace_holds_the_next_shutdown_longer() {
    let upstream = raw_upstream(Duration::ZERO).await;
    let mut running = start_reloadable(
        "qa-grace-raised",
        "shutdown_grace = \"1s\"",
        "",
        &format!("http://{upstream}"),
        "auth = \"none\"",
    );
    running.reload_text(&running.text("shutdown_grace = \"4s\"", ""));
    let lines = running.file_lines();
    assert!(
        lines.applied.len() == 1
            && lines.applied[0].contains("applied 1 key: server.shutdown_grace (from now on)"),
        "{lines:?}"
    );
    // In flight: its body stalls (request_timeout is 60 s by default).
    let mut stalled = TcpStream::connect(running.addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /api/x HTTP/1.1\r\nHost: app.test\r\nOrigin: {ORIGIN}\r\n\
                 Content-Type: text/plain\r\nContent-Length: 10\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.proxy.signal("TERM");
    let stopping = Instant::now();
    let exited = running.proxy.wait_exit(Duration::from_secs(15));
    let took = stopping.elapsed();
    assert!(exited.is_some(), "still running 15 s after SIGTERM");
    assert!(
        took >= Duration::from_millis(3500) && took < Duration::from_secs(8),
        "stopped after {took:?}, not after the reloaded 4 s grace"
    );
}

/// `server.max_connections` through the file-change check (`reload_check_interval`, no
/// signal): applied with its line (`file change:`), and in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_applies_through_the_file_change_check() {
    let server = |n: usize| {
        format!(
            "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"\nreload_check_interval = \"1s\"\n\
             max_connections = {n}"
        )
    };
    let running = start_reloadable("qa-file-check", &server(8), "", "http://127.0.0.1:9", "");
    let lines = running.file_lines();
    running.write_file(&running.text(&server(2), ""));
    running.wait_for_new_file_lines(&lines);
    let applied = running
        .proxy
        .json_messages("INFO", &["file change:", "proxy.toml: applied"]);
    assert!(
        applied.len() == 1
            && applied[0].contains(&format!(
                "applied 1 key: server.max_connections {LIMIT_LINE}"
            )),
        "{applied:?}"
    );
    exactly_admitted(running.addr, SESSION, "HTTP/1.1 401", 2).await;
}

/// The largest values the config takes for the connection limits and head limits
/// (`max_connections` and `admin.max_connections` 16777216, `max_header_count` 10000,
/// `http2_max_concurrent_streams` 4294967295), applied by a reload, then the smallest
/// (`max_connections` 1, `max_header_count` 1, `max_header_bytes` 8KiB,
/// `http2_max_concurrent_streams` 1): each applied without a panic and in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extreme_limits_through_a_reload_work() {
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_reloadable("qa-extremes", base, "", "http://127.0.0.1:9", "");
    running.reload_text(&running.text(
        &format!(
            "{base}\nmax_connections = 16777216\nmax_header_count = 10000\n\
             http2_max_concurrent_streams = 4294967295\nmax_header_bytes = \"1MiB\""
        ),
        "max_connections = 16777216",
    ));
    let lines = running.file_lines();
    assert!(
        lines.waiting.is_empty() && lines.invalid.is_empty() && lines.applied.len() == 2,
        "{lines:?}"
    );
    let mut many = String::from("GET /auth/session HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-Pad-{i}: x\r\n"));
    }
    many.push_str("\r\n");
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(running.addr).await.unwrap();
        let status = exchange(&mut stream, many.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
        open.push(stream);
    }
    let (stream, closer) = closable(admitted(running.addr).await);
    h2_streams(stream, closer, "http", 32, StatusCode::UNAUTHORIZED).await;
    drop(open);

    running.reload_text(&running.text(
        &format!(
            "{base}\nmax_connections = 1\nmax_header_count = 1\n\
             http2_max_concurrent_streams = 1\nmax_header_bytes = \"8KiB\""
        ),
        "max_connections = 1",
    ));
    let lines = running.file_lines();
    assert!(
        lines.waiting.is_empty() && lines.invalid.is_empty() && lines.applied.len() == 4,
        "{lines:?}"
    );
    // One field (Host) within 1; two over it.
    let mut stream = hold(running.addr, SESSION, "HTTP/1.1 401").await;
    let status = exchange(
        &mut stream,
        b"GET /auth/session HTTP/1.1\r\nHost: app.test\r\nX-One: more\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
    drop(stream);
    // HTTP/2 with one stream at a time: 8 requests still all answered (the client waits).
    let (h2, closer) = closable(admitted(running.addr).await);
    h2_streams(h2, closer, "http", 8, StatusCode::UNAUTHORIZED).await;
    exactly_admitted(running.admin, HEALTHZ, "HTTP/1.1 200", 1).await;
    let log = running.proxy.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// `shutdown_grace` lowered by a reload bounds a shutdown with WebSockets open on both event
/// loops whose two sides never answer the proxy's Close (docs/CONFIG.md
/// `websocket_close_timeout`: "On shutdown, `server.shutdown_grace` also bounds it"): the
/// process exits within about the reloaded 1 s, not the 5 s close timeout or the 30 s grace
/// it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_grace_bounds_the_websockets_at_shutdown() {
    let upstream = raw_upstream(Duration::ZERO).await;
    let mut running = start_reloadable(
        "qa-grace-websockets",
        "shutdown_grace = \"30s\"",
        "",
        &format!("http://{upstream}"),
        "auth = \"none\"\nwebsocket = true\nwebsocket_close_timeout = \"5s\"",
    );
    running.reload_text(&running.text("shutdown_grace = \"1s\"", ""));
    let mut sockets = Vec::new();
    for _ in 0..6 {
        sockets.push(websocket(running.addr).await);
    }
    running.proxy.signal("TERM");
    let stopping = Instant::now();
    let exited = running.proxy.wait_exit(Duration::from_secs(40));
    let took = stopping.elapsed();
    assert!(exited.is_some(), "still running 40 s after SIGTERM");
    assert!(
        took < Duration::from_millis(3000),
        "stopped after {took:?}, not within the reloaded 1 s grace: {}",
        running.proxy.log()
    );
    drop(sockets);
}

/// An HTTP/2 (prior knowledge) connection to `addr`: its sender, driver and closer.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    Closer,
) {
    let (stream, closer) = closable(admitted(addr).await);
    let (sender, driver) = support_h2::client(stream).await;
    (sender, driver, closer)
}

/// The status of `GET /auth/session` with an `x-pad` field of `pad` bytes on `sender`.
async fn h2_status(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    pad: usize,
) -> StatusCode {
    let request = Request::get("http://app.test/auth/session")
        .header("x-pad", "x".repeat(pad))
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.ready().await.unwrap();
    sender
        .send_request(request)
        .await
        .expect("answered")
        .status()
}

/// OPERATIONS.md, "Head limits": a lowered `max_header_bytes` answers 431 to a connection
/// accepted after the reload whose head is over it: over HTTP/2 too (HTTP/2's header list
/// limit, where the other tests check only the advertised SETTINGS); an HTTP/2 connection
/// accepted before keeps the old limit for every stream it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_max_header_bytes_answers_431_over_http2_to_new_connections_only() {
    let base = "shutdown_grace = \"2s\"\nheader_read_timeout = \"60s\"";
    let running = start_reloadable(
        "qa-h2-431",
        &format!("{base}\nmax_header_bytes = \"64KiB\""),
        "",
        "http://127.0.0.1:9",
        "",
    );
    let (mut before, before_driver, before_closer) = h2_connection(running.addr).await;
    assert_eq!(
        h2_status(&mut before, 12 * 1024).await,
        StatusCode::UNAUTHORIZED
    );
    running.reload_text(&running.text(&format!("{base}\nmax_header_bytes = \"8KiB\""), ""));
    for _ in 0..4 {
        let (mut after, driver, closer) = h2_connection(running.addr).await;
        assert_eq!(h2_status(&mut after, 100).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            h2_status(&mut after, 12 * 1024).await,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        close_h2(after, driver, closer).await;
    }
    assert_eq!(
        h2_status(&mut before, 12 * 1024).await,
        StatusCode::UNAUTHORIZED,
        "the HTTP/2 connection accepted before the reload lost the old 64 KiB"
    );
    close_h2(before, before_driver, before_closer).await;
}

/// The admin `/metrics` text now.
async fn metrics_text(admin: SocketAddr) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("/metrics within 10 s")
        .unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The value of the `/metrics` line starting with `series ` (None when absent).
fn series(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A flood of connections over `server.max_connections` is one WARN line per listener every
/// 10 s (both event loops together), not one per connection, and
/// `countersign_connections_refused_total` counts every refusal; the open count and the
/// limit (also after a reload) are on `/metrics` too, per listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_the_limit_are_counted_and_their_warning_paced() {
    let upstream = raw_upstream(Duration::ZERO).await;
    let running = start_reloadable(
        "refusal-pace",
        "shutdown_grace = \"2s\"\nmax_connections = 2\nheader_read_timeout = \"60s\"",
        "",
        &format!("http://{upstream}"),
        "",
    );
    let held = [
        hold(running.addr, SESSION, "HTTP/1.1 401").await,
        hold(running.addr, SESSION, "HTTP/1.1 401").await,
    ];
    // Refusals before the flood: `hold` retries a connection refused while a slot of an
    // earlier connection (the start-up probe's) was still being given back, on a loaded
    // machine. Counted when the accept loop closes each one: polled until it settles.
    let refused_series = "countersign_connections_refused_total{listener=\"server\"}";
    let before = series(&metrics_text(running.admin).await, refused_series).unwrap_or(0);
    const FLOOD: u64 = 60;
    for _ in 0..FLOOD {
        assert!(refused(running.addr, SESSION).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = metrics_text(running.admin).await;
        let counted = series(&text, refused_series);
        if counted == Some(before + FLOOD) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "refusals counted: {counted:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (line, value) in [
        ("countersign_connections_open{listener=\"server\"}", 2),
        ("countersign_connections_limit{listener=\"server\"}", 2),
        (
            "countersign_connections_refused_total{listener=\"admin\"}",
            0,
        ),
        ("countersign_connections_limit{listener=\"admin\"}", 64),
    ] {
        assert_eq!(series(&text, line), Some(value), "{line}\n{text}");
    }
    // The scrape itself is the admin listener's one open connection.
    assert_eq!(
        series(&text, "countersign_connections_open{listener=\"admin\"}"),
        Some(1),
        "{text}"
    );
    for family in ["open", "limit"] {
        assert!(
            text.contains(&format!("# TYPE countersign_connections_{family} gauge")),
            "{text}"
        );
    }
    assert!(text.contains("# TYPE countersign_connections_refused_total counter"));
    let log = running.proxy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("connection limit reached"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("\"level\":\"WARN\"") && warnings[0].contains("\"suppressed\":0"),
        "{}",
        warnings[0]
    );

    // A reload's limit shows at once.
    running.reload_text(&running.text(
        "shutdown_grace = \"2s\"\nmax_connections = 5\nheader_read_timeout = \"60s\"",
        "",
    ));
    let text = metrics_text(running.admin).await;
    assert_eq!(
        series(&text, "countersign_connections_limit{listener=\"server\"}"),
        Some(5),
        "{text}"
    );
    drop(held);
}

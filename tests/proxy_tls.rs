//! HTTPS: rustls with a self-signed certificate made in the test, HTTP/2 by ALPN, and the
//! cookie attributes an https public origin requires (`Secure`, `__Host-` prefix).
//! Run: `cargo test --all-features --test proxy_tls`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use support::*;
use tokio_rustls::client::TlsStream;

type Tls = TlsHarness;

async fn https_proxy() -> Tls {
    start_tls("tls", |_| {}).await
}

async fn connect(tls: &Tls, alpn: &[&[u8]]) -> TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(tls.h.addr).await.unwrap();
    tls_over(tls, tcp, alpn).await.expect("TLS handshake")
}

/// An HTTP/2 client over `stream`, its connection driven in the background.
async fn http2_over(
    stream: TlsStream<tokio::net::TcpStream>,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    support_h2::client(stream).await.0
}

fn login_request(uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("content-type", "application/json")
        .header("origin", "https://localhost")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
        )))
        .unwrap()
}

fn assert_secure_host_cookie(set_cookie: &str) {
    assert!(
        set_cookie.starts_with("__Host-countersign_session="),
        "{set_cookie}"
    );
    let attrs: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    for wanted in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&wanted), "{wanted} missing in {set_cookie}");
    }
    assert!(
        !attrs.iter().any(|a| a.starts_with("Domain")),
        "__Host- cookies are host-only"
    );
}

#[tokio::test]
async fn https_with_http2_by_alpn_and_secure_host_cookie() {
    let tls = https_proxy().await;
    let stream = connect(&tls, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = http2_over(stream).await;

    let response = sender
        .send_request(login_request("https://localhost/auth/login"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_secure_host_cookie(&set_cookie);
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    // The session works over HTTP/2, and the upstream learns the public scheme.
    let request = Request::builder()
        .uri("https://localhost/api/x")
        .header("cookie", &cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["user"], "alice");
    let raw = tls.h.upstream.last_raw();
    assert_eq!(raw.headers["x-forwarded-proto"], "https");
    assert_eq!(raw.headers["x-forwarded-host"], "localhost");
    assert!(raw.headers.get("cookie").is_none());

    // The plain cookie name is not accepted in place of the __Host- one.
    let plain = cookie.replacen("__Host-", "", 1);
    let request = Request::builder()
        .uri("https://localhost/auth/session")
        .header("cookie", &plain)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn https_with_http1_when_the_client_offers_only_http1() {
    let tls = https_proxy().await;
    let stream = connect(&tls, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = login_request("/auth/login");
    request
        .headers_mut()
        .insert("host", "localhost".parse().unwrap());
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_secure_host_cookie(response.headers()["set-cookie"].to_str().unwrap());
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_answer() {
    let tls = https_proxy().await;
    let answer = raw_exchange(tls.h.addr, b"GET /auth/session HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("unauthenticated"), "{answer}");
}

#[tokio::test]
async fn https_upstreams_are_reached_over_tls_with_the_configured_ca() {
    use countersign::clock::ManualClock;
    let clock = ManualClock::new(T0);
    let (upstream, certificate) = start_tls_upstream(Arc::new(clock.clone())).await;
    let https_url = format!("https://127.0.0.1:{}", upstream.addr.port());
    let ca = certificate.der().clone();

    // Trusted through the extra CA: requests arrive signed, over TLS.
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            let mut secure = route("secure", "/secure/", &https_url);
            secure.auth_required = false;
            s.routes.push(secure);
            s.upstream_roots = vec![ca];
        }),
        ..HarnessOptions::default()
    })
    .await;
    let r = send(h.addr, Method::GET, "/secure/x", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(upstream.last_verified().uri, "/secure/x");

    // Without the CA the certificate is refused: 502, nothing verified.
    let before = upstream.verified.lock().len();
    let https_url = format!("https://127.0.0.1:{}", upstream.addr.port());
    let untrusting = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            let mut secure = route("secure", "/secure/", &https_url);
            secure.auth_required = false;
            s.routes.push(secure);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let r = send(untrusting.addr, Method::GET, "/secure/x", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.verified.lock().len(), before);
}

/// Behind a TCP balancer that passes TLS through (`server.proxy_protocol`), the PROXY header
/// comes before the TLS handshake, in the clear: the client it names is the one the API is
/// told, over the TLS session that follows. A connection whose handshake starts without the
/// header is closed unanswered (its ClientHello is not a PROXY header).
#[tokio::test]
async fn a_proxy_protocol_header_before_the_tls_handshake_names_the_client() {
    let tls = start_tls("tls-proxy-protocol", |s| {
        s.trusted_proxies = countersign::proxy::client_address::TrustedProxies::new(
            vec!["127.0.0.1/32".parse().unwrap()],
            http::HeaderName::from_static("x-forwarded-for"),
        );
        s.proxy_protocol = true;
    })
    .await;
    let behind_balancer = |client: &'static str| {
        let tls = &tls;
        async move {
            let mut tcp = tokio::net::TcpStream::connect(tls.h.addr).await.unwrap();
            let header = format!("PROXY TCP4 {client} 10.0.0.1 51234 443\r\n");
            tokio::io::AsyncWriteExt::write_all(&mut tcp, header.as_bytes())
                .await
                .unwrap();
            tls_over(tls, tcp, &[b"h2"])
                .await
                .expect("TLS handshake after the PROXY header")
        }
    };

    let stream = behind_balancer("203.0.113.7").await;
    let mut sender = http2_over(stream).await;
    let response = sender
        .send_request(login_request("https://localhost/auth/login"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let request = Request::builder()
        .uri("https://localhost/api/x")
        .header("cookie", &cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let raw = tls.h.upstream.last_raw();
    assert_eq!(raw.headers["x-forwarded-for"], "203.0.113.7");
    assert_eq!(raw.headers["x-forwarded-proto"], "https");

    // A second connection, another client: each connection's own header.
    let stream = behind_balancer("198.51.100.9").await;
    let mut sender = http2_over(stream).await;
    let request = Request::builder()
        .uri("https://localhost/api/y")
        .header("cookie", &cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        tls.h.upstream.last_raw().headers["x-forwarded-for"],
        "198.51.100.9"
    );

    // TLS straight away, no header: the handshake gets no answer, nothing reaches the API.
    let before = tls.h.upstream.raw_count();
    let tcp = tokio::net::TcpStream::connect(tls.h.addr).await.unwrap();
    let handshake = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls_over(&tls, tcp, &[b"h2"]),
    )
    .await
    .expect("the proxy closes the connection");
    assert!(
        handshake.is_err(),
        "a handshake without a PROXY header succeeded"
    );
    assert_eq!(tls.h.upstream.raw_count(), before);
}

/// A TLS client handshake over `tcp` (already connected to the proxy), offering `alpn`.
async fn tls_over(
    tls: &Tls,
    tcp: tokio::net::TcpStream,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let connector = support::tls_connector(tls.roots.clone(), alpn);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

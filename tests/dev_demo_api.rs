//! The demo API of `dev` and `demo-api` (src/proxy/dev.rs) as a backend developer would read
//! it: notes that only their author may edit, and a server-sent event stream, both behind the
//! real `VerifyLayer` and reached with requests signed by the library's `Signer`; and its
//! WebSocket (`GET /api/ws`) through the `dev` proxy with a real WebSocket client.
#![cfg(feature = "proxy")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::SystemClock;
use countersign::core::{Nonce, SignerConfig};
use countersign::proxy::dev::{self, start_demo_api, DevOptions};
use countersign::{Identity, Signer};
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signed headers for `method path` with `body`, as the proxy would send them for `user`.
fn signed_headers(
    signer: &Signer,
    addr: SocketAddr,
    user: &str,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", addr.to_string());
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    let (mut parts, ()) = builder.body(()).unwrap().into_parts();
    signer
        .sign(
            &mut parts,
            body,
            Some(&Identity::new(user, ["user"])),
            now(),
            &Nonce::random(),
        )
        .unwrap();
    parts
        .headers
        .iter()
        .filter(|(name, _)| *name != "host")
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect()
}

async fn signed_send(
    signer: &Signer,
    addr: SocketAddr,
    user: &str,
    method: Method,
    path: &str,
    body: &str,
) -> Reply {
    let headers = signed_headers(signer, addr, user, &method, path, body.as_bytes());
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    send(addr, method, path, &headers, body.to_owned()).await
}

#[tokio::test]
async fn only_a_notes_author_may_edit_it() {
    let keyring = test_keyring();
    let (addr, task) = start_demo_api(keyring.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let signer = Signer::new(keyring, SignerConfig::default());
    let created = signed_send(
        &signer,
        addr,
        "alice",
        Method::POST,
        "/api/notes",
        r#"{"text":"first"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let path = format!("/api/notes/{id}");

    // Another user: refused, and the note is unchanged.
    let foreign = signed_send(
        &signer,
        addr,
        "bob",
        Method::PUT,
        &path,
        r#"{"text":"bob was here"}"#,
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN, "{}", foreign.text());
    assert_eq!(foreign.error_code(), "not_author");
    // Bad bodies and unknown notes.
    for body in [r#"{"nope":1}"#, r#"{"text":"  "}"#, "not json"] {
        let bad = signed_send(&signer, addr, "alice", Method::PUT, &path, body).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(bad.error_code(), "bad_request", "{body}");
    }
    let long = format!(
        r#"{{"text":"{}"}}"#,
        "x".repeat(countersign::proxy::dev::MAX_NOTE_BYTES + 1)
    );
    let bad = signed_send(&signer, addr, "alice", Method::PUT, &path, &long).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    for missing in ["/api/notes/999", "/api/notes/x"] {
        let r = signed_send(
            &signer,
            addr,
            "alice",
            Method::PUT,
            missing,
            r#"{"text":"t"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{missing}");
    }
    let list = signed_send(&signer, addr, "alice", Method::GET, "/api/notes", "").await;
    assert_eq!(list.json()["notes"][0]["text"], "first");

    // The author: changed.
    let edited = signed_send(
        &signer,
        addr,
        "alice",
        Method::PUT,
        &path,
        r#"{"text":"second"}"#,
    )
    .await;
    assert_eq!(edited.status, StatusCode::OK, "{}", edited.text());
    assert_eq!(edited.json()["text"], "second");
    assert_eq!(edited.json()["author"], "alice");
    let list = signed_send(&signer, addr, "bob", Method::GET, "/api/notes", "").await;
    assert_eq!(list.json()["notes"][0]["text"], "second");

    // Unsigned: the layer refuses it before the API sees it.
    let unsigned = send(
        addr,
        Method::PUT,
        &path,
        &[("content-type", "application/json")],
        r#"{"text":"x"}"#,
    )
    .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    task.abort();
}

#[tokio::test]
async fn the_event_stream_carries_the_verified_user() {
    let keyring = test_keyring();
    let (addr, task) = start_demo_api(keyring.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let signer = Signer::new(keyring, SignerConfig::default());
    let headers = signed_headers(&signer, addr, "alice", &Method::GET, "/api/events", b"");
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let started = Instant::now();
    let response = send_streaming(addr, Method::GET, "/api/events", &headers, Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let mut body = response.into_body();
    let mut text = String::new();
    // The opening comment at once, then two ticks about a second apart.
    while text.matches("event: tick").count() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event within 5 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    assert!(text.starts_with(": "), "{text}");
    assert!(text.contains("id: 1\ndata: {"), "{text}");
    assert!(text.contains(r#""user":"alice""#), "{text}");
    assert!(text.contains("id: 2\n"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A replay of the same signed request is refused: a stream is a request like any other.
    let replayed = send(addr, Method::GET, "/api/events", &headers, Bytes::new()).await;
    assert_eq!(replayed.status, StatusCode::UNAUTHORIZED);
    assert_eq!(replayed.error_code(), "replayed");
    // Only GET.
    let post = signed_send(&signer, addr, "alice", Method::POST, "/api/events", "{}").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    task.abort();
}

/// A WebSocket handshake to `dev`'s `GET /api/ws` with `headers` (besides the client's own).
async fn open_ws(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<
    WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = format!("ws://{addr}/api/ws").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    // `connect_async` checks the 101's `Sec-WebSocket-Accept` against its key.
    let (socket, response) = tokio::time::timeout(Duration::from_secs(10), connect_async(request))
        .await
        .expect("handshake answered within 10 s")?;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    Ok(socket)
}

/// The next text message, within 10 s, as JSON.
async fn next_json(
    socket: &mut WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the WebSocket is open")
            .unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The status (and error code) of a refused handshake.
fn refusal(
    result: Result<impl std::fmt::Debug, tokio_tungstenite::tungstenite::Error>,
) -> (u16, String) {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: serde_json::Value = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            (
                response.status().as_u16(),
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }
}

/// `GET /api/ws` through `dev` (the proxy's WebSocket route in front of the demo API behind
/// the real `VerifyLayer`), with a real RFC 6455 client sending what a browser sends: the
/// greeting names the logged-in user (signed into the handshake by the proxy), text is
/// echoed, a logout closes the open WebSocket, and handshakes without a session or without
/// the public `Origin` are refused before the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_through_dev_greets_the_signed_in_user_and_echoes() {
    let server = dev::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        password: Some("demo-pass".into()),
        ..DevOptions::default()
    })
    .await
    .unwrap();
    let addr = server.proxy.local_addr();
    let origin = format!("http://127.0.0.1:{}", addr.port());
    let login = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", &origin)],
        r#"{"username":"demo","password":"demo-pass"}"#,
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text());
    let cookie = login.session_cookie().unwrap();
    let csrf = login.json()["csrf_token"].as_str().unwrap().to_owned();

    let mut socket = open_ws(addr, &[("cookie", &cookie), ("origin", &origin)])
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        serde_json::json!({ "hello": "demo" })
    );
    for text in ["hi there", "ünïcødé \"quoted\"", ""] {
        socket.send(Message::text(text)).await.unwrap();
        assert_eq!(
            next_json(&mut socket).await,
            serde_json::json!({ "user": "demo", "echo": text })
        );
    }
    // A binary message is not for this API: it closes with 1003.
    socket
        .send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("closed within 10 s");
    match closed {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1003, "{frame:?}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }

    // The API is reached only through the proxy: the same handshake straight to it has no
    // signature.
    let direct = format!("ws://{}/api/ws", server.api_addr)
        .into_client_request()
        .unwrap();
    assert_eq!(
        refusal(connect_async(direct).await),
        (401, "missing_signature".to_owned())
    );

    // Without Origin (no browser omits it; a cross-site page cannot forge it) or from another
    // origin: 403 csrf, with a valid session cookie.
    assert_eq!(
        refusal(open_ws(addr, &[("cookie", &cookie)]).await),
        (403, "csrf".to_owned())
    );
    assert_eq!(
        refusal(open_ws(addr, &[("cookie", &cookie), ("origin", "http://evil.test")]).await),
        (403, "csrf".to_owned())
    );
    // Without a session: 401.
    assert_eq!(refusal(open_ws(addr, &[("origin", &origin)]).await).0, 401);

    // An open WebSocket is closed by a logout (within `websocket_session_check`), and the
    // logged-out cookie opens no new one.
    let mut socket = open_ws(addr, &[("cookie", &cookie), ("origin", &origin)])
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        serde_json::json!({ "hello": "demo" })
    );
    let logout = send(
        addr,
        Method::POST,
        "/auth/logout",
        &[
            ("cookie", &cookie),
            ("x-csrf-token", &csrf),
            ("origin", &origin),
        ],
        "",
    )
    .await;
    assert!(logout.status.is_success(), "{}", logout.status);
    let started = Instant::now();
    let ended = tokio::time::timeout(
        countersign::proxy::dev::DEMO_WS_SESSION_CHECK + Duration::from_secs(5),
        socket.next(),
    )
    .await
    .expect("closed after the logout");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_)))),
        "{ended:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(
        refusal(open_ws(addr, &[("cookie", &cookie), ("origin", &origin)]).await).0,
        401
    );
    server.shutdown().await;
}

//! The demo API of `dev` and `demo-api` (src/proxy/dev.rs) as a backend developer would read
//! it: notes that only their author may edit, and a server-sent event stream, both behind the
//! real `VerifyLayer` and reached with requests signed by the library's `Signer`.
#![cfg(feature = "proxy")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::SystemClock;
use countersign::core::{Nonce, SignerConfig};
use countersign::proxy::dev::start_demo_api;
use countersign::{Identity, Signer};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use support::*;

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

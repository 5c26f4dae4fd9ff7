//! Limits and failure modes: slow clients, connection cap, HTTP/2 cleartext, a failing
//! session store. Run: `cargo test --all-features --test proxy_limits`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::core::Identity;
use countersign::proxy::session::{BoxFuture, Session, SessionId, SessionStore, StoreError};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut sender = support_h2::h2c(h.addr).await;
    let request = Request::get("http://app.test/api/x")
        .header("cookie", &login.cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["user"],
        "alice"
    );
    // The upstream is spoken to over HTTP/1.1 with the upstream's Host.
    assert_eq!(
        h.upstream.last_raw().headers["host"],
        h.upstream.addr.to_string().as_str()
    );
}

#[tokio::test]
async fn a_client_slow_to_send_its_head_is_disconnected() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.header_read_timeout = Duration::from_millis(300)),
        ..HarnessOptions::default()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(h.upstream.raw_count(), 0);
}

#[tokio::test]
async fn a_client_slow_to_send_its_body_gets_408_and_nothing_is_forwarded() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.request_timeout = Duration::from_millis(300)),
        ..HarnessOptions::default()
    })
    .await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /api/notes HTTP/1.1\r\nhost: x\r\ncookie: {}\r\nx-csrf-token: {}\r\ncontent-length: 100\r\n\r\n0123456789",
        login.cookie, login.csrf
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#"{"error":"request_timeout"}"#), "{text}");
    assert_eq!(h.upstream.raw_count(), 0);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.max_connections = 2;
            // Only the clients' leaving can free the held slots within this test.
            s.header_read_timeout = Duration::from_secs(60);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let held1 = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let held2 = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = raw_exchange(
        h.addr,
        b"GET /auth/session HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.is_empty(), "third connection was served: {answer}");
    drop(held1);
    drop(held2);
    // The slots are free once the server has seen the two closes: polled, not a fixed pause.
    let answer = answered_once_a_slot_is_free(
        h.addr,
        b"GET /auth/session HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// A session store that is down.
struct DownStore;

fn down<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(async { Err(StoreError::new("connection refused")) })
}

impl SessionStore for DownStore {
    fn create<'a>(
        &'a self,
        _: &'a Identity,
        _: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        down()
    }
    fn get<'a>(
        &'a self,
        _: &'a SessionId,
        _: u64,
        _: bool,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        down()
    }
    fn delete<'a>(&'a self, _: &'a SessionId) -> BoxFuture<'a, Result<(), StoreError>> {
        down()
    }
    fn delete_user<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        down()
    }
    fn count(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        down()
    }
    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

#[tokio::test]
async fn a_failing_session_store_is_503_everywhere() {
    let h = Harness::start_with(HarnessOptions {
        sessions: Some(Arc::new(DownStore)),
        ..HarnessOptions::default()
    })
    .await;
    let r = h.login_raw("alice", ALICE_PASSWORD).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text(), r#"{"error":"session_store_unavailable"}"#);
    assert!(r.set_cookie().is_none());
    let cookie = format!("countersign_session={}", "A".repeat(43));
    let r = send(
        h.addr,
        Method::GET,
        "/api/x",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream.raw_count(), 0);
    let r = send(
        h.addr,
        Method::GET,
        "/auth/session",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = admin_revoke(h.admin, "alice").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = send(h.admin, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Metrics still render, without the gauge it cannot read, and say why.
    let r = send(h.admin, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    assert!(!text.contains("\ncountersign_active_sessions "), "{text}");
    assert!(
        !text.contains("# TYPE countersign_active_sessions"),
        "{text}"
    );
    assert!(
        text.contains("\ncountersign_session_store_up 0\n"),
        "{text}"
    );
}

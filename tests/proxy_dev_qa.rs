//! The demo API of `dev` and `demo-api` (src/proxy/dev.rs) against clients that hold
//! connections without making requests. Run: `cargo test --all-features --test proxy_dev_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::SystemClock;
use countersign::core::{Nonce, SignerConfig};
use countersign::proxy::dev::{start_demo_api, DEMO_API_HEADER_READ_TIMEOUT};
use countersign::{Identity, Signer};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support::*;
use support_h2::{h2_frame, PREFACE, SETTINGS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signed headers for `GET path`, as the proxy would send them for `user`.
fn signed_get(signer: &Signer, addr: SocketAddr, user: &str, path: &str) -> Vec<(String, String)> {
    let (mut parts, ()) = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", addr.to_string())
        .body(())
        .unwrap()
        .into_parts();
    signer
        .sign(
            &mut parts,
            b"",
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

/// Reads `stream` until the server closes it (EOF or a reset); panics past `deadline`.
async fn until_closed(mut stream: TcpStream, deadline: Duration) -> Instant {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(deadline, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the demo API never closed a connection that made no request")
}

/// A connection that sends nothing, one that sends part of the HTTP/2 preface, one that sends
/// the whole preface and then no stream, and an HTTP/2 connection idle after its one request:
/// each used to be held by the demo API forever (hyper-util's wait for the first bytes and an
/// HTTP/2 connection without streams have no timer), so anyone reaching a `demo-api` could
/// pile up sockets and tasks without limit. Each is closed once it has been without a request
/// for `DEMO_API_HEADER_READ_TIMEOUT`; an event stream open meanwhile goes on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_api_closes_connections_without_a_request_but_not_a_long_answer() {
    let limit = DEMO_API_HEADER_READ_TIMEOUT;
    let deadline = limit + Duration::from_secs(15);
    let keyring = test_keyring();
    let (addr, task) = start_demo_api(keyring.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let signer = Signer::new(keyring, SignerConfig::default());

    // A signed event stream (one tick a second), read as it comes: it must outlive the limit.
    let headers = signed_get(&signer, addr, "alice", "/api/events");
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let response = send_streaming(addr, Method::GET, "/api/events", &headers, Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let ticks_wanted = limit.as_secs() as usize + 3;
    let events = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut ticks = 0;
        while ticks < ticks_wanted {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        ticks += std::str::from_utf8(&data)
                            .unwrap()
                            .matches("event: tick")
                            .count();
                    }
                }
                Some(Err(e)) => return Err(format!("after {ticks} ticks: {e}")),
                None => return Err(format!("ended after {ticks} ticks")),
            }
        }
        Ok(ticks)
    });

    let opened = Instant::now();
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut preface_only = TcpStream::connect(addr).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    preface_only
        .write_all(&h2_frame(SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    // HTTP/2 with one request (unsigned: the layer's 401), then nothing.
    let (mut sender, h2_connection) =
        support_h2::client::<Full<Bytes>, _>(TcpStream::connect(addr).await.unwrap()).await;
    let answer = sender
        .send_request(
            Request::builder()
                .uri(format!("http://{addr}/api/whoami"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    answer.into_body().collect().await.unwrap();

    let (silent, partial, preface_only, h2_idle) = tokio::join!(
        until_closed(silent, deadline),
        until_closed(partial, deadline),
        until_closed(preface_only, deadline),
        async {
            tokio::time::timeout(deadline, h2_connection)
                .await
                .expect("the demo API never closed an idle HTTP/2 connection")
                .unwrap()
                .unwrap();
            Instant::now()
        },
    );
    for (what, closed) in [
        ("silent", silent),
        ("partial preface", partial),
        ("preface only", preface_only),
        ("idle HTTP/2", h2_idle),
    ] {
        // The limit, not anything sooner.
        let took = closed - opened;
        assert!(took >= limit, "{what}: closed after {took:?}");
    }

    // The stream open all along was not cut with them.
    let ticks = tokio::time::timeout(deadline, events)
        .await
        .expect("the event stream stalled")
        .unwrap()
        .unwrap_or_else(|e| panic!("the event stream was cut: {e}"));
    assert_eq!(ticks, ticks_wanted);
    task.abort();
}

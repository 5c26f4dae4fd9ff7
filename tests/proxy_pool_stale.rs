//! `[[upstream]] pool_stale_after`: an upstream closes a keep-alive connection it has left idle
//! for its own keep-alive timeout, and a request the proxy writes at that moment is lost with
//! it (the connection closes without a byte of answer). An idempotent request sent on a pooled
//! connection idle at least `pool_stale_after` is then signed again, with a fresh nonce, and
//! sent once on a new connection; a POST is not (it may have had its effect), nor a request
//! on a connection idle for less, nor anything with `"off"`, and a spare that fails too is a
//! 502, never a third attempt. A spare whose new connection cannot be made is a 502 too, and
//! is not counted as sent again.
//!
//! The upstream is a relay on loopback in front of the harness's verifying API (the real
//! `VerifyLayer` with its replay cache): on its first connection it relays one exchange, then
//! reads the next request, relays it to the API (which verifies it and records its nonce) and
//! closes the connection without answering: the race where the upstream took the request just
//! as it closed. The spare must carry a new nonce, or the API refuses it as `replayed`.
//! The config key's parsing is checked in `tests/proxy_pool_lifetime.rs`, with
//! `pool_max_lifetime`'s.
//! Run: `cargo test --all-features --test proxy_pool_stale`.
#![cfg(feature = "proxy")]

mod support;
mod support_logs;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use countersign::clock::Clock as _;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the relay does with one request on one of its connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    /// Relay it to the API and the answer back.
    Relay,
    /// Relay it to the API (which acts on it), then close without answering.
    RelayAndClose,
    /// As `RelayAndClose`, and the relay stops listening first: a new connection is refused.
    RelayCloseAndStopListening,
    /// Relay it to the API (which acts on it), send the first line of the API's answer
    /// (`HTTP/1.1 200 OK\r\n`: the upstream has begun answering), then close.
    RelayPartialAnswerAndClose,
    /// Hold it (not relayed) for 600 ms, then close without answering: an upstream that took
    /// the request and died while working on it.
    HoldThenClose,
}

struct Relay {
    url: String,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
}

/// A relay to `api` whose `script(connection, request)` (both counted from 0) says what to do
/// with each request. Made from synchronous code inside the runtime (the harness's tweak).
fn relay(api: SocketAddr, script: fn(usize, usize) -> Act) -> Relay {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = TcpListener::from_std(listener).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let stop_listening = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop_listening.notified() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut proxy_side, _)) = accepted else {
                return;
            };
            let connection = counter.fetch_add(1, Ordering::SeqCst);
            let stop_listening = stop_listening.clone();
            tokio::spawn(async move {
                let Ok(mut api_side) = TcpStream::connect(api).await else {
                    return;
                };
                for request in 0.. {
                    let Some(bytes) = read_message(&mut proxy_side).await else {
                        return;
                    };
                    if script(connection, request) == Act::HoldThenClose {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        return;
                    }
                    if api_side.write_all(&bytes).await.is_err() {
                        return;
                    }
                    let Some(answer) = read_message(&mut api_side).await else {
                        return;
                    };
                    match script(connection, request) {
                        Act::Relay => {
                            if proxy_side.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                        // Dropping both streams closes them (FIN: everything sent was read).
                        Act::RelayAndClose | Act::HoldThenClose => return,
                        Act::RelayPartialAnswerAndClose => {
                            let line_end =
                                answer.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                            let _ = proxy_side.write_all(&answer[..line_end]).await;
                            let _ = proxy_side.flush().await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                        Act::RelayCloseAndStopListening => {
                            // The listener dropped (the port refusing) before the close the
                            // proxy reconnects on.
                            stop_listening.notify_one();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    Relay { url, accepted }
}

/// One HTTP/1.1 message (head and a `Content-Length` body) read from `stream`; None at its
/// end.
async fn read_message(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = message.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => message.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&message[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    while message.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => message.extend_from_slice(&buf[..n]),
        }
    }
    Some(message)
}

/// The first connection's second request is taken and its connection closed; every other
/// request is answered.
fn second_request_lost(connection: usize, request: usize) -> Act {
    if connection == 0 && request == 1 {
        Act::RelayAndClose
    } else {
        Act::Relay
    }
}

/// The first connection's second request is taken, and its connection closed once the relay
/// stopped listening.
fn lost_and_gone(connection: usize, request: usize) -> Act {
    if connection == 0 && request == 1 {
        Act::RelayCloseAndStopListening
    } else {
        Act::Relay
    }
}

/// Every connection but the first closes on its first request; the first on its second.
fn always_lost(connection: usize, request: usize) -> Act {
    if (connection == 0 && request == 1) || (connection > 0 && request == 0) {
        Act::RelayAndClose
    } else {
        Act::Relay
    }
}

/// A proxy whose `/stale/` route (session required) goes through a relay to the harness's
/// verifying API, with `stale_after` as the route's `pool_stale_after`.
async fn proxy_through_relay(
    stale_after: Option<Duration>,
    script: fn(usize, usize) -> Act,
) -> (Harness, Relay) {
    let made = Arc::new(std::sync::Mutex::new(None));
    let slot = made.clone();
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |settings, api| {
            let relay = relay(api.addr, script);
            let mut spec = route("stale", "/stale/", &relay.url);
            spec.connect.pool_stale_after = stale_after;
            spec.timeout = Duration::from_secs(5);
            settings.routes.push(spec);
            *slot.lock().unwrap() = Some(relay);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let relay = made.lock().unwrap().take().unwrap();
    (h, relay)
}

/// [`proxy_through_relay`], alice logged in, one exchange on the relay's first connection
/// (`/stale/a`, answered), then a wait past 100 ms: that connection is now idle in the pool.
async fn after_a_quiet_spell(
    stale_after: Option<Duration>,
    script: fn(usize, usize) -> Act,
) -> (Harness, Relay, Login) {
    let (h, relay) = proxy_through_relay(stale_after, script).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(get(h.addr, "/stale/a", &login).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(250)).await;
    (h, relay, login)
}

/// The nonces of the requests the API saw for `path`, in order.
fn nonces_for(h: &Harness, path: &str) -> Vec<String> {
    h.upstream
        .raw
        .lock()
        .iter()
        .filter(|seen| seen.uri == path)
        .map(|seen| {
            let input = seen.headers["signature-input"].to_str().unwrap();
            let start = input.find("nonce=\"").unwrap() + 7;
            input[start..].split('"').next().unwrap().to_owned()
        })
        .collect()
}

/// `countersign_upstream_resends_total` of `upstream`, from the admin listener's `/metrics`.
async fn resends(h: &Harness, upstream: &str) -> u64 {
    gauge(
        h.admin,
        &format!("countersign_upstream_resends_total{{upstream=\"{upstream}\"}}"),
    )
    .await
}

fn verified_paths(h: &Harness) -> Vec<String> {
    h.upstream
        .verified
        .lock()
        .iter()
        .map(|seen| seen.uri.clone())
        .collect()
}

#[tokio::test]
async fn a_get_lost_with_a_stale_connection_is_signed_again_and_sent_once_more() {
    let (logs, _guard) = support_logs::capture();
    // Idle past pool_stale_after: the next request gets a spare.
    let (h, relay, login) =
        after_a_quiet_spell(Some(Duration::from_millis(100)), second_request_lost).await;
    let r = get(h.addr, "/stale/b", &login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2);
    // The API verified the lost request and the spare, both as alice: the spare carries the
    // user's identity and a valid signature of its own.
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/b", "/stale/b"]);
    assert!(h
        .upstream
        .verified
        .lock()
        .iter()
        .all(|seen| seen.identity.user.as_deref() == Some("alice")));
    // A new nonce: the lost request's was recorded by the API (it would refuse it again).
    let nonces = nonces_for(&h, "/stale/b");
    assert_eq!(nonces.len(), 2);
    assert_ne!(nonces[0], nonces[1]);
    // Counted for the operator, under the upstream's name, and logged with the request's id.
    assert_eq!(resends(&h, "stale").await, 1);
    assert_eq!(resends(&h, "api").await, 0);
    let request_id = h.upstream.raw.lock().last().unwrap().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = logs.text();
    let line = text
        .lines()
        .find(|line| line.contains("a pooled upstream connection closed without answering"))
        .unwrap_or_else(|| panic!("no resend line in {text}"));
    // The fields as the fmt subscriber writes `&str` values: quoted.
    for field in [
        format!("request_id=\"{request_id}\""),
        "upstream=\"stale\"".to_owned(),
        "method=\"GET\"".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} not in {line}");
    }
}

#[tokio::test]
async fn a_put_is_resent_with_its_body_and_digest() {
    let (h, relay, login) =
        after_a_quiet_spell(Some(Duration::from_millis(100)), second_request_lost).await;
    let body = "{\"name\":\"kept\"}";
    let r = send(
        h.addr,
        Method::PUT,
        "/stale/item",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2);
    let verified = h.upstream.verified.lock().clone();
    assert_eq!(verified.len(), 3);
    // The body went with the spare, and its Content-Digest verified.
    assert_eq!(verified[2].uri, "/stale/item");
    assert_eq!(verified[2].body, Bytes::from(body));
}

#[tokio::test]
async fn a_post_lost_with_a_stale_connection_is_a_502_and_not_resent() {
    let (h, relay, login) =
        after_a_quiet_spell(Some(Duration::from_millis(100)), second_request_lost).await;
    let r = post_json(h.addr, "/stale/pay", &login, "{\"amount\":1}").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The API acted on it once; it was not sent again.
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/pay"]);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(resends(&h, "stale").await, 0);
}

/// A GET lost with the relay's first connection, with `stale_after`: a 502, sent once.
async fn assert_lost_without_a_spare(stale_after: Option<Duration>) {
    let (h, relay, login) = after_a_quiet_spell(stale_after, second_request_lost).await;
    let r = get(h.addr, "/stale/b", &login).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/b"]);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(resends(&h, "stale").await, 0);
}

#[tokio::test]
async fn a_connection_idle_less_than_pool_stale_after_gets_no_spare() {
    assert_lost_without_a_spare(Some(Duration::from_secs(30))).await;
}

#[tokio::test]
async fn off_never_resends() {
    assert_lost_without_a_spare(None).await;
}

#[tokio::test]
async fn a_spare_lost_too_is_a_502_without_a_third_attempt() {
    let (h, relay, login) =
        after_a_quiet_spell(Some(Duration::from_millis(100)), always_lost).await;
    let r = get(h.addr, "/stale/b", &login).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/b", "/stale/b"]);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2);
    // Sent again once, and counted once.
    assert_eq!(resends(&h, "stale").await, 1);
}

#[tokio::test]
async fn a_spare_whose_connection_cannot_be_made_is_a_502_not_counted_as_sent() {
    let (logs, _guard) = support_logs::capture();
    let (h, relay, login) =
        after_a_quiet_spell(Some(Duration::from_millis(100)), lost_and_gone).await;
    let r = get(h.addr, "/stale/b", &login).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/b"]);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    // The spare was never sent: neither counted nor logged as sent again.
    assert_eq!(resends(&h, "stale").await, 0);
    let text = logs.text();
    assert!(
        !text.contains("a pooled upstream connection closed without answering"),
        "{text}"
    );
}

/// The first connection's second request is acted on by the API, and its answer starts, then
/// the connection closes.
fn second_request_half_answered(connection: usize, request: usize) -> Act {
    if connection == 0 && request == 1 {
        Act::RelayPartialAnswerAndClose
    } else {
        Act::Relay
    }
}

/// A review's repro: hyper reports an answer cut after its first bytes as it reports a
/// connection closed before any (an incomplete message), and the spare went out for both: a
/// DELETE the upstream had acted on and begun to answer was sent again and acted on twice.
/// RFC 9110 section 9.2.2 allows repeating an idempotent request after a failure "before the
/// client is able to read the server's response", no later: now the pooled connection's reads
/// are watched, and an answer begun is the upstream's failure, a 502, sent once.
#[tokio::test]
async fn a_request_whose_answer_had_begun_is_not_sent_again() {
    let (h, relay, login) = after_a_quiet_spell(
        Some(Duration::from_millis(100)),
        second_request_half_answered,
    )
    .await;
    let r = send(
        h.addr,
        Method::DELETE,
        "/stale/item/7",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/item/7"]);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(resends(&h, "stale").await, 0);
}

fn second_request_held_then_lost(connection: usize, request: usize) -> Act {
    if connection == 0 && request == 1 {
        Act::HoldThenClose
    } else {
        Act::Relay
    }
}

/// A review's repro: the spare was signed with a fresh nonce but the first request's
/// `created` (read when the browser's request began). An exchange lost after longer than the
/// API's window (here the harness's clock moves 20 s while the upstream holds the request; a
/// route's `timeout` is 30 s by default, the API's window and skew 12 s) gave a spare already
/// expired, and the browser the API's 401 `expired`. Now the spare is signed when it is sent.
#[tokio::test]
async fn a_spare_is_dated_when_it_is_sent() {
    let (h, _relay, login) = after_a_quiet_spell(
        Some(Duration::from_millis(100)),
        second_request_held_then_lost,
    )
    .await;
    let addr = h.addr;
    let pending = {
        let login = login.clone();
        tokio::spawn(async move { get(addr, "/stale/b", &login).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    let held_from = h.clock.now_unix();
    h.clock.advance(20);
    let r = pending.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the spare was refused: {}",
        r.text()
    );
    assert_eq!(resends(&h, "stale").await, 1);
    assert_eq!(verified_paths(&h), ["/stale/a", "/stale/b"]);
    // The held request never reached the API; the spare did, dated 20 s later.
    let inputs: Vec<String> = (h.upstream.raw.lock().iter())
        .filter(|seen| seen.uri == "/stale/b")
        .map(|seen| seen.headers["signature-input"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert!(
        inputs[0].contains(&format!(";created={};", held_from + 20)),
        "{inputs:?}"
    );
}

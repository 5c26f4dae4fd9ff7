//! WebSocket proxying against the session's lifetimes (src/proxy/websocket.rs): the bytes a
//! WebSocket carries keep its session's idle timer fresh (touched at each
//! `websocket_session_check` that follows them), and a session that idles out anyway (a
//! WebSocket that carries nothing) ends its WebSocket with 1008 `session_ended`, like a
//! logout does.
//!
//! Against real servers on loopback: the test harness's proxy (its manual clock drives the
//! sessions' lifetimes), a raw upstream behind the real `VerifyLayer`, a raw browser.
//!
//! Run: `cargo test --all-features --test proxy_websocket_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_ws;

use std::time::Duration;

use countersign::proxy::forward::WebSocketRoute;
use support::*;
use support_ws::*;
use tokio::io::AsyncWriteExt as _;

fn no_extensions(_: &str) -> Vec<&'static str> {
    Vec::new()
}

#[tokio::test]
async fn websocket_bytes_keep_the_session_alive_and_its_idle_expiry_closes_it() {
    // A check every 100 ms; neither the idle nor the close timeout comes into play.
    let limits = WebSocketRoute::new(Duration::from_secs(60), Duration::from_millis(100), 10);
    let (upstream, mut raw) = raw_ws_upstream(no_extensions).await;
    let h = harness_with_ws_route(upstream, limits).await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let (mut browser, head) = browser_handshake(h.addr, "/ws/raw", &login.cookie, ORIGIN).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut api = within(raw.recv()).await.expect("the upstream's end");
    let idle = IDLE.as_secs();

    // Most of the session's idle timeout later (by the session clock), a message: the checks
    // that follow touch the session then.
    h.clock.advance(idle - 100);
    browser
        .write_all(&frame(0x81, Some(KEY), b"ping"))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut api).await.payload, b"ping");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Past the idle timeout counted from the login (not from that touch): still open.
    h.clock.advance(idle - 100);
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.write_all(&frame(0x81, None, b"pong")).await.unwrap();
    let pong = read_frame(&mut browser).await;
    assert_eq!(pong.first, 0x81, "a text frame, not a Close: {pong:?}");
    assert_eq!(pong.payload, b"pong");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Silent from here: past the idle timeout from the last bytes, the session is gone and
    // the next check closes the WebSocket, 1008 `session_ended` to each side (the API's
    // masked, the proxy being the client there).
    h.clock.advance(idle + 1);
    assert_eq!(
        read_frame(&mut browser).await.close(),
        (1008, "session_ended".to_owned())
    );
    let close = read_frame(&mut api).await;
    assert!(close.masked, "{close:?}");
    assert_eq!(close.close(), (1008, "session_ended".to_owned()));
}

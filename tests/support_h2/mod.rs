//! HTTP/2 for the tests: hyper's client over a stream of the test's choosing (h2c with prior
//! knowledge on plain TCP, h2 over TLS after ALPN), and frames and HPACK written by hand
//! (RFC 9113, RFC 7541) for the tests that send what no well-behaved client library would:
//! floods, resets, oversized header blocks; [`raw::Client`] sends such frames on a connection
//! and records what the server answers.
#![allow(dead_code)]

pub mod raw;

use std::net::SocketAddr;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

/// hyper's HTTP/2 client over `io`: the handshake, then the connection driven by a task of its
/// own. The handle ends with the connection; a test that watches the proxy close it awaits it.
pub async fn client<B, IO>(io: IO) -> (SendRequest<B>, JoinHandle<hyper::Result<()>>)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    (sender, tokio::spawn(connection))
}

/// [`client`] over a new TCP connection to `addr`: h2c with prior knowledge.
pub async fn h2c<B>(addr: SocketAddr) -> SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect for h2c");
    client(stream).await.0
}

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// Frame flags: `END_STREAM` (DATA, HEADERS), `ACK` (SETTINGS, PING), `END_HEADERS`.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// RST_STREAM / GOAWAY error codes (RFC 9113 §7).
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 §6.5.2).
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// A frame: 24-bit length, type, flags, stream id (top bit clear), payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "a frame payload of {len} bytes");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1), the first byte's high bits
/// `high`.
pub fn hpack_int(out: &mut Vec<u8>, high: u8, prefix: u8, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

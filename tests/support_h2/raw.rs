//! A hand-written HTTP/2 client connection (h2c prior knowledge, or over TLS) for the tests
//! that send frames no client library would, and watch what the server answers frame by
//! frame: GOAWAYs, stream resets, PING acknowledgements, which streams were answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{
    h2_frame, ACK, DATA, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, RST_STREAM, SETTINGS,
};

/// What the client has seen of the server so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// GOAWAY error codes, in order.
    pub goaways: Vec<u32>,
    /// The server closed (or reset) the connection.
    pub closed: bool,
    /// Streams the server reset, with the code.
    pub resets: Vec<(u32, u32)>,
    /// Streams with a response HEADERS, a stream for each such frame.
    pub answered: Vec<u32>,
    /// The first byte of each stream's first response header block (where h2's encoder puts
    /// `:status`).
    pub first_header_byte: HashMap<u32, u8>,
    /// Streams whose answer ended (END_STREAM).
    pub ended: Vec<u32>,
    /// The payloads of PING ACKs.
    pub pongs: Vec<u64>,
    /// DATA payload bytes received, padding included.
    pub data_bytes: usize,
}

/// An HTTP/2 client connection: the preface and a SETTINGS frame sent; a reader task records
/// what comes back in [`Seen`] and acknowledges the server's SETTINGS; writes go through a
/// writer task, so a test can send while the server is not reading.
pub struct Client {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pub seen: Arc<parking_lot::Mutex<Seen>>,
}

impl Client {
    /// h2c to `addr`, with an empty SETTINGS; the server's PINGs are not answered.
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_with(addr, &h2_frame(SETTINGS, 0, 0, &[]), false).await
    }

    /// h2c to `addr`, with `settings` (a whole SETTINGS frame) after the preface; `pongs`:
    /// answers the server's PINGs (as browsers do; an abusive client need not).
    pub async fn connect_with(addr: SocketAddr, settings: &[u8], pongs: bool) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        // Each frame out at once: with Nagle's algorithm, a PING written just after a request
        // waits for the server's delayed ACK of it (40 ms a round trip).
        stream.set_nodelay(true).unwrap();
        Self::over(stream, settings, pongs)
    }

    /// HTTP/2 over `stream` (a TCP or TLS stream, nothing sent on it yet); the rest as
    /// [`Client::connect_with`].
    pub fn over<S>(stream: S, settings: &[u8], pongs: bool) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (out, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut first = PREFACE.to_vec();
        first.extend_from_slice(settings);
        out.send(first).unwrap();
        tokio::spawn(async move {
            while let Some(bytes) = queue.recv().await {
                // Best effort: the server may have closed.
                // Flushed: a TLS stream may keep records back until then.
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
        });
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let record = seen.clone();
        let acks = out.clone();
        tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if reader.read_exact(&mut head).await.is_err() {
                    break;
                }
                let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | head[2] as usize;
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if reader.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let code = |at: usize| {
                    payload
                        .get(at..at + 4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0)
                };
                let mut seen = record.lock();
                match head[3] {
                    SETTINGS if head[4] & ACK == 0 => {
                        let _ = acks.send(h2_frame(SETTINGS, ACK, 0, &[]));
                    }
                    GOAWAY => seen.goaways.push(code(4)),
                    RST_STREAM => seen.resets.push((id, code(0))),
                    PING if head[4] & ACK == 0 && pongs => {
                        let _ = acks.send(h2_frame(PING, ACK, 0, &payload));
                    }
                    PING if head[4] & ACK != 0 && len == 8 => seen
                        .pongs
                        .push(u64::from_be_bytes(payload[..8].try_into().unwrap())),
                    HEADERS => {
                        seen.answered.push(id);
                        seen.first_header_byte
                            .entry(id)
                            .or_insert(payload.first().copied().unwrap_or(0));
                    }
                    DATA => seen.data_bytes += len,
                    _ => {}
                }
                if matches!(head[3], HEADERS | DATA) && head[4] & END_STREAM != 0 {
                    seen.ended.push(id);
                }
            }
            record.lock().closed = true;
        });
        Client { out, seen }
    }

    pub fn send(&self, bytes: Vec<u8>) {
        // The writer task ends when the server closes: then nothing more is sent.
        let _ = self.out.send(bytes);
    }

    pub fn closed(&self) -> bool {
        self.seen.lock().closed
    }

    /// Waits until `done` holds or the server closes; false when `limit` passed first.
    pub async fn wait(&self, limit: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            {
                let seen = self.seen.lock();
                if done(&seen) || seen.closed {
                    return done(&seen);
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends a PING with payload `n` and waits (at most `limit`) for its ACK: the server has
    /// read every frame sent before it. False if the connection closed first.
    pub async fn round_trip(&self, n: u64, limit: Duration) -> bool {
        self.send(h2_frame(PING, 0, 0, &n.to_be_bytes()));
        self.wait(limit, |seen| seen.pongs.contains(&n)).await
    }
}

//! A loopback TCP forwarder in front of a real server, for tests of what a client does when
//! the path to its server misbehaves: a reply lost after the command ran, a connection that
//! goes silent without closing, or a server that seems to be another (its replies rewritten).
//! Each connection asks a policy of its own what to do with each chunk the client sends, and
//! may rewrite each chunk the server sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What happens to one chunk a client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkFate {
    /// Sent on to the server; its answers are relayed.
    Forward,
    /// Dropped: nothing reaches the server, nothing is closed (a path gone dead).
    Swallow,
    /// Sent on to the server, then the connection is cut before any answer reaches the
    /// client (the command ran; its reply is lost with the connection).
    ForwardThenCut,
}

/// A forwarder listening on a loopback port; it runs until the test's runtime ends.
pub struct TcpForwarder {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl TcpForwarder {
    /// Forwards every connection to `target`. `new_connection` is called once per accepted
    /// connection, at accept time, and returns that connection's policy for its chunks.
    pub async fn start<P, C>(target: SocketAddr, new_connection: P) -> TcpForwarder
    where
        P: Fn() -> C + Send + 'static,
        C: FnMut(&[u8]) -> ChunkFate + Send + 'static,
    {
        Self::start_rewriting(target, move || (new_connection(), |_: &mut [u8]| {})).await
    }

    /// [`start`](Self::start), with a rewrite of what the server sends: `new_connection`
    /// returns, with the policy for the client's chunks, a function that may change each chunk
    /// the server sends (in place, so the client gets as many bytes as the server sent).
    pub async fn start_rewriting<P, C, R>(target: SocketAddr, new_connection: P) -> TcpForwarder
    where
        P: Fn() -> (C, R) + Send + 'static,
        C: FnMut(&[u8]) -> ChunkFate + Send + 'static,
        R: FnMut(&mut [u8]) + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (fate_of, rewrite) = new_connection();
                tokio::spawn(forward(client, target, fate_of, rewrite));
            }
        });
        TcpForwarder { addr, accepted }
    }

    /// How many connections it accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mut fate_of: impl FnMut(&[u8]) -> ChunkFate,
    mut rewrite: impl FnMut(&mut [u8]),
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let cut = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            match fate_of(chunk) {
                ChunkFate::Swallow => continue,
                ChunkFate::Forward => {}
                // Marked before the server can answer, so its reply is never relayed.
                ChunkFate::ForwardThenCut => cut.store(true, Ordering::SeqCst),
            }
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) {
                // The server ran the command and answered: the answer is lost with the
                // connection.
                return;
            }
            rewrite(&mut buf[..n]);
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    // Both sockets are dropped here: the client sees its connection closed.
}

/// Whether `chunk` holds `command` (a RESP fragment such as `b"$3\r\nSET\r\n"`).
pub fn holds(chunk: &[u8], command: &[u8]) -> bool {
    chunk.windows(command.len()).any(|w| w == command)
}

/// A [`TcpForwarder`] that, once armed, cuts the connection carrying the next chunk that holds
/// `command` (a RESP fragment such as `b"$3\r\nSET\r\n"`) after the server has it, before its
/// reply reaches the client: a reply lost with its connection. Later connections forward as
/// usual.
pub struct ReplyCutter {
    pub forwarder: TcpForwarder,
    armed: Arc<AtomicBool>,
}

impl ReplyCutter {
    pub async fn start(target: SocketAddr, command: &'static [u8]) -> ReplyCutter {
        let armed = Arc::new(AtomicBool::new(false));
        let arm = armed.clone();
        let forwarder = TcpForwarder::start(target, move || {
            let arm = arm.clone();
            move |chunk: &[u8]| {
                if holds(chunk, command) && arm.swap(false, Ordering::SeqCst) {
                    ChunkFate::ForwardThenCut
                } else {
                    ChunkFate::Forward
                }
            }
        })
        .await;
        ReplyCutter { forwarder, armed }
    }

    /// The next chunk holding the command is the one whose reply is lost.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections the forwarder accepted so far.
    pub fn connections(&self) -> u64 {
        self.forwarder.connections()
    }
}

/// A [`TcpForwarder`] that, while rewriting, changes every `pattern` in what the server sends
/// into `replacement` (same length, so the RESP framing holds), on every connection, those
/// already open included: e.g. the version in `HELLO` replies, so that the server seems to be
/// another. Each connection remembers the last bytes it relayed, so a pattern split across two
/// reads is rewritten all the same: the two differ only in their last byte, which is in the read
/// that completes the pattern (the bytes before it may already be with the client).
pub struct ReplyRewriter {
    pub forwarder: TcpForwarder,
    rewriting: Arc<AtomicBool>,
}

impl ReplyRewriter {
    pub async fn start(target: SocketAddr, pattern: &[u8], replacement: &[u8]) -> ReplyRewriter {
        let last = pattern.len() - 1;
        assert!(
            replacement.len() == pattern.len()
                && pattern[..last] == replacement[..last]
                && pattern[last] != replacement[last],
            "the replacement must differ from the pattern in its last byte only"
        );
        let (pattern, new_last) = (Arc::<[u8]>::from(pattern), replacement[last]);
        let rewriting = Arc::new(AtomicBool::new(false));
        let on = rewriting.clone();
        let forwarder = TcpForwarder::start_rewriting(target, move || {
            let on = on.clone();
            let pattern = pattern.clone();
            // The stream's last `pattern.len() - 1` bytes relayed before this read.
            let mut before: Vec<u8> = Vec::with_capacity(last);
            let rewrite = move |chunk: &mut [u8]| {
                let mut seen = before.clone();
                seen.extend_from_slice(chunk);
                if on.load(Ordering::SeqCst) {
                    // Every match ends in this chunk (`before` is shorter than the pattern).
                    for end in (pattern.len()..=seen.len())
                        .filter(|&end| seen[end - pattern.len()..end] == *pattern)
                    {
                        chunk[end - 1 - before.len()] = new_last;
                    }
                }
                before = seen[seen.len().saturating_sub(last)..].to_vec();
            };
            (|_: &[u8]| ChunkFate::Forward, rewrite)
        })
        .await;
        ReplyRewriter {
            forwarder,
            rewriting,
        }
    }

    /// Whether the replies relayed from now on are rewritten.
    pub fn rewrite(&self, on: bool) {
        self.rewriting.store(on, Ordering::SeqCst);
    }

    /// How many connections the forwarder accepted so far.
    pub fn connections(&self) -> u64 {
        self.forwarder.connections()
    }
}

//! A Redis connection that goes silent without being closed (the host vanished, a failover put
//! another server behind the same address, a firewall dropped the flow): TCP keeps such a
//! connection for many minutes, so before, every later call timed out on it until the kernel
//! gave up. Now a call that times out drops the connection and the next call connects anew.
//! Between the client and a real `redis-server` sits a forwarder that can freeze every
//! connection open so far (nothing forwarded, nothing closed) while forwarding new ones.
//! Run: `cargo test --all-features --test redis_blackhole`.
#![cfg(feature = "redis")]

mod support_redis;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
};
use support_redis::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const NOW: u64 = 1_000_000;
/// Also the budget of every call that is answered (through the forwarder, on a machine that
/// may be busy): not too short.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Forwards loopback connections to `target`; [`Forwarder::freeze`] silences every
/// connection accepted so far, for good, without closing it.
struct Forwarder {
    addr: SocketAddr,
    /// Connections with a number below this are frozen.
    frozen_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (frozen, count) = (frozen_below.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = pump(&mut client_read, &mut server_write, number, &frozen);
                    let down = pump(&mut server_read, &mut client_write, number, &frozen);
                    tokio::join!(up, down);
                    // Frozen: keep both sockets open and silent until the test ends.
                    std::future::pending::<()>().await;
                });
            }
        });
        Forwarder {
            addr,
            frozen_below,
            accepted,
        }
    }

    fn freeze_existing(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either closes or connection `number` is frozen (then returns,
/// leaving both open; bytes read after the freeze are dropped, as a dead path drops them).
async fn pump<R, W>(from: &mut R, to: &mut W, number: u64, frozen_below: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if number < frozen_below.load(Ordering::SeqCst) {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_replaced_after_one_timed_out_call() {
    let server = RedisServer::start();
    let forwarder = Forwarder::start(server.addr()).await;
    let connection = RedisConnection::with_options(
        &format!("redis://{}/0", forwarder.addr),
        RedisOptions {
            op_timeout: OP_TIMEOUT,
            connect_timeout: Duration::from_secs(2),
            ping_timeout: Duration::from_millis(300),
        },
    )
    .unwrap();
    let cache = RedisReplayCache::new(connection, "blackhole:");
    assert_eq!(
        cache.check_and_record("before", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(forwarder.connections(), 1);

    // The path goes silent: the call in flight gets no answer and times out.
    forwarder.freeze_existing();
    let started = Instant::now();
    assert!(cache
        .check_and_record("during", NOW + 10, NOW)
        .await
        .is_err());
    assert!(started.elapsed() >= OP_TIMEOUT - Duration::from_millis(20));

    // The next call does not wait on the dead connection: it connects anew and is answered,
    // and the nonce it records is shared state in the real Redis.
    assert_eq!(
        cache.check_and_record("after", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(forwarder.connections(), 2, "one new connection");
    assert_eq!(
        cache.check_and_record("after", NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert_eq!(forwarder.connections(), 2, "and it is kept");
    assert_eq!(server.cli(&["EXISTS", "blackhole:after"]).trim(), "1");
}

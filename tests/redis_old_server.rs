//! A Redis older than 7.0 behind the replay cache. Its `SET .. NX GET` (the cache's one call
//! per nonce, since the check writes a token of its own) is a syntax error there, as is the
//! login throttle's `EXPIRE .. NX`; `PING` still answers. The refusal names the version needed,
//! and readiness says not ready with the server's version, instead of a ready process that
//! answers every signed request 503 with "syntax error".
//!
//! The server is a small RESP speaker on loopback that answers as Redis 6.2 does: `PONG`,
//! `HELLO` with `version 6.2.14`, `INFO memory` with `noeviction`, and `-ERR syntax error` to
//! a `SET` with both `NX` and `GET`: a server whose every answer the test controls. Real Redis
//! 5.0.6 and 6.2.14 servers (built by scripts/old-redis.sh; Debian packages only the current
//! Redis) are in tests/redis_old_versions.rs.
//! Run: `cargo test --all-features --test redis_old_server`.
#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::time::Duration;

use countersign::replay::{RedisConnection, RedisOptions, RedisReplayCache, ReplayCache};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const NOW: u64 = 1_000_000;

/// The arguments of every whole RESP command at the start of `buffer`, and how many bytes
/// they took (a command cut short stays in the buffer).
fn commands(buffer: &[u8]) -> (Vec<Vec<Vec<u8>>>, usize) {
    fn line(buffer: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = at + buffer.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&buffer[at..end], end + 2))
    }
    let mut out = Vec::new();
    let mut at = 0;
    'commands: while at < buffer.len() {
        let Some((head, mut next)) = line(buffer, at) else {
            break;
        };
        let count: usize = std::str::from_utf8(&head[1..]).unwrap().parse().unwrap();
        let mut args = Vec::new();
        for _ in 0..count {
            let Some((len, after)) = line(buffer, next) else {
                break 'commands;
            };
            let len: usize = std::str::from_utf8(&len[1..]).unwrap().parse().unwrap();
            if buffer.len() < after + len + 2 {
                break 'commands;
            }
            args.push(buffer[after..after + len].to_vec());
            next = after + len + 2;
        }
        out.push(args);
        at = next;
    }
    (out, at)
}

/// What Redis 6.2 answers to `args`.
fn answer(args: &[Vec<u8>]) -> Vec<u8> {
    let upper = |arg: &Vec<u8>| arg.to_ascii_uppercase();
    match upper(&args[0]).as_slice() {
        b"PING" => b"+PONG\r\n".to_vec(),
        b"HELLO" => b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n6.2.14\r\n\
                     $4\r\nrole\r\n$6\r\nmaster\r\n"
            .to_vec(),
        b"INFO" => {
            let text = "# Memory\r\nmaxmemory_policy:noeviction\r\n";
            format!("${}\r\n{text}\r\n", text.len()).into_bytes()
        }
        b"SET"
            if args.iter().any(|a| upper(a) == b"NX")
                && args.iter().any(|a| upper(a) == b"GET") =>
        {
            b"-ERR syntax error\r\n".to_vec()
        }
        _ => b"+OK\r\n".to_vec(),
    }
}

/// The Redis 6.2 stand-in on a loopback port.
async fn start_old_redis() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tcp.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let (whole, used) = commands(&buffer);
                    buffer.drain(..used);
                    for args in whole {
                        if tcp.write_all(&answer(&args)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_before_7_is_named_by_the_refusal_and_by_readiness() {
    let addr = start_old_redis().await;
    let options = RedisOptions {
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ping_timeout: Duration::from_secs(2),
    };
    let connection = RedisConnection::with_options(&format!("redis://{addr}/0"), options).unwrap();
    let cache = RedisReplayCache::new(connection, "old:");

    let error = cache
        .check_and_record("n-1", NOW + 10, NOW)
        .await
        .unwrap_err();
    assert_eq!(error.reason().as_str(), "replay_cache_unavailable");
    assert!(
        error.detail().contains("syntax error")
            && error.detail().contains("needs Redis 7.0 or later"),
        "{error}"
    );

    assert!(!cache.ready().await, "ready on Redis 6.2");
    let why = cache
        .connection()
        .readiness()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        why.contains("Redis 6.2") && why.contains("7.0 or later"),
        "{why}"
    );
}

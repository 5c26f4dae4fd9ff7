//! Free loopback ports for a server a test starts in another process (a proxy, `redis-server`),
//! which binds the port itself a moment later ([`free_port`]), and a port where connections are
//! refused ([`refusing_addr`]). Std and tokio only, so any test file can use it
//! (`mod support_ports;`); tests/support and tests/support_redis include it and export both.
//!
//! A port is only known to be free when it is chosen, so the choice keeps away from whatever
//! else binds ports on this machine meanwhile. The kernel's own choice (binding port 0) falls
//! in its ephemeral range (`net.ipv4.ip_local_port_range`, 32768–60999 by default), the same
//! range every test listener bound to port 0 and every outgoing connection draws from, so a
//! port it hands out and the test releases could be taken by one of those before the server
//! binds it. These ports are chosen below that range instead, where neither ever lands: only
//! another caller of this module could take one, and callers in one process go through the
//! ports one after another from a random start.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The lowest port chosen: above the registered ports that services on a developer's machine
/// commonly hold.
const LOWEST: u32 = 10_000;

/// A loopback port that nothing holds now, outside the kernel's ephemeral range (see the
/// module's comment). Where that range leaves too little room below it, the kernel's choice.
pub fn free_port() -> u16 {
    let Some((start, span)) = range() else {
        return kernels_choice();
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static OFFSET: OnceLock<u32> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| random_u32() % span);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = start + (offset + n) % span;
        // `std`'s bind sets `SO_REUSEADDR`, as the servers do: a port with connections left
        // in TIME_WAIT counts as free, a port anything is bound to does not.
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    kernels_choice()
}

/// The ports below the ephemeral range, as (first, how many); none if fewer than 1,000.
fn range() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_start: u32 = text.split_whitespace().next()?.parse().ok()?;
    let span = ephemeral_start.checked_sub(LOWEST)?;
    (span >= 1_000).then_some((LOWEST, span))
}

/// A loopback address that refuses connections for as long as the returned socket lives:
/// bound, never listening. (A port bound and released, as [`free_port`] gives, may be taken by
/// another test meanwhile and then answer.)
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a loopback port");
    let addr = socket.local_addr().expect("the bound address");
    (socket, addr)
}

fn kernels_choice() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Random bits from std's per-process hash keys.
fn random_u32() -> u32 {
    RandomState::new().build_hasher().finish() as u32
}

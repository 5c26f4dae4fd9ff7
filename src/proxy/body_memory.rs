//! One cap on the memory every request body being read (or held for signing) takes at once,
//! across every connection and event loop: `server.max_body_memory`; and the most of it one
//! client may hold: `server.max_body_memory_per_client`.
//!
//! Why: the proxy reads a request's body whole before it signs it (the signature covers its
//! digest), so each request in flight may hold up to its route's `max_body`. Each route's
//! limit bounds one request; nothing bounded their sum. One HTTP/2 connection may have
//! `http2_max_concurrent_streams` (256) requests in flight, so one client with a session, or
//! with an `Origin` on a public route that takes writes, could make the proxy hold 256 ×
//! `max_body` (256 MiB by default) and a few such connections exhaust the memory limit its
//! deployment runs under. With the cap, a body that would take the proxy's bodies past it
//! is refused at once with 503 `body_memory_limit` (`Retry-After: 1`), before more of it is
//! read; a request whose `Content-Length` says up front that it cannot fit is refused before
//! any byte of it is read.
//!
//! The cap alone let one client hold all of it: a signed-in user with one HTTP/2 connection
//! of slow uploads, or one address posting to a public route, and every other user's bodies
//! were refused 503 until it let go. So a client may hold at most
//! `server.max_body_memory_per_client` of it ([`ClientBodyMemory`]); a body that would take
//! its client past that is refused the same way, with 429 `client_body_memory_limit`
//! (`Retry-After: 1`): it is the client's own doing. A client ([`ClientKey`]) is the session's
//! user on the routes that require one (every session and connection of the user together),
//! and the client address (after `server.trusted_proxies`) on public routes and for the login
//! body. When both limits would refuse a body, the per-client refusal is the answer.
//!
//! A request takes its share as its bytes arrive (its whole `Content-Length` at once when it
//! declares one, so a refusal comes before the read, not after most of it), and gives it back
//! when the proxy is done with the request: after its forward (or the login check) ends, or
//! when the request is dropped mid-body. Bodiless requests (most GETs) never touch either.
//! A lower limit on reload revokes nothing: bodies being read keep their share, and new ones
//! are refused until enough is given back.
//!
//! The cap's accounting is the library's (`src/layer/body_memory.rs`), which the
//! `VerifyLayer`'s own cap uses too: the library builds without the proxy, so the proxy takes
//! it from there. The per-client table is the proxy's alone (here): a [`RequestBodyShare`]
//! takes from the client's entry and from the library's cap together.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use compact_str::CompactString;
use parking_lot::Mutex;

use crate::layer::body_memory::Cover;
use crate::layer::PacedLog;

pub use crate::layer::body_memory::{BodyMemory, BodyShare};

/// The setting the proxy's cap is: [`BodyMemory::new`]'s `setting`, named in the warning about
/// refusals.
pub const SETTING: &str = "server.max_body_memory";

/// The setting of the most of the cap one client may hold ([`ClientBodyMemory`]), named in
/// the warning about its refusals.
pub const PER_CLIENT_SETTING: &str = "server.max_body_memory_per_client";

/// Who a body's bytes count against under `server.max_body_memory_per_client`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The session's user, on a route that requires a session: all of the user's sessions
    /// and connections together. A [`CompactString`]: a name up to 24 bytes costs no
    /// allocation.
    User(CompactString),
    /// The client address (after `server.trusted_proxies`): public routes and the login.
    /// Made by [`ClientKey::address`], which counts an IPv6 address by its /64.
    Address(IpAddr),
}

impl ClientKey {
    /// The client at `ip`, counted as the login throttle counts addresses: IPv4 as it is (an
    /// IPv4-mapped IPv6 address as its IPv4 address), IPv6 by its /64 prefix (one client
    /// usually holds a whole /64, and could otherwise take one share per address in it).
    pub fn address(ip: IpAddr) -> ClientKey {
        ClientKey::Address(match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !(u128::from(u64::MAX))).into()),
            },
        })
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::User(user) => write!(f, "user {user:?}"),
            ClientKey::Address(ip) => write!(f, "address {ip}"),
        }
    }
}

/// The bytes each client holds of the cap now, and the most one may hold
/// (`server.max_body_memory_per_client`); shared by every event loop, its limit changed by a
/// reload ([`ClientBodyMemory::set_limit`]).
///
/// A table of the clients holding bytes now, not of every client seen: an entry is made when
/// a client's first body takes bytes and removed when its last gives them back, so the table
/// is as large as the clients with bodies in flight (bounded by the cap). One lock, held for
/// one lookup when a body takes more and when its share is dropped; bodiless requests never
/// take it.
pub struct ClientBodyMemory {
    /// Bytes; [`usize::MAX`]: off.
    limit: AtomicUsize,
    held: Mutex<HashMap<ClientKey, usize>>,
    /// Bodies refused for taking their client past its limit (the proxy's `/metrics`).
    refused: AtomicU64,
    /// Paces the warning about them.
    refusal_log: PacedLog,
}

impl fmt::Debug for ClientBodyMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBodyMemory")
            .field("limit", &self.limit())
            .field("clients", &self.clients())
            .field("refused", &self.refused.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// Shrinks the table's allocation back when a burst of clients has gone: above this many
/// slots, and when fewer than an eighth are used.
const SHRINK_ABOVE: usize = 1024;

impl ClientBodyMemory {
    /// A table with no client in it; `limit` None: off (no client is counted).
    pub fn new(limit: Option<usize>) -> ClientBodyMemory {
        ClientBodyMemory {
            limit: limit.unwrap_or(usize::MAX).into(),
            held: Mutex::new(HashMap::new()),
            refused: 0.into(),
            refusal_log: PacedLog::new(),
        }
    }

    /// A reload's `server.max_body_memory_per_client` (None: off). A lower limit revokes
    /// nothing held: a client's new bodies wait until enough is given back.
    pub fn set_limit(&self, limit: Option<usize>) {
        self.limit.store(limit.unwrap_or(usize::MAX), Relaxed);
    }

    /// The limit now; None: off.
    pub fn limit(&self) -> Option<usize> {
        Some(self.limit.load(Relaxed)).filter(|&limit| limit != usize::MAX)
    }

    /// How many clients hold bytes now (the table's size: tests, `Debug`).
    pub fn clients(&self) -> usize {
        self.held.lock().len()
    }

    /// The bytes `client` holds now (tests).
    pub fn held_by(&self, client: &ClientKey) -> usize {
        self.held.lock().get(client).copied().unwrap_or(0)
    }

    /// Bodies refused so far for taking their client past its limit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Takes `more` bytes for `client` if what it holds stays within `limit`.
    fn take(&self, client: &ClientKey, more: usize, limit: usize) -> bool {
        let mut held = self.held.lock();
        // The client's own entry by reference: no key made (nor copied) when it holds bytes
        // already, as a chunked body's every frame after the first does.
        if let Some(bytes) = held.get_mut(client) {
            return match bytes.checked_add(more).filter(|&total| total <= limit) {
                Some(total) => {
                    *bytes = total;
                    true
                }
                None => false,
            };
        }
        if more > limit {
            return false;
        }
        held.insert(client.clone(), more);
        true
    }

    /// Gives back `bytes` of `client`'s; its entry goes when it holds nothing.
    fn give_back(&self, client: &ClientKey, bytes: usize) {
        let mut held = self.held.lock();
        let Some(entry) = held.get_mut(client) else {
            return;
        };
        *entry = entry.saturating_sub(bytes);
        if *entry == 0 {
            held.remove(client);
            if held.capacity() > SHRINK_ABOVE && held.len() < held.capacity() / 8 {
                let keep = held.len() * 2;
                held.shrink_to(keep);
            }
        }
    }

    /// Counts a refusal; logs it (paced: one line per 10 s, naming how many went unlogged).
    /// The client is named (a user name, as the access line names it, or an address): never
    /// a session id or a cookie.
    fn refuse(&self, client: &ClientKey, wanted: usize, limit: usize) {
        self.refused.fetch_add(1, Relaxed);
        if let Some(unlogged) = self.refusal_log.turn() {
            tracing::warn!(
                client = %client,
                wanted,
                held = self.held_by(client),
                limit,
                refused_since_last_line = unlogged,
                "a request body would take its client past {PER_CLIENT_SETTING}: answered 429 \
                 client_body_memory_limit (one client is reading more bodies at once than its \
                 share of server.max_body_memory)"
            );
        }
    }

    /// `countersign_body_memory_per_client_limit_bytes` (0: off),
    /// `countersign_body_memory_clients` and `countersign_body_memory_client_refused_total`.
    /// No gauge per client: its label set would be every client.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "# HELP countersign_body_memory_per_client_limit_bytes \
             server.max_body_memory_per_client now (0: off; a reload may change it).\n\
             # TYPE countersign_body_memory_per_client_limit_bytes gauge\n\
             countersign_body_memory_per_client_limit_bytes {}\n\
             # HELP countersign_body_memory_clients Clients (users, addresses) holding bytes \
             of server.max_body_memory now.\n\
             # TYPE countersign_body_memory_clients gauge\n\
             countersign_body_memory_clients {}\n\
             # HELP countersign_body_memory_client_refused_total Requests answered 429 \
             client_body_memory_limit: their body would take their client (user or address) \
             past server.max_body_memory_per_client.\n\
             # TYPE countersign_body_memory_client_refused_total counter\n\
             countersign_body_memory_client_refused_total {}\n",
            self.limit().unwrap_or(0),
            self.clients(),
            self.refused.load(Relaxed),
        );
    }

    /// An empty share for one request of `client`, of both `memory` (the cap) and this table,
    /// given back whole when it is dropped.
    pub fn share<'a>(&'a self, memory: &'a BodyMemory, client: ClientKey) -> RequestBodyShare<'a> {
        RequestBodyShare {
            memory: memory.share(),
            clients: self,
            client,
            client_bytes: 0,
            refused_by_client: false,
        }
    }
}

/// One request's part of the cap ([`BodyMemory`]) and of its client's share
/// ([`ClientBodyMemory`]): grows as its body arrives, taking from both together, and gives
/// both back when dropped (once: when the proxy is done with the request, or when the request
/// is dropped mid-body).
#[derive(Debug)]
pub struct RequestBodyShare<'a> {
    memory: BodyShare<'a>,
    clients: &'a ClientBodyMemory,
    client: ClientKey,
    /// What this request holds in its client's entry: its body's bytes taken while the
    /// per-client limit was on (all of them unless a reload turned it on mid-body).
    client_bytes: usize,
    /// Whether the last growth refused was the client's limit's doing, not the cap's.
    refused_by_client: bool,
}

impl RequestBodyShare<'_> {
    /// Makes the share at least `total` bytes, of the client's share and of the cap; false
    /// (counted, and the share as it was) when the rest does not fit in one of them. The
    /// client's limit is asked first: when both would refuse, the refusal is the client's
    /// ([`Self::refused_by_client`]).
    pub(crate) fn cover(&mut self, total: usize) -> bool {
        self.refused_by_client = false;
        let limit = self.clients.limit.load(Relaxed);
        let more = total.saturating_sub(self.client_bytes);
        let counted = limit != usize::MAX && more > 0;
        if counted && !self.clients.take(&self.client, more, limit) {
            self.clients.refuse(&self.client, total, limit);
            self.refused_by_client = true;
            return false;
        }
        if !self.memory.cover(total) {
            if counted {
                self.clients.give_back(&self.client, more);
            }
            return false;
        }
        if counted {
            self.client_bytes = total;
        }
        true
    }

    /// Whether the last refused [`cover`](Self::cover) was refused by the client's limit
    /// (429 `client_body_memory_limit`) rather than the cap (503 `body_memory_limit`).
    pub(crate) fn refused_by_client(&self) -> bool {
        self.refused_by_client
    }
}

impl Cover for RequestBodyShare<'_> {
    fn cover(&mut self, total: usize) -> bool {
        RequestBodyShare::cover(self, total)
    }
}

impl Drop for RequestBodyShare<'_> {
    fn drop(&mut self) {
        // The cap's part is given back by `memory`'s own drop.
        if self.client_bytes > 0 {
            self.clients.give_back(&self.client, self.client_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> ClientKey {
        ClientKey::User(name.into())
    }

    /// A client's bodies add up to its limit and no further, beside other clients' bodies
    /// that still fit in the cap; what a dropped share held is free again, in both, and the
    /// client's entry goes when it holds nothing.
    #[test]
    fn a_client_holds_at_most_its_limit_and_entries_go_when_empty() {
        let memory = BodyMemory::new(100, SETTING);
        let clients = ClientBodyMemory::new(Some(40));
        let mut a1 = clients.share(&memory, user("a"));
        assert!(a1.cover(30));
        let mut a2 = clients.share(&memory, user("a"));
        assert!(!a2.cover(11), "30 + 11 is over a's 40");
        assert!(a2.refused_by_client());
        assert!(a2.cover(10));
        let mut b = clients.share(&memory, ClientKey::Address([127, 0, 0, 2].into()));
        assert!(b.cover(40));
        assert_eq!(memory.usage().held, 80);
        assert_eq!(clients.clients(), 2);
        assert_eq!(clients.held_by(&user("a")), 40);
        drop(a1);
        assert_eq!(clients.held_by(&user("a")), 10);
        drop(a2);
        drop(b);
        assert_eq!(
            clients.clients(),
            0,
            "no entry for a client holding nothing"
        );
        assert_eq!(memory.usage().held, 0);
        assert_eq!(clients.refused(), 1);
        assert_eq!(memory.usage().refused, 0, "the cap refused nothing");
    }

    /// When the cap refuses, the client's part taken for it is given back; when both would
    /// refuse, the refusal is the client's (and the cap counts none).
    #[test]
    fn the_cap_refusing_gives_back_the_clients_part() {
        let memory = BodyMemory::new(50, SETTING);
        let clients = ClientBodyMemory::new(Some(40));
        let mut other = clients.share(&memory, user("other"));
        assert!(other.cover(30));
        let mut a = clients.share(&memory, user("a"));
        assert!(!a.cover(21), "30 + 21 is over the cap");
        assert!(!a.refused_by_client());
        assert_eq!(clients.held_by(&user("a")), 0);
        assert_eq!(clients.clients(), 1);
        assert!(!a.cover(41), "over both: the client's refusal");
        assert!(a.refused_by_client());
        assert_eq!(memory.usage().refused, 1);
        assert_eq!(clients.refused(), 1);
    }

    /// Off: no client is counted (the table stays empty); turned on mid-body, the next growth
    /// counts the whole body, and exactly that is given back.
    #[test]
    fn off_counts_nobody_and_a_reload_applies_to_the_next_growth() {
        let memory = BodyMemory::new(100, SETTING);
        let clients = ClientBodyMemory::new(None);
        let mut a = clients.share(&memory, user("a"));
        assert!(a.cover(60));
        assert_eq!(clients.clients(), 0);
        clients.set_limit(Some(50));
        assert!(!a.cover(70), "70 is over a's 50");
        assert!(a.refused_by_client());
        clients.set_limit(Some(80));
        assert!(a.cover(70));
        assert_eq!(clients.held_by(&user("a")), 70);
        drop(a);
        assert_eq!(clients.clients(), 0);
        assert_eq!(memory.usage().held, 0);
    }

    /// An IPv6 client is its /64; an IPv4-mapped address is its IPv4 address.
    #[test]
    fn an_address_is_counted_as_the_throttle_counts_it() {
        let v6 = |text: &str| ClientKey::address(text.parse().unwrap());
        assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::7"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_eq!(
            v6("::ffff:192.0.2.7"),
            ClientKey::Address([192, 0, 2, 7].into())
        );
        assert_eq!(v6("192.0.2.7"), ClientKey::Address([192, 0, 2, 7].into()));
    }

    /// Many clients come and go: the table keeps none of them, and its allocation shrinks
    /// back after a burst.
    #[test]
    fn the_table_does_not_grow_with_every_client_seen() {
        let memory = BodyMemory::new(usize::MAX / 2, SETTING);
        let clients = ClientBodyMemory::new(Some(10));
        let shares: Vec<_> = (0..5000u32)
            .map(|i| {
                let mut share =
                    clients.share(&memory, ClientKey::Address(IpAddr::from(i.to_be_bytes())));
                assert!(share.cover(1));
                share
            })
            .collect();
        assert_eq!(clients.clients(), 5000);
        drop(shares);
        assert_eq!(clients.clients(), 0);
        assert!(
            clients.held.lock().capacity() <= SHRINK_ABOVE,
            "shrunk after the burst"
        );
    }
}

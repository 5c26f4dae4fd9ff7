//! Findings of an adversarial review of the session stores (src/proxy/session.rs and
//! src/proxy/session_redis.rs), each test written to fail before its fix. Redis tests run
//! against a real `redis-server` (tests/support_redis).
//! Run: `cargo test --all-features --test session_review`.
#![cfg(feature = "proxy")]

mod support_redis;

use std::time::Duration;

use countersign::proxy::session::{SessionStore, SessionTimeouts};
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::{RedisConnection, RedisOptions};
use countersign::Identity;
use support_redis::RedisServer;

const T0: u64 = 1_700_000_000;
const IDLE: u64 = 60;
const ABSOLUTE: u64 = 300;

fn timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: Duration::from_secs(IDLE),
        absolute: Duration::from_secs(ABSOLUTE),
    }
}

fn connection(server: &RedisServer) -> RedisConnection {
    RedisConnection::with_options(
        &server.url(),
        RedisOptions {
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(1000),
            ping_timeout: Duration::from_millis(300),
        },
    )
    .expect("redis connection")
}

/// One proxy of a fleet: its own connection, `max_sessions` across the fleet.
fn redis_proxy(server: &RedisServer, max_sessions: usize) -> RedisSessionStore {
    RedisSessionStore::new(connection(server), "cs:", timeouts(), max_sessions)
        .touch_interval(Duration::ZERO)
}

fn ident(user: &str) -> Identity {
    Identity::new(user, ["r"])
}

/// The fleet-wide count index (`P sessions`) drops the entries whose score (expiry, by the
/// proxies' clocks) has passed: a proxy whose clock is ahead (a forward step, a VM resumed
/// with a stale clock corrected the wrong way, plain skew at a second's boundary) prunes the
/// entries of sessions that are still live for the others. The touch then moved the entry
/// with `ZADD .. XX`, which adds nothing when the entry is gone, so a session kept in use was
/// never counted again: `max_sessions` no longer bounded the fleet (and the active-sessions
/// gauge under-reported) for as long as such sessions were used, up to the absolute timeout.
/// A touch only writes a record that still exists (`SET .. XX`), so it may put the entry back.
#[tokio::test]
async fn a_session_in_use_is_counted_again_after_a_prune_by_a_clock_ahead() {
    let server = RedisServer::start();
    let proxy = redis_proxy(&server, 1);
    let clock_ahead = redis_proxy(&server, 1);
    let (id, _) = proxy.create(&ident("alice"), T0).await.unwrap();
    assert_eq!(proxy.count().await.unwrap(), 1);
    // The other proxy's clock is two minutes ahead: its pruner drops the live session's entry.
    assert_eq!(clock_ahead.prune(T0 + 120).await.unwrap(), 1);
    // The session is in use (and written) on the proxy with the right clock.
    for t in [T0 + 10, T0 + 20] {
        assert!(proxy.get(&id, t, true).await.unwrap().is_some());
    }
    assert_eq!(
        proxy.count().await.unwrap(),
        1,
        "a live session in use is not counted"
    );
    let second = proxy.create(&ident("bob"), T0 + 21).await;
    assert!(
        second.is_err(),
        "max_sessions = 1 with a live session, yet a second login was admitted"
    );
}

/// A login that finds the memory store full reclaims the places of expired sessions first
/// (tests/session_store.rs `capacity_suite`: "their room is reclaimed even before a sweep"),
/// at most once per second. That "once per second" was `last_reclaim.fetch_max(now) < now`:
/// after the clock stepped back (an NTP step correcting a clock that ran ahead, a VM restored)
/// the second of the last reclaim stayed in the future, so for as long as the step (an hour
/// here) a full store never reclaimed at login, and logins answered 503 although expired
/// sessions held the places, until the background sweeper ran.
#[tokio::test]
async fn a_full_memory_store_reclaims_expired_places_after_the_clock_steps_back() {
    use countersign::proxy::session::MemorySessionStore;
    let store = MemorySessionStore::new(timeouts(), 1);
    // The clock is an hour ahead: a session fills the store, a second login is refused (and
    // reclaims, finding nothing expired), then the first session logs out.
    let ahead = T0 + 3600;
    let (first, _) = store.create(&ident("alice"), ahead).await.unwrap();
    assert!(store.create(&ident("bob"), ahead).await.is_err(), "full");
    store.delete(&first).await.unwrap();
    // The clock is stepped back to the right time. A login takes the free place; its session
    // ends unused after the idle timeout.
    let (second, _) = store.create(&ident("carol"), T0).await.unwrap();
    let later = T0 + IDLE + 1;
    assert!(store.get(&second, later, false).await.unwrap().is_none());
    // The only place is held by an expired session: a login reclaims it.
    let third = store.create(&ident("dave"), later).await;
    assert!(
        third.is_ok(),
        "a full store of expired sessions refused a login after the clock stepped back: {:?}",
        third.err()
    );
}

/// The same reclaim after the clock returns to the second of an earlier reclaim: the sessions
/// created in between (at earlier seconds) may have expired by then, so that second's reclaim
/// must run again. (With "once per second value" alone, the second login here was refused.)
#[tokio::test]
async fn a_reclaim_second_seen_again_after_a_step_back_still_reclaims() {
    use countersign::proxy::session::MemorySessionStore;
    let store = MemorySessionStore::new(timeouts(), 1);
    let ahead = T0 + 3600;
    let (first, _) = store.create(&ident("alice"), ahead).await.unwrap();
    assert!(store.create(&ident("bob"), ahead).await.is_err(), "full");
    store.delete(&first).await.unwrap();
    // Stepped back by the idle timeout and more: a session made then has ended by `ahead`.
    let back = ahead - IDLE - 10;
    store.create(&ident("carol"), back).await.unwrap();
    assert!(
        store.create(&ident("dave"), ahead).await.is_ok(),
        "a full store of expired sessions refused a login"
    );
}

/// A reload that shortens a lifetime within the second of a reclaim: the sessions it ended
/// give their places back at that very second's next login (the memory store's promise,
/// docs/OPERATIONS.md "at once when a login finds the store full"), not one second later.
#[tokio::test]
async fn a_shortened_lifetime_frees_places_within_the_second_of_a_reclaim() {
    use countersign::proxy::session::MemorySessionStore;
    let store = MemorySessionStore::new(timeouts(), 1);
    store.create(&ident("alice"), T0).await.unwrap();
    let now = T0 + 20;
    assert!(store.create(&ident("bob"), now).await.is_err(), "full");
    assert!(store.set_timeouts(SessionTimeouts {
        idle: Duration::from_secs(10),
        absolute: Duration::from_secs(ABSOLUTE),
    }));
    assert!(
        store.create(&ident("bob"), now).await.is_ok(),
        "the session the reload ended still holds the only place"
    );
}

/// Both stores against a plain model of sessions (login time, last use, user), driven by
/// random operations: logins up to `max_sessions`, lookups with and without touch, logouts,
/// revocations, sweeps or prunes, time moving on, and for the memory store reloads of the
/// lifetimes and clock steps back (which found the reclaim defect above). Reproduce one run
/// with `SEED=<n>` (printing each step).
mod model {
    use super::*;
    use countersign::proxy::session::{MemorySessionStore, SessionId};
    use std::collections::HashMap;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    struct M {
        user: String,
        created: u64,
        last: u64,
    }

    enum Store {
        Memory(MemorySessionStore),
        Redis(RedisSessionStore),
    }

    impl Store {
        fn dyn_store(&self) -> &dyn SessionStore {
            match self {
                Store::Memory(s) => s,
                Store::Redis(s) => s,
            }
        }
        async fn sweep(&self, now: u64) {
            match self {
                Store::Memory(s) => {
                    s.sweep(now);
                }
                Store::Redis(s) => {
                    s.prune(now).await.unwrap();
                }
            }
        }
    }

    #[tokio::test]
    async fn memory_store_agrees_with_a_model() {
        for seed in std::env::var("SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(1..1000u64, |s: u64| s..s + 1)
        {
            run(
                seed,
                |max, t| Store::Memory(MemorySessionStore::new(t, max)),
                true,
            )
            .await;
        }
    }

    #[tokio::test]
    async fn redis_store_agrees_with_a_model() {
        let server = RedisServer::start();
        for seed in 1..40u64 {
            server.cli(&["FLUSHALL"]);
            run(
                seed,
                |max, t| {
                    Store::Redis(
                        RedisSessionStore::new(connection(&server), "m:", t, max)
                            .touch_interval(Duration::ZERO),
                    )
                },
                // No reloads nor clock steps back: Redis expires keys in real time, so with a
                // fake clock a raised lifetime, or a clock set back, finds records the real
                // store would have lost.
                false,
            )
            .await;
        }
    }

    async fn run(seed: u64, make: impl Fn(usize, SessionTimeouts) -> Store, reloads: bool) {
        // `reloads`: also lifetimes changed by a reload and clock steps back (memory store).
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let max = 1 + rng.below(12) as usize;
        let (mut idle, mut abs) = (30u64, 120u64);
        let holder = make(
            max,
            SessionTimeouts {
                idle: Duration::from_secs(idle),
                absolute: Duration::from_secs(abs),
            },
        );
        let store = holder.dyn_store();
        let mut now = T0;
        let mut held: HashMap<String, M> = HashMap::new();
        let mut ids: Vec<SessionId> = Vec::new();
        for step in 0..300 {
            let ctx = format!("seed {seed} step {step}");
            if std::env::var("SEED").is_ok() {
                eprintln!("{ctx} now {now} idle {idle} abs {abs} held {}", held.len());
            }
            let exp = |m: &M, idle: u64, abs: u64| (m.last + idle).min(m.created + abs);
            match rng.below(10) {
                0 | 1 => {
                    let user = format!("u{}", rng.below(3));
                    let r = store.create(&ident(&user), now).await;
                    // The model: room if fewer than max held, after dropping expired ones.
                    let live = held.values().filter(|m| now < exp(m, idle, abs)).count();
                    let all = held.len();
                    match r {
                        Ok((id, _)) => {
                            assert!(live < max, "{ctx}: created beyond max");
                            held.retain(|_, m| all < max || now < exp(m, idle, abs));
                            held.insert(
                                id.as_cookie_value().to_owned(),
                                M {
                                    user,
                                    created: now,
                                    last: now,
                                },
                            );
                            ids.push(id);
                        }
                        Err(_) => {
                            assert!(live >= max, "{ctx}: refused with {live} live of {max}");
                        }
                    }
                }
                2 | 3 => {
                    if ids.is_empty() {
                        continue;
                    }
                    let id = &ids[rng.below(ids.len() as u64) as usize];
                    let touch = rng.below(2) == 0;
                    let got = store.get(id, now, touch).await.unwrap();
                    let m = held.get_mut(id.as_cookie_value());
                    match m {
                        Some(m) if now < exp(m, idle, abs) => {
                            let s = got.unwrap_or_else(|| panic!("{ctx}: live session not found"));
                            if touch {
                                m.last = m.last.max(now);
                            }
                            assert_eq!(s.last_seen, m.last, "{ctx}");
                            assert_eq!(s.user, m.user, "{ctx}");
                        }
                        _ => assert!(got.is_none(), "{ctx}: ended session found"),
                    }
                }
                4 => {
                    if ids.is_empty() {
                        continue;
                    }
                    let id = &ids[rng.below(ids.len() as u64) as usize];
                    store.delete(id).await.unwrap();
                    held.remove(id.as_cookie_value());
                }
                5 => {
                    let user = format!("u{}", rng.below(3));
                    let n = store.delete_user(&user).await.unwrap();
                    let before = held.len();
                    held.retain(|_, m| m.user != user);
                    // Redis records outlive a fake clock (their TTLs run in real time).
                    assert!(!reloads || n <= before - held.len(), "{ctx}");
                }
                6 => {
                    holder.sweep(now).await;
                    held.retain(|_, m| now < exp(m, idle, abs));
                    assert_eq!(store.count().await.unwrap(), held.len(), "{ctx}");
                }
                7 if reloads => {
                    idle = [5, 10, 30, 60][rng.below(4) as usize];
                    abs = idle.max([20, 60, 120, 300][rng.below(4) as usize]);
                    if std::env::var("SEED").is_ok() {
                        eprintln!("set {idle} {abs}");
                    }
                    store.set_timeouts(SessionTimeouts {
                        idle: Duration::from_secs(idle),
                        absolute: Duration::from_secs(abs),
                    });
                }
                // The clock steps back now and then.
                8 if reloads => now -= rng.below(25),
                _ => now += rng.below(25),
            }
            assert!(store.count().await.unwrap() <= max, "{ctx}");
        }
    }
}

//! The Redis session store's scripts run again after a lost reply. The connection runs a call
//! once more on a new connection when the first one's connection was found dead, and that
//! first run may have been executed by Redis with only its reply lost. A login's script asked
//! whether its new session id was taken only at its last step: the repeat counted the first
//! run's session among the user's, ended one more of the user's real sessions at
//! `max_sessions_per_user`, answered "id taken", and the proxy made a second session, leaving
//! the first one named by no cookie; with the store one place from full, the repeat answered
//! "full" (503) after the first run had made a session. A revoke's repeat found nothing left
//! to end and answered 0.
//!
//! Between the store and a real `redis-server` sits a forwarder that, once armed, forwards the
//! next script call (`EVAL`) to Redis, then closes the store's connection instead of relaying
//! the reply, as a network cut at that instant would.
//! Run: `cargo test --all-features --test session_redis_lost_reply`.
#![cfg(feature = "proxy")]

mod support_redis;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use countersign::proxy::session::{SessionId, SessionStore, SessionTimeouts};
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::{RedisConnection, RedisOptions};
use countersign::Identity;
use support_redis::forwarder::{holds, ChunkFate, ReplyCutter, TcpForwarder};
use support_redis::RedisServer;

const T0: u64 = 1_000_000;
const IDLE: u64 = 30 * 60;
const ABSOLUTE: u64 = 12 * 3600;

/// The store's scripts go as `EVAL` (the script's text in every call, no `EVALSHA`): the
/// command name as the client sends it (RESP bulk string).
const EVAL_COMMAND: &[u8] = b"$4\r\nEVAL\r\n";

fn timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: Duration::from_secs(IDLE),
        absolute: Duration::from_secs(ABSOLUTE),
    }
}

fn alice() -> Identity {
    Identity::new("alice", ["admin"])
}

fn bob() -> Identity {
    Identity::new("bob", ["ops"])
}

/// The hex SHA-256 of `id`: its member in the store's sets and the end of its record's key.
fn member(id: &SessionId) -> String {
    id.store_key().iter().map(|b| format!("{b:02x}")).collect()
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort_unstable();
    lines
}

/// The members of the count index (`cs:sessions`), sorted.
fn counted(server: &RedisServer) -> Vec<String> {
    sorted_lines(&server.cli(&["ZRANGE", "cs:sessions", "0", "-1"]))
}

/// The session records in Redis (their members), sorted.
fn records(server: &RedisServer) -> Vec<String> {
    sorted_lines(&server.cli(&["KEYS", "cs:session:*"]))
        .into_iter()
        .map(|key| key.trim_start_matches("cs:session:").to_owned())
        .collect()
}

/// The members of one user's index (`key`, a `cs:user:<hex>`), sorted.
fn index_of(server: &RedisServer, key: &str) -> Vec<String> {
    sorted_lines(&server.cli(&["SMEMBERS", key]))
}

/// The user index keys, sorted.
fn user_keys(server: &RedisServer) -> Vec<String> {
    sorted_lines(&server.cli(&["KEYS", "cs:user:*"]))
}

fn sorted(ids: &[&SessionId]) -> Vec<String> {
    let mut members: Vec<String> = ids.iter().map(|id| member(id)).collect();
    members.sort_unstable();
    members
}

fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ping_timeout: Duration::from_millis(500),
    }
}

fn store_via(addr: SocketAddr, max_sessions: usize) -> RedisSessionStore {
    let connection =
        RedisConnection::with_options(&format!("redis://{addr}/0"), options()).unwrap();
    RedisSessionStore::new(connection, "cs:", timeouts(), max_sessions)
}

/// A real Redis, a reply cutter in front of it.
async fn redis_behind_cutter() -> (RedisServer, ReplyCutter) {
    let server = RedisServer::start();
    let cutter = ReplyCutter::start(server.addr(), EVAL_COMMAND).await;
    (server, cutter)
}

/// At the per-user cap: alice holds 2 of her 3 places and logs in a third time; the login's
/// script runs in Redis but its reply is lost, and the connection runs it again. The login
/// succeeds with the session its first run made: both earlier sessions live on, alice holds
/// exactly 3, and the count index holds those 3 (no session without a cookie).
/// On the code before, the repeat counted the first run's session as alice's third, ended her
/// first session, answered "id taken", and a second new session was made: her first session
/// was gone and an orphan held a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_at_the_cap_whose_reply_was_lost_ends_nothing_more_and_leaves_no_orphan() {
    let (server, cutter) = redis_behind_cutter().await;
    let store = store_via(cutter.forwarder.addr, 100).max_sessions_per_user(3);
    let (a1, _) = store.create(&alice(), T0).await.unwrap();
    let (a2, _) = store.create(&alice(), T0 + 1).await.unwrap();
    assert_eq!(cutter.connections(), 1);

    cutter.arm();
    let (a3, session) = store
        .create(&alice(), T0 + 2)
        .await
        .expect("the login whose reply was lost succeeds");
    assert_eq!(cutter.connections(), 2, "the script was run again");
    assert_eq!(session.user.as_str(), "alice");

    for (name, id) in [("first", &a1), ("second", &a2), ("new", &a3)] {
        let found = store.get(id, T0 + 3, false).await.unwrap();
        assert!(found.is_some(), "alice's {name} session must be live");
    }
    // The session the store returned is the one in Redis, with the CSRF token it returned.
    let stored = server.cli(&["GET", &format!("cs:session:{}", member(&a3))]);
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["c"].as_str(), Some(session.csrf_token.as_str()));

    let expected = sorted(&[&a1, &a2, &a3]);
    assert_eq!(counted(&server), expected, "the count index: no orphan");
    assert_eq!(server.cli(&["ZCARD", "cs:sessions"]), "3");
    assert_eq!(records(&server), expected, "the session records");
    let users = user_keys(&server);
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(index_of(&server, &users[0]), expected, "alice's index");
    // One login number per login: the repeat took none.
    assert_eq!(server.cli(&["GET", "cs:session_seq"]), "3");
    assert_eq!(store.count().await.unwrap(), 3);
}

/// The store one place from full (`max_sessions` 2, bob holds 1): alice's login takes the last
/// place in its first run, whose reply is lost. The repeat finds the login's own session and
/// the login succeeds with it: exactly 2 sessions stored, both usable. (Refusing would be
/// wrong: the session is made and is this login's; refusing it would leave it behind, named by
/// no cookie, a refused login that changed the store.)
/// On the code before, the repeat found the store full and the login was refused (503) while
/// its first run's session took the last place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_taking_the_last_place_whose_reply_was_lost_succeeds_with_its_own_session() {
    let (server, cutter) = redis_behind_cutter().await;
    let store = store_via(cutter.forwarder.addr, 2);
    let (b1, _) = store.create(&bob(), T0).await.unwrap();

    cutter.arm();
    let created = store.create(&alice(), T0 + 1).await;
    assert_eq!(cutter.connections(), 2, "the script was run again");
    let (a1, session) = match created {
        Ok(created) => created,
        Err(e) => panic!("the login whose own first run took the last place was refused: {e}"),
    };
    assert_eq!(session.user.as_str(), "alice");
    assert!(store.get(&a1, T0 + 2, false).await.unwrap().is_some());
    assert!(store.get(&b1, T0 + 2, false).await.unwrap().is_some());
    let expected = sorted(&[&a1, &b1]);
    assert_eq!(counted(&server), expected);
    assert_eq!(records(&server), expected, "exactly 2 sessions stored");
    assert_eq!(store.count().await.unwrap(), 2);
    // The store is full for a login that is not a repeat.
    assert!(store.create(&alice(), T0 + 3).await.is_err());
    assert_eq!(records(&server), expected);
}

/// `SET key value EX 3600` on `addr`, over a plain connection of its own (blocking: called from
/// the forwarder's policy, before it passes on the chunk it is judging).
fn set_directly(addr: SocketAddr, key: &str, value: &str) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut command = b"*5\r\n".to_vec();
    for arg in [
        b"SET".as_slice(),
        key.as_bytes(),
        value.as_bytes(),
        b"EX",
        b"3600",
    ] {
        command.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        command.extend_from_slice(arg);
        command.extend_from_slice(b"\r\n");
    }
    stream.write_all(&command).unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+OK\r\n");
}

/// The first `cs:session:<64 hex>` in `bytes`: a login script's new record key (its KEYS[1],
/// the first key of the command; the script's text names no key).
fn session_key_in(bytes: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"cs:session:";
    let start = bytes.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    let hex = bytes.get(start + PREFIX.len()..start + PREFIX.len() + 64)?;
    hex.iter()
        .all(u8::is_ascii_hexdigit)
        .then(|| format!("cs:session:{}", String::from_utf8_lossy(hex)))
}

/// A real id collision still draws a new id: the id a login drew is taken by someone else's
/// session (written under that key, by the forwarder, just before the login's script reaches
/// Redis). The login must not take that session for its own (the record carries another CSRF
/// token): it draws a new id, and the other session is left as it was.
/// (No id generator seam exists, so the collision is made on the wire.) This passes on the
/// code before too, whose only answer to "id taken" was a new id; it guards the new
/// recognition of a login's own record against taking over another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_id_collision_still_draws_a_new_id() {
    let server = RedisServer::start();
    let redis = server.addr();
    let foreign = format!(r#"{{"u":"mallory","r":[],"c":"mallorys-token","ca":{T0},"ls":{T0}}}"#);
    let armed = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(std::sync::Mutex::new(None::<String>));
    let (arm, took, record) = (armed.clone(), taken.clone(), foreign.clone());
    let forwarder = TcpForwarder::start(redis, move || {
        let (arm, took, record) = (arm.clone(), took.clone(), record.clone());
        let mut seen = Vec::new();
        move |chunk: &[u8]| {
            if arm.load(SeqCst) {
                seen.extend_from_slice(chunk);
                if holds(&seen, EVAL_COMMAND) {
                    if let Some(key) = session_key_in(&seen) {
                        // Before this chunk goes on, so before the script can run.
                        set_directly(redis, &key, &record);
                        *took.lock().unwrap() = Some(key);
                        arm.store(false, SeqCst);
                        seen.clear();
                    }
                }
            }
            ChunkFate::Forward
        }
    })
    .await;
    let store = store_via(forwarder.addr, 2);
    let (b1, _) = store.create(&bob(), T0).await.unwrap();

    armed.store(true, SeqCst);
    let (a1, session) = store.create(&alice(), T0 + 1).await.unwrap();
    let taken = taken
        .lock()
        .unwrap()
        .clone()
        .expect("the collision was made");
    assert_ne!(
        format!("cs:session:{}", member(&a1)),
        taken,
        "the login took the colliding id"
    );
    assert_ne!(session.csrf_token.as_str(), "mallorys-token");
    assert_eq!(
        server.cli(&["GET", &taken]),
        foreign,
        "the other session untouched"
    );
    assert!(store.get(&a1, T0 + 2, false).await.unwrap().is_some());
    assert!(store.get(&b1, T0 + 2, false).await.unwrap().is_some());
    assert_eq!(counted(&server), sorted(&[&a1, &b1]));
    assert_eq!(forwarder.connections(), 1, "no call was repeated");
}

/// A revoke (admin revoke, logout-all) whose reply is lost: the repeat answers how many
/// sessions the first run ended, not 0, and ends nothing more.
/// On the code before, the repeat found alice's index gone and answered 0
/// (`"revoked": 0` from `POST /admin/users/{name}/revoke` though 2 sessions ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_whose_reply_was_lost_answers_the_sessions_it_ended() {
    let (server, cutter) = redis_behind_cutter().await;
    let store = store_via(cutter.forwarder.addr, 100);
    let (a1, _) = store.create(&alice(), T0).await.unwrap();
    let (a2, _) = store.create(&alice(), T0 + 1).await.unwrap();
    let (b1, _) = store.create(&bob(), T0 + 2).await.unwrap();

    cutter.arm();
    let ended = store.delete_user("alice").await.unwrap();
    assert_eq!(cutter.connections(), 2, "the script was run again");
    assert_eq!(ended, 2, "the sessions the revoke ended");
    for id in [&a1, &a2] {
        assert!(store.get(id, T0 + 3, false).await.unwrap().is_none());
    }
    assert!(store.get(&b1, T0 + 3, false).await.unwrap().is_some());
    assert_eq!(counted(&server), sorted(&[&b1]));
    // The receipt is short-lived, and a later revoke is a call of its own.
    let receipts = sorted_lines(&server.cli(&["KEYS", "cs:revoke:*"]));
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    let ttl: i64 = server.cli(&["TTL", &receipts[0]]).parse().unwrap();
    assert!((1..=66).contains(&ttl), "receipt ttl {ttl}");
    assert_eq!(store.delete_user("alice").await.unwrap(), 0);
    assert_eq!(store.delete_user("bob").await.unwrap(), 1);
}

//! `session.max_sessions_per_user`: a user who logs in again while holding that many live
//! sessions loses the oldest (by login), so one set of credentials cannot fill
//! `session.max_sessions` and lock every other user out (503). Against real proxies: the
//! memory store and the Redis store (a real `redis-server`), concurrent logins through two
//! proxies on one Redis, the key's checks in `check-config`, and a live reload on the real
//! binary.
//!
//! Run: `cargo test --all-features --test session_per_user_cap`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_redis;
mod support_run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use countersign::proxy::config::{ProxyConfig, DEFAULT_MAX_SESSIONS_PER_USER};
use countersign::proxy::session::{MemorySessionStore, SessionStore, SessionTimeouts};
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::{RedisConnection, RedisOptions};
use http::{Method, StatusCode};
use support::*;
use support_redis::RedisServer;
use support_run::*;

fn timeouts() -> SessionTimeouts {
    SessionTimeouts {
        idle: IDLE,
        absolute: ABSOLUTE,
    }
}

fn redis_store(server: &RedisServer, max_sessions: usize, per_user: usize) -> RedisSessionStore {
    let connection = RedisConnection::with_options(
        &server.url(),
        RedisOptions {
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            ping_timeout: Duration::from_millis(500),
        },
    )
    .unwrap();
    RedisSessionStore::new(connection, "cs:", timeouts(), max_sessions)
        .max_sessions_per_user(per_user)
}

async fn harness_on(store: Arc<dyn SessionStore>) -> Harness {
    Harness::start_with(HarnessOptions {
        sessions: Some(store),
        // Logins in flight count as failures until their password is checked: room for the
        // parallel ones.
        max_failures_per_user: 100,
        ..HarnessOptions::default()
    })
    .await
}

/// `GET /auth/session?touch=false` with `login`'s cookie at `addr`: its status.
async fn session_status(addr: SocketAddr, login: &Login) -> StatusCode {
    send(
        addr,
        Method::GET,
        "/auth/session?touch=false",
        &[("cookie", &login.cookie)],
        "",
    )
    .await
    .status
}

async fn count(store: &dyn SessionStore) -> usize {
    store.count().await.unwrap()
}

/// What both stores must do with the cap at 2 and `max_sessions` at 4: alice's third login
/// ends her first session (401 afterwards) and keeps the second and third; her later logins
/// keep her at 2, so bob still gets both his places; bob's third ends his own first, never
/// alice's. All logins in one second (the harness's clock stands still): the login order
/// decides. On the code before, alice's logins took all 4 places and bob's login got 503.
async fn the_cap_ends_the_users_oldest_session(h: &Harness, store: &dyn SessionStore) {
    let a1 = h.login("alice", ALICE_PASSWORD).await;
    let a2 = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(count(store).await, 2);
    let a3 = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(
        session_status(h.addr, &a1).await,
        StatusCode::UNAUTHORIZED,
        "the oldest session ended"
    );
    assert_eq!(session_status(h.addr, &a2).await, StatusCode::OK);
    assert_eq!(session_status(h.addr, &a3).await, StatusCode::OK);
    assert_eq!(count(store).await, 2, "the ended session left max_sessions");
    // The ended session is gone for every use, not only /auth/session.
    let api = get(h.addr, "/api/x", &a1).await;
    assert_eq!(api.status, StatusCode::UNAUTHORIZED, "{}", api.text());

    // More logins of alice: she never holds more than 2, so the store (4) never fills.
    let mut latest = (a2, a3);
    for _ in 0..4 {
        let next = h.login("alice", ALICE_PASSWORD).await;
        assert_eq!(
            session_status(h.addr, &latest.0).await,
            StatusCode::UNAUTHORIZED
        );
        latest = (latest.1, next);
        assert_eq!(count(store).await, 2);
    }
    let b1 = h.login("bob", BOB_PASSWORD).await;
    let b2 = h.login("bob", BOB_PASSWORD).await;
    assert_eq!(count(store).await, 4, "store full: 2 of alice, 2 of bob");
    // At the cap and at max_sessions: bob's login ends his own oldest, and succeeds.
    let b3 = h.login("bob", BOB_PASSWORD).await;
    assert_eq!(count(store).await, 4);
    assert_eq!(session_status(h.addr, &b1).await, StatusCode::UNAUTHORIZED);
    for live in [&b2, &b3, &latest.0, &latest.1] {
        assert_eq!(session_status(h.addr, live).await, StatusCode::OK);
    }
    // A logout frees a place: alice's next login ends nothing.
    let logout = post_json(h.addr, "/auth/logout", &latest.0, "").await;
    assert!(logout.status.is_success(), "{}", logout.text());
    assert_eq!(count(store).await, 3);
    let a_next = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(session_status(h.addr, &latest.1).await, StatusCode::OK);
    assert_eq!(session_status(h.addr, &a_next).await, StatusCode::OK);
    assert_eq!(count(store).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_ends_the_oldest_session_of_a_user_at_the_cap() {
    let store = Arc::new(MemorySessionStore::new(timeouts(), 4).with_max_sessions_per_user(2));
    let h = harness_on(store.clone()).await;
    the_cap_ends_the_users_oldest_session(&h, store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_ends_the_oldest_session_of_a_user_at_the_cap() {
    let server = RedisServer::start();
    let store = Arc::new(redis_store(&server, 4, 2));
    let h = harness_on(store.clone()).await;
    the_cap_ends_the_users_oldest_session(&h, store.as_ref()).await;
    // In Redis: 4 records, 4 count-index entries, 2 members in each user's index (the ended
    // sessions' records, entries and members are gone), and each record has its login number.
    let records = server.cli(&["KEYS", "cs:session:*"]);
    assert_eq!(records.lines().count(), 4, "{records}");
    assert_eq!(server.cli(&["ZCARD", "cs:sessions"]), "4");
    let user_sets = server.cli(&["KEYS", "cs:user:*"]);
    let sets: Vec<&str> = user_sets.lines().collect();
    assert_eq!(sets.len(), 2, "{user_sets}");
    for set in sets {
        assert_eq!(server.cli(&["SCARD", set]), "2", "{set}");
    }
    for key in records.lines() {
        let record: serde_json::Value = serde_json::from_str(&server.cli(&["GET", key])).unwrap();
        assert!(record["n"].as_u64().is_some(), "{record}");
    }
}

/// `n` parallel logins of alice at `addrs` (round robin): the cookies of those that succeed.
async fn parallel_logins(addrs: &[SocketAddr], n: usize) -> Vec<Login> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            tokio::spawn(async move {
                let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD })
                    .to_string();
                send(
                    addr,
                    Method::POST,
                    "/auth/login",
                    &[("content-type", "application/json"), ("origin", ORIGIN)],
                    body,
                )
                .await
            })
        })
        .collect();
    let mut logins = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        logins.push(reply.login());
    }
    logins
}

/// How many of `logins` (made as [`parallel_logins`] spread them over `addrs`) are live, each
/// asked at the proxy that made it (each harness has users of its own, so a session's
/// credential stamp is current only there).
async fn live_count(addrs: &[SocketAddr], logins: &[Login]) -> usize {
    let mut live = 0;
    for (i, login) in logins.iter().enumerate() {
        if session_status(addrs[i % addrs.len()], login).await == StatusCode::OK {
            live += 1;
        }
    }
    live
}

/// Two proxies on one Redis, 10 logins of alice at once (5 through each), cap 3: every login
/// succeeds and exactly 3 sessions are live afterwards, on either proxy. The check and the
/// eviction are one script, so no two logins both see room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_logins_through_two_proxies_leave_exactly_the_cap() {
    let server = RedisServer::start();
    let a = harness_on(Arc::new(redis_store(&server, 1000, 3))).await;
    let b = harness_on(Arc::new(redis_store(&server, 1000, 3))).await;
    let addrs = [a.addr, b.addr];
    for round in 0..3 {
        let logins = parallel_logins(&addrs, 10).await;
        assert_eq!(live_count(&addrs, &logins).await, 3, "round {round}");
        assert_eq!(server.cli(&["ZCARD", "cs:sessions"]), "3", "round {round}");
        let records = server.cli(&["KEYS", "cs:session:*"]);
        assert_eq!(records.lines().count(), 3, "round {round}: {records}");
    }
}

/// The memory store's logins of one user are serialised too: 10 at once, cap 3 → 3 live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_concurrent_logins_leave_exactly_the_cap() {
    let store = Arc::new(MemorySessionStore::new(timeouts(), 1000).with_max_sessions_per_user(3));
    let h = harness_on(store.clone()).await;
    for round in 0..3 {
        let logins = parallel_logins(&[h.addr], 10).await;
        assert_eq!(live_count(&[h.addr], &logins).await, 3, "round {round}");
        assert_eq!(count(store.as_ref()).await, 3, "round {round}");
    }
}

/// The memory store under contention, without HTTP and argon2 in between: 4 tasks on 4
/// threads creating alice's sessions as fast as they can never see her above the cap (3), and
/// at the end she holds exactly 3. Without the per-user lock two logins could both count 2,
/// both insert, and leave 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_never_exceeds_the_cap_under_contention() {
    let store =
        Arc::new(MemorySessionStore::new(timeouts(), 100_000).with_max_sessions_per_user(3));
    let identity = countersign::Identity::new("alice", ["admin"]);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let identity = identity.clone();
            tokio::spawn(async move {
                let mut most = 0;
                for _ in 0..2000 {
                    store.create(&identity, T0).await.unwrap();
                    most = most.max(store.count().await.unwrap());
                }
                most
            })
        })
        .collect();
    for task in tasks {
        let most = task.await.unwrap();
        assert!(most <= 3, "alice held {most} sessions at once");
    }
    assert_eq!(count(store.as_ref()).await, 3);
}

/// Redis under contention: 4 proxies' stores (a connection each) creating alice's sessions at
/// once, 100 each, cap 3. Afterwards exactly 3 live, and they are the last 3 logins Redis ran
/// (login numbers 398 to 400): each login ended exactly the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_keeps_the_newest_under_contention() {
    let server = RedisServer::start();
    let identity = countersign::Identity::new("alice", ["admin"]);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = redis_store(&server, 100_000, 3);
            let identity = identity.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    store.create(&identity, T0).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(server.cli(&["GET", "cs:session_seq"]), "400");
    assert_eq!(server.cli(&["ZCARD", "cs:sessions"]), "3");
    let records = server.cli(&["KEYS", "cs:session:*"]);
    let mut numbers: Vec<u64> = records
        .lines()
        .map(|key| {
            let record: serde_json::Value =
                serde_json::from_str(&server.cli(&["GET", key])).unwrap();
            record["n"].as_u64().unwrap()
        })
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [398, 399, 400]);
    let user_set = server.cli(&["KEYS", "cs:user:*"]);
    assert_eq!(server.cli(&["SCARD", user_set.trim()]), "3");
}

/// A login that ends the user's oldest session takes over its place in `max_sessions`: in a
/// store left over-full (3 sessions, the proxy's `max_sessions` lowered to 2, as after a
/// reload or beside a proxy with a larger value), alice at her cap of 1 logs in again: 200,
/// her old session ended, the count unchanged. Before, the script ended her session, then
/// counted 2 of 2 and refused: 503, with the old session already gone.
#[tokio::test]
async fn redis_a_login_that_ends_the_oldest_takes_over_its_place() {
    let server = RedisServer::start();
    let roomy = redis_store(&server, 3, 1);
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (old, _) = roomy.create(&alice, T0).await.unwrap();
    for user in ["bob", "carol"] {
        roomy
            .create(&countersign::Identity::new(user, ["admin"]), T0)
            .await
            .unwrap();
    }
    let lowered = redis_store(&server, 2, 1);
    let (new, _) = lowered
        .create(&alice, T0 + 1)
        .await
        .expect("a login that ends the user's oldest session is never refused for a full store");
    assert!(lowered.get(&old, T0 + 2, false).await.unwrap().is_none());
    assert!(lowered.get(&new, T0 + 2, false).await.unwrap().is_some());
    assert_eq!(server.cli(&["ZCARD", "cs:sessions"]), "3");
    // Dave, who ends nothing, is still refused: the store is over-full.
    let dave = lowered
        .create(&countersign::Identity::new("dave", ["admin"]), T0 + 1)
        .await;
    assert!(
        dave.is_err(),
        "a new user's login in a full store must be refused"
    );
}

/// A login refused for a full store ends nothing. Alice, at her cap of 1, holds a live session
/// that is not counted in `max_sessions` (its count-index entry pruned, as a proxy whose clock
/// is ahead does at each login); bob and carol fill the store (2). Her login is refused (the
/// store is full: ending an uncounted session frees no place), and her session still works.
/// Before, the script ended it first, then refused: the user lost a session to a failed login.
#[tokio::test]
async fn redis_a_login_refused_for_a_full_store_ends_nothing() {
    let server = RedisServer::start();
    let store = redis_store(&server, 2, 1);
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (held, _) = store.create(&alice, T0).await.unwrap();
    let member = server.cli(&["ZRANGE", "cs:sessions", "0", "-1"]);
    assert_eq!(server.cli(&["ZREM", "cs:sessions", member.trim()]), "1");
    for user in ["bob", "carol"] {
        store
            .create(&countersign::Identity::new(user, ["admin"]), T0)
            .await
            .unwrap();
    }
    assert!(
        store.create(&alice, T0 + 1).await.is_err(),
        "the store is full: the login must be refused"
    );
    assert!(
        store.get(&held, T0 + 2, false).await.unwrap().is_some(),
        "a refused login ended the user's session"
    );
    assert_eq!(server.cli(&["KEYS", "cs:session:*"]).lines().count(), 3);
}

/// The least-privilege ACL user of docs/DEPLOYMENT.md is enough for the cap's work in the
/// login script (reading the user's records, ending the oldest, the login counter): a store
/// with the cap at 2 logs alice in three times under it, and her first session is gone.
#[tokio::test]
async fn the_documented_acl_user_is_enough_for_the_cap() {
    let (_server, url) = RedisServer::start_with_documented_acl();
    let store = RedisSessionStore::new(
        RedisConnection::open(&url).unwrap(),
        "countersign:",
        timeouts(),
        100,
    )
    .max_sessions_per_user(2);
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (first, _) = store.create(&alice, T0).await.unwrap();
    let (second, _) = store.create(&alice, T0).await.unwrap();
    let (third, _) = store.create(&alice, T0 + 1).await.unwrap();
    assert!(store.get(&first, T0 + 2, false).await.unwrap().is_none());
    assert!(store.get(&second, T0 + 2, false).await.unwrap().is_some());
    assert!(store.get(&third, T0 + 2, false).await.unwrap().is_some());
    assert_eq!(store.count().await.unwrap(), 2);
}

/// On a Redis Cluster (prefix with a hash tag, as the config requires there) the login script
/// with the cap runs in one slot: the user's records, the counter and the indexes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_cap_ends_the_oldest_session() {
    let cluster = support_redis::RedisCluster::start(3);
    let connection = RedisConnection::cluster(
        &cluster.node_urls(),
        RedisOptions {
            op_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(500),
        },
    )
    .unwrap();
    let store =
        RedisSessionStore::new(connection, "{cs}:", timeouts(), 100).max_sessions_per_user(2);
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (first, _) = store.create(&alice, T0).await.unwrap();
    let (second, _) = store.create(&alice, T0).await.unwrap();
    let (third, _) = store.create(&alice, T0).await.unwrap();
    assert!(store.get(&first, T0 + 1, false).await.unwrap().is_none());
    assert!(store.get(&second, T0 + 1, false).await.unwrap().is_some());
    assert!(store.get(&third, T0 + 1, false).await.unwrap().is_some());
    assert_eq!(store.count().await.unwrap(), 2);
}

/// A config folder with a users file and a keyring, and `proxy.toml` with `session` lines.
fn config_dir(tag: &str, session: &str) -> TestDir {
    let dir = TestDir::new(&format!("per-user-cap-{tag}"));
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let text = config_text("127.0.0.1:0", None, "http://127.0.0.1:9").replace(
        "store = \"memory\"\n",
        &format!("store = \"memory\"\n{session}\n"),
    );
    write(&dir.join("proxy.toml"), &text);
    dir
}

/// Zero, a negative number, a string, a float, a number too large: `check-config` exits 2
/// naming `session.max_sessions_per_user`. A positive integer passes, and left out it is the
/// documented default.
#[test]
fn check_config_refuses_bad_values_naming_the_key() {
    for (i, bad) in [
        "0",
        "-1",
        "\"many\"",
        "2.5",
        "true",
        "99999999999999999999999",
    ]
    .iter()
    .enumerate()
    {
        let dir = config_dir(
            &format!("bad-{i}"),
            &format!("max_sessions_per_user = {bad}"),
        );
        let out = support_cli::check_config(&dir.join("proxy.toml"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {text}");
        assert!(
            text.contains("session.max_sessions_per_user:"),
            "{bad}: {text}"
        );
    }
    let dir = TestDir::new("per-user-cap-zero-message");
    let zero = ProxyConfig::parse(
        &config_text("127.0.0.1:8080", None, "http://127.0.0.1:9")
            .replace("store = \"memory\"\n", "max_sessions_per_user = 0\n"),
        &dir.join("proxy.toml"),
    )
    .unwrap_err();
    assert_eq!(zero.key(), "session.max_sessions_per_user", "{zero}");
    assert!(zero.to_string().contains("greater than zero"), "{zero}");

    let dir = config_dir("good", "max_sessions_per_user = 5");
    let out = support_cli::check_config(&dir.join("proxy.toml"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    assert_eq!(config.session.max_sessions_per_user, 5);
    let dir = config_dir("default", "");
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    assert_eq!(
        config.session.max_sessions_per_user,
        DEFAULT_MAX_SESSIONS_PER_USER
    );
    assert_eq!(DEFAULT_MAX_SESSIONS_PER_USER, 32);
}

/// The real binary: the key reaches the store `run` builds (cap 2: the first of three
/// sessions ends), and a SIGHUP applies a new cap (1) to the next login, logged as applied,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_applies_the_key_and_a_reload_changes_it_live() {
    let dir = TestDir::new("per-user-cap-run");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let text = |listen: SocketAddr, cap: usize| {
        config_text(&listen.to_string(), None, "http://127.0.0.1:9").replace(
            "store = \"memory\"\n",
            &format!("store = \"memory\"\nmax_sessions_per_user = {cap}\n"),
        )
    };
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let file = dir.join("proxy.toml");
        write(&file, &text(addr, 2));
        RunningProxy::spawn(&file, &[])
    });
    proxy.wait_listening(addr);
    let mut logins = Vec::new();
    for _ in 0..3 {
        logins.push(login_alice_reply_at(addr).await.login());
    }
    let statuses = |logins: Vec<Login>| async move {
        let mut out = Vec::new();
        for login in &logins {
            out.push(session_status(addr, login).await);
        }
        out
    };
    use StatusCode as S;
    assert_eq!(
        statuses(logins.clone()).await,
        [S::UNAUTHORIZED, S::OK, S::OK]
    );

    let staged = dir.join(".proxy.toml.new");
    write(&staged, &text(addr, 1));
    std::fs::rename(&staged, dir.join("proxy.toml")).unwrap();
    proxy.signal("HUP");
    let applied = proxy.wait_json_messages("INFO", &["SIGHUP:", "applied"], 1);
    assert!(
        applied[0].contains("applied 1 key: session.max_sessions_per_user"),
        "{applied:?}"
    );
    assert!(
        proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        proxy.log()
    );
    logins.push(login_alice_reply_at(addr).await.login());
    assert_eq!(
        statuses(logins).await,
        [S::UNAUTHORIZED, S::UNAUTHORIZED, S::UNAUTHORIZED, S::OK]
    );
    assert!(proxy.stop().success());
}

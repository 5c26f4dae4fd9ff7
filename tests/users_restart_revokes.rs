//! Sessions in Redis outlive the proxies, so no reload is there to end them when every proxy
//! restarts on a new users file (a rolling deploy), or when proxies of one fleet run different
//! users files. Each session keeps its user's credential stamp (a digest of the user's name,
//! password hash and roles in the users file the login was checked against), and a proxy with
//! a users file accepts a session only while its file gives the user the same stamp: a user
//! removed, or whose password or roles changed, gets 401 `unauthenticated` and the API never
//! sees the request. The refused session is left in Redis (a proxy on an older file must not
//! destroy sessions made under a newer one). Records from before stamps (no `s` field) are
//! accepted only while the user exists with the same roles. With `[auth] verify_url` there is
//! no users file and nothing is compared.
//! Real `countersign run` processes (and a real `redis-server`) on loopback; the `verify_url`
//! case runs in process.
//! Run: `cargo test --all-features --test users_restart_revokes`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;
mod support_run;
mod support_users;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use countersign::clock::SystemClock;
use countersign::proxy::session::SessionTimeouts;
use countersign::proxy::session_redis::RedisSessionStore;
use countersign::replay::RedisConnection;
use http::{Method, StatusCode};
use support::*;
use support_redis::RedisServer;
use support_run::*;
use support_users::*;

/// Key prefix of the proxies' stores in these tests.
const PREFIX: &str = "cs-restart:";

/// `countersign run` on `dir` (keys.toml, users.toml from `users`) with its sessions in
/// `redis` under [`PREFIX`].
fn spawn(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    redis: &RedisServer,
) -> (RunningProxy, SocketAddr) {
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    let url = redis.url();
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = dir.join(format!("proxy-{}.toml", addr.port()));
        let text = config_text(&addr.to_string(), None, &upstream.url()).replace(
            "store = \"memory\"\n",
            &format!("store = \"redis\"\nredis_url = \"{url}\"\nredis_key_prefix = \"{PREFIX}\"\n"),
        );
        assert!(text.contains("redis_url"), "{text}");
        write(&config, &text);
        RunningProxy::spawn(&config, &[])
    });
    proxy.wait_listening(addr);
    (proxy, addr)
}

/// The session records in `redis` (`GET` of each `P session:*` key), as JSON, by key.
fn session_records(redis: &RedisServer) -> Vec<(String, serde_json::Value)> {
    let keys = redis.cli(&["--scan", "--pattern", &format!("{PREFIX}session:*")]);
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|key| {
            let value = redis.cli(&["GET", key]);
            let json = serde_json::from_str(&value)
                .unwrap_or_else(|e| panic!("record {key} is not JSON ({e}): {value}"));
            (key.to_owned(), json)
        })
        .collect()
}

/// How many session records of `user` are in `redis`.
fn records_of(redis: &RedisServer, user: &str) -> usize {
    session_records(redis)
        .iter()
        .filter(|(_, record)| record["u"] == user)
        .count()
}

fn stop(proxy: &mut RunningProxy) {
    let log = proxy.log();
    assert!(proxy.stop().success(), "{log}");
    assert!(!log.contains("$argon2"), "a hash in the log: {log}");
}

/// Every proxy restarted on a new users file (no reload ever compares): the sessions of the
/// users it removed, or whose password or roles it changed, are refused; those of unchanged
/// users (and of a user whose roles were only reordered) go on; nothing is deleted; the changed
/// users log in again with their new password and roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_new_users_file_refuses_the_sessions_of_changed_users() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let redis = RedisServer::start();
    let dir = temp_dir("restart-revoke");
    let mut users = Users::five();
    let (mut proxy_a, addr_a) = spawn(&dir, &upstream, &users, &redis);
    let sessions: Vec<(&str, Login)> = {
        let mut sessions = Vec::new();
        for name in ["alice", "bob", "carol", "dave", "erin"] {
            sessions.push((name, login(addr_a, &users, name).await));
        }
        sessions
    };
    let session = |name: &str| &sessions.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_accepted(addr_a, &upstream, session("bob"), "bob", &[]).await;
    // Each record holds a stamp (22 base64url characters), never the hash itself.
    for (key, record) in session_records(&redis) {
        let stamp = record["s"]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {record}"));
        assert_eq!(stamp.len(), 22, "{key}: {record}");
        assert!(!record.to_string().contains("argon2"), "{key}: {record}");
    }
    stop(&mut proxy_a);

    // The file changes while no proxy runs.
    users.remove("bob");
    users.reset_password("carol");
    users.set_roles("dave", &["ops", "admin"]);
    users.set_roles("erin", &["b", "a", "b"]);
    let (mut proxy_b, addr_b) = spawn(&dir, &upstream, &users, &redis);
    assert_refused(addr_b, &upstream, session("carol"), "carol (password)").await;
    assert_changed_refused_unchanged_accepted(addr_b, &upstream, &sessions).await;
    // Refused, not deleted (a proxy on another file may still accept them; they expire).
    for name in ["bob", "carol", "dave"] {
        assert_eq!(records_of(&redis, name), 1, "{name}'s session was deleted");
    }

    // The changed users log in again: new password, new roles. From the browser holding the
    // refused session, the login replaces it (deleted, as any previous session at login).
    let carol = login_from(addr_b, &users, "carol", Some(session("carol"))).await;
    assert_accepted(addr_b, &upstream, &carol, "carol", &["ops"]).await;
    assert_eq!(
        records_of(&redis, "carol"),
        1,
        "carol's refused session is left"
    );
    let dave = login(addr_b, &users, "dave").await;
    assert_accepted(addr_b, &upstream, &dave, "dave", &["ops", "admin"]).await;
    // The old password no longer opens a session.
    let old = send(
        addr_b,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": "carol", "password": "carol-pw" }).to_string(),
    )
    .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    // The refusals logged nothing secret (no hash, no stamp).
    let log = proxy_b.log();
    for (key, record) in session_records(&redis) {
        let stamp = record["s"].as_str().unwrap();
        assert!(!log.contains(stamp), "{key}'s stamp in the log: {log}");
    }
    stop(&mut proxy_b);
}

/// Two proxies on one Redis with different users files (a rolling deploy, or a forgotten
/// proxy): the one whose file changed alice's roles refuses her session, the other still
/// accepts it and it stays in Redis; a session made under the new file is refused by the
/// proxy on the old one (a changed user may see 401s until the rollout ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_on_different_users_files_each_check_against_their_own() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let redis = RedisServer::start();
    let old_users = Users::five();
    let mut new_users = old_users.clone();
    new_users.set_roles("alice", &["ops"]);
    new_users.remove("bob");
    let (dir_old, dir_new) = (temp_dir("restart-fleet-old"), temp_dir("restart-fleet-new"));
    let (mut proxy_old, addr_old) = spawn(&dir_old, &upstream, &old_users, &redis);
    let (mut proxy_new, addr_new) = spawn(&dir_new, &upstream, &new_users, &redis);

    let alice = login(addr_old, &old_users, "alice").await;
    let bob = login(addr_old, &old_users, "bob").await;
    assert_refused(addr_new, &upstream, &alice, "alice at the new proxy").await;
    assert_refused(addr_new, &upstream, &bob, "bob at the new proxy").await;
    // The old proxy still accepts both: the new one deleted nothing.
    assert_accepted(addr_old, &upstream, &alice, "alice", &["admin", "ops"]).await;
    assert_accepted(addr_old, &upstream, &bob, "bob", &[]).await;
    assert_eq!(records_of(&redis, "alice"), 1);
    assert_eq!(records_of(&redis, "bob"), 1);

    // Logged in at the new proxy (new roles): the old one refuses, the new one accepts.
    let alice_new = login(addr_new, &new_users, "alice").await;
    assert_refused(
        addr_old,
        &upstream,
        &alice_new,
        "alice (new) at the old proxy",
    )
    .await;
    assert_accepted(addr_new, &upstream, &alice_new, "alice", &["ops"]).await;
    // A user the two files agree on works everywhere.
    let carol = login(addr_new, &new_users, "carol").await;
    assert_accepted(addr_old, &upstream, &carol, "carol", &["ops"]).await;
    assert_accepted(addr_new, &upstream, &carol, "carol", &["ops"]).await;
    stop(&mut proxy_old);
    stop(&mut proxy_new);
}

/// A session record from before stamps (no `s` field, as the earlier proxies wrote it, and as
/// they still write it back on a touch) is accepted only while its user exists with the same
/// roles: a removed user or changed roles are refused; a password change cannot be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_stamp_are_accepted_only_for_the_same_user_and_roles() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let redis = RedisServer::start();
    let dir = temp_dir("restart-unstamped");
    let mut users = Users::five();
    let (mut proxy_a, addr_a) = spawn(&dir, &upstream, &users, &redis);
    let mut sessions = Vec::new();
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        sessions.push((name, login(addr_a, &users, name).await));
    }
    stop(&mut proxy_a);
    // Rewritten as the earlier format: the same JSON without `s`, TTL kept.
    let records = session_records(&redis);
    assert_eq!(records.len(), 5);
    for (key, mut record) in records {
        assert!(record["s"].is_string(), "{key}: {record}");
        record.as_object_mut().unwrap().remove("s");
        let value = record.to_string();
        assert_eq!(redis.cli(&["SET", &key, &value, "XX", "KEEPTTL"]), "OK");
    }
    let session = |name: &str| &sessions.iter().find(|(n, _)| *n == name).unwrap().1;

    users.remove("bob");
    users.set_roles("dave", &["admin"]);
    users.reset_password("carol");
    users.set_roles("erin", &["b", "a"]);
    let (mut proxy_b, addr_b) = spawn(&dir, &upstream, &users, &redis);
    assert_changed_refused_unchanged_accepted(addr_b, &upstream, &sessions).await;
    // The limit of the upgrade rule: an unstamped record cannot show a password change.
    assert_accepted(addr_b, &upstream, session("carol"), "carol", &["ops"]).await;
    // Still unstamped after the touches above (a stamp is never added after the login).
    for (key, record) in session_records(&redis) {
        assert!(record.get("s").is_none(), "{key}: {record}");
    }
    stop(&mut proxy_b);
}

/// With `[auth] verify_url` the API checks the logins and there is no users file to compare
/// with: a Redis session of a user known only to the API works as before, even on a proxy
/// that also holds a users database (ProxyDeps built by hand) in which that user does not
/// exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_url_sessions_are_not_compared_with_any_users_file() {
    let redis = RedisServer::start();
    let store = Arc::new(RedisSessionStore::new(
        RedisConnection::open(&redis.url()).unwrap(),
        PREFIX,
        SessionTimeouts {
            idle: IDLE,
            absolute: ABSOLUTE,
        },
        1000,
    ));
    let h = Harness::start_with(HarnessOptions {
        sessions: Some(store),
        tweak: Box::new(check_logins_at_the_upstream),
        ..HarnessOptions::default()
    })
    .await;
    let vera = h.login("vera", "vera-pw").await;
    let records = session_records(&redis);
    assert_eq!(records.len(), 1);
    assert!(records[0].1.get("s").is_none(), "{:?}", records[0]);
    let r = get(h.addr, "/api/x", &vera).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["user"], "vera");
    let r = get(h.addr, "/auth/session", &vera).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

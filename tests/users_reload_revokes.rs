//! A users-file reload (SIGHUP or `server.reload_check_interval`) ends the sessions of every
//! user it removed or whose password or roles it changed, through the store's `delete_user`:
//! the users file is the truth, not the sessions created from an older one. Unchanged users
//! keep their sessions; a file that fails to load ends none. With Redis, one proxy's reload
//! ends the sessions on every proxy of the fleet, and a store that fails is an error line
//! pointing at the admin revoke endpoint while the file stays reloaded.
//! Real `countersign run` processes (and a real `redis-server`) on loopback.
//! Run: `cargo test --all-features --test users_reload_revokes`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::clock::SystemClock;
use http::{Method, StatusCode};
use support::*;
use support_redis::RedisServer;
use support_run::*;

/// How long a test waits for a reload to take effect (a loaded 2-core machine; checks at 1s).
const DEADLINE: Duration = Duration::from_secs(20);

/// A users file that does not load: alice without a password.
const BROKEN_USERS: &str = "[[users]]\nname = \"alice\"\n";

/// The users of a test: each name with its password's hash (made once, so that writing the
/// file again leaves the hash unchanged) and its roles.
struct Users(Vec<(String, String, Vec<String>)>);

impl Users {
    /// alice (admin), bob, carol (ops) and dave (ops); each password is `<name>-pw`.
    fn four() -> Users {
        let user = |name: &str, roles: &[&str]| {
            (
                name.to_owned(),
                cheap_hash(&format!("{name}-pw")),
                roles.iter().map(|r| (*r).to_owned()).collect(),
            )
        };
        Users(vec![
            user("alice", &["admin"]),
            user("bob", &[]),
            user("carol", &["ops"]),
            user("dave", &["ops"]),
        ])
    }

    fn text(&self) -> String {
        self.0
            .iter()
            .map(|(name, hash, roles)| {
                format!("[[users]]\nname = \"{name}\"\npassword = \"{hash}\"\nroles = {roles:?}\n")
            })
            .collect()
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _, _)| n != name);
    }

    fn entry(&mut self, name: &str) -> &mut (String, String, Vec<String>) {
        self.0.iter_mut().find(|(n, _, _)| n == name).unwrap()
    }

    /// A new password for `name` (its hash changes; the password itself does not matter).
    fn reset_password(&mut self, name: &str) {
        self.entry(name).1 = cheap_hash("a new password");
    }

    fn set_roles(&mut self, name: &str, roles: &[&str]) {
        self.entry(name).2 = roles.iter().map(|r| (*r).to_owned()).collect();
    }
}

/// Replaces `dir/users.toml` at once (a new file renamed over it): a check never reads it
/// half-written.
fn replace_users(dir: &Path, text: &str) {
    let staged = dir.join(".users.toml.new");
    write(&staged, text);
    std::fs::rename(&staged, dir.join("users.toml")).unwrap();
}

/// `countersign run --workers 2` on `dir` (keys.toml, users.toml from `users`); `tweak` edits
/// the config text (its `[server]` and `[session]` sections are `config_text`'s).
fn spawn(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    tweak: impl Fn(String) -> String,
) -> (RunningProxy, SocketAddr) {
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = dir.join(format!("proxy-{}.toml", addr.port()));
        write(
            &config,
            &tweak(config_text(&addr.to_string(), None, &upstream.url())),
        );
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    (proxy, addr)
}

/// `[server] reload_check_interval = "1s"`.
fn checking_every_second(text: String) -> String {
    let checked = text.replace(
        "shutdown_grace = \"2s\"\n",
        "shutdown_grace = \"2s\"\nreload_check_interval = \"1s\"\n",
    );
    assert!(checked.contains("reload_check_interval"), "{checked}");
    checked
}

/// Sessions in `redis` under the key prefix `cs-revoke:` (both proxies of a test share them).
fn redis_sessions(redis: &RedisServer) -> impl Fn(String) -> String {
    let url = redis.url();
    move |text: String| {
        let shared = text.replace(
            "store = \"memory\"\n",
            &format!(
                "store = \"redis\"\nredis_url = \"{url}\"\nredis_key_prefix = \"cs-revoke:\"\n"
            ),
        );
        assert!(shared.contains("redis_url"), "{shared}");
        shared
    }
}

async fn login(addr: SocketAddr, user: &str) -> Login {
    let r = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": user, "password": format!("{user}-pw") }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "login {user}: {}", r.text());
    Login {
        cookie: r.session_cookie().unwrap(),
        csrf: r.json()["csrf_token"].as_str().unwrap().to_owned(),
    }
}

async fn api_status(addr: SocketAddr, session: &Login) -> StatusCode {
    get(addr, "/api/x", session).await.status
}

/// Polls until `session` gets 401 at `addr` (or panics after [`DEADLINE`], showing the log).
async fn wait_ended(addr: SocketAddr, session: &Login, who: &str, proxy: &RunningProxy) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match api_status(addr, session).await {
            StatusCode::UNAUTHORIZED => return,
            StatusCode::OK => {}
            other => panic!("{who}: {other}: {}", proxy.log()),
        }
        assert!(
            Instant::now() < deadline,
            "{who}'s session still works: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sessions keyed by user, all expected to work at `addr` now.
async fn assert_live(addr: SocketAddr, sessions: &[(&str, &Login)]) {
    for (who, session) in sessions {
        assert_eq!(api_status(addr, session).await, StatusCode::OK, "{who}");
    }
}

fn assert_no_hash_logged(proxy: &RunningProxy) {
    let log = proxy.log();
    assert!(!log.contains("$argon2"), "a hash in the log: {log}");
}

/// SIGHUP with a broken file ends nothing; then with bob removed, carol's password reset and
/// dave's roles changed, their sessions end and alice's goes on; one info line counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_ends_the_sessions_of_removed_and_changed_users_only() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("revoke-sighup");
    let mut users = Users::four();
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, |t| t);
    let alice = login(addr, "alice").await;
    let bob = login(addr, "bob").await;
    let bob_again = login(addr, "bob").await;
    let carol = login(addr, "carol").await;
    let dave = login(addr, "dave").await;
    let everyone = [
        ("alice", &alice),
        ("bob", &bob),
        ("bob again", &bob_again),
        ("carol", &carol),
        ("dave", &dave),
    ];
    assert_live(addr, &everyone).await;

    // A file that fails to load: kept out, and nobody loses a session.
    replace_users(&dir, BROKEN_USERS);
    proxy.signal("HUP");
    proxy.wait_json_messages("ERROR", &["SIGHUP: auth.users_file not reloaded"], 1);
    assert_live(addr, &everyone).await;

    // The same file written again (new content, same users): nobody changed.
    replace_users(&dir, &users.text());
    proxy.signal("HUP");
    proxy.wait_json_messages("INFO", &["SIGHUP: reloaded auth.users_file"], 1);
    assert_live(addr, &everyone).await;

    users.remove("bob");
    users.reset_password("carol");
    users.set_roles("dave", &["ops", "admin"]);
    replace_users(&dir, &users.text());
    proxy.signal("HUP");
    wait_ended(addr, &bob, "bob", &proxy).await;
    wait_ended(addr, &bob_again, "bob's second session", &proxy).await;
    wait_ended(addr, &carol, "carol", &proxy).await;
    wait_ended(addr, &dave, "dave", &proxy).await;
    assert_live(addr, &[("alice", &alice)]).await;

    let said = proxy.wait_json_messages("INFO", &["SIGHUP: auth.users_file changed"], 1);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("3 users")
            && said[0].contains("removed: bob")
            && said[0].contains("password changed: carol")
            && said[0].contains("roles changed: dave")
            && said[0].contains("ended 4 sessions of 3 users"),
        "{said:?}"
    );
    assert!(!said[0].contains("alice"), "{said:?}");
    assert!(proxy
        .json_messages("ERROR", &["ending the sessions"])
        .is_empty());
    assert_no_hash_logged(&proxy);

    // Signed in again with the new password and roles: the new session works (the reload is
    // over, nothing ends it).
    let dave_again = login(addr, "dave").await;
    assert_live(addr, &[("dave again", &dave_again), ("alice", &alice)]).await;
    assert_eq!(
        upstream.last_verified().identity.user.as_deref(),
        Some("alice"),
        "alice's request came last"
    );
    assert!(proxy.stop().success());
}

/// With `server.reload_check_interval` the same happens without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_change_ends_the_sessions_without_a_signal() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("revoke-check");
    let mut users = Users::four();
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, checking_every_second);
    let alice = login(addr, "alice").await;
    let bob = login(addr, "bob").await;
    let dave = login(addr, "dave").await;

    users.remove("bob");
    users.set_roles("dave", &[]);
    replace_users(&dir, &users.text());
    wait_ended(addr, &bob, "bob", &proxy).await;
    wait_ended(addr, &dave, "dave", &proxy).await;
    assert_live(addr, &[("alice", &alice)]).await;
    let said = proxy.wait_json_messages("INFO", &["file change: auth.users_file changed"], 1);
    assert!(
        said[0].contains("removed: bob; roles changed: dave")
            && said[0].contains("ended 2 sessions of 2 users"),
        "{said:?}"
    );
    assert!(proxy.stop().success());
}

/// Two proxies on one Redis: a reload of only one of them ends bob's sessions on both. Then,
/// Redis down: the file is reloaded all the same, and an error line says whose sessions could
/// not be ended and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_one_proxys_reload_ends_the_sessions_on_every_proxy() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let mut redis = RedisServer::start();
    let dir_a = temp_dir("revoke-redis-a");
    let dir_b = temp_dir("revoke-redis-b");
    let mut users = Users::four();
    let (mut proxy_a, addr_a) = spawn(&dir_a, &upstream, &users, redis_sessions(&redis));
    let (mut proxy_b, addr_b) = spawn(&dir_b, &upstream, &users, redis_sessions(&redis));
    let alice = login(addr_b, "alice").await;
    let bob_at_a = login(addr_a, "bob").await;
    let bob_at_b = login(addr_b, "bob").await;
    // Shared: each proxy serves the other's sessions.
    assert_live(addr_a, &[("alice", &alice), ("bob at b", &bob_at_b)]).await;
    assert_live(addr_b, &[("bob at a", &bob_at_a)]).await;

    // Only proxy a gets the new file and the signal.
    users.remove("bob");
    replace_users(&dir_a, &users.text());
    proxy_a.signal("HUP");
    wait_ended(addr_b, &bob_at_b, "bob (logged in at b) at b", &proxy_b).await;
    wait_ended(addr_b, &bob_at_a, "bob (logged in at a) at b", &proxy_b).await;
    wait_ended(addr_a, &bob_at_a, "bob (logged in at a) at a", &proxy_a).await;
    assert_live(addr_a, &[("alice", &alice)]).await;
    assert_live(addr_b, &[("alice", &alice)]).await;
    let said = proxy_a.wait_json_messages("INFO", &["SIGHUP: auth.users_file changed"], 1);
    assert!(
        said[0].contains("removed: bob") && said[0].contains("ended 2 sessions of 1 users"),
        "{said:?}"
    );
    // Proxy b reloading the same file later finds bob's sessions gone: nothing to end.
    replace_users(&dir_b, &users.text());
    proxy_b.signal("HUP");
    let said = proxy_b.wait_json_messages("INFO", &["SIGHUP: auth.users_file changed"], 1);
    assert!(said[0].contains("ended 0 sessions of 1 users"), "{said:?}");

    // Redis down: the reload of the file still counts, the revocation failure is an error.
    redis.stop();
    users.remove("carol");
    replace_users(&dir_a, &users.text());
    proxy_a.signal("HUP");
    let errors = proxy_a.wait_json_messages("ERROR", &["SIGHUP", "ending the sessions"], 1);
    assert!(
        errors[0].contains("1 of its 1 changed users")
            && errors[0].contains("(carol)")
            && errors[0].contains("POST /admin/users/{name}/revoke"),
        "{errors:?}"
    );
    assert_eq!(
        proxy_a
            .json_messages("INFO", &["SIGHUP: reloaded auth.users_file"])
            .len(),
        2,
        "{}",
        proxy_a.log()
    );
    assert_no_hash_logged(&proxy_a);
    assert_no_hash_logged(&proxy_b);
    assert!(proxy_a.stop().success());
    assert!(proxy_b.stop().success());
}

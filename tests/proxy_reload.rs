//! SIGHUP reload, file by file: a keyring or users file that fails to load is reported (file,
//! key, problem) and the current one kept, while the other file's valid new content is loaded
//! all the same; every failure is reported, not only the first. In-process
//! (`ProxyState::reload_files` / `reload`) and through a real SIGHUP to the binary.
//! Run: `cargo test --all-features --test proxy_reload`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::clock::{ManualClock, SharedClock, SystemClock};
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use http::{Method, StatusCode};
use support::*;
use support_run::*;

/// A users file that does not load: alice without a password.
const BROKEN_USERS: &str = "[[users]]\nname = \"alice\"\n";
/// A keyring that does not load: the active key is not in it.
fn broken_keys() -> String {
    keyring_file_text("k9")
}

fn carol_users() -> String {
    format!(
        "[[users]]\nname = \"carol\"\npassword = \"{}\"\n",
        cheap_hash("carol-pw")
    )
}

async fn login_status(addr: SocketAddr, user: &str, password: &str) -> StatusCode {
    send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        serde_json::json!({ "username": user, "password": password }).to_string(),
    )
    .await
    .status
}

/// The keyid the upstream saw on a request signed now.
async fn signing_key(addr: SocketAddr, login: &Login, upstream: &Upstream) -> String {
    assert_eq!(get(addr, "/api/x", login).await.status, StatusCode::OK);
    upstream.last_verified().identity.keyid
}

struct InProcess {
    dir: std::path::PathBuf,
    proxy: ProxyServer,
    upstream: Upstream,
    login: Login,
}

async fn start(tag: &str) -> InProcess {
    let clock: SharedClock = Arc::new(ManualClock::new(T0));
    let upstream = start_upstream(both_keys_keyring(), clock.clone()).await;
    let dir = temp_dir(tag);
    let config = write_config(
        &dir,
        "127.0.0.1:0",
        None,
        &upstream.url(),
        &keyring_file_text("k1"),
        &users_file_text(),
    );
    let config = ProxyConfig::load(&config).unwrap();
    let settings = ProxySettings::from_config(&config).unwrap();
    let deps = ProxyDeps::from_config(&config, clock).unwrap();
    let proxy = ProxyServer::start(settings, deps).await.unwrap();
    let login = login_alice_at(proxy.local_addr()).await;
    assert_eq!(
        signing_key(proxy.local_addr(), &login, &upstream).await,
        "k1"
    );
    InProcess {
        dir,
        proxy,
        upstream,
        login,
    }
}

fn write_file(dir: &Path, name: &str, text: &str) {
    write(&dir.join(name), text);
}

#[tokio::test]
async fn a_new_keyring_is_loaded_although_the_users_file_is_broken() {
    let p = start("reload-keys").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&p.dir, "users.toml", BROKEN_USERS);

    let report = p.proxy.state().reload_files();
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    assert!(
        report.loaded[0].contains("signing.keyring") && report.loaded[0].contains("k2"),
        "{report:?}"
    );
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let failure = &report.failed[0];
    assert!(
        failure.contains("auth.users_file")
            && failure.contains("users.toml")
            && failure.contains("users[0]")
            && failure.contains("keeping the current users"),
        "names the setting, the file, the key in it and what happens: {failure}"
    );

    // The rotation took effect; the old users are still there.
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k2");
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK
    );

    // `reload` (the one-line form) says the same: an error, naming both outcomes.
    let line = p.proxy.state().reload().expect_err("a file failed");
    assert!(
        line.contains("users.toml") && line.contains("reloaded signing.keyring"),
        "{line}"
    );
    p.proxy.shutdown().await;
}

#[tokio::test]
async fn a_new_users_file_is_loaded_although_the_keyring_is_broken() {
    let p = start("reload-users").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &broken_keys());
    write_file(&p.dir, "users.toml", &carol_users());

    let report = p.proxy.state().reload_files();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let failure = &report.failed[0];
    assert!(
        failure.contains("signing.keyring")
            && failure.contains("keys.toml")
            && failure.contains("k9")
            && failure.contains("keeping the current keys"),
        "{failure}"
    );
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    assert!(
        report.loaded[0].contains("auth.users_file") && report.loaded[0].contains("(users: 1)"),
        "{report:?}"
    );

    // The current key still signs; the new users file is active (carol in, alice out), and
    // alice's session lives on (a reload never ends sessions).
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k1");
    assert_eq!(
        login_status(addr, "carol", "carol-pw").await,
        StatusCode::OK
    );
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::UNAUTHORIZED
    );
    p.proxy.shutdown().await;
}

#[tokio::test]
async fn when_both_files_are_broken_both_problems_are_reported_and_nothing_changes() {
    let p = start("reload-both").await;
    let addr = p.proxy.local_addr();
    write_file(&p.dir, "keys.toml", &broken_keys());
    write_file(&p.dir, "users.toml", BROKEN_USERS);

    let report = p.proxy.state().reload_files();
    assert!(report.loaded.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 2, "{report:?}");
    let line = p.proxy.state().reload().expect_err("both failed");
    assert!(
        line.contains("keys.toml") && line.contains("users.toml"),
        "every failure, not only the first: {line}"
    );
    assert!(!line.contains("; reloaded"), "{line}");
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k1");
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK
    );

    // Both fixed: both reloaded, and `reload` is Ok.
    write_file(&p.dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&p.dir, "users.toml", &carol_users());
    let line = p.proxy.state().reload().expect("both load");
    assert!(
        line.contains("signing.keyring") && line.contains("auth.users_file"),
        "{line}"
    );
    assert_eq!(signing_key(addr, &p.login, &p.upstream).await, "k2");
    assert_eq!(
        login_status(addr, "carol", "carol-pw").await,
        StatusCode::OK
    );
    p.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_the_binary_reloads_the_good_file_and_logs_the_bad_one() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let dir = temp_dir("reload-sighup");
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = write_config(
            &dir,
            &addr.to_string(),
            None,
            &upstream.url(),
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    let session = login_alice_at(addr).await;
    assert_eq!(signing_key(addr, &session, &upstream).await, "k1");

    write_file(&dir, "keys.toml", &keyring_file_text("k2"));
    write_file(&dir, "users.toml", BROKEN_USERS);
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while signing_key(addr, &session, &upstream).await != "k2" {
        assert!(
            Instant::now() < deadline,
            "the key rotation was held back by the broken users file: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        login_status(addr, "alice", ALICE_PASSWORD).await,
        StatusCode::OK,
        "the current users stay"
    );
    let log = proxy.wait_for_log("keeping the current users");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let said = |level: &str, needles: &[&str]| {
        lines.iter().any(|v| {
            v["level"] == level
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("SIGHUP") && needles.iter().all(|n| m.contains(n)))
        })
    };
    assert!(
        said("ERROR", &["auth.users_file", "users.toml", "users[0]"]),
        "{log}"
    );
    assert!(said("INFO", &["signing.keyring", "active key k2"]), "{log}");
    assert!(proxy.stop().success());
}

//! `session.snapshot_file`'s lock, against real `countersign run` processes: a proxy holds
//! `<snapshot_file>.lock` (`flock`) for its whole life. A second proxy given the same file
//! (a second copy started by mistake, or the next one of a restart that overlaps the stop of
//! the one before) waits for it, up to `session.snapshot_lock_wait`: it then restores what the
//! first wrote at its stop, or refuses to start, naming the file, the lock and the key. Before
//! the lock, the second started at once with no sessions, and whichever stopped last wrote
//! the file over the other's. A holder that dies (SIGKILL) holds nothing.
//! Run: `cargo test --all-features --test proxy_session_snapshot_lock`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_snapshot;
mod support_users;

use std::time::{Duration, Instant};

use support::*;
use support_run::*;
use support_snapshot::*;
use support_users::*;

/// A second proxy on the file of a running one waits `snapshot_lock_wait`, then exits 2
/// (the start's failure status) without having listened or touched anything, and says why; the first keeps serving, and
/// its stop writes its sessions, which the next start restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_file_is_refused() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-second");
    let users = Users::five();
    let (mut first, first_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(first_addr, &users, "alice").await;

    let started_at = Instant::now();
    let (mut second, second_addr) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"1s\"\n");
    let status = second
        .wait_exit(Duration::from_secs(20))
        .expect("the second proxy gives up after its wait");
    let took = started_at.elapsed();
    let log = second.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(took >= Duration::from_secs(1), "{took:?}: {log}");
    for part in [
        "another process still holds its lock",
        "sessions.snapshot.lock",
        "after 1s (session.snapshot_lock_wait)",
        "give each proxy a snapshot_file of its own",
    ] {
        assert!(log.contains(part), "{part:?} missing: {log}");
    }
    assert!(!log.contains("proxy listening"), "{log}");
    assert!(std::net::TcpStream::connect(second_addr).is_err());

    // The first is untouched: its session, its stop, its file.
    assert_accepted(first_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    let status = first.stop();
    let log = first.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
    let (third, third_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    assert!(
        third.log().contains("restored 1 of 1 sessions"),
        "{}",
        third.log()
    );
    assert_accepted(third_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A restart that overlaps the stop (the new process started before the old one has ended):
/// the new one waits for the old one's stop, then restores the sessions it wrote, and serves
/// them. Before the lock it restored nothing (the file is written at the end of the stop)
/// and logged every user out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapping_restart_restores_what_the_stop_wrote() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-overlap");
    let users = Users::five();
    let (mut old, old_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(old_addr, &users, "alice").await;
    let erin = login(old_addr, &users, "erin").await;

    let (mut new, new_addr) = waiting_snapshot_proxy(&dir, &upstream, &users, "");
    let status = old.stop();
    assert!(status.success(), "{status}: {}", old.log());
    assert!(old.log().contains("wrote 2 sessions"), "{}", old.log());
    assert!(
        wait_started(&mut new, new_addr, Duration::from_secs(30)),
        "{}",
        new.log()
    );
    let log = new.log();
    assert!(log.contains("restored 2 of 2 sessions"), "{log}");
    assert_accepted(new_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    assert_accepted(new_addr, &upstream, &erin, "erin", &["a", "b"]).await;
    // It holds the lock now: the file is its own until it stops.
    let (mut another, _) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"1s\"\n");
    assert_eq!(
        another
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(2),
        "{}",
        another.log()
    );
}

/// The lock dies with its holder: after a SIGKILL (a crash, the OOM killer) the next proxy
/// starts at once, without waiting. (A guard: a lock that outlived its process, a lock file
/// with a pid in it, say, would hold every restart after a crash for the whole wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_holds_nothing() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-killed");
    let users = Users::five();
    let (mut crashed, _) = started_snapshot_proxy(&dir, &upstream, &users, "");
    crashed.child.kill().unwrap();
    crashed.child.wait().unwrap();

    let started_at = Instant::now();
    let (next, next_addr) =
        started_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"20s\"\n");
    assert!(
        started_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        started_at.elapsed()
    );
    assert!(
        next.json_messages("WARN", &["holds its lock"]).is_empty(),
        "{}",
        next.log()
    );
    assert!(
        next.log().contains("none (no graceful stop"),
        "{}",
        next.log()
    );
    login(next_addr, &users, "alice").await;
}

/// SIGTERM while waiting for the lock ends the wait at once: exit 0, nothing restored or
/// removed (the holder's stop still writes its snapshot for the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_waiting_ends_the_wait() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-term");
    let users = Users::five();
    let (mut holder, holder_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(holder_addr, &users, "alice").await;

    let (mut waiter, _) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"60s\"\n");
    let asked = Instant::now();
    waiter.signal("TERM");
    let status = waiter
        .wait_exit(Duration::from_secs(10))
        .expect("SIGTERM ends the wait");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let log = waiter.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped while waiting for the lock"), "{log}");

    assert_accepted(holder_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    assert!(holder.stop().success(), "{}", holder.log());
    assert!(dir.join(SNAPSHOT_FILE).is_file(), "{}", holder.log());
}

/// `snapshot_lock_wait` without `snapshot_file` is a config error naming the key (it would
/// do nothing); a wait that is not a duration is one too. `check-config` refuses a snapshot
/// whose lock file is a file the config reads (the users file here: the proxy would hold it
/// open and locked; only `run` used to refuse it), and a snapshot named like another's lock.
#[test]
fn the_wait_is_checked_with_the_config() {
    let dir = temp_dir("snaplock-config");
    let keys = keyring_file_text("k1");
    let users = Users::five();
    for (session, expected) in [
        (
            "snapshot_lock_wait = \"5s\"\n",
            "session.snapshot_lock_wait: only with session.snapshot_file",
        ),
        (
            "snapshot_file = \"sessions.snapshot\"\nsnapshot_lock_wait = \"soon\"\n",
            "session.snapshot_lock_wait",
        ),
        (
            "snapshot_file = \"sessions.snapshot\"\nsnapshot_lock_wait = \"0s\"\n",
            "session.snapshot_lock_wait",
        ),
        (
            "snapshot_file = \"users.toml.snapshot\"\n",
            "session.snapshot_file: its lock file",
        ),
        (
            "snapshot_file = \"other.snapshot.lock\"\n",
            "a name ending in .lock is the lock file of another snapshot_file",
        ),
    ] {
        let config = write_config(
            &dir,
            "127.0.0.1:1",
            None,
            "http://127.0.0.1:2",
            &keys,
            &users.text(),
        );
        // The users file is also read as `users.toml.snapshot.lock` (a hard link).
        let lock_alias = dir.join("users.toml.snapshot.lock");
        let _ = std::fs::remove_file(&lock_alias);
        std::fs::hard_link(dir.join("users.toml"), &lock_alias).unwrap();
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "store = \"memory\"\n",
            &format!("store = \"memory\"\n{session}"),
        );
        write(&config, &text);
        let out = std::process::Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{session}: {stderr}");
        assert!(stderr.contains(expected), "{session}: {stderr}");
        assert!(stderr.contains("proxy.toml"), "{session}: {stderr}");
    }
}

/// The default wait covers the previous process's whole stop: 60s, or `shutdown_grace` plus
/// 30s when that is longer (a restart overlapping a stop with a long grace would otherwise
/// give up while that stop is still running normally); a wait set is the wait.
#[test]
fn the_default_wait_outlasts_the_stop() {
    use countersign::proxy::config::ProxyConfig;
    let dir = temp_dir("snaplock-default");
    let users = Users::five();
    for (grace, wait, expected) in [
        ("2s", None, 60),
        ("30s", None, 60),
        ("90s", None, 120),
        ("90s", Some("5s"), 5),
    ] {
        let config = write_config(
            &dir,
            "127.0.0.1:1",
            None,
            "http://127.0.0.1:2",
            &keyring_file_text("k1"),
            &users.text(),
        );
        let wait_line = wait
            .map(|w| format!("snapshot_lock_wait = \"{w}\"\n"))
            .unwrap_or_default();
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(
                "shutdown_grace = \"2s\"",
                &format!("shutdown_grace = \"{grace}\""),
            )
            .replace(
                "store = \"memory\"\n",
                &format!("store = \"memory\"\nsnapshot_file = \"s.snapshot\"\n{wait_line}"),
            );
        write(&config, &text);
        let loaded = ProxyConfig::load(&config).unwrap();
        assert_eq!(
            loaded.session.snapshot_lock_wait,
            Duration::from_secs(expected),
            "shutdown_grace {grace}, snapshot_lock_wait {wait:?}"
        );
    }
}

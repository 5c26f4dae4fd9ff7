//! `session.snapshot_file`'s lock while the proxy runs, against real `countersign run`
//! processes. `flock` locks a file, not a name: before this, removing `<snapshot>.lock` while
//! a proxy held it (a cleanup of `*.lock`) let a second proxy on the same snapshot file create
//! a new lock file, lock it at once and serve beside the first, unnoticed; each then wrote the
//! snapshot over the other's at its stop. Now the running proxy looks at the name every second
//! and takes it again (a WARN line), or, when another process holds the file there, says so in
//! one ERROR line; `countersign_session_snapshot_lock_held` says which, for an alert.
//! Run: `cargo test --all-features --test proxy_session_snapshot_lock_kept`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_snapshot;
mod support_users;

use std::fs::File;
use std::time::Duration;

use support::*;
use support_snapshot::*;
use support_users::*;

/// The gauge an operator alerts on: 1 while the proxy holds its lock, 0 while it does not.
const LOCK_HELD: &str = "countersign_session_snapshot_lock_held";

/// The lock file removed under a running proxy: within a few seconds the proxy has a lock file
/// there again (a WARN line says what happened), and a second proxy on the same file waits for
/// the first, as it did before the removal, then gives up (exit 2) without having served. The
/// first keeps its sessions and writes them at its stop. (Before: the second started at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_lock_file_is_taken_again_so_a_second_proxy_still_waits() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-removed");
    let users = Users::five();
    let (mut first, first_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(first_addr, &users, "alice").await;
    let lock = dir.join(format!("{SNAPSHOT_FILE}.lock"));

    std::fs::remove_file(&lock).unwrap();
    let warned = first.wait_json_messages("WARN", &["was removed or replaced", "locked again"], 1);
    assert!(warned[0].contains("sessions.snapshot.lock"), "{warned:?}");
    assert!(lock.is_file(), "no lock file after the WARN line");

    let (mut second, second_addr) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"1s\"\n");
    let status = second
        .wait_exit(Duration::from_secs(20))
        .expect("the second proxy gives up after its wait");
    assert_eq!(status.code(), Some(2), "{}", second.log());
    assert!(std::net::TcpStream::connect(second_addr).is_err());

    assert_accepted(first_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    let status = first.stop();
    let log = first.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
    assert_eq!(
        first
            .json_messages("WARN", &["was removed or replaced"])
            .len(),
        1,
        "{log}"
    );
    assert!(first.json_messages("ERROR", &[]).is_empty(), "{log}");
}

/// Another process's locked file renamed over the lock file's name (what a second proxy holds
/// after the first's file was removed): one ERROR line that names the lock file and says what
/// it means, not one per check; once that process lets go, the proxy takes the name again
/// (WARN), and its stop still writes its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_held_by_another_process_is_one_error_line() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-replaced");
    let users = Users::five();
    let (mut proxy, addr, admin) = started_snapshot_proxy_with_admin(&dir, &upstream, &users, "");
    assert_eq!(gauge(admin, LOCK_HELD).await, 1);
    let alice = login(addr, &users, "alice").await;
    let lock = dir.join(format!("{SNAPSHOT_FILE}.lock"));

    // Locked before it takes the name, so the proxy never finds the name free in between.
    let other_name = dir.join("state/other.lock");
    let other = File::create(&other_name).unwrap();
    rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    std::fs::rename(&other_name, &lock).unwrap();

    let said = proxy.wait_json_messages("ERROR", &["another process holds"], 1);
    for part in [
        "sessions.snapshot.lock",
        "second proxy",
        "snapshot_file of its own",
    ] {
        assert!(said[0].contains(part), "{part:?} missing: {said:?}");
    }
    // Three more checks find the same: still one line.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        proxy
            .json_messages("ERROR", &["another process holds"])
            .len(),
        1,
        "{}",
        proxy.log()
    );
    assert_eq!(gauge(admin, LOCK_HELD).await, 0);
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;

    drop(other);
    proxy.wait_json_messages("WARN", &["locked again"], 1);
    assert_eq!(gauge(admin, LOCK_HELD).await, 1);
    let status = proxy.stop();
    let log = proxy.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
}

/// The snapshot's folder removed under a running proxy: the lock cannot be taken again, which
/// is one ERROR line (not one per check) naming the lock file and what to do, early news that
/// the stop cannot write there either. Once the folder is back, the proxy takes the lock again
/// (WARN) and its stop writes its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_cannot_be_taken_again_is_one_error_line_until_it_can() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplock-folder-gone");
    let users = Users::five();
    let (mut proxy, addr, admin) = started_snapshot_proxy_with_admin(&dir, &upstream, &users, "");
    let alice = login(addr, &users, "alice").await;

    std::fs::remove_dir_all(dir.join("state")).unwrap();
    let said = proxy.wait_json_messages("ERROR", &["taking the lock again"], 1);
    for part in [
        "cannot create its lock file",
        "sessions.snapshot.lock",
        "make the folder writable",
    ] {
        assert!(said[0].contains(part), "{part:?} missing: {said:?}");
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        proxy
            .json_messages("ERROR", &["taking the lock again"])
            .len(),
        1,
        "{}",
        proxy.log()
    );
    assert_eq!(gauge(admin, LOCK_HELD).await, 0);

    std::fs::create_dir(dir.join("state")).unwrap();
    proxy.wait_json_messages("WARN", &["locked again"], 1);
    assert!(dir.join(format!("{SNAPSHOT_FILE}.lock")).is_file());
    assert_eq!(gauge(admin, LOCK_HELD).await, 1);
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    let status = proxy.stop();
    let log = proxy.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
}

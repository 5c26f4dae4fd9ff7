//! QA of `session.snapshot_file`'s lock (`<snapshot_file>.lock`, held with `flock` for the
//! proxy's life), against real `countersign run` processes and a real loopback upstream, as an
//! operator and a hostile local user would try it: links planted at the lock's name, a lock
//! file that is a file the config reads, signals during the wait, `check-config` beside a
//! running proxy, a start refused while another process holds the lock.
//! Run: `cargo test --all-features --test proxy_session_snapshot_lock_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_snapshot;
mod support_users;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use support_run::*;
use support_snapshot::*;
use support_users::*;

const LOCK: &str = "state/sessions.snapshot.lock";

/// Whether some process holds an exclusive `flock` on `path` now (`flock -n` fails).
fn flocked(path: &Path) -> bool {
    let status = Command::new("flock")
        .args(["-n", "-E", "75"])
        .arg(path)
        .arg("true")
        .status()
        .unwrap();
    match status.code() {
        Some(0) => false,
        Some(75) => true,
        other => panic!("flock {}: {other:?}", path.display()),
    }
}

/// Another process (not a proxy) holding `path`'s lock until killed: `flock` running `sleep`.
struct ForeignHolder(Child);

impl ForeignHolder {
    fn hold(path: &Path) -> ForeignHolder {
        // `-o`: `sleep` does not inherit the lock's file, so killing `flock` releases it. Not
        // `-n`: it waits out a check of [`flocked`] that holds the lock for an instant.
        let child = Command::new("flock")
            .arg("-o")
            .arg(path)
            .args(["sleep", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !flocked(path) {
            assert!(
                Instant::now() < deadline,
                "flock never took {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ForeignHolder(child)
    }
}

impl Drop for ForeignHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A symbolic link planted at the lock's name (by anyone who can write the snapshot's folder)
/// is not followed: the start used to open it with create+write, which created an empty 0600
/// file wherever it pointed (any path this process may write: as root, anywhere), locked the
/// users file it pointed to, or, pointing to the snapshot itself, created an empty snapshot
/// (an ERROR "not a valid snapshot" at that same start) and let a second proxy on the same
/// file start beside the first (the first's restore removed what the link named, the second
/// created it anew and locked that). Now the link is left alone and named in an ERROR line
/// that says what it is and what to do; the proxy serves, as with any lock it cannot take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_at_the_lock_path_is_not_followed() {
    let upstream = snapshot_upstream().await;
    let users = Users::five();
    for target in ["elsewhere/planted", "users.toml", SNAPSHOT_FILE] {
        let dir = temp_dir("snaplockqa-symlink");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
        write(&dir.join("users.toml"), &users.text());
        std::os::unix::fs::symlink(dir.join(target), dir.join(LOCK)).unwrap();
        let (mut proxy, addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
        let log = proxy.log();
        match target {
            "users.toml" => assert!(
                !flocked(&dir.join("users.toml")),
                "{target}: the users file is locked: {log}"
            ),
            _ => assert!(
                !dir.join(target).exists(),
                "{target}: created through the link: {log}"
            ),
        }
        assert!(!log.contains("not a valid snapshot"), "{target}: {log}");
        let errors = proxy.json_messages("ERROR", &["sessions.snapshot.lock"]);
        assert_eq!(errors.len(), 1, "{target}: {log}");
        for part in ["a symbolic link", "remove it", "would not be noticed"] {
            assert!(errors[0].contains(part), "{target}: {part:?}: {errors:?}");
        }
        assert!(
            !errors[0].contains("make the folder writable"),
            "{target}: the folder is writable: {errors:?}"
        );
        assert!(
            std::fs::symlink_metadata(dir.join(LOCK))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{target}"
        );
        let alice = login(addr, &users, "alice").await;
        assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
        assert!(proxy.stop().success(), "{target}: {}", proxy.log());
    }
}

/// The lock's name is a file the config reads (`auth.users_file =
/// "state/sessions.snapshot.lock"`): the start used to open the users file for writing and
/// hold its lock on it (an edit that replaces the users file, as most editors and `sed -i`
/// do, then leaves the lock on a file no second proxy opens: two proxies on one snapshot), or,
/// with a users file this process may only read, logged that it could not lock, advising a
/// writable folder. Now the start refuses, exit 2, naming the snapshot file, the lock, the key
/// and the remedy, before anything is restored or served; the users file is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_path_naming_a_configured_file_stops_the_start() {
    let upstream = snapshot_upstream().await;
    let users = Users::five();
    let dir = temp_dir("snaplockqa-users");
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    std::fs::create_dir_all(dir.join("state")).unwrap();
    write(&dir.join(LOCK), &users.text());
    let (addr, _) = two_free_addrs();
    let config = dir.join("proxy.toml");
    let text = config_text(&addr.to_string(), None, &upstream.url())
        .replace(
            "store = \"memory\"\n",
            &format!("store = \"memory\"\nsnapshot_file = \"{SNAPSHOT_FILE}\"\n"),
        )
        .replace(
            "users_file = \"users.toml\"",
            &format!("users_file = \"{LOCK}\""),
        );
    write(&config, &text);
    let mut proxy = RunningProxy::spawn(&config, &["--workers", "2"]);
    let status = proxy.wait_exit(Duration::from_secs(20));
    let log = proxy.log();
    let still_locked = status.is_none() && flocked(&dir.join(LOCK));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "it started (users file locked: {still_locked}): {log}"
    );
    for part in [
        "session.snapshot_file",
        "sessions.snapshot.lock",
        "auth.users_file",
        "give snapshot_file",
    ] {
        assert!(log.contains(part), "{part:?} missing: {log}");
    }
    assert!(!log.contains("proxy listening"), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join(LOCK)).unwrap(),
        users.text()
    );
}

/// A lock file that exists but that this process may not open (another user's, 0600: left by
/// a start as root, say) is a problem of that file, not of its folder: the ERROR line used to
/// advise "make the folder writable" whatever the cause. Now it names the file's owner and
/// mode and says to give it to this process's user or remove it once no proxy uses it; the
/// proxy serves. (The proxy runs as `nobody` here, through `setpriv`, so the tests must run as
/// root.)
#[test]
fn a_lock_file_of_another_user_is_named_as_such() {
    // Never skipped: the test command runs as root (as `.ci/run`), like the `chattr` tests.
    assert!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n"),
        "this test needs root, to run the proxy as another user"
    );
    let dir = temp_dir("snaplockqa-owner");
    let users = Users::five();
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let (addr, _) = two_free_addrs();
    let config = dir.join("proxy.toml");
    let text = config_text(&addr.to_string(), None, "http://127.0.0.1:9").replace(
        "store = \"memory\"\n",
        &format!("store = \"memory\"\nsnapshot_file = \"{SNAPSHOT_FILE}\"\n"),
    );
    write(&config, &text);
    let chown = |path: &Path| {
        let status = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    };
    chown(&dir);
    // The lock file root's, 0600 (as a start as root leaves it): nobody may not open it.
    write(&dir.join(LOCK), "");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.join(LOCK), std::fs::Permissions::from_mode(0o600)).unwrap();
    let stderr = dir.join("state-stderr");
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["run", "--workers", "1", "--log-format", "json", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(&stderr).unwrap_or_default();
        if log.contains("proxy listening") || child.try_wait().unwrap().is_some() {
            break log;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("proxy listening"), "{log}");
    let error = log
        .lines()
        .find(|l| l.contains("\"ERROR\"") && l.contains("sessions.snapshot.lock"))
        .unwrap_or_else(|| panic!("no ERROR line for the lock: {log}"));
    for part in [
        "Permission denied",
        "uid 0",
        "mode 0600",
        "this process's user",
        "would not be noticed",
    ] {
        assert!(error.contains(part), "{part:?} missing: {error}");
    }
    assert!(!error.contains("make the folder writable"), "{error}");
}

/// A guard (passed before any fix here): `check-config` beside a running proxy neither waits
/// for nor takes the lock (it answers at once, ok, while the proxy holds it), and the proxy
/// still holds it afterwards: a second proxy on the file is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_beside_a_running_proxy_takes_no_lock() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplockqa-check");
    let users = Users::five();
    let (_proxy, addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    assert!(flocked(&dir.join(LOCK)));
    let config = dir.join(format!("proxy-{}.toml", addr.port()));
    let asked = Instant::now();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert!(flocked(&dir.join(LOCK)));
    let (mut second, _) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"1s\"\n");
    assert_eq!(
        second
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(2),
        "{}",
        second.log()
    );
}

/// A guard (passed before any fix here): SIGHUP (a reload, sent to every proxy by a careless
/// `pkill -HUP`) while waiting for the lock neither ends the wait nor kills the process; once
/// the holder has stopped, the waiter restores what it wrote and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_signal_while_waiting_keeps_waiting() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplockqa-hup");
    let users = Users::five();
    let (mut holder, holder_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(holder_addr, &users, "alice").await;
    let (mut waiter, waiter_addr) = waiting_snapshot_proxy(&dir, &upstream, &users, "");
    waiter.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the waiting proxy: {}",
        waiter.log()
    );
    assert!(holder.stop().success(), "{}", holder.log());
    assert!(
        wait_started(&mut waiter, waiter_addr, Duration::from_secs(30)),
        "{}",
        waiter.log()
    );
    assert!(
        waiter.log().contains("restored 1 of 1 sessions"),
        "{}",
        waiter.log()
    );
    assert_accepted(waiter_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A guard (passed before any fix here): a start refused because another process holds the
/// lock (here `flock(1)`, not a proxy) changes nothing: the snapshot file is neither read nor
/// removed (byte for byte the same), an interrupted stop's temporary file is not removed
/// either (that is the holder's business), and nothing listens. Once the lock is free, the
/// next start restores the sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_changes_nothing() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplockqa-nostate");
    let users = Users::five();
    let (mut first, first_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(first_addr, &users, "alice").await;
    assert!(first.stop().success(), "{}", first.log());
    let snapshot = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
    let leftover = dir.join("state/sessions.snapshot.tmp-1-0123456789abcdef");
    write(&leftover, "half a snapshot");
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .unwrap()
        .set_modified(old)
        .unwrap();

    let holder = ForeignHolder::hold(&dir.join(LOCK));
    let (mut refused, _) =
        waiting_snapshot_proxy(&dir, &upstream, &users, "snapshot_lock_wait = \"1s\"\n");
    let status = refused.wait_exit(Duration::from_secs(20));
    let log = refused.log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(!log.contains("proxy listening"), "{log}");
    assert_eq!(
        std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap(),
        snapshot,
        "{log}"
    );
    assert!(leftover.exists(), "{log}");
    drop(holder);

    let (next, next_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    assert!(
        next.log().contains("restored 1 of 1 sessions"),
        "{}",
        next.log()
    );
    assert_accepted(next_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A guard (passed before any fix here): SIGTERM just as the lock comes free (the holder's
/// stop done, the waiter taking the lock, restoring, starting) loses no session: whether it
/// lands in the wait (nothing restored, the file left) or after it (restored, then written
/// again at the stop), the waiter exits 0 and the next start restores the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_as_the_lock_comes_free_loses_nothing() {
    let upstream = snapshot_upstream().await;
    let dir = temp_dir("snaplockqa-term-late");
    let users = Users::five();
    let (mut holder, holder_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    let alice = login(holder_addr, &users, "alice").await;
    let (mut waiter, _) = waiting_snapshot_proxy(&dir, &upstream, &users, "");
    assert!(holder.stop().success(), "{}", holder.log());
    // The waiter tries every 100 ms: this lands anywhere from the wait to the serving.
    std::thread::sleep(Duration::from_millis(60));
    waiter.signal("TERM");
    let status = waiter
        .wait_exit(Duration::from_secs(20))
        .expect("SIGTERM stops the waiter");
    assert!(status.success(), "{status}: {}", waiter.log());
    let (next, next_addr) = started_snapshot_proxy(&dir, &upstream, &users, "");
    assert!(
        next.log().contains("restored 1 of 1 sessions"),
        "waiter: {}\nnext: {}",
        waiter.log(),
        next.log()
    );
    assert_accepted(next_addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

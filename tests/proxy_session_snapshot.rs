//! `session.snapshot_file`: the in-memory sessions survive a graceful restart of the real
//! `countersign run` process (SIGTERM writes them, the next start restores them), and nothing
//! else comes back: not a session that ended before the stop (logout), not one whose user the
//! users file changed while the proxy was down, not one that expired meanwhile, not a file
//! changed or sealed with a key the keyring no longer has, and not a snapshot that was already
//! restored once (a crash after a restore brings back nothing). Real processes on loopback, a
//! real upstream behind the `VerifyLayer`.
//! Run: `cargo test --all-features --test proxy_session_snapshot`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_users;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::SystemClock;
use http::StatusCode;
use support::*;
use support_run::*;
use support_users::*;

/// `countersign run --workers 2` on `dir` (keys.toml as given, users.toml from `users`), with
/// `session.snapshot_file = "state/sessions.snapshot"` (and `extra_session` keys).
fn spawn(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    keys: &str,
    extra_session: &str,
) -> (RunningProxy, SocketAddr) {
    write(&dir.join("keys.toml"), keys);
    write(&dir.join("users.toml"), &users.text());
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = dir.join(format!("proxy-{}.toml", addr.port()));
        let text = config_text(&addr.to_string(), None, &upstream.url()).replace(
            "store = \"memory\"\n",
            &format!(
                "store = \"memory\"\nsnapshot_file = \"state/sessions.snapshot\"\n{extra_session}"
            ),
        );
        assert!(text.contains("snapshot_file"), "{text}");
        write(&config, &text);
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    (proxy, addr)
}

fn snapshot(dir: &Path) -> PathBuf {
    dir.join("state/sessions.snapshot")
}

/// SIGTERM; the proxy exits 0 after writing its snapshot; the log line says how many.
fn stop_writing(proxy: &mut RunningProxy, sessions: usize) -> String {
    let status = proxy.stop();
    let log = proxy.log();
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains(&format!("wrote {sessions} sessions (sealed with key")),
        "{log}"
    );
    log
}

/// The log line of the restore at start.
fn restore_line(proxy: &RunningProxy) -> String {
    let log = proxy.wait_for_log("session.snapshot_file");
    log.lines()
        .find(|l| l.contains("session.snapshot_file"))
        .unwrap_or_default()
        .to_owned()
}

async fn upstream() -> Upstream {
    start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await
}

/// A graceful restart keeps every live session, with its CSRF token (a state-changing call
/// goes through with the token issued before the restart) and its identity; a session logged
/// out before the stop stays ended; the file is 0600, holds no session id, and is gone once
/// restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_the_live_sessions() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-restart");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    assert!(
        restore_line(&proxy).contains("none"),
        "{}",
        restore_line(&proxy)
    );
    let alice = login(addr, &users, "alice").await;
    let erin = login(addr, &users, "erin").await;
    let bob = login(addr, &users, "bob").await;
    assert_accepted(addr, &upstream, &bob, "bob", &[]).await;
    assert_eq!(logout(addr, &bob).await.status, StatusCode::NO_CONTENT);
    stop_writing(&mut proxy, 2);

    let file = snapshot(&dir);
    let bytes = std::fs::read(&file).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "snapshot mode {mode:o}");
    }
    for (who, login) in [("alice", &alice), ("erin", &erin)] {
        let id = login.cookie.split_once('=').unwrap().1;
        assert!(
            !bytes.windows(id.len()).any(|w| w == id.as_bytes()),
            "{who}'s session id is in the file"
        );
    }

    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let line = restore_line(&proxy);
    assert!(line.contains("restored 2 of 2 sessions"), "{line}");
    assert!(
        !file.exists(),
        "the snapshot is still there after the restore"
    );
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    assert_accepted(addr, &upstream, &erin, "erin", &["a", "b"]).await;
    // The CSRF token issued before the restart still guards (and admits) a write.
    let seen = upstream.raw_count();
    let r = post_json(addr, "/api/x", &alice, "{}").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(upstream.raw_count(), seen + 1);
    let forged = Login {
        cookie: alice.cookie.clone(),
        csrf: erin.csrf.clone(),
    };
    let r = post_json(addr, "/api/x", &forged, "{}").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_refused(addr, &upstream, &bob, "bob (logged out before the stop)").await;
    // A second restart: the sessions are written and restored again.
    stop_writing(&mut proxy, 2);
    let (_proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A snapshot is read once: after a restore, a logout, then a crash (SIGKILL: no snapshot
/// written), the next start has nothing to restore and the logged-out session stays ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_restore_brings_back_nothing() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-crash");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let alice = login(addr, &users, "alice").await;
    let carol = login(addr, &users, "carol").await;
    stop_writing(&mut proxy, 2);

    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    assert!(restore_line(&proxy).contains("restored 2 of 2"));
    assert_eq!(logout(addr, &alice).await.status, StatusCode::NO_CONTENT);
    proxy.signal("KILL");
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    assert!(!snapshot(&dir).exists());

    let (_proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    assert!(
        restore_line(&_proxy).contains("none"),
        "{}",
        restore_line(&_proxy)
    );
    assert_refused(addr, &upstream, &alice, "alice (logged out, then a crash)").await;
    assert_refused(addr, &upstream, &carol, "carol (lost in the crash)").await;
}

/// The users file changes while the proxy is down: the sessions of the users it removed, or
/// whose password or roles it changed, are not restored; the others are (also a user whose
/// roles were only reordered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_changed_while_the_proxy_was_down_are_not_restored() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-users");
    let mut users = Users::five();
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let mut sessions = Vec::new();
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        sessions.push((name, login(addr, &users, name).await));
    }
    stop_writing(&mut proxy, 5);

    users.remove("bob");
    users.reset_password("carol");
    users.set_roles("dave", &["ops", "admin"]);
    users.set_roles("erin", &["b", "a", "b"]);
    let (proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let line = restore_line(&proxy);
    assert!(
        line.contains("restored 2 of 5 sessions") && line.contains("3 whose user changed"),
        "{line}"
    );
    let carol = &sessions.iter().find(|(n, _)| *n == "carol").unwrap().1;
    assert_refused(addr, &upstream, carol, "carol (password)").await;
    assert_changed_refused_unchanged_accepted(addr, &upstream, &sessions).await;
}

/// A session whose idle timeout ran out while the proxy was down is not restored; the
/// downtime counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_expired_while_the_proxy_was_down_are_not_restored() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-expired");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    let short = "idle_timeout = \"2s\"\n";
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, short);
    let alice = login(addr, &users, "alice").await;
    stop_writing(&mut proxy, 1);
    std::thread::sleep(Duration::from_millis(3100));
    let (proxy, addr) = spawn(&dir, &upstream, &users, &keys, short);
    let line = restore_line(&proxy);
    assert!(
        line.contains("restored 0 of 1 sessions") && line.contains("1 expired"),
        "{line}"
    );
    assert_refused(addr, &upstream, &alice, "alice (expired while down)").await;
}

/// A file changed in any way (a byte flipped, cut short, replaced by something else, sealed
/// with another secret under the same key id, or with a key the keyring no longer has) is
/// refused: an ERROR line names the file and the problem, the proxy starts without its
/// sessions, and the file is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_or_foreign_snapshot_is_refused() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-refused");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    use base64::Engine as _;
    let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    // k1 gone (only k2, same secret as before), and k1 with another secret.
    let only_k2 = format!(
        "active = \"k2\"\n[[keys]]\nid = \"k2\"\nsecret = \"{}\"\n",
        b64(8)
    );
    let other_k1 = format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{}\"\n",
        b64(9)
    );
    type Change = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Change, &str, &str)> = vec![
        (
            "a byte flipped",
            Box::new(|b: &mut Vec<u8>| {
                let mid = b.len() / 2;
                b[mid] ^= 1;
            }),
            &keys,
            "its seal does not match",
        ),
        (
            "cut short",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 40)),
            &keys,
            "cut short",
        ),
        (
            "not a snapshot",
            Box::new(|b: &mut Vec<u8>| *b = b"{\"sessions\": []}".to_vec()),
            &keys,
            "not a valid snapshot",
        ),
        (
            "another secret",
            Box::new(|_: &mut Vec<u8>| {}),
            &other_k1,
            "its seal does not match",
        ),
        (
            "key removed",
            Box::new(|_: &mut Vec<u8>| {}),
            &only_k2,
            "which the keyring no longer has",
        ),
    ];
    for (what, change, start_keys, expected) in cases {
        let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
        let alice = login(addr, &users, "alice").await;
        stop_writing(&mut proxy, 1);
        let file = snapshot(&dir);
        let mut bytes = std::fs::read(&file).unwrap();
        change(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();

        let (proxy, addr) = spawn(&dir, &upstream, &users, start_keys, "");
        let errors = proxy.wait_json_messages("ERROR", &["session.snapshot_file"], 1);
        assert!(
            errors[0].contains(expected) && errors[0].contains("starting without its sessions"),
            "{what}: {errors:?}"
        );
        assert!(!file.exists(), "{what}: the refused file is still there");
        if *start_keys == keys {
            assert_refused(addr, &upstream, &alice, what).await;
            // The proxy serves: a new login works.
            let again = login(addr, &users, "alice").await;
            assert_accepted(addr, &upstream, &again, "alice", &["admin", "ops"]).await;
        }
    }
}

/// A stop whose snapshot cannot be written (its folder was removed while the proxy ran)
/// exits 1 with an ERROR line naming the file. (A lock check that ran after the removal has
/// said so already, in an ERROR line of its own about the lock file: not counted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_written_fails_the_stop() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-unwritable");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    login(addr, &users, "alice").await;
    std::fs::remove_dir_all(dir.join("state")).unwrap();
    let status = proxy.stop();
    let log = proxy.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let errors = proxy.json_messages("ERROR", &["the sessions end with this process"]);
    assert!(
        errors.len() == 1
            && errors[0].contains("session.snapshot_file")
            && errors[0].contains("sessions.snapshot"),
        "{log}"
    );
}

/// `check-config` (and so `run`) refuses the key where it cannot work, naming it.
#[test]
fn the_key_is_checked() {
    let dir = temp_dir("snapshot-config");
    write(&dir.path().join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.path().join("users.toml"), &Users::five().text());
    let config = dir.path().join("proxy.toml");
    let base = config_text("127.0.0.1:1", None, "http://127.0.0.1:2");
    let cases = [
        (
            "store = \"memory\"\nsnapshot_file = \"missing/sessions.snapshot\"\n",
            "session.snapshot_file",
            "does not exist",
        ),
        (
            "store = \"memory\"\nsnapshot_file = \".\"\n",
            "session.snapshot_file",
            "",
        ),
        // A file the config reads for something else: the start would remove it.
        (
            "store = \"memory\"\nsnapshot_file = \"users.toml\"\n",
            "session.snapshot_file",
            "is the file auth.users_file names",
        ),
        (
            "store = \"memory\"\nsnapshot_file = \"proxy.toml\"\n",
            "session.snapshot_file",
            "is the file the config file names",
        ),
        (
            "store = \"redis\"\nredis_url = \"redis://127.0.0.1:1\"\nsnapshot_file = \"s.snapshot\"\n",
            "session.snapshot_file",
            "only with store = ",
        ),
    ];
    for (session, key, problem) in cases {
        write(&config, &base.replace("store = \"memory\"\n", session));
        let out = std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{session}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(problem) && stderr.contains("proxy.toml"),
            "{session}: {stderr}"
        );
    }
    // Accepted in an existing folder.
    write(
        &config,
        &base.replace(
            "store = \"memory\"\n",
            "store = \"memory\"\nsnapshot_file = \"sessions.snapshot\"\n",
        ),
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A start that fails after the restore (its address still taken, as by an old process that
/// has not let go yet) writes the sessions back: the next start restores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_after_the_restore_keeps_the_sessions() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-failed-start");
    let users = Users::five();
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let alice = login(addr, &users, "alice").await;
    stop_writing(&mut proxy, 1);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.join("proxy-taken.toml");
    write(
        &config,
        &config_text(
            &taken.local_addr().unwrap().to_string(),
            None,
            &upstream.url(),
        )
        .replace(
            "store = \"memory\"\n",
            "store = \"memory\"\nsnapshot_file = \"state/sessions.snapshot\"\n",
        ),
    );
    let mut failed = RunningProxy::spawn(&config, &[]);
    let status = failed
        .wait_exit(Duration::from_secs(20))
        .expect("the start fails");
    let log = failed.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("restored 1 of 1 sessions"), "{log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
    assert!(snapshot(&dir).exists(), "{log}");
    drop(taken);

    let (proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    assert!(restore_line(&proxy).contains("restored 1 of 1"));
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A user whose name and roles, encoded, are over the 64 KiB a restore reads (dave, with one
/// role of 70,000 letters here; a `verify_url` answer with a huge role list in production):
/// the stop leaves his session out, says so in a WARN line, and writes the others, which the
/// next start restores. It used to refuse to write the file at all: exit 1, and every user
/// logged out by the restart because of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_too_long_to_write_costs_only_its_own_place() {
    let upstream = upstream().await;
    let dir = temp_dir("snapshot-too-long");
    let mut users = Users::five();
    let huge = "r".repeat(70_000);
    users.set_roles("dave", &[huge.as_str()]);
    let keys = keyring_file_text("k1");
    let (mut proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let alice = login(addr, &users, "alice").await;
    let dave = login(addr, &users, "dave").await;
    let erin = login(addr, &users, "erin").await;
    stop_writing(&mut proxy, 2);
    let warnings = proxy.json_messages("WARN", &["session.snapshot_file", "not written"]);
    assert!(
        warnings.len() == 1 && warnings[0].contains("1 sessions not written"),
        "{}",
        proxy.log()
    );

    let (proxy, addr) = spawn(&dir, &upstream, &users, &keys, "");
    let line = restore_line(&proxy);
    assert!(line.contains("restored 2 of 2 sessions"), "{line}");
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
    assert_accepted(addr, &upstream, &erin, "erin", &["a", "b"]).await;
    assert_refused(addr, &upstream, &dave, "dave (identity over 64 KiB)").await;
}

/// The library calls the proxy makes at its stop and start, on a store of its own.
mod direct {
    use countersign::core::{Identity, Keyring, Secret};
    use countersign::proxy::session::{
        MemorySessionStore, SessionId, SessionStore as _, SessionTimeouts,
    };
    use countersign::proxy::session_snapshot::{restore, save, MAX_BYTES_PER_SESSION};

    use super::*;

    fn store(max_sessions: usize) -> MemorySessionStore {
        MemorySessionStore::new(
            SessionTimeouts {
                idle: Duration::from_secs(3_600),
                absolute: Duration::from_secs(7_200),
            },
            max_sessions,
        )
    }

    fn keys() -> Keyring {
        Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap()
    }

    async fn live(store: &MemorySessionStore, id: &SessionId, now: u64) -> bool {
        store.get(id, now, false).await.unwrap().is_some()
    }

    /// One session over the identity limit among others: `save` writes the others (the
    /// header's count is theirs: the restore finds 2 of 2) and counts it as left out.
    #[tokio::test]
    async fn save_leaves_out_only_the_session_too_long_to_write() {
        let dir = temp_dir("snapshot-too-long-direct");
        let file = dir.path().join("sessions.snapshot");
        let before = store(10);
        let spaces = " ".repeat(22_000); // each space percent-encoded: 66,000 bytes
        let (a, _) = before
            .create(&Identity::new("a", ["r"]), 1_000)
            .await
            .unwrap();
        let (huge, _) = before
            .create(&Identity::new("huge", [spaces.as_str()]), 1_001)
            .await
            .unwrap();
        let (b, _) = before
            .create(&Identity::new("b", Vec::<String>::new()), 1_002)
            .await
            .unwrap();
        let saved = save(&before, &file, &keys(), None, 1_010).unwrap();
        assert_eq!((saved.sessions, saved.too_long), (2, 1), "{saved}");
        assert!(
            saved.to_string().contains("not written: 1 whose"),
            "{saved}"
        );

        let after = store(10);
        let report = restore(&after, &file, &keys(), None, 1_020, 10)
            .unwrap()
            .unwrap();
        assert_eq!((report.in_file, report.restored), (2, 2), "{report}");
        assert!(live(&after, &a, 1_020).await);
        assert!(live(&after, &b, 1_020).await);
        assert!(!live(&after, &huge, 1_020).await);
    }

    /// `session.max_sessions` lowered a lot since the stop (200 to 5), with a file larger than
    /// 5 × 4 KiB + 64 KiB: the 5 most recently used sessions are restored, the other 195
    /// counted over `max_sessions`, as the operations guide says. The file used to be refused
    /// whole, over a size limit of the new `max_sessions`.
    #[tokio::test]
    async fn lowering_max_sessions_a_lot_keeps_the_most_recently_used() {
        let dir = temp_dir("snapshot-lowered");
        let file = dir.path().join("sessions.snapshot");
        let before = store(200);
        let role = "x".repeat(500);
        let mut ids = Vec::new();
        for i in 0..200u64 {
            let identity = Identity::new(format!("user-{i:03}"), [role.as_str()]);
            // Used last in the order created: the last five are the most recent.
            ids.push(before.create(&identity, 1_000 + i).await.unwrap().0);
        }
        save(&before, &file, &keys(), None, 1_300).unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        assert!(
            len > 5 * MAX_BYTES_PER_SESSION + 64 * 1024,
            "{len} bytes: not over what 5 sessions once allowed"
        );

        let after = store(5);
        let report = restore(&after, &file, &keys(), None, 1_301, 5)
            .unwrap()
            .unwrap();
        assert_eq!(
            (report.in_file, report.restored, report.over_capacity),
            (200, 5, 195),
            "{report}"
        );
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(live(&after, id, 1_301).await, i >= 195, "session {i}");
        }
    }
}

//! `session.snapshot_file`, a QA pass against the real `countersign run` process: what is at
//! the configured path when the proxy starts and stops is not always a snapshot the proxy
//! wrote. A FIFO there must not hang the start (nor make SIGTERM useless), and a path that
//! names another file (the users file, by a slip of the config) must not delete or overwrite
//! that file. Real processes on loopback, a real upstream behind the `VerifyLayer`.
//! Run: `cargo test --all-features --test proxy_session_snapshot_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_run;
mod support_snapshot;
mod support_users;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use countersign::clock::SystemClock;
use support::*;
use support_run::*;
use support_snapshot::*;
use support_users::*;

/// `countersign run --workers 2` on `dir` (keys.toml and users.toml written), with
/// `session.snapshot_file = <snapshot>` (relative to `dir`). Waits at most `limit` for
/// "proxy listening"; the flag is false if it exited first or does not listen by then.
fn spawn_within(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    snapshot: &str,
    limit: Duration,
) -> (RunningProxy, SocketAddr, bool) {
    spawn_for("http://app.test", dir, upstream, users, snapshot, limit)
}

/// [`spawn_within`] with `server.public_origin = origin`.
fn spawn_for(
    origin: &str,
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    snapshot: &str,
    limit: Duration,
) -> (RunningProxy, SocketAddr, bool) {
    let (mut proxy, addr) = spawn_snapshot_proxy(dir, upstream, users, origin, snapshot, "");
    let started = wait_started(&mut proxy, addr, limit);
    (proxy, addr, started)
}

async fn upstream() -> Upstream {
    start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await
}

/// A FIFO at the snapshot path (left by a tool, or planted by anyone who can write the
/// folder): the start used to block for ever in `open` (a FIFO's open waits for a writer),
/// before listening and on the thread that handles signals, so even SIGTERM could not stop it.
/// Now: an ERROR line names the file, the proxy starts without sessions, and the stop writes
/// a real snapshot in its place, which the next start restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_at_the_snapshot_path_does_not_hang_the_start() {
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-fifo");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let fifo = dir.join("state/sessions.snapshot");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());

    let (mut proxy, addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(10),
    );
    if !listening {
        // Show that SIGTERM does not help either, then give up on this process.
        proxy.signal("TERM");
        let stopped = proxy.wait_exit(Duration::from_secs(3));
        panic!(
            "a FIFO at the snapshot path: not listening after 10 s (SIGTERM then: {stopped:?}): \
             {}",
            proxy.log()
        );
    }
    let errors = proxy.json_messages("ERROR", &["session.snapshot_file", "sessions.snapshot"]);
    assert!(
        errors.len() == 1
            && errors[0].contains("not a regular file")
            && errors[0].contains("starting without its sessions"),
        "{}",
        proxy.log()
    );
    let alice = login(addr, &users, "alice").await;
    let status = proxy.stop();
    let log = proxy.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("wrote 1 sessions"), "{log}");
    assert!(std::fs::metadata(&fifo).unwrap().is_file(), "{log}");

    let (proxy, addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(30),
    );
    assert!(listening, "{}", proxy.log());
    assert!(
        proxy.log().contains("restored 1 of 1 sessions"),
        "{}",
        proxy.log()
    );
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A character device for the tests below: a copy of `/dev/null`'s (1, 3) made with `mknod`
/// in `dir` where this process may (root), else `/dev/null` itself, which a process that may
/// not `mknod` may not remove either, so a regression cannot take it from the host.
fn a_device(dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("null-copy");
    let made = std::process::Command::new("mknod")
        .arg(&copy)
        .args(["c", "1", "3"])
        .output()
        .unwrap();
    if made.status.success() {
        return copy;
    }
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_ne!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "root, and mknod failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    "/dev/null".into()
}

fn is_char_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_char_device())
}

/// A review's repro: `snapshot_file = "/dev/null"` (as if to turn snapshots off) passed
/// `check-config`; `run` then removed what was at the path (as root: the host's `/dev/null`)
/// and the stop wrote a snapshot in its place, or, as another user, failed to start with
/// exit 2 after `check-config` had said ok. Now both refuse it, exit 2, naming the key and
/// the device, and the device is left as it was; through a symlink too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_at_the_snapshot_path_is_refused_and_left_alone() {
    let upstream = upstream().await;
    let users = Users::five();
    let dir = temp_dir("snapqa-device");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let device = a_device(&dir);
    std::os::unix::fs::symlink(&device, dir.join("state/null-link")).unwrap();
    for snapshot in [device.to_str().unwrap(), "state/null-link"] {
        let (mut proxy, _addr, listening) =
            spawn_within(&dir, &upstream, &users, snapshot, Duration::from_secs(10));
        let status = proxy.wait_exit(Duration::from_secs(10));
        let log = proxy.log();
        assert!(
            is_char_device(&device),
            "{snapshot}: the device is gone: {log}"
        );
        assert!(!listening, "{snapshot}: the proxy started: {log}");
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{snapshot}: {log}");
        assert!(
            log.contains("session.snapshot_file") && log.contains("is a device, not a file"),
            "{snapshot}: {log}"
        );
        let config = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| {
                path.extension().is_some_and(|ext| ext == "toml")
                    && path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("proxy-")
            })
            .unwrap();
        let checked = support_cli::run_countersign(
            ["check-config", "--config", config.to_str().unwrap()],
            b"",
        );
        assert_eq!(checked.status.code(), Some(2), "{snapshot}: {checked:?}");
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert!(
            stderr.contains("session.snapshot_file")
                && stderr.contains("is a device, not a file (the proxy removes this file when it starts and writes a snapshot"),
            "{snapshot}: {stderr}"
        );
        std::fs::remove_file(config).unwrap();
        assert!(is_char_device(&device), "{snapshot}: the device is gone");
    }
}

/// `snapshot_file` naming a file the config reads for something else (the users file, the
/// keyring: a slip `check-config` lets through, or a symlink): the start used to remove it
/// before reading a byte (an ERROR line "not a valid snapshot", and the proxy served on the
/// users it had loaded), and the stop to rename a snapshot over it, so the next start failed
/// on a users file or keyring that was gone. Now the start refuses, exit 2, before touching
/// anything, with a message naming the config file, both keys and the file; the file is
/// intact. Checked for the users file by name, and for the keyring through a symlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_path_naming_another_configured_file_stops_the_start() {
    let upstream = upstream().await;
    let users = Users::five();
    for (snapshot, key, file) in [
        ("users.toml", "auth.users_file", "users.toml"),
        ("state/keys-link", "signing.keyring", "keys.toml"),
    ] {
        let dir = temp_dir("snapqa-other-file");
        write(&dir.join("keys.toml"), &keyring_file_text("k1"));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::os::unix::fs::symlink(dir.join("keys.toml"), dir.join("state/keys-link")).unwrap();
        let before = std::fs::read_to_string(dir.join(file)).ok();
        let (mut proxy, _addr, listening) =
            spawn_within(&dir, &upstream, &users, snapshot, Duration::from_secs(10));
        let status = proxy.wait_exit(Duration::from_secs(10));
        let log = proxy.log();
        let kept = std::fs::read_to_string(dir.join(file)).ok();
        assert!(
            kept.is_some() && (file != "keys.toml" || kept == before),
            "{snapshot}: {file} was removed or changed (listening: {listening}): {log}"
        );
        assert!(!listening, "{snapshot}: the proxy started: {log}");
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{snapshot}: {log}");
        assert!(
            log.contains("proxy-")
                && log.contains("session.snapshot_file")
                && log.contains(key)
                && log.contains(file)
                && log.contains("a file of its own"),
            "{snapshot}: {log}"
        );
    }
}

/// The format version the test forges (`session_snapshot::VERSION`).
const FORMAT_VERSION: u8 = 2;

/// A file in the snapshot's format that only someone without the keyring could have written:
/// `count` sessions of `identity_bytes` each under key id `k1`, and a seal of zeros.
fn forged_snapshot(path: &Path, count: u64, identity_bytes: u32) {
    use std::io::Write as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    out.write_all(b"countersign-session-snapshot\0").unwrap();
    out.write_all(&[FORMAT_VERSION]).unwrap();
    out.write_all(&now.to_be_bytes()).unwrap();
    out.write_all(&2u16.to_be_bytes()).unwrap();
    out.write_all(b"k1").unwrap();
    if FORMAT_VERSION >= 2 {
        let origin = b"http://app.test";
        out.write_all(&(origin.len() as u16).to_be_bytes()).unwrap();
        out.write_all(origin).unwrap();
    }
    out.write_all(&count.to_be_bytes()).unwrap();
    let identity = vec![b'a'; identity_bytes as usize];
    for i in 0..count {
        out.write_all(&[(i % 251) as u8; 32]).unwrap();
        out.write_all(&[7u8; 32]).unwrap();
        out.write_all(&now.to_be_bytes()).unwrap();
        out.write_all(&now.to_be_bytes()).unwrap();
        out.write_all(&[0]).unwrap();
        out.write_all(&identity_bytes.to_be_bytes()).unwrap();
        out.write_all(&identity).unwrap();
    }
    out.write_all(&[0u8; 32]).unwrap();
    out.flush().unwrap();
}

/// The peak resident memory of process `pid`, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A forged snapshot of 256 MiB (4,000 sessions of 64 KiB identities: under the default
/// `max_sessions` × 4 KiB size limit, and a count the file can hold) whose seal is wrong: it
/// is refused ("its seal does not match"), and the proxy does not hold the file's sessions in
/// memory to find that out. It used to parse every session into memory first and check the
/// seal at the end: a peak of over 256 MiB for a file anyone who can write the folder can
/// make, up to 4 GiB × ~1.5 with the default `max_sessions`. Now the seal is checked in a
/// streaming pass before anything is parsed: the peak stays that of an idle proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_snapshot_is_refused_without_reading_it_into_memory() {
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-forged");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    forged_snapshot(&dir.join("state/sessions.snapshot"), 4_000, 64 * 1024);
    let (proxy, _addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(60),
    );
    assert!(listening, "{}", proxy.log());
    let errors = proxy.json_messages("ERROR", &["session.snapshot_file"]);
    assert!(
        errors.len() == 1 && errors[0].contains("its seal does not match"),
        "{}",
        proxy.log()
    );
    let peak = peak_rss_kib(proxy.child.id());
    assert!(
        peak < 128 * 1024,
        "peak resident memory {peak} KiB restoring a forged 256 MiB snapshot"
    );
}

/// Two proxies given one `snapshot_file` (two sites on one host, the docs' example path
/// copied into both configs; one keyring and one users file): the snapshot one writes at its
/// stop used to be restored by the other at its start, so a session cookie of
/// `http://b.test` became a live session of `http://app.test`. Now the file carries the
/// `public_origin` of the proxy that wrote it (under the seal): the other proxy refuses it
/// with an ERROR line saying so, and the cookie stays foreign there. The proxy that wrote it
/// still restores its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_proxy_is_not_restored() {
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-two-proxies");
    let users = Users::five();
    let snapshot = "state/sessions.snapshot";
    let limit = Duration::from_secs(30);
    let (mut b, b_addr, listening) =
        spawn_for("http://b.test", &dir, &upstream, &users, snapshot, limit);
    assert!(listening, "{}", b.log());
    let alice_at_b = login(b_addr, &users, "alice").await;
    let status = b.stop();
    assert!(status.success(), "{}", b.log());

    let (mut a, a_addr, listening) =
        spawn_for("http://app.test", &dir, &upstream, &users, snapshot, limit);
    assert!(listening, "{}", a.log());
    assert_refused(
        a_addr,
        &upstream,
        &alice_at_b,
        "alice's cookie of b.test at app.test",
    )
    .await;
    let errors = a.json_messages("ERROR", &["session.snapshot_file"]);
    assert!(
        errors.len() == 1
            && errors[0].contains("\"http://b.test\"")
            && errors[0].contains("\"http://app.test\"")
            && errors[0].contains("starting without its sessions"),
        "{}",
        a.log()
    );
    assert!(a.stop().success(), "{}", a.log());

    // b.test refuses the file app.test wrote, and its own round trip works.
    let (mut b, b_addr, listening) =
        spawn_for("http://b.test", &dir, &upstream, &users, snapshot, limit);
    assert!(listening, "{}", b.log());
    let alice_at_b = login(b_addr, &users, "alice").await;
    assert!(b.stop().success(), "{}", b.log());
    let (b, b_addr, listening) =
        spawn_for("http://b.test", &dir, &upstream, &users, snapshot, limit);
    assert!(listening, "{}", b.log());
    assert!(b.log().contains("restored 1 of 1 sessions"), "{}", b.log());
    assert_accepted(b_addr, &upstream, &alice_at_b, "alice", &["admin", "ops"]).await;
}

/// Makes a folder unwritable for this process, and writable again on drop: mode 0555, and
/// where that does not stop this process (root ignores modes) `chattr +i` as well (then even
/// root cannot create files in it). Panics when neither makes it unwritable: the test must
/// not pass without having checked anything.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Immutable {
        use std::os::unix::fs::PermissionsExt as _;
        let frozen = Immutable(dir.to_path_buf());
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        if Self::writable(dir) {
            let set = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .expect("chattr (e2fsprogs) runs");
            assert!(set.success(), "chattr +i {} failed", dir.display());
        }
        assert!(!Self::writable(dir), "{} is still writable", dir.display());
        frozen
    }

    fn writable(dir: &Path) -> bool {
        let probe = dir.join(".probe");
        let created = std::fs::write(&probe, b"x").is_ok();
        let _ = std::fs::remove_file(&probe);
        created
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

/// The snapshot's folder cannot be written when the proxy starts (read-only, wrong owner):
/// the start used to say nothing (an INFO "none"), and the operator learnt it at the stop,
/// from an exit status 1, when every session was lost already. Now the start says it (an
/// ERROR line naming the file and the problem, the proxy serving all the same), while there is
/// time to fix the folder: fixed while the proxy runs, the stop writes the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_the_stop_cannot_write_is_reported_at_the_start() {
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-readonly");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let frozen = Immutable::new(&dir.join("state"));
    let (mut proxy, addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(30),
    );
    assert!(listening, "{}", proxy.log());
    let errors = proxy.json_messages("ERROR", &["session.snapshot_file", "sessions.snapshot"]);
    assert!(
        errors.len() == 2
            && errors[0].contains("cannot create its lock file")
            && errors[0].contains("sessions.snapshot.lock")
            && errors[1].contains("cannot create a file beside it")
            && errors[1].contains("the stop will not be able to write"),
        "{}",
        proxy.log()
    );
    let alice = login(addr, &users, "alice").await;
    drop(frozen);
    let status = proxy.stop();
    assert!(status.success(), "{status}: {}", proxy.log());
    assert!(proxy.log().contains("wrote 1 sessions"), "{}", proxy.log());
    let (proxy, addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(30),
    );
    assert!(listening, "{}", proxy.log());
    assert_accepted(addr, &upstream, &alice, "alice", &["admin", "ops"]).await;
}

/// A stop that did not finish writing (SIGKILL at systemd's `TimeoutStopSec` with very many
/// sessions, the host losing power) leaves its temporary file beside the snapshot, up to the
/// size of the snapshot (100 MB per 1M sessions, CSRF tokens and user names inside). Since
/// the temporary names became random nothing ever removed one: each such stop added a file
/// until the disk was full, and then the stop could not write the snapshot at all. Now the
/// start removes a leftover that has not changed for 10 minutes (an INFO line says how many),
/// and keeps a fresh one (a stop of another process may still be writing it) and any other
/// file of the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_file_left_by_an_interrupted_stop_is_removed_at_the_start() {
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-leftover");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let state = dir.join("state");
    let old = state.join("sessions.snapshot.tmp-4242-00000000deadbeef");
    let fresh = state.join("sessions.snapshot.tmp-4243-00000000cafef00d");
    let other = state.join("other.snapshot.tmp-4242-00000000deadbeef");
    for file in [&old, &fresh, &other] {
        write(file, "sealed sessions, cut short by a SIGKILL");
    }
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for file in [&old, &other] {
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }
    let (mut proxy, _addr, listening) = spawn_within(
        &dir,
        &upstream,
        &users,
        "state/sessions.snapshot",
        Duration::from_secs(30),
    );
    assert!(listening, "{}", proxy.log());
    let log = proxy.log();
    assert!(!old.exists(), "the leftover is still there: {log}");
    assert!(fresh.exists(), "a fresh temporary file was removed: {log}");
    assert!(other.exists(), "another file's leftover was removed: {log}");
    let lines = proxy.json_messages("INFO", &["session.snapshot_file", "removed 1 temporary"]);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(proxy.json_messages("ERROR", &[]).is_empty(), "{log}");
    assert!(proxy.stop().success(), "{}", proxy.log());
}

/// `snapshot_file` naming a key's `secret_file` (a file the config reads through the keyring,
/// e.g. both under `/var/lib/countersign/`): the first pass refused the keyring, the users
/// file and the TLS files, not the secret files the keyring names, so the start read the
/// secret as a snapshot ("not a valid snapshot"), removed it, and served; the stop then wrote
/// a snapshot where the secret had been, and the next start failed on a key that was gone.
/// Now it is a config error like the others: exit 2, the secret file intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_path_naming_a_keys_secret_file_stops_the_start() {
    use base64::Engine as _;
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-secret-file");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let secret = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    write(&dir.join("state/k1.secret"), &secret);
    write(
        &dir.join("keys.toml"),
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"state/k1.secret\"\n",
    );
    write(&dir.join("users.toml"), &users.text());
    let (addr, _) = two_free_addrs();
    let config = dir.join("proxy.toml");
    let text = config_text(&addr.to_string(), None, &upstream.url()).replace(
        "store = \"memory\"\n",
        "store = \"memory\"\nsnapshot_file = \"state/k1.secret\"\n",
    );
    write(&config, &text);
    let mut proxy = RunningProxy::spawn(&config, &["--workers", "2"]);
    let status = proxy.wait_exit(Duration::from_secs(10));
    let log = proxy.log();
    assert_eq!(
        std::fs::read_to_string(dir.join("state/k1.secret")).ok(),
        Some(secret),
        "the secret file was removed or changed: {log}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(
        log.contains("session.snapshot_file")
            && log.contains("k1.secret")
            && log.contains("a file of its own"),
        "{log}"
    );
}

/// A keyring reloaded (SIGHUP) to name a key's `secret_file` at the snapshot's path: the stop
/// checks again and does not write the snapshot over the key (ERROR, exit 1; the secret is
/// intact). Without the check at the stop, the snapshot replaced the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_file_named_by_a_reloaded_keyring_is_not_written_over_at_the_stop() {
    use base64::Engine as _;
    let upstream = upstream().await;
    let dir = temp_dir("snapqa-secret-reload");
    let users = Users::five();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = dir.join(format!("proxy-{}.toml", addr.port()));
        let text = config_text(&addr.to_string(), None, &upstream.url()).replace(
            "store = \"memory\"\n",
            "store = \"memory\"\nsnapshot_file = \"state/k3.secret\"\n",
        );
        write(&config, &text);
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    login(addr, &users, "alice").await;
    let secret = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
    write(&dir.join("state/k3.secret"), &secret);
    write(
        &dir.join("keys.toml"),
        &format!(
            "{}[[keys]]\nid = \"k3\"\nsecret_file = \"state/k3.secret\"\n",
            keyring_file_text("k1")
        ),
    );
    proxy.signal("HUP");
    proxy.wait_for_log("reloaded signing.keyring");
    let status = proxy.stop();
    let log = proxy.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join("state/k3.secret")).ok(),
        Some(secret),
        "the secret was written over: {log}"
    );
    let errors = proxy.json_messages("ERROR", &["session.snapshot_file", "is now the file"]);
    assert_eq!(errors.len(), 1, "{log}");
}

//! Findings of an adversarial review of `session.snapshot_file` (src/proxy/session_snapshot.rs),
//! each test written to fail before its fix. The library calls the proxy makes at its stop
//! (`save`) and at its start (`restore`), on stores of their own, with the times passed in.
//! Run: `cargo test --all-features --test session_snapshot_review`.
#![cfg(feature = "proxy")]

mod support_tmp;

use std::time::Duration;

use countersign::core::{Identity, Keyring, Secret};
use countersign::proxy::session::{
    MemorySessionStore, SessionId, SessionStore as _, SessionTimeouts,
};
use countersign::proxy::session_snapshot::{restore, save};
use support_tmp::TestDir;

const IDLE: u64 = 60;
const ABSOLUTE: u64 = 600;

fn store() -> MemorySessionStore {
    MemorySessionStore::new(
        SessionTimeouts {
            idle: Duration::from_secs(IDLE),
            absolute: Duration::from_secs(ABSOLUTE),
        },
        10,
    )
}

fn keys() -> Keyring {
    Keyring::single("k1", Secret::new(vec![7; 32]).unwrap()).unwrap()
}

async fn login(store: &MemorySessionStore, now: u64) -> SessionId {
    store
        .create(&Identity::new("alice", ["r"]), now)
        .await
        .unwrap()
        .0
}

/// Whether `id` is live at `now` (a request: `touch` extends its idle expiry).
async fn live(store: &MemorySessionStore, id: &SessionId, now: u64, touch: bool) -> bool {
    store.get(id, now, touch).await.unwrap().is_some()
}

/// The clock set back while the proxy was down (the host's clock ran ahead at the stop, NTP
/// stepped it back; a VM restored from an image): the restore cannot know how long the proxy
/// was down, but it knows what each session had left at the stop. A session 90 s from its
/// absolute timeout at the stop used to get a whole new `absolute_timeout` from the restore
/// (its login time, later than the restore, counted as the restore): kept in use, it lived 600 s
/// more instead of 90. The absolute timeout is the one limit a stolen cookie kept in use cannot
/// push back.
#[tokio::test]
async fn a_clock_set_back_since_the_stop_does_not_extend_the_absolute_timeout() {
    let dir = TestDir::new("snapshot-review-absolute");
    let file = dir.join("sessions.snapshot");
    let before = store();
    let id = login(&before, 100_000).await;
    // In use every 50 s: only the absolute timeout (100_600) can end it.
    let mut now = 100_000;
    while now <= 100_500 {
        assert!(live(&before, &id, now, true).await, "ended early at {now}");
        now += 50;
    }
    // Stopped at 100_510: 90 s of its absolute lifetime left.
    save(&before, &file, &keys(), None, 100_510).unwrap();

    // Started with the clock 99_510 s behind the stop's.
    let after = store();
    let report = restore(&after, &file, &keys(), None, 1_000, 10)
        .unwrap()
        .unwrap();
    assert_eq!(report.restored, 1, "{report}");
    // Still in use every 40 s: at most the 90 s it had left.
    let mut now = 1_000;
    while now < 1_090 {
        assert!(live(&after, &id, now, true).await, "ended early at {now}");
        now += 40;
    }
    assert!(
        !live(&after, &id, 1_090, true).await,
        "still live 90 s after the restore, its absolute timeout passed"
    );
}

/// Same clock step, the idle timeout: a session idle for 55 s of its 60 at the stop has 5 s
/// left; it used to get a whole new idle timeout from the restore (its last use, later than
/// the restore, counted as the restore).
#[tokio::test]
async fn a_clock_set_back_since_the_stop_does_not_extend_the_idle_timeout() {
    let dir = TestDir::new("snapshot-review-idle");
    let file = dir.join("sessions.snapshot");
    let before = store();
    let id = login(&before, 100_000).await;
    // Last used at 100_000, stopped at 100_055: 5 s of idle left.
    save(&before, &file, &keys(), None, 100_055).unwrap();

    let after = store();
    let report = restore(&after, &file, &keys(), None, 1_000, 10)
        .unwrap()
        .unwrap();
    assert_eq!(report.restored, 1, "{report}");
    assert!(live(&after, &id, 1_004, false).await);
    assert!(
        !live(&after, &id, 1_005, false).await,
        "idle for 60 s (55 before the stop, 5 after the restore) and still live"
    );
}

/// Control: the clock moved forward as usual (the proxy down 30 s): nothing shifts, the time
/// down counts against the idle timeout, and the login time is kept.
#[tokio::test]
async fn a_normal_restart_keeps_the_times_of_the_stop() {
    let dir = TestDir::new("snapshot-review-normal");
    let file = dir.join("sessions.snapshot");
    let before = store();
    let id = login(&before, 100_000).await;
    assert!(live(&before, &id, 100_020, true).await);
    save(&before, &file, &keys(), None, 100_025).unwrap();

    let after = store();
    let report = restore(&after, &file, &keys(), None, 100_055, 10)
        .unwrap()
        .unwrap();
    assert_eq!(report.restored, 1, "{report}");
    let session = after.get(&id, 100_055, false).await.unwrap().unwrap();
    assert_eq!((session.created_at, session.last_seen), (100_000, 100_020));
    assert!(
        !live(&after, &id, 100_080, false).await,
        "idle since 100_020"
    );
}

/// A keyring whose active key has an id over 256 bytes: valid for the keyring (any length of
/// visible ASCII), so the proxy runs and its stop writes the snapshot sealed with it. The
/// restore refused every such file ("the key id is not one a keyring can hold"): each restart
/// logged every user out, with an ERROR line blaming the file. (Rotated ids, `<id>.<epoch>`,
/// reach that length from an id of about 240 bytes.)
#[tokio::test]
async fn a_long_key_id_the_keyring_holds_seals_a_snapshot_the_restore_reads() {
    let dir = TestDir::new("snapshot-review-keyid");
    let file = dir.join("sessions.snapshot");
    let long = "k".repeat(300);
    let keys = Keyring::single(&long, Secret::new(vec![7; 32]).unwrap()).unwrap();
    let before = store();
    let id = login(&before, 100_000).await;
    let saved = save(&before, &file, &keys, None, 100_010).unwrap();
    assert_eq!(saved.keyid, long);

    let after = store();
    let report = restore(&after, &file, &keys, None, 100_020, 10)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap();
    assert_eq!(report.restored, 1, "{report}");
    assert!(live(&after, &id, 100_020, false).await);

    // The same file for a keyring without that key: refused, the id not repeated (it is not
    // known to be the writer's until the seal is checked, and could be 64 KiB long).
    save(&after, &file, &keys, None, 100_030).unwrap();
    let e = restore(&store(), &file, &self::keys(), None, 100_040, 10).unwrap_err();
    let text = e.to_string();
    assert!(!text.contains(&long), "{text}");
    assert!(text.len() < 300, "{} bytes: {text}", text.len());
}

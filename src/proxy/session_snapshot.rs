//! `session.snapshot_file`: the in-memory session store written to a file when the proxy
//! stops gracefully and read back when it starts, so a restart (an upgrade, a key that waits
//! for one) does not log every user out of a single-machine proxy.
//!
//! What the file holds and why it is safe to keep on disk:
//! - no session id, only its SHA-256 (as the store itself, and Redis): the file cannot be
//!   turned back into cookies. It holds each session's CSRF token, which is useless without
//!   the cookie, the user name and roles, the login and last-use times, and the user's
//!   credential stamp in the users file at the time of the snapshot;
//! - it is sealed: an HMAC-SHA256 over the whole file, with a key derived (HKDF, its own
//!   salt) from the keyring's signing key at the time of the snapshot. A file edited, cut
//!   short or written by anyone without the keyring is refused, and so is one whose key the
//!   keyring no longer has (removed or retired): its sessions are not restored;
//! - it is read once: the start removes it before restoring anything, so a proxy that later
//!   crashes (and writes no new snapshot) cannot bring back, at its next start, sessions that
//!   ended in between (a logout, a users-file change). A file that cannot be removed stops
//!   the start;
//! - at the start, the sessions the current users file no longer allows (the user removed, or
//!   the password or roles changed: the credential stamp differs) and those that expired while
//!   the proxy was down are dropped, under the lifetimes and `max_sessions` configured now. A
//!   clock set back since the stop (the snapshot's time later than the start's) moves every
//!   session's times back as far: each keeps what it had left of its lifetimes at the stop.
//!
//! Written to a temporary file beside the target (created 0600), synced, then renamed over it,
//! so a crash while writing leaves no half file under the configured name.
//!
//! Format (version 2; integers big-endian): the magic `countersign-session-snapshot\0`, the
//! version byte, the time of the snapshot (u64), the sealing key's id (u16 length, bytes), the
//! `public_origin` of the proxy that wrote it (u16 length, bytes), the number of sessions
//! (u64), then per session: SHA-256 of its id (32), CSRF token (32), login
//! and last use (u64 each), a credential stamp (a byte 0, or 1 and 16 bytes), the encoded
//! identity (u32 length, bytes); then the HMAC (32).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::session::{Imported, MemorySessionStore, StoredSession, TOKEN_BYTES};
use super::users::{CredentialStamp, UsersHandle, CREDENTIAL_STAMP_BYTES};
use crate::core::{hkdf_sha256_32, keyed_hmac, Keyring};

const MAGIC: &[u8] = b"countersign-session-snapshot\0";
/// 2: the proxy's `public_origin` after the key id (1, an hour old, never released, had none).
const VERSION: u8 = 2;
/// Separates the sealing key from every other use of the keyring's secrets.
const SEAL_SALT: &[u8] = b"countersign/session-snapshot/v1";
const MAC_LEN: usize = 32;
/// Longest sealing key id repeated from a file in an error when the keyring does not have it
/// (rotated ids are `<id>.<epoch>`). A longer one the keyring has is read as any other.
const MAX_KEYID_BYTES: usize = 256;
/// Longest encoded identity a session in the file may have (the store's are far shorter:
/// user names are limited by `auth.max_username_bytes`).
const MAX_IDENTITY_BYTES: u32 = 64 * 1024;
/// Largest file read: this many bytes per session, for `max_sessions` sessions or
/// [`MIN_READ_SESSIONS`] whichever is more, plus the header. A session takes about 100 bytes
/// plus its identity.
pub const MAX_BYTES_PER_SESSION: u64 = 4096;
/// Sessions a file may hold for [`restore_for`] to read it, whatever `max_sessions` is now
/// (the default `session.max_sessions`). The file may hold more sessions than the store has
/// room for: `max_sessions` lowered since the stop. Those over it are left out, the least
/// recently used, as the operations guide promises; a size bound of the new `max_sessions`
/// alone refused the whole file instead. The bound only limits the time a forged or damaged
/// file costs the start: it is read as a stream, one identity at a time, never held whole.
pub const MIN_READ_SESSIONS: u64 = 1_000_000;

type HmacSha256 = Hmac<Sha256>;

/// A snapshot could not be written or read: the file and the problem.
#[derive(Debug)]
pub struct SnapshotError {
    path: PathBuf,
    kind: ErrorKind,
}

#[derive(Debug)]
enum ErrorKind {
    /// Reading, writing or renaming failed.
    Io(&'static str, io::Error),
    /// The file exists but could not be removed: restoring from it could later bring back
    /// sessions that ended, so the proxy must not start.
    NotRemoved(io::Error),
    /// Not a snapshot, another version, cut short, over the size limit.
    Format(String),
    /// The sealing key is not in the keyring (removed or retired since).
    UnknownKey(String),
    /// The seal does not match: edited, or sealed with another secret of that key id.
    BadSeal,
    /// Not a regular file (what it is: "a FIFO", "a folder"...): removed unread.
    NotAFile(&'static str),
    /// A device: never removed nor written over (the config refuses one; see [`is_device`]).
    Device,
    /// Written by the proxy of another `public_origin` (two proxies given one file).
    OtherProxy { written_for: String, this: String },
    /// The lock file could not be opened or locked (not because another process holds it).
    Lock(PathBuf, LockProblem),
    /// Another process held the lock file for the whole `session.snapshot_lock_wait`.
    LockHeld { lock: PathBuf, waited: Duration },
}

/// Why the lock file could not be taken, for [`ErrorKind::Lock`]: each has its own remedy.
#[derive(Debug)]
enum LockProblem {
    /// Something else than a regular file at its name ("a symbolic link", "a FIFO"...),
    /// planted there: not this proxy's lock file, so neither followed nor used.
    Planted(&'static str),
    /// It exists, but this process may not open it for reading and writing (another user's:
    /// left by a start as root, say). Its owner and mode.
    NoAccess {
        error: io::Error,
        uid: u32,
        mode: u32,
    },
    /// Missing, and it cannot be created beside the snapshot (a folder this process cannot
    /// write, a read-only file system).
    CannotCreate(io::Error),
    /// Opened, but `flock` failed (not because another process holds it).
    FlockFailed(io::Error),
}

/// Whether `path` is a character or block device (through symlinks): `/dev/null`, say. What
/// is at `session.snapshot_file` is removed at the start and replaced at the stop, a FIFO or a
/// socket planted there included; a device, which only root creates, was put there by the
/// config, and removing it (as root) would take it from the whole host.
pub fn is_device(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| is_device_kind(&meta))
}

/// Whether `meta` describes a character or block device (see [`is_device`]).
fn is_device_kind(meta: &fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = meta.file_type();
        kind.is_char_device() || kind.is_block_device()
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

/// What `meta` describes, for [`ErrorKind::NotAFile`].
fn file_kind(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = meta.file_type();
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if is_device_kind(meta) {
        return "a device";
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a file"
    }
}

impl SnapshotError {
    fn new(path: &Path, kind: ErrorKind) -> Self {
        SnapshotError {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// Whether the proxy must not start: the file exists but could not be removed, or
    /// another process held its lock for the whole wait. (A lock file that cannot be opened
    /// or locked at all, in a folder the proxy cannot write, does not: the proxy serves
    /// without the lock, as it serves when the stop will not be able to write the snapshot.)
    pub fn prevents_start(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::NotRemoved(_) | ErrorKind::LockHeld { .. } | ErrorKind::Device
        )
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            ErrorKind::Io(what, e) => write!(f, "session.snapshot_file {path}: cannot {what}: {e}"),
            ErrorKind::NotRemoved(e) => write!(
                f,
                "session.snapshot_file {path}: cannot remove it after reading ({e}); a snapshot \
                 left in place could bring back ended sessions at a later start: fix the \
                 folder's permissions or remove the file"
            ),
            ErrorKind::Format(problem) => {
                write!(
                    f,
                    "session.snapshot_file {path}: not a valid snapshot: {problem}"
                )
            }
            ErrorKind::UnknownKey(keyid) => write!(
                f,
                "session.snapshot_file {path}: sealed with key {keyid:?}, which the keyring no \
                 longer has (removed or retired)"
            ),
            ErrorKind::NotAFile(what) => write!(
                f,
                "session.snapshot_file {path}: not a regular file ({what}): removed unread"
            ),
            ErrorKind::Device => write!(
                f,
                "session.snapshot_file {path}: a device, not a file: neither read, removed nor \
                 written over (name a file, or leave snapshot_file out to keep no snapshot)"
            ),
            ErrorKind::OtherProxy { written_for, this } => write!(
                f,
                "session.snapshot_file {path}: written by the proxy of public_origin \
                 {written_for:?}, not by this one ({this:?}): its sessions are not this proxy's \
                 (server.public_origin changed since that stop, whose cookies the browsers do \
                 not send here; or two proxies share this file: give each a snapshot_file of \
                 its own)"
            ),
            ErrorKind::BadSeal => write!(
                f,
                "session.snapshot_file {path}: its seal does not match (the file was changed, or \
                 sealed with another secret under the same key id)"
            ),
            ErrorKind::Lock(lock, problem) => {
                let lock = lock.display();
                write!(f, "session.snapshot_file {path}: ")?;
                match problem {
                    LockProblem::Planted(kind) => write!(
                        f,
                        "its lock file {lock} is {kind}, not a regular file (not this proxy's: \
                         neither followed nor used): remove it, the next start creates the \
                         lock file itself"
                    )?,
                    LockProblem::NoAccess { error, uid, mode } => write!(
                        f,
                        "cannot open its lock file {lock} ({error}; it belongs to uid {uid}, \
                         mode {mode:04o}): give it to this process's user (mode 0600), or remove \
                         it once no proxy uses this snapshot_file"
                    )?,
                    LockProblem::CannotCreate(e) => write!(
                        f,
                        "cannot create its lock file {lock} ({e}): make the folder writable \
                         for this process"
                    )?,
                    LockProblem::FlockFailed(e) => write!(f, "cannot lock {lock} ({e})")?,
                }
                write!(
                    f,
                    ". This proxy serves without the lock: a second proxy given the same \
                     snapshot_file would not be noticed (the lock is held for a proxy's whole \
                     life)"
                )
            }
            ErrorKind::LockHeld { lock, waited } => write!(
                f,
                "session.snapshot_file {path}: another process still holds its lock {} after \
                 {waited:?} (session.snapshot_lock_wait): a proxy using the same snapshot_file \
                 is running (`fuser {}` names it). Stop it first, or give each proxy a \
                 snapshot_file of its own: two would overwrite each other's sessions at their \
                 stops",
                lock.display(),
                lock.display()
            ),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// What [`save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Sessions written.
    pub sessions: usize,
    /// The id of the key that sealed the file.
    pub keyid: String,
    /// Live sessions left out: their encoded identity is over the 64 KiB a restore reads (a
    /// `verify_url` answer with a huge role list). One such session must not cost every other
    /// its place in the file; its user logs in again after the restart.
    pub too_long: usize,
}

impl fmt::Display for Saved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {} sessions (sealed with key {:?}; not written: {} whose user name and roles \
             are over {MAX_IDENTITY_BYTES} bytes)",
            self.sessions, self.keyid, self.too_long
        )
    }
}

/// What [`restore`] did with a snapshot's sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// When the snapshot was taken (unix seconds).
    pub saved_at: u64,
    /// Sessions in the file.
    pub in_file: u64,
    /// Held again.
    pub restored: usize,
    /// Ended by their lifetimes while the proxy was down.
    pub expired: usize,
    /// Their user is no longer in the users file, or with another password or roles (or the
    /// proxy switched between a users file and `verify_url`).
    pub user_changed: usize,
    /// Not held: `max_sessions` reached.
    pub over_capacity: usize,
    /// Not held: the store already had them, or their identity was not well-formed.
    pub skipped: usize,
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {} of {} sessions (not restored: {} expired, {} whose user changed in the \
             users file, {} over session.max_sessions, {} skipped)",
            self.restored,
            self.in_file,
            self.expired,
            self.user_changed,
            self.over_capacity,
            self.skipped
        )
    }
}

/// The sealing MAC for key id `keyid` whose secret is `secret`.
fn seal(secret: &[u8], keyid: &str) -> HmacSha256 {
    keyed_hmac(&hkdf_sha256_32(SEAL_SALT, secret, keyid.as_bytes())[..])
}

/// A writer that feeds what it writes to the seal.
struct Sealing<W> {
    inner: W,
    mac: HmacSha256,
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// [`save_for`] a proxy without a name (`countersign-memfig`, tests).
pub fn save(
    store: &MemorySessionStore,
    path: &Path,
    keyring: &Keyring,
    users: Option<&UsersHandle>,
    now: u64,
) -> Result<Saved, SnapshotError> {
    save_for(store, path, keyring, users, now, "")
}

/// Writes the sessions of `store` live at `now` to `path`, sealed with the keyring's signing
/// key at `now`, each with its user's credential stamp in `users` (the users file loaded now),
/// for the proxy `proxy` (its `public_origin`): [`restore_for`] another refuses the file.
pub fn save_for(
    store: &MemorySessionStore,
    path: &Path,
    keyring: &Keyring,
    users: Option<&UsersHandle>,
    now: u64,
    proxy: &str,
) -> Result<Saved, SnapshotError> {
    let mut sessions = store.export_live(now);
    // A session whose identity the restore would refuse to read is left out here, counted:
    // written, it would make the whole file unreadable (and refusing to write the file, as
    // this once did, lost every session at the stop). The header's count is of those kept.
    let live = sessions.len();
    sessions.retain(|session| identity_fits(&session.identity));
    let too_long = live - sessions.len();
    if too_long > 0 {
        tracing::warn!(
            "session.snapshot_file {}: {too_long} sessions not written: their user name and \
             roles, encoded, are over the {MAX_IDENTITY_BYTES} bytes a restore reads (those \
             users log in again after the restart)",
            path.display()
        );
    }
    // The most recently used first: the start restores them in the file's order, so a store
    // with room for fewer keeps those (see `restore_for`).
    sessions.sort_unstable_by_key(|session| std::cmp::Reverse(session.last_seen));
    // Renamed over, a device would be gone from the host (see `is_device`).
    if is_device(path) {
        return Err(SnapshotError::new(path, ErrorKind::Device));
    }
    let key = keyring.signing_key(now);
    let keyid = key.keyid.to_string();
    let tmp = temporary_beside(path);
    let written = write_to(
        &tmp,
        &sessions,
        &keyid,
        key.secret.expose(),
        users,
        now,
        proxy,
    )
    .and_then(|()| fs::rename(&tmp, path).map_err(|e| ("rename the written file", e)))
    .map_err(|(what, e)| {
        let _ = fs::remove_file(&tmp);
        SnapshotError::new(path, ErrorKind::Io(what, e))
    });
    written?;
    // The rename is durable once the folder is synced (best effort: not every file system
    // lets a folder be opened for it).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(Saved {
        sessions: sessions.len(),
        keyid,
        too_long,
    })
}

/// Whether a session of this encoded identity can be written: [`read_sealed`] refuses a file
/// holding a longer one.
fn identity_fits(identity: &str) -> bool {
    u32::try_from(identity.len()).is_ok_and(|n| n <= MAX_IDENTITY_BYTES)
}

/// Whether `snapshot` and `other` name one existing file (the same device and inode on Unix,
/// the same canonical path elsewhere; through any symlink or hard link). The proxy removes
/// what is at `session.snapshot_file` at the start and renames a snapshot over it at the
/// stop: it must never be a file the config names for something else (the users file, the
/// keyring, the config itself).
pub fn same_file(snapshot: &Path, other: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        match (fs::metadata(snapshot), fs::metadata(other)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (fs::canonicalize(snapshot), fs::canonicalize(other)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// Whether [`save`] could write `path` now: its temporary file created (0600) beside it and
/// removed again. For the start, so that a folder the stop cannot write (read-only, another
/// owner) is news while it can still be fixed, not at the stop, with the sessions lost.
pub fn check_writable(path: &Path) -> Result<(), SnapshotError> {
    let tmp = temporary_beside(path);
    create_private(&tmp)
        .map_err(|e| SnapshotError::new(path, ErrorKind::Io("create a file beside it", e)))?;
    fs::remove_file(&tmp)
        .map_err(|e| SnapshotError::new(path, ErrorKind::Io("remove a file beside it", e)))
}

/// The lock a running proxy holds on its `session.snapshot_file` for its whole life: an
/// exclusive `flock(2)` on [`lock_path`], released by the kernel when the process ends, a
/// crash included (so no stale lock outlives it). Two proxies given one snapshot file would
/// each write their own sessions at their stops, the later over the earlier, logging the
/// other's users out at its next start; and a proxy started while the previous one is still
/// stopping (an overlapping restart) would restore nothing, since the file is written only at
/// the end of that stop. With the lock, the second waits for the first to end, then restores
/// what it wrote ([`SnapshotLock::acquire`]).
#[derive(Debug)]
pub struct SnapshotLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    file: File,
    path: PathBuf,
    /// The snapshot file locked, to take the lock again at the same name ([`Self::keep`]).
    snapshot: PathBuf,
}

/// What [`SnapshotLock::keep`] found at the lock file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKept {
    /// The name still names the file this process holds locked.
    Held,
    /// The file held was removed or replaced (a cleanup of `*.lock`, say): the name has been
    /// taken again, a file there created or opened and locked by this process, so a proxy
    /// started on the same snapshot file from now on waits for this one again.
    Retaken,
    /// The file now at the name is locked by another process: most likely a second proxy,
    /// started on the same snapshot file after the file held was removed, which did not wait
    /// for this one. This process keeps the file it held (unnamed) and looks again at the
    /// next check.
    TakenByAnother,
}

/// The lock file of the snapshot at `path`: `<file name>.lock` beside it. Created (0600,
/// empty) by the first proxy and left in place: it is never written, and removing it while a
/// proxy holds it would let a second proxy lock a new file of the same name.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// What one [`SnapshotLock::try_acquire`] found.
#[derive(Debug)]
pub enum LockAttempt {
    /// Held by this process from now on.
    Held(SnapshotLock),
    /// Another process holds it now.
    Busy,
}

impl SnapshotLock {
    /// One attempt at the lock of the snapshot at `path`, without waiting.
    pub fn try_acquire(path: &Path) -> Result<LockAttempt, SnapshotError> {
        let lock = lock_path(path);
        let failed =
            |problem: LockProblem| SnapshotError::new(path, ErrorKind::Lock(lock.clone(), problem));
        let file = open_lock_file(&lock).map_err(|e| failed(open_problem(&lock, e)))?;
        // Opened, not created, when it exists: anything but a regular file (a FIFO, a device
        // planted under its name) is not this proxy's lock file.
        let meta = file
            .metadata()
            .map_err(|e| failed(LockProblem::FlockFailed(e)))?;
        if !meta.is_file() {
            return Err(failed(LockProblem::Planted(file_kind(&meta))));
        }
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(LockAttempt::Held(SnapshotLock {
                file,
                path: lock,
                snapshot: path.to_path_buf(),
            })),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(LockAttempt::Busy),
            Err(e) => Err(failed(LockProblem::FlockFailed(e.into()))),
        }
    }

    /// The lock of the snapshot at `path`: taken at once when free, else tried again every
    /// `retry` until `wait` has passed since the first attempt (then
    /// [`SnapshotError::prevents_start`]). `waiting` is called once, at the first attempt
    /// that finds the lock held (for a log line). `sleep` waits (the caller's runtime).
    pub async fn acquire<S, F>(
        path: &Path,
        wait: Duration,
        retry: Duration,
        waiting: impl FnOnce(&Path),
        mut sleep: S,
    ) -> Result<SnapshotLock, SnapshotError>
    where
        S: FnMut(Duration) -> F,
        F: std::future::Future<Output = ()>,
    {
        let started = std::time::Instant::now();
        let mut waiting = Some(waiting);
        loop {
            if let LockAttempt::Held(lock) = Self::try_acquire(path)? {
                return Ok(lock);
            }
            if let Some(waiting) = waiting.take() {
                waiting(&lock_path(path));
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(SnapshotError::new(
                    path,
                    ErrorKind::LockHeld {
                        lock: lock_path(path),
                        waited: wait,
                    },
                ));
            }
            sleep(retry.min(wait - waited)).await;
        }
    }

    /// The lock file held.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock file's name still names the file held, and if not, the lock taken
    /// again there. `flock` locks a file, not a name: once the file held is removed (or a
    /// file renamed over it), a second proxy creates a new one under the name, locks it at
    /// once and runs beside this one, each writing the snapshot over the other's at its stop.
    /// The proxy calls this every [`LOCK_CHECK_INTERVAL`] and once more before its stop
    /// writes the snapshot. Costs two `stat`s while the name is kept.
    pub fn keep(&mut self) -> Result<LockKept, SnapshotError> {
        use std::os::unix::fs::MetadataExt as _;
        let held = self.file.metadata().map_err(|e| {
            SnapshotError::new(
                &self.snapshot,
                ErrorKind::Lock(self.path.clone(), LockProblem::FlockFailed(e)),
            )
        })?;
        if let Ok(named) = fs::symlink_metadata(&self.path) {
            if named.dev() == held.dev() && named.ino() == held.ino() {
                return Ok(LockKept::Held);
            }
        }
        match Self::try_acquire(&self.snapshot)? {
            LockAttempt::Held(lock) => {
                // The old file (unnamed now) closes, releasing a lock nobody can ask for.
                *self = lock;
                Ok(LockKept::Retaken)
            }
            LockAttempt::Busy => Ok(LockKept::TakenByAnother),
        }
    }
}

/// How often a running proxy checks that its lock file is still in place
/// ([`SnapshotLock::keep`]): the longest a second proxy can go unnoticed after the lock file
/// was removed, and the longest a name left free stays free.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The lock file, opened for reading and writing and created (0600) if missing, never
/// truncated, and never through a symbolic link at its name: anyone who can write the
/// snapshot's folder could plant one, and following it would create an empty file wherever it
/// points (as root, anywhere), or lock another file (the users file; the snapshot itself,
/// which the restore then removes, so that a second proxy creates it anew and locks that).
fn open_lock_file(path: &Path) -> io::Result<File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // A FIFO must not hold the start: refused once open. No device planted there becomes
        // the process's terminal.
        .custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY).bits() as i32)
        .open(path)
}

/// Why [`open_lock_file`] failed with `e`, told from what is at `lock` now.
fn open_problem(lock: &Path, e: io::Error) -> LockProblem {
    use std::os::unix::fs::MetadataExt as _;
    match fs::symlink_metadata(lock) {
        // `O_NOFOLLOW` refused it (ELOOP): said as what it is, not "too many levels of
        // symbolic links".
        Ok(meta) if meta.file_type().is_symlink() => LockProblem::Planted("a symbolic link"),
        Ok(meta) if !meta.is_file() => LockProblem::Planted(file_kind(&meta)),
        Ok(meta) => LockProblem::NoAccess {
            error: e,
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        },
        Err(_) => LockProblem::CannotCreate(e),
    }
}

/// How long a temporary file beside the snapshot must have been left unchanged before the
/// start removes it: a stop still writing one (another process's, in a restart that overlaps
/// the old process's stop) changes it every 64 KiB, and syncs it within seconds.
pub const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the temporary files beside `path` that a stop did not finish (killed while writing,
/// the host down): `<file name>.tmp-<pid>-<16 hex digits>`, regular files left unchanged for
/// [`LEFTOVER_AGE`] at `now`. Their names are random, so no later stop replaces one: without
/// this each interrupted stop would leave a file as large as the snapshot, until the disk is
/// full. Returns how many were removed; the first error (the folder unreadable, a file that
/// cannot be removed) once every other file was tried.
pub fn remove_leftovers(path: &Path, now: std::time::SystemTime) -> Result<usize, SnapshotError> {
    let (Some(name), Some(folder)) = (path.file_name(), path.parent()) else {
        return Ok(0);
    };
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let mut prefix = name.to_os_string();
    prefix.push(".tmp-");
    let prefix = prefix.as_encoded_bytes();
    let entries = fs::read_dir(folder)
        .map_err(|e| SnapshotError::new(path, ErrorKind::Io("list its folder", e)))?;
    let mut removed = 0;
    let mut first_error = None;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.as_encoded_bytes().strip_prefix(prefix) else {
            continue;
        };
        if !is_temporary_suffix(rest) {
            continue;
        }
        // Not followed: a symlink or anything but a regular file is not one this code wrote.
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let unchanged_for = meta
            .modified()
            .ok()
            .and_then(|modified| now.duration_since(modified).ok());
        if !meta.is_file() || unchanged_for.is_none_or(|age| age < LEFTOVER_AGE) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(SnapshotError::new(
            path,
            ErrorKind::Io(
                "remove a temporary file an interrupted stop left beside it",
                e,
            ),
        )),
        None => Ok(removed),
    }
}

/// Whether `rest` is what [`temporary_beside`] puts after `.tmp-`: decimal digits, `-`, 16
/// lower-case hex digits.
fn is_temporary_suffix(rest: &[u8]) -> bool {
    let Some(dash) = rest.iter().position(|&b| b == b'-') else {
        return false;
    };
    let (pid, random) = (&rest[..dash], &rest[dash + 1..]);
    !pid.is_empty()
        && pid.iter().all(u8::is_ascii_digit)
        && random.len() == 16
        && random
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A fresh name beside `path` for the file written before the rename: the process id and a
/// random part, so that two processes with the same id (each one's pid 1 in its container,
/// on a shared volume) never write the same temporary file. A stop that does not finish
/// leaves it: [`remove_leftovers`] at the next start.
fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    path.with_file_name(name)
}

fn write_to(
    tmp: &Path,
    sessions: &[StoredSession],
    keyid: &str,
    secret: &[u8],
    users: Option<&UsersHandle>,
    now: u64,
    proxy: &str,
) -> Result<(), (&'static str, io::Error)> {
    let file = create_private(tmp).map_err(|e| ("create a file beside it", e))?;
    let mut out = Sealing {
        inner: BufWriter::with_capacity(1 << 16, file),
        mac: seal(secret, keyid),
    };
    let users = users.map(UsersHandle::load);
    let write = |out: &mut Sealing<BufWriter<File>>| -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&[VERSION])?;
        out.write_all(&now.to_be_bytes())?;
        let keyid_len = u16::try_from(keyid.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "key id too long"))?;
        out.write_all(&keyid_len.to_be_bytes())?;
        out.write_all(keyid.as_bytes())?;
        let proxy_len = u16::try_from(proxy.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "public_origin too long"))?;
        out.write_all(&proxy_len.to_be_bytes())?;
        out.write_all(proxy.as_bytes())?;
        out.write_all(&(sessions.len() as u64).to_be_bytes())?;
        for session in sessions {
            out.write_all(&session.key)?;
            out.write_all(&session.csrf)?;
            out.write_all(&session.created_at.to_be_bytes())?;
            out.write_all(&session.last_seen.to_be_bytes())?;
            let stamp = users
                .as_ref()
                .zip(session.user())
                .and_then(|(db, user)| db.stamp_of(&user));
            match stamp {
                Some(stamp) => {
                    out.write_all(&[1])?;
                    out.write_all(stamp.as_bytes())?;
                }
                None => out.write_all(&[0])?,
            }
            let identity = session.identity.as_bytes();
            // `save_for` left out the longer ones (`identity_fits`): kept as a guard, so that
            // no file a restore would refuse is ever written.
            let len = u32::try_from(identity.len())
                .ok()
                .filter(|&n| n <= MAX_IDENTITY_BYTES)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "identity too long"))?;
            out.write_all(&len.to_be_bytes())?;
            out.write_all(identity)?;
        }
        Ok(())
    };
    write(&mut out).map_err(|e| ("write", e))?;
    let mac = out.mac.finalize().into_bytes();
    let mut file = out
        .inner
        .into_inner()
        .map_err(|e| ("write", e.into_error()))?;
    file.write_all(&mac).map_err(|e| ("write", e))?;
    file.sync_all().map_err(|e| ("sync", e))
}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // `create_new`: never an existing file (a name taken, or a link planted in the folder).
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// A reader that feeds what it reads to the seal, and counts.
struct Unsealing<R> {
    inner: R,
    mac: HmacSha256,
}

impl<R: Read> Unsealing<R> {
    fn exact<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf)?;
        self.mac.update(&buf);
        Ok(buf)
    }

    fn u64(&mut self) -> io::Result<u64> {
        self.exact::<8>().map(u64::from_be_bytes)
    }

    fn bytes(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.bytes_into(&mut buf, len)?;
        Ok(buf)
    }

    /// The next `len` bytes into `buf` (its allocation reused).
    fn bytes_into(&mut self, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
        buf.clear();
        buf.resize(len, 0);
        self.inner.read_exact(buf)?;
        self.mac.update(buf);
        Ok(())
    }
}

/// [`restore_for`] a proxy without a name (`countersign-memfig`, tests).
pub fn restore(
    store: &MemorySessionStore,
    path: &Path,
    keyring: &Keyring,
    users: Option<&UsersHandle>,
    now: u64,
    max_sessions: usize,
) -> Result<Option<Restored>, SnapshotError> {
    restore_for(store, path, keyring, users, now, max_sessions, "")
}

/// Restores the sessions of the snapshot at `path` into `store` at `now` (the proxy's start,
/// before it serves): None when there is no file. A file written by another proxy (another
/// `proxy`, i.e. `public_origin`: two proxies given one `snapshot_file`) is refused: its
/// sessions are that proxy's, not this one's. The file is removed before any session is
/// restored (an error that [`SnapshotError::prevents_start`] if that fails); its seal is
/// checked with the `keyring`; sessions whose user `users` no longer allows, or that have
/// expired, are dropped. A file over max(`max_sessions`, [`MIN_READ_SESSIONS`]) ×
/// [`MAX_BYTES_PER_SESSION`] bytes plus 64 KiB is refused unread.
pub fn restore_for(
    store: &MemorySessionStore,
    path: &Path,
    keyring: &Keyring,
    users: Option<&UsersHandle>,
    now: u64,
    max_sessions: usize,
    proxy: &str,
) -> Result<Option<Restored>, SnapshotError> {
    // What is there, before opening it: opening a FIFO waits for a writer, which would hold
    // the start (before the listeners, on the thread that handles SIGTERM) for ever. A device
    // (`/dev/null`, through a symlink too) is refused and left alone (`is_device`). Anything
    // else but a regular file (a FIFO, a socket) cannot be a snapshot: removed unread, as a
    // file that is not one. (Swapped for a FIFO between this look and the
    // open below is a race only someone who can write the folder can run, and that one can
    // remove the file anyway.)
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Ok(meta) if is_device_kind(&meta) => {
            return Err(SnapshotError::new(path, ErrorKind::Device));
        }
        Ok(meta) if !meta.is_file() => {
            return Err(match fs::remove_file(path) {
                Ok(()) => SnapshotError::new(path, ErrorKind::NotAFile(file_kind(&meta))),
                Err(not_removed) => SnapshotError::new(path, ErrorKind::NotRemoved(not_removed)),
            });
        }
        // A regular file; or not even looked at (a folder on the way without search
        // permission): the open below says why.
        _ => {}
    }
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            // Unreadable now, perhaps readable after a fix: it must not wait for that.
            return Err(match fs::remove_file(path) {
                Ok(()) => SnapshotError::new(path, ErrorKind::Io("open it (removed it)", e)),
                Err(not_removed) => SnapshotError::new(path, ErrorKind::NotRemoved(not_removed)),
            });
        }
    };
    // Removed before anything is restored: read once (the open file stays readable).
    fs::remove_file(path).map_err(|e| SnapshotError::new(path, ErrorKind::NotRemoved(e)))?;
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::new(path, ErrorKind::Io("read it", e)))?
        .len();
    let limit = read_limit(max_sessions);
    if len > limit {
        return Err(SnapshotError::new(
            path,
            ErrorKind::Format(format!(
                "{len} bytes, over the {limit} bytes read at most (max(session.max_sessions \
                 ({max_sessions}), {MIN_READ_SESSIONS}) × {MAX_BYTES_PER_SESSION}, plus 64 KiB)"
            )),
        ));
    }
    let body_len = len.checked_sub(MAC_LEN as u64).ok_or_else(|| {
        SnapshotError::new(path, ErrorKind::Format(format!("{len} bytes: cut short")))
    })?;
    // Twice: first only to check the file and its seal, holding no session (one identity at
    // a time: at most 64 KiB), so a file forged by someone without the keyring costs reading
    // it, not memory in proportion to it; then, sealed, to restore its sessions one by one as
    // they are read, so the start never holds them twice (the file's and the store's). The
    // second pass checks the seal again: the file read is the file checked, and if it changed
    // in between, what it restored is taken back.
    let mut file = Opened {
        reader: BufReader::with_capacity(1 << 16, file),
        body_len,
        path,
    };
    restore_sealed(store, &mut file, keyring, users, now, proxy).map(Some)
}

/// The largest snapshot [`restore_for`] reads with `max_sessions` configured now: not a bound
/// of the new `max_sessions` alone, so that lowering it keeps the most recently used sessions
/// of a file written under a higher one (see [`MIN_READ_SESSIONS`]).
fn read_limit(max_sessions: usize) -> u64 {
    (max_sessions as u64)
        .max(MIN_READ_SESSIONS)
        .saturating_mul(MAX_BYTES_PER_SESSION)
        .saturating_add(64 * 1024)
}

/// The snapshot being restored: its reader, its length without the seal, its path (for the
/// errors).
struct Opened<'a, R> {
    reader: R,
    body_len: u64,
    path: &'a Path,
}

/// [`restore_for`] once the file is open, removed and its length checked: both passes.
fn restore_sealed<R: Read + io::Seek>(
    store: &MemorySessionStore,
    file: &mut Opened<'_, R>,
    keyring: &Keyring,
    users: Option<&UsersHandle>,
    now: u64,
    proxy: &str,
) -> Result<Restored, SnapshotError> {
    let (body_len, path) = (file.body_len, file.path);
    let reader = &mut file.reader;
    let sealed = read_sealed(reader, body_len, keyring, path, None)?;
    // Checked once the seal is: only then is the name the file gives its writer's.
    if sealed.written_for != proxy {
        return Err(SnapshotError::new(
            path,
            ErrorKind::OtherProxy {
                written_for: sealed.written_for,
                this: proxy.to_owned(),
            },
        ));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| SnapshotError::new(path, ErrorKind::Io("read it", e)))?;
    let users = users.map(UsersHandle::load);
    let mut report = Restored {
        saved_at: sealed.saved_at,
        in_file: sealed.sessions,
        ..Restored::default()
    };
    // The clock set back since the stop (the snapshot's time, sealed, later than now): how
    // long the proxy was down cannot be known, but what each session had left at the stop
    // can. Its login and last use move back as far as the clock did, so each keeps the
    // lifetimes it had left at the stop (the time down counted as none). Without this, a
    // login or last use later than now counted as now (`import`): every session got a whole
    // new idle and absolute timeout from the restore, however close to them it was.
    let set_back = sealed.saved_at.saturating_sub(now);
    // The keys of the sessions restored so far (32 bytes each, not the sessions), to take
    // them back if the second pass does not end with the seal.
    let mut added: Zeroizing<Vec<[u8; 32]>> = Zeroizing::new(Vec::new());
    // In the file's order, the most recently used first (the stop writes them so): when the
    // store has room for fewer than the file holds (`session.max_sessions` lowered since),
    // the ones left out are the least recently used, as the users most likely to be back are
    // those active just before the stop.
    let mut restore_one = |mut session: StoredSession, stamp: Option<CredentialStamp>| {
        let allowed = match (&users, &stamp, session.user()) {
            (Some(db), Some(stamp), Some(user)) => {
                db.stamp_of(&user).is_some_and(|now| now.matches(stamp))
            }
            // Without a users file (`verify_url`) the proxy cannot tell; a session sealed
            // without a stamp was made so too.
            (None, None, Some(_)) => true,
            // A switch between a users file and `verify_url`, or a malformed identity.
            (_, _, Some(_)) => false,
            (_, _, None) => {
                report.skipped += 1;
                return;
            }
        };
        if !allowed {
            report.user_changed += 1;
            return;
        }
        session.created_at = session.created_at.saturating_sub(set_back);
        session.last_seen = session.last_seen.saturating_sub(set_back);
        match store.import(&session, now) {
            Imported::Added => {
                report.restored += 1;
                added.push(session.key);
            }
            Imported::Expired => report.expired += 1,
            Imported::Full => report.over_capacity += 1,
            Imported::Duplicate | Imported::Malformed => report.skipped += 1,
        }
    };
    let second =
        read_sealed(reader, body_len, keyring, path, Some(&mut restore_one)).and_then(|again| {
            match again.written_for == proxy {
                true => Ok(()),
                // Replaced in between by another proxy's (sealed) snapshot.
                false => Err(SnapshotError::new(
                    path,
                    ErrorKind::OtherProxy {
                        written_for: again.written_for,
                        this: proxy.to_owned(),
                    },
                )),
            }
        });
    if let Err(e) = second {
        for key in added.iter() {
            store.delete_key(key);
        }
        return Err(e);
    }
    Ok(report)
}

/// What a [`read_sealed`] pass found in the file's header, once its seal matched.
struct Sealed {
    /// The time of the snapshot.
    saved_at: u64,
    /// The `public_origin` of the proxy that wrote it.
    written_for: String,
    /// The sessions it holds.
    sessions: u64,
}

/// Called by [`read_sealed`] with each session read, and its credential stamp.
type Visit<'a> = &'a mut dyn FnMut(StoredSession, Option<CredentialStamp>);

/// Reads the file from its start, giving each session to `visit` as it is read (none read
/// into memory without it: a pass that only checks); then its header, once the seal matches.
/// A session given to `visit` is not yet known to be sealed: that is known only when this
/// returns `Ok`.
fn read_sealed<R: Read>(
    reader: &mut R,
    body_len: u64,
    keyring: &Keyring,
    path: &Path,
    mut visit: Option<Visit<'_>>,
) -> Result<Sealed, SnapshotError> {
    let format = |problem: String| SnapshotError::new(path, ErrorKind::Format(problem));
    let short = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => format("cut short".to_owned()),
        _ => SnapshotError::new(path, ErrorKind::Io("read it", e)),
    };
    // The header, read before the key is known (then fed to the seal).
    let mut body = reader.by_ref().take(body_len);
    let mut head = vec![0u8; MAGIC.len() + 1 + 8 + 2];
    body.read_exact(&mut head).map_err(short)?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(format("not a countersign session snapshot".to_owned()));
    }
    if head[MAGIC.len()] != VERSION {
        return Err(format(format!(
            "version {} (this proxy reads version {VERSION})",
            head[MAGIC.len()]
        )));
    }
    let at = MAGIC.len() + 1;
    let saved_at = u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or_default());
    let keyid_len = u16::from_be_bytes([head[at + 8], head[at + 9]]);
    let mut keyid = vec![0u8; usize::from(keyid_len)];
    body.read_exact(&mut keyid).map_err(short)?;
    // Read before the seal can be checked, and named in the error when unknown: only a key id
    // as a keyring could hold it (printable, short) is believed enough to be shown. A longer
    // one is looked up all the same (a keyring takes ids of any length, and the stop seals
    // with its active key's), only not repeated when the keyring does not have it.
    let not_a_key_id = || format("the key id is not one a keyring can hold".to_owned());
    let keyid = String::from_utf8(keyid)
        .ok()
        .filter(|id| crate::core::is_valid_key_id(id))
        .ok_or_else(not_a_key_id)?;
    let secret = match keyring.verification_key(&keyid, saved_at) {
        Some(secret) => secret,
        None if keyid.len() > MAX_KEYID_BYTES => return Err(not_a_key_id()),
        None => return Err(SnapshotError::new(path, ErrorKind::UnknownKey(keyid))),
    };
    let mut mac = seal(secret.expose(), &keyid);
    mac.update(&head);
    mac.update(keyid.as_bytes());
    let mut input = Unsealing { inner: body, mac };
    let proxy_len = u16::from_be_bytes(input.exact::<2>().map_err(short)?);
    let proxy = String::from_utf8(input.bytes(usize::from(proxy_len)).map_err(short)?)
        .map_err(|_| format("public_origin is not UTF-8".to_owned()))?;
    let count = input.u64().map_err(short)?;
    // Each session takes at least 85 bytes: a count the file cannot hold is refused before
    // anything is allocated for it.
    if count > body_len / 85 {
        return Err(format(format!(
            "{count} sessions cannot fit in {body_len} bytes"
        )));
    }
    let mut identity = Vec::new();
    for _ in 0..count {
        let key = input.exact::<32>().map_err(short)?;
        let csrf = input.exact::<TOKEN_BYTES>().map_err(short)?;
        let created_at = input.u64().map_err(short)?;
        let last_seen = input.u64().map_err(short)?;
        let stamp = match input.exact::<1>().map_err(short)? {
            [0] => None,
            [1] => Some(CredentialStamp::from_bytes(
                input.exact::<CREDENTIAL_STAMP_BYTES>().map_err(short)?,
            )),
            [tag] => return Err(format(format!("unknown stamp tag {tag}"))),
        };
        let len = u32::from_be_bytes(input.exact::<4>().map_err(short)?);
        if len > MAX_IDENTITY_BYTES {
            return Err(format(format!("an identity of {len} bytes")));
        }
        input
            .bytes_into(&mut identity, len as usize)
            .map_err(short)?;
        let Ok(text) = std::str::from_utf8(&identity) else {
            return Err(format("an identity is not UTF-8".to_owned()));
        };
        let Some(visit) = visit.as_mut() else {
            continue;
        };
        visit(
            StoredSession {
                key,
                csrf,
                created_at,
                last_seen,
                identity: text.into(),
            },
            stamp,
        );
    }
    let Unsealing { inner: body, mac } = input;
    if body.limit() != 0 {
        return Err(format("bytes after the last session".to_owned()));
    }
    let mut presented = [0u8; MAC_LEN];
    reader.read_exact(&mut presented).map_err(short)?;
    let expected = mac.finalize().into_bytes();
    if !bool::from(expected.as_slice().ct_eq(&presented)) {
        return Err(SnapshotError::new(path, ErrorKind::BadSeal));
    }
    Ok(Sealed {
        saved_at,
        written_for: proxy,
        sessions: count,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher as _, SaltString};

    use super::*;
    use crate::core::{Identity, Secret};
    use crate::proxy::session::{SessionId, SessionStore as _, SessionTimeouts};
    use crate::proxy::users::{UserDb, UserRecord};

    fn store(max_sessions: usize) -> MemorySessionStore {
        MemorySessionStore::new(
            SessionTimeouts {
                idle: Duration::from_secs(60),
                absolute: Duration::from_secs(600),
            },
            max_sessions,
        )
    }

    fn keyring(id: &str, byte: u8) -> Keyring {
        Keyring::single(id, Secret::new(vec![byte; 32]).unwrap()).unwrap()
    }

    fn cheap_hash(password: &str) -> String {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    fn users(records: &[(&str, &str, &[&str])]) -> UsersHandle {
        UsersHandle::new(
            UserDb::from_records(
                records
                    .iter()
                    .map(|(name, hash, roles)| UserRecord {
                        name: (*name).into(),
                        password_hash: (*hash).into(),
                        roles: roles.iter().map(|r| (*r).into()).collect(),
                    })
                    .collect(),
            )
            .unwrap(),
        )
    }

    fn identity(user: &str, roles: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            roles: roles.iter().map(|r| (*r).into()).collect(),
        }
    }

    fn create(store: &MemorySessionStore, user: &str, roles: &[&str], now: u64) -> SessionId {
        futures_lite_block(store.create(&identity(user, roles), now)).0
    }

    fn futures_lite_block<T>(f: impl std::future::Future<Output = Result<T, StoreError>>) -> T {
        // The memory store answers at once: its futures are ready on the first poll.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => result.unwrap(),
            std::task::Poll::Pending => panic!("the memory store's future was not ready"),
        }
    }

    use crate::proxy::session::StoreError;

    fn get(
        store: &MemorySessionStore,
        id: &SessionId,
        now: u64,
    ) -> Option<crate::proxy::session::Session> {
        futures_lite_block(store.get(id, now, false))
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "countersign-snapshot-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        fn file(&self) -> PathBuf {
            self.0.join("sessions.snapshot")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Round trip: the live sessions come back with their CSRF token, login time, last use
    /// and identity; expired ones are not written; the file is removed by the restore.
    #[test]
    fn sessions_come_back_as_they_were() {
        let dir = Dir::new("roundtrip");
        let hash = cheap_hash("pw");
        let users = users(&[("alice", &hash, &["admin", "a,b"]), ("bob", &hash, &[])]);
        let before = store(100);
        let alice = create(&before, "alice", &["admin", "a,b"], 1_000);
        let bob = create(&before, "bob", &[], 1_000);
        let gone = create(&before, "bob", &[], 900); // idle since 900: expired at 960
        assert!(get(&before, &gone, 959).is_some());
        futures_lite_block(before.get(&alice, 1_030, true)).unwrap();
        let keys = keyring("k1", 7);
        let saved = save(&before, &dir.file(), &keys, Some(&users), 1_040).unwrap();
        assert_eq!(
            saved,
            Saved {
                sessions: 2,
                keyid: "k1".into(),
                too_long: 0,
            }
        );

        let after = store(100);
        let report = restore(&after, &dir.file(), &keys, Some(&users), 1_050, 100)
            .unwrap()
            .unwrap();
        assert_eq!(
            report,
            Restored {
                saved_at: 1_040,
                in_file: 2,
                restored: 2,
                ..Restored::default()
            }
        );
        assert!(!dir.file().exists());
        for id in [&alice, &bob] {
            assert_eq!(get(&before, id, 1_050), get(&after, id, 1_050));
        }
        let alice_now = get(&after, &alice, 1_050).unwrap();
        assert_eq!(alice_now.last_seen, 1_030);
        assert_eq!(alice_now.roles, ["admin", "a,b"]);
        assert!(get(&after, &gone, 1_050).is_none());
        // Restored sessions behave as any: they expire by their times, end with their user.
        assert!(get(&after, &bob, 1_060).is_none(), "bob idle since 1000");
        assert_eq!(futures_lite_block(after.delete_user("alice")), 1);
        assert_eq!(
            futures_lite_block(after.count()),
            1,
            "bob's place is held until the sweep"
        );
        after.sweep(1_060);
        assert_eq!(futures_lite_block(after.count()), 0);
        // No file: None, nothing restored.
        assert!(
            restore(&after, &dir.file(), &keys, Some(&users), 1_060, 100)
                .unwrap()
                .is_none()
        );
    }

    /// Expired while down, over `max_sessions`, already held: counted, not held.
    #[test]
    fn what_cannot_be_held_again_is_counted() {
        let dir = Dir::new("counts");
        let keys = keyring("k1", 7);
        let before = store(100);
        let ids: Vec<SessionId> = (0..5)
            .map(|i| create(&before, "x", &[], 1_000 + i))
            .collect();
        save(&before, &dir.file(), &keys, None, 1_010).unwrap();
        // 1_061: the first two (idle since 1000 and 1001) have expired.
        let after = store(2);
        let report = restore(&after, &dir.file(), &keys, None, 1_061, 2)
            .unwrap()
            .unwrap();
        assert_eq!(
            (report.restored, report.expired, report.over_capacity),
            (2, 2, 1),
            "{report}"
        );
        // The two most recently used of the three live ones (the file's order is the
        // store's, not the last uses'), whatever shard each landed in.
        let kept: Vec<bool> = ids[2..]
            .iter()
            .map(|id| get(&after, id, 1_061).is_some())
            .collect();
        assert_eq!(kept, [false, true, true], "idle since 1002, 1003, 1004");
        // Restoring into a store that has them already skips them.
        save(&before, &dir.file(), &keys, None, 1_010).unwrap();
        let report = restore(&before, &dir.file(), &keys, None, 1_020, 100)
            .unwrap()
            .unwrap();
        assert_eq!((report.restored, report.skipped), (0, 5), "{report}");
    }

    /// With a users file: a user removed, or with another password or roles, is not
    /// restored; a snapshot made without a users file is not restored into a proxy with one,
    /// nor the other way round.
    #[test]
    fn the_users_file_decides() {
        let dir = Dir::new("users");
        let keys = keyring("k1", 7);
        let (h1, h2) = (cheap_hash("one"), cheap_hash("two"));
        let old = users(&[
            ("keep", &h1, &["r"]),
            ("gone", &h1, &[]),
            ("pw", &h1, &[]),
            ("roles", &h1, &["r"]),
        ]);
        let new = users(&[
            ("keep", &h1, &["r", "r"]),
            ("pw", &h2, &[]),
            ("roles", &h1, &["s"]),
        ]);
        let before = store(100);
        let keep = create(&before, "keep", &["r"], 1_000);
        for name in ["gone", "pw", "roles"] {
            create(&before, name, &[], 1_000);
        }
        save(&before, &dir.file(), &keys, Some(&old), 1_001).unwrap();
        let after = store(100);
        let report = restore(&after, &dir.file(), &keys, Some(&new), 1_002, 100)
            .unwrap()
            .unwrap();
        assert_eq!((report.restored, report.user_changed), (1, 3), "{report}");
        assert!(get(&after, &keep, 1_002).is_some());

        save(&before, &dir.file(), &keys, None, 1_001).unwrap();
        let report = restore(&store(100), &dir.file(), &keys, Some(&old), 1_002, 100)
            .unwrap()
            .unwrap();
        assert_eq!((report.restored, report.user_changed), (0, 4), "{report}");
        save(&before, &dir.file(), &keys, Some(&old), 1_001).unwrap();
        let report = restore(&store(100), &dir.file(), &keys, None, 1_002, 100)
            .unwrap()
            .unwrap();
        assert_eq!((report.restored, report.user_changed), (0, 4), "{report}");
    }

    /// Every change of the file is refused with nothing restored, and never panics: each byte
    /// flipped, every length cut, bytes added, the wrong key.
    #[test]
    fn every_change_is_refused_and_nothing_is_restored() {
        let dir = Dir::new("tamper");
        let keys = keyring("k1", 7);
        let before = store(100);
        create(&before, "alice", &["admin"], 1_000);
        create(&before, "bob", &[], 1_000);
        save(&before, &dir.file(), &keys, None, 1_001).unwrap();
        let good = fs::read(dir.file()).unwrap();
        let try_restore = |bytes: &[u8], keys: &Keyring| {
            fs::write(dir.file(), bytes).unwrap();
            let after = store(100);
            let result = restore(&after, &dir.file(), keys, None, 1_002, 100);
            assert!(!dir.file().exists(), "not removed");
            assert_eq!(
                futures_lite_block(after.count()),
                0,
                "restored from a bad file"
            );
            result
        };
        for i in 0..good.len() {
            for bit in [0x01, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                let e = try_restore(&bad, &keys)
                    .err()
                    .unwrap_or_else(|| panic!("byte {i} ^ {bit:#x} of {} passed", good.len()));
                assert!(!e.prevents_start(), "byte {i}: {e}");
            }
        }
        for len in 0..good.len() {
            let e = try_restore(&good[..len], &keys).unwrap_err();
            assert!(
                e.to_string().contains("not a valid snapshot"),
                "len {len}: {e}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(try_restore(&longer, &keys).is_err());
        let e = try_restore(&good, &keyring("k1", 8)).unwrap_err();
        assert!(e.to_string().contains("seal does not match"), "{e}");
        let e = try_restore(&good, &keyring("k2", 7)).unwrap_err();
        assert!(e.to_string().contains("no longer has"), "{e}");
        // Over the size read at most (a sparse file: its length is what is checked, unread).
        let over = File::create(dir.file()).unwrap();
        over.set_len(read_limit(0) + 1).unwrap();
        drop(over);
        let e = restore(&store(1), &dir.file(), &keys, None, 1_002, 0).unwrap_err();
        assert!(e.to_string().contains("over the"), "{e}");
        assert!(!dir.file().exists());
        // And the good file, once more, restores.
        fs::write(dir.file(), &good).unwrap();
        let report = restore(&store(100), &dir.file(), &keys, None, 1_002, 100)
            .unwrap()
            .unwrap();
        assert_eq!(report.restored, 2);
    }

    /// A snapshot that cannot be removed must not be restored (a later start could bring back
    /// sessions that ended), and stops the start; so does one that cannot even be opened
    /// (here: its "folder" is a file).
    #[test]
    fn a_file_that_cannot_be_removed_stops_the_start() {
        let dir = Dir::new("stuck");
        let not_a_folder = dir.0.join("plain");
        fs::write(&not_a_folder, b"x").unwrap();
        let path = not_a_folder.join("sessions.snapshot");
        let e = restore(&store(10), &path, &keyring("k1", 7), None, 1, 10).unwrap_err();
        assert!(e.prevents_start(), "{e}");
        assert!(e.to_string().contains("cannot remove it"), "{e}");
        let e = save(&store(10), &path, &keyring("k1", 7), None, 1).unwrap_err();
        assert!(
            e.to_string().contains("cannot create a file beside it"),
            "{e}"
        );
    }

    /// A key id no keyring could hold (control characters, 64 KiB long) is refused as a
    /// format error, never repeated in the message.
    #[test]
    fn a_forged_key_id_is_not_repeated() {
        let dir = Dir::new("keyid");
        let keys = keyring("k1", 7);
        save(&store(10), &dir.file(), &keys, None, 1_000).unwrap();
        let good = fs::read(dir.file()).unwrap();
        let at = MAGIC.len() + 1 + 8;
        for forged in [vec![b'\n'; 2], vec![b'a'; 60_000]] {
            let mut bad = good[..at].to_vec();
            bad.extend_from_slice(&(forged.len() as u16).to_be_bytes());
            bad.extend_from_slice(&forged);
            bad.extend_from_slice(&good[at + 2 + 2..]);
            fs::write(dir.file(), &bad).unwrap();
            let e = restore(&store(10), &dir.file(), &keys, None, 1_001, 10).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("not one a keyring can hold"), "{text}");
            assert!(text.len() < 300, "{} bytes", text.len());
        }
    }

    /// A snapshot sealed by a rotating key (`k.<epoch>`) is checked with the key of the
    /// snapshot's time, not the restore's.
    #[test]
    fn a_rotating_key_seals_with_the_epoch_of_the_snapshot() {
        use crate::core::{KeySpec, Rotation};
        let dir = Dir::new("rotating");
        let keys = Keyring::new(
            "k",
            vec![KeySpec {
                id: "k".into(),
                secret: Secret::new(vec![3; 32]).unwrap(),
                retired: false,
                rotation: Some(Rotation::Every(Duration::from_secs(100))),
            }],
            Rotation::Off,
        )
        .unwrap();
        let before = store(10);
        create(&before, "a", &[], 1_000);
        let saved = save(&before, &dir.file(), &keys, None, 1_010).unwrap();
        assert_eq!(saved.keyid, "k.10");
        let report = restore(&store(10), &dir.file(), &keys, None, 1_055, 10)
            .unwrap()
            .unwrap();
        assert_eq!(report.restored, 1);
    }
    /// A restart with another `public_origin` (a new domain, http to https): the snapshot
    /// of the old one is refused, and the line says that a changed `public_origin` is one
    /// reason, not only two proxies sharing the file (all it used to suggest, sending the
    /// operator who had just changed the origin looking for a second proxy).
    #[test]
    fn a_changed_public_origin_is_named_as_a_reason() {
        let dir = Dir::new("origin");
        let keys = keyring("k1", 7);
        let before = store(10);
        create(&before, "a", &[], 1_000);
        save_for(&before, &dir.file(), &keys, None, 1_001, "http://old.test").unwrap();
        let after = store(10);
        let e = restore_for(
            &after,
            &dir.file(),
            &keys,
            None,
            1_002,
            10,
            "https://new.test",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"http://old.test\"")
                && text.contains("\"https://new.test\"")
                && text.contains("public_origin changed since"),
            "{text}"
        );
        assert!(!e.prevents_start(), "{text}");
        assert_eq!(futures_lite_block(after.count()), 0);
        assert!(!dir.file().exists());
    }

    /// The names [`temporary_beside`] gives are the ones [`remove_leftovers`] recognises
    /// (and nothing else of the folder is).
    #[test]
    fn leftover_names_are_the_temporary_names() {
        let path = Path::new("/x/sessions.snapshot");
        for _ in 0..100 {
            let tmp = temporary_beside(path);
            let name = tmp.file_name().unwrap().to_str().unwrap();
            let rest = name.strip_prefix("sessions.snapshot.tmp-").unwrap();
            assert!(is_temporary_suffix(rest.as_bytes()), "{name}");
        }
        for rest in [
            "",
            "1",
            "1-",
            "-0123456789abcdef",
            "1-0123456789abcdeg",
            "1-0123456789ABCDEF",
        ] {
            assert!(!is_temporary_suffix(rest.as_bytes()), "{rest:?}");
        }
    }

    /// A snapshot taken while the clock was ahead (set back since: an RTC that came up wrong,
    /// then NTP), restored: a session's login time after the restore counts as the restore,
    /// as its last use does, so the absolute timeout still ends it `absolute_timeout` after
    /// the restore at the latest. It used to keep the future login time: kept in use, the
    /// session outlived its absolute timeout by as far as the clock had been ahead.
    #[test]
    fn a_login_time_after_the_restore_counts_as_the_restore() {
        let dir = Dir::new("future");
        let keys = keyring("k1", 7);
        let before = store(10);
        let id = create(&before, "a", &[], 100_000);
        save(&before, &dir.file(), &keys, None, 100_010).unwrap();
        let after = store(10);
        let report = restore(&after, &dir.file(), &keys, None, 1_000, 10)
            .unwrap()
            .unwrap();
        assert_eq!(report.restored, 1, "{report}");
        // Used every 50 s (idle timeout 60 s): only the absolute timeout (600 s) can end it.
        let mut now = 1_000;
        while now < 1_600 {
            assert!(
                futures_lite_block(after.get(&id, now, true)).is_some(),
                "ended early at {now}"
            );
            now += 50;
        }
        assert!(
            get(&after, &id, 1_600).is_none(),
            "still live {}s after the restore",
            1_600 - 1_000
        );
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// The lock: one holder at a time (a second open file, as another process has, finds it
    /// busy); free again once the holder is dropped; the lock file stays, 0600, empty, and
    /// is not taken for an interrupted stop's leftover.
    #[test]
    fn one_holder_at_a_time() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = Dir::new("lock");
        let file = dir.file();
        let LockAttempt::Held(first) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("a free lock was busy");
        };
        assert_eq!(first.path(), lock_path(&file));
        assert_eq!(lock_path(&file), dir.0.join("sessions.snapshot.lock"));
        assert!(matches!(
            SnapshotLock::try_acquire(&file).unwrap(),
            LockAttempt::Busy
        ));
        // Waiting: gives up after `wait`, having said so once, with the key to raise.
        let mut said = 0;
        let mut sleeps = 0;
        let held = block_on(SnapshotLock::acquire(
            &file,
            Duration::from_millis(200),
            Duration::from_millis(20),
            |lock| {
                said += 1;
                assert_eq!(lock, lock_path(&file));
            },
            |pause| {
                sleeps += 1;
                assert!(pause <= Duration::from_millis(20));
                tokio::time::sleep(pause)
            },
        ))
        .unwrap_err();
        assert_eq!(said, 1);
        assert!(sleeps >= 5, "{sleeps} retries in 200 ms");
        assert!(held.prevents_start());
        let text = held.to_string();
        for part in [
            "sessions.snapshot.lock",
            "session.snapshot_lock_wait",
            "200ms",
        ] {
            assert!(text.contains(part), "{text}");
        }
        drop(first);
        let LockAttempt::Held(second) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("the lock was not released with its holder");
        };
        let meta = fs::metadata(second.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 0);
        // Not a temporary file of an interrupted stop, however old.
        let later = std::time::SystemTime::now() + LEFTOVER_AGE * 10;
        assert_eq!(remove_leftovers(&file, later).unwrap(), 0);
        assert!(second.path().exists());
    }

    /// Released while waited for: the waiter takes it then, not at the end of its wait.
    #[test]
    fn a_waiter_takes_the_lock_once_released() {
        let dir = Dir::new("lock-wait");
        let file = dir.file();
        let LockAttempt::Held(first) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("a free lock was busy");
        };
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(first);
        });
        let started = std::time::Instant::now();
        let lock = block_on(SnapshotLock::acquire(
            &file,
            Duration::from_secs(20),
            Duration::from_millis(10),
            |_| {},
            tokio::time::sleep,
        ))
        .unwrap();
        releaser.join().unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        drop(lock);
    }

    /// The lock file removed while held (a cleanup of `*.lock`): `keep` takes the name again,
    /// so a second holder is busy again, as before the removal; a name that still names the
    /// file held costs nothing more than a look.
    #[test]
    fn a_removed_lock_file_is_taken_again() {
        let dir = Dir::new("lock-removed");
        let file = dir.file();
        let LockAttempt::Held(mut lock) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("a free lock was busy");
        };
        assert_eq!(lock.keep().unwrap(), LockKept::Held);
        fs::remove_file(lock_path(&file)).unwrap();
        // What the removal opened: a second holder gets a new file under the name.
        let LockAttempt::Held(second) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("the name of a removed lock file was busy");
        };
        drop(second);
        fs::remove_file(lock_path(&file)).unwrap();
        assert_eq!(lock.keep().unwrap(), LockKept::Retaken);
        assert!(lock_path(&file).is_file());
        assert!(matches!(
            SnapshotLock::try_acquire(&file).unwrap(),
            LockAttempt::Busy
        ));
        assert_eq!(lock.keep().unwrap(), LockKept::Held);
    }

    /// A file locked by another holder renamed over the lock file's name: `keep` says so (and
    /// keeps what it holds) until that holder lets go, then takes the name again.
    #[test]
    fn a_lock_file_another_holds_is_told_then_taken_again_once_free() {
        let dir = Dir::new("lock-replaced");
        let file = dir.file();
        let LockAttempt::Held(mut lock) = SnapshotLock::try_acquire(&file).unwrap() else {
            panic!("a free lock was busy");
        };
        let other_name = dir.0.join("other");
        let other = File::create(&other_name).unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        fs::rename(&other_name, lock_path(&file)).unwrap();
        assert_eq!(lock.keep().unwrap(), LockKept::TakenByAnother);
        assert_eq!(lock.keep().unwrap(), LockKept::TakenByAnother);
        drop(other);
        assert_eq!(lock.keep().unwrap(), LockKept::Retaken);
        assert_eq!(lock.keep().unwrap(), LockKept::Held);
        assert!(matches!(
            SnapshotLock::try_acquire(&file).unwrap(),
            LockAttempt::Busy
        ));
    }

    /// A lock file that is not a regular file (a FIFO planted under its name) is refused,
    /// without waiting on it; the start goes on without the lock (said in an ERROR line).
    #[test]
    fn a_lock_file_that_is_not_a_file_is_refused() {
        let dir = Dir::new("lock-fifo");
        let file = dir.file();
        let status = std::process::Command::new("mkfifo")
            .arg(lock_path(&file))
            .status()
            .unwrap();
        assert!(status.success());
        let e = SnapshotLock::try_acquire(&file).unwrap_err();
        assert!(!e.prevents_start());
        assert!(e.to_string().contains("a FIFO"), "{e}");
        assert!(e.to_string().contains("would not be noticed"), "{e}");
    }

    /// A device at the path (the config refuses one; a restore or save reached anyway, e.g. by
    /// a device made there since): neither removed nor renamed over, and the start stops. A
    /// copy of `/dev/null`'s device (1, 3) made with `mknod` where this process may (root),
    /// else `/dev/null`, which such a process may not remove either.
    #[test]
    fn a_device_is_neither_removed_nor_written_over() {
        use std::os::unix::fs::FileTypeExt as _;
        let dir = Dir::new("device");
        let made = std::process::Command::new("mknod")
            .arg(dir.file())
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        let device = if made.success() {
            dir.file()
        } else {
            let uid = std::process::Command::new("id").arg("-u").output().unwrap();
            assert_ne!(
                String::from_utf8_lossy(&uid.stdout).trim(),
                "0",
                "root, no mknod"
            );
            PathBuf::from("/dev/null")
        };
        let is_device =
            || fs::metadata(&device).is_ok_and(|meta| meta.file_type().is_char_device());
        assert!(is_device());
        let keys = keyring("k1", 7);
        let sessions = store(100);
        create(&sessions, "alice", &[], 1_000);
        let e = save(&sessions, &device, &keys, None, 1_010).unwrap_err();
        assert!(e.prevents_start(), "{e}");
        assert!(
            e.to_string()
                .contains("a device, not a file: neither read, removed nor written over"),
            "{e}"
        );
        assert!(is_device(), "renamed over");
        let e = restore(&store(100), &device, &keys, None, 1_020, 100).unwrap_err();
        assert!(e.prevents_start(), "{e}");
        assert!(e.to_string().contains("a device, not a file"), "{e}");
        assert!(is_device(), "removed");
    }

    /// Reads `first` until the restore seeks back to the start, then `second`: a file changed
    /// between the restore's two passes.
    struct ChangedBetweenPasses {
        first: io::Cursor<Vec<u8>>,
        second: io::Cursor<Vec<u8>>,
        seeked: bool,
    }

    impl Read for ChangedBetweenPasses {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.seeked {
                false => self.first.read(buf),
                true => self.second.read(buf),
            }
        }
    }

    impl io::Seek for ChangedBetweenPasses {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.seeked = true;
            self.second.seek(to)
        }
    }

    /// The second pass restores each session as it reads it (no copy of the file's sessions
    /// is held): if its seal then fails (the file changed since the first pass checked it),
    /// every session it restored is taken back, and the store is as before the restore.
    #[test]
    fn a_file_changed_between_the_passes_restores_nothing() {
        let dir = Dir::new("changed");
        let keys = keyring("k1", 7);
        let before = store(100);
        let ids: Vec<SessionId> = (0..3)
            .map(|i| create(&before, "x", &[], 1_000 + i))
            .collect();
        save(&before, &dir.file(), &keys, None, 1_010).unwrap();
        let sealed = fs::read(dir.file()).unwrap();
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        let body_len = (sealed.len() - MAC_LEN) as u64;
        let restore_changed = |after: &MemorySessionStore, first: &[u8], second: &[u8]| {
            let mut file = Opened {
                reader: ChangedBetweenPasses {
                    first: io::Cursor::new(first.to_vec()),
                    second: io::Cursor::new(second.to_vec()),
                    seeked: false,
                },
                body_len,
                path: &dir.file(),
            };
            restore_sealed(after, &mut file, &keys, None, 1_020, "")
        };
        let after = store(100);
        let e = restore_changed(&after, &sealed, &changed).unwrap_err();
        assert!(e.to_string().contains("seal does not match"), "{e}");
        assert_eq!(futures_lite_block(after.count()), 0);
        for id in &ids {
            assert!(get(&after, id, 1_020).is_none());
        }
        // Unchanged: all three, as a control of the reader above.
        let report = restore_changed(&after, &sealed, &sealed).unwrap();
        assert_eq!(report.restored, 3, "{report}");
        for id in &ids {
            assert!(get(&after, id, 1_020).is_some());
        }
    }
}

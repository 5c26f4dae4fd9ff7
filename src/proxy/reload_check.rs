//! `server.reload_check_interval`: noticing, without a signal, that a file SIGHUP reloads has
//! changed (the keyring and the `secret_file`s it names, the users file, the TLS certificate and
//! key, the client certificates and keys presented to upstreams, and `proxy.toml`, whose live
//! keys SIGHUP applies). A check only says which parts
//! changed; the reload itself is SIGHUP's, run by the server's signal loop.
//!
//! Why file contents and not modification times: Kubernetes updates a Secret volume by writing
//! a new directory and atomically repointing the `..data` symlink, so the path the proxy was
//! given (`keys.toml -> ..data/keys.toml`) is a symlink whose own times never change, and a
//! tool that copies a file may keep its times. The files are small (their loaders refuse
//! anything over 1 MiB, the users file over `auth.max_users_file`; a certificate chain is a few
//! KiB), so each check reads them whole, following symlinks, and compares SHA-256 digests.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// The most bytes of one file a check reads (the users file: at least one more than
/// `auth.max_users_file`): more than any file a reload accepts. A larger file is fingerprinted
/// by its length and its first this many bytes (its reload fails anyway).
const MAX_CHECKED_BYTES: u64 = 4 * 1024 * 1024;

/// Which of the separately reloaded parts a reload reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReloadParts {
    /// `signing.keyring`, with the `secret_file`s it names.
    pub(crate) keyring: bool,
    /// `auth.users_file`.
    pub(crate) users: bool,
    /// `server.tls_cert` and `server.tls_key`, as one pair.
    pub(crate) tls: bool,
    /// The client certificates presented to upstreams (`upstream[].client_cert_file` and
    /// `client_key_file`, `auth.verify_client_cert_file` and `verify_client_key_file`).
    pub(crate) client_certs: bool,
    /// The config file itself: compared with the settings running; a valid edit's live keys
    /// (`[server.response_headers]`) are applied, as SIGHUP applies them, and the keys waiting
    /// for a restart are logged. Checked like the other files: the check is the signal where
    /// nothing can send one, so what SIGHUP applies, a change seen by the check applies too.
    pub(crate) config: bool,
}

impl ReloadParts {
    /// Everything (SIGHUP).
    pub(crate) const ALL: ReloadParts = ReloadParts {
        keyring: true,
        users: true,
        tls: true,
        client_certs: true,
        config: true,
    };

    /// Nothing.
    pub(crate) const NONE: ReloadParts = ReloadParts {
        keyring: false,
        users: false,
        tls: false,
        client_certs: false,
        config: false,
    };

    /// Whether anything is to be reloaded.
    pub(crate) fn any(self) -> bool {
        self.reads_files() || self.config
    }

    /// Whether a file the proxy loads is to be read again (not only the config compared).
    pub(crate) fn reads_files(self) -> bool {
        self.keyring || self.users || self.tls || self.client_certs
    }

    /// The file parts as bits (keyring 1, users 2, TLS pair 4, client certificates 8; the
    /// config file is no file the proxy loads and has no bit): what the reload gauges keep
    /// per part, so a later reload of other parts does not hide one still failing.
    pub(crate) fn file_bits(self) -> u8 {
        u8::from(self.keyring)
            | u8::from(self.users) << 1
            | u8::from(self.tls) << 2
            | u8::from(self.client_certs) << 3
    }
}

/// The files one reload reads, part by part: what a check watches.
#[derive(Debug, Clone)]
pub(crate) struct WatchedPaths {
    /// `signing.keyring` (its `secret_file`s are found in it at each check).
    pub(crate) keyring: PathBuf,
    /// `auth.users_file`, when a reload reads one, and `auth.max_users_file`.
    pub(crate) users: Option<(PathBuf, u64)>,
    /// `server.tls_cert` and `server.tls_key`, with TLS.
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    /// Every client certificate and key file (upstreams' and `verify_url`'s).
    pub(crate) client_certs: Vec<PathBuf>,
    /// The config file the proxy started from.
    pub(crate) config: Option<PathBuf>,
}

/// What one file looked like at a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// SHA-256 of its length and bytes (at most [`MAX_CHECKED_BYTES`] of them).
    Content([u8; 32]),
    /// It could not be read (missing, no permission, a folder): a file that disappears, or
    /// appears again, is a change too.
    Unreadable(std::io::ErrorKind),
}

/// Every watched file's state at one check, part by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// The keyring file, then each `secret_file` it named at this check.
    keyring: Vec<(PathBuf, FileState)>,
    users: Option<FileState>,
    tls: Option<(FileState, FileState)>,
    client_certs: Vec<FileState>,
    config: Option<FileState>,
}

impl WatchedPaths {
    /// Reads every watched file. Blocking (file reads): call it off the event loops.
    /// `previous` is the last check's snapshot: while the keyring file is unchanged, the
    /// `secret_file`s it names are taken from there instead of parsing the keyring again (a
    /// parse makes short-lived, unzeroized copies of any inline `secret`).
    pub(crate) fn snapshot(&self, previous: Option<&Snapshot>) -> Snapshot {
        let keyring_read = read_capped(&self.keyring);
        let keyring_state = state_of(&keyring_read);
        let mut keyring = vec![(self.keyring.clone(), keyring_state)];
        // The secret files as the keyring names them now: a keyring that now names another
        // file has changed itself, so a changed list never goes unnoticed.
        let secret_files: Vec<PathBuf> = match previous {
            Some(previous)
                if previous.keyring.first().map(|(_, state)| state) == Some(&keyring_state) =>
            {
                previous
                    .keyring
                    .iter()
                    .skip(1)
                    .map(|(file, _)| file.clone())
                    .collect()
            }
            _ => match &keyring_read {
                Ok((_, bytes)) => std::str::from_utf8(bytes)
                    .map(|text| crate::keyfile::secret_files(text, &self.keyring))
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            },
        };
        for file in secret_files {
            let state = state_of(&read_capped(&file));
            keyring.push((file, state));
        }
        Snapshot {
            keyring,
            users: (self.users.as_ref()).map(|(file, max)| {
                state_of(&read_within(
                    file,
                    max.saturating_add(1).max(MAX_CHECKED_BYTES),
                ))
            }),
            tls: self
                .tls
                .as_ref()
                .map(|(cert, key)| (state_of(&read_capped(cert)), state_of(&read_capped(key)))),
            client_certs: self
                .client_certs
                .iter()
                .map(|file| state_of(&read_capped(file)))
                .collect(),
            config: self.config.as_deref().map(|f| state_of(&read_capped(f))),
        }
    }
}

impl Snapshot {
    /// The parts with a file that differs between `self` (an earlier check) and `newer`.
    pub(crate) fn changed(&self, newer: &Snapshot) -> ReloadParts {
        ReloadParts {
            keyring: self.keyring != newer.keyring,
            users: self.users != newer.users,
            tls: self.tls != newer.tls,
            client_certs: self.client_certs != newer.client_certs,
            config: self.config != newer.config,
        }
    }
}

/// The file's length and its first [`MAX_CHECKED_BYTES`] bytes, following symlinks. In a
/// zeroizing buffer sized up front (as `keyfile` reads keyrings): the keyring and its
/// `secret_file`s hold key material.
fn read_capped(path: &Path) -> Result<(u64, Zeroizing<Vec<u8>>), std::io::ErrorKind> {
    read_within(path, MAX_CHECKED_BYTES)
}

/// [`read_capped`] with a cap of `max` bytes.
fn read_within(path: &Path, max: u64) -> Result<(u64, Zeroizing<Vec<u8>>), std::io::ErrorKind> {
    let file = std::fs::File::open(path).map_err(|e| e.kind())?;
    let len = file.metadata().map_err(|e| e.kind())?.len();
    let capacity = usize::try_from(len.min(max)).unwrap_or(0);
    // One byte more, so reading up to the end never has to grow (and copy) the buffer.
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity.saturating_add(1)));
    file.take(max)
        .read_to_end(&mut bytes)
        .map_err(|e| e.kind())?;
    Ok((len, bytes))
}

/// A read's fingerprint. Only a digest is kept, never the bytes: a SHA-256 of a secret of 32
/// random bytes or more gives nothing away.
fn state_of(read: &Result<(u64, Zeroizing<Vec<u8>>), std::io::ErrorKind>) -> FileState {
    match read {
        Ok((len, bytes)) => {
            let mut hasher = Sha256::new();
            hasher.update(len.to_le_bytes());
            hasher.update(bytes.as_slice());
            FileState::Content(hasher.finalize().into())
        }
        Err(kind) => FileState::Unreadable(*kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "countersign-reload-check-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Each part is reported on its own; the keyring part covers the secret files it names
    /// (relative to its folder), and a missing file is a state of its own.
    #[test]
    fn changes_are_reported_per_part_including_secret_files() {
        let dir = temp_dir("parts");
        let keyring = dir.join("keys.toml");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            "keys.toml",
            "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"k1.secret\"\n",
        );
        write("k1.secret", "one");
        write("users.toml", "u1");
        write("cert.pem", "c1");
        write("key.pem", "p1");
        write("client.pem", "cc1");
        write("client.key", "ck1");
        write("proxy.toml", "cf1");
        let paths = WatchedPaths {
            keyring: keyring.clone(),
            users: Some((dir.join("users.toml"), 1024 * 1024)),
            tls: Some((dir.join("cert.pem"), dir.join("key.pem"))),
            client_certs: vec![dir.join("client.pem"), dir.join("client.key")],
            config: Some(dir.join("proxy.toml")),
        };
        let first = paths.snapshot(None);
        assert_eq!(first.changed(&paths.snapshot(None)), ReloadParts::NONE);

        write("k1.secret", "two");
        // With the previous snapshot the keyring is not parsed again, and its secret file is
        // still read.
        let second = paths.snapshot(Some(&first));
        assert_eq!(
            first.changed(&second),
            ReloadParts {
                keyring: true,
                ..ReloadParts::NONE
            }
        );
        write("key.pem", "p2");
        let third = paths.snapshot(Some(&second));
        assert_eq!(
            second.changed(&third),
            ReloadParts {
                tls: true,
                ..ReloadParts::NONE
            }
        );
        // A client key: its own part.
        write("client.key", "ck2");
        let changed = paths.snapshot(Some(&third));
        assert_eq!(
            third.changed(&changed),
            ReloadParts {
                client_certs: true,
                ..ReloadParts::NONE
            }
        );
        // The config file: its own part.
        write("proxy.toml", "cf2");
        let third = paths.snapshot(Some(&changed));
        assert_eq!(
            changed.changed(&third),
            ReloadParts {
                config: true,
                ..ReloadParts::NONE
            }
        );
        // A keyring that names another secret file: that file is the one watched from now on.
        write(
            "keys.toml",
            "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"k1b.secret\"\n",
        );
        write("k1b.secret", "three");
        let renamed = paths.snapshot(Some(&third));
        assert!(third.changed(&renamed).keyring);
        write("k1b.secret", "four");
        let third = paths.snapshot(Some(&renamed));
        assert!(renamed.changed(&third).keyring);
        std::fs::remove_file(dir.join("users.toml")).unwrap();
        let fourth = paths.snapshot(None);
        assert_eq!(
            third.changed(&fourth),
            ReloadParts {
                users: true,
                ..ReloadParts::NONE
            }
        );
        assert_eq!(fourth.changed(&paths.snapshot(None)), ReloadParts::NONE);
        write("users.toml", "u1");
        assert!(fourth.changed(&paths.snapshot(None)).users);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A users file larger than a check reads of other files (4 MiB), within a raised
    /// `auth.max_users_file`: a change past 4 MiB, at the same length, is still seen.
    #[test]
    fn a_large_users_file_is_read_to_its_own_limit() {
        let dir = temp_dir("large-users");
        let file = dir.join("users.toml");
        let mut bytes = vec![b'#'; 5 * 1024 * 1024];
        std::fs::write(&file, &bytes).unwrap();
        let watched = |max: u64| WatchedPaths {
            keyring: dir.join("keys.toml"),
            users: Some((file.clone(), max)),
            tls: None,
            client_certs: Vec::new(),
            config: None,
        };
        let (raised, default) = (watched(8 * 1024 * 1024), watched(1024 * 1024));
        let (before_raised, before_default) = (raised.snapshot(None), default.snapshot(None));
        bytes[4_718_592] = b'x';
        std::fs::write(&file, &bytes).unwrap();
        assert!(before_raised.changed(&raised.snapshot(None)).users);
        // At the default limit a file this large is refused by the reload anyway: its first
        // 4 MiB and its length are what the check compares.
        assert!(!before_default.changed(&default.snapshot(None)).users);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Same length, same modification time, other bytes: still a change (contents are compared,
    /// not times).
    #[test]
    fn contents_are_compared_not_times() {
        let dir = temp_dir("times");
        let file = dir.join("users.toml");
        std::fs::write(&file, "aaaa").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let paths = WatchedPaths {
            keyring: dir.join("keys.toml"),
            users: Some((file.clone(), 1024 * 1024)),
            tls: None,
            client_certs: Vec::new(),
            config: None,
        };
        let before = paths.snapshot(None);
        std::fs::write(&file, "bbbb").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(before.changed(&paths.snapshot(None)).users);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
